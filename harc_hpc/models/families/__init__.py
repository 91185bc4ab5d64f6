"""MoE family adapters, looked up by a config's ``model_type``."""

from __future__ import annotations

from harc_hpc.models.families.base import ExpertTensor, Layout, MoEFamily, UnsupportedModelError
from harc_hpc.models.families.deepseek_v3 import DeepseekV3Family, Glm4MoeFamily
from harc_hpc.models.families.gpt_oss import GptOssFamily
from harc_hpc.models.families.llama4 import Llama4TextFamily
from harc_hpc.models.families.mixtral import MixtralFamily
from harc_hpc.models.families.olmoe import OlmoeFamily
from harc_hpc.models.families.qwen2_moe import Qwen2MoeFamily
from harc_hpc.models.families.qwen3_moe import Qwen3MoeFamily
from harc_hpc.models.families.qwen3_next import Qwen3NextFamily
from harc_hpc.models.families.softmax_routers import SOFTMAX_FAMILIES
from harc_hpc.models.families.sigmoid_routers import SIGMOID_FAMILIES
from harc_hpc.models.families.unsupported import DOCS_PAGE, refusal
from harc_hpc.models.families.wrappers import (WRAPPERS, check_wrapper_config, is_wrapper, wrapper_family,
                                               wrapper_for_config)

FAMILIES: dict[str, MoEFamily] = {}
for _fam in (OlmoeFamily(), Qwen3MoeFamily(), MixtralFamily(), Qwen2MoeFamily(), DeepseekV3Family(),
             Glm4MoeFamily(), GptOssFamily(), Llama4TextFamily(), Qwen3NextFamily(), *SOFTMAX_FAMILIES):
    FAMILIES[_fam.name] = _fam
FAMILIES.update({_fam.name: _fam for _fam in SIGMOID_FAMILIES})

# multimodal wrappers (their text model's family under the wrapper's on-disk prefix)
_TEXT = {mt: fam for fam in FAMILIES.values() for mt in fam.model_types}
FAMILIES.update({_wt: wrapper_family(_TEXT[_tt], _wt, _tt, _place) for _wt, (_tt, _place) in WRAPPERS.items()})

_BY_MODEL_TYPE = {mt: fam for fam in FAMILIES.values() for mt in fam.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def family_for_model_type(model_type: str) -> MoEFamily:
    return _BY_MODEL_TYPE[model_type]


def family_for_config(config: dict) -> MoEFamily:
    """The adapter for a model's ``config.json`` (as a dict)."""
    model_type = config.get("model_type")
    fam = _BY_MODEL_TYPE.get(model_type)
    if is_wrapper(fam):  # a multimodal wrapper (harc_hpc.models.families.wrappers)
        check_wrapper_config(config)
    elif fam is None:  # a wrapper not registered: its text_config names a text model with a family
        fam = wrapper_for_config(config, _TEXT, refusal)
    if fam is None and refusal(model_type):
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported: {refusal(model_type)}",
                                    hint=f"{DOCS_PAGE} lists every MoE model type and why")
    if fam is None:
        arch = ", ".join(config.get("architectures") or []) or "unknown"
        raise UnsupportedModelError(
            f"unsupported architecture: model_type={model_type!r} (architectures: {arch}). "
            f"Supported MoE families: {', '.join(supported_model_types())}",
            hint="a new family is one file under harc_hpc/models/families/ and one registry line: "
                 "docs/extending.md, 'A model family'")
    fam.check_config(config)
    return fam


__all__ = ["FAMILIES", "ExpertTensor", "Layout", "MoEFamily", "UnsupportedModelError",
           "family_for_config", "family_for_model_type", "is_wrapper", "supported_model_types"]
