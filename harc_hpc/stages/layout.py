"""Where artifacts live in a run directory, and how the calibrated layers split into blocks.

Both the planner (which builds the DAG) and the stage bodies (which read and write the artifacts)
use these functions, so the two can never disagree about a path or a block boundary.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from harc_hpc.config import PipelineConfig


# -- paths -----------------------------------------------------------------

def merged_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "merged"


def model_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "model"


def token_store(run_dir: Path, task: str) -> Path:
    return Path(run_dir) / "tokens" / f"{task}.zarr"


def hidden_store(run_dir: Path, block: int) -> Path:
    return Path(run_dir) / "hidden" / f"block-{block:03d}.zarr"


def capture_partial(run_dir: Path, block: int) -> Path:
    """A capture task's work in progress: the stores being filled, the in-flight hidden states after
    the last finished decoder layer and a manifest, so a task killed at its time limit resumes there."""
    return Path(run_dir) / "partial" / f"capture-block-{block:03d}"


def activation_store(run_dir: Path, block: int) -> Path:
    return Path(run_dir) / "activations" / f"block-{block:03d}.zarr"


def statistics_file(run_dir: Path, layer: int, task: str) -> Path:
    return Path(run_dir) / "statistics" / f"layer-{layer:03d}" / f"{task}.h5"


def router_file(run_dir: Path, layer: int) -> Path:
    return Path(run_dir) / "routers" / f"layer-{layer:03d}.safetensors"


def router_report(run_dir: Path, layer: int) -> Path:
    return Path(run_dir) / "routers" / f"layer-{layer:03d}.json"


# -- model structure -------------------------------------------------------

@lru_cache(maxsize=16)
def _read_config(path: str) -> dict:
    return json.loads(Path(path).read_text())


def model_config(path_or_id: str, revision=None) -> dict:
    """config.json of a local directory or hub id (only config.json is fetched for a hub id)."""
    p = Path(path_or_id)
    if p.is_dir():
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{p}: no config.json in model directory")
        return _read_config(str(cfg_file))
    from harc_hpc.io.checkpoint import resolve_model_path

    snapshot = resolve_model_path(path_or_id, revision=revision, files=["config.json"])
    return _read_config(str(snapshot / "config.json"))


def reference_config(cfg: PipelineConfig) -> dict:
    """The architecture every source shares (merge-experts checks that they do); for a ``mergeme``
    config (dense sources), the MoE that merge-experts builds from them."""
    if cfg.mergeme is not None:
        from harc_hpc.mergeme.pipeline import moe_config

        return moe_config(cfg)
    from harc_hpc.models.modeling import check_remote_code

    src = cfg.models.sources[0]
    conf = model_config(src.path, cfg.models.revision)
    check_remote_code(conf, cfg.models.trust_remote_code, where=f"models.sources[{src.name}].path {src.path}")
    return conf


def planning_config(cfg: PipelineConfig, shape_dirs=()) -> tuple[dict | None, str | None]:
    """A config.json to plan from before the sources' weights exist (the shipped configs name
    placeholder source paths), and a line saying which one and why: the base's config.json, else a
    shape in ``shape_dirs`` whose file name begins the base's repository name
    (``model-shapes/olmoe-1b-7b.json`` for ``allenai/OLMoE-1B-7B-0125``). (None, None) when the first
    source's config.json is readable, or for a MergeME build (its MoE comes from the dense sources)."""
    if cfg.mergeme is not None:
        return None, None
    src = cfg.models.sources[0]
    try:
        model_config(src.path, cfg.models.revision)
        return None, None
    except Exception as exc:  # a placeholder path, weights not downloaded yet, no hub: say which
        why = f"models.sources[{src.name}].path is not readable yet: {getattr(exc, 'what', None) or exc}"
    base = cfg.models.base
    if base is None or base.startswith("demo:"):
        return None, None
    try:
        return model_config(base, cfg.models.revision), f"planned from the config.json of models.base {base}; {why}"
    except Exception as exc:
        base_why = getattr(exc, "what", None) or f"{type(exc).__name__}: {exc}"
    from harc_hpc.io.sources import split_revision

    name = split_revision(base)[0].rstrip("/").rsplit("/", 1)[-1].lower()
    shapes = [p for d in shape_dirs for p in sorted(Path(d).glob("*.json")) if name.startswith(p.stem.lower())]
    if not shapes:
        return None, None
    shape = max(shapes, key=lambda p: len(p.stem))
    shown = os.path.relpath(shape) if not os.path.relpath(shape).startswith("..") else str(shape)
    return (json.loads(shape.read_text()),
            f"planned from the shape {shown}, which matches models.base {base} (its config.json is not readable "
            f"here either: {base_why});\n{why}")


def family(cfg: PipelineConfig):
    from harc_hpc.models.families import family_for_config

    return family_for_config(reference_config(cfg))


def moe_layers(cfg: PipelineConfig, conf: dict | None = None) -> list[int]:
    """The router layers HARC calibrates: the model's MoE layers filtered by ``harc.layers``
    (``conf``: a config.json standing in for the sources', for planning)."""
    from harc_hpc.models.families import family_for_config

    conf = reference_config(cfg) if conf is None else conf
    all_layers = list(family_for_config(conf).moe_layers(conf))
    sel = cfg.harc.layers
    if sel == "all":
        return all_layers
    if isinstance(sel, dict):
        return all_layers[-sel["last"]:]
    missing = sorted(set(sel) - set(all_layers))
    if missing:
        raise ValueError(f"harc.layers: {missing} are not MoE layers of this model (MoE layers: {all_layers})")
    return sorted(set(sel))


def blocks(cfg: PipelineConfig, layers: list[int] | None = None) -> list[list[int]]:
    layers = moe_layers(cfg) if layers is None else layers
    B = cfg.harc.block_size
    return [layers[i : i + B] for i in range(0, len(layers), B)]


def block_decoder_span(block_list: list[list[int]], b: int) -> tuple[int, int]:
    """Decoder layers [start, stop) that block b owns: hidden states entering ``start`` are cached
    for the block, and the forward runs up to the block's last calibrated layer."""
    start = 0 if b == 0 else block_list[b - 1][-1] + 1
    return start, block_list[b][-1] + 1


def source_path(cfg: PipelineConfig, task: str) -> str:
    return next(s.path for s in cfg.models.sources if s.name == task)
