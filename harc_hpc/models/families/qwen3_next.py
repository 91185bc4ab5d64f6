"""Qwen3-Next (``model_type: qwen3_next``) and the text model of Qwen3.5-MoE (``qwen3_5_moe_text``):
Qwen2-MoE's MoE layer (softmax top-k router, a shared expert with a sigmoid gate) in a hybrid stack
whose layers alternate gated linear attention (``linear_attn``) and full attention
(``config.layer_types``). The layer-wise forward runs either kind with the arguments the model's own
forward gives it (harc_hpc.models.onload), so nothing here is about the token mixers.
"""

from harc_hpc.models.families.qwen2_moe import Qwen2MoeFamily


class Qwen3NextFamily(Qwen2MoeFamily):
    name = "qwen3_next"
    model_types = ("qwen3_next", "qwen3_5_moe_text")
