"""Streaming merge of checkpoints: one unit at a time, from safetensors in, to sharded safetensors out.

A unit is what a method merges at once: a whole tensor, one expert matrix, or, under
``granularity: fused``, a layer's fused gate_up (E, 2I, d) or down (E, d, I) tensor assembled from
the per-expert keys. Units are read (the next one in a background thread while the current one is
merged), merged and written into their final place in the output shards, so the memory in use is
a couple of units, whatever the number of layers. The output keeps the inputs' on-disk layout.
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from harc_hpc.io.checkpoint import Checkpoint
from harc_hpc.io.checkpoint_writer import CheckpointWriter, Fp8BlockWriter
from harc_hpc.models.families import MoEFamily, family_for_config
from harc_hpc.dtypes import torch_dtype
from harc_hpc.merge.base import (Granularity, MergeConfigError, MergeContext, MergeInputError,
                                 MergeMethod, MergeUnit, MethodParams, Piece)

log = logging.getLogger(__name__)

def natural_key(s: str):
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s))


@dataclass
class MergeInput:
    """A named checkpoint taking part in a merge (``name`` appears in errors and the record)."""

    name: str
    ckpt: Checkpoint


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

_CONFIG_FIELDS = ("model_type", "architectures", "num_hidden_layers", "hidden_size", "vocab_size",
                  "num_experts", "num_local_experts", "num_experts_per_tok", "intermediate_size",
                  "moe_intermediate_size", "mlp_only_layers", "decoder_sparse_step")


def check_compatible(inputs: Sequence[MergeInput]) -> MoEFamily:
    """Same family, config shape fields, tensor names and shapes in every input; the first input
    is the reference the messages compare against."""
    ref = inputs[0]
    fam = family_for_config(ref.ckpt.config)
    for other in inputs[1:]:
        for field in _CONFIG_FIELDS:
            a, b = ref.ckpt.config.get(field), other.ckpt.config.get(field)
            if a != b:
                what = {"model_type": "architectures", "architectures": "architectures",
                        "vocab_size": "vocabularies", "num_experts": "expert counts",
                        "num_local_experts": "expert counts"}.get(field, field)
                raise MergeInputError(
                    f"models {ref.name!r} and {other.name!r} have different {what}: "
                    f"{field}={a!r} in {ref.ckpt.path / 'config.json'} but {b!r} in "
                    f"{other.ckpt.path / 'config.json'}")
    ref_keys = set(ref.ckpt.keys())
    for other in inputs[1:]:
        keys = set(other.ckpt.keys())
        missing = sorted(ref_keys - keys, key=natural_key)
        extra = sorted(keys - ref_keys, key=natural_key)
        if missing:
            raise MergeInputError(f"model {other.name!r} ({other.ckpt.path}): tensor {missing[0]} "
                                  f"is missing (present in {ref.name!r}, file "
                                  f"{ref.ckpt.file_of(missing[0]).name}); {len(missing)} missing")
        if extra:
            raise MergeInputError(f"model {other.name!r}: file {other.ckpt.file_of(extra[0])}: "
                                  f"tensor {extra[0]} is not in {ref.name!r}; {len(extra)} extra")
        for k in sorted(ref_keys, key=natural_key):
            a, b = ref.ckpt.tensor_shape(k), other.ckpt.tensor_shape(k)
            if a != b:
                raise MergeInputError(f"model {other.name!r}: file {other.ckpt.file_of(k)}: tensor "
                                      f"{k} has shape {b} but {a} in {ref.name!r}")
    layouts = {i.name: fam.detect_layout(i.ckpt.keys()) for i in inputs}
    if len(set(layouts.values())) > 1:
        raise MergeInputError(f"inputs store experts in different layouts: {layouts}")
    return fam


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------

def classify(key: str, shape: Sequence[int], fam: MoEFamily) -> str:
    e = fam.parse_expert_key(key)
    if e is not None:
        return "expert" if e.expert is not None else "experts_fused"
    if fam.is_router_disk_key(key):
        return "router"
    if any(key.endswith(s) for s in fam.extra_gate_suffixes):
        return "shared_expert_gate"
    if "embed_tokens" in key:
        return "embedding"
    if key.startswith("lm_head"):
        return "lm_head"
    if len(shape) == 1:
        if key.endswith(".bias"):
            return "bias"
        return "norm" if "norm" in key else "vector"
    return "linear" if len(shape) == 2 else "other"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def plan_units(ckpt: Checkpoint, fam: MoEFamily, granularity: Granularity) -> list[MergeUnit]:
    """Units covering every tensor of ``ckpt`` exactly once, in natural key order."""
    keys = sorted(ckpt.keys(), key=natural_key)
    layout = fam.detect_layout(keys)
    units: list[MergeUnit] = []
    grouped: set[str] = set()
    if granularity == "fused" and layout == "per_expert":
        units_by_first: dict[str, MergeUnit] = {}
        E = fam.num_experts(ckpt.config)
        for layer in fam.moe_layers(ckpt.config):
            try:
                gates = [fam.expert_key(layer, e, "gate") for e in range(E)]
                ups = [fam.expert_key(layer, e, "up") for e in range(E)]
                downs = [fam.expert_key(layer, e, "down") for e in range(E)]
                for k in gates + ups + downs:
                    ckpt.info(k)
            except Exception:
                raise MergeInputError(f"model {ckpt.name!r}: layer {layer} does not hold all {E} "
                                      f"experts' gate/up/down tensors") from None
            I, d = ckpt.tensor_shape(gates[0])
            gu_pieces = []
            for g, u in zip(gates, ups):
                gu_pieces += [Piece(g, 0, I * d, (I, d)), Piece(u, 0, I * d, (I, d))]
            dn_shape = ckpt.tensor_shape(downs[0])
            dn_pieces = [Piece(k, 0, _numel(dn_shape), tuple(dn_shape)) for k in downs]
            gu = MergeUnit(fam.fused_key(layer, "gate_up"), (E, 2 * I, d), tuple(gu_pieces),
                           "experts_fused", layer)
            dn = MergeUnit(fam.fused_key(layer, "down"), (E, *dn_shape), tuple(dn_pieces),
                           "experts_fused", layer)
            units_by_first[gates[0]] = gu
            units_by_first[downs[0]] = dn
            grouped.update(gates + ups + downs)
        for k in keys:
            if k in units_by_first:
                units.append(units_by_first[k])
            elif k not in grouped:
                units.append(_whole_unit(ckpt, fam, k))
        units.sort(key=lambda u: natural_key(u.pieces[0].key))
        return units
    for k in keys:
        e = fam.parse_expert_key(k)
        if granularity == "per_expert" and e is not None and e.expert is None:
            units.extend(_split_fused(ckpt, k, e, fam.fused_orientation))
        else:
            units.append(_whole_unit(ckpt, fam, k))
    return units


def _whole_unit(ckpt: Checkpoint, fam: MoEFamily, key: str) -> MergeUnit:
    shape = ckpt.tensor_shape(key)
    e = fam.parse_expert_key(key)
    layer = e.layer if e is not None else fam.layer_of_key(key)
    return MergeUnit(key, tuple(shape), (Piece(key, 0, _numel(shape), tuple(shape)),),
                     classify(key, shape, fam), layer)


def _split_fused(ckpt: Checkpoint, key: str, e, orientation: str = "out_in") -> list[MergeUnit]:
    """A fused (E, 2I, d) gate_up tensor -> 2E matrices (gate_e, up_e); (E, d, I) down -> E.
    ``in_out`` (GPT-OSS: (E, d, 2I) with gate and up columns interleaved, (E, I, d) down): one
    (in, out) matrix per expert and tensor, marked ``transposed``."""
    shape = ckpt.tensor_shape(key)
    E = shape[0]
    per = _numel(shape[1:])
    units = []
    for x in range(E):
        if orientation == "in_out":
            units.append(MergeUnit(f"{key}[{x}]", tuple(shape[1:]),
                                   (Piece(key, x * per, per, tuple(shape[1:]), False),),
                                   "expert", e.layer, transposed=True))
        elif e.proj == "gate_up":
            two_i, d = shape[1], shape[2]
            half = (two_i // 2) * d
            for j, proj in enumerate(("gate", "up")):
                units.append(MergeUnit(f"{key}[{x}].{proj}", (two_i // 2, d),
                                       (Piece(key, x * per + j * half, half, (two_i // 2, d), False),),
                                       "expert", e.layer))
        else:
            units.append(MergeUnit(f"{key}[{x}]", tuple(shape[1:]),
                                   (Piece(key, x * per, per, tuple(shape[1:]), False),),
                                   "expert", e.layer))
    return units


def split_unit(unit: MergeUnit, max_numel: int) -> list[MergeUnit]:
    """Consecutive 1-D slices of ``unit`` of at most ``max_numel`` elements, for element-wise
    methods: the result is the same as merging the whole unit, with a fraction of the memory."""
    if unit.numel <= max_numel:
        return [unit]
    out = []
    piece_starts = []
    pos = 0
    for p in unit.pieces:
        piece_starts.append(pos)
        pos += p.numel
    for lo in range(0, unit.numel, max_numel):
        hi = min(lo + max_numel, unit.numel)
        pieces = []
        for p, ps in zip(unit.pieces, piece_starts):
            a, b = max(lo, ps), min(hi, ps + p.numel)
            if a < b:
                pieces.append(Piece(p.key, p.start + (a - ps), b - a, (b - a,), False))
        out.append(MergeUnit(f"{unit.name}[{lo}:{hi}]", (hi - lo,), tuple(pieces), unit.role,
                             unit.layer))
    return out


# ---------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------

#: element-wise methods merge large tensors in slices of this many elements
CHUNK_NUMEL = 1 << 22
#: a unit larger than this (elements) is not read ahead while another one is being merged
PREFETCH_MAX_NUMEL = 1 << 24

def _all_finite(t: torch.Tensor) -> bool:
    # in slices: isfinite's temporaries on a whole embedding, in every reader thread at once, were
    # the merge's peak memory
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[lo:lo + CHUNK_NUMEL]).all()) for lo in range(0, flat.numel(), CHUNK_NUMEL))


def _read_unit(inp: MergeInput, unit: MergeUnit, check_finite: bool) -> torch.Tensor:
    flat = torch.empty(unit.numel, dtype=inp.ckpt.tensor_dtype(unit.pieces[0].key))
    pos = 0
    for p in unit.pieces:
        t = inp.ckpt.read_part(p.key, p.start, p.numel, out=flat[pos:pos + p.numel])
        pos += p.numel
        if check_finite and t.is_floating_point() and not _all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise MergeInputError(f"model {inp.name!r}: file {inp.ckpt.file_of(p.key)}: tensor "
                                  f"{p.key} contains {bad} NaN/Inf values")
    return flat.reshape(unit.shape)


def merge_checkpoints(out_dir: Union[str, Path], sources: Sequence[MergeInput],
                      base: Optional[MergeInput], method: MergeMethod, params: MethodParams, *,
                      exclude: Sequence[str] = (), dtype: Optional[str] = None,
                      out_dtype: Optional[str] = None, max_shard_size: Union[int, str] = "5GB",
                      seed: int = 0, device: Union[str, torch.device] = "cpu",
                      check_finite: bool = True,
                      progress: Optional[Callable[[int, int, MergeUnit], None]] = None,
                      gram: Optional[Callable] = None, fisher: Optional[Callable] = None,
                      quantize: Optional[str] = None) -> dict:
    """Merge ``sources`` (and ``base``) into safetensors shards in ``out_dir`` (weights only).

    ``dtype``: compute dtype (default: the promoted dtype of the inputs of each tensor);
    ``out_dtype``: stored dtype (default: the compute dtype). ``exclude``: regexes of on-disk tensor
    names taken unchanged from the base (or the first source without a base). ``gram`` / ``fisher``:
    the per-source statistics of a method that has them (``MergeContext.gram`` / ``.fisher``).
    Quantized inputs are read dequantized; ``quantize="fp8-block"`` writes the tensors the first
    input (the base, else the first source) stores as FP8 blocks as FP8 blocks again, scales
    recomputed from the merged values (everything else as without it).
    """
    t0 = time.perf_counter()
    if not sources:
        raise MergeConfigError("models.sources: at least one source model is needed")
    if method.statistics is not None and gram is None and fisher is None:
        raise MergeConfigError(f"merge method {method.name!r} merges with per-source {method.statistics} "
                               f"statistics, and none were given (the merge-statistics stage writes them)")
    if method.base_needed(params) and base is None:
        raise MergeConfigError(f"merge method {method.name!r} works on task vectors and needs a "
                               f"base model: set models.base")
    inputs = ([base] if base is not None else []) + list(sources)
    fam = check_compatible(inputs)
    ref = inputs[0]
    compute = torch_dtype(dtype, MergeConfigError)
    stored = torch_dtype(out_dtype, MergeConfigError)
    granularity = method.granularity(params)
    units = plan_units(ref.ckpt, fam, granularity)
    n_tensor_units = len(units)
    if getattr(method, "elementwise", False):
        units = [c for u in units for c in split_unit(u, CHUNK_NUMEL)]
    patterns = [re.compile(p) for p in exclude]
    excluded = {k for k in ref.ckpt.keys() if any(p.search(k) for p in patterns)}
    names = [s.name for s in sources]
    ctx = MergeContext(seed=seed, device=torch.device(device), consume_inputs=True, gram=gram, fisher=fisher)

    def unit_dtypes(unit: MergeUnit) -> tuple[torch.dtype, torch.dtype]:
        dts = [i.ckpt.tensor_dtype(unit.pieces[0].key) for i in inputs]
        if not all(d.is_floating_point for d in dts):
            return dts[0], dts[0]
        c = compute or _promote(dts)
        return c, stored or c

    out_dtype_of = {}
    for u in units:
        c, o = unit_dtypes(u)
        for p in u.pieces:
            out_dtype_of[p.key] = o
    entries = [(k, out_dtype_of[k], ref.ckpt.tensor_shape(k))
               for k in sorted(ref.ckpt.keys(), key=natural_key)]
    writer = CheckpointWriter(out_dir, max_shard_size)
    if quantize is not None:
        writer = Fp8BlockWriter(writer, _fp8_blocks(ref, quantize))
    writer.declare(entries)

    role_keys: dict[str, set] = {}
    passthrough: dict[str, list] = {}  # what the method did not merge by its own rule, by treatment
    merged_keys: set[str] = set()
    copied_keys: set[str] = set()
    copy_from = base if base is not None else sources[0]

    io_pool = ThreadPoolExecutor(max_workers=len(inputs))

    def load(unit: MergeUnit):
        whole_copy = (all(p.key in excluded for p in unit.pieces)
                      or not unit_dtypes(unit)[0].is_floating_point)
        if whole_copy:
            return True, {copy_from.name: _read_unit(copy_from, unit, check_finite)}
        reads = {i.name: io_pool.submit(_read_unit, i, unit, check_finite) for i in inputs}
        return False, {n: f.result() for n, f in reads.items()}

    def write(parts):
        for key, start, part in parts:
            writer.add_part(key, start, part)

    # Three stages overlap: the next unit is read (inputs in parallel) and the previous one written
    # while the current one is merged. At most one unit is in flight in each direction.
    try:
        with ThreadPoolExecutor(max_workers=1) as read_pool, \
                ThreadPoolExecutor(max_workers=1) as write_pool:
            future = None
            pending_write = None
            for idx, unit in enumerate(units):
                is_copy, tensors = future.result() if future is not None else load(unit)
                future = None
                # Read the next unit while this one is merged, unless it is one of the few big
                # tensors (embeddings): holding two of those at once would set the peak memory.
                if idx + 1 < len(units) and units[idx + 1].numel <= PREFETCH_MAX_NUMEL:
                    future = read_pool.submit(load, units[idx + 1])
                c, o = unit_dtypes(unit)
                if is_copy:
                    result = tensors[copy_from.name]
                    copied_keys.update(p.key for p in unit.pieces)
                else:
                    b = tensors[base.name].to(c) if base is not None else None
                    srcs = [tensors[n].to(c) for n in names]
                    # Hand the inputs over: a method that consumes them (ctx.consume_inputs) can
                    # free each source once used, which lowers the peak for the largest tensors.
                    ref_keep = (tensors[copy_from.name]
                                if any(p.key in excluded for p in unit.pieces) else None)
                    tensors.clear()
                    if ref_keep is not None:
                        tensors[copy_from.name] = ref_keep
                    del ref_keep
                    if pending_write is not None and unit.numel > PREFETCH_MAX_NUMEL:
                        pending_write.result()  # a big unit: let the previous output go first
                        pending_write = None
                    result = method.merge(b, srcs, unit, params, names, ctx)
                    del b, srcs
                    if tuple(result.shape) != unit.shape:
                        raise RuntimeError(f"{method.name}: returned shape {tuple(result.shape)} for "
                                           f"{unit.name} {unit.shape}")
                    treatment = method.passthrough(unit, params)
                    if treatment is None:
                        merged_keys.update(p.key for p in unit.pieces if p.key not in excluded)
                        role_keys.setdefault(unit.role, set()).update(p.key for p in unit.pieces)
                    else:
                        passthrough.setdefault(treatment, []).extend(
                            p.key for p in unit.pieces if p.key not in excluded)
                flat = result.reshape(-1).to(o)
                ref_flat = None
                parts = []
                pos = 0
                for p in unit.pieces:
                    part = flat[pos:pos + p.numel]
                    if p.key in excluded and not is_copy:
                        if ref_flat is None:
                            ref_flat = tensors[copy_from.name].reshape(-1).to(o)
                        part = ref_flat[pos:pos + p.numel]
                    parts.append((p.key, p.start, part))
                    pos += p.numel
                del tensors, result, flat, ref_flat
                if pending_write is not None:
                    pending_write.result()
                pending_write = write_pool.submit(write, parts)
                del parts
                if progress is not None:
                    progress(idx + 1, len(units), unit)
            if pending_write is not None:
                pending_write.result()
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    finally:
        io_pool.shutdown(wait=True, cancel_futures=True)
    return {
        "family": fam.name,
        "layout": fam.detect_layout(ref.ckpt.keys()),
        "granularity": granularity,
        "units": n_tensor_units,
        "merged_tensors": len(merged_keys),
        "copied_tensors": len(copied_keys | (excluded & set(ref.ckpt.keys()))),
        "merged_by_role": {r: len(k) for r, k in sorted(role_keys.items())},
        "not_merged_by_method": {t: sorted(k, key=natural_key) for t, k in sorted(passthrough.items())},
        "tensors": len(entries),
        "excluded_tensors": sorted(excluded, key=natural_key),
        "method_notes": {k: list(v) for k, v in sorted(ctx.notes.items())},
        "requantized": sorted(writer.quantized, key=natural_key) if quantize is not None else [],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _fp8_blocks(ref: MergeInput, quantize: str) -> dict:
    """The tensors ``quantize`` writes as FP8 blocks: those ``ref`` stores so, in its blocks."""
    if quantize != "fp8-block":
        raise MergeConfigError(f"output.quantize: {quantize!r} is not a format harc-hpc writes (fp8-block is)")
    blocks = ref.ckpt.fp8_blocks()
    if not blocks:
        raise MergeConfigError(
            f"output.quantize: fp8-block re-quantizes the weights an FP8 block-quantized input stores as FP8, "
            f"and model {ref.name!r} ({ref.ckpt.path}) has none (it needs quantization_config.quant_method "
            f"fp8 with weight_block_size, as DeepSeek-V3's checkpoints have)")
    return blocks


def _promote(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    d = dtypes[0]
    for x in dtypes[1:]:
        d = torch.promote_types(d, x)
    return d
