"""Provenance of a report: versions, git revision, thread counts, digests of the run's artifacts."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

from harc_hpc.config import PipelineConfig

log = logging.getLogger(__name__)

_PACKAGES = ("harc-hpc", "torch", "transformers", "tokenizers", "safetensors", "numpy", "zarr", "h5py",
             "pydantic", "submitit", "click", "matplotlib", "lm_eval")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def artifact_digests(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    out = {}
    for pattern in ("routers/*.safetensors", "model/*.safetensors", "merged/*.safetensors"):
        for path in sorted(run_dir.glob(pattern)):
            out[path.relative_to(run_dir).as_posix()] = sha256_file(path)
    return out


def _git_revision() -> Optional[str]:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _stage_threads(run_dir: Path):
    """The torch thread count the stages ran with, when the launcher recorded it (``job.torch_threads``
    in completion records); else this process's, which shares the environment (OMP_NUM_THREADS) of a
    run reported where it ran."""
    seen = set()
    for path in (Path(run_dir) / "completions").glob("**/*.json"):
        try:
            job = json.loads(path.read_text()).get("job") or {}
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if isinstance(job, dict) and isinstance(job.get("torch_threads"), int):
            seen.add(job["torch_threads"])
    if not seen:
        return torch.get_num_threads()
    return seen.pop() if len(seen) == 1 else sorted(seen)


def _device_name(cfg: PipelineConfig) -> str:
    from harc_hpc.models.modeling import pick_device

    device = pick_device(cfg.harc.device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.machine()}"


def results_config_digest(cfg: PipelineConfig) -> str:
    """Digest of what decides the numbers: not the run's name, place, executor or report options."""
    dump = cfg.model_dump(mode="json")
    dump["run"] = {"seed": dump["run"]["seed"]}
    for section in ("executor", "report"):
        dump.pop(section, None)
    dump.get("demo", {}).pop("cache_dir", None)
    dump.get("harc", {}).pop("device", None)
    blob = json.dumps(dump, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def manifest(cfg: PipelineConfig, run_dir: Path) -> dict:
    from harc_hpc import package_versions

    versions = {k: v for k, v in package_versions(_PACKAGES).items() if v is not None}
    full = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), default=str)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        # CPU reductions are bitwise reproducible for a fixed thread count only.
        "torch_threads": _stage_threads(run_dir),
        "device": _device_name(cfg),
        "git_revision": _git_revision(),
        "config_digest": hashlib.sha256(full.encode()).hexdigest(),
        "results_config_digest": results_config_digest(cfg),
        "artifacts": artifact_digests(run_dir),
    }
