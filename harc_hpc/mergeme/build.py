"""Build one MoE checkpoint from a dense base and dense domain experts (BTX / MergeME §3.1).

Every layer becomes an MoE layer. Expert e of every layer is source e's FFN (gate, up and down
copied unchanged; the base's FFN is one more expert, the last, with ``include_base_expert``).
Every other tensor (attention, norms, embeddings, head) is merged from the experts' task vectors
with a harc-hpc merge method (harc_hpc.merge, by name: ``linear`` is BTX's averaging, MergeME uses
``ties`` and DARE; presets ``mergeme-ties``, ``mergeme-dare``), the base being the task-vector base.
The router of each layer comes from harc_hpc.mergeme.routers.

Everything is checked before anything is written (``plan_build``): the families, config fields,
tensor names and shapes of every input, the settings. Then tensors are produced one at a time, read
from the inputs with positional reads and written into pre-laid-out safetensors shards
(harc_hpc.io.checkpoint_writer), all inside a temporary directory that is renamed into place when
complete (harc_hpc.io.atomic): a failure leaves nothing that looks like a model. Peak memory is a
merge's inputs for one tensor (base + sources + their task vectors), except for the data router
rules, which run the base model whole.

Qwen2-MoE adds the sigmoid-gated shared expert to the routed ones. With ``shared_expert: base``
(default) it is the base's FFN with a zero gate (sigmoid(0) = 1/2 for every token) and the routed
experts' down projections are halved, so each layer computes 1/2 FFN_base(x) + 1/2 sum_k w_k
FFN_k(x): the scale of the residual update is kept, and identical experts give the dense model.
``shared_expert: none`` writes a zero-width shared expert: exactly the BTX MoE.
"""

from __future__ import annotations

import logging
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from harc_hpc.dtypes import torch_dtype
from harc_hpc.errors import require_finite
from harc_hpc.io.atomic import atomic_dir, json_text
from harc_hpc.io.checkpoint import MODEL_FILES, Checkpoint, resolve_model_path
from harc_hpc.io.checkpoint_writer import CheckpointWriter, copy_model_files
from harc_hpc.merge import MergeConfigError, MergeContext, MergeInputError, MergeUnit, Piece, resolve_settings
from harc_hpc.merge.base import MergeMethod, MethodParams
from harc_hpc.merge.engine import classify, natural_key
from harc_hpc.mergeme import routers as router_rules
from harc_hpc.mergeme.dense import (FFN_PROJS, DenseFamily, dense_family_for, dense_ffn_key,
                                    is_dense_ffn_key, is_mlp_key, moe_config)
from harc_hpc.mergeme.spec import BASE_NAME, MoEBuildSpec

log = logging.getLogger(__name__)

RECORD = "harc_mergeme.json"

#: normalised dense config fields that must agree between the base and every expert
SAME_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "hidden_act",
               "rms_norm_eps", "rope_parameters", "attention_bias", "mlp_bias", "sliding_window",
               "use_sliding_window", "layer_types")


@dataclass
class DenseInput:
    """An opened dense checkpoint (the base or an expert); ``name`` appears in every message."""

    name: str
    ckpt: Checkpoint
    config: dict  # normalised by transformers (AutoConfig.to_dict())

    @property
    def where(self) -> str:
        return str(self.ckpt.path / "config.json")


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the MoE checkpoint and how it is produced.

    kind ``merge``: the dense tensor ``key`` merged over base and experts; ``copy``: ``source_key``
    of input ``source`` times ``scale``; ``router``: layer ``layer``'s router; ``zeros``."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    source: Optional[int] = None
    source_key: Optional[str] = None
    scale: float = 1.0
    layer: Optional[int] = None


@dataclass
class BuildPlan:
    spec: MoEBuildSpec
    dense: DenseFamily
    base: DenseInput
    sources: list[DenseInput]
    #: for each expert index, the input it comes from (0 = base, i = sources[i - 1])
    expert_inputs: list[int]
    expert_names: list[str]
    method: MergeMethod
    params: MethodParams
    compute_dtype: Optional[torch.dtype]
    config: Any  # the transformers config of the output
    dropped_config_fields: dict
    shared_expert: Optional[str]
    tensors: list[OutputTensor] = field(default_factory=list)

    @property
    def inputs(self) -> list[DenseInput]:
        return [self.base, *self.sources]

    @property
    def num_layers(self) -> int:
        return int(self.base.config["num_hidden_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.base.config["hidden_size"])

    @property
    def nbytes(self) -> int:
        total = 0
        for t in self.tensors:
            n = t.dtype.itemsize
            for s in t.shape:
                n *= s
            total += n
        return total


# ---------------------------------------------------------------------------------------------
# Planning: every check, nothing written
# ---------------------------------------------------------------------------------------------

def _open(name: str, path: str, spec: MoEBuildSpec) -> DenseInput:
    local = resolve_model_path(path, revision=spec.revision)
    ckpt = Checkpoint(local, allow_pickle=spec.allow_pickle, name=name)
    return DenseInput(name, ckpt, {})


def _normalised_config(inp: DenseInput) -> dict:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(inp.ckpt.path), trust_remote_code=False).to_dict()
    except Exception as exc:  # transformers raises many types for a bad config
        raise MergeInputError(f"model {inp.name!r}: transformers cannot read its config "
                              f"({type(exc).__name__}: {exc})", where=inp.where) from None


def _check_same_architecture(base: DenseInput, sources: list[DenseInput]) -> None:
    for other in sources:
        a, b = base.ckpt.config.get("model_type"), other.ckpt.config.get("model_type")
        if a != b:
            raise MergeInputError(
                f"models {base.name!r} and {other.name!r} have different architectures: "
                f"model_type {a!r} in {base.where} but {b!r} in {other.where}; an MoE of "
                f"heterogeneous experts (MergeME §3.2) is built by build-hetero-moe", where=other.where)
        for fname in SAME_FIELDS:
            x, y = base.config.get(fname), other.config.get(fname)
            if x != y:
                raise MergeInputError(f"models {base.name!r} and {other.name!r} differ in "
                                      f"{fname}: {x!r} in {base.where} but {y!r} here; experts "
                                      f"must be continued from the base (same architecture and "
                                      f"shapes)", where=other.where)


def _check_tensors(base: DenseInput, sources: list[DenseInput]) -> None:
    ref = set(base.ckpt.keys())
    for k in sorted(ref, key=natural_key):
        if not base.ckpt.tensor_dtype(k).is_floating_point:
            raise MergeInputError(f"model {base.name!r}: tensor {k} is "
                                  f"{base.ckpt.tensor_dtype(k)}; only floating-point checkpoints "
                                  f"are built into an MoE", where=str(base.ckpt.file_of(k)))
    layers = int(base.config["num_hidden_layers"])
    for layer in range(layers):
        for proj in FFN_PROJS:
            k = dense_ffn_key(layer, proj)
            if k not in ref:
                raise MergeInputError(f"model {base.name!r}: layer {layer} has no FFN tensor {k}",
                                      where=str(base.ckpt.path))
    for k in sorted(ref, key=natural_key):
        if is_mlp_key(k) and not is_dense_ffn_key(k):
            raise MergeInputError(f"model {base.name!r}: tensor {k} of the dense MLP has no place "
                                  f"in an MoE expert (only gate/up/down weights are)",
                                  where=str(base.ckpt.file_of(k)))
    for other in sources:
        keys = set(other.ckpt.keys())
        missing = sorted(ref - keys, key=natural_key)
        extra = sorted(keys - ref, key=natural_key)
        if missing:
            raise MergeInputError(f"model {other.name!r}: tensor {missing[0]} is missing (present in "
                                  f"{base.name!r}); {len(missing)} missing", where=str(other.ckpt.path))
        if extra:
            raise MergeInputError(f"model {other.name!r}: tensor {extra[0]} is not in "
                                  f"{base.name!r}; {len(extra)} extra",
                                  where=str(other.ckpt.file_of(extra[0])))
        for k in sorted(ref, key=natural_key):
            a, b = base.ckpt.tensor_shape(k), other.ckpt.tensor_shape(k)
            if a != b:
                raise MergeInputError(f"model {other.name!r}: tensor {k} has shape {b} but {a} in "
                                      f"{base.name!r}", where=str(other.ckpt.file_of(k)))
            if not other.ckpt.tensor_dtype(k).is_floating_point:
                raise MergeInputError(f"model {other.name!r}: tensor {k} is "
                                      f"{other.ckpt.tensor_dtype(k)}; only floating-point "
                                      f"checkpoints are built into an MoE",
                                      where=str(other.ckpt.file_of(k)))


def _promoted(inputs: list[DenseInput], key: str) -> torch.dtype:
    d = inputs[0].ckpt.tensor_dtype(key)
    for i in inputs[1:]:
        d = torch.promote_types(d, i.ckpt.tensor_dtype(key))
    return d


def plan_build(spec: MoEBuildSpec) -> BuildPlan:
    """Open and check every input and setting; return what will be written. Writes nothing."""
    out = Path(spec.output)
    if out.exists() and not spec.overwrite:
        raise MergeConfigError("the output directory exists; remove it or set overwrite: true",
                               where=str(out))
    names = spec.expert_names
    method, params = resolve_settings(spec.merge.method, spec.merge.preset, spec.merge.parameters,
                                      names, method_explicit="method" in spec.merge.model_fields_set)
    compute = torch_dtype(spec.merge.dtype, MergeConfigError)
    stored = torch_dtype(spec.merge.out_dtype, MergeConfigError) or compute

    base = _open(BASE_NAME, spec.base, spec)
    sources = [_open(e.name, e.path, spec) for e in spec.experts]
    fams = [dense_family_for(i.name, i.ckpt.config, i.where) for i in [base, *sources]]
    fam = fams[0]
    for i in [base, *sources]:
        i.config = _normalised_config(i)
    _check_same_architecture(base, sources)
    _check_tensors(base, sources)

    expert_inputs = list(range(1, len(sources) + 1)) + ([0] if spec.include_base_expert else [])
    expert_names = names + ([BASE_NAME] if spec.include_base_expert else [])
    E = len(expert_inputs)
    if E < 2:
        raise MergeConfigError(f"an MoE needs at least 2 experts; {E} given ({expert_names}): add "
                               f"experts or set include_base_expert: true")
    if spec.top_k > E:
        raise MergeConfigError(f"top_k {spec.top_k} is more than the {E} experts {expert_names}")
    shared = spec.shared_expert
    if shared is not None and not fam.has_shared_expert:
        raise MergeConfigError(f"shared_expert is for Qwen2-MoE outputs; {fam.moe_architecture} has "
                               f"no shared expert")
    if fam.has_shared_expert and shared is None:
        shared = "base"

    I = int(base.config["intermediate_size"])
    config, dropped = moe_config(fam, base.config, base.name, base.where, num_experts=E,
                                 top_k=spec.top_k, shared_expert_size=I if shared == "base" else 0,
                                 dtype=None)
    plan = BuildPlan(spec, fam, base, sources, expert_inputs, expert_names, method, params,
                     compute, config, dropped, shared)
    plan.tensors = _output_tensors(plan, stored)
    dtypes = {str(t.dtype).removeprefix("torch.") for t in plan.tensors}
    if len(dtypes) == 1:  # what from_pretrained(dtype="auto") loads
        plan.config.dtype = dtypes.pop()
    return plan


def _output_tensors(plan: BuildPlan, stored: Optional[torch.dtype]) -> list[OutputTensor]:
    fam = plan.dense.family
    inputs = plan.inputs
    base = plan.base.ckpt
    out: list[OutputTensor] = []

    def dtype_of(key: str) -> torch.dtype:
        return stored or _promoted(inputs, key)

    for k in base.keys():
        if not is_dense_ffn_key(k):
            out.append(OutputTensor(k, base.tensor_shape(k), dtype_of(k), "merge"))
    # Qwen2-MoE with the base as shared expert: the routed half of 1/2 base + 1/2 routed mixture
    routed_down_scale = 0.5 if plan.shared_expert == "base" else 1.0
    d = plan.hidden_size
    for layer in range(plan.num_layers):
        gate_key = dense_ffn_key(layer, "gate")
        out.append(OutputTensor(fam.router_disk_key(layer), (len(plan.expert_inputs), d),
                                dtype_of(gate_key), "router", layer=layer))
        for e, src in enumerate(plan.expert_inputs):
            for proj in FFN_PROJS:
                k = dense_ffn_key(layer, proj)
                out.append(OutputTensor(fam.expert_key(layer, e, proj), base.tensor_shape(k),
                                        dtype_of(k), "copy", source=src, source_key=k,
                                        scale=routed_down_scale if proj == "down" else 1.0))
        if plan.shared_expert is not None:
            for proj in FFN_PROJS:
                k = dense_ffn_key(layer, proj)
                key = fam.shared_expert_key(layer, proj)
                if plan.shared_expert == "base":
                    out.append(OutputTensor(key, base.tensor_shape(k), dtype_of(k), "copy",
                                            source=0, source_key=k))
                else:  # a zero-width shared expert contributes nothing
                    shape = (0, d) if proj != "down" else (d, 0)
                    out.append(OutputTensor(key, shape, dtype_of(k), "zeros"))
            out.append(OutputTensor(fam.shared_expert_gate_key(layer), (1, d), dtype_of(gate_key),
                                    "zeros"))
    out.sort(key=lambda t: natural_key(t.key))
    return out


# ---------------------------------------------------------------------------------------------
# Routers
# ---------------------------------------------------------------------------------------------

def compute_routers(plan: BuildPlan) -> dict[int, torch.Tensor]:
    """Layer -> (E, d) float32 router of the rule ``spec.router.init``."""
    spec = plan.spec
    fam = plan.dense.family
    E, d, L = len(plan.expert_inputs), plan.hidden_size, plan.num_layers
    rule = spec.router.init
    if rule == "uniform":
        return {l: router_rules.uniform_router(E, d) for l in range(L)}
    if rule == "random":
        std = float(plan.base.config.get("initializer_range") or 0.02)
        return {l: router_rules.random_router(E, d, spec.seed, fam.router_disk_key(l), std)
                for l in range(L)}
    model, tokenizer = _load_base_model(plan)
    try:
        if rule == "hidden_state":
            prompts = [e.prompts for e in spec.experts]
            if spec.include_base_expert:
                prompts.append(spec.router.base_prompts)
            table = router_rules.hidden_state_routers(model, tokenizer, prompts, plan.expert_names)
        else:
            pooled = [(e.name, p) for e in spec.experts for p in e.prompts]
            pooled += [(BASE_NAME, p) for p in spec.router.base_prompts]
            inputs = plan.inputs

            def expert_tensor(e: int, name: str) -> Optional[torch.Tensor]:
                src = plan.expert_inputs[e]
                if src == 0:
                    return None  # the base as an expert: a zero task vector
                ckpt = inputs[src].ckpt
                if name not in ckpt:
                    raise MergeInputError(f"model {inputs[src].name!r}: the base model's parameter "
                                          f"{name} is not in the checkpoint", where=str(ckpt.path))
                return ckpt.get_tensor(name)

            table, _scores = router_rules.task_vector_routers(model, tokenizer, pooled,
                                                              expert_tensor, E)
    finally:
        del model
    return {l: table[l] for l in range(L)}


def _load_base_model(plan: BuildPlan):
    from transformers import AutoTokenizer

    from harc_hpc.models.modeling import load_causal_lm

    path = plan.base.ckpt.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types
        raise MergeInputError(f"router.init {plan.spec.router.init} tokenizes the prompts with the "
                              f"base's tokenizer, which cannot be loaded ({type(exc).__name__}: "
                              f"{exc})", where=str(path)) from None
    model = load_causal_lm(path, torch.device("cpu"), dtype=torch.float32)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _read(inp: DenseInput, key: str) -> torch.Tensor:
    t = inp.ckpt.get_tensor(key)
    require_finite(t, f"model {inp.name!r}: tensor {key}", str(inp.ckpt.file_of(key)))
    return t


def _merge_tensor(plan: BuildPlan, t: OutputTensor, ctx: MergeContext) -> torch.Tensor:
    inputs = plan.inputs
    compute = plan.compute_dtype or _promoted(inputs, t.key)
    base = _read(plan.base, t.key).to(compute)
    sources = [_read(s, t.key).to(compute) for s in plan.sources]
    # the same unit as merge-experts makes of a whole tensor: same role, same DARE seeds
    unit = MergeUnit(t.key, t.shape, (Piece(t.key, 0, base.numel(), t.shape),),
                     classify(t.key, t.shape, plan.dense.family), None)
    result = plan.method.merge(base, sources, unit, plan.params, plan.spec.expert_names, ctx)
    if tuple(result.shape) != t.shape:
        raise RuntimeError(f"{plan.method.name}: returned shape {tuple(result.shape)} for {t.key} {t.shape}")
    return result


def _produce(plan: BuildPlan, t: OutputTensor, routers: dict[int, torch.Tensor],
             ctx: MergeContext) -> torch.Tensor:
    if t.kind == "merge":
        return _merge_tensor(plan, t, ctx)
    if t.kind == "copy":
        x = _read(plan.inputs[t.source], t.source_key)
        return x * t.scale if t.scale != 1.0 else x
    if t.kind == "router":
        return routers[t.layer]
    return torch.zeros(t.shape, dtype=t.dtype)


def build_moe(spec: MoEBuildSpec) -> dict:
    """Build the MoE of ``spec`` into ``spec.output``; returns a short summary (the full account
    is the record, ``harc_mergeme.json``, beside the weights)."""
    t0 = time.perf_counter()
    plan = plan_build(spec)
    routers = compute_routers(plan)
    out = Path(spec.output)
    ctx = MergeContext(seed=spec.seed, consume_inputs=True)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # input digests read every weight file once more: beside the build, they cost little time
        digests = {i.name: pool.submit(i.ckpt.digest) for i in plan.inputs}
        with atomic_dir(out, needed_bytes=plan.nbytes) as tmp:
            writer = CheckpointWriter(tmp, spec.max_shard_size)
            try:
                writer.declare([(t.key, t.dtype, t.shape) for t in plan.tensors])
                for t in plan.tensors:
                    writer.add(t.key, _produce(plan, t, routers, ctx).to(t.dtype).contiguous())
                writer.finalize()
            except BaseException:
                writer.abort()
                raise
            plan.config.to_json_file(str(tmp / "config.json"), use_diff=True)
            copied = copy_model_files(plan.base.ckpt.path, tmp,
                                      [n for n in MODEL_FILES if n != "config.json"])
            record = _record(plan, {n: f.result() for n, f in digests.items()}, copied)
            (tmp / RECORD).write_text(json_text(record))
    for i in plan.inputs:
        i.ckpt.close()
    summary = {"output": str(out), "family": plan.dense.moe_family,
               "architecture": plan.dense.moe_architecture, "experts": plan.expert_names,
               "top_k": spec.top_k, "router_init": spec.router.init, "method": plan.method.name,
               "tensors": len(plan.tensors), "seconds": round(time.perf_counter() - t0, 3)}
    log.info("built %s with %d experts %s in %.1f s", summary["architecture"],
             len(plan.expert_names), plan.expert_names, summary["seconds"])
    return summary


def _record(plan: BuildPlan, digests: dict, copied: list[str]) -> dict:
    from harc_hpc import package_versions

    spec = plan.spec
    return {
        "format": 1,
        "family": plan.dense.moe_family,
        "architecture": plan.dense.moe_architecture,
        "experts": [{"index": e, "name": n, "ffn_from": plan.inputs[src].name}
                    for e, (n, src) in enumerate(zip(plan.expert_names, plan.expert_inputs))],
        "shared_expert": plan.shared_expert,
        "top_k": spec.top_k,
        "router_init": spec.router.init,
        "seed": spec.seed,
        "non_ffn_merge": {"method": plan.method.name, "preset": spec.merge.preset,
                          "parameters": plan.params.model_dump(mode="json", by_alias=True),
                          "dtype": spec.merge.dtype, "out_dtype": spec.merge.out_dtype},
        "dropped_config_fields": sorted(plan.dropped_config_fields),
        "model_files_from_base": copied,
        "inputs": [{"name": i.name, "path": str(i.ckpt.path), "digest": digests[i.name]}
                   for i in plan.inputs],
        "versions": {"python": platform.python_version(),
                     **package_versions(("harc-hpc", "torch", "transformers", "safetensors"))},
    }
