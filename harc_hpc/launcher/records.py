"""Completion records, per-task stats and log paths in a run directory, and file fingerprints.

A completion record (``completions/<stage>/<key>.json``) is written only after a task succeeded and
its declared artifacts exist; a crashed, cancelled or timed-out task leaves none and runs again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

# Input files (calibration data) up to this size are hashed in full; larger ones by size, mtime and
# their first and last MiB, which is what a rerun can afford to read on every submit.
INPUT_FULL_HASH_BYTES = 256 << 20
# Artifacts can be hundreds of GB (activation stores): small files are hashed in full, larger ones by
# size and their first and last 64 KiB. This is a fingerprint for provenance, not a content proof.
ARTIFACT_FULL_HASH_BYTES = 128 << 10
ARTIFACT_EDGE_BYTES = 64 << 10


def completion_path(run_dir: Path, stage: str, key: str) -> Path:
    return Path(run_dir) / "completions" / stage / f"{key}.json"


def log_path(run_dir: Path, stage: str, key: str) -> Path:
    return Path(run_dir) / "logs" / stage / f"{key}.log"


def stats_path(run_dir: Path, stage: str, key: str) -> Path:
    return Path(run_dir) / "stats" / stage / f"{key}.json"


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_completion(run_dir: Path, stage: str, key: str) -> Optional[dict]:
    return read_json(completion_path(run_dir, stage, key))


def is_complete(run_dir: Path, stage: str, key: str, digest: str) -> bool:
    """Done with these exact inputs, and every artifact it wrote is still there."""
    rec = read_completion(run_dir, stage, key)
    if not rec or rec.get("digest") != digest:
        return False
    run_dir = Path(run_dir)
    return all((run_dir / rel).exists() for rel in rec.get("artifacts", {}))


def remove_completion(run_dir: Path, stage: str, key: str) -> None:
    completion_path(run_dir, stage, key).unlink(missing_ok=True)


def _sha_file(path: Path, limit: int, edge: int, with_mtime: bool) -> str:
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= limit:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
            return "sha256:" + h.hexdigest()
        h.update(fh.read(edge))
        fh.seek(max(size - edge, 0))
        h.update(fh.read(edge))
    extra = f":mtime={path.stat().st_mtime_ns}" if with_mtime else ""
    return f"edges:{h.hexdigest()}:size={size}{extra}"


def fingerprint_input_file(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        return "missing"
    if path.is_dir():
        return fingerprint_tree(path, INPUT_FULL_HASH_BYTES, 1 << 20, with_mtime=True)
    return _sha_file(path, INPUT_FULL_HASH_BYTES, 1 << 20, with_mtime=True)


def fingerprint_artifact(path: Path) -> str:
    path = Path(path)
    if path.is_dir():
        return fingerprint_tree(path, ARTIFACT_FULL_HASH_BYTES, ARTIFACT_EDGE_BYTES, with_mtime=False)
    return _sha_file(path, ARTIFACT_FULL_HASH_BYTES, ARTIFACT_EDGE_BYTES, with_mtime=False)


def fingerprint_tree(root: Path, limit: int, edge: int, with_mtime: bool) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            h.update(f"{rel}\0{_sha_file(p, limit, edge, with_mtime)}\n".encode())
    return "tree:" + h.hexdigest()
