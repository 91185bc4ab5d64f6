"""Locks of a run directory: one submit at a time per run, one runner at a time per task.

``RunLock`` is held by ``submit`` / ``stage`` while they plan, run (local, debug) or submit (SLURM):
a second one on the same run directory fails at once with an error naming the holder (pid, host,
command, since when). ``TaskLock`` is held by the runner of one task while it runs: a second runner
of the same task (a duplicated SLURM job, a requeue racing its predecessor) waits for it and then
finds the task complete. Both are ``flock`` locks, released by the kernel when the holder dies, so
a killed process never leaves a lock behind that needs removing by hand.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from harc_hpc.errors import RunStateError

RUN_LOCK_NAME = ".harc-hpc.lock"


class RunLockedError(RunStateError):
    """Another submit holds the run directory."""


class RunLock:
    def __init__(self, run_dir: os.PathLike, command: Optional[str] = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RUN_LOCK_NAME
        self.command = command or " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid')} on host {holder.get('host')} ({holder.get('command')!r}, "
                   f"since {holder.get('since')})") if holder else "another process"
            raise RunLockedError(f"the run directory is in use by {who}", where=str(self.run_dir),
                                 hint="wait for it to finish, or stop it; a second submit would run every "
                                      "task twice") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info, sort_keys=True) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> Optional[dict]:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


class TaskLock:
    """Exclusive lock of one task (``completions/<stage>/.<key>.lock``); blocks until it is free."""

    def __init__(self, run_dir: os.PathLike, stage: str, key: str):
        self.path = Path(run_dir) / "completions" / stage / f".{key}.lock"
        self._fd: Optional[int] = None
        self.waited_s = 0.0

    def __enter__(self) -> "TaskLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        t0 = time.monotonic()
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.waited_s = time.monotonic() - t0
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
