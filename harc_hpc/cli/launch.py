"""CLI commands of the launcher: ``submit``, ``stage``, ``status`` (registered in harc_hpc/cli/__init__.py)."""

from __future__ import annotations

import copy
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import click

from harc_hpc.config import load_config
from harc_hpc.errors import HarcHpcError, RunStateError

log = logging.getLogger("harc_hpc.pipeline")

EXECUTORS = click.Choice(["slurm", "local", "debug"])


def _echo(msg: str) -> None:
    click.echo(msg)


def _fail(msg: str, code: int = 1):
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def _load(config: str, overrides=()):
    from harc_hpc.config import parse_override

    try:
        return load_config(config, dict(parse_override(o) for o in overrides))
    except HarcHpcError as exc:
        _fail(str(exc), exc.exit_code)


def _failed_lines(plan, outcome, executor: str, since) -> list[str]:
    """``FAILED: <id>: <error line>`` and ``    log: <path>`` per failed task (errors from the stats files)."""
    from harc_hpc.pipeline import records

    slurm_logs = {f"{s.group.stage}/{k}": info.get("stderr") for s in outcome.submitted for k, info in s.tasks.items()}
    lines = []
    for tid in outcome.failed:
        task = plan.tasks.get(tid)
        stage, key = (task.stage, task.key) if task is not None else tid.split("/", 1)
        error = records.failure_line(plan.run_dir, stage, key, since=since)
        if error is None:
            error = ("no error recorded (killed: out of memory, out of time or cancelled? see the SLURM log)"
                     if executor == "slurm" else "no error recorded (see the log)")
        lines.append(f"FAILED: {tid}: {error}")
        lines.append(f"    log: {records.log_path(plan.run_dir, stage, key)}")
        if slurm_logs.get(tid):
            lines.append(f"    SLURM log: {slurm_logs[tid]}")
    return lines


def _report(plan, outcome, executor: str, waited: bool, since=None) -> int:
    """``since``: ``time.time()`` before the run; an error record of an older attempt is not shown."""
    if outcome.submitted:
        click.echo(f"run directory: {plan.run_dir}")
        click.echo(f"job ids: {' '.join(outcome.job_ids())}")
        click.echo(f"task logs: {plan.run_dir / 'logs'}/<stage>/<task>.log; "
                   f"SLURM logs: {plan.run_dir / 'slurm'}/<stage>/")
        if not waited:
            click.echo(f"follow with: harc-hpc status {plan.run_dir}")
    if outcome.failed or outcome.skipped:
        for line in _failed_lines(plan, outcome, executor, since):
            click.echo(line, err=True)
        for tid in outcome.skipped:
            click.echo(f"not run: {tid}", err=True)
        click.echo(f"details: harc-hpc status {plan.run_dir}", err=True)
        return 1
    if waited and not plan.incomplete():
        # The pipeline's own summary (stages/pipeline.yaml: headline), once every task is done.
        from harc_hpc.pipeline.planner import load_hooks

        for line in load_hooks(plan.specs_dir).call("headline", plan.run_dir) or []:
            click.echo(line)
    return 0


@click.command("submit")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--executor", type=EXECUTORS, default=None, help="default: executor.kind of the config")
@click.option("--dry-run", is_flag=True, help="print the DAG and each job's sbatch parameters; submit nothing")
@click.option("--wait", is_flag=True, help="wait for the jobs; exit non-zero if a task failed")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="default: run.output_dir/run.name of the config")
@click.option("--stages-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="stage specs (default: $HARC_HPC_STAGES or the stages/ folder of the install)")
@click.option("--force", is_flag=True, help="rerun every task, complete or not")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override a config key (YAML value), e.g. --set harc.alpha=0.5; repeatable")
def submit_cmd(config, executor, dry_run, wait, run_dir, stages_dir, force, overrides=()):
    """Build the DAG, skip completed tasks and submit (or run) the rest."""
    from harc_hpc.pipeline.api import submit_run

    cfg = _load(config, overrides)
    executor = executor or cfg.executor.kind
    started = time.time()
    try:
        plan, outcome = submit_run(cfg, executor=executor, run_dir=run_dir, specs_dir=stages_dir,
                                   dry_run=dry_run, wait=wait, force=force, echo=_echo)
    except HarcHpcError as exc:
        _fail(str(exc), exc.exit_code)
    sys.exit(_report(plan, outcome, executor, wait or executor != "slurm", since=started))


@click.command("plan")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--model-config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="a config.json standing in for the sources' (plan before the weights are on disk)")
@click.option("--tflops", type=float, default=None,
              help="throughput for the time estimates, every dtype (default per the stage's compute dtype on one H100: 300 bfloat16/float16, 50 float32/float64; 0.1 for CPU tasks)")
@click.option("--json", "as_json", is_flag=True, help="print the estimates as JSON")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None)
@click.option("--stages-dir", type=click.Path(exists=True, file_okay=False), default=None)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config key")
def plan_cmd(config, model_config, tflops, as_json, run_dir, stages_dir, overrides=()):
    """Estimate each stage's peak GPU memory, host RAM, scratch disk and time; exit 1 when a
    stage does not fit the executor section."""
    import json

    from harc_hpc.pipeline.api import plan_estimates

    cfg = _load(config, overrides)
    conf = json.loads(Path(model_config).read_text()) if model_config else None
    stand_in = None
    if conf is None:  # sources not readable yet: the base's config.json or a shipped shape (say which)
        from harc_hpc.stages.layout import planning_config

        conf, stand_in = planning_config(cfg, [Path(config).resolve().parent / "model-shapes"])
    try:
        cfg, plan, est, problems = plan_estimates(cfg, run_dir, stages_dir, conf, tflops)
    except HarcHpcError as exc:
        _fail(str(exc), exc.exit_code)
    if as_json:
        click.echo(json.dumps({"stages": est["stages"], "tokens": est.get("tokens", {}), "problems": problems,
                               "model_config": stand_in}, indent=2))
    else:
        if stand_in:
            click.echo(stand_in)
        click.echo(f"{plan.run_dir}: {len(plan.tasks)} tasks, {len(plan.layers)} layers in {len(plan.blocks)} blocks")
        click.echo(est["table"])
        for p in problems:
            click.echo(f"does not fit: {p}")
    sys.exit(1 if problems else 0)


@click.command("stage")
@click.argument("name")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--layer", type=int, default=None, help="only this layer (layer / layer_task stages)")
@click.option("--task", "task_name", default=None, help="only this calibration task (layer_task stages)")
@click.option("--block", type=int, default=None, help="only this block")
@click.option("--force", is_flag=True, help="run even if complete")
@click.option("--submit", "to_slurm", is_flag=True, help="submit to SLURM instead of running here")
@click.option("--wait", is_flag=True, help="with --submit: wait for the job")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None)
@click.option("--stages-dir", type=click.Path(exists=True, file_okay=False), default=None)
@click.option("--allow-incomplete-upstream", is_flag=True,
              help="run even though upstream tasks are not complete (warns; the result may be wrong)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override a config key (YAML value), e.g. --set harc.alpha=0.5; repeatable")
def stage_cmd(name, config, layer, task_name, block, force, to_slurm, wait, run_dir, stages_dir,
              allow_incomplete_upstream=False, overrides=()):
    """Run one stage, or one layer/task/block of it, here (or submit just that with --submit).

    Upstream tasks are not run: with an upstream task incomplete it refuses (exit 4) before
    touching the run directory, unless --allow-incomplete-upstream.
    """
    from harc_hpc.pipeline.api import plan_run, submit_run

    cfg = _load(config, overrides)
    try:
        _, plan = plan_run(cfg, run_dir, stages_dir)  # validate the selection before touching anything
        chosen = plan.select(name, layer=layer, task=task_name, block=block)
    except HarcHpcError as exc:
        _fail(str(exc), exc.exit_code)
    missing = sorted({u for t in chosen for u in t.needs if not plan.is_complete(plan.tasks[u])}
                     - {t.id for t in chosen})
    if missing:
        shown = f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
        if not allow_incomplete_upstream:
            _fail(_upstream_error(name, config, run_dir, stages_dir, plan, missing, shown).message(),
                  RunStateError.exit_code)
        click.echo(f"warning: upstream task(s) not complete: {shown}; running anyway "
                   f"(--allow-incomplete-upstream): the result is recorded as complete, rerun it with --force "
                   f"once they are done", err=True)
    ids = {t.id for t in chosen}
    started = time.time()
    try:
        plan, outcome = submit_run(
            cfg, executor="slurm" if to_slurm else "debug", run_dir=run_dir, specs_dir=stages_dir,
            force=force, wait=wait, select=lambda p: [t for t in p.tasks.values() if t.id in ids], echo=_echo,
        )
    except HarcHpcError as exc:
        _fail(str(exc), exc.exit_code)
    sys.exit(_report(plan, outcome, "slurm" if to_slurm else "debug", wait or not to_slurm, since=started))


def _upstream_error(name, config, run_dir, stages_dir, plan, missing, shown) -> RunStateError:
    """The refusal of ``stage NAME`` with upstream tasks incomplete, naming the commands that produce them."""
    opts = "".join(f" {opt} {shlex.quote(str(v))}" for opt, v in (("--run-dir", run_dir), ("--stages-dir", stages_dir))
                   if v is not None)
    cfg = shlex.quote(str(config))
    stages = list(dict.fromkeys(t.stage for t in plan.tasks.values() if t.id in set(missing)))  # DAG order
    per_stage = " or ".join(f"`harc-hpc stage {s} {cfg}{opts}`" for s in stages)
    return RunStateError(
        f"upstream task(s) not complete: {shown}",
        where=f"stage {name} in {plan.run_dir}",
        hint=f"run `harc-hpc submit {cfg}{opts}` (every incomplete task) or {per_stage} first, "
             f"or pass --allow-incomplete-upstream to run it anyway",
    )


@click.command("status")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--failed-only", is_flag=True, help="list only failed / cancelled / invalid tasks")
@click.option("--verify", is_flag=True,
              help="also decode every Zarr chunk against its checksum (reads all activations); a task "
                   "whose artifacts fail is marked invalid and reruns on the next submit")
def status_cmd(run_dir, failed_only, verify):
    """Per stage and layer/task: done / pending / running / failed / cancelled, SLURM state, job id,
    and the log of each failure. Exits 1 if anything failed or was cancelled. On a sweep directory:
    per cell, its state and each failed task (a shared task in the cell that ran it)."""
    from harc_hpc.pipeline import status
    from harc_hpc.pipeline.sweep import format_sweep_status, is_sweep_dir, sweep_status

    if is_sweep_dir(run_dir):
        cells = sweep_status(Path(run_dir))
        click.echo(format_sweep_status(cells, failed_only=failed_only))
        counts: dict = {}
        for c in cells:
            counts[c.state] = counts.get(c.state, 0) + 1
        click.echo("cells: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        sys.exit(1 if counts.get("failed") else 0)

    try:
        rows = status.collect(Path(run_dir), verify=verify)
    except FileNotFoundError as exc:
        _fail(str(exc), 2)
    shown = status.failed(rows) if failed_only else rows
    if shown:
        click.echo(status.format_table(shown))
    counts = status.summary(rows)
    click.echo("total: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    sys.exit(1 if status.failed(rows) else 0)


COMMANDS = (submit_cmd, stage_cmd, status_cmd)


# The index options a stage's tasks can be selected by, from its spec's ``split``.
INDEX_OPTIONS = {"none": (), "block": ("block",), "layer": ("layer", "block"),
                 "layer_task": ("layer", "task_name", "block")}


def stage_alias(name: str, split: Optional[str] = None) -> click.Command:
    """``harc-hpc NAME CONFIG ...``: the same as ``harc-hpc stage NAME CONFIG ...``.

    Its options are ``stage``'s own (not a copy to keep in step), less the index options that the
    stage's ``split`` (from its spec) has no use for.
    """
    keep = set(INDEX_OPTIONS.get(split, ("layer", "task_name", "block")))
    params = [copy.copy(p) for p in stage_cmd.params
              if p.name != "name" and (p.name not in ("layer", "task_name", "block") or p.name in keep)]

    def callback(**kwargs):
        for key in ("layer", "task_name", "block"):
            kwargs.setdefault(key, None)
        click.get_current_context().invoke(stage_cmd, name=name, **kwargs)

    what = {"none": "", "block": " (one --block of it, or all of it)", "layer": " (one --layer of it, or all of it)",
            "layer_task": " (one --layer/--task of it, or all of it)"}.get(split, " (one --layer/--task/--block of it)")
    return click.Command(name, params=params, callback=callback,
                         help=f"Run {name} here{what}, or submit just that with --submit. "
                              f"Same as `harc-hpc stage {name}`.")
