"""The report of a ``mergeme`` run: router options of the built MoE compared per domain.

For each router option (the router the MoE was built with, the fitted one from solve-router, and
every rule in ``mergeme.compare``) and each source's held-out data: the held-out loss (mean
next-token cross-entropy) of the MoE with that router in every layer, and the share of the
domain's tokens that each layer routes to the domain's expert, as top-1 choice and within the
top-k (mean over layers, and per layer). Beside them, each dense expert and the dense base on every
domain, as references. All options of the MoE run in one layer-wise pass over its checkpoint
(harc_hpc.report.metrics.evaluate_checkpoint: the routers are swapped in per evaluation).

Sequence-level routing (MergeME's PPL and task-vector routing, issue 15 item 3) is not a token
router: each held-out sequence is routed on its first P tokens (``sequence_routing_metrics``), and
its loss is scored on the tokens after them. So that its rows compare with the token-level options,
every option (and the dense references) is also scored on those same tokens (``loss_after_prefix``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch

from harc_hpc.config import PipelineConfig
from harc_hpc.errors import InputDataError, UsageError

REPORT_VERSION = 2  # 2: sequence_routing filled, loss_after_prefix, dense_references_after_prefix


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
def dense_loss(path: str, seqs: list[list[int]], batch_size: int, device, first: int = 1) -> float:
    """Mean next-token cross-entropy of a dense model on some sequences: the real tokens at
    positions >= ``first`` (default every predicted token)."""
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
            if n > first:
                nll += float(torch.nn.functional.cross_entropy(logits[b, first - 1: n - 1],
                                                               ids[b, first:n].to(device), reduction="sum"))
                count += n - first
    del model
    return nll / max(1, count)


# ---------------------------------------------------------------------------------------------
# Sequence-level routing (MergeME §3.1.3) in the report
# ---------------------------------------------------------------------------------------------

#: The report routes each held-out sequence on its first tokens and scores the loss on the rest
#: (routing_analysis.heldout_loss): at most this many tokens, and at most half the shortest sequence.
REPORT_PREFIX_TOKENS = 64


def report_prefix_tokens(heldout: Mapping[str, Sequence[Sequence[int]]]) -> int:
    """The routing prefix P of the report: min(REPORT_PREFIX_TOKENS, shortest sequence // 2), so every
    sequence keeps at least half of its tokens to score; at least 2 (a perplexity needs one
    predicted token)."""
    lengths = [len(s) for seqs in heldout.values() for s in seqs]
    if not lengths:
        raise UsageError("sequence routing report: no held-out sequences")
    prefix = min(REPORT_PREFIX_TOKENS, min(lengths) // 2)
    if prefix < 2:
        raise InputDataError(f"sequence routing report: the shortest held-out sequence has {min(lengths)} "
                             f"tokens; routing on a prefix and scoring the rest needs at least 4")
    return prefix


def sequence_routing_metrics(cfg, run_dir: Union[str, Path], heldout: Mapping[str, Sequence[Sequence[int]]]) -> dict:
    """Sequence-level routing in the report of a ``mergeme`` run.

    The wrapper is built from the run's ``merged/`` (build-moe's output: its record names the dense
    models, which the pipeline passed to build-moe as the config's resolved ``models``), with the
    build's top-k. Every held-out sequence of each domain (``heldout``: domain -> token ids, the
    report's tokenisation) is routed on its first P tokens (``report_prefix_tokens``); per router
    rule (``ROUTERS``) and domain: the share of sequences whose first choice (``top1``) is the
    domain's expert (``share_top1``) and the share with it among the K chosen (``share_topk``), the same top-1 share when routing on
    the whole sequence (for comparison only: that routing sees the scored tokens), and the held-out
    loss of the tokens after the first P with either attention (``ATTENTIONS``). ``tables``: the
    routing tables (routing_analysis.routing_table) of the prefixes, one per rule."""
    from harc_hpc.mergeme.pipeline import expert_of_task
    from harc_hpc.mergeme.routing_analysis import heldout_loss, routing_table
    from harc_hpc.mergeme.sequence_routing import ATTENTIONS, ROUTERS, SequenceRoutedLM
    from harc_hpc.models.modeling import pick_device
    from harc_hpc.stages import layout

    moe_dir = layout.merged_dir(Path(run_dir))
    device = pick_device(cfg.harc.device)
    moe_index = expert_of_task(cfg)
    unknown = [t for t in heldout if t not in moe_index]
    if unknown:
        raise UsageError(f"sequence routing report: held-out set(s) {unknown} are no source of the config "
                         f"(sources: {list(moe_index)})")
    domains = [t for t in moe_index if t in heldout]
    sets = {t: [list(s) for s in heldout[t]] for t in domains}
    prefix = report_prefix_tokens(sets)
    prefixes = {t: [s[:prefix] for s in sets[t]] for t in domains}
    out: dict = {"prefix_tokens": prefix, "attentions": list(ATTENTIONS), "routers": {}, "tables": {}}
    for router in ROUTERS:
        per: dict = {}
        for attention in ATTENTIONS:
            wrapper = SequenceRoutedLM.from_build(moe_dir, router=router, attention=attention, device=device)
            if attention == ATTENTIONS[0]:  # the routing does not depend on the attention
                out["top_k"] = wrapper.top_k
                table = routing_table(wrapper, prefixes)
                whole = routing_table(wrapper, sets)
                out["tables"][router] = table
                for t in domains:
                    name = wrapper.expert_names[wrapper.moe_experts.index(moe_index[t])]
                    s = table["sets"][t]
                    per[t] = {"expert": name, "sequences": s["sequences"],
                              "share_top1": s["top1"][name],
                              # each sequence selects K distinct experts: selection share * K
                              "share_topk": s["selection"][name] * wrapper.top_k,
                              "share_top1_whole_sequence": whole["sets"][t]["top1"][name],
                              "loss": {}}
            losses = heldout_loss(wrapper, sets, prompt_tokens=prefix)
            for t in domains:
                per[t]["loss"][attention] = losses[t]["loss"]
                per[t]["tokens"] = losses[t]["tokens"]
            del wrapper
        out["routers"][router] = per
    return out


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
    seq = sequence_routing_metrics(cfg, run_dir, heldout)
    prefix = seq["prefix_tokens"]
    after_prefix = {t: [[False] * prefix + [True] * (len(s) - prefix) for s in heldout[t]] for t in domains}
    keys = [(name, t) for name in options for t in domains]
    evals = {("routing", name, t): Evaluation(heldout[t], keep_routing=True, routers=options[name]) for name, t in keys}
    # the sequence routers' scored tokens
    evals.update({("after_prefix", name, t): Evaluation(heldout[t], masks=after_prefix[t], routers=options[name])
                  for name, t in keys})
    res = evaluate_checkpoint(merged, layers, evals, cfg.calibration.batch_size, device,
                              trust_remote_code=cfg.models.trust_remote_code)
    table: dict = {name: {} for name in options}
    for name, t in keys:
        table[name][t] = {"loss_after_prefix": res.results["after_prefix", name, t].loss}
    for name, t in keys:
        r = res.results["routing", name, t]
        e = experts[t]
        top1 = {l: float((r.own_logits[l].argmax(dim=1) == e).double().mean()) for l in layers}
        topk = {l: float((torch.topk(r.own_logits[l], top_k, dim=1).indices == e).any(dim=1).double().mean())
                for l in layers}
        load = {l: torch.bincount(r.own_logits[l].argmax(dim=1), minlength=r.own_logits[l].shape[1]).double()
                for l in layers}
        table[name][t].update({
            "loss": r.loss, "tokens": r.tokens, "expert": e,
            "expert_share_top1": sum(top1.values()) / len(layers),
            f"expert_share_top{top_k}": sum(topk.values()) / len(layers),
            "expert_share_top1_per_layer": top1,
            # top-1 share of every expert, mean over layers (MergeME Table 2's view)
            "top1_distribution": (sum(v / v.sum() for v in load.values()) / len(layers)).tolist(),
        })
    dense = {"base": cfg.models.base, **{f"dense {s.name}": s.path for s in cfg.models.sources}}
    references = {name: {t: dense_loss(path, heldout[t], cfg.calibration.batch_size, device) for t in domains}
                  for name, path in dense.items()}
    references_after_prefix = {name: {t: dense_loss(path, heldout[t], cfg.calibration.batch_size, device,
                                                    first=prefix) for t in domains}
                               for name, path in dense.items()}
    fitted = table["fitted"]
    targets = {t: {"share_top1_at_least_0.8": fitted[t]["expert_share_top1"] >= 0.8,
                   "beats": {name: fitted[t]["loss"] < table[name][t]["loss"]
                             for name in options if name != "fitted"},
                   "ppl_share_top1_at_least_0.9": seq["routers"]["ppl"][t]["share_top1"] >= 0.9}
               for t in domains}
    return {
        "version": REPORT_VERSION, "run": cfg.run.name, "kind": "mergeme", "tasks": domains, "top_k": top_k,
        "layers": layers, "experts": {t: experts[t] for t in domains}, "smoothing": m.smoothing,
        "harc": {k: getattr(cfg.harc, k) for k in ("alpha", "hessian", "objective", "solver", "tol")},
        "options": table, "dense_references": references,
        "dense_references_after_prefix": references_after_prefix, "targets": targets, "sequence_routing": seq,
    }


def write_report(metrics: dict, out_dir: Path) -> None:
    """metrics.json and report.md (a table per measure: options x domains)."""
    from harc_hpc.io.atomic import finite_json
    from harc_hpc.mergeme.routing_analysis import routing_markdown, write_routing_report

    out_dir = Path(out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(finite_json(metrics), indent=2, sort_keys=True,
                                                     allow_nan=False) + "\n")
    tasks, k = metrics["tasks"], metrics["top_k"]
    opts = metrics["options"]
    head = "| router | " + " | ".join(tasks) + " |\n|---|" + "---|" * len(tasks) + "\n"
    seq = metrics["sequence_routing"]
    prefix, seq_routers = seq["prefix_tokens"], seq["routers"]
    rule_names = {"ppl": "PPL routing", "task_vector": "task-vector routing"}
    lines = [f"# MergeME run {metrics['run']}: router options", "",
             f"Experts: {', '.join(f'{t} = expert {e}' for t, e in metrics['experts'].items())}; top-{k}; "
             f"fit: target smoothing {metrics['smoothing']}, harc {metrics['harc']}.", "",
             "Token-level options: the MoE with that router in every layer. Sequence-level options "
             f"(MergeME's PPL and task-vector routing, top-{seq['top_k']}): each held-out sequence routed on its "
             f"first {prefix} tokens, all its tokens sent to the chosen experts with merged attention (the MoE's) "
             "or separate attention (each expert's own).", "",
             "## Held-out loss (mean next-token cross-entropy, nats per token)", "", head.rstrip("\n")]
    for name, per in opts.items():
        lines.append(f"| {name} | " + " | ".join(f"{per[t]['loss']:.4f}" for t in tasks) + " |")
    for name, per in metrics["dense_references"].items():
        lines.append(f"| *{name} (dense)* | " + " | ".join(f"{per[t]:.4f}" for t in tasks) + " |")
    lines += ["", f"## Held-out loss of the tokens after the first {prefix} of each sequence (nats per token)", "",
              f"The sequence routers see the first {prefix} tokens only, so no option is scored on what a "
              "router saw; every row is scored on the same tokens.", "", head.rstrip("\n")]
    for name, per in opts.items():
        lines.append(f"| {name} | " + " | ".join(f"{per[t]['loss_after_prefix']:.4f}" for t in tasks) + " |")
    for rule, per in seq_routers.items():
        for attention in seq["attentions"]:
            lines.append(f"| {rule_names.get(rule, rule)}, {attention} attention | "
                         + " | ".join(f"{per[t]['loss'][attention]:.4f}" for t in tasks) + " |")
    for name, per in metrics["dense_references_after_prefix"].items():
        lines.append(f"| *{name} (dense)* | " + " | ".join(f"{per[t]:.4f}" for t in tasks) + " |")
    for measure, seq_measure, title in (("expert_share_top1", "share_top1", "top-1 choice"),
                                        (f"expert_share_top{k}", "share_topk", f"within the top-{k}")):
        lines += ["", f"## Share of each domain's tokens (token-level, mean over layers) or sequences "
                  f"(sequence-level) routed to its expert ({title})", "", head.rstrip("\n")]
        for name, per in opts.items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * per[t][measure]:.1f} %" for t in tasks) + " |")
        for rule, per in seq_routers.items():
            lines.append(f"| {rule_names.get(rule, rule)} (sequences, first {prefix} tokens) | "
                         + " | ".join(f"{100 * per[t][seq_measure]:.1f} %" for t in tasks) + " |")
    lines += ["", "Sequence-level, routed on the whole sequence instead (top-1; it sees the scored tokens, "
              "so it is not the routing of the loss above):", "", head.rstrip("\n")]
    for rule, per in seq_routers.items():
        lines.append(f"| {rule_names.get(rule, rule)} | "
                     + " | ".join(f"{100 * per[t]['share_top1_whole_sequence']:.1f} %" for t in tasks) + " |")
    if "built (uniform)" in opts:
        lines += ["", "(The uniform router's logits all tie: its top-1 \"choice\" is the lowest expert index, "
                  "its top-k the k lowest; not a routing decision.)"]
    lines += ["", "## Targets (issue 15)", ""]
    for t, v in metrics["targets"].items():
        beats = ", ".join(f"{n}: {'yes' if b else 'NO'}" for n, b in v["beats"].items())
        lines.append(f"* {t}: fitted top-1 share >= 80 %: {'yes' if v['share_top1_at_least_0.8'] else 'NO'}; "
                     f"fitted loss lower than {beats}; PPL routing picks the domain's expert first for >= 90 % "
                     f"of sequences: {'yes' if v['ppl_share_top1_at_least_0.9'] else 'NO'}")
    lines += ["", f"## Sequence-level routing tables (routed on the first {prefix} tokens)", "",
              routing_markdown(seq["tables"], ("top1", "selection")),
              "![sequence routing](sequence_routing.png) (also sequence_routing.json / .md)", ""]
    write_routing_report(seq["tables"], out_dir, stem="sequence_routing")
    (out_dir / "report.md").write_text("\n".join(lines))
