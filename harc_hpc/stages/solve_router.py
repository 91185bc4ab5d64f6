"""solve-router: the calibrated router of one layer, from the statistics and streamed inputs."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path


from harc_hpc.config import PipelineConfig
from harc_hpc.dtypes import torch_dtype
from harc_hpc.io.statistics import load_statistics
from harc_hpc.errors import InputDataError, format_bytes, require_finite
from harc_hpc.models.modeling import free_memory_bytes, pick_device
from harc_hpc.progress import Progress
from harc_hpc.stages import layout
from harc_hpc.stages.compute_statistics import layer_inputs
from harc_hpc.stages.routers import merged_router, save_router, source_router


log = logging.getLogger(__name__)


def run(cfg: PipelineConfig, run_dir: Path, layer: int) -> dict:
    from harc_hpc.math import solve_router

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
    inputs = [layer_inputs(cfg, run_dir, layer, t) for t in tasks]
    # Resident inputs cost one read of the store; streamed ones a read and decode per CG iteration.
    input_bytes = sum(len(x) * x.shape[1] for x in inputs) * dtype.itemsize
    budget = int(h.memory_budget_gb * 2**30) if h.memory_budget_gb else int(0.8 * free_memory_bytes(device))
    resident = input_bytes <= budget
    if not resident:
        log.warning("solve-router layer %d: the inputs (%s as %s) exceed the memory budget (%s): they are "
                    "streamed from the store on every CG iteration, which is far slower; raise "
                    "harc.memory_budget_gb or use a device with more memory", layer, format_bytes(input_bytes),
                    h.dtype, format_bytes(budget))
    sources = [source_router(cfg, t, layer).to(device=device, dtype=dtype) for t in tasks]
    init = merged_router(cfg, run_dir, layer).to(device=device, dtype=dtype)
    with Progress(h.max_iter, f"solve-router layer {layer} (CG iterations, max)") as bar:
        sol = solve_router(
            inputs, sources, init,
            alpha=h.alpha, hessian=h.hessian, solver=h.solver, objective=h.objective,
            preconditioner=h.preconditioner, tol=h.tol, max_iter=h.max_iter, statistics=stats,
            callback=lambda it, rel: bar.update(1, f"residual {rel:.1e}"),
            inner_dtype=torch_dtype(h.inner_dtype), cache_bytes=budget,
        )
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
        "preconditioner": h.preconditioner,
        "objective": h.objective,
        "inner_dtype": h.inner_dtype,
        # Experts the source router sends no calibration token of a task to: their rows are set by
        # the regularisation and the other tasks only.
        "unrouted_experts": {t: s.unrouted_experts() for t, s in zip(tasks, stats)},
        "inputs_bytes": int(input_bytes),
        "inputs_resident": bool(resident),
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
    save_router(run_dir, layer, sol.weight, report)
    return {k: report[k] for k in ("layer", "iterations", "relative_residual", "converged", "seconds")}
