"""A sweep's results as one table: ``table.md``, ``table.csv`` and ``plot.png`` in the sweep directory.

Every figure is read from a cell's ``report/metrics.json`` (the report stage's keys; nothing is
recomputed here): held-out loss per task (``loss.<task>.<model>``), their mean
(``summary.loss_mean.<model>``), router-level KL and top-k mismatch, mean over layers and tasks
(``summary.router_level.<model>.{kl_mean, topk_mismatch_mean}``) and, when the cell ran lm-eval,
its task scores (``lm_eval.<task>.<metric>``, for the assembled model).

Rows: one per cell with the repaired (``calibrated``) model, repair ``harc``; one per training
baseline a cell's report measured (repair ``sft``, ``harc+sft``, ``router-distill``, ...; docs/training.md),
with ``seconds`` (the repair's wall time as the report counts it); and one per distinct
merged model with repair ``none`` (the report measures the merged model beside the calibrated one,
so "without HARC" costs no run of its own): cells that share a merge and measure it alike give one
``none`` row, named after the first of them. A cell without a report (failed, not run yet) keeps
its row, with its state and no figures.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Optional

import yaml

from harc_hpc.io.atomic import atomic_path, write_text_atomic
from harc_hpc.pipeline import sweep as sweep_mod
from harc_hpc.report.render import lm_eval_scores
from harc_hpc.report.training import repair_models, repair_seconds

TABLE_MD, TABLE_CSV, PLOT = "table.md", "table.csv", "plot.png"


def _read(path: Path) -> Optional[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _merge_digest(run_dir: Path) -> Optional[str]:
    plan = _read(run_dir / "plan.json") or {}
    return next((t["digest"] for t in plan.get("tasks", []) if t.get("stage") == "merge-experts"), None)


def _method(run_dir: Path) -> str:
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ""
    merge = cfg.get("merge") or {}
    method = str(merge.get("method") or "linear")
    return f"{method} ({merge['preset']})" if merge.get("preset") else method


def _figures(m: dict, model: str, tasks: list[str]) -> dict[str, Any]:
    s = m.get("summary", {})
    rl = s.get("router_level", {}).get(model, {})
    out: dict[str, Any] = {f"loss:{t}": m.get("loss", {}).get(t, {}).get(model) for t in tasks}
    out["loss_mean"] = s.get("loss_mean", {}).get(model)
    out["router_kl"] = rl.get("kl_mean")
    out["topk_mismatch"] = rl.get("topk_mismatch_mean")
    return out


def _lm_eval(m: dict, model: str) -> dict[str, Any]:
    """lm-eval's scores of one model of the report (``lm_eval.models.<model>``)."""
    out = {}
    per_task = ((m.get("lm_eval") or {}).get("models") or {}).get(model) or {}
    for task, scores in sorted(per_task.items()):
        for metric, value in lm_eval_scores(scores).items():
            out[f"lm_eval:{task}:{metric}"] = value
    return out


def _oracle_shares(m: dict, tasks: list[str]) -> dict[str, Any]:
    """Per task, the share of the router-swap oracle's gain that the calibrated routers reach."""
    shares = m.get("summary", {}).get("gap_shares", {})
    return {f"harc_of_oracle:{t}": shares.get(t, {}).get("harc_recovers_of_oracle") for t in tasks}


def _settings(values: dict, merge_only: bool) -> str:
    shown = {k: v for k, v in values.items() if not (merge_only and k.split(".")[0] in ("harc", "calibration"))}
    return " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in shown.items())


def sweep_rows(sweep_dir: Path) -> tuple[list[str], list[dict]]:
    """(columns, rows) of a sweep's table."""
    sweep_dir = Path(sweep_dir)
    states = {c.name: c.state for c in sweep_mod.sweep_status(sweep_dir)}
    cells = sweep_mod.cell_dirs(sweep_dir)
    metrics = {name: _read(run_dir / "report" / "metrics.json") for name, _, run_dir in cells}
    tasks: list[str] = []
    for m in metrics.values():
        tasks += [t for t in (m or {}).get("tasks", []) if t not in tasks]
    rows: list[dict] = []
    seen_merged: dict[tuple, str] = {}
    for name, values, run_dir in cells:
        m = metrics[name]
        method = _method(run_dir)
        if m is not None:
            merged = _figures(m, "merged", tasks)
            key = (_merge_digest(run_dir), json.dumps(merged, sort_keys=True))
            if all(v is not None for v in merged.values()) and key not in seen_merged:
                seen_merged[key] = name
                rows.append({"cell": name, "method": method, "repair": "none",
                             "settings": _settings(values, merge_only=True), "state": states.get(name, ""),
                             **merged, **_lm_eval(m, "merged")})
        row = {"cell": name, "method": method, "repair": "harc", "settings": _settings(values, merge_only=False),
               "state": states.get(name, "")}
        if m is not None:
            row.update(_figures(m, "calibrated", tasks))
            row.update(_oracle_shares(m, tasks))
            row.update(_lm_eval(m, "calibrated"))
            row["seconds"] = repair_seconds(m, "calibrated")
        rows.append(row)
        for model in (repair_models(m) if m is not None else []):  # Table 7: the training baselines
            rows.append({"cell": name, "method": method, "repair": model, "settings": row["settings"],
                         "state": row["state"], **_figures(m, model, tasks), **_lm_eval(m, model),
                         "seconds": repair_seconds(m, model)})
    columns = ["cell", "method", "repair", "settings", "state"] + [f"loss:{t}" for t in tasks] + [
        "loss_mean", "router_kl", "topk_mismatch"] + [f"harc_of_oracle:{t}" for t in tasks]
    if any(r.get("seconds") is not None for r in rows):
        columns.append("seconds")
    for r in rows:
        columns += [k for k in r if k.startswith("lm_eval:") and k not in columns]
    return columns, rows


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def write_sweep_table(sweep_dir: Path) -> dict[str, Path]:
    """Write table.md, table.csv and plot.png into the sweep directory; their paths."""
    sweep_dir = Path(sweep_dir)
    columns, rows = sweep_rows(sweep_dir)
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        md.append("| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|") for c in columns) + " |")
    note = ("\nRows: `harc` is a cell's calibrated model, `none` the merged model it was calibrated from "
            "(one row per distinct merge), others a training baseline's model (docs/training.md; `seconds`: "
            "the repair's wall time, HARC's first for a start from HARC). Losses: held-out mean token NLL (nats); router KL and top-k "
            "mismatch: router-level, mean over layers and tasks; read from each cell's report/metrics.json.\n")
    write_text_atomic(sweep_dir / TABLE_MD, "\n".join(md) + "\n" + note)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    write_text_atomic(sweep_dir / TABLE_CSV, buf.getvalue())
    _plot(columns, rows, sweep_dir / PLOT)
    return {"md": sweep_dir / TABLE_MD, "csv": sweep_dir / TABLE_CSV, "plot": sweep_dir / PLOT}


def _plot(columns: list[str], rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [c for c in columns if c.startswith("loss:")]
    # a none row is its merge: label it by its (merge) settings, not by the cell that measured it
    labels = [f"{r['settings'] or r['cell']} [none]" if r["repair"] == "none" else f"{r['cell']} [{r['repair']}]"
              for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.2 * len(rows) + 4), 4.5))
    width = 0.8 / max(len(losses), 1)
    for i, col in enumerate(losses):
        ys = [r.get(col) if r.get(col) is not None else float("nan") for r in rows]
        axes[0].bar([x + i * width for x in range(len(rows))], ys, width, label=col[len("loss:"):])
    axes[0].set_title("held-out loss per task")
    finite = [r[c] for r in rows for c in losses if isinstance(r.get(c), (int, float)) and math.isfinite(r[c])]
    if finite:  # the differences between rows are small next to the losses: zoom in on them
        lo, hi = min(finite), max(finite)
        pad = max(hi - lo, 1e-3 * max(abs(hi), 1.0)) * 0.25
        axes[0].set_ylim(lo - pad, hi + pad)
    axes[0].set_xticks([x + width * (len(losses) - 1) / 2 for x in range(len(rows))], labels, rotation=60,
                       ha="right", fontsize=7)
    if losses:
        axes[0].legend(fontsize=7)
    kl = [r.get("router_kl") if r.get("router_kl") is not None else float("nan") for r in rows]
    axes[1].bar(range(len(rows)), kl, color=["tab:gray" if r["repair"] == "none" else "tab:green" for r in rows])
    axes[1].set_title("router KL(source || model), mean over layers and tasks")
    axes[1].set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
