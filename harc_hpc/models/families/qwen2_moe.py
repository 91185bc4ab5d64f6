"""Qwen2-MoE (``model_type: qwen2_moe``): Qwen3-MoE's layer rule plus a shared expert per layer.

The shared expert's ``shared_expert_gate`` (1, d) is a sigmoid scalar gate that scales the shared
expert's output; it is not the softmax router: it is merged like any other tensor and calibrated
only with ``harc.shared_expert_gate`` (a sigmoid gate's objective, docs/solver.md).
"""

from harc_hpc.models.families.base import MoEFamily
from harc_hpc.models.families.qwen3_moe import sparse_layers


class Qwen2MoeFamily(MoEFamily):
    name = "qwen2_moe"
    router_kind = "softmax, top-k; sigmoid shared-expert gate"
    model_types = ("qwen2_moe",)
    extra_gate_suffixes = ("mlp.shared_expert_gate.weight",)

    def moe_layers(self, cfg: dict) -> list[int]:
        return sparse_layers(cfg, self.num_layers(cfg), self.num_experts(cfg))

    def shared_expert_gate_key(self, layer: int) -> str:
        return self.disk_key(layer, "mlp.shared_expert_gate.weight")

    def shared_expert_key(self, layer: int, proj: str) -> str:
        """The shared expert's ``proj`` (gate, up or down) weight of ``layer``."""
        return self.disk_key(layer, f"mlp.shared_expert.{self.proj_names[proj]}.weight")

    def is_router_disk_key(self, key: str) -> bool:
        return super().is_router_disk_key(key) and "shared_expert_gate" not in key
