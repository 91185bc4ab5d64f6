"""HDF5 files of per-task HARC statistics (``statistics/layer-<l>/<task>.h5``).

Datasets are float64 with fletcher32 checksums (HDF5 verifies each chunk on read); a file that
cannot be read, or fails a checksum, raises ``CorruptArtifactError`` naming it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from harc_hpc.errors import CorruptArtifactError, InputDataError
from harc_hpc.math.statistics import TaskStatistics

FORMAT = "harc-task-statistics/1"
_TENSORS = ("sigma_diag", "sigma_w", "hessian_mean", "input_gram", "expert_tokens")


def save_statistics(stats: TaskStatistics, path) -> None:
    import h5py

    with h5py.File(str(path), "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["num_tokens"] = int(stats.num_tokens)
        f.attrs["hessian"] = stats.hessian
        f.attrs["kl"] = float(stats.kl)
        f.attrs["source_digest"] = stats.source_digest
        if stats.topk_mismatch is not None:
            f.attrs["topk_mismatch"] = float(stats.topk_mismatch)
            f.attrs["top_k"] = int(stats.top_k)
        for name in _TENSORS:
            value = getattr(stats, name)
            if value is not None:
                dtype = torch.int64 if name == "expert_tokens" else torch.float64
                f.create_dataset(name, data=value.detach().cpu().to(dtype).numpy(), chunks=True, fletcher32=True)


def load_statistics(path) -> TaskStatistics:
    import h5py

    path = Path(path)
    try:
        with h5py.File(str(path), "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise InputDataError(f"not a {FORMAT} file (format={f.attrs.get('format')!r})", where=str(path))
            get = lambda n: torch.from_numpy(f[n][()]) if n in f else None  # noqa: E731
            return TaskStatistics(
                num_tokens=int(f.attrs["num_tokens"]),
                hessian=str(f.attrs["hessian"]),
                sigma_diag=get("sigma_diag"),
                sigma_w=get("sigma_w"),
                hessian_mean=get("hessian_mean"),
                kl=float(f.attrs["kl"]),
                topk_mismatch=float(f.attrs["topk_mismatch"]) if "topk_mismatch" in f.attrs else None,
                top_k=int(f.attrs["top_k"]) if "top_k" in f.attrs else None,
                input_gram=get("input_gram"),
                source_digest=str(f.attrs.get("source_digest", "")),
                expert_tokens=get("expert_tokens"),
            )
    except OSError as exc:  # h5py: unreadable file, or a dataset failing its fletcher32 checksum
        raise CorruptArtifactError(path, f"statistics file cannot be read ({exc})") from None
