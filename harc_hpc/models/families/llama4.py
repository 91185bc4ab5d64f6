"""Llama 4 text models (``model_type: llama4_text``: Llama-4-Scout/Maverick's language model).

MoE layers (``moe_layers`` in config.json, every ``interleave_moe_layer_step``-th layer) hold
``feed_forward.router`` (a linear map without bias), fused experts ``feed_forward.experts.gate_up_proj``
(E, d, 2I) (gate then up columns) and ``down_proj`` (E, I, d), and a shared expert. The router picks
the top-k logits and weights each chosen expert by the *sigmoid* of its logit (the others get 0), so
HARC fits it with the sigmoid gates' Bernoulli-KL objective (docs/solver.md); the unchosen experts'
zero weight is approximated by their sigmoid there. Multimodal ``llama4`` checkpoints keep this model
under ``language_model.``: extract the text model first.
"""

from __future__ import annotations

import re
from typing import Optional

from harc_hpc.models.families.base import MoEFamily


class Llama4TextFamily(MoEFamily):
    name = "llama4_text"
    router_kind = "sigmoid of the top-k logits"
    model_types = ("llama4_text",)
    moe_disk_module = "feed_forward"
    ffn_memory_module = "feed_forward"
    router_link = "sigmoid"
    router_memory_param = "feed_forward.router.weight"
    fused_orientation = "in_out"

    def _fused_re(self) -> re.Pattern:
        return re.compile(rf"^{self._layer_re()}\.feed_forward\.experts\.(gate_up|down)_proj$")

    def moe_layers(self, cfg: dict) -> list[int]:
        if cfg.get("moe_layers") is not None:
            return [int(l) for l in cfg["moe_layers"]]
        step = int(cfg.get("interleave_moe_layer_step") or 1)
        return [l for l in range(self.num_layers(cfg)) if (l + 1) % step == 0]

    def router_disk_key(self, layer: int, layout="per_expert") -> str:
        return self.disk_key(layer, "feed_forward.router.weight")

    def fused_key(self, layer: int, which) -> str:
        return self.disk_key(layer, f"feed_forward.experts.{which}_proj")

    def is_router_disk_key(self, key: str) -> bool:
        return re.fullmatch(rf"{self._layer_re()}\.feed_forward\.router\.weight", key) is not None

    def router_module(self, model, layer: int):
        ff = self.decoder_layers(model)[layer].feed_forward
        router = getattr(ff, "router", None)
        if router is None:
            raise ValueError(f"{self.name}: layer {layer} has no router (a dense layer?)")
        return router

    def expert_intermediate_size(self, cfg: dict) -> int:
        return int(cfg["intermediate_size"])

    def shared_expert_gate_key(self, layer: int) -> Optional[str]:
        return None
