"""GPT-OSS (``model_type: gpt_oss``).

The router is ``mlp.router``: a linear map *with a bias*, logits = W x + b; the top-k logits are
chosen and the routing weights are the softmax over those k only. HARC fits [W | b] as one (K, d + 1)
matrix on inputs [x, 1] (``intercept``), with the full-softmax objective: the softmax over the chosen
k is the full softmax renormalised on them, so matching the full distribution matches both the
choice and the weights (an approximation where the tail mass is large; docs/solver.md).

The experts are stored fused, ``mlp.experts.gate_up_proj`` (E, d, 2I) with gate and up columns
interleaved and ``down_proj`` (E, I, d), each with a bias: the *input* dimension comes first, the
transpose of transformers' other MoE families. Per-expert merges take each expert's (d, 2I) and
(I, d) matrices whole (gate and up are not separated) and WUDI transposes them to (out, in).

The released checkpoints store the experts in MXFP4 (``*_blocks`` / ``*_scales``): the checkpoint
reader dequantizes them to bfloat16 on read (harc_hpc.io.checkpoint.dequantize_mxfp4, the layout
transformers gives a dequantized model) and everything written from them is bfloat16; the merged
model's config.json loses its ``quantization_config`` and the merge record lists them.
"""

from __future__ import annotations

import re
from typing import Optional

from harc_hpc.models.families.base import MoEFamily


class GptOssFamily(MoEFamily):
    name = "gpt_oss"
    router_kind = "top-k of the logits (with a bias), softmax over the k"
    model_types = ("gpt_oss",)
    router_memory_param = "mlp.router.weight"
    router_intercept_param = "mlp.router.bias"
    fused_orientation = "in_out"
    attn_implementation = "eager"  # attention sinks: transformers has no SDPA path for them

    def router_disk_key(self, layer: int, layout="per_expert") -> str:
        return self.disk_key(layer, "mlp.router.weight")

    def router_intercept_key(self, layer: int) -> Optional[str]:
        return self.disk_key(layer, "mlp.router.bias")

    def is_router_disk_key(self, key: str) -> bool:
        return re.fullmatch(rf"{self._layer_re()}\.mlp\.router\.weight", key) is not None

    def router_module(self, model, layer: int):
        return self.decoder_layers(model)[layer].mlp.router

    def expert_intermediate_size(self, cfg: dict) -> int:
        return int(cfg["intermediate_size"])
