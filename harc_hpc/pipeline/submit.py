"""Executing a plan: choose the incomplete tasks, then hand them to an executor
(harc_hpc.pipeline.executors: slurm, local, debug); the run's config snapshot."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional

from harc_hpc.config import PipelineConfig
from harc_hpc.pipeline.executors import EXECUTORS
from harc_hpc.pipeline.executors.base import Outcome
from harc_hpc.pipeline.executors.slurm import print_dry_run
from harc_hpc.pipeline import records
from harc_hpc.pipeline.planner import Plan, Task


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
