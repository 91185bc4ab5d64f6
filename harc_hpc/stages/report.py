"""report: the stage that measures a finished run and writes ``report/`` (metrics.json, report.md,
plots). What it measures is in harc_hpc.report (metrics, provenance, lm-eval, rendering)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from harc_hpc.config import PipelineConfig
from harc_hpc.report.lm_eval import check_lm_eval, run_lm_eval
from harc_hpc.report.metrics import METRICS_VERSION, model_metrics, solve_statistics, stage_statistics
from harc_hpc.report.provenance import manifest


# -- the stage --------------------------------------------------------------------------------------

def run(cfg: PipelineConfig, run_dir: Path) -> dict:
    from harc_hpc.io.atomic import atomic_dir, finite_json
    from harc_hpc.demo.placeholders import has_placeholders, prepare_config
    from harc_hpc.stages import layout
    from harc_hpc.report.render import write_plots, write_markdown

    run_dir = Path(run_dir)
    check_lm_eval(cfg)
    if has_placeholders(cfg):
        cfg = prepare_config(cfg)
    t0 = time.perf_counter()
    if cfg.mergeme is not None:  # an MoE built from dense experts: router options per domain
        from harc_hpc.report.mergeme import mergeme_metrics, write_report

        metrics = mergeme_metrics(cfg, run_dir)
        metrics["report_seconds"] = round(time.perf_counter() - t0, 2)
        with atomic_dir(run_dir / "report") as tmp:
            write_report(metrics, tmp)
        return {"tasks": metrics["tasks"], "seconds": metrics["report_seconds"],
                "loss_fitted": {t: v["loss"] for t, v in metrics["options"]["fitted"].items()}}
    metrics = {"version": METRICS_VERSION, "run": cfg.run.name}
    metrics.update(model_metrics(cfg, run_dir))
    metrics["solve"] = solve_statistics(run_dir)
    metrics["stages"] = stage_statistics(run_dir)
    from harc_hpc.report.training import training_summary

    training = training_summary(cfg, run_dir, metrics["stages"])
    if training is not None:  # closed form vs gradient steps (docs/training.md)
        metrics["training"] = training
    if cfg.report.lm_eval_tasks:
        metrics["lm_eval"] = run_lm_eval(cfg, run_dir)
    metrics["manifest"] = manifest(cfg, run_dir)
    metrics["report_seconds"] = round(time.perf_counter() - t0, 2)
    with atomic_dir(run_dir / "report") as tmp:
        (tmp / "metrics.json").write_text(json.dumps(finite_json(metrics), indent=2, sort_keys=True, default=_json_default,
                                                      allow_nan=False) + "\n")
        plots = write_plots(metrics, tmp)
        write_markdown(metrics, tmp / "report.md", plots)
    s = metrics.get("summary", {})
    rl = s.get("router_level", {})
    return {
        "tasks": metrics.get("tasks", []),
        "kl_merged": rl.get("merged", {}).get("kl_mean"),
        "kl_calibrated": rl.get("calibrated", {}).get("kl_mean"),
        "kl_reduction": rl.get("kl_reduction"),
        "loss_mean": s.get("loss_mean", {}),
        "seconds": metrics["report_seconds"],
    }


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def headline(run_dir: Path) -> list[str]:
    """A few lines for the terminal: where the report is and what it found (empty if no report)."""
    path = Path(run_dir) / "report" / "metrics.json"
    if not path.is_file():
        return []
    m = json.loads(path.read_text())
    s = m.get("summary", {})
    lines = [f"report: {path.parent / 'report.md'}"]
    if m.get("kind") == "mergeme":  # router options of an MoE built from dense experts
        for task, v in m.get("options", {}).get("fitted", {}).items():
            lines.append(f"fitted router [{task}]: held-out loss {v['loss']:.4f}, "
                         f"{100 * v['expert_share_top1']:.1f}% of tokens to its expert (top-1)")
        seq = m.get("sequence_routing") or {}
        for task, v in seq.get("routers", {}).get("ppl", {}).items():
            lines.append(f"PPL routing [{task}]: {100 * v['share_top1']:.1f}% of sequences to its expert "
                         f"(routed on the first {seq['prefix_tokens']} tokens)")
        return lines
    rl = s.get("router_level", {})
    if rl.get("merged") and rl.get("calibrated"):
        lines.append(
            f"router-level KL(source || model), mean over layers: merged {rl['merged']['kl_mean']:.4f} -> "
            f"calibrated {rl['calibrated']['kl_mean']:.4f} ({-100 * rl.get('kl_reduction', 0):+.1f}%)")
        lines.append(
            f"router-level top-k mismatch, worst layer: merged {100 * rl['merged']['topk_mismatch_worst_layer']:.1f}% -> "
            f"calibrated {100 * rl['calibrated']['topk_mismatch_worst_layer']:.1f}%")
    for task, losses in sorted(m.get("loss", {}).items()):
        if "merged" in losses and "calibrated" in losses:
            lines.append(f"held-out loss [{task}]: merged {losses['merged']:.4f} -> calibrated "
                         f"{losses['calibrated']:.4f}" + (f" (oracle {losses['oracle']:.4f})" if "oracle" in losses else ""))
    return lines
