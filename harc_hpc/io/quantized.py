"""Quantized checkpoint formats read as floating-point tensors, and FP8 block quantization for writing.

A quantized checkpoint stores a weight ``W`` as several tensors (the quantized values, their scales,
sometimes zero points or a shape) and names its format in ``config.json``'s ``quantization_config``.
The reader (harc_hpc.io.checkpoint) shows each such weight as one floating-point tensor of the
model's dtype, computed here rows at a time, so a merge never holds more of it than it asked for.

Formats read (``SUPPORTED``):

* ``fp8``: DeepSeek-V3 / Kimi-K2 / Qwen3-FP8 style blocks: ``W`` float8_e4m3fn and
  ``W_scale_inv`` float32, one scale per ``weight_block_size`` block (128 x 128; a partial block at
  the end of a row or column has its own scale, so the scale grid is the ceil-divided shape).
  Value = float32(q) * scale, rounded to the model's dtype: what transformers computes when it
  dequantizes (``Fp8Dequantize``), bit for bit.
* ``compressed-tensors`` (llm-compressor), formats ``float-quantized`` (FP8), ``int-quantized`` and
  ``naive-quantized`` (``W`` + ``W_scale`` [+ ``W_zero_point``]) and ``pack-quantized`` with 4 bits
  (``W_packed`` int32, ``W_scale``, ``W_shape``; symmetric). Strategies tensor, channel, group and
  block. Value = (q.to(scale dtype) - zero point) * scale in the scale's dtype, as
  compressed-tensors' own ``dequantize``, then the model's dtype.
* ``mxfp4`` (GPT-OSS): harc_hpc.io.checkpoint.dequantize_mxfp4.

Writing (``output.quantize: fp8-block``): ``quantize_fp8_block`` gives float8_e4m3fn values and
float32 ``scale_inv`` per block (the block's largest magnitude / 448), the layout read above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch

from harc_hpc.errors import InputDataError

#: a quantized tensor is dequantized this many elements at a time (whole rows, at least one)
ROWS_NUMEL = 1 << 20
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)

#: what the reader dequantizes: quant_method -> formats (None: the method has no format field)
SUPPORTED = {
    "fp8": None,
    "compressed-tensors": ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized"),
    "mxfp4": None,
}

#: tensors that describe activations, not weights: meaningless once the weights are dequantized
ACTIVATION_SUFFIXES = (".input_scale", ".output_scale", ".input_zero_point", ".output_zero_point")


class QuantizedFormatError(InputDataError):
    """A quantized checkpoint that cannot be dequantized as stored: an unsupported method or format,
    or scales missing or of the wrong shape; the message names the model and the tensor."""


def supported_list() -> str:
    parts = []
    for method, formats in SUPPORTED.items():
        parts.append(method if formats is None else f"{method} ({', '.join(formats)})")
    return "; ".join(parts)


@dataclass(frozen=True)
class Scheme:
    """How one logical weight is stored and turned back into floating point.

    ``values``: the stored quantized tensor; ``scale`` / ``zero_point``: its scale grid (2-D after
    the leading dimensions, one entry per ``block`` = (rows, cols) elements); ``packed_bits``: 4
    when ``values`` are int32 words of eight 4-bit values; ``compute``: the dtype the product is
    formed in (float32 for fp8 blocks, the scale's dtype for compressed-tensors)."""

    method: str  # "fp8-block" or "compressed-tensors <format>"
    values: str
    scale: str
    zero_point: Optional[str]
    block: tuple[int, int]  # elements a scale covers: (rows, cols)
    grid: tuple[int, int]  # the scale grid per leading index: (scale rows, scale cols)
    compute: torch.dtype
    packed_bits: int = 0
    extra: tuple[str, ...] = ()  # further stored tensors consumed (weight_shape)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(k for k in (self.values, self.scale, self.zero_point, *self.extra) if k)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def scale_grid(shape: Sequence[int], block: tuple[int, int]) -> tuple[int, ...]:
    """The scale tensor's shape for a weight of ``shape`` in blocks of ``block``."""
    *lead, rows, cols = shape
    return (*lead, ceil_div(rows, block[0]), ceil_div(cols, block[1]))


def dequantize_rows(values: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                    col_block: int, first_scale_row: int, rows_of_scale: torch.Tensor,
                    compute: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """Rows of a quantized weight, dequantized. ``values`` (n, cols) already unpacked; ``scale`` and
    ``zero_point``: the scale rows from ``first_scale_row`` on; ``rows_of_scale`` (n,): the scale
    row of each value row. Element-wise, so any rows give the bits the whole tensor gives."""
    idx = rows_of_scale - first_scale_row
    cols = values.shape[-1]
    s = scale.index_select(0, idx).repeat_interleave(col_block, dim=1)[:, :cols]
    x = values.to(compute)
    if zero_point is not None:
        z = zero_point.index_select(0, idx).repeat_interleave(col_block, dim=1)[:, :cols]
        x = x - z.to(compute)
    return (x * s.to(compute)).to(out_dtype)


def unpack_int4(words: torch.Tensor, cols: int) -> torch.Tensor:
    """(n, w) int32 words of eight 4-bit values each (the first value in the lowest bits, stored
    with an offset of 8) -> (n, cols) int8 in [-8, 7]."""
    b = words.contiguous().view(torch.uint8).to(torch.int16)
    if b.numel() and not _little_endian():  # pragma: no cover - every machine this runs on is LE
        b = b.view(*words.shape, 4).flip(-1).reshape(words.shape[0], -1)
    vals = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(words.shape[0], -1)[:, :cols]
    return (vals - 8).to(torch.int8)


def _little_endian() -> bool:
    import sys

    return sys.byteorder == "little"


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn values, float32 scale_inv) of ``w`` (..., rows, cols) in ``block`` blocks:
    each block divided by its largest magnitude / 448 (1 for an all-zero block), rounded to FP8.
    ``values.float() * scale_inv`` (broadcast per block) is ``w`` within FP8's rounding."""
    if FP8_DTYPE is None:  # pragma: no cover - torch >= 2.1 has it
        raise QuantizedFormatError("this torch has no float8_e4m3fn dtype")
    *lead, rows, cols = w.shape
    br, bc = block
    R, C = ceil_div(rows, br), ceil_div(cols, bc)
    x = w.reshape(-1, rows, cols).to(torch.float32)
    padded = torch.nn.functional.pad(x, (0, C * bc - cols, 0, R * br - rows))
    tiles = padded.reshape(-1, R, br, C, bc)
    amax = tiles.abs().amax(dim=(2, 4))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale_inv[:, :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(-1, R * br, C * bc)[:, :rows, :cols].reshape(*lead, rows, cols).contiguous()
    return q, scale_inv.reshape(*lead, R, C).contiguous()


def fp8_scale_key(key: str) -> str:
    """``X.weight`` -> ``X.weight_scale_inv``; a fused ``X.gate_up_proj`` -> ``X.gate_up_proj_scale_inv``."""
    return key + "_scale_inv"


def output_size_bytes(shapes: dict[str, tuple[tuple[int, ...], int]], quantized: dict[str, tuple[int, int]],
                      quantize: Optional[str]) -> int:
    """Bytes of a merged checkpoint's tensors. ``shapes``: key -> (shape, bytes per element as
    written unquantized); ``quantized``: the keys the input stores quantized -> their block;
    ``quantize``: ``"fp8-block"`` writes those as FP8 plus float32 scales, None as ``shapes`` says.
    For harc-hpc plan (the merge's output size and the disk it needs)."""
    total = 0
    for key, (shape, itemsize) in shapes.items():
        numel = math.prod(shape)
        if quantize == "fp8-block" and key in quantized:
            total += numel + 4 * math.prod(scale_grid(shape, quantized[key]))
        else:
            total += numel * itemsize
    return total


def config_output_bytes(conf: dict, total_params: int, dtype_bytes: int, quantize: Optional[str] = None,
                        unquantized_params: int = 0) -> int:
    """The merged checkpoint's size from a config alone (no weights read), for harc-hpc plan:
    ``total_params`` at ``dtype_bytes`` each (a quantized input is written dequantized, in its
    model's dtype); with ``quantize: fp8-block``, one byte per parameter plus a float32 scale per
    block (``weight_block_size``, 128 x 128) except ``unquantized_params`` (embeddings, norms,
    routers: kept at ``dtype_bytes``)."""
    if quantize != "fp8-block":
        return total_params * dtype_bytes
    qc = conf.get("quantization_config") or {}
    br, bc = qc.get("weight_block_size") or (128, 128)
    fp8 = max(0, total_params - unquantized_params)
    return fp8 + 4 * ceil_div(fp8, br * bc) + unquantized_params * dtype_bytes


def quantization_method(conf: dict) -> Optional[str]:
    """The ``quant_method`` of a config.json's ``quantization_config`` the reader dequantizes
    (``SUPPORTED``), None for an unquantized model (or a method the merge refuses, naming it)."""
    method = (conf.get("quantization_config") or {}).get("quant_method")
    return method if method in SUPPORTED else None


def config_stored_bytes(conf: dict, total_params: int, dtype_bytes: int, unquantized_params: int = 0) -> int:
    """About the bytes a quantized checkpoint's weights take on disk, from its config alone (for
    harc-hpc plan's read time): ``unquantized_params`` at ``dtype_bytes``, the rest in the format's
    bits (FP8 blocks: 1 byte and a float32 scale a block; compressed-tensors: ``num_bits`` and a
    scale per group of ``group_size`` or per row; MXFP4: 4 bits and a byte per 32). An unquantized
    model: ``total_params * dtype_bytes``."""
    method = quantization_method(conf)
    if method is None:
        return total_params * dtype_bytes
    if method == "fp8":
        return config_output_bytes(conf, total_params, dtype_bytes, "fp8-block", unquantized_params)
    q = max(0, total_params - unquantized_params)
    if method == "mxfp4":
        bits = 4 + 8 / 32
    else:
        qc = conf["quantization_config"]
        weights = next((g.get("weights") for g in (qc.get("config_groups") or {}).values() if g.get("weights")), {})
        group = int(weights.get("group_size") or 0) if weights.get("strategy") == "group" else 0
        bits = int(weights.get("num_bits") or 8) + (8 * dtype_bytes / group if group else 0)
    return int(q * bits / 8) + unquantized_params * dtype_bytes


# ---------------------------------------------------------------------------------------------
# Finding the quantized weights of a checkpoint
# ---------------------------------------------------------------------------------------------

_FLOAT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def model_dtype(config: dict) -> torch.dtype:
    """The dtype a dequantized weight is given: the config's ``dtype`` / ``torch_dtype`` (what
    transformers loads the model in), bfloat16 when it names none."""
    name = config.get("dtype") or config.get("torch_dtype")
    return _FLOAT_DTYPES.get(str(name), torch.bfloat16)


Stored = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]


def find_schemes(config: dict, stored: Stored, name: str, read: Callable[[str], torch.Tensor]
                 ) -> tuple[dict[str, tuple[Scheme, tuple[int, ...]]], list[str]]:
    """``({weight key: (scheme, shape)}, activation scales to drop)`` of a checkpoint whose
    ``config.json`` has a ``quantization_config``; ``stored``: every stored tensor's dtype and shape;
    ``read``: reads a (small) stored tensor. Raises QuantizedFormatError for a method or format not
    read here (naming it and the supported list) and for scales missing or of the wrong shape."""
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if not method or method == "mxfp4":  # MXFP4 pairs are found by their names (checkpoint.py)
        return {}, []
    where = f"{name}: config.json quantization_config"
    if method not in SUPPORTED:
        raise QuantizedFormatError(f"{where}: quant_method {method!r} is not supported; supported: "
                                   f"{supported_list()}",
                                   hint="dequantize it to bfloat16 first (load it with transformers and "
                                        "save_pretrained without the quantization), then give that directory")
    if method == "fp8":
        schemes = _fp8_schemes(qc, stored, name)
    else:
        schemes = _compressed_schemes(qc, stored, name, read)
    dropped = [k for k in stored if k.endswith(ACTIVATION_SUFFIXES) or k.endswith((".k_scale", ".v_scale"))]
    return schemes, dropped


def _fp8_schemes(qc: dict, stored: Stored, name: str) -> dict:
    block = qc.get("weight_block_size")
    if block is not None and (len(block) != 2 or min(block) < 1):
        raise QuantizedFormatError(f"{name}: config.json quantization_config: weight_block_size {block!r} "
                                   f"is not [rows, cols]")
    out = {}
    fp8 = {torch.float8_e4m3fn} if FP8_DTYPE is not None else set()
    for key, (dtype, shape) in stored.items():
        if key.endswith("_scale_inv"):
            base = key[:-len("_scale_inv")]
            if base not in stored or stored[base][0] not in fp8:
                raise QuantizedFormatError(f"{name}: tensor {key}: a scale whose weight {base} is "
                                           f"{'missing' if base not in stored else 'not stored as float8'}")
            continue
        if dtype not in fp8:
            continue
        scale = fp8_scale_key(key)
        if len(shape) < 2:
            raise QuantizedFormatError(f"{name}: tensor {key}: a float8 tensor of shape {tuple(shape)}; "
                                       f"fp8 weights are matrices")
        if scale not in stored:
            raise QuantizedFormatError(f"{name}: tensor {key} is stored as float8 but its scales {scale} are "
                                       f"missing (an fp8 checkpoint stores one per weight)")
        sdtype, sshape = stored[scale]
        if not sdtype.is_floating_point or sdtype.itemsize < 2:
            raise QuantizedFormatError(f"{name}: tensor {scale}: scales of dtype {sdtype} are not read "
                                       f"(float32 or bfloat16 scales are)")
        rows, cols = shape[-2], shape[-1]
        b = (rows, cols) if block is None else (int(block[0]), int(block[1]))
        want = scale_grid(shape, b)
        lead = math.prod(shape[:-2])
        if tuple(sshape) != want and not (block is None and math.prod(sshape) == lead):
            raise QuantizedFormatError(f"{name}: tensor {scale} has shape {tuple(sshape)}, but {key} "
                                       f"{tuple(shape)} in blocks of {list(b)} needs {want}")
        out[key] = (Scheme("fp8-block", key, scale, None, b, (ceil_div(rows, b[0]), ceil_div(cols, b[1])),
                           torch.float32), tuple(shape))
    return out


def _compressed_schemes(qc: dict, stored: Stored, name: str, read: Callable[[str], torch.Tensor]) -> dict:
    where = f"{name}: config.json quantization_config"
    supported = SUPPORTED["compressed-tensors"]
    sparsity = (qc.get("sparsity_config") or {}).get("format")
    if sparsity not in (None, "dense"):
        raise QuantizedFormatError(f"{where}: compressed-tensors sparsity format {sparsity!r} is not "
                                   f"supported; supported: {supported_list()}")
    groups = qc.get("config_groups") or {}
    fmt = qc.get("format")
    formats = {g.get("format") or fmt for g in groups.values()} if fmt in (None, "mixed-precision") else {fmt}
    bad = sorted(str(f) for f in formats if f not in supported)
    if bad:
        raise QuantizedFormatError(f"{where}: compressed-tensors format {bad[0]!r} is not supported; "
                                   f"supported: {supported_list()}")
    args = [g.get("weights") for g in groups.values() if g.get("weights")]
    if not args:
        return {}
    if any(a != args[0] for a in args):
        raise QuantizedFormatError(f"{where}: config_groups with different weight schemes are not "
                                   f"supported (one weight scheme for every quantized layer is)")
    wa, fmt = args[0], sorted(formats)[0]
    strategy = wa.get("strategy") or "tensor"
    bits = int(wa.get("num_bits") or 8)
    packed = fmt == "pack-quantized"
    if packed and (bits != 4 or not wa.get("symmetric", True)):
        raise QuantizedFormatError(f"{where}: pack-quantized with {bits} bits"
                                   f"{'' if wa.get('symmetric', True) else ', asymmetric'} is not supported "
                                   f"(4-bit symmetric is); supported: {supported_list()}")
    if strategy not in ("tensor", "channel", "group", "block"):
        raise QuantizedFormatError(f"{where}: weight strategy {strategy!r} is not supported (tensor, channel, "
                                   f"group, block are)")
    out = {}
    suffix = ".weight_packed" if packed else ".weight"
    for key in stored:
        if not key.endswith(".weight_scale"):
            continue
        module = key[:-len(".weight_scale")]
        values, zp = module + suffix, module + ".weight_zero_point"
        if values not in stored:
            raise QuantizedFormatError(f"{name}: tensor {key}: scales whose weight {values} is missing")
        vdtype, vshape = stored[values]
        extra: tuple[str, ...] = ()
        if packed:
            if module + ".weight_shape" not in stored:
                raise QuantizedFormatError(f"{name}: tensor {values}: packed weights without {module}.weight_shape")
            extra = (module + ".weight_shape",)
            shape = tuple(int(x) for x in read(extra[0]).reshape(-1).tolist())
            if len(shape) != 2 or vshape != (shape[0], ceil_div(shape[1] * bits, 32)):
                raise QuantizedFormatError(f"{name}: tensor {values} {tuple(vshape)} does not hold a {shape} "
                                           f"weight of {bits}-bit values")
        else:
            shape = tuple(vshape)
        if len(shape) != 2:
            raise QuantizedFormatError(f"{name}: tensor {values}: compressed-tensors weights are matrices, "
                                       f"got shape {shape}")
        rows, cols = shape
        if strategy == "tensor":
            block = (rows, cols)
        elif strategy == "channel":
            block = (1, cols)
        elif strategy == "group":
            block = (1, int(wa.get("group_size") or 0))
        else:
            block = tuple(int(x) for x in (wa.get("block_structure") or (0, 0)))
        if min(block) < 1:
            raise QuantizedFormatError(f"{where}: strategy {strategy} without its group_size / block_structure")
        grid = (ceil_div(rows, block[0]), ceil_div(cols, block[1]))
        sdtype, sshape = stored[key]
        if math.prod(sshape) != grid[0] * grid[1] or (strategy != "tensor" and tuple(sshape) != grid):
            raise QuantizedFormatError(f"{name}: tensor {key} has shape {tuple(sshape)}, but {module} "
                                       f"{shape} ({strategy} strategy, blocks of {list(block)}) needs {grid}")
        zero = None
        if zp in stored:
            if packed or tuple(stored[zp][1]) != tuple(sshape):
                raise QuantizedFormatError(f"{name}: tensor {zp}: zero points of shape {tuple(stored[zp][1])} "
                                           f"are not read (unpacked, the scales' shape {tuple(sshape)})")
            zero = zp
        out[module + ".weight"] = (Scheme(f"compressed-tensors {fmt}", values, key, zero, block, grid, sdtype,
                                          4 if packed else 0, extra), shape)
    return out
