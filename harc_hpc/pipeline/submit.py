"""Executing a plan: choose the incomplete tasks, then hand them to an executor
(harc_hpc.pipeline.executors: slurm, local, debug); the run's config snapshot; ``submit_plan``, the
one submit path of a run directory, which a run (api.submit_run) and each cell of a sweep
(sweep.submit_sweep) take."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from harc_hpc.config import PipelineConfig
from harc_hpc.errors import RunStateError
from harc_hpc.io.atomic import sweep_stale_temporaries
from harc_hpc.pipeline.executors import EXECUTORS
from harc_hpc.pipeline.executors.base import Outcome
from harc_hpc.pipeline.executors.slurm import print_dry_run, wait_for_jobs
from harc_hpc.pipeline.lock import RunLock
from harc_hpc.pipeline import records
from harc_hpc.pipeline import status as status_mod
from harc_hpc.pipeline.planner import Plan, Task


class ActiveJobsError(RunStateError):
    """The run still has queued or running jobs; submitting again would duplicate them."""


def refuse_active_jobs(run_dirs: Mapping[str, Path], where: Optional[str] = None) -> dict[str, list[str]]:
    """The queued/running SLURM jobs of each named run directory; an ActiveJobsError naming them
    when there are any (submitting again would run or queue every task twice)."""
    busy = {name: jobs for name, jobs in ((n, status_mod.active_jobs(d)) for n, d in run_dirs.items()) if jobs}
    if busy:
        what = "; ".join(f"{name} has {len(jobs)} queued/running job(s) ({', '.join(jobs[:8])}"
                         f"{' ...' if len(jobs) > 8 else ''})" for name, jobs in sorted(busy.items()))
        raise ActiveJobsError(f"{what}; wait for them or scancel them first", where=where)
    return busy


def remove_stale_temporaries(run_dir: Path, other_hosts_stale: bool, echo: Callable[[str], None]) -> None:
    """Remove what killed tasks left half-written (their temporaries: up to hundreds of GB); another
    host's are stale only when ``other_hosts_stale`` (no job of the run is alive)."""
    removed = sweep_stale_temporaries(run_dir, other_hosts_stale=other_hosts_stale)
    if removed:
        shown = ", ".join(str(p.relative_to(run_dir)) for p in removed[:5])
        echo(f"removed {len(removed)} temporary file(s) left by killed tasks: {shown}"
             f"{' ...' if len(removed) > 5 else ''}")


def submit_plan(plan: Plan, cfg: PipelineConfig, executor: str, *,
                choose: Optional[Callable[[Plan], Iterable[Task]]] = None, force: bool = False,
                allow_active: bool = False, explicit_executor_keys: Optional[Iterable[str]] = None,
                echo: Callable[[str], None] = print) -> Outcome:
    """The one submit path of a run directory. Under its lock (one submit at a time: a second would
    run or queue every task again): refuse while its SLURM jobs are queued or running (unless
    ``allow_active``), remove what killed tasks left half-written, save the config snapshot, then
    run or submit the incomplete tasks of those ``choose(plan)`` returns (default: all); ``choose``
    runs after the snapshot is saved."""
    with RunLock(plan.run_dir):
        active = status_mod.active_jobs(plan.run_dir)
        if executor == "slurm" and not allow_active and active:
            refuse_active_jobs({str(plan.run_dir): plan.run_dir})
        remove_stale_temporaries(plan.run_dir, other_hosts_stale=not active, echo=echo)
        plan.config_path = save_run_config(cfg, plan.run_dir)
        tasks = list(choose(plan)) if choose is not None else None
        return execute(plan, cfg, executor, tasks=tasks, force=force, dry_run=False,
                       explicit_executor_keys=explicit_executor_keys, echo=echo)


def wait_if_asked(wait: bool, executor: str, job_ids: list, poll_s: float, timeout_s: Optional[float],
                  echo: Callable[[str], None]) -> bool:
    """Block until the submitted SLURM jobs are done when ``wait`` asks it; whether it waited."""
    if not (wait and executor == "slurm" and job_ids):
        return False
    wait_for_jobs(job_ids, poll_s=poll_s, timeout_s=timeout_s, echo=echo)
    return True


def pending_tasks(plan: Plan, tasks: Optional[Iterable[Task]] = None, force: bool = False,
                  echo: Optional[Callable[[str], None]] = None) -> tuple[list[Task], list[Task]]:
    """(to run, complete). A task whose record exists but whose artifacts no longer match it runs
    again, and ``echo`` says why."""
    chosen = list(plan.tasks.values()) if tasks is None else list(tasks)
    if force:
        return chosen, []
    todo, done = [], []
    for t in chosen:
        why = plan.why_incomplete(t)
        if why is None:
            done.append(t)
            continue
        if why.startswith("artifact") and echo is not None:
            echo(f"rerunning {t.id}: {why}")
        todo.append(t)
    # A complete task whose deleted intermediate artifact a task to run reads runs again first;
    # consumers come after their producers in plan order, so one backward pass finds them all.
    todo_ids = {t.id for t in todo}
    for t in reversed(list(plan.tasks.values())):
        if t.id in todo_ids:
            continue
        why = plan.restore_reason(t, todo_ids)
        if why:
            todo_ids.add(t.id)
            if echo is not None:
                echo(f"rerunning {t.id}: {why}")
    todo = [t for t in plan.tasks.values() if t.id in todo_ids]
    done = [t for t in done if t.id not in todo_ids]
    return todo, done


def execute(
    plan: Plan,
    cfg: PipelineConfig,
    executor: str = "slurm",
    tasks: Optional[Iterable[Task]] = None,
    force: bool = False,
    dry_run: bool = False,
    explicit_executor_keys: Optional[Iterable[str]] = None,
    echo: Callable[[str], None] = print,
) -> Outcome:
    """Run or submit the incomplete tasks of a plan (default: all of them)."""
    todo, done = pending_tasks(plan, tasks, force, echo=echo)
    outcome = Outcome(executor, already_complete=[t.id for t in done])
    if done:
        echo(f"{len(done)} task(s) already complete, skipped")
    if not todo:
        echo("nothing to do: every task is complete")
        return outcome
    if dry_run:
        print_dry_run(plan, cfg, todo, explicit_executor_keys, echo)
        return outcome
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r} ({', '.join(EXECUTORS)})")
    plan.save()
    # A task chosen only to recompute a deleted intermediate (or to read one) still has a valid
    # record; drop it, so that no task deletes the recomputed artifact again before its reader ran.
    for t in todo:
        if plan.is_complete(t):
            records.remove_completion(plan.run_dir, t.stage, t.key)
    if executor == "slurm":
        return EXECUTORS[executor](plan, cfg, todo, force, explicit_executor_keys, echo, outcome)
    return EXECUTORS[executor](plan, cfg, todo, force, echo, outcome)


def apply_prepare_hook(cfg: PipelineConfig, specs_dir=None) -> PipelineConfig:
    """Check the config's settings that no schema can (the ``check_config`` hook: an unknown merge
    method or preset is refused here, before any job or demo build), then fill in what it leaves to
    be built (the ``prepare`` hook: ``demo:`` sources are trained, or reused, here)."""
    from harc_hpc.pipeline.planner import load_hooks

    hooks = load_hooks(specs_dir)
    hooks.call("check_config", cfg)
    out = hooks.call("prepare", cfg)
    return cfg if out is None else out


def save_run_config(cfg: PipelineConfig, run_dir: Path) -> Path:
    """Write ``run_dir/config.yaml`` and an immutable snapshot ``run_dir/configs/<digest>.yaml``.

    Jobs load the snapshot named in their payload, so a later submit with another config cannot
    change what an already queued job computes under its recorded digest. Hub sources are pinned
    first, in ``cfg`` too: ``owner/name[@rev]`` becomes ``owner/name@<commit>`` (the run's
    ``sources.json`` keeps the commit of its first submit) and the snapshot is in the hub cache
    (harc_hpc.io.sources.pin_sources).
    """
    import hashlib

    from harc_hpc.io.atomic import write_text_atomic
    from harc_hpc.io.sources import pin_sources
    from harc_hpc.config import dump_config

    run_dir = Path(run_dir)
    pin_sources(cfg, run_dir)
    text = dump_config(cfg)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    snapshot = run_dir / "configs" / f"{digest}.yaml"
    for path in (snapshot, run_dir / "config.yaml"):
        write_text_atomic(path, text)
    return snapshot
