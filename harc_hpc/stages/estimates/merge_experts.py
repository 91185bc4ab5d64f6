"""merge-experts' estimate: the merge streams tensor by tensor (merge.engine)."""

from __future__ import annotations

from harc_hpc.stages.estimate import PROCESS_BYTES, EstimateContext, StageEstimate


def estimate(ctx: EstimateContext, stage: str) -> StageEstimate:
    """A few of the largest tensor (one fused expert projection in float32) per source and the
    merged one in host memory; the merged checkpoint on disk, kept; read and write at ~1 GB/s."""
    shape, sources = ctx.shape, len(ctx.cfg.models.sources)
    biggest = shape.experts * 2 * shape.expert_intermediate * shape.hidden * 4
    checkpoint = shape.total_params() * shape.dtype_bytes
    return StageEstimate(stage, len(ctx.tasks[stage]), host_bytes=PROCESS_BYTES + (sources + 3) * biggest,
                         scratch_bytes=checkpoint, seconds=checkpoint * (sources + 1) / 1e9,
                         notes=["streams tensor by tensor; output = the merged checkpoint (kept)"])
