"""Mixtral (``model_type: mixtral``): every layer is MoE and always renormalises its top-k weights.

On disk the MoE block is ``block_sparse_moe`` with experts ``w1`` (gate), ``w3`` (up), ``w2`` (down);
transformers 5 renames it ``mlp`` in memory, so the router key differs between the two layouts.
"""

from harc_hpc.models.families.base import MoEFamily


class MixtralFamily(MoEFamily):
    name = "mixtral"
    model_types = ("mixtral",)
    moe_disk_module = "block_sparse_moe"
    proj_names = {"gate": "w1", "up": "w3", "down": "w2"}

    def normalize_topk(self, cfg: dict) -> bool:
        return True
