"""The one way harc-hpc writes files and directories: atomically, durably, safe under concurrency.

Every artifact, record and config snapshot is written under a temporary sibling name
``.<name>.tmp-<host>-<pid>-<token>``, fsynced (the file, or every file and folder of a tree), then
renamed into place and its parent folder fsynced. A reader, a later run or a crash therefore sees
either the old content or the whole new one, never a part. Two writers replacing the same directory
at once (two runners of one task) both succeed and one of their (identical) results stays.

The temporary names carry the writer's host and pid so that ``sweep_stale_temporaries`` can remove
what a killed task left (hundreds of GB of activation stores at scale) without touching the
temporaries of a writer that is still alive. ``No space left on device`` while writing becomes a
``DiskFullError`` naming the final path, the bytes needed (when the caller knows them) and the bytes
free; the temporary is removed, so nothing half-written remains.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from harc_hpc.errors import DiskFullError

PathLike = Union[str, os.PathLike]

_HOST = socket.gethostname().replace("/", "_")
# .<name>.tmp-<host>-<pid>-<token>; the legacy .<name>.tmp-<pid> of earlier versions is this host's.
_TMP_RE = re.compile(r"^\..+\.tmp-(?:(?P<host>.+)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})|(?P<legacy_pid>\d+))$")


def temp_sibling(final: PathLike) -> Path:
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temporary(name: str) -> bool:
    return _TMP_RE.match(name) is not None


def remove_path(path: PathLike) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def discard(path: PathLike) -> None:
    """Delete ``path`` (file or directory) so that a kill midway leaves only a temporary that the
    next sweep removes: renamed to a temporary sibling first (atomic), then removed. Nothing there
    (or already moved by another process): nothing to do."""
    path = Path(path)
    aside = temp_sibling(path)
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    remove_path(aside)


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on directories; data files must not
        if not directory:
            raise
        del exc
    finally:
        os.close(fd)


def fsync_one(path: PathLike) -> None:
    """Flush one file, or one folder's entries (not what lies under it), to stable storage."""
    path = Path(path)
    _fsync_path(path, directory=path.is_dir())


def fsync_tree(path: PathLike) -> None:
    """Flush a file, or every file and folder under a directory, to stable storage."""
    path = Path(path)
    if path.is_dir():
        for dirpath, _dirs, files in os.walk(path):
            for name in files:
                _fsync_path(Path(dirpath) / name)
            _fsync_path(Path(dirpath), directory=True)
    elif path.exists():
        _fsync_path(path)


def _is_disk_full(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError):
            return False  # already translated
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(path: PathLike) -> Optional[int]:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def publish(tmp: PathLike, final: PathLike) -> None:
    """Rename ``tmp`` onto ``final`` (file or directory), replacing what is there, then fsync the
    parent folder. Safe when another process publishes the same ``final`` at the same time."""
    tmp, final = Path(tmp), Path(final)
    for _ in range(1000):
        try:
            os.replace(tmp, final)  # atomic for files; for a directory only onto an empty one
            break
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise
            # A non-empty directory (or a file of the other kind) is in the way: move it aside under
            # a temporary name (atomic; the sweep removes it if we die now) and try again. Another
            # writer may have moved or replaced it meanwhile, hence the loop.
            discard(final)
    else:  # pragma: no cover - 1000 lost races in a row
        raise RuntimeError(f"{final}: could not replace it (another process keeps writing it)")
    _fsync_path(final.parent, directory=True)


@contextlib.contextmanager
def atomic_path(final: PathLike, *, needed_bytes: Optional[int] = None, make_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path (a directory already when ``make_dir``); when the block
    succeeds it is fsynced and replaces ``final``; when it fails it is removed.

    ``needed_bytes``: what the caller is about to write, if known; refused up front when the
    filesystem has less free, and named in the error when the disk fills anyway.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if needed_bytes is not None:
        free = free_bytes(final.parent)
        if free is not None and free < needed_bytes:
            raise DiskFullError(final, needed_bytes, free)
    tmp = temp_sibling(final)
    if make_dir:
        tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        publish(tmp, final)
    except BaseException as exc:
        remove_path(tmp)
        if _is_disk_full(exc):
            raise DiskFullError(final, needed_bytes, free_bytes(final.parent)) from exc
        raise


def atomic_dir(final: PathLike, *, needed_bytes: Optional[int] = None):
    """``atomic_path`` for a directory: the temporary directory exists when the block starts."""
    return atomic_path(final, needed_bytes=needed_bytes, make_dir=True)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    with atomic_path(path, needed_bytes=len(data)) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def write_text_atomic(path: PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN / Inf float replaced by None: JSON readers other than Python's reject
    bare NaN, and a non-finite figure in a record means "no value", never a number."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def json_text(data: Any, indent: Optional[int] = 2) -> str:
    """Strict JSON (no NaN/Inf), keys sorted, one trailing newline."""
    return json.dumps(finite_json(data), indent=indent, sort_keys=True, default=_json_default,
                      allow_nan=False) + "\n"


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return finite_json(obj.item())
    except ImportError:  # pragma: no cover
        pass
    return str(obj)


def write_json_atomic(path: PathLike, data: Any) -> None:
    write_text_atomic(path, json_text(data))


def symlink_atomic(link: PathLike, target: PathLike) -> None:
    """Make ``link`` a relative symbolic link to ``target`` (which need not exist yet), replacing
    whatever is at ``link`` (a file, a directory, another link) in one rename: a reader sees the old
    entry or the new link, never neither. Used by sweeps, whose cells link the artifacts and records
    of tasks another cell runs."""
    link, target = Path(link), Path(target)
    link.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(target, link.parent)
    if link.is_symlink() and os.readlink(link) == rel:
        return
    tmp = temp_sibling(link)
    os.symlink(rel, tmp)
    try:
        publish(tmp, link)
    except BaseException:
        remove_path(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (on this host) can still write. A zombie cannot: a writer killed a
    moment ago stays one until its parent (or init) reaps it, and a sweep in that window must not
    take its temporary for one still being written."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): os.kill's answer stands
    return state not in ("Z", "X")


def sweep_stale_temporaries(root: PathLike, other_hosts_stale: bool = False) -> list[Path]:
    """Remove the temporaries under ``root`` whose writer is gone: this host's dead pids, and every
    other host's when ``other_hosts_stale`` (the caller knows no job of this run is alive)."""
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames) + list(filenames):
            m = _TMP_RE.match(name)
            if m is None:
                continue
            host = m.group("host") or _HOST
            pid = int(m.group("pid") or m.group("legacy_pid"))
            stale = (not _pid_alive(pid)) if host == _HOST else other_hosts_stale
            if pid == os.getpid() and host == _HOST:
                stale = False
            if stale:
                path = Path(dirpath) / name
                remove_path(path)
                removed.append(path)
                if name in dirnames:
                    dirnames.remove(name)
    return removed
