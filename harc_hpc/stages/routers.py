"""Reading and writing router tensors: source routers, merged routers, calibrated solutions."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from harc_hpc.io.atomic import atomic_path, json_text
from harc_hpc.config import PipelineConfig
from harc_hpc.stages import layout


def _checkpoint(path, allow_pickle: bool = False):
    from harc_hpc.io.checkpoint import Checkpoint

    return Checkpoint(path, allow_pickle=allow_pickle)


def _source_checkpoint(cfg: PipelineConfig, task: str):
    from harc_hpc.io.checkpoint import resolve_model_path

    path = resolve_model_path(layout.source_path(cfg, task), revision=cfg.models.revision)
    return _checkpoint(path, cfg.models.allow_pickle)


def source_router(cfg: PipelineConfig, task: str, layer: int) -> torch.Tensor:
    """A source's router of ``layer``: (K, d), or (K, d + 1) = [W | b] for a router with a bias."""
    return router_of(_source_checkpoint(cfg, task), layout.family(cfg), layer)


def merged_router(cfg: PipelineConfig, run_dir: Path, layer: int) -> torch.Tensor:
    """The merged router of ``layer``: (K, d), or (K, d + 1) = [W | b] for a router with a bias."""
    fam = layout.family(cfg)
    return router_of(_checkpoint(layout.merged_dir(run_dir)), fam, layer)


def source_router_bias(cfg: PipelineConfig, task: str, layer: int) -> Optional[torch.Tensor]:
    """The selection-only router bias of a source (DeepSeek-V3's e_score_correction_bias), or None."""
    key = layout.family(cfg).router_bias_key(layer)
    return None if key is None else _source_checkpoint(cfg, task).get_tensor(key)


def merged_router_bias(cfg: PipelineConfig, run_dir: Path, layer: int) -> Optional[torch.Tensor]:
    key = layout.family(cfg).router_bias_key(layer)
    return None if key is None else _checkpoint(layout.merged_dir(run_dir)).get_tensor(key)


def router_of(ckpt, fam, layer: int) -> torch.Tensor:
    """The router of ``layer`` whatever the checkpoint's on-disk layout: its weight (K, d), or for a
    router with a bias (GPT-OSS) [W | b] (K, d + 1), the bias fitted as one more input column."""
    w = ckpt.get_tensor(fam.find_router_disk_key(layer, ckpt.keys()))
    key = fam.router_intercept_key(layer)
    if key is None:
        return w
    return torch.cat([w, ckpt.get_tensor(key).to(w.dtype)[:, None]], dim=1)


SHARED_EXPERT_GATE = "shared_expert_gate"


def save_router(run_dir: Path, layer: int, weight: torch.Tensor, report: dict,
                shared_expert_gate: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> None:
    """The calibrated router of ``layer``: its weight, its bias when it has one (GPT-OSS) and, when
    calibrated too, its sigmoid shared-expert gate."""
    tensors = {"weight": weight}
    if bias is not None:
        tensors["bias"] = bias
    if shared_expert_gate is not None:
        tensors[SHARED_EXPERT_GATE] = shared_expert_gate
    with atomic_path(layout.router_file(run_dir, layer)) as tmp:
        save_file({k: v.detach().to(torch.float32).contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    with atomic_path(layout.router_report(run_dir, layer)) as tmp:
        tmp.write_text(json_text(report))


def _router_file(run_dir: Path, layer: int) -> dict:
    path = layout.router_file(run_dir, layer)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: calibrated router of layer {layer} is missing (run solve-router first)")
    return load_file(str(path))


def load_router(run_dir: Path, layer: int) -> torch.Tensor:
    return _router_file(run_dir, layer)["weight"]


def load_router_bias(run_dir: Path, layer: int) -> Optional[torch.Tensor]:
    """The calibrated bias of ``layer``'s router, or None for routers without one."""
    return _router_file(run_dir, layer).get("bias")


def load_shared_expert_gate(run_dir: Path, layer: int) -> Optional[torch.Tensor]:
    """The calibrated shared-expert gate of ``layer``, or None when only the router was calibrated."""
    return _router_file(run_dir, layer).get(SHARED_EXPERT_GATE)


def source_shared_expert_gate(cfg: PipelineConfig, task: str, layer: int) -> torch.Tensor:
    return _source_checkpoint(cfg, task).get_tensor(layout.family(cfg).shared_expert_gate_key(layer))


def merged_shared_expert_gate(cfg: PipelineConfig, run_dir: Path, layer: int) -> torch.Tensor:
    return _checkpoint(layout.merged_dir(run_dir)).get_tensor(layout.family(cfg).shared_expert_gate_key(layer))


def set_router_weights(model, fam, weights: dict[int, torch.Tensor]) -> None:
    for layer, w in weights.items():
        module = fam.router_module(model, layer)
        if tuple(module.weight.shape) != tuple(w.shape):
            raise ValueError(f"layer {layer}: router shape {tuple(w.shape)} != model's {tuple(module.weight.shape)}")
        with torch.no_grad():
            module.weight.copy_(w.to(module.weight.dtype))
