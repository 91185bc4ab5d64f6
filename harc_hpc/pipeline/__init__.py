"""Launching pipelines: stage specs -> task DAG with Merkle digests -> SLURM arrays / local / debug.

Knows SLURM and files, nothing about models: stage bodies live in harc_hpc.stages, specs in stages/.
"""

from harc_hpc.pipeline.api import ActiveJobsError, plan_run, run_status, submit_run
from harc_hpc.pipeline.planner import Plan, PlanError, StageSpec, Task, build_plan, default_specs_dir, load_specs
from harc_hpc.pipeline.runner import StageRunner, run_task

__all__ = [
    "ActiveJobsError", "Plan", "PlanError", "StageRunner", "StageSpec", "Task", "build_plan",
    "default_specs_dir", "load_specs", "plan_run", "run_status", "run_task", "submit_run",
]
