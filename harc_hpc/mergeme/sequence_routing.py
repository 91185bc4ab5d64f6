"""Sequence-level routing at inference (MergeME §3.1.3 and App. C): a model class, not a checkpoint.

MergeME replaces the token-level router of an MoE built from dense experts by a rule that looks at
the whole input sequence x once and picks K experts with weights alpha for all of its tokens:

* **PPL routing** (§3.1.3): PPL(x | theta_e) = exp(-1/t sum_j log P(x_j | x_<j, theta_e)) with
  theta_e the *dense expert model itself* (the model continued-pretrained on domain e, as the paper
  writes it; the base when the base is an expert). Here the sum runs over the t - 1 tokens that
  have a prefix (the first token has no prediction), in float64 from the model's logits.
  alpha = softmax(top-K(1 / PPL_1, ..., 1 / PPL_E)): the softmax is over the K largest 1/PPL
  values themselves, as the paper writes it (1/PPL lies in (0, 1], so the weights are close to
  uniform among the chosen; the choice is what matters).
* **Task-vector routing** (App. C): s_e = cos(g, tau_e) over all parameters, with g the gradient
  of the base's mean next-token loss on x and tau_e = theta_base - theta_e, the task vector as
  MergeME §3.1.2 defines it (base minus expert). That sign is the one App. C's reasoning needs (a
  task vector "represents the cumulative gradient of the base model on the expert's training
  data": fine-tuning moves the weights *against* the gradient, so theta_e - theta_base points
  away from g on in-domain inputs; measured on tiny models trained on two disjoint token ranges,
  cos(g, theta_e - theta_base) was about -0.1 for the in-domain expert and +0.01 for the other).
  alpha = softmax(top-K(s_1, ..., s_E)). The base as an expert has tau = 0 and scores 0.

The K experts and weights are then used for every token of the sequence (and for every generated
token: the routing is decided on the prompt once), in one of two architectures:

* ``attention: merged`` (MergeME's "merge attention" rows): the MoE written by ``build-moe``
  (merged attention, norms, embeddings and head; the experts' FFNs) with every MoE layer's router
  replaced by the sequence's choice: FFN(v) = sum_k alpha_k FFN_k(v) for every token v. Nothing
  else of the MoE changes (Qwen2-MoE's shared expert still adds its half).
* ``attention: separate`` (MergeME's "separate attention"): every expert keeps its own attention,
  like its FFN: the sequence is routed to the whole dense expert models. In each decoder layer
  h <- h + sum_k alpha_k Attn_k(norm1_k(h)), then h <- h + sum_k alpha_k FFN_k(norm2_k(h)); the
  embeddings are sum_k alpha_k Emb_k(x) and the logits sum_k alpha_k Head_k(norm_k(h)) (the paper
  does not say what becomes of embeddings, norms and head once attention is separate; taking each
  expert's own makes top-1 routing exactly the chosen expert model). The MoE's merged tensors
  are not used.

``SequenceRoutedLM`` holds the dense expert models (and the base for task-vector routing, and the
built MoE for merged attention), all in memory. ``forward`` gives logits, ``generate`` greedy
tokens; ``SequenceRoutedLM.from_build(moe_dir, ...)`` loads everything from a ``build-moe`` output
and its record (``harc_mergeme.json``: experts, and the paths of the dense models they came from).
``lm_eval_model(wrapper, tokenizer)`` is an ``lm_eval.api.model.LM`` that lm-eval's
``simple_evaluate`` drives (loglikelihood, rolling loglikelihood, greedy ``generate_until``).
The report of a ``mergeme`` run measures both rules (harc_hpc.report.mergeme.sequence_routing_metrics).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from harc_hpc.errors import InputDataError, UsageError

ROUTERS = ("ppl", "task_vector")
ATTENTIONS = ("merged", "separate")

TokenIds = Union[torch.Tensor, Sequence[int]]


@dataclass(frozen=True)
class SequenceRouting:
    """The experts one sequence goes to: indices into the wrapper's experts, best first, their
    weights (summing to one) and every expert's score (1/PPL or the cosine; None when the routing
    was given rather than computed)."""

    experts: tuple[int, ...]
    weights: tuple[float, ...]
    scores: Optional[tuple[float, ...]] = None

    def as_dict(self, names: Sequence[str]) -> dict:
        out = {"experts": [names[e] for e in self.experts], "weights": list(self.weights)}
        if self.scores is not None:
            out["scores"] = {n: s for n, s in zip(names, self.scores)}
        return out


def top_k_softmax(scores: torch.Tensor, k: int) -> SequenceRouting:
    """MergeME's alpha = softmax(top-K(scores)); ties go to the lower expert index."""
    order = torch.sort(scores.double(), descending=True, stable=True).indices[:k]
    chosen = scores.double()[order]
    weights = torch.softmax(chosen, dim=0)
    return SequenceRouting(tuple(int(i) for i in order), tuple(float(w) for w in weights),
                           tuple(float(s) for s in scores.double()))


def sequence_nll(model, ids: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats) of ids[1:] given their prefixes, float64."""
    with torch.no_grad():
        logits = model(input_ids=ids[None].to(model.device), use_cache=False).logits[0]
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return float(-logp.gather(1, ids[1:, None].to(logp.device)).mean())


def _as_ids(ids: TokenIds, what: str = "input_ids") -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long) if not isinstance(ids, torch.Tensor) else ids.long()
    if t.dim() != 1:
        raise UsageError(f"{what}: one sequence of token ids (1-D) expected, got shape {tuple(t.shape)}")
    return t.cpu()


# ---------------------------------------------------------------------------------------------
# Separate attention: one transformers model whose sublayers are mixtures over the experts
# ---------------------------------------------------------------------------------------------

class _Active:
    """The routing of the sequence being computed (shared by the mixture modules)."""

    routing: Optional[SequenceRouting] = None

    def get(self) -> SequenceRouting:
        if self.routing is None:
            raise RuntimeError("a sequence-routed model was run without a routing")
        return self.routing


class _Mixture(nn.Module):
    """sum_k alpha_k f_k(x) over the active experts; f_e = the modules of ``branches[e]`` applied in
    order (a norm, then the attention / FFN / head). An attention returns (output, weights): the
    mixture returns (mixed output, None) like it."""

    def __init__(self, branches: Sequence[Sequence[nn.Module]], active: _Active, attention: bool):
        super().__init__()
        self.branches = nn.ModuleList(nn.ModuleList(b) for b in branches)
        self.active = active
        self.attention = attention

    def forward(self, hidden_states, *args, **kwargs):
        routing = self.active.get()
        total = None
        for e, w in zip(routing.experts, routing.weights):
            *pre, last = self.branches[e]
            x = hidden_states
            for m in pre:
                x = m(x)
            y = last(x, *args, **kwargs)[0] if self.attention else last(x)
            total = y * w if total is None else total + y * w
        return (total, None) if self.attention else total


def _separate_attention_model(experts: Sequence[nn.Module], active: _Active) -> nn.Module:
    """A transformers model of the experts' class whose embedding, every attention (with its input
    norm), every FFN (with its norm) and the head (with the final norm) are mixtures of the experts'
    own; mask and rotary embeddings are computed once by the model (the experts share a config)."""
    from transformers import AutoModelForCausalLM

    from harc_hpc.models.modeling import decoder

    first = experts[0]
    with torch.device("meta"):
        host = AutoModelForCausalLM.from_config(first.config)
    dec = decoder(host)
    cores = [decoder(m) for m in experts]
    dec.embed_tokens = _Mixture([[c.embed_tokens] for c in cores], active, attention=False)
    dec.rotary_emb = cores[0].rotary_emb
    for l, layer in enumerate(dec.layers):
        layer.input_layernorm = nn.Identity()
        layer.self_attn = _Mixture([[c.layers[l].input_layernorm, c.layers[l].self_attn] for c in cores],
                                   active, attention=True)
        layer.post_attention_layernorm = nn.Identity()
        layer.mlp = _Mixture([[c.layers[l].post_attention_layernorm, c.layers[l].mlp] for c in cores],
                             active, attention=False)
    dec.norm = nn.Identity()
    host.lm_head = _Mixture([[decoder(m).norm, m.lm_head] for m in experts], active, attention=False)
    left = [n for n, t in [*host.named_parameters(), *host.named_buffers()] if t.is_meta]
    if left:  # a family with parts this surgery does not know: refuse rather than compute garbage
        raise UsageError(f"separate attention: {type(first).__name__} has parts that are not "
                         f"mixed ({', '.join(left[:3])}); supported: Llama/Mistral/Qwen2/Qwen3-style "
                         f"decoders")
    return host.eval()


# ---------------------------------------------------------------------------------------------
# The wrapper
# ---------------------------------------------------------------------------------------------

def check_options(router: str, attention: str, top_k: int, names: Sequence[str]) -> None:
    if router not in ROUTERS:
        raise UsageError(f"router {router!r} is not a sequence-level rule; choose one of {ROUTERS}")
    if attention not in ATTENTIONS:
        raise UsageError(f"attention {attention!r}: choose one of {ATTENTIONS}")
    if not names:
        raise UsageError("no experts")
    if not 1 <= int(top_k) <= len(names):
        raise UsageError(f"top_k {top_k} must be between 1 and the {len(names)} experts {list(names)}")


class SequenceRoutedLM(nn.Module):
    """An MoE from dense experts with MergeME's sequence-level routing (module docstring).

    ``experts``: the dense expert models (transformers causal LMs of one architecture), in the
    MoE's expert order; ``base``: the dense base (task-vector routing; None otherwise);
    ``moe``: the built MoE (merged attention); ``base_expert``: the index of the expert that *is*
    the base (its task vector is zero), if any; ``moe_experts``: the MoE's expert index of each
    expert (default 0, 1, ...: a subset of the MoE's experts otherwise)."""

    def __init__(self, experts: Sequence[nn.Module], expert_names: Sequence[str], *,
                 router: str = "ppl", attention: str = "merged", top_k: int = 2,
                 base: Optional[nn.Module] = None, moe: Optional[nn.Module] = None,
                 base_expert: Optional[int] = None, moe_experts: Optional[Sequence[int]] = None):
        super().__init__()
        names = list(expert_names)
        check_options(router, attention, top_k, names)
        if len(experts) != len(names):
            raise UsageError(f"{len(experts)} expert models but {len(names)} names {names}")
        if len(set(names)) != len(names):
            raise UsageError(f"expert names must be unique: {names}")
        shape = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")
        for name, m in zip(names, experts):
            for f in shape:
                a, b = getattr(experts[0].config, f, None), getattr(m.config, f, None)
                if a != b:
                    raise UsageError(f"expert {name!r} has {f} {b!r} but {names[0]!r} has {a!r}; "
                                     f"the experts must share one architecture")
        if router == "task_vector" and base is None:
            raise UsageError("task_vector routing needs the base model (its gradient on the input)")
        if attention == "merged" and moe is None:
            raise UsageError("attention 'merged' needs the built MoE model (moe=...)")
        self.expert_names = names
        self.router, self.attention, self.top_k = router, attention, int(top_k)
        self.experts = nn.ModuleList(experts)
        self.base = base
        self.moe = moe
        self.base_expert = base_expert
        self.moe_experts = list(moe_experts) if moe_experts is not None else list(range(len(names)))
        if len(self.moe_experts) != len(names):
            raise UsageError(f"moe_experts {self.moe_experts} must give one MoE index per expert {names}")
        self._active = _Active()
        self._host = _separate_attention_model(list(experts), self._active) if attention == "separate" else None
        self._tau_sq_norms: Optional[list[float]] = None
        if moe is not None:
            self._check_moe(moe)

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_build(cls, moe_dir: Union[str, Path], *, router: str = "ppl", attention: str = "merged",
                   top_k: Optional[int] = None, experts: Optional[Sequence[str]] = None,
                   device: Union[str, torch.device] = "cpu",
                   dtype: Optional[torch.dtype] = None) -> "SequenceRoutedLM":
        """The wrapper of a ``build-moe`` output directory: the experts and the dense models they came
        from are read from its record (``harc_mergeme.json``). ``experts``: a subset of the experts
        by name (default all); ``top_k``: default the build's."""
        from harc_hpc.mergeme.build import RECORD
        from harc_hpc.mergeme.spec import BASE_NAME
        from harc_hpc.models.modeling import load_causal_lm

        moe_dir = Path(moe_dir)
        record_file = moe_dir / RECORD
        if not record_file.is_file():
            raise InputDataError(f"no {RECORD}: not a build-moe output (sequence routing needs its "
                                 f"record of the experts and their dense models)", where=str(moe_dir))
        record = json.loads(record_file.read_text())
        all_names = [e["name"] for e in record["experts"]]
        chosen = list(experts) if experts is not None else all_names
        unknown = [n for n in chosen if n not in all_names]
        if unknown:
            raise UsageError(f"unknown expert(s) {unknown}; the build has {all_names}", where=str(record_file))
        k = int(top_k if top_k is not None else record["top_k"])
        check_options(router, attention, k, chosen)  # before any model is loaded
        paths = {i["name"]: Path(i["path"]) for i in record["inputs"]}
        device = torch.device(device)
        loaded: dict[str, nn.Module] = {}

        def dense(source: str) -> nn.Module:
            if source not in loaded:
                path = paths[source]
                if not (path / "config.json").is_file():
                    raise InputDataError(f"dense model {source!r} recorded at {path} is not there "
                                         f"(sequence routing runs the dense experts)", where=str(record_file))
                loaded[source] = load_causal_lm(path, device, dtype=dtype)
            return loaded[source]

        by_name = {e["name"]: e for e in record["experts"]}
        models = [dense(by_name[n]["ffn_from"]) for n in chosen]
        base_expert = next((j for j, n in enumerate(chosen) if by_name[n]["ffn_from"] == BASE_NAME), None)
        base = dense(BASE_NAME) if router == "task_vector" else None
        moe = load_causal_lm(moe_dir, device, dtype=dtype) if attention == "merged" else None
        return cls(models, chosen, router=router, attention=attention, top_k=k, base=base, moe=moe,
                   base_expert=base_expert, moe_experts=[by_name[n]["index"] for n in chosen])

    def _check_moe(self, moe) -> None:
        from harc_hpc.models.families import family_for_config

        conf = moe.config.to_dict()
        fam = family_for_config(conf)
        bad = [i for i in self.moe_experts if not 0 <= i < fam.num_experts(conf)]
        if bad:
            raise UsageError(f"the MoE has {fam.num_experts(conf)} experts; no expert {bad} "
                             f"(experts {self.expert_names} -> MoE experts {self.moe_experts})")

    # -- routing ----------------------------------------------------------------------------------
    def expert_index(self, name: str) -> int:
        if name not in self.expert_names:
            raise UsageError(f"unknown expert {name!r}; the experts are {self.expert_names}")
        return self.expert_names.index(name)

    def fixed_routing(self, weights: Mapping[str, float]) -> SequenceRouting:
        """A routing given by hand ({expert name: weight}, weights summing to one)."""
        if not weights:
            raise UsageError("a routing needs at least one expert")
        idx = [self.expert_index(n) for n in weights]
        w = [float(v) for v in weights.values()]
        if any(v < 0 for v in w) or abs(sum(w) - 1.0) > 1e-6:
            raise UsageError(f"routing weights must be non-negative and sum to 1: {dict(weights)}")
        return SequenceRouting(tuple(idx), tuple(w))

    def scores(self, ids: TokenIds) -> torch.Tensor:
        """(E,) float64: 1/PPL of each dense expert (ppl) or cos(g, tau_e) (task_vector) on ``ids``."""
        ids = _as_ids(ids)
        if ids.numel() < 2:
            raise UsageError(f"sequence-level routing needs at least 2 tokens (a perplexity or a loss "
                             f"needs one predicted token); got {ids.numel()}")
        if self.router == "ppl":
            return torch.tensor([math.exp(-sequence_nll(m, ids)) for m in self.experts], dtype=torch.float64)
        return self._task_vector_scores(ids)

    def _task_vector_scores(self, ids: torch.Tensor) -> torch.Tensor:
        from harc_hpc.mergeme.routers import task_vector_scores

        params = [None if e == self.base_expert else dict(m.named_parameters())
                  for e, m in enumerate(self.experts)]

        def expert_tensor(e: int, name: str) -> Optional[torch.Tensor]:
            if params[e] is None:
                return None  # the base as an expert: a zero task vector
            if name not in params[e]:
                raise InputDataError(f"expert {self.expert_names[e]!r} has no parameter {name} (the "
                                     f"base has it); experts must share the base's architecture")
            return params[e][name].detach().cpu()  # task_vector_scores sums in float64 on the CPU

        s, self._tau_sq_norms = task_vector_scores(self.base, ids[None], expert_tensor, len(self.experts),
                                                   self._tau_sq_norms)
        return s

    def route(self, ids: TokenIds) -> SequenceRouting:
        """The sequence's top-K experts and weights (MergeME's alpha)."""
        return top_k_softmax(self.scores(ids), self.top_k)

    # -- computing --------------------------------------------------------------------------------
    @contextmanager
    def _routed(self, routing: SequenceRouting) -> Iterator[nn.Module]:
        """The model to run with ``routing`` in force: the MoE with its routers replaced (merged
        attention) or the mixture of the experts (separate attention)."""
        if self.attention == "separate":
            self._active.routing = routing
            try:
                yield self._host
            finally:
                self._active.routing = None
            return
        from harc_hpc.models.families import family_for_config

        conf = self.moe.config.to_dict()
        fam = family_for_config(conf)
        moe_index = [self.moe_experts[e] for e in routing.experts]

        def replace(module, args, output):
            # the MoE block uses (logits, top-k weights, top-k indices): same experts, same weights
            # for every token of the sequence
            logits, weights, _ = output
            n = logits.shape[0]
            w = torch.tensor(routing.weights, dtype=weights.dtype, device=weights.device).expand(n, -1)
            i = torch.tensor(moe_index, dtype=torch.long, device=weights.device).expand(n, -1)
            return logits, w.contiguous(), i.contiguous()

        handles = [fam.router_module(self.moe, l).register_forward_hook(replace) for l in fam.moe_layers(conf)]
        try:
            yield self.moe
        finally:
            for h in handles:
                h.remove()

    def _check_routing(self, routing: SequenceRouting) -> None:
        bad = [e for e in routing.experts if not 0 <= e < len(self.experts)]
        if bad or len(routing.experts) != len(routing.weights) or not routing.experts:
            raise UsageError(f"invalid routing {routing}: experts are 0..{len(self.experts) - 1}")

    def forward(self, input_ids: torch.Tensor, routing: Union[None, SequenceRouting,
                                                             Sequence[SequenceRouting]] = None) -> torch.Tensor:
        """Logits (B, T, V) of ``input_ids`` (B, T), without padding. Each row is routed on itself
        unless ``routing`` (one for all rows, or one per row) is given."""
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        if routing is None or isinstance(routing, SequenceRouting):
            routings = [routing] * ids.shape[0]
        else:
            routings = list(routing)
            if len(routings) != ids.shape[0]:
                raise UsageError(f"{len(routings)} routings for {ids.shape[0]} sequences")
        out = []
        for row, r in zip(ids, routings):
            r = r if r is not None else self.route(row)
            self._check_routing(r)
            with torch.no_grad(), self._routed(r) as model:
                out.append(model(input_ids=row[None].to(self._device), use_cache=False).logits[0])
        logits = torch.stack(out)
        return logits if input_ids.dim() == 2 else logits[0]

    @property
    def _device(self) -> torch.device:
        return next(self.experts[0].parameters()).device

    def generate(self, input_ids: TokenIds, max_new_tokens: int, *, eos_token_id: Optional[int] = None,
                 routing: Optional[SequenceRouting] = None,
                 stop: Optional[Callable[[list[int]], bool]] = None) -> list[int]:
        """Greedy continuation of one prompt (token ids): up to ``max_new_tokens`` new tokens, ending
        after ``eos_token_id`` or when ``stop(new tokens)`` says so. The routing is decided on the
        prompt (or given) and kept for every generated token. Merged attention decodes with the
        MoE's KV cache; separate attention recomputes the sequence at each step (no shared cache
        for a mixture of attentions)."""
        ids = _as_ids(input_ids)
        if ids.numel() == 0:
            raise UsageError("generate: empty prompt")
        r = routing if routing is not None else self.route(ids)
        self._check_routing(r)
        new: list[int] = []
        with torch.no_grad(), self._routed(r) as model:
            cache = None
            step_ids = ids[None].to(self._device)
            seq = ids.tolist()
            for _ in range(int(max_new_tokens)):
                if self.attention == "merged":
                    out = model(input_ids=step_ids, cache=cache, use_cache=True)
                    cache = out.cache
                else:
                    out = model(input_ids=torch.tensor([seq], device=self._device), use_cache=False)
                tok = int(out.logits[0, -1].argmax())
                new.append(tok)
                seq.append(tok)
                step_ids = torch.tensor([[tok]], device=self._device)
                if (eos_token_id is not None and tok == eos_token_id) or (stop is not None and stop(new)):
                    break
        return new


# ---------------------------------------------------------------------------------------------
# lm-eval
# ---------------------------------------------------------------------------------------------

def lm_eval_model(wrapper: SequenceRoutedLM, tokenizer):
    """An ``lm_eval.api.model.LM`` driving ``wrapper`` (``lm_eval.simple_evaluate(model=...)``).

    Requests are scored one at a time (each is routed on its own). The routing input is the
    request's context (what a generation would see); a context of fewer than 2 tokens (nothing
    to score a perplexity on) is routed on context + continuation. ``generate_until`` is greedy
    only (sampling settings are refused) and cuts the text at the first ``until`` string."""
    from lm_eval.api.model import LM

    class SequenceRoutedEvalLM(LM):
        def __init__(self):
            super().__init__()
            self.model = wrapper
            self.tokenizer = tokenizer
            self._routings: dict[tuple, SequenceRouting] = {}

        @property
        def eot_token_id(self) -> int:
            eos = tokenizer.eos_token_id
            if eos is None:
                raise UsageError("the tokenizer has no end-of-text token; set tokenizer.eos_token")
            return int(eos)

        def _encode(self, text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        def _routing(self, ids: list[int], fallback: list[int]) -> SequenceRouting:
            key = tuple(ids if len(ids) >= 2 else fallback)
            if key not in self._routings:
                self._routings[key] = wrapper.route(list(key))
            return self._routings[key]

        def _continuation_logprob(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
            full = ctx + cont
            routing = self._routing(ctx, full)
            logits = wrapper(torch.tensor(full[:-1])[None], routing=routing)[0]
            logp = torch.log_softmax(logits[len(ctx) - 1:].double(), dim=-1)
            target = torch.tensor(cont, device=logp.device)
            total = float(logp.gather(1, target[:, None]).sum())
            greedy = bool(torch.equal(logp.argmax(-1), target))
            return total, greedy

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            out = []
            for req in requests:
                context, continuation = req.args
                # lm-eval's convention: trailing spaces of the context belong to the continuation
                n = len(context) - len(context.rstrip(" "))
                if n:
                    context, continuation = context[:-n], context[-n:] + continuation
                whole = self._encode(context + continuation)
                ctx = self._encode(context) if context else [self.eot_token_id]
                cont = whole[len(ctx):] if context else whole
                if not cont:
                    raise UsageError(f"loglikelihood: empty continuation after {context[-40:]!r}")
                out.append(self._continuation_logprob(ctx, cont))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            out = []
            for req in requests:
                (text,) = req.args
                ids = self._encode(text)
                out.append(self._continuation_logprob([self.eot_token_id], ids)[0] if ids else 0.0)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for req in requests:
                context, gen = req.args
                gen = dict(gen or {})
                until = gen.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(gen.pop("max_gen_toks", 256))
                if gen.pop("do_sample", False) or float(gen.pop("temperature", 0.0) or 0.0) > 0:
                    raise UsageError("the sequence-routed model generates greedily only "
                                     "(do_sample: false, temperature: 0)")
                ids = self._encode(context) or [self.eot_token_id]

                def stop(new: list[int]) -> bool:
                    text = tokenizer.decode(new)
                    return any(u in text for u in until)

                new = wrapper.generate(ids, max_new, eos_token_id=self.eot_token_id,
                                       routing=self._routing(ids, ids), stop=stop)
                if new and new[-1] == self.eot_token_id:
                    new = new[:-1]
                text = tokenizer.decode(new)
                for u in until:
                    text = text.split(u)[0]
                out.append(text)
            return out

    return SequenceRoutedEvalLM()
