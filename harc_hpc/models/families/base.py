"""What the toolkit needs to know about one MoE model family, in on-disk tensor names.

Names say which side they are on: ``*_disk_*`` is the checkpoint's (a key, a prefix, a module name
on disk: ``router_disk_key``, ``moe_disk_module``, ``disk_layers_prefix``), ``*_memory_*`` the
transformers model's (``router_memory_param``, ``ffn_memory_module``); ``router_module`` returns the
in-memory router module itself.

transformers 5 fuses the experts of a layer in memory (``mlp.experts.gate_up_proj`` (E, 2I, d) with
gate rows before up rows, and ``mlp.experts.down_proj`` (E, d, I)) but ``save_pretrained`` writes them
back un-fused, one (I, d)/(d, I) matrix per expert, under the family's legacy names. Checkpoints
written by other tools (mergekit 0.1.5 on transformers 5, for example) may hold the fused names on
disk instead. Both layouts are read; ``detect_layout`` tells which one a key set uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal, Optional

import torch

from harc_hpc.errors import InputDataError, UnsupportedModelError  # noqa: F401  (re-exported)

Layout = Literal["per_expert", "fused"]
Proj = Literal["gate", "up", "down"]


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(n, K) bool: each row's ``k`` highest scores."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, torch.topk(scores, k, dim=1).indices, True)
    return mask


class _HalfDone(BaseException):
    """Stops a decoder layer's forward once its attention half is done. A control-flow signal, not an
    error: a BaseException, so that no ``except Exception`` in the model's own code can swallow it."""


@dataclass(frozen=True)
class ExpertTensor:
    """An expert weight identified from its on-disk key."""

    layer: int
    expert: Optional[int]  # None for a fused (E, ...) tensor
    proj: str  # "gate", "up", "down" (per expert) or "gate_up", "down" (fused)


class MoEFamily:
    """Base adapter; subclasses set the class attributes and override what differs."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    #: on disk, the decoder layers' common prefix (``backbone.layers`` for Nemotron-H, whose checkpoints
    #: transformers renames to ``model.layers`` on load)
    disk_layers_prefix: str = "model.layers"
    #: on-disk module holding the router and the experts (in memory transformers 5 calls it ``mlp``)
    moe_disk_module: str = "mlp"
    #: on-disk names of the per-expert gate, up and down projections
    proj_names: dict = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    #: other gates of a MoE layer that are *not* the softmax router (see Qwen2-MoE)
    extra_gate_suffixes: tuple[str, ...] = ()
    #: the router's kind as docs/models.md names it
    router_kind: str = "softmax, top-k"
    #: how the router turns logits into weights: "softmax" over experts, or "sigmoid" per expert
    #: (harc_hpc.math.operator.LINKS); it selects the objective the router is calibrated with
    router_link: str = "softmax"
    #: the router's weight (and, for a router with a bias, that bias) as named inside a decoder layer,
    #: in memory (the module path of ``router_module``)
    router_memory_param: str = "mlp.gate.weight"
    #: the router's weight inside a decoder layer as stored on disk, where that is not
    #: ``<moe_disk_module>.gate.weight`` (``router_disk_key``, ``is_router_disk_key``)
    router_disk_param: Optional[str] = None
    router_intercept_param: Optional[str] = None
    #: fused expert tensors stored under other names than transformers 5's ``experts.gate_up_proj`` /
    #: ``experts.down_proj``: {name under ``moe_disk_module`` (e.g. ``input_linear.weight``): "gate_up" | "down"}
    fused_disk_names: dict = {}
    #: fused expert tensors: (E, out, in) as transformers 5 keeps them, or (E, in, out) (GPT-OSS)
    fused_orientation: str = "out_in"
    #: transformers attention for calibration and evaluation (SDPA: causal without a mask tensor)
    attn_implementation: str = "sdpa"
    #: the feed-forward (MoE) module of a decoder layer, as named in memory
    ffn_memory_module: str = "mlp"
    #: the decoder layer is the standard pre-norm pair ``r = h + attn(input_layernorm(h))``,
    #: ``h' = r + ffn(post_attention_layernorm(r))`` and the router reads ``post_attention_layernorm(r)``:
    #: capture then stores the residual r once per calibrated layer and derives the router inputs on
    #: read (``attention_half`` / ``moe_half``; docs/pipeline.md). False: the layer-wise capture only.
    residual_capture: bool = True
    #: values a decoder layer returns besides the hidden state, which the backbone unpacks and hands
    #: to the next layer (GLM-5's indexer top-k): the layer-wise engine's stand-in layers return as
    #: many ``None``s, which is what the backbone gives the first layer
    layer_output_extras: int = 0

    def router_logit_map(self, cfg: dict):
        """What the router applies to its logits before its link, as a function of (n, K) logits
        (Laguna's soft cap ``c tanh(z / c)``); None: nothing. A router with a map has no closed-form
        curvature: it is calibrated with the generic objective (harc_hpc.math.generic_objective) on
        the exact probabilities ``link(map(W x))``, and the report's routing metrics read the mapped
        logits."""
        return None

    def check_config(self, cfg: dict) -> None:
        """Refuse (UnsupportedModelError) a configuration of this model type that harc-hpc cannot run."""

    # -- config ---------------------------------------------------------------------------------
    def num_layers(self, cfg: dict) -> int:
        return int(cfg["num_hidden_layers"])

    def num_experts(self, cfg: dict) -> int:
        for key in ("num_experts", "num_local_experts"):
            if cfg.get(key):
                return int(cfg[key])
        raise KeyError(f"{self.name}: config has neither num_experts nor num_local_experts")

    def top_k(self, cfg: dict) -> int:
        return int(cfg["num_experts_per_tok"])

    def normalize_topk(self, cfg: dict) -> bool:
        return bool(cfg.get("norm_topk_prob", False))

    def hidden_size(self, cfg: dict) -> int:
        return int(cfg["hidden_size"])

    def expert_intermediate_size(self, cfg: dict) -> int:
        return int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])

    def moe_layers(self, cfg: dict) -> list[int]:
        return list(range(self.num_layers(cfg)))

    def describe(self, cfg: dict) -> dict:
        return {
            "family": self.name,
            "num_layers": self.num_layers(cfg),
            "moe_layers": self.moe_layers(cfg),
            "num_experts": self.num_experts(cfg),
            "top_k": self.top_k(cfg),
            "normalize_topk": self.normalize_topk(cfg),
            "hidden_size": self.hidden_size(cfg),
        }

    # -- on-disk names --------------------------------------------------------------------------
    def disk_key(self, layer: int, name: str) -> str:
        """The on-disk key of tensor ``name`` (relative to a decoder layer) of decoder layer ``layer``."""
        return f"{self.disk_layers_prefix}.{layer}.{name}"

    def _layer_re(self) -> str:
        """A regex of the on-disk decoder-layer prefix with the layer index as group 1."""
        return rf"{re.escape(self.disk_layers_prefix)}\.(\d+)"

    def layer_of_key(self, key: str) -> Optional[int]:
        """The decoder layer an on-disk key belongs to (None for embeddings, final norm, head)."""
        m = re.match(rf"{self._layer_re()}\.", key)
        return int(m.group(1)) if m else None

    def _prefix(self, layer: int, layout: Layout) -> str:
        module = self.moe_disk_module if layout == "per_expert" else "mlp"
        return self.disk_key(layer, module)

    def router_disk_key(self, layer: int, layout: Layout = "per_expert") -> str:
        """The router weight (K, d) of ``layer`` under the checkpoint's layout."""
        if self.router_disk_param:
            return self.disk_key(layer, self.router_disk_param)
        return f"{self._prefix(layer, layout)}.gate.weight"

    def expert_key(self, layer: int, expert: int, proj: Proj) -> str:
        """One expert's projection in the per-expert (hub) layout."""
        return f"{self._prefix(layer, 'per_expert')}.experts.{expert}.{self.proj_names[proj]}.weight"

    def fused_key(self, layer: int, which: Literal["gate_up", "down"]) -> str:
        """A layer's fused expert tensor in the transformers-5 in-memory layout."""
        return self.disk_key(layer, f"mlp.experts.{which}_proj")

    def router_intercept_key(self, layer: int) -> Optional[str]:
        """The bias of the router's linear map (GPT-OSS), fitted with it as one more input column; None
        for routers without one."""
        return None

    def router_bias_key(self, layer: int) -> Optional[str]:
        """A selection-only bias of the router (DeepSeek-V3's e_score_correction_bias), or None."""
        return None

    def selection_mask(self, cfg: dict, logits: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """(n, K) bool: the experts the model's own rule selects for router logits ``logits``
        (default: the top-k logits; softmax is monotone)."""
        return top_k_mask(logits, self.top_k(cfg))

    def shared_expert_gate_key(self, layer: int) -> Optional[str]:
        """The on-disk key of ``layer``'s sigmoid shared-expert gate; None for families without one."""
        return None

    def find_router_disk_key(self, layer: int, keys: Iterable[str]) -> str:
        keys = set(keys)
        for layout in ("per_expert", "fused"):
            k = self.router_disk_key(layer, layout)
            if k in keys:
                return k
        raise KeyError(f"{self.name}: no router for layer {layer} (looked for "
                       f"{self.router_disk_key(layer)!r} and {self.router_disk_key(layer, 'fused')!r})")

    def _expert_re(self) -> re.Pattern:
        names = "|".join(re.escape(v) for v in self.proj_names.values())
        return re.compile(rf"^{self._layer_re()}\.{re.escape(self.moe_disk_module)}\.experts\.(\d+)\."
                          rf"({names})\.weight$")

    def _fused_re(self) -> re.Pattern:
        return re.compile(rf"^{self._layer_re()}\.mlp\.experts\.(gate_up|down)_proj$")

    def parse_expert_key(self, key: str) -> Optional[ExpertTensor]:
        m = self._expert_re().match(key)
        if m:
            inv = {v: k for k, v in self.proj_names.items()}
            return ExpertTensor(int(m.group(1)), int(m.group(2)), inv[m.group(3)])
        m = self._fused_re().match(key)
        if m:
            return ExpertTensor(int(m.group(1)), None, m.group(2))
        if self.fused_disk_names:
            names = "|".join(re.escape(n) for n in self.fused_disk_names)
            m = re.match(rf"^{self._layer_re()}\.{re.escape(self.moe_disk_module)}\.({names})$", key)
            if m:
                return ExpertTensor(int(m.group(1)), None, self.fused_disk_names[m.group(2)])
        return None

    def is_router_disk_key(self, key: str) -> bool:
        if self.router_disk_param:
            return re.fullmatch(rf"{self._layer_re()}\.{re.escape(self.router_disk_param)}", key) is not None
        return re.fullmatch(rf"{self._layer_re()}\.({re.escape(self.moe_disk_module)}|mlp)\.gate\.weight",
                            key) is not None

    def detect_layout(self, keys: Iterable[str]) -> Layout:
        fused = per = False
        for k in keys:
            e = self.parse_expert_key(k)
            if e is None:
                continue
            if e.expert is None:
                fused = True
            else:
                per = True
        if fused and per:
            raise ValueError(f"{self.name}: checkpoint mixes fused and per-expert expert tensors")
        return "fused" if fused else "per_expert"

    # -- in-memory modules ----------------------------------------------------------------------
    def decoder_layers(self, model):
        return model.model.layers

    def router_module(self, model, layer: int):
        """The router module of ``layer``; its forward's ``input[0]`` is the router input x,
        (tokens, d), i.e. the post-attention-norm output of that layer."""
        block = self.decoder_layers(model)[layer]
        try:
            gate = block.get_submodule(self.router_memory_param.rsplit(".", 1)[0])
        except AttributeError:
            gate = None
        if gate is None or not hasattr(gate, "weight"):
            raise ValueError(f"{self.name}: layer {layer} has no router (a dense layer?)")
        return gate

    # -- the two halves of a pre-norm decoder layer (residual_capture) ------------------------------
    def _check_halves(self, layer) -> None:
        missing = [n for n in ("input_layernorm", "post_attention_layernorm", self.ffn_memory_module) if not hasattr(layer, n)]
        if missing:
            raise TypeError(f"{self.name}: {type(layer).__name__} has no {missing}: not the pre-norm decoder "
                            f"layer that residual capture splits (set residual_capture = False)")

    def half_modules(self, half: str, layer=None) -> tuple[str, ...]:
        """The submodules of a decoder layer that ``attention_half`` (``half="attention"``) or
        ``moe_half`` (``"moe"``) uses: all a streamed capture onloads of the layers at its ends. The
        attention half of ``layer`` is every child but the feed-forward half's (attention, linear
        attention or a Mamba mixer, whatever the layer's type runs)."""
        moe = ("post_attention_layernorm", self.ffn_memory_module)
        if half == "moe":
            return moe
        if layer is None:
            return ("input_layernorm", "self_attn")
        return tuple(n for n, _ in layer.named_children() if n not in moe)

    def router_input_norm(self, layer) -> torch.nn.Module:
        """The norm whose output the router reads: router input = ``norm(r)`` for the residual ``r``
        entering the layer's feed-forward half."""
        self._check_halves(layer)
        return layer.post_attention_layernorm

    def attention_half(self, layer, hidden: torch.Tensor, **layer_kwargs) -> torch.Tensor:
        """The residual stream entering the feed-forward half of decoder layer ``layer``: the layer's
        own forward (``layer_kwargs``: what the backbone calls it with), stopped where it calls its
        post-attention norm, whose input is that residual. The operations are the layer's own, in
        its order, for every kind of token mixer (attention, linear attention, Mamba)."""
        self._check_halves(layer)
        caught: list = []

        def grab(module, args):
            caught.append(args[0])
            raise _HalfDone

        handle = self.router_input_norm(layer).register_forward_pre_hook(grab)
        try:
            layer(hidden, **layer_kwargs)
        except _HalfDone:
            pass
        finally:
            handle.remove()
        if not caught:
            raise TypeError(f"{self.name}: {type(layer).__name__}'s forward never called its post-attention norm")
        return caught[0]

    def moe_half(self, layer, residual: torch.Tensor) -> torch.Tensor:
        """The layer's output from the residual ``r`` entering its feed-forward half:
        ``r + ffn(post_attention_layernorm(r))`` (GPT-OSS's and Llama 4's MoE also return router scores)."""
        self._check_halves(layer)
        out = getattr(layer, self.ffn_memory_module)(layer.post_attention_layernorm(residual))
        if isinstance(out, tuple):
            out = out[0]
        return residual + out.view(residual.shape)

