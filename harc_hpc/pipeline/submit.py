"""Executing a plan: SLURM array jobs through submitit, or the same runner locally / in-process.

SLURM: one array job per (stage, block) group over its incomplete tasks, ``afterok`` on the groups
it needs that were submitted in the same call (a completed upstream needs no dependency). Every
submission is appended to ``run_dir/submissions.jsonl`` (job ids, log paths) for ``status``.

Local: submitit's local executor ignores dependencies, so tasks run here in dependency order, one
``python -m harc_hpc.pipeline.runner`` subprocess per task, ``executor.local_workers`` at a time;
the dependents of a failed task never run. Debug: the same, sequentially, in this process.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from harc_hpc.config import PipelineConfig
from harc_hpc.pipeline import records, sacct
from harc_hpc.pipeline.planner import Group, Plan, StageSpec, Task
from harc_hpc.pipeline.runner import StageRunner, run_task, task_payload

log = logging.getLogger("harc_hpc.pipeline")

RESOURCE_KEYS = ("cpus", "mem_gb", "gpus", "time_min")


def resolve_resources(cfg: PipelineConfig, spec: StageSpec, explicit: Optional[Iterable[str]] = None) -> dict:
    """A stage's resources, most specific first.

    ``executor.stages[<stage>]`` > ``executor.<key>`` when the config sets it explicitly > the stage
    spec's ``resources`` > ``executor.<key>``'s default. ``explicit`` names the executor keys the user
    set (default: pydantic's fields_set of ``cfg.executor``).
    """
    ex = cfg.executor
    explicit = set(ex.model_fields_set if explicit is None else explicit)
    per_stage = ex.stages.get(spec.name)
    out: dict[str, Any] = {}
    for key in RESOURCE_KEYS:
        value = getattr(per_stage, key, None) if per_stage is not None else None
        if value is None and key in explicit:
            value = getattr(ex, key)
        if value is None:
            value = getattr(spec.resources, key)
        if value is None:
            value = getattr(ex, key)
        out[key] = value
    for key in ("partition", "account", "qos", "array_parallelism"):
        value = getattr(per_stage, key, None) if per_stage is not None else None
        out[key] = value if value is not None else getattr(ex, key)
    out["extra_sbatch"] = {**ex.extra_sbatch, **(per_stage.extra_sbatch if per_stage is not None else {})}
    out["setup"] = list(ex.setup)
    return out


def submitit_parameters(resources: dict, name: str, n_tasks: int, dependency: Optional[str],
                        signal_delay_s: Optional[int] = None) -> dict:
    """The keyword arguments for ``AutoExecutor.update_parameters``."""
    params: dict[str, Any] = {
        "name": name,
        "timeout_min": int(resources["time_min"]),
        "cpus_per_task": int(resources["cpus"]),
        "mem_gb": resources["mem_gb"],
        "slurm_array_parallelism": min(int(resources["array_parallelism"]), max(n_tasks, 1)),
    }
    if resources["gpus"]:
        params["gpus_per_node"] = int(resources["gpus"])
    for key in ("partition", "account", "qos"):
        if resources[key]:
            params[f"slurm_{key}"] = resources[key]
    if resources["setup"]:
        params["slurm_setup"] = list(resources["setup"])
    if resources["extra_sbatch"]:
        params["slurm_additional_parameters"] = dict(resources["extra_sbatch"])
    if dependency:
        params["slurm_dependency"] = dependency
    if signal_delay_s is not None:
        # USR2 comes this long before the limit; submitit then requeues the Checkpointable runner.
        params["slurm_signal_delay_s"] = min(int(signal_delay_s), max(int(resources["time_min"]) * 60 // 2, 1))
    return params


def sbatch_preview(params: dict) -> dict:
    """The sbatch options the submitit parameters become (for --dry-run)."""
    mem = params["mem_gb"]
    out = {
        "--job-name": params["name"],
        "--time": params["timeout_min"],
        "--cpus-per-task": params["cpus_per_task"],
        "--mem": f"{int(mem)}GB" if float(mem).is_integer() else f"{int(mem * 1024)}MB",
    }
    if "gpus_per_node" in params:
        out["--gpus-per-node"] = params["gpus_per_node"]
    for key in ("partition", "account", "qos", "dependency"):
        if f"slurm_{key}" in params:
            out[f"--{key}"] = params[f"slurm_{key}"]
    for k, v in params.get("slurm_additional_parameters", {}).items():
        out[f"--{k.replace('_', '-')}"] = v
    return out


@dataclass
class SubmittedGroup:
    group: Group
    job_id: str
    tasks: dict[str, dict]  # key -> {"job_id", "stdout", "stderr", "log"}
    depends_on: list[str] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)


@dataclass
class Outcome:
    """What an execution did. ``failed``/``skipped`` only for local/debug (SLURM jobs run later)."""

    executor: str
    submitted: list[SubmittedGroup] = field(default_factory=list)
    already_complete: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.skipped

    def job_ids(self) -> list[str]:
        return [s.job_id for s in self.submitted]


def _append_submission(run_dir: Path, entry: dict) -> None:
    path = Path(run_dir) / "submissions.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(entry, sort_keys=True, default=str) + "\n")


def read_submissions(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "submissions.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


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
        _print_dry_run(plan, cfg, todo, explicit_executor_keys, echo)
        return outcome
    plan.save()
    if executor == "slurm":
        return _submit_slurm(plan, cfg, todo, force, explicit_executor_keys, echo, outcome)
    if executor in ("local", "debug"):
        return _run_here(plan, cfg, todo, force, executor, echo, outcome)
    raise ValueError(f"unknown executor {executor!r} (slurm, local, debug)")


def _dependency(groups: list[SubmittedGroup]) -> Optional[str]:
    return "afterok:" + ":".join(g.job_id for g in groups) if groups else None


def _print_dry_run(plan, cfg, todo, explicit, echo) -> None:
    groups = plan.groups(todo)
    echo(f"DAG: {len(todo)} task(s) to run in {len(groups)} array job(s) (layers {plan.layers}, "
         f"blocks {plan.blocks})")
    for g in groups:
        needs = plan.group_needs(g, groups)
        res = resolve_resources(cfg, plan.specs[g.stage], explicit)
        params = submitit_parameters(res, f"harc-{g.name.replace('/', '.')}", len(g.tasks),
                                     "afterok:" + ":".join(f"<{n.name}>" for n in needs) if needs else None)
        echo(f"[{g.name}] {len(g.tasks)} task(s): {', '.join(t.key for t in g.tasks)}")
        echo(f"    after: {', '.join(n.name for n in needs) or '-'}")
        echo("    sbatch: " + " ".join(f"{k}={v}" for k, v in sbatch_preview(params).items())
             + (f" --array=0-{len(g.tasks) - 1}%{params['slurm_array_parallelism']}" if len(g.tasks) > 1 else ""))
        if res["setup"]:
            echo(f"    setup: {'; '.join(res['setup'])}")


def _submit_slurm(plan, cfg, todo, force, explicit, echo, outcome) -> Outcome:
    import submitit

    run_dir = Path(plan.run_dir)
    submitted: list[SubmittedGroup] = []
    for g in plan.groups(todo):
        needs_groups = plan.group_needs(g, [s.group for s in submitted])
        needs = [s for s in submitted if any(s.group is n for n in needs_groups)]
        dependency = _dependency(needs)
        res = resolve_resources(cfg, plan.specs[g.stage], explicit)
        params = submitit_parameters(res, f"harc-{g.name.replace('/', '.')}", len(g.tasks), dependency,
                                     cfg.executor.signal_delay_s)
        folder = run_dir / "slurm" / g.stage
        # cluster= always explicit: with srun on PATH submitit would pick SLURM even for a local run.
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=cfg.executor.max_requeues,
                                   slurm_python=shlex.quote(sys.executable))
        ex.update_parameters(**params)
        runner = StageRunner(str(run_dir), {t.key: task_payload(plan, t, res["cpus"]) for t in g.tasks},
                             force=force)
        keys = [t.key for t in g.tasks]
        jobs = ex.map_array(runner, keys)
        master = jobs[0].job_id.split("_", 1)[0]
        tasks = {
            k: {"job_id": j.job_id, "stdout": str(j.paths.stdout), "stderr": str(j.paths.stderr),
                "log": str(records.log_path(run_dir, g.stage, k))}
            for k, j in zip(keys, jobs)
        }
        sg = SubmittedGroup(g, master, tasks, [s.job_id for s in needs], params)
        submitted.append(sg)
        _append_submission(run_dir, {
            "time": datetime.now(timezone.utc).isoformat(), "executor": "slurm", "group": g.name,
            "stage": g.stage, "block": g.block, "job_id": master, "depends_on": sg.depends_on,
            "tasks": tasks, "parameters": params,
            "digests": {t.key: t.digest for t in g.tasks},
        })
        echo(f"submitted {g.name}: job {master} ({len(keys)} task(s))"
             + (f" after {', '.join(sg.depends_on)}" if sg.depends_on else "")
             + f"; logs {folder}/{master}_*_log.out")
    outcome.submitted = submitted
    return outcome


def wait_for_jobs(job_ids: list[str], poll_s: float = 2.0, timeout_s: Optional[float] = None,
                  echo: Callable[[str], None] = print) -> dict[str, str]:
    """Poll sacct until no job of these arrays is pending or running; returns the final states."""
    start = time.monotonic()
    last = ""
    settle = 0
    tty = sys.stderr.isatty()  # a progress bar on a terminal, log lines otherwise
    while True:
        st = sacct.states(job_ids)
        counts: dict[str, int] = {}
        for s in st.values():
            counts[s] = counts.get(s, 0) + 1
        summary = ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items()))
        if summary != last:
            if tty:
                done = sum(v for k, v in counts.items() if k not in sacct.ACTIVE_STATES)
                total = max(sum(counts.values()), 1)
                bar = "#" * (30 * done // total)
                sys.stderr.write(f"\r[{bar:<30}] {done}/{total} finished ({summary})\x1b[K")
                sys.stderr.flush()
            else:
                echo(f"jobs: {summary or 'not yet in accounting'}")
            last = summary
        known = {j.split("_", 1)[0] for j in st}
        if (st and all(j in known for j in job_ids) and not any(s in sacct.ACTIVE_STATES for s in st.values())
                and not sacct.queued(job_ids)):
            # Accounting trails the controller a little: confirm on a second read.
            settle += 1
            if settle >= 2:
                if tty:
                    sys.stderr.write("\n")
                return st
        else:
            settle = 0
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"jobs {job_ids} still active after {timeout_s:.0f}s")
        time.sleep(poll_s)


def _local_threads(cfg, spec) -> int:
    """A task's cpus, capped by this machine's cores (spec defaults are sized for cluster nodes)."""
    return max(1, min(int(resolve_resources(cfg, spec)["cpus"]), os.cpu_count() or 1))


def _run_here(plan, cfg, todo, force, executor, echo, outcome) -> Outcome:
    run_dir = Path(plan.run_dir)
    pending = {t.id: t for t in todo}
    order = [t for t in plan.tasks.values() if t.id in pending]
    failed: set[str] = set()
    _append_submission(run_dir, {
        "time": datetime.now(timezone.utc).isoformat(), "executor": executor, "group": None,
        "job_id": None, "tasks": {t.id: {"log": str(records.log_path(run_dir, t.stage, t.key))} for t in order},
    })
    if executor == "debug":
        for t in order:
            if any(u in failed for u in t.needs):
                outcome.skipped.append(t.id)
                failed.add(t.id)
                continue
            echo(f"running {t.id}")
            try:
                run_task(run_dir, task_payload(plan, t, _local_threads(cfg, plan.specs[t.stage])), force=force, cfg=cfg)
            except Exception as exc:  # noqa: BLE001 - reported like a failed job; the traceback is in the log
                outcome.failed.append(t.id)
                failed.add(t.id)
                # The exception itself, on one line: a stats file could predate it (a failure before the stage ran).
                echo(f"FAILED: {t.id}: {' '.join(f'{type(exc).__name__}: {exc}'.split())}\n"
                     f"    log: {records.log_path(run_dir, t.stage, t.key)}")
                continue
            outcome.completed.append(t.id)
        return outcome

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
            if any(u in failed for u in t.needs):
                waiting.remove(t)
                failed.add(t.id)
                outcome.skipped.append(t.id)
                echo(f"skipped {t.id}: an upstream task failed")
                progressed = True
                continue
            ready = all(u not in pending or u in outcome.completed for u in t.needs)
            if ready and len(running) < workers:
                waiting.remove(t)
                out = records.log_path(run_dir, t.stage, t.key).with_suffix(".out")
                out.parent.mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, "-m", "harc_hpc.pipeline.runner", "--run-dir", str(run_dir),
                       "--payload", json.dumps(task_payload(plan, t, _local_threads(cfg, plan.specs[t.stage])))]
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


def apply_prepare_hook(cfg: PipelineConfig, specs_dir=None) -> PipelineConfig:
    """Fill in what the config leaves to be built (the pipeline's ``prepare`` hook: ``demo:``
    sources are trained, or reused, here)."""
    from harc_hpc.pipeline.planner import load_hooks

    out = load_hooks(specs_dir).call("prepare", cfg)
    return cfg if out is None else out


def save_run_config(cfg: PipelineConfig, run_dir: Path) -> Path:
    """Write ``run_dir/config.yaml`` and an immutable snapshot ``run_dir/configs/<digest>.yaml``.

    Jobs load the snapshot named in their payload, so a later submit with another config cannot
    change what an already queued job computes under its recorded digest.
    """
    import hashlib

    from harc_hpc.io.atomic import write_text_atomic
    from harc_hpc.config import dump_config

    run_dir = Path(run_dir)
    text = dump_config(cfg)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    snapshot = run_dir / "configs" / f"{digest}.yaml"
    for path in (snapshot, run_dir / "config.yaml"):
        write_text_atomic(path, text)
    return snapshot
