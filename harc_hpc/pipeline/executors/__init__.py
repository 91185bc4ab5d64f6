"""Executors, one file each, one registry: ``slurm`` (array jobs through submitit), ``local``
(a subprocess per task here), ``debug`` (in this process). Each takes the plan, the config, the
tasks to run and returns an ``Outcome``."""

from harc_hpc.pipeline.executors import debug, local, slurm
from harc_hpc.pipeline.executors.base import Outcome, SubmittedGroup, read_submissions, resolve_resources

EXECUTORS = {"slurm": slurm.submit, "local": local.run, "debug": debug.run}

__all__ = ["EXECUTORS", "Outcome", "SubmittedGroup", "read_submissions", "resolve_resources"]
