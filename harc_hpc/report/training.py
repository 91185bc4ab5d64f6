"""The training baselines in the report (docs/training.md): which of their models it evaluates beside
the merged and the calibrated one, and the closed form against gradient steps: per layer the router-
level KL on held-out calibration sequences of the merged router, HARC's and the trained ones, the
steps training took and needed to match HARC, and the wall time of each repair."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from harc_hpc.config import PipelineConfig


def training_models(cfg: PipelineConfig, run_dir: Path) -> list[tuple[str, Path]]:
    """(report name, model directory) of every training baseline the config enables; a missing
    directory is a RunStateError naming the stage that writes it."""
    from harc_hpc.errors import RunStateError
    from harc_hpc.stages import finetune, router_distill

    out = []
    for on, stage, module, starts in ((cfg.router_distill.enabled, "router-distill-model", router_distill,
                                       cfg.router_distill.starts),
                                      (cfg.finetune.enabled, "finetune", finetune, cfg.finetune.starts)):
        for start in (starts if on else []):
            path = module.models_dir(run_dir) / start
            if not (path / "config.json").is_file():
                raise RunStateError(f"{path}: no checkpoint here (run {stage} first)")
            out.append((module.model_name(start, cfg.finetune.objective) if module is finetune
                        else module.MODEL_NAMES[start], path))
    return out


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def training_summary(cfg: PipelineConfig, run_dir: Path, stages: dict) -> Optional[dict]:
    """Closed form vs gradient steps, from router-distill's layer reports, finetune's summary and the
    stage records (``stages``: ``stage_statistics``); None when neither is enabled."""
    if not cfg.router_distill.enabled and not cfg.finetune.enabled:
        return None
    from harc_hpc.stages import layout
    from harc_hpc.stages.router_distill import MODEL_NAMES, distilled_report

    layers = layout.moe_layers(cfg)
    reports = [r for r in (_read(distilled_report(run_dir, l)) for l in layers) if r]
    wall = {name: (stages.get(name) or {}).get("wall_s_total") for name in
            ("compute-statistics", "solve-router", "router-distill", "router-distill-model", "finetune")}
    harc_solve = sum(r.get("harc_solve_seconds") or 0.0 for r in reports)
    out: dict = {
        "settings": cfg.router_distill.model_dump(mode="json", exclude={"enabled"}) if cfg.router_distill.enabled else {},
        "stage_wall_s": wall,
        # HARC's repair: its statistics and solves (the capture both share is left out of both)
        "harc": {"solve_seconds": round(harc_solve, 3),
                 "seconds": round(harc_solve + (wall["compute-statistics"] or 0.0), 3)},
        "router_distill": {},
        "layers": [],
    }
    for start in (cfg.router_distill.starts if cfg.router_distill.enabled else []):
        done = [r["trained"][start] for r in reports if start in r.get("trained", {})]
        seconds = sum(t["seconds"] for t in done)
        reached = [t.get("steps_to_harc_heldout_kl") for t in done]
        out["router_distill"][start] = {
            "model": MODEL_NAMES[start],
            "steps": sum(t["steps"] for t in done),
            "train_seconds": round(seconds, 3),
            # from HARC's router, HARC's cost comes first
            "seconds": round(seconds + (out["harc"]["seconds"] if start == "harc" else 0.0), 3),
            "layers_reaching_harc": sum(s is not None for s in reached),
            "steps_to_harc_heldout_kl": reached,
        }
    for r in reports:
        closed = r.get("closed_form", {})
        row = {"layer": r["layer"], "merged_kl": closed.get("merged", {}).get("heldout_kl"),
               "harc_kl": closed.get("harc", {}).get("heldout_kl"), "harc_seconds": r.get("harc_solve_seconds")}
        for start, t in r.get("trained", {}).items():
            row[start] = {k: t.get(k) for k in ("heldout_kl", "steps", "best_step", "stopped", "seconds",
                                                "steps_to_harc_heldout_kl")}
        out["layers"].append(row)
    if cfg.finetune.enabled:
        from harc_hpc.stages.finetune import models_dir

        ft = _read(models_dir(run_dir) / "summary.json") or {}
        out["finetune"] = {"settings": ft.get("settings"), "device": ft.get("device"), "ranks": ft.get("ranks"),
                           "starts": {}}
        for start, v in (ft.get("starts") or {}).items():
            losses = v.get("losses") or []
            out["finetune"]["starts"][start] = {
                "model": v.get("model"), "steps": len(losses), "train_seconds": v.get("seconds"),
                "seconds": round((v.get("seconds") or 0.0) + (out["harc"]["seconds"] if start == "harc" else 0.0), 3),
                "trainable_parameters": v.get("trainable_parameters"),
                "first_loss": losses[0][1] if losses else None, "last_loss": losses[-1][1] if losses else None}
        curves = {s: [v for _, v in (x.get("losses") or [])] for s, x in (ft.get("starts") or {}).items()}
        if set(curves) == {"merged", "harc"}:  # HARC as a starting point: steps to the other start's end
            for start, other in (("merged", "harc"), ("harc", "merged")):
                out["finetune"]["starts"][start]["steps_to_other_final_loss"] = steps_to_loss(
                    curves[start], curves[other])
    return out


def _window(n: int) -> int:
    return max(1, min(10, n // 5))


def steps_to_loss(curve: list[float], other: list[float]) -> Optional[int]:
    """The first step at which ``curve``'s training loss, averaged over a trailing window (a fifth
    of the run, at most 10 steps), is at or below ``other``'s over its last window; None if never.
    Both starts of a finetune task see the same batches step by step, so the comparison is on
    equal data (training batches, not held-out text)."""
    if not curve or not other:
        return None
    w = _window(min(len(curve), len(other)))
    target = sum(other[-w:]) / w
    for i in range(w - 1, len(curve)):
        if sum(curve[i - w + 1: i + 1]) / w <= target:
            return i + 1
    return None


# -- a sweep's table: a row per repair (harc_hpc.report.sweep_table) ----------------------------------

def repair_models(m: dict) -> list[str]:
    """The training baselines' models a cell's report measured (its ``metrics.json``), in the story's
    order: router-distill from the merged and HARC's routers, then finetune's (SFT or output-KL)."""
    from harc_hpc.stages import finetune, router_distill

    names = [router_distill.MODEL_NAMES[s] for s in ("merged", "harc")]
    names += [finetune.model_name(s, o) for o in ("sft", "output_kl") for s in ("merged", "harc")]
    measured = ((m.get("summary") or {}).get("router_level") or {})
    return [n for n in names if n in measured]


def repair_seconds(m: dict, model: str) -> Optional[float]:
    """Wall time of a repair as the report's "Closed form vs training" counts it (``training`` in
    ``metrics.json``): HARC's statistics and solves (``calibrated``), a training's own steps, HARC's
    first for a start from HARC; None when the report has no training section."""
    t = m.get("training")
    if not t:
        return None
    if model == "calibrated":
        return (t.get("harc") or {}).get("seconds")
    for v in list((t.get("router_distill") or {}).values()) + list(((t.get("finetune") or {}).get("starts") or {}).values()):
        if v.get("model") == model:
            return v.get("seconds")
    return None
