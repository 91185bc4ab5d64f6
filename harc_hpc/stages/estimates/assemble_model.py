"""assemble-model's (and router-distill-model's) estimate: a checkpoint copied with routers patched in."""

from __future__ import annotations

from harc_hpc.stages.estimate import PROCESS_BYTES, EstimateContext, StageEstimate


def patched_copy_host_bytes(ctx: EstimateContext) -> int:
    """io.checkpoint.patch_tensors copies tensor by tensor: the largest (one fused expert
    projection, float32 at most) in host memory."""
    shape = ctx.shape
    return PROCESS_BYTES + shape.experts * 2 * shape.expert_intermediate * shape.hidden * 4


def estimate(ctx: EstimateContext, stage: str) -> StageEstimate:
    """One copy of the merged checkpoint with every calibrated router written in, at ~1 GB/s."""
    checkpoint = ctx.shape.total_params() * ctx.shape.dtype_bytes
    return StageEstimate(stage, len(ctx.tasks[stage]), host_bytes=patched_copy_host_bytes(ctx),
                         scratch_bytes=checkpoint, seconds=checkpoint / 1e9)
