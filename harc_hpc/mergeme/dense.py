"""Dense source families and the MoE family each one becomes, in on-disk tensor names and configs.

A dense Llama/Mistral, Qwen3 or Qwen2 decoder keeps its FFN of layer ``l`` under
``model.layers.l.mlp.{gate,up,down}_proj.weight``; every other tensor (attention, norms,
embeddings, head) keeps its name in the MoE. The MoE side's names come from the MoE family
adapters (harc_hpc.models.families), so the checkpoint this package writes uses the same names
that ``save_pretrained`` of that family writes (per-expert matrices; transformers 5 fuses them
when it loads).

The output config is built from the dense config as transformers normalises it (``AutoConfig``:
legacy ``rope_scaling`` / ``rope_theta`` become ``rope_parameters``), keeping the fields the MoE
config class has. A dense feature the MoE class cannot express (attention or MLP biases in Llama,
Qwen3's per-layer sliding windows) is refused, naming the source and the field, rather than
dropped: the MoE would silently compute something else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from harc_hpc.merge.base import MergeInputError
from harc_hpc.models.families import FAMILIES, MoEFamily, supported_model_types

FFN_PROJS = ("gate", "up", "down")
_FFN_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")


def dense_ffn_key(layer: int, proj: str) -> str:
    """The dense FFN weight ``proj`` (gate, up or down) of ``layer``."""
    return f"model.layers.{layer}.mlp.{proj}_proj.weight"


def is_dense_ffn_key(key: str) -> bool:
    return _FFN_RE.match(key) is not None


def is_mlp_key(key: str) -> bool:
    """Any tensor of a layer's MLP (the FFN weights, and biases that have no place in an MoE)."""
    return re.match(r"^model\.layers\.\d+\.mlp\.", key) is not None


#: a dense config field the MoE config class lacks -> (value that is safe to drop, why not otherwise)
Droppable = dict[str, tuple[Callable[[Any], bool], str]]


@dataclass(frozen=True)
class DenseFamily:
    """One dense ``model_type`` group and the MoE family it is built into."""

    model_types: tuple[str, ...]
    moe_family: str
    moe_architecture: str
    #: fields of the dense config that the MoE config has no place for: dropped when the check passes
    droppable: Droppable
    #: the output has a shared expert (Qwen2-MoE)
    has_shared_expert: bool = False

    @property
    def family(self) -> MoEFamily:
        return FAMILIES[self.moe_family]

    def config_class(self):
        import transformers

        return getattr(transformers, {"mixtral": "MixtralConfig", "qwen3_moe": "Qwen3MoeConfig",
                                      "qwen2_moe": "Qwen2MoeConfig"}[self.moe_family])


def _false(v) -> bool:
    return not v


def _no_sliding_layers(v) -> bool:
    return v is None or all(t == "full_attention" for t in v)


DENSE_FAMILIES: tuple[DenseFamily, ...] = (
    DenseFamily(("llama", "mistral"), "mixtral", "MixtralForCausalLM", {
        "attention_bias": (_false, "Mixtral's attention has no biases"),
        "mlp_bias": (_false, "Mixtral's experts have no biases"),
        "pretraining_tp": (lambda v: True, ""),  # a training-time setting, ignored by inference
    }),
    DenseFamily(("qwen3",), "qwen3_moe", "Qwen3MoeForCausalLM", {
        "layer_types": (_no_sliding_layers, "Qwen3-MoE has no per-layer sliding-window attention"),
        "use_sliding_window": (_false, "Qwen3-MoE has no per-layer sliding-window attention"),
        "max_window_layers": (lambda v: True, ""),  # only meaningful with use_sliding_window
    }),
    DenseFamily(("qwen2",), "qwen2_moe", "Qwen2MoeForCausalLM", {}, has_shared_expert=True),
)

_BY_MODEL_TYPE = {mt: f for f in DENSE_FAMILIES for mt in f.model_types}

#: config fields that say a model is already a Mixture of Experts
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def moe_evidence(config: dict) -> Optional[str]:
    """What in a raw ``config.json`` shows it is a Mixture-of-Experts model (its expert-count field,
    e.g. ``num_experts=8``, or "an MoE family"), for an error; None for a dense model."""
    model_type = config.get("model_type")
    moe_field = next((k for k in _MOE_FIELDS if config.get(k)), None)
    if model_type in supported_model_types() or moe_field is not None or "moe" in str(model_type):
        return f"{moe_field}={config[moe_field]}" if moe_field else "an MoE family"
    return None


def supported_dense_types() -> str:
    return ", ".join(f"{'/'.join(f.model_types)} -> {f.moe_family}" for f in DENSE_FAMILIES)


def dense_family_for(name: str, config: dict, where: str) -> DenseFamily:
    """The dense family of a source's raw ``config.json``; a clear error for an MoE or a family
    without an MoE counterpart."""
    model_type = config.get("model_type")
    what = moe_evidence(config)
    if what is not None:
        raise MergeInputError(f"model {name!r} is already a Mixture-of-Experts model "
                              f"(model_type {model_type!r}, {what}); an MoE is built from dense "
                              f"models (supported: {supported_dense_types()})", where=where)
    fam = _BY_MODEL_TYPE.get(model_type)
    if fam is None:
        arch = ", ".join(config.get("architectures") or []) or "unknown"
        raise MergeInputError(f"model {name!r}: model_type {model_type!r} (architectures: {arch}) "
                              f"has no MoE counterpart here; supported dense families: "
                              f"{supported_dense_types()}", where=where)
    return fam


def moe_config(fam: DenseFamily, dense: dict, name: str, where: str, *, num_experts: int,
               top_k: int, shared_expert_size: Optional[int], dtype: Optional[str]):
    """The transformers config object of the MoE built from the dense config ``dense`` (a
    normalised ``AutoConfig.to_dict()``), and the dense fields dropped on the way (a dict)."""
    cls = fam.config_class()
    allowed = set(cls().to_dict()) | {"head_dim"}  # Qwen3-MoE reads head_dim when it is set
    kept: dict[str, Any] = {}
    dropped: dict[str, Any] = {}
    if dense.get("quantization_config"):
        raise MergeInputError(f"model {name!r} is quantized (quantization_config); build the MoE "
                              f"from the unquantized weights", where=where)
    for key, value in dense.items():
        if key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
            continue
        if key in allowed:
            kept[key] = value
            continue
        check = fam.droppable.get(key)
        if check is not None and not check[0](value):
            raise MergeInputError(f"model {name!r}: {key}={value!r} has no counterpart in "
                                  f"{fam.moe_architecture} ({check[1]})", where=where)
        dropped[key] = value
    intermediate = int(dense["intermediate_size"])
    kept.update(num_experts_per_tok=top_k)
    if fam.moe_family == "mixtral":
        kept.update(num_local_experts=num_experts, router_jitter_noise=0.0)
    else:
        # the paper's softmax over the top-k logits is top-k probabilities renormalised
        kept.update(num_experts=num_experts, moe_intermediate_size=intermediate,
                    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    if fam.moe_family == "qwen2_moe":
        kept.update(shared_expert_intermediate_size=int(shared_expert_size or 0), qkv_bias=True)
    if dtype is not None:
        kept["dtype"] = dtype
    cfg = cls(**kept)
    cfg.architectures = [fam.moe_architecture]
    return cfg, dropped
