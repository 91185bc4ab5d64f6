"""What every executor shares: the outcome of an execution, resources per stage, the run's record of
submissions (``submissions.jsonl``, read by ``status``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional

from harc_hpc.config import PipelineConfig
from harc_hpc.errors import UsageError
from harc_hpc.pipeline import records
from harc_hpc.pipeline.planner import Group, StageSpec

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
    nodes = getattr(per_stage, "nodes", None) or 1
    per_node = getattr(per_stage, "tasks_per_node", None)
    if per_node is None:
        per_node = int(out["gpus"]) if spec.distributed and (out["gpus"] or 0) > 1 else 1
    if (nodes > 1 or per_node > 1) and not spec.distributed:
        raise UsageError(f"executor.stages.{spec.name}: nodes {nodes} x tasks_per_node {per_node}, but stage "
                         f"{spec.name} runs one process per task (only stages with 'distributed: true' "
                         f"in their spec shard a task over several processes)")
    if out["gpus"] and per_node > int(out["gpus"]):
        raise UsageError(f"executor.stages.{spec.name}: more ranks than GPUs on a node: tasks_per_node {per_node} "
                         f"with gpus {out['gpus']} would put two ranks on one GPU; set tasks_per_node to at most "
                         f"gpus (one GPU per rank), or gpus to 0 for CPU ranks")
    out["nodes"], out["tasks_per_node"] = nodes, per_node
    out["ranks"] = nodes * per_node
    out["extra_sbatch"] = {**ex.extra_sbatch, **(per_stage.extra_sbatch if per_stage is not None else {})}
    out["setup"] = list(ex.setup)
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


def append_submission(run_dir: Path, entry: dict) -> None:
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


def record_local_submission(run_dir: Path, executor: str, tasks) -> None:
    """A local or debug execution in submissions.jsonl (it supersedes earlier SLURM jobs in ``status``)."""
    append_submission(run_dir, {
        "time": datetime.now(timezone.utc).isoformat(), "executor": executor, "group": None,
        "job_id": None, "tasks": {t.id: {"log": str(records.log_path(run_dir, t.stage, t.key))} for t in tasks},
    })


def local_threads(cfg, spec) -> int:
    """A task's cpus, capped by this machine's cores (spec defaults are sized for cluster nodes)."""
    return max(1, min(int(resolve_resources(cfg, spec)["cpus"]), os.cpu_count() or 1))
