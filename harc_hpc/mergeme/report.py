"""The report of a ``mergeme`` run: router options of the built MoE compared per domain.

For each router option (the router the MoE was built with, the fitted one from solve-router, and
every rule in ``mergeme.compare``) and each source's held-out data: the held-out loss (mean
next-token cross-entropy) of the MoE with that router in every layer, and the share of the
domain's tokens that each layer routes to the domain's expert, as top-1 choice and within the
top-k (mean over layers, and per layer). Beside them, each dense expert and the dense base on every
domain, as references. All options of the MoE run in one layer-wise pass over its checkpoint
(harc_hpc.report.metrics.evaluate_checkpoint: the routers are swapped in per evaluation).

Sequence-level routing (MergeME's perplexity routing, issue 15 item 3) is not a token router and
is measured by its own module when present: ``sequence_routing_metrics`` is the hook.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import torch

from harc_hpc.config import PipelineConfig

REPORT_VERSION = 1


def option_routers(cfg: PipelineConfig, rule: str) -> dict[int, torch.Tensor]:
    """Every layer's router of build-moe's rule ``rule`` for this config's inputs (nothing written)."""
    from harc_hpc.mergeme.build import compute_routers, plan_build
    from harc_hpc.mergeme.pipeline import build_spec

    with tempfile.TemporaryDirectory() as tmp:
        plan = plan_build(build_spec(cfg, Path(tmp) / "unused", router_init=rule))
        try:
            return compute_routers(plan)
        finally:
            for i in plan.inputs:
                i.ckpt.close()


@torch.no_grad()
def dense_loss(path: str, seqs: list[list[int]], batch_size: int, device) -> float:
    """Mean next-token cross-entropy of a dense model on some sequences (real tokens only)."""
    from harc_hpc.models.modeling import load_causal_lm, pad_batch

    model = load_causal_lm(path, device)
    nll, count = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        ids, lengths = pad_batch([torch.tensor(s, dtype=torch.long) for s in seqs[start: start + batch_size]])
        mask = torch.zeros(ids.shape, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        for b, n in enumerate(lengths):
            if n >= 2:
                nll += float(torch.nn.functional.cross_entropy(logits[b, : n - 1], ids[b, 1:n].to(device),
                                                               reduction="sum"))
                count += n - 1
    del model
    return nll / max(1, count)


def sequence_routing_metrics(cfg: PipelineConfig, run_dir: Path, heldout: dict[str, list[list[int]]]) -> Optional[dict]:
    """Hook for sequence-level routing (issue 15 item 3: PPL routing). When a module
    ``harc_hpc.mergeme.sequence_routing`` exists and has ``report_metrics(cfg, run_dir, heldout)``,
    its result (e.g. per domain, the share of held-out sequences each sequence router sends to the
    domain's expert, and their loss) goes into the report under ``sequence_routing``; without it the
    report says that it is not measured."""
    try:
        from harc_hpc.mergeme import sequence_routing  # type: ignore[attr-defined]
    except ImportError:
        return None
    fn = getattr(sequence_routing, "report_metrics", None)
    return None if fn is None else fn(cfg, run_dir, heldout)


def mergeme_metrics(cfg: PipelineConfig, run_dir: Path) -> dict:
    from transformers import AutoTokenizer

    from harc_hpc.io.calibration_data import tokenize_task
    from harc_hpc.mergeme.pipeline import expert_of_task
    from harc_hpc.models.modeling import pick_device
    from harc_hpc.report.metrics import Evaluation, evaluate_checkpoint
    from harc_hpc.stages import layout
    from harc_hpc.stages.routers import load_router

    run_dir = Path(run_dir)
    m = cfg.mergeme
    device = pick_device(cfg.harc.device)
    merged = layout.merged_dir(run_dir)
    conf = layout.reference_config(cfg)
    fam = layout.family(cfg)
    top_k = fam.top_k(conf)
    layers = layout.moe_layers(cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(merged), trust_remote_code=cfg.models.trust_remote_code)
    heldout = {s.name: tokenize_task(s.heldout, cfg.calibration, tokenizer)
               for s in cfg.models.sources if s.heldout is not None and s.heldout.files}
    experts = expert_of_task(cfg)
    options: dict[str, Optional[dict[int, torch.Tensor]]] = {f"built ({m.router_init})": None}
    for rule in m.compare:
        if rule != m.router_init:
            options[rule] = option_routers(cfg, rule)
    options["fitted"] = {l: load_router(run_dir, l) for l in layers}
    domains = sorted(heldout, key=list(experts).index)
    evals, keys = [], []
    for name, routers in options.items():
        for t in domains:
            evals.append(Evaluation(heldout[t], keep_routing=True, routers=routers))
            keys.append((name, t))
    res = evaluate_checkpoint(merged, layers, evals, cfg.calibration.batch_size, device,
                              trust_remote_code=cfg.models.trust_remote_code)
    table: dict = {name: {} for name in options}
    for (name, t), r in zip(keys, res.results):
        e = experts[t]
        top1 = {l: float((r.own_logits[l].argmax(dim=1) == e).double().mean()) for l in layers}
        topk = {l: float((torch.topk(r.own_logits[l], top_k, dim=1).indices == e).any(dim=1).double().mean())
                for l in layers}
        load = {l: torch.bincount(r.own_logits[l].argmax(dim=1), minlength=r.own_logits[l].shape[1]).double()
                for l in layers}
        table[name][t] = {
            "loss": r.loss, "tokens": r.tokens, "expert": e,
            "expert_share_top1": sum(top1.values()) / len(layers),
            f"expert_share_top{top_k}": sum(topk.values()) / len(layers),
            "expert_share_top1_per_layer": top1,
            # top-1 share of every expert, mean over layers (MergeME Table 2's view)
            "top1_distribution": (sum(v / v.sum() for v in load.values()) / len(layers)).tolist(),
        }
    references = {"base": {t: dense_loss(cfg.models.base, heldout[t], cfg.calibration.batch_size, device)
                           for t in domains}}
    for s in cfg.models.sources:
        references[f"dense {s.name}"] = {t: dense_loss(s.path, heldout[t], cfg.calibration.batch_size, device)
                                         for t in domains}
    fitted = table["fitted"]
    targets = {t: {"share_top1_at_least_0.8": fitted[t]["expert_share_top1"] >= 0.8,
                   "beats": {name: fitted[t]["loss"] < table[name][t]["loss"]
                             for name in options if name != "fitted"}} for t in domains}
    return {
        "version": REPORT_VERSION, "run": cfg.run.name, "kind": "mergeme", "tasks": domains, "top_k": top_k,
        "layers": layers, "experts": {t: experts[t] for t in domains}, "smoothing": m.smoothing,
        "harc": {k: getattr(cfg.harc, k) for k in ("alpha", "hessian", "objective", "solver", "tol")},
        "options": table, "dense_references": references, "targets": targets,
        "sequence_routing": sequence_routing_metrics(cfg, run_dir, heldout),
    }


def write_report(metrics: dict, out_dir: Path) -> None:
    """metrics.json and report.md (a table per measure: options x domains)."""
    from harc_hpc.io.atomic import finite_json

    out_dir = Path(out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(finite_json(metrics), indent=2, sort_keys=True,
                                                     allow_nan=False) + "\n")
    tasks, k = metrics["tasks"], metrics["top_k"]
    opts = metrics["options"]
    head = "| router | " + " | ".join(tasks) + " |\n|---|" + "---|" * len(tasks) + "\n"
    lines = [f"# MergeME run {metrics['run']}: router options", "",
             f"Experts: {', '.join(f'{t} = expert {e}' for t, e in metrics['experts'].items())}; top-{k}; "
             f"fit: target smoothing {metrics['smoothing']}, harc {metrics['harc']}.", "",
             "## Held-out loss (mean next-token cross-entropy, nats per token)", "", head.rstrip("\n")]
    for name, per in opts.items():
        lines.append(f"| {name} | " + " | ".join(f"{per[t]['loss']:.4f}" for t in tasks) + " |")
    for name, per in metrics["dense_references"].items():
        lines.append(f"| *{name} (dense)* | " + " | ".join(f"{per[t]:.4f}" for t in tasks) + " |")
    for measure, title in (("expert_share_top1", "top-1 choice"), (f"expert_share_top{k}", f"within the top-{k}")):
        lines += ["", f"## Share of each domain's tokens routed to its expert ({title}, mean over layers)", "",
                  head.rstrip("\n")]
        for name, per in opts.items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * per[t][measure]:.1f} %" for t in tasks) + " |")
    if "built (uniform)" in opts:
        lines += ["", "(The uniform router's logits all tie: its top-1 \"choice\" is the lowest expert index, "
                  "its top-k the k lowest; not a routing decision.)"]
    lines += ["", "## Targets (issue 15)", ""]
    for t, v in metrics["targets"].items():
        beats = ", ".join(f"{n}: {'yes' if b else 'NO'}" for n, b in v["beats"].items())
        lines.append(f"* {t}: fitted top-1 share >= 80 %: {'yes' if v['share_top1_at_least_0.8'] else 'NO'}; "
                     f"fitted loss lower than {beats}")
    seq = metrics.get("sequence_routing")
    lines += ["", "## Sequence-level routing (PPL routing)", "",
              "not measured in this build (harc_hpc.mergeme.sequence_routing is not installed)" if seq is None
              else "```json\n" + json.dumps(seq, indent=2, sort_keys=True) + "\n```", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
