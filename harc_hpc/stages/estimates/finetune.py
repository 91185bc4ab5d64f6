"""finetune's estimate (docs/training.md)."""

from __future__ import annotations

from harc_hpc.dtypes import itemsize
from harc_hpc.stages.estimate import CUDA_CONTEXT_BYTES, PROCESS_BYTES, EstimateContext, StageEstimate


def training_dtype(ctx: EstimateContext, stage: str) -> str:
    """finetune.compute_dtype of finetune.dtype on the stage's device ("auto": bfloat16 on a GPU,
    float32 on a CPU)."""
    import torch

    from harc_hpc.stages.finetune import compute_dtype

    device = torch.device("cuda" if ctx.on_gpu(stage) else "cpu")
    return str(compute_dtype(ctx.cfg.finetune.dtype, device)).removeprefix("torch.")


def estimate(ctx: EstimateContext, stage: str) -> StageEstimate:
    """The whole model on every rank (ddp), or a 1/ranks share of float32 master weights, gradients and
    moments with two decoder layers gathered in the compute dtype (fsdp); gradients and AdamW's moments
    of the trained parameters, one batch's activations (every layer's, or one layer's with gradient
    checkpointing; a rank's share of the batch) and its logits; per start its output model and one
    checkpoint. The steps' compute is shared by the ranks."""
    from harc_hpc.errors import format_bytes

    cfg, shape = ctx.cfg, ctx.shape
    d, K, fc = shape.hidden, shape.experts, cfg.finetune
    e = StageEstimate(stage, len(ctx.tasks[stage]))
    dtype = training_dtype(ctx, stage)
    w = itemsize(dtype, default=4)
    params = shape.total_params()
    trained = params if fc.params in ("all", "non-expert") else (
        len(shape.moe_layers) * K * d if fc.params == "routers" else
        len(shape.moe_layers) * K * 3 * d * shape.expert_intermediate)
    ranks = max(1, int(ctx.given(stage).get("ranks", 1) or 1))
    sharded = fc.sharding == "fsdp" and ranks > 1
    if sharded:  # float32 masters, gradients, moments sharded; the gathered layers (this one, the next)
        largest = max(shape.layer_params(l) for l in range(shape.layers))
        model = (params * 4 + trained * 12) // ranks + 2 * largest * w + shape.vocab * d * w
    else:
        model = params * w + trained * (w + 8)  # weights, gradients, AdamW's two float32 moments
    tokens = -(-fc.batch_size // ranks) * fc.seq_length
    per_layer = tokens * (16 * d + 3 * shape.top_k * shape.expert_intermediate + K) * w
    acts = (per_layer + tokens * d * w * shape.layers) if fc.gradient_checkpointing else per_layer * shape.layers
    acts += 2 * tokens * shape.vocab * 4  # the logits and their float32 copy
    if ctx.on_gpu(stage):
        e.gpu_bytes = int(CUDA_CONTEXT_BYTES + model + acts)
        # fsdp: the float32 model is loaded whole on the host before each rank keeps its share
        e.host_bytes = PROCESS_BYTES + params * (4 if sharded else w)
    else:
        e.host_bytes = int(PROCESS_BYTES + max(model + acts, params * 4 if sharded else 0))
    e.scratch_bytes = len(fc.starts) * (params * shape.dtype_bytes + trained * 12)  # outputs + one checkpoint each
    active = sum(shape.active_params(l) for l in range(shape.layers)) + shape.vocab * d
    e.seconds = len(fc.starts) * fc.steps * 6 * tokens * active / (ctx.tflops(stage, dtype) * 1e12)
    where = (f"a 1/{ranks} share of the float32 model ({format_bytes(params * 4 // ranks)}) on each rank (fsdp)"
             if sharded else f"the whole model on every rank ({format_bytes(params * w)})")
    e.notes.append(f"{where}, gradients and AdamW moments of {trained:,} trained parameters, "
                   + ("a rank's share of " if ranks > 1 else "")
                   + f"one batch of {fc.batch_size} x {fc.seq_length} tokens' activations"
                   + (" (gradient checkpointing)" if fc.gradient_checkpointing else ""))
    return e
