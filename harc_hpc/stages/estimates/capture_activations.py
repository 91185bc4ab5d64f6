"""capture-activations' estimate: the streamed capture (harc.block_size 1 on a family whose layers
are the standard pre-norm pair) or the layer-wise one, as capture_activations.run chooses."""

from __future__ import annotations

from typing import Optional

from harc_hpc.errors import format_bytes
from harc_hpc.stages.estimate import (
    CUDA_CONTEXT_BYTES,
    CUDA_HOST_BYTES,
    PROCESS_BYTES,
    EstimateContext,
    StageEstimate,
)


def streamed(ctx: EstimateContext) -> bool:
    """capture_activations.streamed for the model of the plan's config.json (which a plan made with
    --model-config gives before the weights are on disk)."""
    from harc_hpc.models.families import family_for_config

    return ctx.cfg.harc.block_size == 1 and family_for_config(ctx.conf).residual_capture


def states_placement(nbytes: int, layer_bytes: int, device_free: Optional[int], host_free: int) -> str:
    """capture_activations.placement_for's rule on given free memory: "device" when the states fit
    beside two decoder layers in 80 % of ``device_free`` (None: the compute device is the CPU, whose
    memory is the host's), else "host" ("device" on a CPU) when they fit 80 % of ``host_free``, else
    "disk" (node-local). tests/test_estimates.py holds placement_for to it."""
    if device_free is not None and nbytes + 2 * layer_bytes <= 0.8 * device_free:
        return "device"
    if nbytes <= 0.8 * host_free:
        return "host" if device_free is not None else "device"
    return "disk"


def estimate(ctx: EstimateContext, stage: str) -> StageEstimate:
    e = StageEstimate(stage, len(ctx.tasks[stage]))
    (_streamed if streamed(ctx) else _layerwise)(ctx, stage, e)
    return e


def _layerwise(ctx: EstimateContext, stage: str, e: StageEstimate) -> None:
    """capture_activations.run_layerwise: one decoder layer onloaded at a time (two while its
    successor is read), every batch through it; the block's in-flight hidden states where
    placement_for puts them (device, host memory or node-local disk); on disk the previous block's
    hidden states, this block's, and its router inputs."""
    from harc_hpc.models.modeling import host_memory_bounds, tightest

    cfg, shape, n_all, cal = ctx.cfg, ctx.shape, ctx.n_all, ctx.cal
    d, on_gpu, block_size = shape.hidden, ctx.on_gpu(stage), ctx.block_size
    compute = ctx.compute_bytes(stage)
    layer = max(shape.layer_params(l) for l in range(shape.layers)) * compute
    states = n_all * d * compute
    work = cfg.calibration.batch_size * ctx.longest_sequence() * (
        8 * d + 3 * shape.top_k * shape.expert_intermediate + shape.experts) * compute
    embed = shape.vocab * d * compute
    writers = (block_size + 1) * len(cfg.task_names) * cfg.calibration.chunk_tokens * d * cal
    fixed = 2 * layer + work + embed  # on the compute device besides the states
    host = PROCESS_BYTES + writers + (0 if on_gpu else fixed)
    # what the task may still take of its grant when the states are placed (SLURM's grant less
    # what the process holds then), and on a GPU the card less the CUDA context
    may_take, _ = tightest(host_memory_bounds(slurm_grant=int(ctx.given(stage)["mem_bytes"]),
                                              rss=host + (CUDA_HOST_BYTES if on_gpu else 0)))
    device_free = max(0, int(ctx.given(stage)["gpu_bytes"]) - CUDA_CONTEXT_BYTES) if on_gpu else None
    where = states_placement(states, layer, device_free, may_take)
    e.gpu_bytes = int(CUDA_CONTEXT_BYTES + fixed + (states if where == "device" else 0)) if on_gpu else 0
    if where == "disk":
        e.notes.append(f"in-flight hidden states ({format_bytes(states)}) on node-local disk")
        e.notes.append(f"needs {format_bytes(states)} free in run.node_local_dir ($TMPDIR by default) on the node")
    else:
        if on_gpu:
            e.notes.append("in-flight hidden states on the GPU" if where == "device" else
                           f"in-flight hidden states ({format_bytes(states)}) in host memory")
        if where == "host" or not on_gpu:
            host += states
    e.host_bytes = int(host)
    # while capture b runs: hidden b-1, hidden b, router inputs of block b
    per_block = n_all * d * cal * (block_size + 1)
    tasks = ctx.tasks[stage]
    e.scratch_bytes = per_block * len(tasks) if cfg.run.retention == "keep" else per_block + n_all * d * cal
    layers_run = min(2 * block_size, shape.layers)
    if layers_run > 1 and cfg.calibration.layer_checkpoints:  # a killed task resumes from it
        e.scratch_bytes += states
        e.notes.append(f"checkpoints its in-flight states ({format_bytes(states)}) after every decoder layer "
                       f"(calibration.layer_checkpoints: false to skip; a killed task then starts over)")
    flops = 2 * n_all * sum(shape.active_params(l) for l in range(layers_run)) / max(1, layers_run) * layers_run
    e.seconds = flops / (ctx.tflops(stage, ctx.model_dtype(stage)) * 1e12)
    e.notes.append("one decoder layer on the device at a time (onloaded from the shards)")


def _streamed(ctx: EstimateContext, stage: str, e: StageEstimate) -> None:
    """capture_activations.run_streamed: every decoder layer between two calibrated ones onloaded
    (block 0: those before the first), one batch in flight; on disk one residual store (the next
    one grows as the previous is consumed) plus a batch and a chunk per task in flux."""
    cfg, shape, plan, n_all, cal = ctx.cfg, ctx.shape, ctx.plan, ctx.n_all, ctx.cal
    d, compute = shape.hidden, ctx.compute_bytes(stage)
    firsts = [blk[0] for blk in plan.blocks]
    spans = [range(0, firsts[0] + 1)] + [range(a, b + 1) for a, b in zip(firsts, firsts[1:])]
    attention = shape.attention_params()

    def onloaded(span: range, first_block: bool) -> int:
        # the first layer's feed-forward half (block 0: none, it starts at the embeddings), the
        # layers between in full, the last one's attention half
        inner = span if first_block else span[1:]
        head = 0 if first_block else shape.layer_params(span[0]) - attention
        return head + sum(shape.layer_params(l) for l in inner[:-1]) + attention

    resident = max(onloaded(span, i == 0) for i, span in enumerate(spans)) * compute
    batch_tokens = cfg.calibration.batch_size * ctx.longest_sequence()
    work = batch_tokens * (8 * d + 3 * shape.top_k * shape.expert_intermediate + shape.experts) * compute
    embed = shape.vocab * d * compute
    writers = len(cfg.task_names) * cfg.calibration.chunk_tokens * d * cal
    if ctx.on_gpu(stage):
        e.gpu_bytes = int(CUDA_CONTEXT_BYTES + resident + work + embed)
        e.host_bytes = int(PROCESS_BYTES + writers)
    else:
        e.host_bytes = int(PROCESS_BYTES + writers + resident + work + embed)
    store = n_all * d * cal
    if cfg.run.retention == "keep":
        e.scratch_bytes = store * len(ctx.tasks[stage])
    else:
        # the task in flight keeps its input from the batch a resume would restart at (one batch
        # and a chunk behind its durable output); every task may keep a partial last chunk
        e.scratch_bytes = store + (batch_tokens + len(cfg.task_names) * cfg.calibration.chunk_tokens) * d * cal
        e.notes.append("consumes the previous block's store chunk by chunk as it writes its own: about one "
                       "block's store on disk at a time")
    widest = max(spans, key=len)
    e.seconds = 2 * n_all * sum(shape.active_params(l) for l in widest) / (
        ctx.tflops(stage, ctx.model_dtype(stage)) * 1e12)
    between = f", the {len(widest) - 2} decoder layer(s) between" if len(widest) > 2 else ""
    e.notes.append(f"streamed batch by batch; onloaded at once: a calibrated layer's feed-forward half{between} "
                   f"and the next one's attention half")
