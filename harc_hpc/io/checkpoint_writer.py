"""Writing Hugging Face model directories tensor by tensor: sharded safetensors laid out up front.

When the list of output tensors is known (``declare``), each shard file is laid out at once (header
first, then data at fixed offsets) and tensors, or contiguous parts of them, are written where they
belong as soon as they are merged. Nothing is buffered beyond the tensor being written, and the
bytes do not depend on the order of writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch

from harc_hpc.io import quantized
from harc_hpc.io.atomic import atomic_dir
from harc_hpc.io.checkpoint import (MODEL_FILES, SAFE_INDEX, SAFE_SINGLE, Checkpoint, CheckpointError,
                                    dtype_to_safetensors, parse_size)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


class _Shard:
    def __init__(self, path: Path):
        self.path = path
        self.entries: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []  # key, dtype, shape, nbytes
        self.size = 0


class CheckpointWriter:
    """Sharded safetensors output with ``model.safetensors.index.json``.

    ``declare(entries)`` first (key, dtype, shape for every output tensor, in file order): shards are
    laid out and created at once, then ``add(key, t)`` / ``add_part(key, start, t)`` write straight
    to the final position (parts in any order, from any thread). ``finalize()`` checks every byte
    was written.

    A single shard is named ``model.safetensors`` and has no index, like ``save_pretrained``.
    """

    def __init__(self, out_dir: Union[str, Path], max_shard_bytes: Union[int, str] = "5GB",
                 metadata: Optional[dict] = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = parse_size(max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._declared = False
        self._layout: dict[str, tuple[_Shard, int, torch.dtype, tuple[int, ...], int]] = {}
        self._written: dict[str, int] = {}
        self._shards: list[_Shard] = []
        self._files: dict[Path, int] = {}
        self._finalized = False

    # -- planning ---------------------------------------------------------------------------------
    def _split(self, entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]) -> list[_Shard]:
        shards: list[_Shard] = []
        current = None
        for key, dtype, shape in entries:
            nbytes = dtype.itemsize
            for s in shape:
                nbytes *= int(s)
            if current is None or (current.entries and current.size + nbytes > self.max_shard_bytes):
                current = _Shard(Path())
                shards.append(current)
            current.entries.append((key, dtype, tuple(int(s) for s in shape), nbytes))
            current.size += nbytes
        n = len(shards)
        for i, sh in enumerate(shards):
            name = SAFE_SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            sh.path = self.out_dir / name
        return shards

    def _header(self, shard: _Shard) -> tuple[bytes, dict[str, int]]:
        header: dict = {"__metadata__": self.metadata}
        offsets = {}
        pos = 0
        # Wider dtypes first keep every tensor aligned to its element size (as safetensors does).
        ordered = sorted(shard.entries, key=lambda e: -e[1].itemsize)
        for key, dtype, shape, nbytes in ordered:
            header[key] = {"dtype": dtype_to_safetensors(dtype), "shape": list(shape),
                           "data_offsets": [pos, pos + nbytes]}
            offsets[key] = pos
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(len(raw) + 8) % 8)
        return len(raw).to_bytes(8, "little") + raw, offsets

    def declare(self, entries: Iterable[tuple[str, torch.dtype, Sequence[int]]]) -> None:
        entries = [(k, d, tuple(s)) for k, d, s in entries]
        if self._declared or self._written:
            raise RuntimeError("declare() must be called once, before any add()")
        keys = [k for k, _, _ in entries]
        if len(set(keys)) != len(keys):
            raise ValueError("declare(): duplicate tensor names")
        self._declared = True
        self._shards = self._split(entries)
        for sh in self._shards:
            head, offsets = self._header(sh)
            fd = os.open(sh.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(fd, head, 0)
            os.ftruncate(fd, len(head) + sh.size)
            self._files[sh.path] = fd
            for key, dtype, shape, nbytes in sh.entries:
                self._layout[key] = (sh, len(head) + offsets[key], dtype, shape, nbytes)

    # -- writing ----------------------------------------------------------------------------------
    def add(self, key: str, tensor: torch.Tensor) -> None:
        _, _, dtype, shape, _ = self._slot(key)
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{key}: declared {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        self.add_part(key, 0, tensor)

    def add_part(self, key: str, start: int, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (any shape, the declared dtype) at element ``start`` of the flattened
        declared tensor ``key``."""
        sh, begin, dtype, shape, nbytes = self._slot(key)
        if tensor.dtype != dtype:
            raise ValueError(f"{key}: declared {dtype}, got {tensor.dtype}")
        data = _tensor_bytes(tensor)
        off = start * tensor.element_size()
        if off + len(data) > nbytes:
            raise ValueError(f"{key}: part at element {start} runs past the tensor's end")
        fd = self._files[sh.path]
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], begin + off + done)
        self._written[key] = self._written.get(key, 0) + len(data)

    def _slot(self, key: str):
        if not self._declared:
            raise RuntimeError("add() / add_part() need declare() first")
        try:
            return self._layout[key]
        except KeyError:
            raise ValueError(f"{key}: not a declared output tensor") from None

    # -- closing ----------------------------------------------------------------------------------
    def finalize(self) -> list[Path]:
        if self._finalized:
            raise RuntimeError("finalize() called twice")
        self._finalized = True
        missing = [k for k, (_, _, _, _, n) in self._layout.items() if self._written.get(k, 0) != n]
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        if missing:
            raise RuntimeError(f"{len(missing)} declared tensors were not (fully) written, e.g. {missing[:3]}")
        self._write_index()
        return [sh.path for sh in self._shards]

    def _write_index(self) -> None:
        if len(self._shards) <= 1:
            if not self._shards:  # an empty model still gets a valid file
                head, _ = self._header(_Shard(Path()))
                (self.out_dir / SAFE_SINGLE).write_bytes(head)
            return
        wmap = {}
        total = 0
        for sh in self._shards:
            for key, _, _, nbytes in sh.entries:
                wmap[key] = sh.path.name
                total += nbytes
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}
        (self.out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for fd in self._files.values():
            with contextlib.suppress(OSError):
                os.close(fd)


class Fp8BlockWriter:
    """A CheckpointWriter that stores the tensors named in ``blocks`` as FP8 blocks: each one is
    collected whole (its parts in any order, in the dtype it is declared with), then written as
    float8_e4m3fn ``key`` and float32 ``key_scale_inv`` (harc_hpc.io.quantized.quantize_fp8_block),
    the layout DeepSeek-V3's checkpoints have. Every other tensor goes straight through. One
    quantized tensor is held at a time when parts arrive tensor by tensor (a merge's order)."""

    def __init__(self, writer: CheckpointWriter, blocks: Mapping[str, tuple[int, int]]):
        self.writer = writer
        self.blocks = dict(blocks)
        self._pending: dict[str, tuple[torch.Tensor, int]] = {}  # key -> (flat buffer, elements written)
        self._declared: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.quantized: list[str] = []

    def declare(self, entries: Iterable[tuple[str, torch.dtype, Sequence[int]]]) -> None:
        out = []
        for key, dtype, shape in entries:
            shape = tuple(int(s) for s in shape)
            if key in self.blocks:
                if len(shape) < 2:
                    raise CheckpointError(f"tensor {key}: shape {shape} cannot be stored in FP8 blocks")
                self._declared[key] = (dtype, shape)
                out.append((key, quantized.FP8_DTYPE, shape))
                out.append((quantized.fp8_scale_key(key), torch.float32,
                            quantized.scale_grid(shape, self.blocks[key])))
            else:
                out.append((key, dtype, shape))
        self.writer.declare(out)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key not in self.blocks:
            self.writer.add(key, tensor)
            return
        dtype, shape = self._declared[key]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{key}: declared {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        self.add_part(key, 0, tensor)

    def add_part(self, key: str, start: int, tensor: torch.Tensor) -> None:
        if key not in self.blocks:
            self.writer.add_part(key, start, tensor)
            return
        dtype, shape = self._declared[key]
        numel = 1
        for s in shape:
            numel *= s
        buf, done = self._pending.get(key) or (torch.empty(numel, dtype=dtype), 0)
        part = tensor.detach().to("cpu").reshape(-1)
        if part.dtype != dtype or start + part.numel() > numel:
            raise ValueError(f"{key}: part of {part.numel()} {part.dtype} at {start} does not fit {dtype} {shape}")
        buf[start:start + part.numel()] = part
        done += part.numel()
        if done < numel:
            self._pending[key] = (buf, done)
            return
        self._pending.pop(key, None)
        values, scale_inv = quantized.quantize_fp8_block(buf.view(shape), self.blocks[key])
        del buf
        self.writer.add(key, values)
        self.writer.add(quantized.fp8_scale_key(key), scale_inv)
        self.quantized.append(key)

    def finalize(self) -> list[Path]:
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} FP8 tensors were not fully written, e.g. "
                               f"{sorted(self._pending)[:3]}")
        return self.writer.finalize()

    def abort(self) -> None:
        self._pending.clear()
        self.writer.abort()


# ---------------------------------------------------------------------------------------------
# Directories
# ---------------------------------------------------------------------------------------------

def copy_model_files(src: Union[str, Path], dst: Union[str, Path],
                     names: Sequence[str] = MODEL_FILES) -> list[str]:
    """Copy config, generation config and tokenizer files that exist in ``src``; returns their names.
    With ``config.json`` comes the checkpoint's own modeling code (its top-level ``*.py``) when the
    config names some (``auto_map``), so that the copy loads as the original does."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        f = src / name
        if f.is_file():
            shutil.copyfile(f, dst / name)
            copied.append(name)
    if "config.json" in copied and json.loads((src / "config.json").read_text()).get("auto_map"):
        for f in sorted(src.glob("*.py")):
            shutil.copyfile(f, dst / f.name)
            copied.append(f.name)
    return copied


def patch_tensors(src_dir: Union[str, Path], dst_dir: Union[str, Path],
                  replacements: Mapping[str, torch.Tensor], max_shard_size: Union[int, str] = "5GB",
                  allow_pickle: bool = False) -> Path:
    """Copy the checkpoint at ``src_dir`` to ``dst_dir`` (atomically) with some tensors replaced.

    Each replacement must name an existing tensor of the same shape; it is stored in its own dtype.
    Other tensors are copied byte for byte. Model files (config, tokenizer, ...) are copied too.
    """
    src = Checkpoint(src_dir, allow_pickle=allow_pickle)
    if src.dequantized:
        return _patch_stored(src, dst_dir, replacements, max_shard_size)
    unknown = sorted(set(replacements) - set(src.keys()))
    if unknown:
        raise CheckpointError(f"{src.path}: cannot replace tensors that do not exist: {unknown[:5]}")
    for key, t in replacements.items():
        if tuple(t.shape) != src.tensor_shape(key):
            raise CheckpointError(f"{src.path}: tensor {key}: replacement shape {tuple(t.shape)} != "
                                  f"{src.tensor_shape(key)}")
    entries = []
    for key in src.keys():
        t = replacements.get(key)
        entries.append((key, t.dtype if t is not None else src.tensor_dtype(key), src.tensor_shape(key)))
    return _write_patched(src, dst_dir, entries, replacements, src.get_tensor, max_shard_size)


def _patch_stored(src: Checkpoint, dst_dir: Union[str, Path], replacements: Mapping[str, torch.Tensor],
                  max_shard_size: Union[int, str]) -> Path:
    """patch_tensors for a quantized checkpoint: every tensor copied as stored (FP8 values and
    their scales byte for byte), the replacements (unquantized tensors: routers, biases) in their
    own dtype; the config keeps its quantization_config."""
    stored = src.stored_keys()
    for key, t in replacements.items():
        if src.is_dequantized(key):
            raise CheckpointError(f"{src.path}: tensor {key} is stored quantized; a replacement for it "
                                  f"would need quantizing (routers, norms and biases are not quantized)")
        if key not in stored:
            raise CheckpointError(f"{src.path}: cannot replace tensors that do not exist: {key}")
        if tuple(t.shape) != tuple(src.stored_info(key).shape):
            raise CheckpointError(f"{src.path}: tensor {key}: replacement shape {tuple(t.shape)} != "
                                  f"{src.stored_info(key).shape}")
    entries = [(k, replacements[k].dtype if k in replacements else src.stored_info(k).dtype,
                src.stored_info(k).shape) for k in stored]
    return _write_patched(src, dst_dir, entries, replacements, src.read_stored, max_shard_size)


def _write_patched(src: Checkpoint, dst_dir: Union[str, Path], entries: list, replacements: Mapping[str, torch.Tensor],
                   read, max_shard_size: Union[int, str]) -> Path:
    """Write ``entries`` (key, dtype, shape) to ``dst_dir`` atomically: a replacement where there is
    one, else ``read(key)`` from ``src``; then the model files, and ``src`` closed."""
    with atomic_dir(dst_dir) as tmp:
        writer = CheckpointWriter(tmp, max_shard_size)
        try:
            writer.declare(entries)
            for key, _, _ in entries:
                t = replacements.get(key)
                writer.add(key, t.detach().cpu().contiguous() if t is not None else read(key))
            writer.finalize()
        except BaseException:
            writer.abort()
            raise
        copy_model_files(src.path, tmp)
    src.close()
    return Path(dst_dir)
