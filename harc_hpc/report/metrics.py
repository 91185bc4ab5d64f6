"""report: how far the merged and the calibrated model route from the sources, and what it costs.

Two views of routing, per MoE layer and task i, against source i's router W_i:

* router-level: x = the evaluated model's own router inputs on task-i text; compare softmax(W_i x)
  with softmax(W x). This is exactly what HARC minimises (paper, Fig. 4a).
* end-to-end: source i's routing on its own hidden states vs the evaluated model's routing on its
  own hidden states, same tokens: how many expert selections deviate in practice.

Plus held-out cross-entropy (nats/token, computed here: ``out.loss`` would include the aux loss)
of every source, the merged, the calibrated model, the base when given, and the router-swap oracle
(the merged model with source i's routers on task i: what a router that reproduced W_i exactly
would reach). Solve statistics, stage timings and a manifest (versions, git revision, digests)
complete ``report/metrics.json``; ``report.md`` and PNG plots present them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from harc_hpc.config import PipelineConfig
from harc_hpc.errors import RunStateError
from harc_hpc.math.metrics import kl_sum, topk_common
from harc_hpc.report.render import layer_means
from harc_hpc.report.render import mean_of as _mean

log = logging.getLogger(__name__)

METRICS_VERSION = 1


class ReportError(RunStateError):
    """The report cannot be made as configured (the message says why and what to do)."""


# -- routing metrics on router logits ---------------------------------------------------------------

def routing_divergence(ref_logits: torch.Tensor, logits: torch.Tensor, top_k: int,
                       chunk: int = 65536) -> tuple[float, float]:
    """Mean KL(softmax(ref) || softmax(logits)) and mean top-k mismatch 1 - |S_ref ∩ S|/k over rows."""
    n = ref_logits.shape[0]
    if n == 0:
        return float("nan"), float("nan")
    kl_total, missed = 0.0, 0
    for start in range(0, n, chunk):
        a = ref_logits[start : start + chunk].double()
        b = logits[start : start + chunk].double()
        kl_total += kl_sum(torch.log_softmax(a, -1), torch.log_softmax(b, -1))
        missed += a.shape[0] * top_k - topk_common(a, b, top_k)
    return kl_total / n, missed / (top_k * n)


def selection_differs(ref_logits: torch.Tensor, logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per row: whether the top-k expert sets differ (a deviating routing decision)."""
    sa = ref_logits.topk(top_k, -1).indices.sort(-1).values
    sb = logits.topk(top_k, -1).indices.sort(-1).values
    return (sa != sb).any(-1)


def token_deviation(ref: dict[int, torch.Tensor], own: dict[int, torch.Tensor], layers: list[int],
                    top_k: int) -> dict:
    """The paper's per-token view (Sec. 1): the share of tokens with at least one deviating layer
    and the mean number of layers whose expert set deviates, per token."""
    counts = None
    for l in layers:
        d = selection_differs(ref[l], own[l], top_k).to(torch.int32)
        counts = d if counts is None else counts + d
    if counts is None or counts.numel() == 0:
        return {"tokens_with_deviation": float("nan"), "deviating_layers_per_token": float("nan")}
    return {"tokens_with_deviation": float((counts > 0).double().mean()),
            "deviating_layers_per_token": float(counts.double().mean())}


# -- evaluation -------------------------------------------------------------------------------------

@dataclass
class TaskEval:
    """One model on one task's held-out text."""

    nll: float = 0.0
    tokens: int = 0
    own_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # router logits under the model's W
    ref_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # same inputs x under W_ref

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")


@torch.no_grad()
def evaluate(model, fam, layers: list[int], seqs: list[list[int]], batch_size: int,
             ref_routers: Optional[dict[int, torch.Tensor]] = None, keep_routing: bool = True) -> TaskEval:
    """Held-out loss and (optionally) per-layer router logits of real tokens, in sequence order."""
    from harc_hpc.models.modeling import pad_batch

    device = next(model.parameters()).device
    result = TaskEval()
    parts: dict[int, list] = {l: [] for l in layers}
    ref_parts: dict[int, list] = {l: [] for l in layers}
    keep: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(layer: int, weight: torch.Tensor):
        ref = None if ref_routers is None else ref_routers[layer].to(device=device, dtype=torch.float32)

        def hook(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])[keep["mask"]].float()
            parts[layer].append(torch.nn.functional.linear(x, weight.float()).cpu())
            if ref is not None:
                ref_parts[layer].append(torch.nn.functional.linear(x, ref).cpu())

        return hook

    if keep_routing:
        for l in layers:
            module = fam.router_module(model, l)
            handles.append(module.register_forward_hook(hook_for(l, module.weight)))
    try:
        for start in range(0, len(seqs), batch_size):
            batch = [torch.tensor(s, dtype=torch.long) for s in seqs[start : start + batch_size]]
            ids, lengths = pad_batch(batch, pad_value=0)
            mask = torch.zeros(ids.shape, dtype=torch.bool)
            for i, n in enumerate(lengths):
                mask[i, :n] = True
            keep["mask"] = mask.reshape(-1).to(device)
            ids = ids.to(device)
            logits = model(input_ids=ids).logits
            # Next-token loss over real tokens only (right padding: pads come after every real
            # token), one sequence at a time: a float32 copy of a whole batch's logits can be GBs.
            for i, n in enumerate(lengths):
                if n < 2:
                    continue
                nll = torch.nn.functional.cross_entropy(logits[i, : n - 1].float(), ids[i, 1:n], reduction="sum")
                result.nll += float(nll)
                result.tokens += n - 1
            del logits
    finally:
        for h in handles:
            h.remove()
    for l in layers:
        if parts[l]:
            result.own_logits[l] = torch.cat(parts[l])
        if ref_parts[l]:
            result.ref_logits[l] = torch.cat(ref_parts[l])
    return result


def _router_weights(model, fam, layers) -> dict[int, torch.Tensor]:
    return {l: fam.router_module(model, l).weight.detach().float().cpu().clone() for l in layers}


def _set_routers(model, fam, weights: dict[int, torch.Tensor]) -> None:
    for l, w in weights.items():
        module = fam.router_module(model, l)
        with torch.no_grad():
            module.weight.copy_(w.to(device=module.weight.device, dtype=module.weight.dtype))


# -- the metrics ------------------------------------------------------------------------------------

def _heldout_tasks(cfg: PipelineConfig) -> list[str]:
    return [s.name for s in cfg.models.sources if s.heldout is not None and s.heldout.files]


def _tokenized_heldout(cfg: PipelineConfig, tokenizer) -> dict[str, list[list[int]]]:
    from harc_hpc.io.calibration_data import tokenize_task

    return {s.name: tokenize_task(s.heldout, cfg.calibration, tokenizer)
            for s in cfg.models.sources if s.heldout is not None and s.heldout.files}


def model_metrics(cfg: PipelineConfig, run_dir: Path) -> dict:
    """Held-out losses and routing divergences of sources, base, merged, calibrated and oracle."""
    from transformers import AutoTokenizer

    from harc_hpc.io.checkpoint import resolve_model_path
    from harc_hpc.models.families import family_for_config
    from harc_hpc.models.modeling import load_causal_lm, pick_device
    from harc_hpc.stages import layout

    run_dir = Path(run_dir)
    merged_dir, model_dir = layout.merged_dir(run_dir), layout.model_dir(run_dir)
    for d, stage in ((merged_dir, "merge-experts"), (model_dir, "assemble-model")):
        if not (d / "config.json").is_file():
            raise ReportError(f"{d}: no checkpoint here (run {stage} first)")
    conf = json.loads((merged_dir / "config.json").read_text())
    fam = family_for_config(conf)
    layers = list(fam.moe_layers(conf))
    top_k = fam.top_k(conf)
    device = pick_device(cfg.harc.device)
    batch_size = cfg.calibration.batch_size
    trust = cfg.models.trust_remote_code

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir), trust_remote_code=trust)
    heldout = _tokenized_heldout(cfg, tokenizer)
    tasks = list(heldout)
    out: dict = {"tasks": tasks, "layers": layers, "top_k": top_k, "family": fam.name,
                 "heldout_tokens": {t: sum(max(0, len(s) - 1) for s in heldout[t]) for t in tasks},
                 "loss": {t: {} for t in tasks}}
    if not tasks:
        out["note"] = "no task has held-out data (models.sources[*].heldout): no losses or routing metrics"
        return out

    def load(path):
        return load_causal_lm(path, device, trust_remote_code=trust)

    # Sources: losses on every task (forgetting shows), routing of source i on task i (e2e reference).
    source_routers: dict[str, dict[int, torch.Tensor]] = {}
    source_routing: dict[str, dict[int, torch.Tensor]] = {}
    for src in cfg.models.sources:
        t0 = time.perf_counter()
        model = load(resolve_model_path(src.path, revision=cfg.models.revision))
        source_routers[src.name] = _router_weights(model, fam, layers)
        for t in tasks:
            ev = evaluate(model, fam, layers, heldout[t], batch_size, keep_routing=(t == src.name))
            out["loss"][t][f"source:{src.name}"] = ev.loss
            if t == src.name:
                source_routing[t] = ev.own_logits
        del model
        log.info("report: source %s evaluated (%.1fs)", src.name, time.perf_counter() - t0)

    if cfg.models.base:
        model = load(resolve_model_path(cfg.models.base, revision=cfg.models.revision))
        for t in tasks:
            out["loss"][t]["base"] = evaluate(model, fam, layers, heldout[t], batch_size, keep_routing=False).loss
        del model

    router_level: dict = {}
    end_to_end: dict = {}
    for name, path in (("merged", merged_dir), ("calibrated", model_dir)):
        t0 = time.perf_counter()
        model = load(path)
        router_level[name], end_to_end[name] = {}, {}
        for t in tasks:
            if t not in source_routers:
                continue
            ev = evaluate(model, fam, layers, heldout[t], batch_size, ref_routers=source_routers[t])
            out["loss"][t][name] = ev.loss
            rl = [routing_divergence(ev.ref_logits[l], ev.own_logits[l], top_k) for l in layers]
            router_level[name][t] = {"kl": [r[0] for r in rl], "topk_mismatch": [r[1] for r in rl]}
            if cfg.report.top_k_end_to_end:
                ee = [routing_divergence(source_routing[t][l], ev.own_logits[l], top_k) for l in layers]
                end_to_end[name][t] = {"kl": [r[0] for r in ee], "topk_mismatch": [r[1] for r in ee],
                                       **token_deviation(source_routing[t], ev.own_logits, layers, top_k)}
        if name == "merged":
            own = _router_weights(model, fam, layers)
            for t in tasks:
                _set_routers(model, fam, source_routers[t])
                out["loss"][t]["oracle"] = evaluate(model, fam, layers, heldout[t], batch_size,
                                                    keep_routing=False).loss
            _set_routers(model, fam, own)
        del model
        log.info("report: %s model evaluated (%.1fs)", name, time.perf_counter() - t0)
    out["routing"] = {"router_level": router_level}
    if cfg.report.top_k_end_to_end:
        out["routing"]["end_to_end"] = end_to_end
    out["summary"] = summarize(out)
    return out


def summarize(m: dict) -> dict:
    s: dict = {}
    for view, models in m.get("routing", {}).items():
        s[view] = {}
        for name, per_task in models.items():
            kl, miss = layer_means(per_task, "kl"), layer_means(per_task, "topk_mismatch")
            s[view][name] = {"kl_mean": _mean(kl), "topk_mismatch_mean": _mean(miss),
                             "topk_mismatch_worst_layer": max(miss) if miss else float("nan"),
                             "kl_per_layer": kl, "topk_mismatch_per_layer": miss}
            if view == "end_to_end":
                for key in ("tokens_with_deviation", "deviating_layers_per_token"):
                    s[view][name][key] = _mean([v.get(key) for v in per_task.values()])
        if "merged" in s[view] and "calibrated" in s[view]:
            before, after = s[view]["merged"]["kl_mean"], s[view]["calibrated"]["kl_mean"]
            s[view]["kl_reduction"] = 1.0 - after / before if before > 0 else float("nan")
    names = sorted({k for per in m.get("loss", {}).values() for k in per})
    s["loss_mean"] = {n: _mean([m["loss"][t].get(n) for t in m["loss"]]) for n in names}
    return s


# -- run-directory records --------------------------------------------------------------------------

def solve_statistics(run_dir: Path) -> dict:
    out = {}
    for path in sorted((Path(run_dir) / "routers").glob("layer-*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        layer = rec.get("layer", path.stem.split("-")[-1])
        out[str(int(layer))] = {k: rec.get(k) for k in ("iterations", "relative_residual", "converged", "seconds",
                                                        "kl_before", "kl_after", "alpha", "objective", "solver")}
    return out


def stage_statistics(run_dir: Path) -> dict:
    """Per stage: tasks done, summed and longest wall time, largest peak RSS (launcher records)."""
    stages: dict = {}
    for path in sorted((Path(run_dir) / "completions").glob("**/*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(rec, dict):
            continue
        stage = rec.get("stage") or path.parent.name
        s = stages.setdefault(stage, {"tasks": 0, "wall_s_total": 0.0, "wall_s_max": None, "peak_rss_mb_max": None})
        s["tasks"] += 1
        wall = rec.get("wall_s")
        if isinstance(wall, (int, float)):
            s["wall_s_total"] = round(s["wall_s_total"] + wall, 3)
            s["wall_s_max"] = wall if s["wall_s_max"] is None else max(s["wall_s_max"], wall)
        rss = rec.get("peak_rss_mb")
        if isinstance(rss, (int, float)):
            s["peak_rss_mb_max"] = rss if s["peak_rss_mb_max"] is None else max(s["peak_rss_mb_max"], rss)
        gpu = rec.get("peak_gpu_mb")
        if isinstance(gpu, (int, float)):  # only tasks that ran on a GPU record it
            s["peak_gpu_mb_max"] = max(s.get("peak_gpu_mb_max") or 0.0, gpu)
    return stages
