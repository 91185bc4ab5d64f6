"""Where each evaluation set's tokens or sequences go: MergeME's Table 2 / Fig. 5 for any router option.

``routing_table(model_or_wrapper, eval_sets)`` takes one router option and held-out token sequences
per evaluation set (``{"math": [[ids], ...], "code": [...]}``) and counts, per set:

* **token-level** (a transformers MoE, e.g. a ``build-moe`` output with any router): at every MoE
  layer and every token, the k experts the model's router selects (captured from the router module
  while the model runs, so exactly what the MoE computes). ``selection[e]`` = the share of the
  (token, layer, slot) selections that are expert e: the paper's "routing probability averaged
  from each layer and token"; ``weight[e]`` = the mean over tokens and layers of expert e's top-k
  routing weight (0 when not selected); ``top1[e]`` = the share of (token, layer) whose highest
  weighted expert is e; and the same three per layer (``per_layer``).
* **sequence-level** (a ``SequenceRoutedLM``: PPL or task-vector routing): each sequence's
  top-K experts and weights; ``selection``, ``weight`` and ``top1`` as above over sequences (the
  paper's Table 2 for PPL routing).

Each share sums to 1 over the experts. ``routing_markdown(tables)`` renders several options'
tables (option name -> table) as one markdown table per measure; ``plot_routing(tables, path)``
draws one panel per evaluation set with one bar group per expert and one bar per option (PNG).
``write_routing_report(tables, out_dir)`` writes all three (json, md, png).

``heldout_loss(model_or_wrapper, eval_sets, prompt_tokens=P)`` is the loss to put next to a table:
mean next-token NLL of every token after the first P of each sequence, the same tokens for every
option. A sequence-routed model is routed on those first P tokens only: routing on the scored tokens
themselves would let PPL routing pick the expert by the very loss being measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch

from harc_hpc.errors import UsageError
from harc_hpc.mergeme.sequence_routing import SequenceRoutedLM, TokenIds, _as_ids

MEASURES = ("selection", "weight", "top1")


def _shares(counts: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    total = float(counts.sum())
    return {n: (float(c) / total if total > 0 else 0.0) for n, c in zip(names, counts)}


def _check_sets(eval_sets: Mapping[str, Sequence[TokenIds]]) -> dict[str, list[torch.Tensor]]:
    if not eval_sets:
        raise UsageError("routing_table: no evaluation sets")
    out = {}
    for name, seqs in eval_sets.items():
        if not seqs:
            raise UsageError(f"routing_table: evaluation set {name!r} is empty")
        out[name] = [_as_ids(s, f"evaluation set {name!r}, sequence {i}") for i, s in enumerate(seqs)]
        short = [i for i, s in enumerate(out[name]) if s.numel() < 2]
        if short:
            raise UsageError(f"routing_table: evaluation set {name!r}: sequence {short[0]} has fewer "
                             f"than 2 tokens")
    return out


def _moe_expert_names(model, num_experts: int) -> list[str]:
    """The expert names of a build-moe output (its record), else expert0, expert1, ..."""
    import json

    from harc_hpc.mergeme.build import RECORD

    path = Path(str(getattr(model.config, "_name_or_path", "") or "")) / RECORD
    if path.is_file():
        names = [e["name"] for e in json.loads(path.read_text())["experts"]]
        if len(names) == num_experts:
            return names
    return [f"expert{e}" for e in range(num_experts)]


def _token_table(model, sets: dict[str, list[torch.Tensor]], names: Optional[Sequence[str]]) -> dict:
    from harc_hpc.models.families import family_for_config

    conf = model.config.to_dict()
    fam = family_for_config(conf)
    E, k = fam.num_experts(conf), fam.top_k(conf)
    layers = fam.moe_layers(conf)
    names = list(names) if names is not None else _moe_expert_names(model, E)
    if len(names) != E:
        raise UsageError(f"routing_table: {len(names)} expert names {names} for an MoE of {E} experts")
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(layer: int):
        def hook(module, args, output):
            if not (isinstance(output, tuple) and len(output) == 3):
                raise UsageError(f"routing_table: the router of layer {layer} ({type(module).__name__}) "
                                 f"does not return (logits, top-k weights, top-k indices)")
            captured[layer] = (output[1].detach().float().cpu(), output[2].detach().cpu())
        return hook

    handles = [fam.router_module(model, l).register_forward_hook(hook_for(l)) for l in layers]
    table = {"level": "token", "experts": names, "top_k": k, "layers": layers, "sets": {}}
    device = next(model.parameters()).device
    try:
        for set_name, seqs in sets.items():
            sel = torch.zeros(len(layers), E, dtype=torch.float64)
            wsum = torch.zeros(len(layers), E, dtype=torch.float64)
            top1 = torch.zeros(len(layers), E, dtype=torch.float64)
            tokens = 0
            for ids in seqs:
                captured.clear()
                with torch.no_grad():
                    model(input_ids=ids[None].to(device), use_cache=False)
                for j, l in enumerate(layers):
                    w, idx = captured[l]
                    sel[j] += torch.bincount(idx.flatten(), minlength=E).double()
                    wsum[j].index_add_(0, idx.flatten(), w.flatten().double())
                    best = idx.gather(1, w.argmax(1, keepdim=True)).flatten()
                    top1[j] += torch.bincount(best, minlength=E).double()
                tokens += ids.numel()
            table["sets"][set_name] = {
                "tokens": tokens, "sequences": len(seqs),
                "selection": _shares(sel.sum(0), names),
                "weight": {n: float(v) / (tokens * len(layers)) for n, v in zip(names, wsum.sum(0))},
                "top1": _shares(top1.sum(0), names),
                "per_layer": [{"layer": l, "selection": _shares(sel[j], names),
                               "weight": {n: float(v) / tokens for n, v in zip(names, wsum[j])},
                               "top1": _shares(top1[j], names)} for j, l in enumerate(layers)],
            }
    finally:
        for h in handles:
            h.remove()
    return table


def _sequence_table(wrapper: SequenceRoutedLM, sets: dict[str, list[torch.Tensor]]) -> dict:
    names = wrapper.expert_names
    E = len(names)
    table = {"level": "sequence", "experts": names, "top_k": wrapper.top_k, "router": wrapper.router,
             "attention": wrapper.attention, "sets": {}}
    for set_name, seqs in sets.items():
        sel = torch.zeros(E, dtype=torch.float64)
        wsum = torch.zeros(E, dtype=torch.float64)
        top1 = torch.zeros(E, dtype=torch.float64)
        for ids in seqs:
            r = wrapper.route(ids)
            for e, w in zip(r.experts, r.weights):
                sel[e] += 1
                wsum[e] += w
            top1[r.experts[max(range(len(r.weights)), key=lambda i: r.weights[i])]] += 1
        table["sets"][set_name] = {"sequences": len(seqs), "tokens": sum(s.numel() for s in seqs),
                                   "selection": _shares(sel, names),
                                   "weight": {n: float(v) / len(seqs) for n, v in zip(names, wsum)},
                                   "top1": _shares(top1, names)}
    return table


def routing_table(model_or_wrapper, eval_sets: Mapping[str, Sequence[TokenIds]], *,
                  expert_names: Optional[Sequence[str]] = None) -> dict:
    """The routing table (json-able dict, module docstring) of one router option on ``eval_sets``
    (set name -> token-id sequences). ``model_or_wrapper``: a transformers MoE (token-level; its
    expert names from ``expert_names``, else its build-moe record, else expert0, ...) or a
    ``SequenceRoutedLM`` (sequence-level)."""
    sets = _check_sets(eval_sets)
    if isinstance(model_or_wrapper, SequenceRoutedLM):
        if expert_names is not None and list(expert_names) != model_or_wrapper.expert_names:
            raise UsageError(f"routing_table: expert_names {list(expert_names)} differ from the "
                             f"wrapper's {model_or_wrapper.expert_names}")
        return _sequence_table(model_or_wrapper, sets)
    return _token_table(model_or_wrapper, sets, expert_names)


def _check_tables(tables: Mapping[str, dict]) -> list[str]:
    if not tables:
        raise UsageError("no routing tables")
    experts: list[str] = []
    for t in tables.values():
        experts += [e for e in t["experts"] if e not in experts]
    return experts


def routing_markdown(tables: Mapping[str, dict], measures: Sequence[str] = ("selection",),
                     per_layer: bool = False) -> str:
    """Markdown: per measure, one row per (option, evaluation set) and one column per expert, in %;
    the largest share of each row in bold. ``per_layer``: also the token-level options' layers."""
    experts = _check_tables(tables)
    bad = [m for m in measures if m not in MEASURES]
    if bad:
        raise UsageError(f"unknown measure(s) {bad}; choose from {MEASURES}")
    titles = {"selection": "share of top-k selections", "weight": "mean routing weight",
              "top1": "share routed first to the expert"}
    out = []

    def row(label: list[str], shares: dict) -> str:
        vals = [shares.get(e) for e in experts]
        best = max(v for v in vals if v is not None)
        cells = ["—" if v is None else (f"**{100 * v:.1f}**" if v == best else f"{100 * v:.1f}") for v in vals]
        return "| " + " | ".join(label + cells) + " |"

    for m in measures:
        out.append(f"Routing probability, {titles[m]} (%; tokens averaged over layers and tokens, "
                   f"sequences over sequences)\n")
        out.append("| option | level | evaluation set | " + " | ".join(experts) + " |")
        out.append("|---|---|---|" + "---|" * len(experts))
        for option, t in tables.items():
            for set_name, s in t["sets"].items():
                out.append(row([option, t["level"], set_name], s[m]))
                if per_layer and "per_layer" in s:
                    for pl in s["per_layer"]:
                        out.append(row([option, f"layer {pl['layer']}", set_name], pl[m]))
        out.append("")
    return "\n".join(out)


def plot_routing(tables: Mapping[str, dict], path: Union[str, Path], measure: str = "selection") -> Path:
    """A PNG: one panel per evaluation set, bars of ``measure`` per expert, one bar per option."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = _check_tables(tables)
    if measure not in MEASURES:
        raise UsageError(f"unknown measure {measure!r}; choose from {MEASURES}")
    sets: list[str] = []
    for t in tables.values():
        sets += [s for s in t["sets"] if s not in sets]
    options = list(tables)
    fig, axes = plt.subplots(1, len(sets), figsize=(max(4.0, 3.2 * len(sets)), 3.6), squeeze=False,
                             sharey=True)
    width = 0.8 / len(options)
    for ax, set_name in zip(axes[0], sets):
        for j, option in enumerate(options):
            shares = tables[option]["sets"].get(set_name, {}).get(measure, {})
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(experts))]
            ax.bar(xs, [shares.get(e, float("nan")) for e in experts], width, label=option)
        ax.set_xticks(range(len(experts)))
        ax.set_xticklabels(experts, rotation=30, ha="right")
        ax.set_title(set_name)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(f"routing probability ({measure})")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def write_routing_report(tables: Mapping[str, dict], out_dir: Union[str, Path],
                         stem: str = "routing") -> dict[str, str]:
    """``{stem}.json`` (the tables), ``{stem}.md`` (selection and weight tables) and ``{stem}.png``
    (selection) in ``out_dir``; returns their paths."""
    from harc_hpc.io.atomic import atomic_path, write_json_atomic, write_text_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    write_json_atomic(paths["json"], dict(tables))
    write_text_atomic(paths["markdown"], routing_markdown(tables, ("selection", "weight")))
    with atomic_path(paths["png"]) as tmp:
        plot_routing(tables, tmp)
    return {k: str(v) for k, v in paths.items()}


def heldout_loss(model_or_wrapper, eval_sets: Mapping[str, Sequence[TokenIds]], *,
                 prompt_tokens: int = 0) -> dict[str, dict]:
    """{set: {"loss": mean NLL in nats per scored token, "tokens": scored tokens}}: every token at
    position >= max(prompt_tokens, 1) of each sequence, given its prefix. A ``SequenceRoutedLM`` is
    routed on the first ``prompt_tokens`` tokens (at least 2 are needed); a transformers model is
    run as it is."""
    sets = _check_sets(eval_sets)
    wrapper = model_or_wrapper if isinstance(model_or_wrapper, SequenceRoutedLM) else None
    if wrapper is not None and prompt_tokens < 2:
        raise UsageError(f"heldout_loss: a sequence-routed model is routed on the first prompt_tokens "
                         f"tokens, which are then not scored; prompt_tokens={prompt_tokens} (at least 2)")
    start = max(int(prompt_tokens), 1)
    out = {}
    for name, seqs in sets.items():
        too_short = [i for i, s in enumerate(seqs) if s.numel() <= start]
        if too_short:
            raise UsageError(f"heldout_loss: evaluation set {name!r}: sequence {too_short[0]} has no "
                             f"token after the first {start}")
        total, count = 0.0, 0
        for ids in seqs:
            with torch.no_grad():
                if wrapper is not None:
                    logits = wrapper(ids, routing=wrapper.route(ids[:prompt_tokens]))
                else:
                    device = next(model_or_wrapper.parameters()).device
                    logits = model_or_wrapper(input_ids=ids[None].to(device), use_cache=False).logits[0]
            logp = torch.log_softmax(logits[start - 1:-1].double().cpu(), dim=-1)
            total -= float(logp.gather(1, ids[start:, None]).sum())
            count += ids.numel() - start
        out[name] = {"loss": total / count, "tokens": count}
    return out
