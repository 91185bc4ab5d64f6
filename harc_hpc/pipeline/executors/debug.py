"""The debug executor: every task in this process, in dependency order (tracebacks, pdb); the
dependents of a failed task are not run."""

from __future__ import annotations

from pathlib import Path

from harc_hpc.pipeline import records
from harc_hpc.pipeline.executors.base import Outcome, local_threads, record_local_submission
from harc_hpc.pipeline.runner import run_task, task_payload


def run(plan, cfg, todo, force, echo, outcome: Outcome) -> Outcome:
    run_dir = Path(plan.run_dir)
    pending = {t.id for t in todo}
    order = [t for t in plan.tasks.values() if t.id in pending]
    failed: set[str] = set()
    record_local_submission(run_dir, "debug", order)
    for t in order:
        if any(u in failed for u in t.needs):
            outcome.skipped.append(t.id)
            failed.add(t.id)
            continue
        echo(f"running {t.id}")
        try:
            run_task(run_dir, task_payload(plan, t, local_threads(cfg, plan.specs[t.stage])), force=force, cfg=cfg)
        except Exception as exc:  # noqa: BLE001 - reported like a failed job; the traceback is in the log
            outcome.failed.append(t.id)
            failed.add(t.id)
            # The exception itself, on one line: a stats file could predate it (a failure before the stage ran).
            echo(f"FAILED: {t.id}: {' '.join(f'{type(exc).__name__}: {exc}'.split())}\n"
                 f"    log: {records.log_path(run_dir, t.stage, t.key)}")
            continue
        outcome.completed.append(t.id)
    return outcome
