"""solve-router: the calibrated router of one layer, from the statistics and streamed inputs."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch


from harc_hpc.config import PipelineConfig
from harc_hpc.dtypes import itemsize, torch_dtype
from harc_hpc.io.statistics import load_statistics
from harc_hpc.errors import InputDataError, format_bytes, require_finite
from harc_hpc.math.distributed import shard_rows
from harc_hpc.math.inputs import TokenChunks
from harc_hpc.math.settings import SolverSettings, resolve_preconditioner
from harc_hpc.models.modeling import free_memory_bytes, pick_device
from harc_hpc.progress import Progress
from harc_hpc.stages import layout
from harc_hpc.stages.compute_statistics import layer_inputs
from harc_hpc.stages.routers import (
    merged_router,
    merged_shared_expert_gate,
    save_router,
    source_router,
    source_shared_expert_gate,
)


log = logging.getLogger(__name__)


def run(cfg: PipelineConfig, run_dir: Path, layer: int, process_group=None) -> dict:
    """``process_group`` (a distributed task: executor.stages.solve-router.{nodes, tasks_per_node}):
    every rank holds a contiguous shard of each task's tokens, the solve all-reduces its token sums,
    every rank gets the same router, and rank 0 alone writes it."""
    from harc_hpc.math import solve_router

    rank, world = 0, 1
    if process_group is not None:
        import torch.distributed as dist

        rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    h = cfg.harc
    dtype = torch_dtype(h.dtype)
    device = pick_device(h.device)
    tasks = cfg.task_names
    stats = [load_statistics(layout.statistics_file(run_dir, layer, t)) for t in tasks]
    for t, s in zip(tasks, stats):
        if not s.is_finite():
            raise InputDataError("the statistics hold NaN/Inf", where=str(layout.statistics_file(run_dir, layer, t)),
                                 hint=f"rerun compute-statistics for layer {layer}, task {t}")
    # The inputs stay resident: widened once to the compute dtype when that fits the budget, else in
    # their stored dtype (bfloat16: a quarter of float64) widened one chunk at a time; streamed, they
    # would cost a read and decode of the store on every CG iteration.
    inputs = [layer_inputs(cfg, run_dir, layer, t, stored_dtype=True) for t in tasks]
    if world > 1:
        for x in inputs:  # this rank's rows only: it reads and keeps 1/world of the layer
            lo, hi = shard_rows(len(x), rank, world)
            x.rows = np.arange(lo, hi, dtype=np.int64) if x.rows is None else x.rows[lo:hi]
    k, d = int(stats[0].sigma_w.shape[0]), int(inputs[0].shape[1])
    n_tokens = sum(len(x) for x in inputs)
    budget = _memory_budget(h, device, layer)
    inner = resolve_inner_dtype(h.inner_dtype, device.type == "cuda" and _fast_16bit(device))
    keep_stored, need = choose_residency(n_tokens, d, k, inputs[0].dtype, h.dtype, inner,
                                         cfg.calibration.chunk_tokens, budget)
    input_bytes = n_tokens * d * (itemsize(inputs[0].dtype) if keep_stored else dtype.itemsize)
    resident = need <= budget
    if not resident:
        _check_streaming(cfg, layer, inputs, n_tokens, d, k, need, budget)
    stored_dtype = inputs[0].dtype
    chunk_tokens = cfg.calibration.chunk_tokens
    if resident and device.type == "cuda":
        # One device tensor per task, read once, and the solve's passes over large blocks of it: at
        # the store's chunk size a GPU iteration is hundreds of small kernels, bound by launch overhead.
        kept = getattr(torch, stored_dtype) if keep_stored else dtype
        inputs = [join_on_device(x, device, kept) for x in inputs]
        chunk_tokens = solve_block_tokens(n_tokens, d, k, dtype.itemsize,
                                          min(max(budget - need, 0), SOLVE_BLOCK_HEADROOM_BYTES), chunk_tokens)
    fam = layout.family(cfg)
    # a router with a bias (GPT-OSS) is fitted as [W | b] on inputs [x, 1]
    intercept = fam.router_intercept_key(layer) is not None
    if h.shared_expert_gate and not intercept:
        # the gate is fitted on the same inputs: read (and keep) them once for both solves
        inputs = [TokenChunks(x, dim=d, dtype=dtype, device=device, chunk_tokens=chunk_tokens,
                              cache_bytes=budget if resident else 0, keep_input_dtype=keep_stored) for x in inputs]
    init = merged_router(cfg, run_dir, layer).to(device=device, dtype=dtype)
    if cfg.mergeme is not None:
        # the harc settings as for HARC, no mixed precision
        settings = SolverSettings.from_config(h, cache_bytes=budget if resident else 0,
                                              chunk_tokens=cfg.calibration.chunk_tokens, keep_input_dtype=keep_stored)
        return _fit_to_domains(cfg, run_dir, layer, inputs, init, stats, settings, process_group, rank, t0,
                               {"inputs_bytes": int(input_bytes), "resident_bytes": int(need),
                                "inputs_resident": bool(resident)})
    sources = [source_router(cfg, t, layer).to(device=device, dtype=dtype) for t in tasks]
    settings = SolverSettings.from_config(h, inner_dtype=inner, cache_bytes=budget if resident else 0,
                                          chunk_tokens=chunk_tokens, keep_input_dtype=keep_stored,
                                          link=fam.router_link, intercept=intercept)
    logit_map = fam.router_logit_map(layout.reference_config(cfg))
    with Progress(h.max_iter, f"solve-router layer {layer} (CG iterations, max)") as bar:
        callback = (lambda it, rel: bar.update(1, f"residual {rel:.1e}")) if rank == 0 else None
        if logit_map is None:
            sol = solve_router(inputs, sources, init, settings, statistics=stats, process_group=process_group,
                               callback=callback)
        else:  # no closed-form curvature: the exact probabilities' Gauss-Newton system by autograd
            sol = _solve_generic(inputs, sources, init, settings, fam.router_link, logit_map, process_group,
                                 callback)
    gate = None
    if h.shared_expert_gate:
        # the router's settings, for a sigmoid gate without mixed precision or a bias column
        gate = _solve_shared_expert_gate(cfg, run_dir, layer, inputs, tasks, device, process_group, settings.replace(
            link="sigmoid", intercept=False, inner_dtype=None, chunk_tokens=cfg.calibration.chunk_tokens))
    where = f"solve-router layer {layer}"
    if not math.isfinite(float(sol.relative_residual)):
        raise InputDataError(f"the solve diverged (relative residual {sol.relative_residual})", where=where,
                             hint="check the statistics and harc.alpha / harc.dtype")
    require_finite(sol.weight, "the calibrated router", where)
    report = {
        "layer": layer,
        "tasks": tasks,
        "tokens": {t: int(s.num_tokens) for t, s in zip(tasks, stats)},
        "alpha": h.alpha,
        "hessian": h.hessian,
        "solver": h.solver,
        "preconditioner": sol.preconditioner,  # as used: harc.preconditioner auto resolved by the router's size
        "objective": h.objective,
        "link": fam.router_link,  # softmax router, or sigmoid gates (Bernoulli-KL objective)
        # the closed-form curvature of the link, or the generic one of link(map(z)) (a soft cap)
        "curvature": "closed form" if logit_map is None else "generic (autograd Gauss-Newton)",
        "inner_dtype": inner,
        # Experts the source router sends no calibration token of a task to: their rows are set by
        # the regularisation and the other tasks only.
        "unrouted_experts": {t: s.unrouted_experts() for t, s in zip(tasks, stats)},
        "inputs_bytes": int(input_bytes),
        "inputs_dtype": stored_dtype,
        "inputs_kept_as": stored_dtype if keep_stored else h.dtype,
        "device": str(device),
        "solve_chunk_tokens": int(chunk_tokens),  # tokens per operator pass step (GPU: joined blocks)
        "resident_bytes": int(need),
        "inputs_resident": bool(resident),
        "ranks": world,  # processes the tokens were sharded over (inputs_bytes, resident_bytes: per rank)
        "iterations": int(sol.iterations),
        "relative_residual": float(sol.relative_residual),
        "converged": bool(sol.converged),
        "kl_before": {t: float(v) for t, v in zip(tasks, sol.kl_before)},
        "kl_after": {t: float(v) for t, v in zip(tasks, sol.kl_after)},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if not sol.converged:
        # A non-converged solve is still the best iterate; the report says so and the run goes on.
        report["warning"] = f"CG did not reach tol {h.tol} in {h.max_iter} iterations"
    if gate is not None:
        report["shared_expert_gate"] = gate["report"]
    if rank == 0:
        weight, bias = (sol.weight[:, :-1], sol.weight[:, -1]) if intercept else (sol.weight, None)
        save_router(run_dir, layer, weight, report, bias=bias,
                    shared_expert_gate=None if gate is None else gate["weight"])
    return {k: report[k] for k in ("layer", "iterations", "relative_residual", "converged", "seconds")}


def _memory_budget(h, device, layer: int) -> int:
    """What a layer's resident inputs and per-token state may take: harc.memory_budget_gb (checked
    against what the scheduler grants or the device holds), else the device's free memory less 20 %."""
    if h.memory_budget_gb:
        # a budget over what the scheduler grants (cgroup, SLURM --mem) or the GPU holds: an error now
        from harc_hpc.models.modeling import check_memory_budget, device_memory_bounds

        budget = int(h.memory_budget_gb * 2**30)
        check_memory_budget("harc.memory_budget_gb", budget, device_memory_bounds(device), f"solve-router layer {layer}")
    else:
        budget = int(0.8 * free_memory_bytes(device))
    return budget


def _check_streaming(cfg: PipelineConfig, layer: int, inputs, n_tokens: int, d: int, k: int, need: int,
                     budget: int) -> None:
    """Inputs over the budget: an error naming what fits, unless harc.stream_inputs lets them be read
    from the store on every CG iteration (then a warning with the measured cost)."""
    h = cfg.harc
    tasks = cfg.task_names
    per_iteration = _streamed_seconds_per_pass(inputs)
    what = (f"the router inputs ({n_tokens} tokens x {d}) and the solve's per-token state need "
            f"{format_bytes(need)}, over the memory budget of {format_bytes(budget)}")
    # Streamed, the solve still holds every token's probabilities and one chunk of inputs.
    stream_need = streamed_bytes(n_tokens, d, k, h.dtype, cfg.calibration.chunk_tokens)
    can_stream = stream_need <= budget
    fits = int(budget / max(1, need) * n_tokens / len(tasks))
    options = [f"set harc.max_tokens <= {fits} (a seeded per-sequence subsample; the paper's results "
               f"plateau at ~40 % of the data)"] if fits >= 1 else []
    options.append("raise harc.memory_budget_gb")
    if not can_stream:
        chunk = min(cfg.calibration.chunk_tokens, n_tokens)
        raise InputDataError(
            f"{what}; it is too small even to stream them: one chunk of {chunk} tokens and the "
            f"probabilities of every token need {format_bytes(stream_need)}",
            where=f"solve-router layer {layer}",
            hint=", or ".join(options + ["lower calibration.chunk_tokens"]))
    if not h.stream_inputs:
        options.append(f"set harc.stream_inputs: true to read them from the store on every CG iteration "
                       f"(~{per_iteration:.1f} s per iteration measured here, up to {h.max_iter} iterations)")
        raise InputDataError(what, where=f"solve-router layer {layer}", hint=", or ".join(options))
    log.warning("solve-router layer %d: %s; harc.stream_inputs is set, so they are read from the store on "
                "every CG iteration: ~%.1f s per iteration measured, ~%.0f min for %d iterations (pcg "
                "typically needs a few hundred)", layer, what, per_iteration, per_iteration * 400 / 60, 400)


def _fit_to_domains(cfg, run_dir, layer, inputs, init, stats, settings, process_group, rank, t0, memory: dict) -> dict:
    """mergeme: the router that sends each source's calibration tokens to that source's expert
    (harc_hpc.math.targets; the harc settings as for HARC, no mixed precision)."""
    from harc_hpc.math.distributed import as_reducer
    from harc_hpc.math.solver import token_chunks
    from harc_hpc.math.targets import domain_targets, fit_router_to_targets, target_share
    from harc_hpc.mergeme.pipeline import expert_of_task

    h = cfg.harc
    tasks = cfg.task_names
    k, d = int(init.shape[0]), int(init.shape[1])
    experts = [expert_of_task(cfg)[t] for t in tasks]
    targets = domain_targets(k, experts, cfg.mergeme.smoothing)
    chunks = token_chunks(inputs, settings, init)  # read once: the fit and the expert shares
    where = f"solve-router layer {layer}"
    try:
        with Progress(h.max_iter, f"solve-router layer {layer} (CG iterations, max)") as bar:
            sol = fit_router_to_targets(
                chunks, targets, init, settings, statistics=stats, process_group=process_group,
                callback=(lambda it, rel: bar.update(1, f"residual {rel:.1e}")) if rank == 0 else None)
    except ValueError as exc:  # settings the domain fit does not take (e.g. kl with unsmoothed targets)
        from harc_hpc.errors import UsageError

        raise UsageError(str(exc), where=where, hint="see docs/mergeme.md (router fit)") from None
    if not math.isfinite(float(sol.relative_residual)):
        raise InputDataError(f"the fit diverged (relative residual {sol.relative_residual})", where=where,
                             hint="check harc.alpha / harc.dtype")
    require_finite(sol.weight, "the fitted router", where)
    reducer = as_reducer(process_group)
    top_k = layout.family(cfg).top_k(layout.reference_config(cfg))
    share = {}
    for name, w in (("built", init), ("fitted", sol.weight)):
        share[name] = {t: {"top1": target_share(c, e, w, 1, reducer), f"top{top_k}": target_share(c, e, w, top_k, reducer)}
                       for t, c, e in zip(tasks, chunks, experts)}
    report = {
        "layer": layer, "tasks": tasks, "target": "domain", "experts": dict(zip(tasks, experts)),
        "smoothing": cfg.mergeme.smoothing,
        "tokens": {t: int(s.num_tokens) for t, s in zip(tasks, stats)},
        "alpha": h.alpha, "hessian": h.hessian, "solver": sol.solver, "preconditioner": sol.preconditioner,
        "objective": h.objective, "iterations": int(sol.iterations), "newton_steps": int(sol.newton_steps),
        "relative_residual": float(sol.relative_residual), "converged": bool(sol.converged),
        # mean KL(q_task || softmax(W x)) on the task's calibration tokens
        "kl_before": {t: float(v) for t, v in zip(tasks, sol.kl_before)},
        "kl_after": {t: float(v) for t, v in zip(tasks, sol.kl_after)},
        "expert_share": share,
        "ranks": 1 if process_group is None else _world_size(process_group),
        **memory,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if not sol.converged:
        report["warning"] = f"the fit did not reach tol {h.tol} in {h.max_iter} iterations"
    if rank == 0:
        save_router(run_dir, layer, sol.weight, report)
    return {k: report[k] for k in ("layer", "iterations", "relative_residual", "converged", "seconds")}


def _world_size(process_group) -> int:
    import torch.distributed as dist

    return int(dist.get_world_size(process_group))


def _solve_shared_expert_gate(cfg, run_dir, layer, inputs, tasks, device, process_group, settings) -> dict:
    """harc.shared_expert_gate: the layer's sigmoid shared-expert gate (1, d) fitted like the router,
    from the same inputs, with the Bernoulli-KL quadratic model (link="sigmoid")."""
    from harc_hpc.errors import UsageError
    from harc_hpc.math import solve_router

    fam = layout.family(cfg)
    if fam.shared_expert_gate_key(layer) is None:
        raise UsageError(f"the {fam.name} family has no sigmoid shared-expert gate",
                         where="harc.shared_expert_gate", hint="set it to false (Qwen2-MoE has one)")
    dtype = settings.compute_dtype
    sources = [source_shared_expert_gate(cfg, t, layer).to(device=device, dtype=dtype) for t in tasks]
    init = merged_shared_expert_gate(cfg, run_dir, layer).to(device=device, dtype=dtype)
    sol = solve_router(inputs, sources, init, settings, process_group=process_group)
    require_finite(sol.weight, "the calibrated shared-expert gate", f"solve-router layer {layer}")
    return {"weight": sol.weight, "report": {
        "iterations": int(sol.iterations), "relative_residual": float(sol.relative_residual),
        "converged": bool(sol.converged),
        "kl_before": {t: float(v) for t, v in zip(tasks, sol.kl_before)},  # Bernoulli KL to the source gate
        "kl_after": {t: float(v) for t, v in zip(tasks, sol.kl_after)}}}


def _solve_generic(inputs, sources, init, settings, link: str, logit_map, process_group, callback):
    """The router fitted with the generic objective (harc_hpc.math.generic_objective) on the exact
    probabilities ``link(logit_map(W x))``, with the stage's solver settings."""
    from harc_hpc.math.generic_objective import solve_generic

    if link == "sigmoid":
        prob_fn, divergence = (lambda z: torch.sigmoid(logit_map(z))), "bernoulli"
    else:
        prob_fn, divergence = (lambda z: torch.softmax(logit_map(z), dim=-1)), "categorical"
    # harc.preconditioner auto resolved by the router's size (math.settings.resolve_preconditioner)
    settings = settings.replace(preconditioner=resolve_preconditioner(settings.preconditioner, *init.shape,
                                                                      settings.expert_block_min_size))
    if process_group is not None and settings.preconditioner == "expert-block":
        settings = settings.replace(preconditioner="jacobi")  # the generic expert-block one is single-process
    # no mixed precision: the generic curvature is exact only
    return solve_generic(inputs, sources, init, prob_fn, settings.replace(inner_dtype=None), divergence=divergence,
                         process_group=process_group, callback=callback)


def resident_bytes(tokens: int, d: int, k: int, stored: str, compute: str, inner: Optional[str],
                   chunk_tokens: int, keep_stored: bool = True) -> int:
    """Memory of a resident solve of one layer: the inputs (kept in their stored dtype when
    ``keep_stored`` and it is the narrower, plus one chunk widened to the compute dtype; else in the
    compute dtype), the per-token router probabilities (compute dtype) and, with ``inner`` (mixed
    precision), a 16-bit copy of the inputs unless they are kept in that dtype already, plus float32
    probabilities. ``harc-hpc plan`` uses it too."""
    narrow = keep_stored and itemsize(stored) < itemsize(compute)
    kept = itemsize(stored) if narrow else itemsize(compute)
    need = tokens * d * kept + tokens * k * itemsize(compute)
    if narrow:
        need += chunk_tokens * d * itemsize(compute)
    if inner:
        if not (narrow and stored == inner):
            need += tokens * d * itemsize(inner)
        need += tokens * k * 4
    return int(need)


def resolve_inner_dtype(setting: Optional[str], fast_16bit_gemms: bool) -> Optional[str]:
    """harc.inner_dtype as used: ``auto`` is bfloat16 where the solve device has fast 16-bit GEMMs."""
    if setting == "auto":
        return "bfloat16" if fast_16bit_gemms else None
    return setting


def _fast_16bit(device) -> bool:
    import torch

    return torch.cuda.get_device_capability(device)[0] >= 8


def streamed_bytes(tokens: int, d: int, k: int, compute: str, chunk_tokens: int) -> int:
    """Memory of a streamed solve of one layer: every token's probabilities and one chunk of inputs
    in the compute dtype (the least any solve of this layer needs)."""
    return int(tokens * k * itemsize(compute) + min(chunk_tokens, tokens) * d * itemsize(compute))


# What the joined blocks' temporaries (a block widened to the compute dtype, its logits and
# probabilities) may take on the device beyond the resident inputs.
SOLVE_BLOCK_HEADROOM_BYTES = 2 * 2**30


def join_on_device(x, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A task's stored inputs (a re-iterable of (n, d) chunks) as one (N, d) tensor on ``device`` in
    ``dtype``, filled chunk by chunk (no second host or device copy of the whole layer)."""
    out = None
    pos = 0
    total = len(x)
    for raw in x:
        c = torch.as_tensor(raw)
        if out is None:
            out = torch.empty(total, int(c.shape[1]), dtype=dtype, device=device)
        out[pos: pos + c.shape[0]].copy_(c)
        pos += int(c.shape[0])
    if out is None:
        return torch.empty(0, 0, dtype=dtype, device=device)
    if pos != total:
        raise RuntimeError(f"the router inputs gave {pos} rows, their store says {total}")
    return out


def solve_block_tokens(n_tokens: int, d: int, k: int, compute_itemsize: int, headroom_bytes: int,
                       floor: int) -> int:
    """Tokens per block of a resident device solve: as many as the headroom holds of one block's
    temporaries (its inputs in the compute dtype and a few (n, K) float64 arrays), a multiple of the
    store's chunk (``floor``, the least), and no more than the layer has."""
    per_token = d * compute_itemsize + 6 * k * 8
    block = max(floor, headroom_bytes // per_token // floor * floor)
    return int(max(1, min(block, max(n_tokens, 1))))


def choose_residency(tokens: int, d: int, k: int, stored: str, compute: str, inner: Optional[str],
                     chunk_tokens: int, budget: int) -> tuple[bool, int]:
    """(keep the inputs in their stored dtype?, resident bytes). Kept as stored when a mixed-precision
    solve computes in that very dtype (one copy serves both operators), or when a compute-dtype copy
    would not fit ``budget``; otherwise widened once, because widening every chunk on every CG
    iteration costs time (1.6x per iteration on a CPU, benchmarks/bench_scale.py). The answer is the
    same bit for bit either way."""
    wide = resident_bytes(tokens, d, k, stored, compute, inner, chunk_tokens, keep_stored=False)
    narrow = resident_bytes(tokens, d, k, stored, compute, inner, chunk_tokens, keep_stored=True)
    keep = narrow < wide and (inner == stored or wide > budget)
    return keep, (narrow if keep else wide)


def _streamed_seconds_per_pass(inputs) -> float:
    """Seconds one pass over the stored inputs takes (read, checksum, decode), timed on a chunk."""
    x = inputs[0]
    stop = min(x.num_stored, x.chunk_tokens)
    t0 = time.perf_counter()
    x.read(0, stop)
    per_row = (time.perf_counter() - t0) / max(1, stop)
    return per_row * sum(a.num_stored for a in inputs)
