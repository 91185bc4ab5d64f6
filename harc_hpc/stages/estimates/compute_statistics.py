"""compute-statistics' estimate: one (layer, task)'s Hessian statistics, chunk by chunk."""

from __future__ import annotations

from harc_hpc.stages.estimate import PROCESS_BYTES, EstimateContext, StageEstimate


def estimate(ctx: EstimateContext, stage: str) -> StageEstimate:
    """A few chunks of router inputs and two d x d float64 accumulators in host memory; per task
    the statistics file (K x d x 3, d x d and K x K float64); ~6 n d K FLOPs in harc.dtype."""
    cfg, d, K = ctx.cfg, ctx.shape.hidden, ctx.shape.experts
    tasks = ctx.tasks[stage]
    return StageEstimate(
        stage, len(tasks),
        host_bytes=int(PROCESS_BYTES + 4 * cfg.calibration.chunk_tokens * d * 8 + 2 * d * d * 8),
        scratch_bytes=len(tasks) * (K * d * 8 * 3 + d * d * 8 + K * K * 8),
        seconds=6 * max(ctx.per_task_solve.values()) * d * K / (ctx.tflops(stage, cfg.harc.dtype) * 1e12))
