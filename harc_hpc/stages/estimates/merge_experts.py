"""merge-experts' estimate: the merge streams tensor by tensor (merge.engine)."""

from __future__ import annotations

from harc_hpc.dtypes import itemsize
from harc_hpc.errors import format_bytes
from harc_hpc.stages.estimate import PROCESS_BYTES, EstimateContext, StageEstimate


def estimate(ctx: EstimateContext, stage: str) -> StageEstimate:
    """A few of the largest tensor (one fused expert projection in float32) per source and the
    merged one in host memory; the merged checkpoint on disk, kept; read and write at ~1 GB/s.

    A quantized input (``quantization_config``: FP8 blocks, compressed-tensors, MXFP4) is read
    dequantized, a piece at a time: the output is its dequantized size (in merge.out_dtype /
    merge.dtype, else the model's dtype), or with ``output.quantize: fp8-block`` FP8 blocks again
    (harc_hpc.io.quantized.config_output_bytes); the notes say which and the disk it needs."""
    from harc_hpc.io.quantized import config_output_bytes, config_stored_bytes, quantization_method

    shape, sources, cfg = ctx.shape, len(ctx.cfg.models.sources), ctx.cfg
    biggest = shape.experts * 2 * shape.expert_intermediate * shape.hidden * 4
    params = shape.total_params()
    out_dtype = cfg.merge.out_dtype or cfg.merge.dtype
    dtype_bytes = itemsize(out_dtype) if out_dtype else shape.dtype_bytes
    # kept in their precision by a quantized release: embeddings, LM head, routers
    unquantized = 2 * shape.vocab * shape.hidden + len(shape.moe_layers) * shape.experts * shape.hidden
    method = quantization_method(ctx.conf)
    quantize = cfg.output.quantize if method == "fp8" else None  # fp8-block re-quantizes FP8 inputs only
    checkpoint = config_output_bytes(ctx.conf, params, dtype_bytes, quantize, unquantized)
    stored = config_stored_bytes(ctx.conf, params, shape.dtype_bytes, unquantized)
    notes = ["streams tensor by tensor; output = the merged checkpoint (kept)"]
    if method is not None:
        written = (f"re-quantized as FP8 blocks (output.quantize: fp8-block), {format_bytes(checkpoint)}"
                   if quantize else f"written dequantized, {out_dtype or shape.dtype}, {format_bytes(checkpoint)}")
        notes.append(f"input quantized ({method}, ~{format_bytes(stored)} a model): dequantized on read, "
                     f"a piece at a time; {written}; disk needed: {format_bytes(checkpoint)}")
        if cfg.output.quantize and not quantize:
            notes.append(f"output.quantize: {cfg.output.quantize} re-quantizes FP8 block inputs only; "
                         f"the merge refuses a {method} input with it")
    return StageEstimate(stage, len(ctx.tasks[stage]), host_bytes=PROCESS_BYTES + (sources + 3) * biggest,
                         scratch_bytes=checkpoint, seconds=(stored * sources + checkpoint) / 1e9,
                         notes=notes)
