"""OLMoE (``model_type: olmoe``): every layer is MoE; top-k probabilities not renormalised by default."""

from harc_hpc.models.families.base import MoEFamily


class OlmoeFamily(MoEFamily):
    name = "olmoe"
    model_types = ("olmoe",)
