"""router-distill's and router-distill-model's estimates (docs/training.md)."""

from __future__ import annotations

from harc_hpc.errors import format_bytes
from harc_hpc.dtypes import itemsize
from harc_hpc.stages.estimate import CUDA_CONTEXT_BYTES, PROCESS_BYTES, EstimateContext, StageEstimate
from harc_hpc.stages.estimates.assemble_model import patched_copy_host_bytes


def estimate(ctx: EstimateContext, stage: str) -> StageEstimate:
    """One layer's router inputs and source logits resident like the solve's, a batch's and the
    held-out rows' logits, Adam's state per start; at most max_steps steps per start."""
    cfg, d, K = ctx.cfg, ctx.shape.hidden, ctx.shape.experts
    rd, n_solve = cfg.router_distill, ctx.n_solve
    e = StageEstimate(stage, len(ctx.tasks[stage]))
    item = itemsize(rd.dtype)
    batch = min(rd.batch_tokens * len(cfg.task_names), n_solve)
    need = n_solve * (d + 1 + K) * item + 4 * (batch + 65536) * K * item + 2 * K * (d + 1) * 8 * len(rd.starts)
    if ctx.on_gpu(stage):
        e.gpu_bytes = int(CUDA_CONTEXT_BYTES + need)
        e.host_bytes = PROCESS_BYTES + 4 * cfg.calibration.chunk_tokens * d * 4
    else:
        e.host_bytes = int(PROCESS_BYTES + need)
    e.seconds = len(rd.starts) * rd.max_steps * 4 * batch * d * K / (ctx.tflops(stage, rd.dtype) * 1e12)
    e.notes.append(f"inputs resident: {format_bytes(n_solve * (d + 1 + K) * item)} ({n_solve} tokens x {d} and "
                   f"their source logits, {rd.dtype}); at most {rd.max_steps} Adam steps per start "
                   f"({len(rd.starts)}), early stopping usually ends sooner")
    return e


def estimate_model(ctx: EstimateContext, stage: str) -> StageEstimate:
    """A patched copy of the merged (or HARC's) checkpoint per start, like assemble-model's."""
    e = StageEstimate(stage, len(ctx.tasks[stage]), host_bytes=patched_copy_host_bytes(ctx))
    e.scratch_bytes = len(ctx.cfg.router_distill.starts) * ctx.shape.total_params() * ctx.shape.dtype_bytes
    e.seconds = e.scratch_bytes / 1e9
    return e
