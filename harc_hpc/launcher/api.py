"""The launcher's entry points, shared by the CLI and tests: plan a run, submit it, wait, query it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from harc_hpc.config import PipelineConfig
from harc_hpc.launcher import status as status_mod
from harc_hpc.launcher.planner import Plan, build_plan
from harc_hpc.launcher.submit import (
    Outcome, apply_prepare_hook, execute, save_run_config, wait_for_jobs,
)

log = logging.getLogger("harc_hpc.launcher")


class ActiveJobsError(RuntimeError):
    """The run still has queued or running jobs; submitting again would duplicate them."""


def with_run_dir(cfg: PipelineConfig, run_dir: Optional[os.PathLike]) -> PipelineConfig:
    if run_dir is None:
        return cfg
    run_dir = Path(run_dir).resolve()
    cfg = cfg.model_copy(deep=True)
    cfg.run.output_dir = run_dir.parent
    cfg.run.name = run_dir.name
    return cfg


def plan_run(
    cfg: PipelineConfig,
    run_dir: Optional[os.PathLike] = None,
    specs_dir: Optional[os.PathLike] = None,
    layers: Optional[Sequence[int]] = None,
) -> tuple[PipelineConfig, Plan]:
    cfg = with_run_dir(apply_prepare_hook(cfg), run_dir)
    return cfg, build_plan(cfg, run_dir=cfg.run_dir, specs_dir=specs_dir, layers=layers)


def submit_run(
    cfg: PipelineConfig,
    executor: Optional[str] = None,
    run_dir: Optional[os.PathLike] = None,
    specs_dir: Optional[os.PathLike] = None,
    layers: Optional[Sequence[int]] = None,
    dry_run: bool = False,
    wait: bool = False,
    force: bool = False,
    select: Optional[Callable[[Plan], Iterable]] = None,
    allow_active: bool = False,
    wait_timeout_s: Optional[float] = None,
    poll_s: float = 1.0,
    echo: Callable[[str], None] = print,
) -> tuple[Plan, Outcome]:
    """Prepare (demo hook), plan, save the config and run or submit what is incomplete.

    ``select(plan)`` restricts the tasks (``harc-hpc stage``); ``wait`` blocks until SLURM is done
    and fills ``outcome.failed`` from the run's status.
    """
    explicit = set(cfg.executor.model_fields_set)
    cfg, plan = plan_run(cfg, run_dir, specs_dir, layers)
    executor = executor or cfg.executor.kind
    if not dry_run:
        if executor == "slurm" and not allow_active:
            active = status_mod.active_jobs(plan.run_dir)
            if active:
                raise ActiveJobsError(
                    f"{plan.run_dir} has {len(active)} queued/running job(s) ({', '.join(active[:8])}"
                    f"{' ...' if len(active) > 8 else ''}); wait for them or scancel them first"
                )
        plan.config_path = save_run_config(cfg, plan.run_dir)
    tasks = list(select(plan)) if select is not None else None
    outcome = execute(plan, cfg, executor, tasks=tasks, force=force, dry_run=dry_run,
                      explicit_executor_keys=explicit, echo=echo)
    if wait and executor == "slurm" and outcome.submitted and not dry_run:
        wait_for_jobs(outcome.job_ids(), poll_s=poll_s, timeout_s=wait_timeout_s, echo=echo)
        wanted = {t.id for g in outcome.submitted for t in g.group.tasks}
        rows = [r for r in status_mod.collect(plan.run_dir) if r.id in wanted]
        outcome.completed = [r.id for r in rows if r.state == "done"]
        outcome.failed = [r.id for r in rows if r.state == "failed"]
        outcome.skipped = [r.id for r in rows if r.state not in ("done", "failed")]
    return plan, outcome


def run_status(run_dir: os.PathLike) -> list[status_mod.TaskStatus]:
    return status_mod.collect(Path(run_dir))
