"""The local executor: tasks run on this machine in dependency order, one
``python -m harc_hpc.pipeline.runner`` subprocess per task, ``executor.local_workers`` at a time
(submitit's local executor ignores dependencies); the dependents of a failed task never run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from harc_hpc.pipeline import records
from harc_hpc.pipeline.executors.base import Outcome, local_threads, record_local_submission
from harc_hpc.pipeline.planner import Task
from harc_hpc.pipeline.runner import task_payload


def run(plan, cfg, todo, force, echo, outcome: Outcome) -> Outcome:
    run_dir = Path(plan.run_dir)
    pending = {t.id: t for t in todo}
    order = [t for t in plan.tasks.values() if t.id in pending]
    failed: set[str] = set()
    record_local_submission(run_dir, "local", order)
    workers = max(1, int(getattr(cfg.executor, "local_workers", 1)))
    waiting = list(order)
    running: dict[str, tuple[subprocess.Popen, Task]] = {}
    while waiting or running:
        for tid, (proc, t) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[tid]
            if rc == 0:
                outcome.completed.append(tid)
                echo(f"done {tid}")
            else:
                outcome.failed.append(tid)
                failed.add(tid)
                # Killed by a signal, the runner wrote no stats: a record there is an earlier run's.
                error = records.failure_line(run_dir, t.stage, t.key) if rc > 0 else None
                echo(f"FAILED: {tid}: {error or (f'killed by signal {-rc}' if rc < 0 else f'exit {rc}, no error recorded')}\n"
                     f"    log: {records.log_path(run_dir, t.stage, t.key)}")
        progressed = False
        for t in list(waiting):
            if any(u in failed for u in plan.waits_for(t, pending)):
                waiting.remove(t)
                failed.add(t.id)
                outcome.skipped.append(t.id)
                echo(f"skipped {t.id}: an upstream task failed")
                progressed = True
                continue
            ready = all(u in outcome.completed for u in plan.waits_for(t, pending))
            if ready and len(running) < workers:
                waiting.remove(t)
                out = records.log_path(run_dir, t.stage, t.key).with_suffix(".out")
                out.parent.mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, "-m", "harc_hpc.pipeline.runner", "--run-dir", str(run_dir),
                       "--payload", json.dumps(task_payload(plan, t, local_threads(cfg, plan.specs[t.stage])))]
                if force:
                    cmd.append("--force")
                with open(out, "ab") as fh:
                    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                running[t.id] = (proc, t)
                echo(f"running {t.id} (pid {proc.pid})")
                progressed = True
        if not progressed:
            time.sleep(0.05)
    return outcome
