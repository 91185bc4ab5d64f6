"""MoE families whose router is a linear map followed by a softmax over the experts (or, what is the
same for the HARC objective, a softmax over the top-k logits), beyond the first ones.

What differs between them is where the router lives (on disk and in memory), how the config names
the expert count and top-k, which layers are MoE, and what the model's own selection rule adds (a
correction bias). The layer-wise forward, the masks and the token mixers are the model's own
(harc_hpc.models.onload), and transformers' conversion mapping reads their renamed and fused
tensors (harc_hpc.models.conversion), so a family here declares only those facts. Each is checked by
tests/test_model_coverage.py: bit for bit against the whole model, and end to end.
"""

from __future__ import annotations

from typing import Optional

import torch

from harc_hpc.models.families.base import MoEFamily, top_k_mask
from harc_hpc.models.families.mixtral import MixtralFamily


class FlexOlmoFamily(MoEFamily):
    """FlexOlmo (``flex_olmo``): OLMoE's router in an Olmo-2 post-norm layer (the norms follow the
    attention and the MoE; the router reads the residual stream itself), so captured layer-wise."""

    name = "flex_olmo"
    model_types = ("flex_olmo",)
    residual_capture = False


class HunYuanMoeFamily(MoEFamily):
    """Hunyuan-A13B (``hunyuan_v1_moe``): the router is ``mlp.gate.wg``; a shared MLP beside the experts;
    softmax, top-k (``moe_topk``) renormalised."""

    name = "hunyuan_v1_moe"
    router_kind = "softmax, top-k renormalised"
    model_types = ("hunyuan_v1_moe",)
    router_disk_param = "mlp.gate.wg.weight"
    router_memory_param = "mlp.gate.wg.weight"

    def top_k(self, cfg: dict) -> int:
        k = cfg.get("moe_topk") or cfg.get("num_experts_per_tok")
        return int(k[0] if isinstance(k, (list, tuple)) else k)

    def num_experts(self, cfg: dict) -> int:
        e = cfg["num_experts"]
        return int(e[0] if isinstance(e, (list, tuple)) else e)

    def normalize_topk(self, cfg: dict) -> bool:
        return True


class GraniteMoeFamily(MoEFamily):
    """Granite-MoE (``granitemoe``, ``granitemoeshared``): the router (``block_sparse_moe.router``,
    ``router.layer`` on disk) takes the top-k logits and a softmax over them, which is the softmax
    renormalised over the top k; the experts are fused on disk (``input_linear`` (E, 2I, d),
    ``output_linear`` (E, d, I)). ``residual_multiplier`` scales the MoE's output inside the layer,
    so the layer is captured whole (layer-wise), not split at the residual."""

    name = "granitemoe"
    router_kind = "top-k of the logits, softmax over the k"
    model_types = ("granitemoe", "granitemoeshared")
    fused_disk_names = {"input_linear.weight": "gate_up", "output_linear.weight": "down"}
    router_disk_param = "block_sparse_moe.router.layer.weight"
    moe_disk_module = "block_sparse_moe"
    ffn_memory_module = "block_sparse_moe"
    router_memory_param = "block_sparse_moe.router.weight"
    residual_capture = False

    def normalize_topk(self, cfg: dict) -> bool:
        return True


class Ernie45MoeFamily(MoEFamily):
    """ERNIE-4.5-MoE (``ernie4_5_moe``): softmax router (``mlp.gate``) whose choice is the top-k of the
    probabilities plus a selection-only correction bias (``mlp.moe_statics.e_score_correction_bias``
    on disk, never trained by gradient: kept, the weights fitted); the chosen probabilities are
    renormalised (clamped at ``moe_norm_min``); shared experts beside; MoE layers from
    ``moe_layer_start_index`` to ``moe_layer_end_index`` every ``moe_layer_interval``."""

    name = "ernie4_5_moe"
    router_kind = "softmax, correction bias in the choice"
    model_types = ("ernie4_5_moe",)

    def num_experts(self, cfg: dict) -> int:
        return int(cfg["moe_num_experts"])

    def top_k(self, cfg: dict) -> int:
        return int(cfg["moe_k"])

    def normalize_topk(self, cfg: dict) -> bool:
        return True

    def moe_layers(self, cfg: dict) -> list[int]:
        start = int(cfg.get("moe_layer_start_index", 0))
        end = cfg.get("moe_layer_end_index")
        end = self.num_layers(cfg) - 1 if end is None or int(end) < 0 else int(end)
        step = int(cfg.get("moe_layer_interval") or 1)
        return [l for l in range(self.num_layers(cfg)) if start <= l <= end and (l - start) % step == 0]

    def router_bias_key(self, layer: int) -> Optional[str]:
        return self.disk_key(layer, "mlp.moe_statics.e_score_correction_bias")

    def selection_mask(self, cfg: dict, logits: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        scores = torch.softmax(logits.float(), dim=-1)
        if bias is not None:
            scores = scores + bias.to(device=scores.device, dtype=scores.dtype).reshape(-1)[: scores.shape[-1]]
        return top_k_mask(scores, self.top_k(cfg))


class AriaTextFamily(MoEFamily):
    """Aria's text model (``aria_text``): the router (``mlp.router``) takes the top-k logits and a
    softmax over them (the softmax renormalised over the top k); fused experts on disk
    (``mlp.experts.fc1`` / ``fc2``); shared experts beside."""

    name = "aria_text"
    router_kind = "top-k of the logits, softmax over the k"
    model_types = ("aria_text",)
    fused_disk_names = {"experts.fc1.weight": "gate_up", "experts.fc2.weight": "down"}
    router_disk_param = "mlp.router.weight"
    router_memory_param = "mlp.router.weight"

    def num_experts(self, cfg: dict) -> int:
        return int(cfg["moe_num_experts"])

    def top_k(self, cfg: dict) -> int:
        return int(cfg["moe_topk"])

    def normalize_topk(self, cfg: dict) -> bool:
        return True


class MellumFamily(MoEFamily):
    """Mellum (``mellum``): OLMoE's MoE layer (``mlp.gate``, per-expert projections), rotary embeddings
    built per layer type (the model's forward passes each layer its own)."""

    name = "mellum"
    model_types = ("mellum",)


class MiniMaxFamily(MixtralFamily):
    """MiniMax-Text-01 / M1 (``minimax``): Mixtral's MoE layer (``block_sparse_moe``, w1/w2/w3; softmax
    top-k renormalised) in a hybrid stack of lightning (linear) attention and full attention layers
    whose residual branches are scaled (``layernorm_*_alpha`` / ``_beta``), so captured layer-wise."""

    name = "minimax"
    model_types = ("minimax",)
    residual_capture = False


class GraniteMoeHybridFamily(GraniteMoeFamily):
    """Granite-4 hybrid (``granitemoehybrid``): Granite-MoE's router and fused experts in a stack of
    Mamba-2 and attention layers, a shared MLP beside the experts."""

    name = "granitemoehybrid"
    model_types = ("granitemoehybrid",)


class DeepseekV2Family(MoEFamily):
    """DeepSeek-V2 / V2-Lite (``deepseek_v2``): a softmax router (``mlp.gate``) choosing greedily
    (``topk_method: greedy``) or within the ``topk_group`` best of ``n_group`` expert groups ranked by
    their best score (``group_limited_greedy``); weights not renormalised unless ``norm_topk_prob``,
    scaled by ``routed_scaling_factor``; shared experts; dense layers before ``first_k_dense_replace``."""

    name = "deepseek_v2"
    router_kind = "softmax, group-limited greedy top-k"
    model_types = ("deepseek_v2",)

    def num_experts(self, cfg: dict) -> int:
        return int(cfg["n_routed_experts"])

    def moe_layers(self, cfg: dict) -> list[int]:
        first = int(cfg.get("first_k_dense_replace") or 0)
        step = int(cfg.get("moe_layer_freq") or 1)
        return [l for l in range(self.num_layers(cfg)) if l >= first and l % step == 0]

    def selection_mask(self, cfg: dict, logits: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        scores = torch.softmax(logits.float(), dim=-1)
        if cfg.get("topk_method") == "group_limited_greedy":
            groups = int(cfg["n_group"])
            best = scores.view(scores.shape[0], groups, -1).max(dim=-1).values
            keep = torch.zeros_like(best, dtype=torch.bool)
            keep.scatter_(1, torch.topk(best, int(cfg["topk_group"]), dim=-1).indices, True)
            scores = scores.masked_fill(~keep.repeat_interleave(scores.shape[1] // groups, dim=1), 0.0)
        return top_k_mask(scores, self.top_k(cfg))


class JambaFamily(MoEFamily):
    """Jamba (``jamba``): Mixtral-like experts under ``feed_forward`` (router ``feed_forward.router``)
    every ``expert_layer_period`` layers from ``expert_layer_offset``, in a stack of Mamba and attention
    layers; the router reads ``pre_ff_layernorm``'s output, so the layers are captured layer-wise."""

    name = "jamba"
    model_types = ("jamba",)
    router_disk_param = "feed_forward.router.weight"
    moe_disk_module = "feed_forward"
    ffn_memory_module = "feed_forward"
    router_memory_param = "feed_forward.router.weight"
    residual_capture = False

    def moe_layers(self, cfg: dict) -> list[int]:
        offset, period = int(cfg.get("expert_layer_offset", 1)), int(cfg.get("expert_layer_period", 2))
        return [l for l in range(self.num_layers(cfg)) if l % period == offset]


class Cohere2MoeFamily(MoEFamily):
    """Command-A MoE (``cohere2_moe``): the top-k logits and a softmax over them (the softmax
    renormalised over the top k; ``expert_selection_fn: softmax``, the default); sliding and full
    attention; MoE layers where ``mlp_layer_types`` says ``sparse``. Attention and MoE run in
    parallel on one normed input (Cohere's layer), so captured layer-wise."""

    name = "cohere2_moe"
    router_kind = "top-k of the logits, softmax over the k"
    model_types = ("cohere2_moe",)
    residual_capture = False

    def normalize_topk(self, cfg: dict) -> bool:
        return True

    def moe_layers(self, cfg: dict) -> list[int]:
        kinds = cfg.get("mlp_layer_types")
        if kinds is None:
            return super().moe_layers(cfg)
        return [l for l, kind in enumerate(kinds[: self.num_layers(cfg)]) if kind == "sparse"]


class GraniteMoeSWAFamily(GraniteMoeFamily):
    """Granite-MoE with sliding-window attention (``granitemoe_swa``): Granite's router and
    multipliers; the router and the fused experts are stored under their in-memory names."""

    name = "granitemoe_swa"
    model_types = ("granitemoe_swa",)
    fused_disk_names = {"experts.gate_up_proj": "gate_up", "experts.down_proj": "down"}
    router_disk_param = "block_sparse_moe.router.weight"


class PhimoeFamily(MixtralFamily):
    """Phi-3.5-MoE (``phimoe``): Mixtral's layout on disk, the router renamed ``mlp.router`` on load.
    Its router is a sparsemixer: at inference it picks the largest logit, then the largest of the
    rest (the top 2 of the logits, as softmax top-k picks), and weights each pick by a softmax over
    the logits within a relative threshold (``router_jitter_noise``) of that pick's. The choice is
    the softmax's top-k, so HARC fits it with the softmax objective: the refit router's logit order
    (what the sparsemixer reads) is what that objective matches; the threshold only shapes weights."""

    name = "phimoe"
    model_types = ("phimoe",)
    router_kind = "sparsemixer: the top 2 logits, each weighted by a thresholded softmax"
    router_memory_param = "mlp.router.weight"

    def top_k(self, cfg: dict) -> int:
        return 2  # the sparsemixer always picks two experts (num_experts_per_tok is not read)

    def normalize_topk(self, cfg: dict) -> bool:
        return False


class Gemma4TextFamily(MoEFamily):
    """Gemma 4's text model (``gemma4_text``, the 26B-A4B MoE): every layer runs a dense MLP and, in
    parallel, a MoE on the same residual; the router (``router``) RMS-normalises its input, scales
    it (``router.scale``, 1/sqrt(d)) and applies ``router.proj``, softmax, top-k renormalised, the
    weights then scaled per expert (``per_expert_scale``: weights only, not the choice). HARC fits
    ``router.proj`` on the normalised, scaled inputs it reads, with the softmax objective; the
    layer is not the pre-norm pair, so it is captured layer-wise. The experts are fused on disk
    (``experts.gate_up_proj`` / ``experts.down_proj`` directly under the layer).

    Per-layer input embeddings (``hidden_size_per_layer_input``, Gemma 4's small models) and KV
    sharing across layers (``num_kv_shared_layers``) hand each layer token- or layer-dependent state
    from outside it: refused (``check_config``)."""

    name = "gemma4_text"
    model_types = ("gemma4_text",)
    router_kind = "softmax, top-k renormalised, of a normed and scaled input; weights scaled per expert"
    moe_disk_module = "experts"
    fused_disk_names = {"gate_up_proj": "gate_up", "down_proj": "down"}
    router_memory_param = "router.proj.weight"
    router_disk_param = "router.proj.weight"
    residual_capture = False

    def check_config(self, cfg: dict) -> None:
        from harc_hpc.models.families.base import UnsupportedModelError
        from harc_hpc.models.families.unsupported import DOCS_PAGE

        problems = []
        if not cfg.get("enable_moe_block"):
            problems.append("enable_moe_block is false (a dense model: no router to calibrate)")
        if cfg.get("hidden_size_per_layer_input"):
            problems.append("hidden_size_per_layer_input > 0 (per-layer input embeddings, computed from the token "
                            "ids outside the decoder layers)")
        if cfg.get("num_kv_shared_layers"):
            problems.append("num_kv_shared_layers > 0 (later layers reuse earlier layers' keys and values)")
        if problems:
            raise UnsupportedModelError(f"model_type 'gemma4_text' with {'; '.join(problems)} is not supported",
                                        hint=f"{DOCS_PAGE} lists what each model type needs")

    def top_k(self, cfg: dict) -> int:
        return int(cfg.get("top_k_experts") or cfg["num_experts_per_tok"])

    def normalize_topk(self, cfg: dict) -> bool:
        return True

    def router_module(self, model, layer: int):
        router = getattr(self.decoder_layers(model)[layer], "router", None)
        if router is None:
            raise ValueError(f"{self.name}: layer {layer} has no router (a dense layer?)")
        return router.proj


SOFTMAX_FAMILIES = (PhimoeFamily(), Gemma4TextFamily(), FlexOlmoFamily(), HunYuanMoeFamily(), GraniteMoeFamily(), Ernie45MoeFamily(), AriaTextFamily(),
                    MellumFamily(), MiniMaxFamily(), GraniteMoeHybridFamily(), DeepseekV2Family(), JambaFamily(),
                    Cohere2MoeFamily(), GraniteMoeSWAFamily())
