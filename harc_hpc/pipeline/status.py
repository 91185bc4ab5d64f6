"""The state of every task of a run: completion records + the latest submission + sacct.

A task is ``done`` when its completion record matches the digest of the last plan; otherwise the
SLURM state of its latest array task decides (pending, running, failed, cancelled); a task that
failed under the local executor is known from its stats file; anything else is ``pending``.
A record whose artifacts no longer match it is not ``done``; with ``verify`` every Zarr chunk is
decoded as well, and a task that fails verification is ``invalid`` (its record is removed, so the
next submit reruns it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harc_hpc.errors import format_bytes
from harc_hpc.pipeline import records, sacct
from harc_hpc.pipeline.executors.base import read_submissions


@dataclass
class TaskStatus:
    id: str
    stage: str
    key: str
    state: str  # done | pending | running | failed | cancelled | invalid
    slurm_state: str = ""
    job_id: str = ""
    log: str = ""  # the task's own log, for failures
    slurm_log: str = ""  # submitit's stderr of the array task, for failures
    error: str = ""
    disk_bytes: int = 0  # what its recorded artifacts occupy now
    retired_bytes: int = 0  # intermediate artifacts deleted after use (run.retention)


def collect(run_dir: Path, verify: bool = False) -> list[TaskStatus]:
    run_dir = Path(run_dir)
    plan = records.read_json(run_dir / "plan.json")
    if plan is None:
        raise FileNotFoundError(f"{run_dir}: no plan.json (nothing was submitted to this run directory)")
    latest: dict[str, dict] = {}
    for sub in read_submissions(run_dir):
        if sub.get("executor") != "slurm":
            for tid in sub.get("tasks", {}):
                latest.pop(tid, None)  # a later local run supersedes earlier SLURM jobs
            continue
        for key, info in sub.get("tasks", {}).items():
            latest[f"{sub['stage']}/{key}"] = info
    states = sacct.states([info["job_id"] for info in latest.values()])
    out: list[TaskStatus] = []
    for t in plan["tasks"]:
        st = TaskStatus(t["id"], t["stage"], t["key"], "pending")
        info = latest.get(t["id"])
        if info:
            st.job_id = info["job_id"]
            st.slurm_state = states.get(info["job_id"], "")
        why = records.why_incomplete(run_dir, t["stage"], t["key"], t["digest"], deep=verify)
        if why is None:
            st.state = "done"
            rec = records.read_completion(run_dir, t["stage"], t["key"]) or {}
            st.disk_bytes, st.retired_bytes = records.disk_bytes(rec), records.retired_bytes(rec)
            out.append(st)
            continue
        if why.startswith("artifact"):
            st.state, st.error = "invalid", why
            records.remove_completion(run_dir, t["stage"], t["key"])
            out.append(st)
            continue
        stats = records.read_json(records.stats_path(run_dir, t["stage"], t["key"])) or {}
        ss = st.slurm_state
        if ss == "PENDING" or ss == "REQUEUED":
            st.state = "pending"
        elif ss in sacct.ACTIVE_STATES:
            st.state = "running"
        elif ss == "CANCELLED":
            st.state = "cancelled"  # scancel, or an upstream task failed (kill_invalid_depend)
        elif ss in sacct.FAILED_STATES or ss == "COMPLETED" or stats.get("status") == "failed":
            # COMPLETED without a matching record: the job ran for an older plan, or lost its record.
            st.state = "failed"
        if st.state in ("failed", "cancelled"):
            st.error = stats.get("error", "") if stats.get("status") == "failed" else ""
            lp = records.log_path(run_dir, t["stage"], t["key"])
            st.log = str(lp) if lp.exists() else ""
            if info and info.get("stderr") and Path(info["stderr"]).exists():
                st.slurm_log = info["stderr"]
        out.append(st)
    # Name the root cause of a cancellation: the first upstream task that failed or was cancelled.
    by_id = {r.id: r for r in out}
    needs = {t["id"]: t["needs"] for t in plan["tasks"]}
    for r in out:  # plan order: upstream reasons are already filled in
        if r.state != "cancelled":
            continue
        bad = next((u for u in needs.get(r.id, []) if by_id[u].state in ("failed", "cancelled")), None)
        if bad is not None:
            # Held by afterok, it never started: a log left by an earlier run of it would mislead.
            r.log = ""
            root = by_id[bad]
            r.error = root.error if root.error.startswith("upstream") else f"upstream {bad} {root.state}"
        elif not r.log and not r.error:
            r.error = "cancelled before it started (scancel?)"
    return out


def format_table(rows: list[TaskStatus]) -> str:
    lines = []
    by_stage: dict[str, list[TaskStatus]] = {}
    for r in rows:
        by_stage.setdefault(r.stage, []).append(r)
    for stage, rs in by_stage.items():
        counts: dict[str, int] = {}
        for r in rs:
            counts[r.state] = counts.get(r.state, 0) + 1
        head = f"{stage}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        disk, retired = sum(r.disk_bytes for r in rs), sum(r.retired_bytes for r in rs)
        if disk or retired:
            head += f"; on disk {format_bytes(disk)}"
            if retired:
                head += f", {format_bytes(retired)} deleted after use"
        lines.append(head)
        for r in rs:
            line = f"  {r.key:<28} {r.state:<9} {r.slurm_state or '-':<11} {r.job_id or '-':<12}"
            if r.state in ("failed", "cancelled", "invalid"):
                where = r.log or r.slurm_log
                line = f"{line} {where}" if where else line.rstrip()
                if r.error:
                    line += f"\n      {r.error}"
            lines.append(line.rstrip())
    return "\n".join(lines)


def summary(rows: list[TaskStatus]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    return counts


def failed(rows: list[TaskStatus]) -> list[TaskStatus]:
    return [r for r in rows if r.state in ("failed", "cancelled", "invalid")]


def active_jobs(run_dir: Path) -> list[str]:
    """Array tasks of this run that SLURM still has pending or running."""
    ids = [info["job_id"] for sub in read_submissions(run_dir) if sub.get("executor") == "slurm"
           for info in sub.get("tasks", {}).values()]
    st = sacct.states(ids)
    return sorted(j for j, s in st.items() if s in sacct.ACTIVE_STATES and j in set(ids))


def first_failure(rows: list[TaskStatus]) -> Optional[TaskStatus]:
    return next((r for r in rows if r.state == "failed"), None)
