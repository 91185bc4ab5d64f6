"""Job states from SLURM accounting (sacct), the same source submitit reads.

``sacct`` answers for finished jobs too (squeue forgets them after MinJobAge), and it is the only
place a dependent job cancelled by ``kill_invalid_depend`` shows up as CANCELLED.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Iterable

ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "COMPLETING", "CONFIGURING",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                 "PREEMPTED", "REVOKED"}

_RANGE = re.compile(r"^(\d+)_\[(.+)\]$")


def available() -> bool:
    return shutil.which("sacct") is not None


def _expand(spec: str) -> list[int]:
    spec = spec.split("%", 1)[0]
    out: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def states(job_ids: Iterable[str], timeout_s: float = 30) -> dict[str, str]:
    """``{"123_4": "RUNNING", "124": "COMPLETED", ...}`` for array tasks and plain jobs.

    Array tasks still pending appear as ``123_[0-7]`` in sacct; they are expanded. The first word of
    the state is kept (``CANCELLED by 0`` -> ``CANCELLED``). Unknown ids are absent.
    """
    job_ids = [str(j) for j in job_ids if j]
    ids = sorted({j.split("_", 1)[0] for j in job_ids})
    if not ids or not available():
        return {}
    try:
        out = subprocess.run(
            ["sacct", "-X", "-n", "--parsable2", "-o", "JobID,State", "-j", ",".join(ids)],
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    result: dict[str, str] = {}
    for line in out.stdout.splitlines():
        if "|" not in line:
            continue
        jid, state = line.split("|", 1)
        state = state.split(" ", 1)[0].strip()
        m = _RANGE.match(jid)
        if m:
            for i in _expand(m.group(2)):
                result.setdefault(f"{m.group(1)}_{i}", state)
        else:
            # A requeued job is listed once per attempt; the last line is the current one.
            result[jid] = state
    # An array cancelled before any of its tasks started (an afterok dependency that failed) can be
    # listed under the bare array id ("371", not "371_0"): its tasks asked for take that state.
    for j in job_ids:
        base = j.split("_", 1)[0]
        if "_" in j and j not in result and base in result:
            result[j] = result[base]
    return result


def queued(job_ids: Iterable[str], timeout_s: float = 30) -> set[str]:
    """Jobs the controller still holds (pending, running, requeue-held), from squeue.

    Accounting lags the controller and, around a requeue, can briefly show only the finished first
    attempt; squeue is the authority on what is still alive.
    """
    ids = sorted({str(j).split("_", 1)[0] for j in job_ids if j})
    if not ids or shutil.which("squeue") is None:
        return set()
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%F", "-j", ",".join(ids)],
                             capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}
