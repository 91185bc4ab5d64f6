"""Model types whose router is DeepSeek-V3's (harc_hpc/models/families/deepseek_v3.py): sigmoid scores
per expert, a selection-only correction bias added for the choice, (group-limited) top-k of the biased
scores, the chosen experts weighted by their unbiased scores. What differs between them is where the
router, its bias and the experts live on disk and which layers are MoE; the selection rule is the
same (``selection_mask``, checked against each model's own router module in
tests/test_model_coverage_sigmoid.py), and HARC fits the router with the sigmoid gates' objective.

- ``glm4_moe_lite``, ``deepseek_v32``, ``solar_open``, ``dots1``: DeepSeek-V3's tensor names
  (``mlp.gate.weight``, ``mlp.gate.e_score_correction_bias``, per-expert ``gate/up/down_proj``,
  shared experts); MoE layers from ``mlp_layer_types`` where the config has it.
- ``minimax_m2``: Mixtral's on-disk layout (``block_sparse_moe``, experts ``w1``/``w3``/``w2``), the
  bias beside the router (``block_sparse_moe.e_score_correction_bias``), no groups, every layer MoE.
- ``afmoe``: the router is ``mlp.router.gate`` (a linear map), the bias ``mlp.expert_bias``, no
  groups; the decoder layer norms both sides of each half (``post_attention_layernorm`` on the
  attention output, ``pre_mlp_layernorm`` / ``post_mlp_layernorm`` around the MoE), so the router
  reads ``pre_mlp_layernorm(r)`` and the halves are split there.
- ``mimo_v2_flash``: DeepSeek-V3's names, no shared experts, attention with learned sinks
  (``attention_sink_bias`` on disk) that has no SDPA path: eager attention.
- ``exaone_moe``, ``minicpm5_moe``, ``hy_v3``: tensors renamed on load by transformers' conversion
  mapping (read through it by harc_hpc.models.conversion); the families name them as they are on
  disk: EXAONE-MoE's bias ``mlp.e_score_correction_bias`` (in memory under ``mlp.gate``), MiniCPM5's
  ``self_attn.q_proj`` (``q_gate_proj``), HY-V3's router ``mlp.router.gate.weight`` (``mlp.gate``),
  bias ``mlp.expert_bias`` (``mlp.e_score_correction_bias``) and ``mlp.shared_mlp`` (``shared_experts``).
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from harc_hpc.models.families.base import UnsupportedModelError, top_k_mask
from harc_hpc.models.families.unsupported import DOCS_PAGE
from harc_hpc.models.families.deepseek_v3 import DeepseekV3Family


class SigmoidBiasFamily(DeepseekV3Family):
    """DeepSeek-V3's router and tensor names; the expert count and the MoE layers read from whichever
    keys the config uses."""

    model_types: tuple[str, ...] = ()

    def num_experts(self, cfg: dict) -> int:
        for key in ("n_routed_experts", "num_experts", "num_local_experts"):
            if cfg.get(key):
                return int(cfg[key])
        raise KeyError(f"{self.name}: config has none of n_routed_experts, num_experts, num_local_experts")

    def moe_layers(self, cfg: dict) -> list[int]:
        kinds = cfg.get("mlp_layer_types")
        if kinds is not None:
            return [l for l, kind in enumerate(kinds[:self.num_layers(cfg)]) if kind == "sparse"]
        return super().moe_layers(cfg)


class Glm4MoeLiteFamily(SigmoidBiasFamily):
    """GLM-4.7-Flash (``glm4_moe_lite``): DeepSeek-V3's MLA attention and router, GLM's layer pattern."""

    name = "glm4_moe_lite"
    model_types = ("glm4_moe_lite",)


class DeepseekV32Family(SigmoidBiasFamily):
    """DeepSeek-V3.2 (``deepseek_v32``): DeepSeek-V3 with sparse (indexed) attention; the indexer is
    part of the attention half, run by the model's own code."""

    name = "deepseek_v32"
    model_types = ("deepseek_v32",)


class SolarOpenFamily(SigmoidBiasFamily):
    """Solar Open (``solar_open``): every layer MoE with shared experts, grouped-query attention."""

    name = "solar_open"
    model_types = ("solar_open",)


class Dots1Family(SigmoidBiasFamily):
    """dots.llm1 (``dots1``): dense first ``first_k_dense_replace`` layers, sliding / full attention."""

    name = "dots1"
    model_types = ("dots1",)


class MiniMaxM2Family(SigmoidBiasFamily):
    """MiniMax-M2 (``minimax_m2``): Mixtral's layout with a correction bias beside the router."""

    name = "minimax_m2"
    model_types = ("minimax_m2",)
    moe_disk_module = "block_sparse_moe"
    proj_names = {"gate": "w1", "up": "w3", "down": "w2"}

    def moe_layers(self, cfg: dict) -> list[int]:
        return list(range(self.num_layers(cfg)))

    def normalize_topk(self, cfg: dict) -> bool:
        return True

    def router_bias_key(self, layer: int) -> Optional[str]:
        return self.disk_key(layer, f"{self.moe_disk_module}.e_score_correction_bias")


class AfmoeFamily(SigmoidBiasFamily):
    """AFMoE (``afmoe``, Arcee's Trinity): the router under ``mlp.router.gate``, its bias
    ``mlp.expert_bias``, norms on both sides of each half of the decoder layer."""

    name = "afmoe"
    model_types = ("afmoe",)
    router_disk_param = "mlp.router.gate.weight"
    router_memory_param = "mlp.router.gate.weight"

    def moe_layers(self, cfg: dict) -> list[int]:
        first = int(cfg.get("num_dense_layers") or 0)
        return list(range(first, self.num_layers(cfg)))

    def normalize_topk(self, cfg: dict) -> bool:
        return True

    def router_bias_key(self, layer: int) -> Optional[str]:
        return self.disk_key(layer, "mlp.expert_bias")

    def router_module(self, model, layer: int):
        router = getattr(getattr(self.decoder_layers(model)[layer], "mlp", None), "router", None)
        if router is None:
            raise ValueError(f"{self.name}: layer {layer} has no router (a dense layer?)")
        return router.gate

    # the residual r enters pre_mlp_layernorm; the layer's output is r + post_mlp_layernorm(mlp(pre_mlp_layernorm(r)))
    _moe_half = ("pre_mlp_layernorm", "mlp", "post_mlp_layernorm")

    def _check_halves(self, layer) -> None:
        missing = [n for n in ("input_layernorm", "post_attention_layernorm", *self._moe_half) if not hasattr(layer, n)]
        if missing:
            raise TypeError(f"{self.name}: {type(layer).__name__} has no {missing}")

    def half_modules(self, half: str, layer=None) -> tuple[str, ...]:
        if half == "moe":
            return self._moe_half
        if layer is None:
            return ("input_layernorm", "self_attn", "post_attention_layernorm")
        return tuple(n for n, _ in layer.named_children() if n not in self._moe_half)

    def router_input_norm(self, layer) -> torch.nn.Module:
        self._check_halves(layer)
        return layer.pre_mlp_layernorm

    def moe_half(self, layer, residual: torch.Tensor) -> torch.Tensor:
        self._check_halves(layer)
        out = layer.post_mlp_layernorm(layer.mlp(layer.pre_mlp_layernorm(residual)))
        return residual + out.view(residual.shape)


class MiMoV2FlashFamily(SigmoidBiasFamily):
    """MiMo-V2-Flash (``mimo_v2_flash``): sliding / full attention with sinks (no SDPA in transformers)."""

    name = "mimo_v2_flash"
    model_types = ("mimo_v2_flash",)
    attn_implementation = "eager"


class ExaoneMoeFamily(SigmoidBiasFamily):
    """EXAONE-MoE (``exaone_moe``): the correction bias beside the router on disk."""

    name = "exaone_moe"
    model_types = ("exaone_moe",)

    def router_bias_key(self, layer: int) -> Optional[str]:
        return self.disk_key(layer, "mlp.e_score_correction_bias")


class MiniCpm5MoeFamily(SigmoidBiasFamily):
    """MiniCPM5-MoE (``minicpm5_moe``): a gated query projection (its on-disk ``q_proj``)."""

    name = "minicpm5_moe"
    model_types = ("minicpm5_moe",)


class HyV3Family(SigmoidBiasFamily):
    """Hunyuan 3 (``hy_v3``): MiniMax-M2's router (bias beside it, no groups, weights scaled by
    ``router_scaling_factor``) with shared experts; on disk the router is ``mlp.router.gate``."""

    name = "hy_v3"
    model_types = ("hy_v3",)
    router_disk_param = "mlp.router.gate.weight"

    def normalize_topk(self, cfg: dict) -> bool:
        return True

    def router_bias_key(self, layer: int) -> Optional[str]:
        return self.disk_key(layer, "mlp.expert_bias")


class MiniMaxM3VLTextFamily(SigmoidBiasFamily):
    """MiniMax-M3's text model (``minimax_m3_vl_text``): DeepSeek-V3's names with the experts fused on
    disk, no groups, MoE layers from ``mlp_layer_types``."""

    name = "minimax_m3_vl_text"
    model_types = ("minimax_m3_vl_text",)


class Lfm2MoeFamily(SigmoidBiasFamily):
    """LFM2-MoE (``lfm2_moe``): sigmoid scores with a selection-only ``expert_bias`` under
    ``feed_forward`` (Mixtral-style w1/w3/w2 experts), MoE from ``num_dense_layers`` on, in a stack of
    short convolutions and attention; the router reads ``ffn_norm``, so captured layer-wise."""

    name = "lfm2_moe"
    model_types = ("lfm2_moe",)
    router_disk_param = "feed_forward.gate.weight"
    router_kind = "sigmoid, correction bias in the choice, top-k"
    moe_disk_module = "feed_forward"
    ffn_memory_module = "feed_forward"
    proj_names = {"gate": "w1", "up": "w3", "down": "w2"}
    router_memory_param = "feed_forward.gate.weight"
    residual_capture = False

    def moe_layers(self, cfg: dict) -> list[int]:
        return list(range(int(cfg.get("num_dense_layers") or 0), self.num_layers(cfg)))

    def normalize_topk(self, cfg: dict) -> bool:
        return bool(cfg.get("norm_topk_prob", True))

    def router_bias_key(self, layer: int) -> Optional[str]:
        return self.disk_key(layer, "feed_forward.expert_bias")


class FlintFamily(SigmoidBiasFamily):
    """Flint (``flint``): sigmoid scores per expert, top-k of them (no bias, renormalised), a shared
    expert; MoE layers by Qwen3-MoE's ``decoder_sparse_step`` / ``mlp_only_layers``."""

    name = "flint"
    model_types = ("flint",)
    router_kind = "sigmoid, top-k"

    def moe_layers(self, cfg: dict) -> list[int]:
        from harc_hpc.models.families.qwen3_moe import sparse_layers

        return sparse_layers(cfg, self.num_layers(cfg), self.num_experts(cfg))

    def router_bias_key(self, layer: int) -> Optional[str]:
        return None


class Kolibri1Family(SigmoidBiasFamily):
    """Kolibri-1 (``kolibri1``): the choice is the top-k of the logits plus a correction bias (``moe.router
    .expert_bias`` on disk), the weights the sigmoid of the chosen logits; shared experts."""

    name = "kolibri1"
    model_types = ("kolibri1",)
    residual_capture = False  # its layer is not the plain pre-norm pair (checked: the halves differ)
    router_kind = "sigmoid, correction bias on the logits in the choice, top-k"

    def num_experts(self, cfg: dict) -> int:
        return int(cfg["num_local_experts"])

    def moe_layers(self, cfg: dict) -> list[int]:
        return list(range(self.num_layers(cfg)))

    def router_bias_key(self, layer: int) -> Optional[str]:
        return self.disk_key(layer, "moe.router.expert_bias")

    def selection_mask(self, cfg: dict, logits: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        scores = logits.float() if bias is None else logits.float() + bias.to(logits.device).float()
        return top_k_mask(scores, self.top_k(cfg))


class NemotronHFamily(SigmoidBiasFamily):
    """Nemotron-H / Nemotron-3 (``nemotron_h``): a stack of single-mixer blocks (``norm`` then ``mixer``:
    Mamba-2, attention, a dense MLP or a MoE, by ``layers_block_type``); the MoE mixer has DeepSeek-V3's
    router (``mixer.gate`` with its correction bias) and un-gated relu^2 experts (``up_proj`` /
    ``down_proj`` only). On disk the layers sit under ``backbone.layers`` (transformers renames them
    to ``model.layers`` on load). Not the pre-norm pair: captured layer-wise."""

    name = "nemotron_h"
    model_types = ("nemotron_h",)
    disk_layers_prefix = "backbone.layers"
    moe_disk_module = "mixer"
    ffn_memory_module = "mixer"
    proj_names = {"up": "up_proj", "down": "down_proj"}
    router_memory_param = "mixer.gate.weight"
    router_disk_param = "mixer.gate.weight"
    residual_capture = False

    def num_layers(self, cfg: dict) -> int:
        kinds = cfg.get("layers_block_type")
        return len(kinds) if kinds else super().num_layers(cfg)

    def moe_layers(self, cfg: dict) -> list[int]:
        return [l for l, kind in enumerate(cfg.get("layers_block_type") or []) if kind == "moe"]

    def router_bias_key(self, layer: int) -> Optional[str]:
        return self.disk_key(layer, "mixer.gate.e_score_correction_bias")


class KimiLinearFamily(SigmoidBiasFamily):
    """Kimi-Linear (``kimi_linear``): KDA linear attention beside MLA, DeepSeek-V3's router with Mixtral's
    on-disk layout (``block_sparse_moe``, its bias under ``block_sparse_moe.gate``, experts
    ``w1``/``w3``/``w2``) renamed ``mlp`` on load; its config writes Kimi's own key names
    (``num_experts_per_token``, ``num_expert_group``, ``moe_renormalize``)."""

    name = "kimi_linear"
    model_types = ("kimi_linear",)
    moe_disk_module = "block_sparse_moe"
    proj_names = {"gate": "w1", "up": "w3", "down": "w2"}

    def top_k(self, cfg: dict) -> int:
        return int(cfg.get("num_experts_per_token") or cfg["num_experts_per_tok"])

    def normalize_topk(self, cfg: dict) -> bool:
        return bool(cfg.get("moe_renormalize", True))

    def router_bias_key(self, layer: int) -> Optional[str]:
        return self.disk_key(layer, f"{self.moe_disk_module}.gate.e_score_correction_bias")

    def selection_mask(self, cfg: dict, logits: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        grouped = {**cfg, "n_group": cfg.get("num_expert_group") or cfg.get("n_group")}
        return super().selection_mask(grouped, logits, bias)


class GlmMoeDsaFamily(SigmoidBiasFamily):
    """GLM-5 (``glm_moe_dsa``): DeepSeek-V3.2's indexed attention and router; each decoder layer returns
    its indexer's top-k beside the hidden state, and a ``"shared"`` indexer layer (``indexer_types``)
    reuses the previous layer's instead of computing its own. With every indexer ``"full"`` (GLM-5 as
    released) no layer reads the top-k it is handed and the layers run one at a time; a configuration
    with shared indexers carries state from layer to layer, which the layer-wise engine does not, and
    is refused."""

    name = "glm_moe_dsa"
    model_types = ("glm_moe_dsa",)
    layer_output_extras = 1

    def check_config(self, cfg: dict) -> None:
        shared = [l for l, kind in enumerate(cfg.get("indexer_types") or []) if kind != "full"]
        if shared:
            raise UnsupportedModelError(
                f"model_type 'glm_moe_dsa' with indexer_types other than 'full' (layers {shared}) is not supported: "
                f"those layers reuse the previous layer's top-k, state carried across layers, and the "
                f"layer-wise engine runs one layer at a time", hint=f"{DOCS_PAGE} lists what each model type needs")


class LagunaFamily(SigmoidBiasFamily):
    """Laguna (``laguna``): sigmoid scores with a selection-only correction bias (on disk beside the
    experts, ``mlp.experts.e_score_correction_bias``), top-k renormalised, shared experts, a gated
    attention output; with ``moe_router_logit_softcapping`` c > 0 the logits are soft-capped,
    ``c tanh(z / c)``, before the sigmoid: no closed-form curvature fits that router, so it is
    calibrated with the generic objective on the exact capped gates (``router_logit_map``)."""

    name = "laguna"
    model_types = ("laguna",)
    router_kind = "sigmoid of soft-capped logits, correction bias in the choice, top-k"

    def normalize_topk(self, cfg: dict) -> bool:
        return True

    def router_bias_key(self, layer: int) -> Optional[str]:
        return self.disk_key(layer, "mlp.experts.e_score_correction_bias")

    def router_logit_map(self, cfg: dict):
        cap = float(cfg.get("moe_router_logit_softcapping") or 0.0)
        if cap <= 0:
            return None
        return lambda z: torch.tanh(z / cap) * cap

    def selection_mask(self, cfg: dict, logits: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        capped = self.router_logit_map(cfg)
        z = logits.float() if capped is None else capped(logits.float())
        scores = torch.sigmoid(z) + (0 if bias is None else bias.to(logits.device).float())
        return top_k_mask(scores, self.top_k(cfg))


#: the instances harc_hpc.models.families registers
SIGMOID_FAMILIES = (Glm4MoeLiteFamily(), DeepseekV32Family(), SolarOpenFamily(), Dots1Family(), MiniMaxM2Family(),
                    AfmoeFamily(), MiMoV2FlashFamily(), ExaoneMoeFamily(), MiniCpm5MoeFamily(), HyV3Family(),
                    MiniMaxM3VLTextFamily(), Lfm2MoeFamily(), FlintFamily(), Kolibri1Family(),
                    NemotronHFamily(), KimiLinearFamily(), GlmMoeDsaFamily(), LagunaFamily())
