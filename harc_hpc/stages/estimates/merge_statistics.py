"""merge-statistics' estimate: what the configured merge method's statistics pass holds
(merge_statistics.statistics_kind decides which pass runs, as in the stage)."""

from __future__ import annotations

from harc_hpc.errors import format_bytes
from harc_hpc.stages.estimate import CUDA_CONTEXT_BYTES, PROCESS_BYTES, EstimateContext, StageEstimate


def gram_entries(ctx: EstimateContext) -> list[int]:
    """Gram entries of each decoder layer (merge_statistics.LayerGrams): an MoE layer's attention
    inputs, output projection, router, every expert's input and down projection (and the shared
    expert's); a dense layer's attention and MLP."""
    shape = ctx.shape
    d, K = shape.hidden, shape.experts
    attn_out = shape.heads * shape.head_dim if shape.mla is None else d
    dense = max(shape.dense_intermediate, shape.shared_intermediate)
    moe_entries = K * (d * d + shape.expert_intermediate ** 2) + 3 * d * d + attn_out ** 2 \
        + (shape.shared_intermediate ** 2 if shape.shared_intermediate else 0)
    dense_entries = 2 * d * d + attn_out ** 2 + dense ** 2
    return [moe_entries if l in shape.moe_layers else dense_entries for l in range(shape.layers)]


def estimate(ctx: EstimateContext, stage: str) -> StageEstimate:
    """One source at a time: one decoder layer, its in-flight hidden states, the layer's Gram
    accumulators (float64 totals + float32 partial sums, 12 bytes an entry); the Gram files (float32,
    kept). RegMean++ (gram_sequential) only tokenises here."""
    from harc_hpc.stages.merge_statistics import statistics_kind

    cfg, shape = ctx.cfg, ctx.shape
    e = StageEstimate(stage, len(ctx.tasks[stage]))
    if statistics_kind(cfg) == "gram_sequential":
        e.host_bytes = PROCESS_BYTES
        e.notes.append("RegMean++: only tokenises each source's data here; the layer-by-layer Gram pass "
                       "runs in merge-experts (memory as capture's, plus one layer's Gram accumulators)")
        return e
    d, K = shape.hidden, shape.experts
    compute = ctx.compute_bytes(stage)
    entries = gram_entries(ctx)
    accumulators = 12 * max(entries)
    layer = max(shape.layer_params(l) for l in range(shape.layers)) * compute
    states = max(ctx.tokens.values()) * d * compute
    work = cfg.calibration.batch_size * ctx.longest_sequence() * (8 * d + 4 * shape.top_k * shape.expert_intermediate) * 4
    if ctx.on_gpu(stage):
        e.gpu_bytes = int(CUDA_CONTEXT_BYTES + layer + accumulators + work + states)
        e.host_bytes = PROCESS_BYTES + states
    else:
        e.host_bytes = int(PROCESS_BYTES + layer + accumulators + work + states)
    e.scratch_bytes = 4 * sum(entries) * len(cfg.models.sources)  # the Gram files (float32, kept)
    attn_out = shape.heads * shape.head_dim if shape.mla is None else d
    gram_flops = 2 * ctx.n_all * (3 * d * d + attn_out ** 2 + shape.top_k * (d * d + shape.expert_intermediate ** 2))
    flops = 2 * ctx.n_all * sum(shape.active_params(l) for l in range(shape.layers))
    # the forward in the model's dtype, the Gram products in float32
    e.seconds = flops / (ctx.tflops(stage, ctx.model_dtype(stage)) * 1e12) + gram_flops * len(shape.moe_layers) / max(
        1, shape.layers) * shape.layers / (ctx.tflops(stage, "float32") * 1e12)
    e.notes.append(f"Gram accumulators {format_bytes(accumulators)} per decoder layer on the device; "
                   f"Gram files {format_bytes(e.scratch_bytes)} (float32, kept)")
    return e
