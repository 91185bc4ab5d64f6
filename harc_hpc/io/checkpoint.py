"""Hugging Face model directories, located (local path or hub id) and read tensor by tensor;
writing is harc_hpc.io.checkpoint_writer.

Reading uses the safetensors header (a JSON table of dtype, shape and byte range per tensor) and
``os.preadv`` into a freshly allocated tensor. Memory-mapping a shard (what ``safe_open`` does) would
leave every page read so far mapped and resident until the handle closes, so the resident set of a
merge would grow with the number of layers read; positional reads keep it at the tensors in use.

Pickle checkpoints (``*.bin``, ``*.pt``) can run arbitrary code when loaded. They are refused unless
the caller passes ``allow_pickle=True``, and even then are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch

from harc_hpc.errors import InputDataError
from harc_hpc.io.sources import IGNORE as _HUB_IGNORE
from harc_hpc.io.sources import allow_patterns, split_revision
from harc_hpc.io.sources import hub_offline as _hub_offline, hub_timeout_s as _hub_timeout_s
from harc_hpc.io.sources import looks_local as _looks_local
from harc_hpc.io import quantized as q
from harc_hpc.io.quantized import Scheme

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")

# Files next to the weights that a merged model needs to load and tokenize like its inputs.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    # a multimodal model's processor: image / video / audio preprocessing and the processor itself
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


log = logging.getLogger(__name__)


class CheckpointError(InputDataError):
    """A checkpoint that cannot be read as asked; the message names the model, file and tensor."""


def dtype_to_safetensors(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors") from None


def parse_size(size: Union[int, str]) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units as in transformers; ``GiB`` etc. are binary)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r} (use e.g. 5GB, 500MB, 2GiB or a byte count)")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(value * scale)


# ---------------------------------------------------------------------------------------------
# Locating a model
# ---------------------------------------------------------------------------------------------

def _hub_problem(repo_id: str, revision: Optional[str], timeout_s: float) -> Optional[str]:
    """None when the hub has ``repo_id`` at ``revision``, else why it cannot be fetched.

    The hub client waits without a time limit by default (a compute node without internet can
    hang for minutes); this asks once, in a thread that is given up on after ``timeout_s``.
    """
    import threading

    from huggingface_hub import HfApi
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    outcome: dict = {}

    def ask() -> None:
        try:
            HfApi().repo_info(repo_id, revision=revision, timeout=timeout_s)
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    probe = threading.Thread(target=ask, name="harc-hub-probe", daemon=True)
    probe.start()
    probe.join(timeout_s + 0.5)
    if probe.is_alive():
        return f"the hub could not be reached (no answer within {timeout_s:g} s)"
    exc = outcome.get("error")
    if exc is None:
        return None
    if isinstance(exc, RevisionNotFoundError):
        return f"the hub has the repository but not the revision {revision!r}"
    if isinstance(exc, GatedRepoError):
        return "the repository is gated: accept its terms on the hub and log in (hf auth login, or HF_TOKEN)"
    if isinstance(exc, RepositoryNotFoundError):
        return ("the repository does not exist on the hub (or is private: log in with hf auth login, "
                "or set HF_TOKEN)")
    detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    if isinstance(exc, HfHubHTTPError):
        return f"the hub answered with an error ({detail})"
    return f"the hub could not be reached ({detail})"


def _hub_hint(repo_id: str, revision: Optional[str]) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (f"download it where the hub is reachable (hf download {repo_id}{rev} --local-dir DIR) and "
            "give DIR as the model path, or fill a hub cache on a shared filesystem (HF_HOME) and set "
            "HF_HUB_OFFLINE=1")


def resolve_model_path(path_or_hub_id: Union[str, Path], revision: Optional[str] = None,
                       allow_download: bool = True, files: Optional[Sequence[str]] = None) -> Path:
    """A local model directory, or the snapshot directory of a hub id.

    Something that can only be a path (``./m``, ``/m``, ``~/m``, ``a/b/c``, ``models/m`` where
    ``models/`` exists, or no hub-id form at all) must be an existing directory. A hub id
    (``owner/name``; ``owner/name@rev`` names its revision, which wins over ``revision``) is looked
    up in the local hub cache first, without network; then, unless
    ``allow_download=False`` or ``HF_HUB_OFFLINE`` is set, on the hub, which has
    ``HF_HUB_ETAG_TIMEOUT`` (8 s by default) to answer. Hub snapshots fetch what the stages read
    (harc_hpc.io.sources.allow_patterns; pickle weights never, nothing below the top level); ``files``
    (patterns) narrows that further, e.g. ``["config.json"]`` for the planner.
    """
    patterns = list(files) if files is not None else allow_patterns()
    text, pinned = split_revision(str(path_or_hub_id))  # owner/name@rev: the revision after @ wins
    revision = pinned or revision
    p = Path(text).expanduser()
    if p.is_dir():
        return p.resolve()
    if p.exists():
        raise CheckpointError(f"{p}: is a file; a model is a directory with config.json and weights")
    absolute = str(p.resolve())
    if _looks_local(text):
        shown = text if absolute == text else f"{text} (that is {absolute})"
        raise CheckpointError(f"model directory not found: no such directory: {shown}",
                              hint="a local model is a directory with config.json and weights; "
                                   "a hub id has the form owner/name")
    where = f"{text} (revision {revision})" if revision else text
    not_local = f"no local directory {absolute}, and as a hub id"
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import IncompleteSnapshotError
    except ImportError:  # pragma: no cover
        raise CheckpointError(f"{not_local} it cannot be fetched: huggingface_hub is not installed",
                              where=where) from None
    # 1. the local hub cache (no network)
    try:
        return Path(snapshot_download(repo_id=text, revision=revision, allow_patterns=patterns,
                                      ignore_patterns=_HUB_IGNORE, local_files_only=True))
    except IncompleteSnapshotError:
        cached = "its cached snapshot is incomplete"
    except Exception:  # not in the cache (LocalEntryNotFoundError and kin)
        cached = "it is not in the local hub cache"
    offline = _hub_offline()
    if offline or not allow_download:
        why = "HF_HUB_OFFLINE is set" if offline else "downloads are disabled"
        raise CheckpointError(f"{not_local} {cached} and {why}", where=where,
                              hint=_hub_hint(text, revision))
    # 2. the hub, asked once with a time limit, then the download
    problem = _hub_problem(text, revision, _hub_timeout_s())
    if problem:
        raise CheckpointError(f"{not_local} {cached}, and {problem}", where=where,
                              hint=_hub_hint(text, revision))
    try:
        local = snapshot_download(repo_id=text, revision=revision, allow_patterns=patterns,
                                  ignore_patterns=_HUB_IGNORE)
    except Exception as exc:  # the hub client raises many types
        raise CheckpointError(f"downloading from the hub failed ({type(exc).__name__}: {exc})",
                              where=where, hint=_hub_hint(text, revision)) from None
    return Path(local)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

class SourceKind(str, Enum):
    """Where a tensor's values come from."""

    SAFETENSORS = "safetensors"  # bytes at ``TensorInfo.begin`` of a safetensors shard
    PICKLE = "pickle"  # an entry of a torch.load-ed state dict
    MXFP4 = "mxfp4"  # GPT-OSS's ``X_blocks`` + ``X_scales``, dequantized on read
    FP8_BLOCK = "fp8-block"  # ``X`` float8 + ``X_scale_inv`` per block, dequantized on read
    COMPRESSED = "compressed-tensors"  # llm-compressor's formats, dequantized on read


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the reader shows it: ``dtype`` and ``shape`` are what ``get_tensor`` returns.
    ``begin`` / ``nbytes``: its byte range in ``file`` (SAFETENSORS; for a dequantized tensor the
    bytes it has once dequantized). ``parts``: the stored tensors a dequantized one is read from;
    ``scheme``: how (harc_hpc.io.quantized.Scheme)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    nbytes: int
    kind: SourceKind = SourceKind.SAFETENSORS
    parts: tuple[str, ...] = ()
    scheme: Optional[Scheme] = None

    @property
    def dequantized(self) -> bool:
        return self.kind in (SourceKind.MXFP4, SourceKind.FP8_BLOCK, SourceKind.COMPRESSED)


def read_safetensors_header(path: Path, label: str = "") -> tuple[dict, int, dict]:
    """(header without ``__metadata__``, metadata) after checking that every tensor's bytes are
    inside the file: a truncated or corrupt shard is reported here, before any merging starts."""
    who = f"{label}: " if label else ""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{who}{path}: truncated safetensors file (no header)")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise CheckpointError(f"{who}{path}: truncated or corrupt safetensors file "
                                      f"(header of {n} bytes in a {size}-byte file)")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{who}{path}: weight file is missing") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{who}{path}: corrupt safetensors header ({exc})") from None
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    for key, entry in header.items():
        b, e = entry["data_offsets"]
        if e > data_len:
            raise CheckpointError(f"{who}{path}: truncated: tensor {key} needs bytes up to "
                                  f"{data_start + e} but the file has {size}")
    return header, data_start, meta


# E2M1 (MXFP4's 4-bit element): sign bit, then the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 (OCP MX spec)
_FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 blocks (E, rows, groups, 16) uint8 (two 4-bit elements a byte, the low nibble first) and
    scales (E, rows, groups) uint8 (an E8M0 exponent, bias 127) -> bfloat16 (E, groups * 32, rows):
    each group of 32 elements times 2^(scale - 127), then (rows, cols) transposed to (cols, rows).
    Computed where ``blocks`` are (a GPU: the uint8 blocks travel, a quarter of the bfloat16 bytes);
    every step is exact, so the bits are the same on any device."""
    lut = torch.tensor(_FP4_E2M1, dtype=torch.float32, device=blocks.device)
    e, rows, groups, nbytes = blocks.shape
    b = blocks.to(torch.int64)
    values = torch.stack([lut[b & 0x0F], lut[b >> 4]], dim=-1).reshape(e, rows, groups, nbytes * 2)
    values = torch.ldexp(values, (scales.to(device=blocks.device, dtype=torch.int32) - 127)[..., None].to(torch.float32))
    return values.reshape(e, rows, groups * nbytes * 2).to(torch.bfloat16).transpose(1, 2).contiguous()


class Checkpoint:
    """A model directory opened for tensor-by-tensor reading.

    ``name`` is only used in error messages (e.g. the source's name in the config). A quantized
    checkpoint (harc_hpc.io.quantized.SUPPORTED) shows each quantized weight as one tensor of the
    model's dtype, dequantized on read, rows at a time; ``stored_keys`` / ``read_stored`` give the
    tensors as stored.
    """

    def __init__(self, path: Union[str, Path], allow_pickle: bool = False, name: Optional[str] = None):
        self.path = Path(path)
        self.name = name or self.path.name
        if not self.path.is_dir():
            raise CheckpointError(f"{self.name}: {self.path}: model directory not found")
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{self.name}: {cfg_file}: config.json is missing")
        try:
            self.config: dict = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{self.name}: {cfg_file}: not valid JSON ({exc})") from None
        self.allow_pickle = allow_pickle
        self._infos: dict[str, TensorInfo] = {}
        self._stored: dict[str, TensorInfo] = {}  # stored tensors a dequantized one is read from
        self._dropped: list[str] = []  # activation scales of a quantized checkpoint (not weights)
        self._pickle_cache: tuple[Optional[Path], Optional[dict]] = (None, None)
        self._fds: dict[Path, int] = {}
        self.weight_files: list[Path] = []
        self.is_pickle = False
        self._discover()
        self._dequantized: tuple[Optional[tuple], Optional[torch.Tensor]] = (None, None)
        self._find_mxfp4()
        self._find_quantized()

    # -- quantized tensors ---------------------------------------------------------------------------
    def _find_mxfp4(self) -> None:
        """``X_blocks`` + ``X_scales`` pairs (MXFP4) are read as one bfloat16 tensor ``X``, dequantized
        on read, in the layout transformers gives the dequantized model: (E, in, out)."""
        found = []
        for key in list(self._infos):
            if not key.endswith("_blocks") or key[:-7] + "_scales" not in self._infos:
                continue
            base, scales = key[:-7], key[:-7] + "_scales"
            b, sc = self._infos[key], self._infos[scales]
            if b.dtype != torch.uint8 or len(b.shape) != 4 or tuple(b.shape[:-1]) != tuple(sc.shape):
                raise CheckpointError(f"{self.name}: {b.file}: tensors {key} {b.shape} and {scales} {sc.shape} "
                                      f"are not an MXFP4 pair (uint8 blocks (E, rows, groups, 16), scales "
                                      f"(E, rows, groups))")
            e, rows, groups, nbytes = b.shape
            self._stored[key], self._stored[scales] = self._infos.pop(key), self._infos.pop(scales)
            self._infos[base] = TensorInfo(b.file, torch.bfloat16, (e, groups * nbytes * 2, rows), 0,
                                           e * rows * groups * nbytes * 4, SourceKind.MXFP4, (key, scales))
            found.append(base)
        if found:
            log.warning("%s: %d MXFP4 tensors (e.g. %s) are dequantized to bfloat16 on read; what is "
                        "written from them is bfloat16", self.name, len(found), found[0])

    def _find_quantized(self) -> None:
        """Weights stored quantized (FP8 blocks, compressed-tensors) become one tensor each of the
        model's dtype; an unsupported method or format, or scales missing or of the wrong shape, is
        an error here, before anything is read or written."""
        stored = {k: (i.dtype, i.shape) for k, i in self._infos.items()}
        schemes, dropped = q.find_schemes(self.config, stored, self.name,
                                          read=lambda k: self._read(k, self._infos[k]))
        if not schemes:
            return
        dtype = q.model_dtype(self.config)
        kind = SourceKind.FP8_BLOCK if next(iter(schemes.values()))[0].method == "fp8-block" else SourceKind.COMPRESSED
        shown: dict[str, TensorInfo] = {}
        for key, (scheme, shape) in schemes.items():
            numel = 1
            for s in shape:
                numel *= s
            shown[key] = TensorInfo(self._infos[scheme.values].file, dtype, tuple(shape), 0,
                                    numel * dtype.itemsize, kind, scheme.parts, scheme)
            for part in scheme.parts:
                self._stored[part] = self._infos[part]
        for key in dropped:
            self._stored[key] = self._infos[key]
        infos: dict[str, TensorInfo] = {}  # in the stored order, each weight where its values were
        values_of = {sch.values: key for key, (sch, _) in schemes.items()}
        for key, info in self._infos.items():
            if key in values_of:
                infos[values_of[key]] = shown[values_of[key]]
            elif key not in self._stored:
                infos[key] = info
        self._infos = infos
        self._dropped = sorted(dropped)
        log.warning("%s: %d %s tensors (e.g. %s) are dequantized to %s on read", self.name, len(schemes),
                    kind.value, next(iter(schemes)), dtype)

    @property
    def dequantized(self) -> list[str]:
        """The tensors read from a quantized form (dequantized on read)."""
        return sorted(k for k, i in self._infos.items() if i.dequantized)

    def dequantized_by_kind(self) -> dict[str, list[str]]:
        """``{kind: keys}`` of the dequantized tensors (``mxfp4``, ``fp8-block``, ``compressed-tensors``)."""
        out: dict[str, list[str]] = {}
        for k, i in self._infos.items():
            if i.dequantized:
                out.setdefault(i.kind.value, []).append(k)
        return {k: sorted(v) for k, v in sorted(out.items())}

    @property
    def dropped(self) -> list[str]:
        """Stored activation scales of a quantized checkpoint, not shown as tensors."""
        return list(self._dropped)

    def fp8_blocks(self) -> dict[str, tuple[int, int]]:
        """``{key: block}`` of the tensors stored as FP8 blocks (what ``output.quantize: fp8-block``
        writes as FP8 again)."""
        return {k: i.scheme.block for k, i in self._infos.items() if i.kind is SourceKind.FP8_BLOCK}

    def is_dequantized(self, key: str) -> bool:
        """Whether ``key`` is read from a quantized form."""
        info = self._infos.get(key)
        return info is not None and info.dequantized

    # -- stored tensors (what is on disk, quantized or not) ---------------------------------------------
    def stored_keys(self) -> list[str]:
        """The tensors as stored: quantized weights' parts instead of the weights."""
        out = [k for k, i in self._infos.items() if not i.dequantized]
        out += list(self._stored)
        return out

    def stored_info(self, key: str) -> TensorInfo:
        info = self._stored.get(key) or self._infos.get(key)
        if info is None or info.dequantized:
            raise CheckpointError(f"{self.name}: {self.path}: no stored tensor {key}")
        return info

    def read_stored(self, key: str) -> torch.Tensor:
        """Stored tensor ``key`` as it is on disk."""
        return self._read(key, self.stored_info(key))

    def _dequantize(self, key: str, device: Optional[torch.device] = None) -> torch.Tensor:
        cached_key, cached = self._dequantized
        if cached_key == (key, device):
            return cached
        blocks_key, scales_key = self._infos[key].parts
        blocks, scales = (self._read(k, self._stored[k]) for k in (blocks_key, scales_key))
        if device is not None:
            blocks, scales = blocks.to(device), scales.to(device)
        out = dequantize_mxfp4(blocks, scales)
        self._dequantized = ((key, device), out)
        return out

    def _quantized_rows(self, info: TensorInfo, a: int, b: int,
                        device: Optional[torch.device] = None) -> torch.Tensor:
        """Rows ``[a, b)`` of a quantized tensor seen as (rows, cols) (leading dimensions folded
        into the rows), dequantized (on ``device`` when given: the stored bytes travel)."""
        sch = info.scheme
        rows, cols = info.shape[-2], info.shape[-1]
        br, bc = sch.block
        grid_rows, grid_cols = sch.grid
        vinfo = self._stored[sch.values]
        if sch.packed_bits:
            words = vinfo.shape[-1]
            values = self._read(sch.values, vinfo, a * words, (b - a) * words).view(b - a, words)
        else:
            values = self._read(sch.values, vinfo, a * cols, (b - a) * cols).view(b - a, cols)
        g = torch.arange(a, b)
        srow = (g // rows) * grid_rows + (g % rows) // br
        s0, s1 = int(srow[0]), int(srow[-1]) + 1
        scale = self._read(sch.scale, self._stored[sch.scale], s0 * grid_cols,
                           (s1 - s0) * grid_cols).view(s1 - s0, grid_cols)
        zero = None
        if sch.zero_point is not None:
            zero = self._read(sch.zero_point, self._stored[sch.zero_point], s0 * grid_cols,
                              (s1 - s0) * grid_cols).view(s1 - s0, grid_cols)
        if device is not None:
            values, scale, srow = values.to(device), scale.to(device), srow.to(device)
            zero = zero.to(device) if zero is not None else None
        if sch.packed_bits:
            values = q.unpack_int4(values, cols)
        return q.dequantize_rows(values, scale, zero, bc, s0, srow, sch.compute, info.dtype)

    def _read_quantized(self, info: TensorInfo, start: int, numel: int,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Elements ``[start, start + numel)`` of a quantized tensor, dequantized a few rows at a
        time into ``out`` (or a new 1-D tensor): the rows read are those the range touches."""
        cols = info.shape[-1]
        dest = out if out is not None else torch.empty(numel, dtype=info.dtype)
        first, last = start // cols, q.ceil_div(start + numel, cols)
        step = max(1, q.ROWS_NUMEL // cols)
        pos = 0
        for a in range(first, last, step):
            b = min(a + step, last)
            flat = self._quantized_rows(info, a, b).reshape(-1)
            lo, hi = max(start, a * cols) - a * cols, min(start + numel, b * cols) - a * cols
            dest[pos:pos + hi - lo] = flat[lo:hi]
            pos += hi - lo
        return dest

    # -- discovery -----------------------------------------------------------------------------
    def _discover(self) -> None:
        p = self.path
        index = p / SAFE_INDEX
        if index.is_file():
            files, index_map = self._files_from_index(index)
            self._read_safetensors(files, index_map=index_map)
            return
        if (p / SAFE_SINGLE).is_file():
            self._read_safetensors([p / SAFE_SINGLE])
            return
        shards = sorted(p.glob("*.safetensors"))
        if shards:
            self._read_safetensors(shards)
            return
        pickles = sorted(f for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES and f.is_file())
        if (p / PICKLE_INDEX).is_file() or pickles:
            if not self.allow_pickle:
                names = ", ".join(f.name for f in pickles) or PICKLE_INDEX
                raise CheckpointError(
                    f"{self.name}: {p}: only pickle weights found ({names}). Pickle files can run "
                    f"arbitrary code when loaded, so they are refused. Convert the model to "
                    f"safetensors, or set models.allow_pickle: true to read them with "
                    f"torch.load(weights_only=True).")
            self._read_pickles(p, pickles)
            return
        raise CheckpointError(f"{self.name}: {p}: no weights found (expected {SAFE_SINGLE} or "
                              f"{SAFE_INDEX} with its shards)")

    def _files_from_index(self, index: Path) -> tuple[list[Path], dict[str, Path]]:
        """The shards an index lists, and which one holds each tensor."""
        try:
            data = json.loads(index.read_text())
            wmap = data["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{self.name}: {index}: not a valid weight index ({exc})") from None
        index_map = {k: self.path / v for k, v in wmap.items()}
        files = sorted(set(index_map.values()))
        for f in files:
            if not f.is_file():
                users = sorted(k for k, v in index_map.items() if v == f)
                raise CheckpointError(f"{self.name}: {f}: shard listed in {index.name} is missing "
                                      f"(holds {len(users)} tensors, e.g. {users[0]})")
        return files, index_map

    def _read_safetensors(self, files: Sequence[Path], index_map: Optional[dict] = None) -> None:
        self.weight_files = list(files)
        for f in files:
            header, data_start, _ = read_safetensors_header(f, self.name)
            for key, entry in header.items():
                dtype = _DTYPES.get(entry["dtype"])
                if dtype is None:
                    raise CheckpointError(f"{self.name}: {f}: tensor {key} has unsupported dtype "
                                          f"{entry['dtype']}")
                if key in self._infos:
                    raise CheckpointError(f"{self.name}: {f}: tensor {key} also stored in "
                                          f"{self._infos[key].file}")
                b, e = entry["data_offsets"]
                self._infos[key] = TensorInfo(f, dtype, tuple(entry["shape"]), data_start + b, e - b)
        if index_map is not None:
            for key, f in index_map.items():
                info = self._infos.get(key)
                if info is None:
                    raise CheckpointError(f"{self.name}: {f}: tensor {key} is listed in the index "
                                          f"but not stored in the shard")
                if info.file != f:
                    raise CheckpointError(f"{self.name}: tensor {key}: index says {f.name}, "
                                          f"found in {info.file.name}")

    def _read_pickles(self, p: Path, pickles: list[Path]) -> None:
        self.is_pickle = True
        idx = p / PICKLE_INDEX
        if idx.is_file():
            wmap = json.loads(idx.read_text())["weight_map"]
            files = sorted({p / v for v in wmap.values()})
        else:
            files = pickles
        self.weight_files = files
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{self.name}: {f}: shard listed in {PICKLE_INDEX} is missing")
            sd = self._load_pickle(f)
            for key, t in sd.items():
                self._infos[key] = TensorInfo(f, t.dtype, tuple(t.shape), 0,
                                              t.numel() * t.element_size(), SourceKind.PICKLE)

    def _load_pickle(self, f: Path) -> dict:
        cached_file, cached = self._pickle_cache
        if cached_file == f:
            return cached
        try:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{self.name}: {f}: cannot be read with torch.load("
                                  f"weights_only=True): {exc}") from None
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"{self.name}: {f}: does not hold a state dict")
        self._pickle_cache = (f, sd)
        return sd

    # -- queries ----------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, key: str) -> bool:
        return key in self._infos

    def info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise CheckpointError(f"{self.name}: {self.path}: tensor {key} not found") from None

    def tensor_shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def tensor_dtype(self, key: str) -> torch.dtype:
        return self.info(key).dtype

    def file_of(self, key: str) -> Path:
        return self.info(key).file

    def get_tensor(self, key: str, device: Optional[torch.device] = None) -> torch.Tensor:
        """Tensor ``key``; ``device`` (for a quantized tensor): dequantize it there."""
        info = self.info(key)
        if info.kind is SourceKind.MXFP4:
            return self._dequantize(key, device).clone()
        numel = 1
        for s in info.shape:
            numel *= s
        if info.dequantized and device is not None and device.type != "cpu":
            return self._quantized_rows(info, 0, numel // info.shape[-1], device).reshape(info.shape)
        return self.read_part(key, 0, numel).reshape(info.shape)

    def read_part(self, key: str, start: int, numel: int,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Elements ``[start, start + numel)`` of the flattened tensor (row-major), as a 1-D tensor.

        Used to read one expert out of a fused (E, ...) tensor without reading the others. ``out``
        (contiguous, 1-D, ``numel`` elements of the tensor's dtype) receives the data in place.
        """
        info = self.info(key)
        if out is not None and (out.dtype != info.dtype or out.numel() != numel
                                or not out.is_contiguous()):
            raise ValueError(f"{key}: out must be a contiguous {info.dtype} tensor of {numel} elements")
        if info.kind is SourceKind.MXFP4:
            part = self._dequantize(key).reshape(-1)[start:start + numel]
            return out.copy_(part) if out is not None else part.clone()
        if info.dequantized:
            return self._read_quantized(info, start, numel, out)
        return self._read(key, info, start, numel, out)

    def _read(self, key: str, info: TensorInfo, start: int = 0, numel: Optional[int] = None,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Elements ``[start, start + numel)`` (default: all) of the tensor stored as ``info``, 1-D
        except for a whole tensor, which keeps its shape."""
        whole = numel is None
        if whole:
            numel = 1
            for s in info.shape:
                numel *= s
        if info.kind is SourceKind.PICKLE:
            t = self._load_pickle(info.file)[key].reshape(-1)[start:start + numel]
            t = out.copy_(t) if out is not None else t.clone()
            return t.reshape(info.shape) if whole else t
        itemsize = info.dtype.itemsize
        nbytes = numel * itemsize
        if (start + numel) * itemsize > info.nbytes:
            raise CheckpointError(f"{self.name}: {info.file}: tensor {key}: read past its end")
        buf = (out.view(-1).view(torch.uint8) if out is not None
               else torch.empty(nbytes, dtype=torch.uint8))
        fd = self._fd(info.file)
        view = memoryview(buf.numpy())
        offset = info.begin + start * itemsize
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{self.name}: {info.file}: tensor {key}: file ended early "
                                      f"(truncated while reading?)")
            done += n
        t = out if out is not None else buf.view(info.dtype)
        return t.reshape(info.shape) if whole else t

    def _fd(self, f: Path) -> int:
        fd = self._fds.get(f)
        if fd is None:
            fd = os.open(f, os.O_RDONLY)
            self._fds[f] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._pickle_cache = (None, None)

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def digest(self) -> str:
        """sha256 over config.json and every weight file's bytes (streamed), in file-name order.

        Stable across machines and copies: it depends on content and file names only.
        """
        h = hashlib.sha256()
        h.update(b"config.json\0")
        h.update((self.path / "config.json").read_bytes())
        for f in sorted(self.weight_files, key=lambda x: x.name):
            fh = hashlib.sha256()
            with open(f, "rb") as fp:
                while True:
                    chunk = fp.read(16 << 20)
                    if not chunk:
                        break
                    fh.update(chunk)
            h.update(f"{f.name}\0{f.stat().st_size}\0{fh.hexdigest()}\0".encode())
        return "sha256:" + h.hexdigest()
