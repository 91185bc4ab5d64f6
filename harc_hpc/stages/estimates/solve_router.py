"""solve-router's estimate: the resident inputs of one layer, sized and placed by the solve's own
budget and residency rules (solve_router.choose_residency, resolve_inner_dtype)."""

from __future__ import annotations

from harc_hpc.errors import format_bytes
from harc_hpc.dtypes import itemsize
from harc_hpc.stages.estimate import (
    CUDA_CONTEXT_BYTES,
    PROCESS_BYTES,
    SOLVE_ITERATIONS,
    EstimateContext,
    StageEstimate,
)


def solve_budget(ctx: EstimateContext, stage: str) -> int:
    """solve_router.run's memory budget, from what the executor grants a task: harc.memory_budget_gb
    (a ConfigError over what the task may take, as the solve raises) or 80 % of what it may take
    (a GPU's memory less the CUDA context; the host grant less the process)."""
    from harc_hpc.models.modeling import check_memory_budget, gpu_free_bytes, host_memory_bounds, tightest

    cfg, given = ctx.cfg, ctx.given(stage)
    if ctx.on_gpu(stage):
        card = max(0, int(given.get("gpu_bytes", 0)) - CUDA_CONTEXT_BYTES)
        bounds = {"free GPU memory": gpu_free_bytes(card, 0, 0)}
    else:
        bounds = host_memory_bounds(slurm_grant=int(given.get("mem_bytes", 0)), rss=PROCESS_BYTES)
    if cfg.harc.memory_budget_gb:
        budget = int(cfg.harc.memory_budget_gb * 2**30)
        check_memory_budget("harc.memory_budget_gb", budget, bounds,
                            f"solve-router (executor: {format_bytes(given.get('gpu_bytes', 0))} a GPU, "
                            f"executor.gpu_memory_gb)" if ctx.on_gpu(stage) else
                            f"solve-router (executor: {format_bytes(given.get('mem_bytes', 0))} of host "
                            f"memory, executor.stages.solve-router.mem_gb)")
        return budget
    return int(0.8 * tightest(bounds)[0])


def estimate(ctx: EstimateContext, stage: str) -> StageEstimate:
    """The layer's inputs resident (per rank of a distributed solve), widened once when that fits
    the budget, else kept as stored; the expert-block preconditioner; ~SOLVE_ITERATIONS CG
    iterations, each two GEMMs over the inputs, compute- or memory-bound."""
    from harc_hpc.stages.solve_router import choose_residency, resolve_inner_dtype
    from harc_hpc.math.settings import EXPERT_BLOCK_MIN_SIZE, resolve_preconditioner

    cfg, d, K = ctx.cfg, ctx.shape.hidden, ctx.shape.experts
    on_gpu, n_solve = ctx.on_gpu(stage), ctx.n_solve
    e = StageEstimate(stage, len(ctx.tasks[stage]))
    ranks = int(ctx.given(stage).get("ranks", 1))  # tokens sharded over the job's processes
    n_rank = -(-n_solve // ranks)
    inner = resolve_inner_dtype(cfg.harc.inner_dtype, on_gpu)
    keep_stored, inputs = choose_residency(n_rank, d, K, cfg.calibration.dtype, cfg.harc.dtype,
                                           inner, cfg.calibration.chunk_tokens, solve_budget(ctx, stage))
    item = ctx.cal if keep_stored else itemsize(cfg.harc.dtype)
    # the expert-block preconditioner: U and U G^-1 (K x tasks*m x d) and K capacitance inverses
    block_rows = len(cfg.task_names) * cfg.harc.expert_block_tokens
    preconditioner = resolve_preconditioner(cfg.harc.preconditioner, K, d)
    if preconditioner != cfg.harc.preconditioner:
        e.notes.append(f"harc.preconditioner {cfg.harc.preconditioner}: {preconditioner} for this router "
                       f"(K d = {K * d}; expert-block from {EXPERT_BLOCK_MIN_SIZE})")
    precond = (2 * K * block_rows * d + K * block_rows ** 2) * 4 if preconditioner == "expert-block" else 0
    if on_gpu:
        # read chunk by chunk into the device-resident copy: a few chunks in host memory
        e.gpu_bytes = int(CUDA_CONTEXT_BYTES + inputs + precond)
        e.host_bytes = PROCESS_BYTES + 4 * cfg.calibration.chunk_tokens * d * 4
    else:
        e.host_bytes = int(PROCESS_BYTES + inputs + 12 * K * d * 8 + precond)
    iters = min(cfg.harc.max_iter, SOLVE_ITERATIONS.get(preconditioner, SOLVE_ITERATIONS["jacobi"]))
    # a matvec is two GEMMs over the inputs: compute- or memory-bound, whichever is slower
    bandwidth = 3.35e12 if on_gpu else 20e9  # H100 HBM3; a CPU socket, roughly
    # the CG products in the inner dtype when mixed precision is on (the few exact residuals of
    # the refinement in harc.dtype are not counted), else in harc.dtype
    rate = ctx.tflops(stage, inner or cfg.harc.dtype)
    e.seconds = iters * max(4 * n_rank * d * K / (rate * 1e12), 2 * n_rank * d * item / bandwidth)
    e.notes.append(f"inputs resident: {format_bytes(inputs)} ({n_solve} tokens x {d} kept as "
                   f"{cfg.calibration.dtype if keep_stored else cfg.harc.dtype}, "
                   f"computed in {cfg.harc.dtype}"
                   + (f", products in {inner} with exact residuals" if inner else "")
                   + (f", per rank of {ranks}" if ranks > 1 else "") + "); "
                   f"~{iters} CG iterations assumed at {rate:g} TFLOP/s or {bandwidth / 1e12:g} TB/s")
    return e
