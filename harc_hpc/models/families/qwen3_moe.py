"""Qwen3-MoE (``model_type: qwen3_moe``).

Layers listed in ``mlp_only_layers``, and layers that ``decoder_sparse_step`` skips, are dense MLPs
without a router; ``moe_layers`` leaves them out.
"""

from harc_hpc.models.families.base import MoEFamily


def sparse_layers(cfg: dict, num_layers: int, num_experts: int) -> list[int]:
    dense = set(cfg.get("mlp_only_layers") or [])
    step = int(cfg.get("decoder_sparse_step") or 1)
    if num_experts <= 0:
        return []
    return [l for l in range(num_layers) if l not in dense and (l + 1) % step == 0]


class Qwen3MoeFamily(MoEFamily):
    name = "qwen3_moe"
    model_types = ("qwen3_moe",)

    def moe_layers(self, cfg: dict) -> list[int]:
        return sparse_layers(cfg, self.num_layers(cfg), self.num_experts(cfg))
