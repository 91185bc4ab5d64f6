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

No model is loaded whole: each checkpoint is evaluated in one layer-wise pass (harc_hpc.models.onload,
as the capture stage runs it) over the held-out text of every task, so a report of Mixtral or
Qwen3-235B needs one decoder layer and the held-out hidden states in memory, not five models.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch

from harc_hpc.config import PipelineConfig
from harc_hpc.errors import RunStateError
from harc_hpc.io.checkpoint import resolve_model_path
from harc_hpc.models.layerwise import LayerObserver
from harc_hpc.math.metrics import bernoulli_kl_sum, kl_sum, topk_common
from harc_hpc.report.render import layer_means
from harc_hpc.report.render import mean_of as _mean

log = logging.getLogger(__name__)

METRICS_VERSION = 1


class ReportError(RunStateError):
    """The report cannot be made as configured (the message says why and what to do)."""


# -- routing metrics on router logits ---------------------------------------------------------------

Selection = Optional[Callable[[torch.Tensor], torch.Tensor]]  # logits (n, K) -> chosen experts (n, K) bool


def routing_divergence(ref_logits: torch.Tensor, logits: torch.Tensor, top_k: int,
                       chunk: int = 65536, link: str = "softmax", select_ref: Selection = None,
                       select: Selection = None) -> tuple[float, float]:
    """Mean KL(softmax(ref) || softmax(logits)) (``link="sigmoid"``: the per-expert Bernoulli KLs
    summed) and mean top-k mismatch 1 - |S_ref ∩ S|/k over rows, the sets chosen by ``select_ref`` /
    ``select`` (the model's own rule, e.g. DeepSeek-V3's biased grouped top-k) or the top-k logits."""
    n = ref_logits.shape[0]
    if n == 0:
        return float("nan"), float("nan")
    kl_total, missed = 0.0, 0
    for start in range(0, n, chunk):
        a = ref_logits[start : start + chunk].double()
        b = logits[start : start + chunk].double()
        if link == "sigmoid":
            kl_total = kl_total + bernoulli_kl_sum(a, b)
        else:
            kl_total = kl_total + kl_sum(torch.log_softmax(a, -1), torch.log_softmax(b, -1))
        if select_ref is not None and select is not None:
            missed = missed + (a.shape[0] * top_k - (select_ref(a) & select(b)).sum())
        else:
            missed = missed + (a.shape[0] * top_k - topk_common(a, b, top_k))
    return float(kl_total) / n, int(missed) / (top_k * n)


def selection_differs(ref_logits: torch.Tensor, logits: torch.Tensor, top_k: int, select_ref: Selection = None,
                      select: Selection = None) -> torch.Tensor:
    """Per row: whether the chosen expert sets differ (a deviating routing decision)."""
    if select_ref is not None and select is not None:
        return (select_ref(ref_logits) != select(logits)).any(-1)
    sa = ref_logits.topk(top_k, -1).indices.sort(-1).values
    sb = logits.topk(top_k, -1).indices.sort(-1).values
    return (sa != sb).any(-1)


def token_deviation(ref: dict[int, torch.Tensor], own: dict[int, torch.Tensor], layers: list[int],
                    top_k: int, select_ref: Optional[dict] = None, select: Optional[dict] = None) -> dict:
    """The paper's per-token view (Sec. 1): the share of tokens with at least one deviating layer
    and the mean number of layers whose expert set deviates, per token."""
    counts = None
    for l in layers:
        d = selection_differs(ref[l], own[l], top_k, (select_ref or {}).get(l), (select or {}).get(l)).to(torch.int32)
        counts = d if counts is None else counts + d
    if counts is None or counts.numel() == 0:
        return {"tokens_with_deviation": float("nan"), "deviating_layers_per_token": float("nan")}
    return {"tokens_with_deviation": float((counts > 0).double().mean()),
            "deviating_layers_per_token": float(counts.double().mean())}


def expert_usage(logits: torch.Tensor, top_k: int, select: Selection = None) -> list[float]:
    """Share of the top-k selections that go to each expert, over the rows (tokens) of ``logits``
    (n, E), the set chosen by ``select`` (the family's own rule) or the top-k logits; sums to 1."""
    n, e = logits.shape
    if n == 0:
        return [float("nan")] * e
    if select is not None:
        counts = select(logits.double()).double().sum(0)
    else:
        counts = torch.zeros(e, dtype=torch.float64).index_add_(
            0, logits.topk(top_k, -1).indices.reshape(-1), torch.ones(n * top_k, dtype=torch.float64))
    return (counts / counts.sum()).tolist()


def usage_overlap(a: list[float], b: list[float]) -> float:
    """sum_e min(a_e, b_e): 1 when two usage distributions are equal, 0 when disjoint."""
    return float(sum(min(x, y) for x, y in zip(a, b)))


def gap_shares(losses: dict, source: str) -> dict:
    """The paper's story on one task, from held-out losses (lower is better):

    - ``merge_keeps_gain``: (base - merged) / (base - source), the share of the fine-tune's gain over
      the base that the merged model keeps (negative: worse than the base);
    - ``oracle_recovers``: (merged - oracle) / (merged - source), the share of what the merge lost
      that the source's own routers win back (high: routing is the failure);
    - ``harc_recovers_of_oracle``: (merged - calibrated) / (merged - oracle), the share of the
      oracle's gain that the calibrated routers reach;
    - ``harc_recovers``: (merged - calibrated) / (merged - source).
    A share whose denominator is 0 or whose losses are missing is left out."""
    def ratio(num, den):
        return None if num is None or den is None or den == 0 else num / den

    def diff(a, b):
        return None if losses.get(a) is None or losses.get(b) is None else losses[a] - losses[b]

    src = f"source:{source}"
    out = {"merge_keeps_gain": ratio(diff("base", "merged"), diff("base", src)),
           "oracle_recovers": ratio(diff("merged", "oracle"), diff("merged", src)),
           "harc_recovers_of_oracle": ratio(diff("merged", "calibrated"), diff("merged", "oracle")),
           "harc_recovers": ratio(diff("merged", "calibrated"), diff("merged", src))}
    return {k: v for k, v in out.items() if v is not None}


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


@dataclass
class Evaluation:
    """What to measure on one task's held-out sequences in a pass over a checkpoint.

    ``keep_routing``: keep the router logits of real tokens at every MoE layer, under the model's
    own router and, given ``ref_routers``, under those reference routers (same inputs x).
    ``routers``: routers run in place of the checkpoint's at those layers (the oracle row).
    ``masks``: per token whether the held-out data's calibration mode selects it (None: every token);
    the loss counts the predictions of selected tokens, the routing the selected tokens' rows.
    """

    seqs: list[list[int]]
    masks: Optional[list[list[bool]]] = None
    keep_routing: bool = False
    ref_routers: Optional[dict[int, torch.Tensor]] = None
    routers: Optional[dict[int, torch.Tensor]] = None


@dataclass
class CheckpointEval:
    results: dict  # {name: TaskEval}, one per Evaluation under the name it was given
    routers: dict[int, torch.Tensor]  # the checkpoint's own routers as the model holds them, float32, CPU


def router_matrix(module) -> torch.Tensor:
    """A router module's weight (K, d), or [W | b] (K, d + 1) when it has a bias (GPT-OSS)."""
    w = module.weight.detach().float()
    bias = getattr(module, "bias", None)
    return w if bias is None else torch.cat([w, bias.detach().float()[:, None]], dim=1)


def affine_logits(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """Router logits of inputs x (n, d) for a (K, d) or (K, d + 1) = [W | b] router, float32."""
    r = router.to(device=x.device, dtype=torch.float32)
    if r.shape[1] == x.shape[1] + 1:
        return torch.nn.functional.linear(x, r[:, :-1], r[:, -1])
    return torch.nn.functional.linear(x, r)


class _RouterLogits:
    """Forward hooks on the routers of the MoE layers that keep, for the batch running now, the
    router logits of its real tokens under the module's weight as it is at that moment (the model's
    own routing) and under the evaluation's reference routers."""

    def __init__(self, model, fam, layers: list[int], num_evaluations: int, logit_map=None):
        self.batch: Optional[tuple[int, torch.Tensor, Optional[dict]]] = None  # (evaluation, mask, refs)
        # what the router does to its logits before its link (a soft cap): the kept logits are mapped
        self.logit_map = logit_map or (lambda z: z)
        # per evaluation and layer: the own and the reference logits of each batch, in order
        self.parts: list[dict[int, tuple[list, list]]] = [{} for _ in range(num_evaluations)]
        self._handles = [fam.router_module(model, l).register_forward_hook(self._hook(l)) for l in layers]

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            if self.batch is None:
                return
            index, mask, refs = self.batch
            x = inputs[0].reshape(-1, inputs[0].shape[-1])[mask].float()
            own, ref = self.parts[index].setdefault(layer, ([], []))
            own.append(self.logit_map(affine_logits(x, router_matrix(module))).cpu())
            if refs is not None:
                ref.append(self.logit_map(affine_logits(x, refs[layer])).cpu())

        return hook

    def collect(self, index: int, result: TaskEval) -> None:
        for layer, (own, ref) in self.parts[index].items():
            if own:
                result.own_logits[layer] = torch.cat(own)
            if ref:
                result.ref_logits[layer] = torch.cat(ref)
        self.parts[index] = {}

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _router_tensors(model, fam, j: int, routers: torch.Tensor) -> dict[str, torch.Tensor]:
    """{parameter name in decoder layer ``j``: value} that put router matrix ``routers`` ((K, d), or
    [W | b] (K, d + 1) for a router with a bias) in place of the layer's router."""
    router = fam.router_module(model.model, j)
    params = dict(model.layer(j).named_parameters())
    name_of = {id(p): n for n, p in params.items()}
    if getattr(router, "bias", None) is not None:
        return {name_of[id(router.bias)]: routers[:, -1], name_of[id(router.weight)]: routers[:, :-1]}
    return {name_of[id(router.weight)]: routers}


@torch.no_grad()
def evaluate_checkpoint(path: Path | str, layers: list[int], evaluations: Union[Mapping, list[Evaluation]],
                        batch_size: int, device: torch.device, trust_remote_code: bool = False,
                        dtype: Optional[torch.dtype] = None, scratch_dir: Optional[Path] = None) -> CheckpointEval:
    """Held-out loss and (where asked) per-layer router logits of real tokens, in sequence order, of
    several evaluations on one checkpoint, which is never loaded whole (harc_hpc.models.onload).
    ``evaluations``: {name: Evaluation} (a list: named by position); the results carry the same names.

    Every evaluation's batches are embedded; then each decoder layer is onloaded once, every batch
    of every evaluation is pushed through it (an evaluation with its own ``routers`` has them put in
    place of the layer's while its batches run) and it is freed; at the end the final norm and the
    LM head are onloaded once and give each sequence's next-token NLL over its real tokens. Batches
    are padded as a whole-model forward pads them, so the numbers are the whole model's (bit for bit
    on CPU; tests/test_report_onload.py).

    Peak memory: one decoder layer, or the embeddings, or the final norm and LM head with one batch's
    logits (B, T, V); plus the hidden states of every evaluation of the pass, right-padded, in the
    compute dtype: sum over batches of B * T * hidden_size * itemsize. Those are on the device when
    they fit beside two decoder layers, else in host memory, else memory-mapped on node-local disk
    (capture_activations.BatchStates), so host memory stays bounded whatever their size. Kept router
    logits add float32 (tokens, experts) per MoE layer of the evaluations that keep routing.
    """
    from harc_hpc.models.layerwise import embed_batches, run_layers
    from harc_hpc.models.onload import OnloadedModel
    from harc_hpc.stages.capture_activations import BatchStates, placement_for

    named = evaluations if isinstance(evaluations, Mapping) else dict(enumerate(evaluations))
    names, evaluations = list(named), list(named.values())
    model = OnloadedModel(path, device, dtype=dtype, trust_remote_code=trust_remote_code)
    fam = model.family
    d = model.config.hidden_size
    plans = [_batch_plan(ev, batch_size, model.device) for ev in evaluations]
    nbytes = sum(b.ids.numel() for plan in plans for b in plan) * d * model.dtype.itemsize
    widest = max((model.layer_bytes(j) for j in range(model.num_layers)), default=0)
    placement = placement_for(nbytes, model.device, widest)
    results = [TaskEval() for _ in evaluations]
    states: list[BatchStates] = []
    recorder = _RouterLogits(model.model, fam, layers, len(evaluations),
                             logit_map=fam.router_logit_map(model.ckpt.config))
    observer = _EvaluationObserver(model, layers, plans, evaluations, recorder)
    try:
        for plan in plans:
            states.append(BatchStates([tuple(b.ids.shape) for b in plan], d, model.dtype, model.device,
                                      placement, scratch_dir=scratch_dir))
            embed_batches(model, states[-1], [b.ids for b in plan])
        model.release_embeddings()
        # an evaluation with its own routers has them in place of the layer's while its batches run
        swaps = {e: {j: _router_tensors(model, fam, j, ev.routers[j]) for j in layers if j in ev.routers}
                 for e, ev in enumerate(evaluations) if ev.routers is not None}
        run_layers(model, dict(enumerate(states)), range(model.num_layers), observer=observer,
                   group_overrides=swaps, label="evaluation")
        for plan, st, result in zip(plans, states, results):
            for i, batch in enumerate(plan):
                _add_heldout_loss(result, model.head_logits(st.get(i)), batch)
            st.close()
        model.release_head()
    finally:
        recorder.close()
        for st in states:
            st.close()
        model.close()
    for e, result in enumerate(results):
        recorder.collect(e, result)
    return CheckpointEval(dict(zip(names, results)), observer.routers)


@dataclass
class _Batch:
    """One batch of an evaluation: the padded ids (the loss needs them at the end), the lengths, where
    routing is kept the mask of real (and selected) tokens among the router's (B * T) rows, and with
    ``masks`` the selected tokens (B, T)."""

    ids: torch.Tensor
    lengths: list[int]
    routing_rows: Optional[torch.Tensor]
    selected: Optional[torch.Tensor]


def _batch_plan(ev: Evaluation, batch_size: int, device: torch.device) -> list[_Batch]:
    from harc_hpc.models.modeling import pad_batch

    plan = []
    for start in range(0, len(ev.seqs), batch_size):
        ids, lengths = pad_batch([torch.tensor(s, dtype=torch.long) for s in ev.seqs[start : start + batch_size]],
                                 pad_value=0)
        selected = None
        if ev.masks is not None:
            selected = torch.zeros(ids.shape, dtype=torch.bool)
            for i, m in enumerate(ev.masks[start : start + batch_size]):
                selected[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
        rows = None
        if ev.keep_routing:
            rows = torch.zeros(ids.shape, dtype=torch.bool)
            for i, n in enumerate(lengths):
                rows[i, :n] = True
            if selected is not None:
                rows &= selected
            rows = rows.reshape(-1).to(device)
        plan.append(_Batch(ids, lengths, rows, selected))
    return plan


class _EvaluationObserver(LayerObserver):
    """What an evaluation pass collects per layer:
    the checkpoint's own routers as onloaded, and the router logits of the batches whose evaluation
    keeps routing."""

    def __init__(self, model, layers: list[int], plans: list[list[_Batch]], evaluations: list[Evaluation],
                 recorder: "_RouterLogits"):
        self.model, self.layers, self.plans, self.evaluations, self.recorder = model, layers, plans, evaluations, recorder
        self.routers: dict[int, torch.Tensor] = {}  # float32, CPU

    def layer_start(self, j):
        if j in self.layers:
            self.routers[j] = router_matrix(self.model.family.router_module(self.model.model, j)).cpu().clone()

    def batch_start(self, j, e, i):
        rows = self.plans[e][i].routing_rows
        if rows is not None and j in self.layers:
            self.recorder.batch = (e, rows, self.evaluations[e].ref_routers)

    def batch_end(self, j, e, i, hidden):
        self.recorder.batch = None


def _add_heldout_loss(result: TaskEval, logits: torch.Tensor, batch: _Batch) -> None:
    """Next-token loss over real tokens only (right padding: pads come after every real token), one
    sequence at a time: a float32 copy of a whole batch's logits can be GBs. With ``selected``, only
    the predictions of selected tokens (position t predicts token t + 1)."""
    ids = batch.ids.to(logits.device)
    for b, n in enumerate(batch.lengths):
        if n < 2:
            continue
        if batch.selected is None:
            nll = torch.nn.functional.cross_entropy(logits[b, : n - 1].float(), ids[b, 1:n], reduction="sum")
            result.nll += float(nll)
            result.tokens += n - 1
            continue
        keep = batch.selected[b, 1:n].to(logits.device)
        if bool(keep.any()):
            nll = torch.nn.functional.cross_entropy(logits[b, : n - 1][keep].float(), ids[b, 1:n][keep],
                                                    reduction="sum")
            result.nll += float(nll)
            result.tokens += int(keep.sum())


# -- the metrics ------------------------------------------------------------------------------------

def _heldout_tasks(cfg: PipelineConfig) -> list[str]:
    return [s.name for s in cfg.models.sources if s.heldout is not None and s.heldout.files]


def _tokenized_heldout(cfg: PipelineConfig, tokenizer) -> dict[str, tuple[list[list[int]], Optional[list]]]:
    """Per task with held-out data: its sequences and, when its mode leaves tokens out (response),
    which tokens are selected (None: all of them)."""
    from harc_hpc.io.calibration_data import tokenize_task_masked

    out = {}
    for s in cfg.models.sources:
        if s.heldout is not None and s.heldout.files:
            seqs, masks = tokenize_task_masked(s.heldout, cfg.calibration, tokenizer, heldout=True)
            out[s.name] = (seqs, None if all(map(all, masks)) else masks)
    return out


@dataclass
class _ReportPasses:
    """What every evaluation pass of the report shares: the model's shape and routing rule, the
    held-out text of each task, and how a checkpoint is evaluated."""

    cfg: PipelineConfig
    conf: dict
    fam: object
    layers: list[int]
    tokenized: dict
    device: torch.device

    @property
    def top_k(self) -> int:
        return self.fam.top_k(self.conf)

    def heldout(self, t: str, **kw) -> Evaluation:
        seqs, masks = self.tokenized[t]
        return Evaluation(seqs, masks=masks, **kw)

    def selectors(self, path) -> dict:
        """Per MoE layer, the expert choice of the checkpoint at ``path`` by the family's own rule
        (with its selection bias, DeepSeek-V3); empty for plain top-k routers."""
        fam, layers = self.fam, self.layers
        if fam.router_bias_key(layers[0] if layers else 0) is None:
            return {}
        from harc_hpc.io.checkpoint import Checkpoint

        ckpt = Checkpoint(path)
        return {l: (lambda z, b=ckpt.get_tensor(fam.router_bias_key(l)): fam.selection_mask(self.conf, z, b))
                for l in layers}

    def run(self, path, evaluations: dict) -> CheckpointEval:
        return evaluate_checkpoint(path, self.layers, evaluations, self.cfg.calibration.batch_size, self.device,
                                   trust_remote_code=self.cfg.models.trust_remote_code,
                                   scratch_dir=self.cfg.run.node_local_dir)


@dataclass
class _SourceRouting:
    """The sources' side of the comparison: each source's routers, and its routing on its own task."""

    routers: dict = field(default_factory=dict)  # source -> {layer: router matrix}
    logits: dict = field(default_factory=dict)  # task -> {layer: the task's source's own logits}
    select: dict = field(default_factory=dict)  # source -> {layer: selection rule}


def _predicted_tokens(seqs, masks) -> int:
    """The tokens the loss counts."""
    if masks is None:
        return sum(max(0, len(s) - 1) for s in seqs)
    return sum(sum(m[1:]) for m in masks)


def model_metrics(cfg: PipelineConfig, run_dir: Path) -> dict:
    """Held-out losses and routing divergences of sources, base, merged, calibrated and oracle.

    One layer-wise pass (``evaluate_checkpoint``) per checkpoint, each layer read once: a source or
    the base over every task's held-out text, the merged model over every task twice (its own
    routers, and source t's routers on task t for the oracle), the calibrated model once. The
    largest pass, the merged one, holds the hidden states of twice the held-out text.
    """
    from transformers import AutoTokenizer

    from harc_hpc.io.calibration_data import effective_settings
    from harc_hpc.models.families import family_for_config
    from harc_hpc.models.modeling import pick_device
    from harc_hpc.report.training import training_models
    from harc_hpc.stages import layout

    run_dir = Path(run_dir)
    merged_dir, model_dir = layout.merged_dir(run_dir), layout.model_dir(run_dir)
    for d, stage in ((merged_dir, "merge-experts"), (model_dir, "assemble-model")):
        if not (d / "config.json").is_file():
            raise ReportError(f"{d}: no checkpoint here (run {stage} first)")
    conf = json.loads((merged_dir / "config.json").read_text())
    fam = family_for_config(conf)
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir), trust_remote_code=cfg.models.trust_remote_code)
    passes = _ReportPasses(cfg, conf, fam, list(fam.moe_layers(conf)), _tokenized_heldout(cfg, tokenizer),
                           pick_device(cfg.harc.device))
    tasks = list(passes.tokenized)
    modes = {s.name: effective_settings(s.heldout, cfg.calibration, heldout=True)["mode"]
             for s in cfg.models.sources if s.name in passes.tokenized}
    out: dict = {"tasks": tasks, "layers": passes.layers, "top_k": passes.top_k, "family": fam.name,
                 "link": fam.router_link,
                 "heldout_tokens": {t: _predicted_tokens(*passes.tokenized[t]) for t in tasks},
                 "heldout_mode": {t: modes[t] for t in tasks},
                 "loss": {t: {} for t in tasks}}
    if not tasks:
        out["note"] = "no task has held-out data (models.sources[*].heldout): no losses or routing metrics"
        return out

    sources = _evaluate_sources(passes, out)
    if cfg.models.base:
        ev = passes.run(resolve_model_path(cfg.models.base, revision=cfg.models.revision),
                        {t: passes.heldout(t) for t in tasks})
        for t in tasks:
            out["loss"][t]["base"] = ev.results[t].loss

    router_level: dict = {}
    end_to_end: dict = {}
    # Expert usage per layer: each source on its own task, the merged and calibrated models on every task.
    usage: dict = {f"source:{t}": {t: [expert_usage(sources.logits[t][l], passes.top_k, sources.select.get(t, {}).get(l))
                                       for l in passes.layers]} for t in sources.logits}
    # the training baselines' models (router-distill; docs/training.md) when the config enables them
    for name, path in (("merged", merged_dir), ("calibrated", model_dir), *training_models(cfg, run_dir)):
        t0 = time.perf_counter()
        router_level[name], end_to_end[name], usage[name] = _evaluate_model(
            passes, sources, name, path, out, oracle=name == "merged")
        log.info("report: %s model evaluated (%.1fs)", name, time.perf_counter() - t0)
    out["expert_usage"] = usage
    out["routing"] = {"router_level": router_level}
    if cfg.report.top_k_end_to_end:
        out["routing"]["end_to_end"] = end_to_end
    out["summary"] = summarize(out)
    return out


def _evaluate_sources(passes: _ReportPasses, out: dict) -> _SourceRouting:
    """Each source's losses on every task (forgetting shows) and its routing on its own task (the
    end-to-end reference)."""
    sources = _SourceRouting()
    tasks = list(passes.tokenized)
    for src in passes.cfg.models.sources:
        t0 = time.perf_counter()
        src_path = resolve_model_path(src.path, revision=passes.cfg.models.revision)
        sources.select[src.name] = passes.selectors(src_path)
        ev = passes.run(src_path, {t: passes.heldout(t, keep_routing=(t == src.name)) for t in tasks})
        sources.routers[src.name] = ev.routers
        for t in tasks:
            out["loss"][t][f"source:{src.name}"] = ev.results[t].loss
            if t == src.name:
                sources.logits[t] = ev.results[t].own_logits
        log.info("report: source %s evaluated (%.1fs)", src.name, time.perf_counter() - t0)
    return sources


def _evaluate_model(passes: _ReportPasses, sources: _SourceRouting, name: str, path, out: dict,
                    oracle: bool) -> tuple[dict, dict, dict]:
    """(router-level, end-to-end, expert usage) of one model on every task whose source has routers,
    its losses into ``out``; with ``oracle`` (the merged model) also the oracle (source t's routers on
    task t) and, with ``report.router_swap``, every other source's routers on every task."""
    cfg, layers, top_k, link = passes.cfg, passes.layers, passes.top_k, passes.fam.router_link
    routed = [t for t in passes.tokenized if t in sources.routers]
    evaluations = {("routed", t): passes.heldout(t, keep_routing=True, ref_routers=sources.routers[t])
                   for t in routed}
    swaps: list[tuple[str, str]] = []
    if oracle:
        evaluations.update({("oracle", t): passes.heldout(t, routers=sources.routers[t]) for t in routed})
        if cfg.report.router_swap:  # Fig. 1
            swaps = [(t, r) for t in routed for r in sources.routers if r != t]
            evaluations.update({("swap", t, r): passes.heldout(t, routers=sources.routers[r]) for t, r in swaps})
    results = passes.run(path, evaluations).results
    own_select = passes.selectors(path)
    router_level, end_to_end, usage = {}, {}, {}
    for t in routed:
        ev = results["routed", t]
        out["loss"][t][name] = ev.loss
        ref_select = sources.select.get(t, {})
        rl = [routing_divergence(ev.ref_logits[l], ev.own_logits[l], top_k, link=link,
                                 select_ref=ref_select.get(l), select=own_select.get(l)) for l in layers]
        router_level[t] = {"kl": [r[0] for r in rl], "topk_mismatch": [r[1] for r in rl]}
        if cfg.report.top_k_end_to_end:
            ee = [routing_divergence(sources.logits[t][l], ev.own_logits[l], top_k, link=link,
                                     select_ref=ref_select.get(l), select=own_select.get(l)) for l in layers]
            end_to_end[t] = {"kl": [r[0] for r in ee], "topk_mismatch": [r[1] for r in ee],
                             **token_deviation(sources.logits[t], ev.own_logits, layers, top_k,
                                               ref_select, own_select)}
        usage[t] = [expert_usage(ev.own_logits[l], top_k, own_select.get(l)) for l in layers]
    if oracle:
        for t in routed:
            out["loss"][t]["oracle"] = results["oracle", t].loss
        if swaps:
            swap = {t: {"merged": out["loss"][t]["merged"], t: out["loss"][t]["oracle"]} for t in routed}
            for t, r in swaps:
                swap[t][r] = results["swap", t, r].loss
            out["router_swap"] = swap
    return router_level, end_to_end, usage


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
    shares = {t: gap_shares(losses, t) for t, losses in m.get("loss", {}).items()}
    if any(shares.values()):
        s["gap_shares"] = shares
    # How specialised the sources are: per layer, the overlap of two sources' expert usage, each on
    # its own task (mean over pairs of sources).
    own = [per_layer for name, per in m.get("expert_usage", {}).items() if name.startswith("source:")
           for per_layer in per.values()]
    if len(own) >= 2:
        pairs = [(a, b) for i, a in enumerate(own) for b in own[i + 1:]]
        s["expert_usage_overlap"] = [_mean([usage_overlap(a[l], b[l]) for a, b in pairs]) for l in range(len(own[0]))]
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
                                                        "kl_before", "kl_after", "alpha", "objective", "solver",
                                                        "unrouted_experts")}
    return out


def stage_statistics(run_dir: Path) -> dict:
    """Per stage: tasks done, summed and longest wall time, largest peak RSS, the bytes its artifacts
    occupy and those deleted after use (run.retention), from the launcher's records."""
    from harc_hpc.pipeline import records

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
        s["disk_bytes"] = s.get("disk_bytes", 0) + records.disk_bytes(rec)
        s["retired_bytes"] = s.get("retired_bytes", 0) + records.retired_bytes(rec)
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
        device = rec.get("device")
        if isinstance(device, str):  # what computed the task (records before 0.1 do not say)
            s["devices"] = sorted({*s.get("devices", []), device})
    return stages
