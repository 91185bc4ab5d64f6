"""report's estimate: every checkpoint evaluated in one onloaded pass over the held-out data."""

from __future__ import annotations

from harc_hpc.errors import format_bytes
from harc_hpc.stages.estimate import (
    CUDA_CONTEXT_BYTES,
    PROCESS_BYTES,
    EstimateContext,
    StageEstimate,
    _samples_bound,
    _tokens_from_files,
)


def heldout_tokens(ctx: EstimateContext) -> tuple[int, int]:
    """(held-out tokens of every source, the longest held-out sequence), from the files' sizes or
    the upper bound num_samples x max_length."""
    from harc_hpc.io.calibration_data import effective_settings

    held, longest = 0, 8
    for src in ctx.cfg.models.sources:
        if src.heldout is None or not src.heldout.files:
            continue
        s = effective_settings(src.heldout, ctx.cfg.calibration, heldout=True)
        longest = max(longest, int(s["max_length"]))
        n = _tokens_from_files(src.heldout.files, s["num_samples"], s["max_length"])
        held += n if n is not None else _samples_bound(s["num_samples"]) * int(s["max_length"])
    return held, longest


def estimate(ctx: EstimateContext, stage: str) -> StageEstimate:
    """One decoder layer, the embeddings or the head, one batch's logits, and the hidden states of
    the pass (the merged model's pass holds two sets: every task with its own routers and with the
    sources' routers, the oracle): on the GPU when they fit 80 % of it, else in host memory."""
    shape = ctx.shape
    d, compute = shape.hidden, ctx.compute_bytes(stage)
    e = StageEstimate(stage, len(ctx.tasks[stage]))
    layer = max(shape.layer_params(l) for l in range(shape.layers)) * compute
    held, longest = heldout_tokens(ctx)
    states = 2 * held * d * compute
    fixed = layer + shape.vocab * d * compute + ctx.cfg.calibration.batch_size * longest * shape.vocab * 4
    if ctx.on_gpu(stage):
        e.gpu_bytes = int(CUDA_CONTEXT_BYTES + fixed)
        if e.gpu_bytes + states <= 0.8 * ctx.given(stage)["gpu_bytes"]:
            e.gpu_bytes += states
            e.host_bytes = PROCESS_BYTES
        else:
            e.host_bytes = PROCESS_BYTES + states
    else:
        e.host_bytes = PROCESS_BYTES + fixed + states
    e.notes.append(f"each model onloaded one decoder layer at a time; hidden states of {held} held-out "
                   f"tokens x 2 ({format_bytes(states)})")
    return e
