"""router-distill: the routers of one layer trained, with Adam, on the router-level KL that HARC
minimises in closed form (docs/training.md).

For task i with router inputs x (the rows HARC's solve of this layer reads, ``harc.max_tokens``
subsample included) and source router W_i the loss is

    L(W) = sum_i mean_{x in task i} KL(softmax(W_i x) || softmax(W x))

(sigmoid gates: the per-expert Bernoulli KLs summed; a router with a bias is trained as [W | b] on
[x, 1]). Its gradient is sum_i mean_x (softmax(W x) - softmax(W_i x)) x^T (``sigmoid`` for sigmoid
gates), computed here in closed form (``router_kl_and_grad``; tests check it against autograd and
finite differences). Every task's sequences are split, seeded, into a training and a held-out part
(``router_distill.validation_fraction``); each step takes ``batch_tokens`` seeded training tokens
of every task, and training stops when the held-out KL has not improved for ``patience``
measurements, keeping the best routers. One task trains every start the config names (``merged``:
the merged router, ``harc``: HARC's calibrated router) and writes them, with a report that puts the
closed form's KL beside the trained ones, to ``router-distill/layer-NNN.{safetensors,json}``; the
``router-distill-model`` task writes one model directory per start.

Memory is one layer's inputs, as for the solve: every task's rows and the source logits, resident.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from harc_hpc.config import PipelineConfig
from harc_hpc.errors import InputDataError, UsageError
from harc_hpc.progress import Progress
from harc_hpc.stages import layout

log = logging.getLogger(__name__)

STARTS = ("merged", "harc")
#: the display names of the models router-distill-model writes, by start
MODEL_NAMES = {"merged": "router-distill", "harc": "harc+router-distill"}


def enabled(cfg: PipelineConfig) -> bool:
    """The stage specs' ``enabled_if``: planned only when ``router_distill.enabled``."""
    return bool(cfg.router_distill.enabled)


# -- paths --------------------------------------------------------------------------------------------

def distill_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "router-distill"


def distilled_file(run_dir: Path, layer: int) -> Path:
    return distill_dir(run_dir) / f"layer-{layer:03d}.safetensors"


def distilled_report(run_dir: Path, layer: int) -> Path:
    return distill_dir(run_dir) / f"layer-{layer:03d}.json"


def models_dir(run_dir: Path) -> Path:
    """router-distill-model's output: one model directory per start (``<start>/``) and summary.json."""
    return distill_dir(run_dir) / "models"


# -- the loss and its gradient ------------------------------------------------------------------------

def router_kl_and_grad(w: torch.Tensor, x: torch.Tensor, z_ref: torch.Tensor, link: str = "softmax",
                       grad: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Mean over the rows of ``x`` (n, d) of KL(gate(z_ref) || gate(x w^T)) and its gradient with
    respect to ``w`` (K, d); ``z_ref`` (n, K) are the reference router's logits. ``link``: softmax
    (categorical KL over experts) or sigmoid (per-expert Bernoulli KLs, summed). The KL is computed
    from log-probabilities (xlogy for p log p), so experts a router never picks add 0, not NaN.
    Returns (loss as a 0-d tensor, gradient or None)."""
    n = x.shape[0]
    if n == 0:
        return torch.zeros((), dtype=w.dtype, device=w.device), (torch.zeros_like(w) if grad else None)
    z = x @ w.T
    if link == "sigmoid":
        p, q = torch.sigmoid(z_ref), torch.sigmoid(z)
        ls = torch.nn.functional.logsigmoid
        loss = (p * (ls(z_ref) - ls(z)) + (1 - p) * (ls(-z_ref) - ls(-z))).sum() / n
    elif link == "softmax":
        log_p, log_q = torch.log_softmax(z_ref, -1), torch.log_softmax(z, -1)
        p = log_p.exp()
        loss = (torch.xlogy(p, p) - p * log_q).sum() / n
        q = log_q.exp()
    else:
        raise ValueError(f"unknown router link {link!r}")
    if not grad:
        return loss, None
    return loss, ((q - p) / n).T @ x


def mean_router_kl(w: torch.Tensor, x: torch.Tensor, z_ref: torch.Tensor, link: str = "softmax",
                   chunk: int = 65536) -> float:
    """``router_kl_and_grad``'s loss over all rows, chunk by chunk (bounded temporaries), float."""
    n = x.shape[0]
    if n == 0:
        return float("nan")
    total = 0.0
    for s in range(0, n, chunk):
        loss, _ = router_kl_and_grad(w, x[s: s + chunk], z_ref[s: s + chunk], link, grad=False)
        total += float(loss) * min(chunk, n - s)
    return total / n


@dataclass
class TaskData:
    """One task's training and held-out rows: inputs (n, d) and the source router's logits (n, K)."""

    x_train: torch.Tensor
    z_train: torch.Tensor
    x_val: torch.Tensor
    z_val: torch.Tensor


@dataclass
class DistillResult:
    weight: torch.Tensor  # the best router (lowest held-out KL measured)
    best_step: int
    steps: int  # steps taken
    stopped: str  # "early" (patience ran out) or "max_steps"
    curve: list = field(default_factory=list)  # [step, held-out KL] at every measurement
    seconds: float = 0.0


def heldout_kl(w: torch.Tensor, data: list[TaskData], link: str) -> float:
    """sum over tasks of the mean held-out KL (the training rows when a task holds none out)."""
    return sum(mean_router_kl(w, d.x_val, d.z_val, link) if len(d.x_val) else
               mean_router_kl(w, d.x_train, d.z_train, link) for d in data)


def train_kl(w: torch.Tensor, data: list[TaskData], link: str) -> float:
    return sum(mean_router_kl(w, d.x_train, d.z_train, link) for d in data)


def distill_router(data: list[TaskData], init: torch.Tensor, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 0.0, max_steps: int = 1000, batch_tokens: int = 4096,
                   eval_every: int = 20, patience: int = 5, min_improvement: float = 1e-4, seed: int = 0,
                   link: str = "softmax", where: str = "router-distill",
                   callback: Optional[Callable[[int, float], None]] = None) -> DistillResult:
    """Adam on ``sum_i mean KL`` from ``init``, early-stopped on the held-out KL (measured at step 0,
    every ``eval_every`` steps and at the last step): stops after ``patience`` measurements without
    a relative improvement of ``min_improvement`` over the best, which it returns. Each step draws
    ``batch_tokens`` training rows of every task (all of them when a task has fewer) with a
    generator seeded by ``seed``: the same inputs and settings give the same bits on one machine.
    A loss that is not finite stops it with an InputDataError naming the step."""
    t0 = time.perf_counter()
    w = torch.nn.Parameter(init.detach().clone())
    opt = torch.optim.Adam([w], lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=False)
    gen = torch.Generator().manual_seed(int(seed))
    best = heldout_kl(w.detach(), data, link)
    if not math.isfinite(best):
        raise InputDataError(f"the held-out KL of the starting router is {best}", where=where,
                             hint="check the router inputs and the routers")
    best_w, best_step, bad = w.detach().clone(), 0, 0
    curve = [[0, best]]
    stopped, step = "max_steps", 0
    for step in range(1, max_steps + 1):
        total, g_total = None, None
        for d in data:
            n = d.x_train.shape[0]
            if n > batch_tokens:
                idx = torch.randperm(n, generator=gen)[:batch_tokens].sort().values.to(d.x_train.device)
                xb, zb = d.x_train[idx], d.z_train[idx]
            else:
                xb, zb = d.x_train, d.z_train
            loss, g = router_kl_and_grad(w.detach(), xb, zb, link)
            total = loss if total is None else total + loss
            g_total = g if g_total is None else g_total + g
        if not bool(torch.isfinite(total)) or not bool(torch.isfinite(g_total).all()):
            raise InputDataError(f"the training loss is {float(total)} at step {step} (the best routers so far, "
                                 f"from step {best_step}, are not written)", where=where,
                                 hint="lower router_distill.lr")
        w.grad = g_total
        opt.step()
        if step % eval_every == 0 or step == max_steps:
            val = heldout_kl(w.detach(), data, link)
            if not math.isfinite(val):
                raise InputDataError(f"the held-out KL is {val} at step {step}", where=where,
                                     hint="lower router_distill.lr")
            curve.append([step, val])
            if callback is not None:
                callback(step, val)
            if val < best * (1.0 - min_improvement):
                best, best_w, best_step, bad = val, w.detach().clone(), step, 0
            else:
                bad += 1
                if bad >= patience:
                    stopped = "early"
                    break
    return DistillResult(best_w, best_step, step, stopped, curve, round(time.perf_counter() - t0, 3))


def steps_to_reach(curve: list, target: float) -> Optional[int]:
    """The first measured step whose held-out KL is <= ``target`` (None: never reached)."""
    for step, val in curve:
        if val <= target:
            return int(step)
    return None


# -- data ---------------------------------------------------------------------------------------------

def heldout_sequences(num_sequences: int, fraction: float, seed: list[int]) -> np.ndarray:
    """The sequences held out for early stopping: a seeded ``fraction`` of them (at least one when
    ``fraction`` > 0), sorted."""
    if fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    k = max(1, int(round(fraction * num_sequences)))
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(num_sequences)[:k]).astype(np.int64)


def split_rows(offsets: np.ndarray, rows: Optional[np.ndarray], heldout: np.ndarray) -> np.ndarray:
    """Per loaded row (``rows`` of the store, all of them when None), whether its sequence is held out."""
    offsets = np.asarray(offsets, dtype=np.int64)
    rows = np.arange(int(offsets[-1]), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    seq = np.searchsorted(offsets, rows, side="right") - 1
    return np.isin(seq, heldout)


def load_task_data(cfg: PipelineConfig, run_dir: Path, layer: int, task: str, w_source: torch.Tensor,
                   device: torch.device, dtype: torch.dtype, intercept: bool) -> TaskData:
    from harc_hpc.stages.compute_statistics import layer_inputs
    from harc_hpc.stages.solve_router import join_on_device

    rd = cfg.router_distill
    where = f"router-distill layer {layer}, task {task}"
    x = layer_inputs(cfg, run_dir, layer, task, stored_dtype=True)
    num_seq = len(x.offsets) - 1
    if rd.validation_fraction > 0 and num_seq < 2:
        raise InputDataError(f"{num_seq} calibration sequence(s): too few to hold one out for early stopping",
                             where=where, hint="add calibration data, or set router_distill.validation_fraction: 0")
    held = heldout_sequences(num_seq, rd.validation_fraction, [cfg.run.seed, zlib.crc32(task.encode()), layer])
    if len(held) >= num_seq:
        raise InputDataError(f"router_distill.validation_fraction {rd.validation_fraction} holds out all "
                             f"{num_seq} sequences", where=where, hint="lower router_distill.validation_fraction")
    is_val = torch.from_numpy(split_rows(x.offsets, x.rows, held)).to(device)
    xs = join_on_device(x, device, dtype)
    if xs.shape[0] == 0:
        raise InputDataError("no router inputs (the calibration data of this task selected no token)", where=where)
    if intercept:
        xs = torch.cat([xs, torch.ones(xs.shape[0], 1, dtype=dtype, device=device)], dim=1)
    if not bool(torch.isfinite(xs).all()):
        raise InputDataError("the router inputs hold NaN/Inf", where=where, hint="rerun capture-activations")
    z = xs @ w_source.to(device=device, dtype=dtype).T
    x_train, z_train = xs[~is_val], z[~is_val]
    if x_train.shape[0] == 0:
        raise InputDataError("every router input is held out: no training tokens", where=where,
                             hint="lower router_distill.validation_fraction")
    return TaskData(x_train, z_train, xs[is_val], z[is_val])


def harc_router(cfg: PipelineConfig, run_dir: Path, layer: int, intercept: bool) -> torch.Tensor:
    """HARC's calibrated router of ``layer`` as trained here: (K, d), or [W | b] with a bias."""
    from harc_hpc.stages.routers import load_router, load_router_bias

    w = load_router(run_dir, layer)
    if intercept:
        w = torch.cat([w, load_router_bias(run_dir, layer).to(w.dtype)[:, None]], dim=1)
    return w


# -- the stage ----------------------------------------------------------------------------------------

def run(cfg: PipelineConfig, run_dir: Path, layer: int) -> dict:
    from safetensors.torch import save_file

    from harc_hpc.io.atomic import atomic_path, json_text
    from harc_hpc.models.modeling import pick_device
    from harc_hpc.stages.routers import merged_router, source_router

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    rd = cfg.router_distill
    if cfg.mergeme is not None:
        raise UsageError("a MergeME build has no source routers to distil", where="router_distill.enabled",
                         hint="set it to false")
    tasks = cfg.task_names
    fam = layout.family(cfg)
    intercept = fam.router_intercept_key(layer) is not None
    link = fam.router_link
    device = pick_device(cfg.harc.device)
    dtype = getattr(torch, rd.dtype)
    data = [load_task_data(cfg, run_dir, layer, t, source_router(cfg, t, layer), device, dtype, intercept)
            for t in tasks]
    starts = {"merged": merged_router(cfg, run_dir, layer)}
    harc = harc_router(cfg, run_dir, layer, intercept)
    starts["harc"] = harc
    closed = {name: {"train_kl": train_kl(w.to(device, dtype), data, link),
                     "heldout_kl": heldout_kl(w.to(device, dtype), data, link),
                     "heldout_kl_per_task": {t: mean_router_kl(w.to(device, dtype), d.x_val, d.z_val, link)
                                             if len(d.x_val) else None for t, d in zip(tasks, data)}}
              for name, w in starts.items()}
    harc_seconds = _solve_seconds(run_dir, layer)
    trained, tensors = {}, {}
    for s_i, start in enumerate(rd.starts):
        where = f"router-distill layer {layer}, start {start}"
        init = starts[start].to(device=device, dtype=dtype)
        with Progress(rd.max_steps, f"{where} (Adam steps, max)") as bar:
            res = distill_router(
                data, init, lr=rd.lr, betas=rd.betas, eps=rd.eps, weight_decay=rd.weight_decay,
                max_steps=rd.max_steps, batch_tokens=rd.batch_tokens, eval_every=rd.eval_every,
                patience=rd.patience, min_improvement=rd.min_improvement,
                seed=zlib.crc32(f"{cfg.run.seed}/{layer}/{start}".encode()), link=link, where=where,
                callback=lambda step, val: bar.update(rd.eval_every, f"held-out KL {val:.4g}"))
        w = res.weight.to(torch.float32).cpu()
        if intercept:
            tensors[f"{start}.weight"], tensors[f"{start}.bias"] = w[:, :-1].contiguous(), w[:, -1].contiguous()
        else:
            tensors[f"{start}.weight"] = w.contiguous()
        trained[start] = {
            "steps": res.steps, "best_step": res.best_step, "stopped": res.stopped, "seconds": res.seconds,
            "train_kl": train_kl(res.weight, data, link), "heldout_kl": heldout_kl(res.weight, data, link),
            "heldout_kl_per_task": {t: mean_router_kl(res.weight, d.x_val, d.z_val, link) if len(d.x_val) else None
                                    for t, d in zip(tasks, data)},
            # the first measured step at which training matched the closed form on held-out tokens
            "steps_to_harc_heldout_kl": steps_to_reach(res.curve, closed["harc"]["heldout_kl"]),
            "curve": res.curve,
        }
        log.info("%s: held-out KL %.5g -> %.5g in %d steps (%s; HARC %.5g), %.1fs", where, res.curve[0][1],
                 trained[start]["heldout_kl"], res.steps, res.stopped, closed["harc"]["heldout_kl"], res.seconds)
    report = {
        "layer": layer, "tasks": tasks, "link": link, "device": str(device), "dtype": rd.dtype,
        "tokens": {t: {"train": int(d.x_train.shape[0]), "heldout": int(d.x_val.shape[0])} for t, d in zip(tasks, data)},
        "settings": rd.model_dump(mode="json", exclude={"enabled"}),
        # the closed forms on the same rows: the merged router (no repair) and HARC's solve
        "closed_form": closed,
        "harc_solve_seconds": harc_seconds,
        "trained": trained,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    with atomic_path(distilled_file(run_dir, layer)) as tmp:
        # no metadata: safetensors writes a metadata map in a random order (same tensors, other bytes)
        save_file(tensors, str(tmp))
    with atomic_path(distilled_report(run_dir, layer)) as tmp:
        tmp.write_text(json_text(report))
    return {"layer": layer, "seconds": report["seconds"],
            **{f"heldout_kl_{s}": v["heldout_kl"] for s, v in trained.items()},
            "heldout_kl_harc": closed["harc"]["heldout_kl"]}


def _solve_seconds(run_dir: Path, layer: int) -> Optional[float]:
    """What HARC's solve of this layer took (its router report), for the comparison."""
    import json

    path = layout.router_report(run_dir, layer)
    try:
        return json.loads(path.read_text()).get("seconds")
    except (OSError, ValueError):
        return None


# -- router-distill-model -----------------------------------------------------------------------------

def load_distilled(run_dir: Path, layer: int, start: str) -> dict[str, torch.Tensor]:
    """{"weight": ..., ["bias": ...]} of one start's trained router of ``layer``."""
    from safetensors.torch import load_file

    path = distilled_file(run_dir, layer)
    if not path.is_file():
        raise InputDataError(f"{path}: the trained routers of layer {layer} are missing", where="router-distill-model",
                             hint="run router-distill first")
    t = load_file(str(path))
    if f"{start}.weight" not in t:
        raise InputDataError(f"{path} holds no routers trained from start {start!r}", where="router-distill-model",
                             hint="rerun router-distill (router_distill.starts changed?)")
    out = {"weight": t[f"{start}.weight"]}
    if f"{start}.bias" in t:
        out["bias"] = t[f"{start}.bias"]
    return out


def assemble(cfg: PipelineConfig, run_dir: Path) -> dict:
    """router-distill-model: per start, a normal model directory: the merged checkpoint (start
    ``merged``) or HARC's assembled model (start ``harc``: its calibrated shared-expert gates stay)
    with every layer's trained router written in; plus summary.json of the layers' reports."""
    import json

    from harc_hpc.io.atomic import atomic_dir, json_text
    from harc_hpc.io.checkpoint import Checkpoint
    from harc_hpc.io.checkpoint_writer import patch_tensors

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    fam = layout.family(cfg)
    layers = layout.moe_layers(cfg)
    summary = {"starts": list(cfg.router_distill.starts), "layers": layers, "reports": []}
    with atomic_dir(models_dir(run_dir)) as tmp:
        for start in cfg.router_distill.starts:
            src = layout.merged_dir(run_dir) if start == "merged" else layout.model_dir(run_dir)
            ckpt = Checkpoint(src)
            replacements = {}
            for l in layers:
                trained = load_distilled(run_dir, l, start)
                key = fam.find_router_disk_key(l, ckpt.keys())
                replacements[key] = trained["weight"].to(ckpt.tensor_dtype(key))
                bias_key = fam.router_intercept_key(l)
                if bias_key is not None:
                    replacements[bias_key] = trained["bias"].to(ckpt.tensor_dtype(bias_key))
            ckpt.close()
            patch_tensors(src, tmp / start, replacements, max_shard_size=cfg.merge.max_shard_size)
        for l in layers:
            rep = distilled_report(run_dir, l)
            summary["reports"].append(json.loads(rep.read_text()) if rep.is_file() else {"layer": l})
        (tmp / "summary.json").write_text(json_text(summary))
    return {"starts": list(cfg.router_distill.starts), "layers": len(layers),
            "seconds": round(time.perf_counter() - t0, 3)}
