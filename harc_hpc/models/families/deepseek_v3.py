"""DeepSeek-V3 (``model_type: deepseek_v3``; Moonlight and other checkpoints of that architecture).

The router is a *sigmoid* gate: scores s = sigmoid(W x) per expert. Selection adds the
``e_score_correction_bias`` (a load-balancing bias, used for the choice only), keeps the ``topk_group``
groups of ``n_group`` with the largest sum of their two best biased scores, and takes the top-k of
the biased scores inside them; the weights are the *unbiased* scores of the chosen experts,
normalised (``norm_topk_prob``) and scaled by ``routed_scaling_factor``. The first
``first_k_dense_replace`` layers are dense MLPs; every MoE layer also has shared experts (merged like
any other tensor). HARC calibrates W with the sigmoid gates' Bernoulli-KL objective (docs/solver.md);
the correction bias is merged like any other tensor and never calibrated.

DeepSeek-V3's and Kimi-K2's released weights are FP8 blocks with scales (``quantization_config``):
the checkpoint reader dequantizes them on read (harc_hpc.io.quantized, bit for bit as transformers
does) and the merge writes bfloat16, or FP8 blocks again with ``output.quantize: fp8-block``; bf16
checkpoints of this architecture (Moonlight, fine-tunes saved in bf16) are read as they are.
"""

from __future__ import annotations

from typing import Optional

import torch

from harc_hpc.models.families.base import MoEFamily


def grouped_topk_mask(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int) -> torch.Tensor:
    """(n, K) bool: the experts DeepSeek-V3's router selects for router logits ``logits``."""
    n, k = logits.shape
    scores = torch.sigmoid(logits.float()) + bias.float()
    if n_group > 1:
        grouped = scores.view(n, n_group, k // n_group)
        group_scores = grouped.topk(min(2, k // n_group), dim=-1)[0].sum(dim=-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, torch.topk(group_scores, topk_group, dim=-1)[1], True)
        scores = scores.masked_fill(~keep.repeat_interleave(k // n_group, dim=1), float("-inf"))
    mask = torch.zeros(n, k, dtype=torch.bool, device=logits.device)
    mask.scatter_(1, torch.topk(scores, top_k, dim=-1)[1], True)
    return mask


class DeepseekV3Family(MoEFamily):
    name = "deepseek_v3"
    router_kind = "sigmoid, correction bias in the choice, group-limited top-k"
    # kimi_k2: Kimi-K2 checkpoints, the same architecture and tensor names under their own model_type
    # (their modeling code ships with the checkpoint: models.trust_remote_code: true)
    model_types = ("deepseek_v3", "kimi_k2")
    router_link = "sigmoid"

    def num_experts(self, cfg: dict) -> int:
        return int(cfg["n_routed_experts"])

    def moe_layers(self, cfg: dict) -> list[int]:
        first = int(cfg.get("first_k_dense_replace") or 0)
        freq = int(cfg.get("moe_layer_freq") or 1)
        return [l for l in range(first, self.num_layers(cfg)) if l % freq == 0]

    def normalize_topk(self, cfg: dict) -> bool:
        return bool(cfg.get("norm_topk_prob", True))

    def router_bias_key(self, layer: int) -> Optional[str]:
        return self.disk_key(layer, "mlp.gate.e_score_correction_bias")

    def selection_mask(self, cfg: dict, logits: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        k = logits.shape[1]
        bias = torch.zeros(k) if bias is None else bias
        return grouped_topk_mask(logits, bias.to(logits.device), self.top_k(cfg), int(cfg.get("n_group") or 1),
                                 int(cfg.get("topk_group") or 1))


class Glm4MoeFamily(DeepseekV3Family):
    """GLM-4.5 / GLM-4.6 (``model_type: glm4_moe``): the same sigmoid router with correction bias and
    grouped top-k, shared experts and dense first layers as DeepSeek-V3, with grouped-query attention."""

    name = "glm4_moe"
    model_types = ("glm4_moe",)
