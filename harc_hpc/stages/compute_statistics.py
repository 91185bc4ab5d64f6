"""compute-statistics: per (layer, task) sufficient statistics of the HARC system.

Token count, the diagonal of Sigma_i (the Jacobi preconditioner), Sigma_i w_i and how far the merged
router is from the source router on these inputs (KL, top-k mismatch). They do not depend on
``harc.alpha``, so changing alpha reuses them.
"""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path


import torch

from harc_hpc.io.activations import (
    RESIDUAL_KIND,
    ActivationArray,
    RouterInputsFromResidual,
    TokenStore,
    layer_name,
    stored_attr,
    stored_kind,
    token_subsample,
)
from harc_hpc.io.atomic import atomic_path
from harc_hpc.config import PipelineConfig
from harc_hpc.dtypes import torch_dtype
from harc_hpc.models.modeling import pick_device
from harc_hpc.io.statistics import save_statistics
from harc_hpc.errors import InputDataError, require_finite
from harc_hpc.stages import layout
from harc_hpc.stages.routers import merged_router, merged_router_bias, source_router, source_router_bias

log = logging.getLogger(__name__)


def layer_inputs(cfg: PipelineConfig, run_dir: Path, layer: int, task: str,
                 stored_dtype: bool = False) -> ActivationArray:
    """A layer's router inputs on one task, in ``harc.dtype`` (``stored_dtype``: as stored, e.g.
    bfloat16, for a solve that keeps them resident in that size); with ``harc.max_tokens`` a seeded,
    sequence-stratified subsample of them (the same rows for the statistics and the solve)."""
    block_list = layout.blocks(cfg)
    block = next(b for b, blk in enumerate(block_list) if layer in blk)
    store, name = layout.activation_store(run_dir, block), f"{layer_name(layer)}/{task}"
    out_dtype = None if stored_dtype else torch_dtype(cfg.harc.dtype)
    if stored_kind(store, name) == RESIDUAL_KIND:
        # A streamed capture stored the residual entering the layer's feed-forward half: the router
        # inputs are its post-attention norm, computed here by the model's own norm module.
        x = RouterInputsFromResidual(store, name, residual_norm(run_dir, store, name, layer,
                                                                   cfg.models.trust_remote_code),
                                     compute_dtype=getattr(torch, stored_attr(store, name, "compute_dtype")),
                                     selected=TokenStore(layout.token_store(run_dir, task)).selected,
                                     chunk_tokens=cfg.calibration.chunk_tokens, out_dtype=out_dtype)
    else:
        x = ActivationArray(store, name, chunk_tokens=cfg.calibration.chunk_tokens, out_dtype=out_dtype)
    seed = [cfg.run.seed, zlib.crc32(task.encode()), layer]
    if cfg.harc.max_tokens is not None:
        x.rows = token_subsample(x.offsets, cfg.harc.max_tokens, seed)
        if x.rows is None:
            log.info("layer %d, task %s: harc.max_tokens %d >= its %d tokens: all are used", layer, task,
                     cfg.harc.max_tokens, len(x))
    return x


def residual_norm(run_dir: Path, store: Path, name: str, layer: int,
                  trust_remote_code: bool = False) -> torch.nn.Module:
    """Layer ``layer``'s post-attention norm of the merged model, on the CPU in the dtype the
    capture computed in (the family's own module, so the op is the one the forward ran)."""
    from harc_hpc.models.onload import OnloadedModel

    dtype = getattr(torch, stored_attr(store, name, "compute_dtype"))
    model = OnloadedModel(layout.merged_dir(run_dir), torch.device("cpu"), dtype=dtype,
                          trust_remote_code=trust_remote_code)
    try:
        norm = model.family.router_input_norm(model.layer(layer))
        model.onload_module(layer, next(n for n, m in model.layer(layer).named_children() if m is norm))
    finally:
        model.close()
    return norm


def _first_bad_rows(x: ActivationArray) -> str:
    step, n = x.chunk_tokens, x.num_stored
    for start in range(0, n, step):
        chunk = x.read(start, min(n, start + step))
        if not bool(chunk.isfinite().all()):
            return f"the inputs in {x.store} ({x.name}) hold NaN/Inf in rows {start}:{start + chunk.shape[0]}"
    return f"the inputs in {x.store} ({x.name}) are finite (the values overflow {x.out_dtype})"


def run(cfg: PipelineConfig, run_dir: Path, layer: int, task: str) -> dict:
    from harc_hpc.math import compute_task_statistics

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    conf = layout.reference_config(cfg)
    fam = layout.family(cfg)
    dtype = torch_dtype(cfg.harc.dtype)
    # The passes run on the task's device (harc.device: its GPU when it has one), chunk by chunk as
    # the store is read; the statistics come back to the host to be written.
    device = pick_device(cfg.harc.device)
    x = layer_inputs(cfg, run_dir, layer, task)
    where = f"compute-statistics layer {layer}, task {task}"
    w_merged = merged_router(cfg, run_dir, layer).to(dtype)
    if cfg.mergeme is not None:
        # A MoE built from dense experts has no source routers: the domain fit's quadratic model is
        # taken at the built router, so its curvature there is what the solve needs.
        return _built_router_statistics(cfg, run_dir, layer, task, x, w_merged, fam.top_k(conf), t0, device)
    w_source = source_router(cfg, task, layer).to(dtype)
    require_finite(w_source, f"the router of source {task!r} ({layout.source_path(cfg, task)})", where)
    require_finite(w_merged, f"the merged router ({layout.merged_dir(run_dir)})", where)
    select = None
    if fam.router_bias_key(layer) is not None:  # the model's own (biased, grouped) selection rule
        b_source = source_router_bias(cfg, task, layer).to(device)
        b_merged = merged_router_bias(cfg, run_dir, layer).to(device)
        select = (lambda z: fam.selection_mask(conf, z, b_source), lambda z: fam.selection_mask(conf, z, b_merged))
    stats = compute_task_statistics(x, w_source, w_merged, hessian=cfg.harc.hessian, top_k=fam.top_k(conf),
                                     link=fam.router_link, select=select,
                                     intercept=fam.router_intercept_key(layer) is not None, device=device)
    stats = stats.to("cpu")
    if not stats.is_finite():
        raise InputDataError(f"the statistics came out NaN/Inf; {_first_bad_rows(x)}", where=where,
                             hint="rerun capture-activations for this block")
    if stats.unrouted_experts():
        log.warning("layer %d, task %s: the source router sends no calibration token to expert(s) %s",
                    layer, task, stats.unrouted_experts())
    with atomic_path(layout.statistics_file(run_dir, layer, task)) as tmp:
        save_statistics(stats, tmp)
    return {
        "layer": layer,
        "task": task,
        "device": str(device),
        "tokens": int(stats.num_tokens),
        "kl_merged": float(stats.kl),
        "topk_mismatch_merged": None if stats.topk_mismatch is None else float(stats.topk_mismatch),
        "unrouted_experts": stats.unrouted_experts(),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _built_router_statistics(cfg: PipelineConfig, run_dir: Path, layer: int, task: str, x, w_built, top_k: int,
                             t0: float, device: torch.device) -> dict:
    """mergeme: the statistics at the built router W0 (as its own source: diag(Sigma_i), Sigma_i W0),
    and how the built router routes this domain: KL to the target and the share of tokens sent to
    the domain's expert."""
    from harc_hpc.math import compute_task_statistics
    from harc_hpc.math.inputs import TokenChunks
    from harc_hpc.math.targets import domain_targets, target_kl, target_share
    from harc_hpc.mergeme.pipeline import expert_of_task

    where = f"compute-statistics layer {layer}, task {task}"
    require_finite(w_built, f"the built router ({layout.merged_dir(run_dir)})", where)
    stats = compute_task_statistics(x, w_built, w_built, hessian=cfg.harc.hessian,
                                    chunk_tokens=cfg.calibration.chunk_tokens, device=device).to("cpu")
    if not stats.is_finite():
        raise InputDataError(f"the statistics came out NaN/Inf; {_first_bad_rows(x)}", where=where,
                             hint="rerun capture-activations for this block")
    with atomic_path(layout.statistics_file(run_dir, layer, task)) as tmp:
        save_statistics(stats, tmp)
    expert = expert_of_task(cfg)[task]
    chunks = TokenChunks(x, dim=int(w_built.shape[1]), chunk_tokens=cfg.calibration.chunk_tokens)
    q = domain_targets(int(w_built.shape[0]), [expert], cfg.mergeme.smoothing)[0]
    return {
        "layer": layer,
        "task": task,
        "tokens": int(stats.num_tokens),
        "expert": expert,
        "target_kl_built": target_kl(chunks, q, w_built),
        "expert_share_top1_built": target_share(chunks, expert, w_built, 1),
        f"expert_share_top{top_k}_built": target_share(chunks, expert, w_built, top_k),
        "seconds": round(time.perf_counter() - t0, 3),
    }
