"""Zarr stores for tokens, hidden states and router inputs.

Everything is stored flat along tokens (``(num_tokens, d)``) with the sequence boundaries as an
``offsets`` array, chunked along tokens so a solver can stream a layer's inputs chunk by chunk.
Stores are written under a temporary name and renamed into place, so a killed job never leaves a
store that looks complete. Every chunk carries a CRC32C (Zarr's crc32c codec) that is checked each
time the chunk is decoded, and a reader refuses an array with missing chunks (Zarr would read them
as zeros): corrupted or truncated activations fail loudly, naming store, array and rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import zarr

from zarr.codecs import Crc32cCodec, ZstdCodec

from harc_hpc.io.atomic import atomic_path
from harc_hpc.errors import CorruptArtifactError

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


COMPRESSIONS = ("none", "zstd")


def _codecs(compression: str = "zstd") -> list:
    """The chunk codecs: optionally Zarr's default compressor (zstd at its default level), then
    always a CRC32C of the encoded chunk. Readers need no setting: the codecs are in the metadata."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    return ([ZstdCodec(level=0, checksum=False)] if compression == "zstd" else []) + [Crc32cCodec()]


def _storage_dtype(name: str):
    # Zarr has no bfloat16: keep the raw 16 bits as uint16 and reinterpret them on read.
    if name == "bfloat16":
        return np.uint16
    return _NP_DTYPES[name]


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return x.detach().to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().view(np.uint16)
    return x.detach().cpu().numpy().astype(_NP_DTYPES[dtype], copy=False)


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


# -- tokens ---------------------------------------------------------------


def write_token_store(path: Path, seqs: Sequence[Sequence[int]], digest: str,
                      masks: Optional[Sequence[Sequence[bool]]] = None) -> None:
    """Token ids of every sequence, flat, with their offsets; ``masks``: per token whether the
    calibration mode selects it (stored only when some token is not selected)."""
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    ids = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(offsets[-1]))
    selected = None
    if masks is not None:
        if [len(m) for m in masks] != [len(s) for s in seqs]:
            raise ValueError("write_token_store: every sequence needs a mask of its own length")
        selected = np.fromiter((bool(b) for m in masks for b in m), dtype=np.bool_, count=int(offsets[-1]))
        if selected.all():
            selected = None
    with atomic_path(path) as tmp:
        g = zarr.open_group(str(tmp), mode="w")
        g.create_array("ids", data=ids, chunks=(max(1, min(len(ids), 1 << 20)),), compressors=_codecs())
        g.create_array("offsets", data=offsets, chunks=(max(1, len(offsets)),), compressors=_codecs())
        if selected is not None:
            g.create_array("selected", data=selected.astype(np.uint8), chunks=(max(1, min(len(ids), 1 << 20)),),
                           compressors=_codecs())
        g.attrs["digest"] = digest


class TokenStore:
    """The tokenised calibration data of one task. ``selected``: per token whether the calibration
    mode selects it (None: every token, modes full and prompt); all tokens are fed to the model,
    only the selected ones' router inputs are captured."""

    def __init__(self, path: Path):
        self.path = Path(path)
        g = zarr.open_group(str(self.path), mode="r")
        self.digest = g.attrs.get("digest")
        self.offsets = np.asarray(g["offsets"][:], dtype=np.int64)
        self.ids = np.asarray(g["ids"][:], dtype=np.int64)
        self.selected = np.asarray(g["selected"][:], dtype=np.bool_) if "selected" in g else None
        # Sequence boundaries counted in selected tokens: the offsets of the router-input arrays.
        self.selected_offsets = self.offsets if self.selected is None else \
            np.concatenate([[0], np.cumsum(self.selected, dtype=np.int64)])[self.offsets]

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_selected(self) -> int:
        return int(self.selected_offsets[-1])

    def sequence(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]


def token_store_digest(path: Path) -> Optional[str]:
    try:
        return zarr.open_group(str(path), mode="r").attrs.get("digest")
    except Exception:  # noqa: BLE001 - a missing or broken store simply has no digest
        return None


# -- activations ----------------------------------------------------------


class ActivationWriter:
    """Fills named ``(num_tokens, d)`` arrays of one Zarr group, slice by slice.

    Slices written in order are buffered up to whole chunks, so every chunk is encoded and written
    once (a 4096-token batch into a 16384-token chunk would otherwise rewrite the chunk four times:
    read, decode, merge, encode, write). ``close()`` writes what is left; out-of-order slices are
    written straight through. ``buffer_chunks=False`` writes every slice at once (the benchmark's
    baseline).
    """

    def __init__(self, root: Path, chunk_tokens: int, dtype: str, buffer_chunks: bool = True,
                 compression: str = "zstd", append: bool = False):
        """``append``: open an existing store (a resumed capture) and keep its arrays; ``create``
        then replaces only the arrays it names."""
        self.group = zarr.open_group(str(root), mode="a" if append else "w")
        self.chunk_tokens = chunk_tokens
        self.dtype = dtype
        self.buffer_chunks = buffer_chunks
        self.compression = compression
        _codecs(compression)  # refuse an unknown one before anything is written
        self.group.attrs["dtype"] = dtype
        self._arrays: dict = {}
        self._pending: dict[str, tuple[int, list]] = {}  # name -> (first row buffered, slices)

    def create(self, name: str, num_tokens: int, dim: int, offsets: np.ndarray):
        arr = self.group.create_array(
            name,
            overwrite=True,
            shape=(num_tokens, dim),
            chunks=(max(1, min(self.chunk_tokens, num_tokens)), dim),
            dtype=_storage_dtype(self.dtype),
            compressors=_codecs(self.compression),
        )
        arr.attrs["offsets"] = [int(o) for o in offsets]
        arr.attrs["dtype"] = self.dtype
        self._arrays[name] = arr
        self._pending[name] = (0, [])
        return arr

    def write(self, name: str, start: int, values: torch.Tensor) -> None:
        data = to_storage(values, self.dtype)
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._arrays[name] = self.group[name]
            self._pending[name] = (start, [])
        if not self.buffer_chunks:
            arr[start : start + data.shape[0]] = data
            return
        first, slices = self._pending[name]
        buffered = sum(s.shape[0] for s in slices)
        if start != first + buffered:  # not the next slice: write what is buffered, then this one
            self._flush(name)
            arr[start : start + data.shape[0]] = data
            self._pending[name] = (start + data.shape[0], [])
            return
        slices.append(data)
        buffered += data.shape[0]
        step = arr.chunks[0]
        # Write every whole chunk the buffer now covers (the buffer starts on a chunk boundary
        # when the slices start at row 0, as capture's do).
        end = first + buffered
        cut = end if end == arr.shape[0] else (end // step) * step  # the array's last chunk may be short
        if cut > first and first % step == 0:
            block = np.concatenate(slices) if len(slices) > 1 else slices[0]
            arr[first:cut] = block[: cut - first]
            rest = block[cut - first:]
            self._pending[name] = (cut, [rest] if rest.shape[0] else [])

    def _flush(self, name: str) -> None:
        first, slices = self._pending.get(name, (0, []))
        if slices:
            block = np.concatenate(slices) if len(slices) > 1 else slices[0]
            self._arrays[name][first : first + block.shape[0]] = block
            self._pending[name] = (first + block.shape[0], [])

    def chunk_rows(self, name: str) -> int:
        """Rows per chunk of array ``name``."""
        arr = self._arrays.get(name)
        return int((arr if arr is not None else self.group[name]).chunks[0])

    def flushed_rows(self, name: str) -> int:
        """Rows of array ``name`` handed to the store so far (the rest is buffered in memory): with
        slices written in order from row 0, every chunk below this row is written."""
        return int(self._pending[name][0])

    def finish(self, name: str) -> None:
        """Write every buffered row of one array (it is complete)."""
        self._flush(name)

    def close(self) -> None:
        """Write every buffered row (call before the store is published)."""
        for name in list(self._pending):
            self._flush(name)


class ActivationArray:
    """One stored ``(num_tokens, d)`` array. Iterating yields float tensors chunk by chunk (in
    ``out_dtype``; None: the stored dtype, bfloat16 included), and can be repeated (the solver
    streams the inputs once per operator application)."""

    def __init__(self, store: Path, name: str, chunk_tokens: Optional[int] = None, out_dtype=torch.float32,
                 rows: Optional[np.ndarray] = None, consumed_rows: int = 0):
        """``rows``: sorted row indices to keep (a token subsample); iteration and ``len`` see only them.
        ``consumed_rows``: the chunks lying wholly below this row may be gone (a streamed capture
        deletes what it has consumed; it reads only above that row)."""
        self.store = Path(store)
        self.name = name
        self._array = zarr.open_group(str(self.store), mode="r")[name]
        gone = consumed_rows // self.stored_chunk_rows
        missing = self._array.nchunks - gone - self._array.nchunks_initialized
        if missing > 0:
            raise CorruptArtifactError(self.store, f"array {name}: {missing} of {self._array.nchunks} chunks are "
                                                   f"missing (they would read as zeros)")
        self.dtype = self._array.attrs.get("dtype", "float32")
        self.offsets = np.asarray(self._array.attrs["offsets"], dtype=np.int64)
        self.chunk_tokens = chunk_tokens or self._array.chunks[0]
        self.out_dtype = out_dtype
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), int(self._array.shape[1]))

    def __len__(self) -> int:
        return self.num_stored if self.rows is None else int(self.rows.shape[0])

    @property
    def stored_chunk_rows(self) -> int:
        """Rows per chunk of the stored array (``chunk_tokens`` is the reading step)."""
        return int(self._array.chunks[0])

    @property
    def num_stored(self) -> int:
        """Rows in the store (all of them, subsample or not)."""
        return int(self._array.shape[0])

    def read_stored(self, start: int, stop: int) -> torch.Tensor:
        """Stored rows ``start:stop`` in the stored dtype (bfloat16 included)."""
        try:
            raw = self._array[start:stop]
        except ValueError as exc:  # the crc32c codec's "Stored and computed checksum do not match"
            raise CorruptArtifactError(self.store, f"array {self.name}: rows {start}:{stop} fail their "
                                                   f"checksum ({exc})") from None
        return from_storage(raw, self.dtype)

    def read(self, start: int, stop: int) -> torch.Tensor:
        x = self.read_stored(start, stop)
        return x if self.out_dtype is None else x.to(self.out_dtype)

    def __iter__(self) -> Iterator[torch.Tensor]:
        n = self.num_stored
        for start in range(0, n, self.chunk_tokens):
            stop = min(n, start + self.chunk_tokens)
            if self.rows is None:
                yield self.read(start, stop)
                continue
            lo, hi = np.searchsorted(self.rows, [start, stop])
            if hi > lo:
                yield self.read(start, stop)[torch.from_numpy(self.rows[lo:hi] - start)]

    def load(self) -> torch.Tensor:
        return self.read(0, self.num_stored)


RESIDUAL_KIND = "residual"


def stored_attr(store: Path, name: str, attr: str, default=None):
    """An attribute of array ``name`` of a Zarr store (a missing array: CorruptArtifactError)."""
    try:
        return zarr.open_group(str(store), mode="r")[name].attrs.get(attr, default)
    except (KeyError, FileNotFoundError) as exc:
        raise CorruptArtifactError(Path(store), f"array {name} is missing ({exc})") from None


def stored_kind(store: Path, name: str) -> str:
    """What an array of an activation store holds: ``router_inputs`` (captured as the router saw
    them) or ``residual`` (the residual stream they are derived from: RouterInputsFromResidual)."""
    return stored_attr(store, name, "kind", "router_inputs")


class RouterInputsFromResidual(ActivationArray):
    """A layer's router inputs derived on read from its stored residual stream (streamed capture).

    The store holds ``r``, the residual entering the layer's feed-forward half, for *every* token
    (``offsets``: the token offsets); the router input of a token is ``norm(r)`` (the layer's
    ``post_attention_layernorm``, given by the caller) computed in ``compute_dtype`` (the dtype the
    capture ran the layer in), rounded to the stored dtype exactly as a captured router input was
    stored, and kept only for the tokens the calibration mode selects (``selected``). Rows, offsets,
    ``len`` and ``read`` are in selected-token coordinates, like a store of captured router inputs.
    """

    def __init__(self, store: Path, name: str, norm: torch.nn.Module, compute_dtype: torch.dtype,
                 selected: Optional[np.ndarray] = None, chunk_tokens: Optional[int] = None,
                 out_dtype=torch.float32, rows: Optional[np.ndarray] = None):
        super().__init__(store, name, chunk_tokens=chunk_tokens, out_dtype=out_dtype, rows=rows)
        self.norm = norm
        self.compute_dtype = compute_dtype
        self.token_offsets = self.offsets
        self.selected_tokens = None if selected is None else np.flatnonzero(np.asarray(selected, dtype=np.bool_))
        if self.selected_tokens is not None:
            if len(selected) != self._array.shape[0]:
                raise CorruptArtifactError(self.store, f"array {name}: {self._array.shape[0]} tokens stored, the "
                                                       f"token store's selection has {len(selected)}")
            counts = np.concatenate([[0], np.cumsum(selected, dtype=np.int64)])
            self.offsets = counts[self.token_offsets]

    @property
    def num_stored(self) -> int:
        return int(self._array.shape[0]) if self.selected_tokens is None else int(len(self.selected_tokens))

    @torch.no_grad()
    def read_stored(self, start: int, stop: int) -> torch.Tensor:
        stop = max(start, min(stop, self.num_stored))
        if self.selected_tokens is None:
            lo, hi = start, stop
        elif stop > start:
            lo, hi = int(self.selected_tokens[start]), int(self.selected_tokens[stop - 1]) + 1
        else:
            lo = hi = 0
        r = super().read_stored(lo, hi).to(self.compute_dtype)
        x = from_storage(to_storage(self.norm(r), self.dtype), self.dtype)
        if self.selected_tokens is not None:
            x = x[torch.from_numpy(self.selected_tokens[start:stop] - lo)]
        return x


def token_subsample(offsets: np.ndarray, max_tokens: int, seed: int) -> Optional[np.ndarray]:
    """Sorted rows of a seeded, sequence-stratified subsample of ``max_tokens`` tokens (None: all).

    Every sequence keeps its share of the budget (largest remainders get the rounding), chosen
    uniformly within it, so long and short sequences, and every part of the data, stay represented.
    """
    lengths = np.diff(np.asarray(offsets, dtype=np.int64))
    total = int(lengths.sum())
    if max_tokens >= total:
        return None
    share = lengths * (max_tokens / total)
    keep = np.floor(share).astype(np.int64)
    order = np.argsort(-(share - keep), kind="stable")
    keep[order[: max_tokens - int(keep.sum())]] += 1
    rng = np.random.default_rng(seed)
    rows = [off + np.sort(rng.choice(n, size=k, replace=False))
            for off, n, k in zip(offsets[:-1], lengths, keep) if k]
    return np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)


def layer_name(layer: int) -> str:
    return f"layer-{layer:03d}"
