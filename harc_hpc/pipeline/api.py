"""The launcher's entry points, shared by the CLI and tests: plan a run, submit it, wait, query it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from harc_hpc.errors import InputDataError, UsageError, format_bytes
from harc_hpc.config import PipelineConfig
from harc_hpc.pipeline import status as status_mod
from harc_hpc.pipeline.planner import Plan, build_plan, load_hooks
from harc_hpc.pipeline.executors.base import Outcome
from harc_hpc.pipeline.submit import ActiveJobsError, apply_prepare_hook, execute, submit_plan, wait_if_asked

__all__ = ["ActiveJobsError", "plan_run", "submit_run", "run_status"]

log = logging.getLogger("harc_hpc.pipeline")


def with_run_dir(cfg: PipelineConfig, run_dir: Optional[os.PathLike]) -> PipelineConfig:
    if run_dir is None:
        return cfg
    from harc_hpc.config import ConfigError, control_char_problem

    # The run directory goes into the generated sbatch script: a newline would run the rest as shell.
    problem = control_char_problem(str(run_dir))
    run_dir = Path(run_dir).resolve()
    problem = problem or control_char_problem(str(run_dir))  # (a symlink may resolve to such a name)
    if problem:
        raise ConfigError(problem, where="--run-dir")
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
    cfg = with_run_dir(apply_prepare_hook(cfg, specs_dir), run_dir)
    return cfg, build_plan(cfg, run_dir=cfg.run_dir, specs_dir=specs_dir, layers=layers)


class PlanDoesNotFitError(UsageError):
    """A stage's estimated peak exceeds what the executor section gives its tasks."""


def stage_resources(cfg: PipelineConfig, plan: Plan) -> dict:
    """What one task of each stage is given: the SLURM executor's own resolution of its resources."""
    from harc_hpc.pipeline.executors.base import resolve_resources

    out = {}
    for name, spec in plan.specs.items():
        r = resolve_resources(cfg, spec)
        out[name] = {"mem_bytes": float(r["mem_gb"]) * 2**30, "gpus": int(r["gpus"] or 0),
                     "gpu_bytes": cfg.executor.gpu_memory_gb * 2**30, "ranks": int(r["ranks"])}
    return out


def check_fits(estimates: dict, resources: dict) -> list[str]:
    """One line per stage and resource that does not fit what the executor section gives it."""
    problems = []
    for e in estimates.get("stages", []):
        g = resources[e["stage"]]
        if e["host_bytes"] > g["mem_bytes"]:
            problems.append(f"{e['stage']}: needs ~{format_bytes(e['host_bytes'])} of host RAM per task, executor "
                            f"gives {format_bytes(g['mem_bytes'])} (executor.stages.{e['stage']}.mem_gb)")
        if e["gpu_bytes"] and g["gpus"] and e["gpu_bytes"] > g["gpu_bytes"]:
            problems.append(f"{e['stage']}: needs ~{format_bytes(e['gpu_bytes'])} on one GPU, a GPU has "
                            f"{format_bytes(g['gpu_bytes'])} (executor.gpu_memory_gb)")
    return problems


def plan_estimates(cfg: PipelineConfig, run_dir: Optional[os.PathLike] = None,
                   specs_dir: Optional[os.PathLike] = None, model_config: Optional[dict] = None,
                   throughput_tflops: Optional[float] = None):
    """(cfg, plan, estimates, problems): what ``harc-hpc plan`` prints and submit checks, from the
    pipeline's ``estimate`` hook. ``model_config`` stands in for the sources' config.json (planning
    before the weights exist)."""
    hooks = load_hooks(specs_dir)
    layers = None if model_config is None else hooks.call("layers", cfg, model_config)
    cfg, plan = plan_run(cfg, run_dir, specs_dir, layers)
    resources = stage_resources(cfg, plan)
    est = hooks.call("estimate", cfg, plan, resources, model_config, throughput_tflops)
    if est is None:
        return cfg, plan, {"stages": [], "table": "(the pipeline has no estimate hook)"}, []
    return cfg, plan, est, check_fits(est, resources)


def check_slurm_fits(cfg: PipelineConfig, plan: Plan, specs_dir: Optional[os.PathLike] = None,
                     echo: Callable[[str], None] = print) -> Optional[dict]:
    """Refuse before spending anything when a task cannot fit what its SLURM job is given; the
    estimates (None when there is nothing to estimate from)."""
    # Without a readable config.json (sources a stage of this run produces, or not there yet) there
    # is nothing to estimate from: say so and go on; the task that reads them fails with this error.
    try:
        est = load_hooks(specs_dir).call("estimate", cfg, plan, stage_resources(cfg, plan), None, None)
    except InputDataError as exc:
        echo(f"warning: resources not checked against the plan (harc-hpc plan --model-config): {exc}")
        est = None
    problems = check_fits(est or {}, stage_resources(cfg, plan))
    if problems:
        raise PlanDoesNotFitError("the plan does not fit the executor's resources (see harc-hpc plan):\n  "
                                  + "\n  ".join(problems))
    return est


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
    if executor == "slurm":
        est = check_slurm_fits(cfg, plan, specs_dir, echo)
    if dry_run:
        if executor == "slurm" and est:
            echo("estimated per task (harc-hpc plan):\n" + est["table"])
        tasks = list(select(plan)) if select is not None else None
        return plan, execute(plan, cfg, executor, tasks=tasks, force=force, dry_run=True,
                             explicit_executor_keys=explicit, echo=echo)
    outcome = submit_plan(plan, cfg, executor, choose=select, force=force, allow_active=allow_active,
                          explicit_executor_keys=explicit, echo=echo)
    if wait_if_asked(wait, executor, outcome.job_ids() if outcome.submitted else [], poll_s, wait_timeout_s, echo):
        wanted = {t.id for g in outcome.submitted for t in g.group.tasks}
        rows = [r for r in status_mod.collect(plan.run_dir) if r.id in wanted]
        outcome.completed = [r.id for r in rows if r.state == "done"]
        outcome.failed = [r.id for r in rows if r.state == "failed"]
        outcome.skipped = [r.id for r in rows if r.state not in ("done", "failed")]
    return plan, outcome


def run_status(run_dir: os.PathLike) -> list[status_mod.TaskStatus]:
    return status_mod.collect(Path(run_dir))
