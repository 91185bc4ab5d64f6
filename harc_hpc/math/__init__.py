"""HARC router calibration: the math (no files except TaskStatistics HDF5, no SLURM)."""

from harc_hpc.math.cg import CGResult, KroneckerPreconditioner, conjugate_gradient, jacobi_preconditioner
from harc_hpc.math.distributed import ProcessGroupReducer, Reducer, shard_rows, take_shard
from harc_hpc.math.inputs import TokenChunks
from harc_hpc.math.metrics import router_kl, topk_mismatch
from harc_hpc.math.operator import HESSIANS, TaskCurvature
from harc_hpc.math.settings import SolverSettings
from harc_hpc.math.solver import OBJECTIVES, SOLVERS, RouterSolution, solve_router
from harc_hpc.math.statistics import TaskStatistics, compute_task_statistics

__all__ = [
    "CGResult",
    "HESSIANS",
    "KroneckerPreconditioner",
    "OBJECTIVES",
    "ProcessGroupReducer",
    "Reducer",
    "RouterSolution",
    "SOLVERS",
    "SolverSettings",
    "TaskCurvature",
    "TaskStatistics",
    "TokenChunks",
    "compute_task_statistics",
    "conjugate_gradient",
    "jacobi_preconditioner",
    "router_kl",
    "shard_rows",
    "solve_router",
    "take_shard",
    "topk_mismatch",
]
