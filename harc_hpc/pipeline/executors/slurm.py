"""The SLURM executor: one array job per (stage, block) group over its incomplete tasks, submitted
through submitit, ``afterok`` on the groups it needs that were submitted in the same call (a
completed upstream needs no dependency); every submission is appended to ``submissions.jsonl``."""

from __future__ import annotations

import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from harc_hpc.pipeline import records, sacct
from harc_hpc.pipeline.executors.base import Outcome, SubmittedGroup, append_submission, resolve_resources
from harc_hpc.pipeline.runner import StageRunner, task_payload

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
    # One task as several processes (a distributed stage): srun starts them, torch.distributed joins them.
    if resources.get("tasks_per_node", 1) > 1:
        params["tasks_per_node"] = int(resources["tasks_per_node"])
    if resources.get("nodes", 1) > 1:
        params["nodes"] = int(resources["nodes"])
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
    if "nodes" in params:
        out["--nodes"] = params["nodes"]
    if "tasks_per_node" in params:
        out["--ntasks-per-node"] = params["tasks_per_node"]
    for key in ("partition", "account", "qos", "dependency"):
        if f"slurm_{key}" in params:
            out[f"--{key}"] = params[f"slurm_{key}"]
    for k, v in params.get("slurm_additional_parameters", {}).items():
        out[f"--{k.replace('_', '-')}"] = v
    return out


def _dependency(groups: list[SubmittedGroup], external: Optional[list[str]] = None) -> Optional[str]:
    """``afterok`` on these groups' jobs and on ``external`` job ids (another sweep cell's tasks)."""
    ids = [g.job_id for g in groups] + [j for j in (external or []) if j not in {g.job_id for g in groups}]
    return "afterok:" + ":".join(ids) if ids else None


def print_dry_run(plan, cfg, todo, explicit, echo) -> None:
    groups = plan.groups(todo)
    echo(f"DAG: {len(todo)} task(s) to run in {len(groups)} array job(s) (layers {plan.layers}, "
         f"blocks {plan.blocks})")
    for g in groups:
        needs = plan.group_needs(g, groups)
        external = plan.external_needs(g, groups)
        after = [f"<{n.name}>" for n in needs] + external
        res = resolve_resources(cfg, plan.specs[g.stage], explicit)
        params = submitit_parameters(res, f"harc-{g.name.replace('/', '.')}", len(g.tasks),
                                     "afterok:" + ":".join(after) if after else None)
        echo(f"[{g.name}] {len(g.tasks)} task(s): {', '.join(t.key for t in g.tasks)}")
        echo(f"    after: {', '.join([n.name for n in needs] + external) or '-'}")
        echo("    sbatch: " + " ".join(f"{k}={v}" for k, v in sbatch_preview(params).items())
             + (f" --array=0-{len(g.tasks) - 1}%{params['slurm_array_parallelism']}" if len(g.tasks) > 1 else ""))
        if res["setup"]:
            echo(f"    setup: {'; '.join(res['setup'])}")


def submit(plan, cfg, todo, force, explicit, echo, outcome) -> Outcome:
    import submitit

    run_dir = Path(plan.run_dir)
    submitted: list[SubmittedGroup] = []
    for g in plan.groups(todo):
        needs_groups = plan.group_needs(g, [s.group for s in submitted])
        needs = [s for s in submitted if any(s.group is n for n in needs_groups)]
        dependency = _dependency(needs, plan.external_needs(g, [s.group for s in submitted]))
        res = resolve_resources(cfg, plan.specs[g.stage], explicit)
        params = submitit_parameters(res, f"harc-{g.name.replace('/', '.')}", len(g.tasks), dependency,
                                     cfg.executor.signal_delay_s)
        folder = run_dir / "slurm" / g.stage
        # cluster= always explicit: with srun on PATH submitit would pick SLURM even for a local run.
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=cfg.executor.max_requeues,
                                   slurm_python=shlex.quote(sys.executable))
        ex.update_parameters(**params)
        runner = StageRunner(str(run_dir), {t.key: task_payload(plan, t, res["cpus"], res["ranks"])
                                            for t in g.tasks},
                             force=force)
        keys = [t.key for t in g.tasks]
        jobs = ex.map_array(runner, keys)
        master = jobs[0].job_id.split("_", 1)[0]
        tasks = {
            k: {"job_id": j.job_id, "stdout": str(j.paths.stdout), "stderr": str(j.paths.stderr),
                "log": str(records.log_path(run_dir, g.stage, k))}
            for k, j in zip(keys, jobs)
        }
        sg = SubmittedGroup(g, master, tasks, dependency[len("afterok:"):].split(":") if dependency else [], params)
        submitted.append(sg)
        append_submission(run_dir, {
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
