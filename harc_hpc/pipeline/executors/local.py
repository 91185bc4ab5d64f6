"""The local executor: tasks run on this machine in dependency order, one
``python -m harc_hpc.pipeline.runner`` subprocess per task, ``executor.local_workers`` at a time
(submitit's local executor ignores dependencies); the dependents of a failed task never run.

On a machine with GPUs each running task gets one GPU of its own (``CUDA_VISIBLE_DEVICES`` set to
it for the subprocess): workers beyond the number of GPUs wait for one to be free, so no two tasks
share a GPU or size their memory budgets from the same free memory."""

from __future__ import annotations

import json
import os
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
    free_gpus = local_gpus()
    if free_gpus:
        echo(f"local executor: one GPU per task, {min(workers, len(free_gpus))} at a time "
             f"(CUDA_VISIBLE_DEVICES {','.join(free_gpus)})")
        workers = min(workers, len(free_gpus))
    held: dict[str, str] = {}  # task id -> the GPU it was given
    waiting = list(order)
    running: dict[str, tuple[subprocess.Popen, Task]] = {}
    while waiting or running:
        for tid, (proc, t) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[tid]
            if tid in held:
                free_gpus.append(held.pop(tid))
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
                env = None
                if free_gpus:
                    held[t.id] = free_gpus.pop(0)
                    env = {**os.environ, "CUDA_VISIBLE_DEVICES": held[t.id]}
                with open(out, "ab") as fh:
                    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env)
                running[t.id] = (proc, t)
                echo(f"running {t.id} (pid {proc.pid}" + (f", GPU {held[t.id]})" if t.id in held else ")"))
                progressed = True
        if not progressed:
            time.sleep(0.05)
    return outcome


def local_gpus() -> list[str]:
    """The GPUs this machine shows the executor, as CUDA_VISIBLE_DEVICES values (none on a CPU
    machine). ``HARC_LOCAL_GPUS`` overrides the count (tests, or to keep GPUs for something else)."""
    from harc_hpc.devices import cuda_device_count, worker_visible_devices

    count = os.environ.get("HARC_LOCAL_GPUS")
    count = int(count) if count is not None and count.strip() else cuda_device_count()
    return worker_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), count)
