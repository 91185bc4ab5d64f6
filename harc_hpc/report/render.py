"""report.md and PNG plots from a report's metrics dict (no model access here)."""

from __future__ import annotations

import math
from pathlib import Path

_VIEW_TITLES = {"router_level": "router-level (same inputs x)", "end_to_end": "end-to-end (own hidden states)"}


def mean_of(xs) -> float:
    """Mean of the values that are there (None and NaN left out); NaN when none is."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def layer_means(per_task: dict, metric: str) -> list[float]:
    """Per-layer average over tasks of one routing metric."""
    rows = [v[metric] for v in per_task.values()]
    return [mean_of(col) for col in zip(*rows)] if rows else []


def _bytes(x) -> str:
    from harc_hpc.errors import format_bytes

    return format_bytes(x) if isinstance(x, (int, float)) else "-"


def unrouted_text(unrouted) -> str:
    """Per source, the experts its router sends no calibration token to (their rows are set by the
    regularisation and the other sources only), e.g. ``code: 3, 17``; ``none`` when every one is reached."""
    if not isinstance(unrouted, dict):
        return "-"
    parts = [f"{task}: {', '.join(str(e) for e in experts)}" for task, experts in unrouted.items() if experts]
    return "; ".join(parts) if parts else "none"


def _fmt(x, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return format(x, spec)
    return str(x)


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _loss_columns(metrics: dict) -> list[str]:
    names = sorted({k for per in metrics.get("loss", {}).values() for k in per})
    order = [n for n in names if n.startswith("source:")]
    order += [n for n in ("base", "merged", "calibrated", "oracle") if n in names]
    return order + [n for n in names if n not in order]


# -- plots ------------------------------------------------------------------------------------------

def write_plots(metrics: dict, out_dir: Path) -> list[str]:
    """PNG files written into ``out_dir`` (names relative to it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    written = []
    layers = metrics.get("layers", [])
    routing = metrics.get("routing", {})
    if routing and layers:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        styles = {"router_level": "-", "end_to_end": "--"}
        colors = {"merged": "tab:red", "calibrated": "tab:blue"}
        for view, models in routing.items():
            for name, per_task in models.items():
                if not per_task:
                    continue
                label = f"{name}, {view.replace('_', '-')}"
                axes[0].plot(layers, layer_means(per_task, "kl"), styles.get(view, ":"), marker="o",
                             color=colors.get(name), label=label)
                axes[1].plot(layers, [100 * v for v in layer_means(per_task, "topk_mismatch")],
                             styles.get(view, ":"), marker="o", color=colors.get(name), label=label)
        axes[0].set_ylabel("KL(r_i || r), nats")
        axes[1].set_ylabel(f"top-{metrics.get('top_k', 'k')} selections deviating, %")
        for ax in axes:
            ax.set_xlabel("MoE layer")
            ax.set_xticks(layers)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle("Routing vs the source routers (mean over tasks)")
        fig.tight_layout()
        fig.savefig(out_dir / "routing.png", dpi=110)
        plt.close(fig)
        written.append("routing.png")

    losses = metrics.get("loss", {})
    columns = _loss_columns(metrics)
    if losses and columns:
        tasks = list(losses)
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
        _bars(axes[0], tasks, columns, lambda t, n: losses[t].get(n, float("nan")))
        axes[0].set_ylabel("held-out loss, nats/token")
        axes[0].set_title("Held-out loss per task")
        finite = [v for t in tasks for v in losses[t].values() if isinstance(v, float) and math.isfinite(v)]
        # Sources that forgot a task would dwarf the differences that matter: clip the axis.
        core = [losses[t][n] for t in tasks for n in ("merged", "calibrated", "oracle") if n in losses[t]]
        if core and finite:
            axes[0].set_ylim(0, min(max(finite), 2.5 * max(core)) * 1.05)
        axes[0].legend(fontsize=8, ncol=2)
        # The differences that matter are small next to the losses: show them against the merged model.
        delta_cols = [n for n in ("base", "calibrated", "oracle") if n in columns]
        if "merged" in columns and delta_cols:
            _bars(axes[1], tasks, delta_cols,
                  lambda t, n: losses[t].get(n, float("nan")) - losses[t].get("merged", float("nan")))
            axes[1].axhline(0.0, color="black", linewidth=0.8)
            axes[1].set_ylabel("loss - merged's, nats/token")
            axes[1].set_title("Change vs the merged model")
            axes[1].legend(fontsize=8)
        else:
            axes[1].set_visible(False)
        fig.tight_layout()
        fig.savefig(out_dir / "loss.png", dpi=110)
        plt.close(fig)
        written.append("loss.png")

    usage = metrics.get("expert_usage", {})
    tasks = [t for t in metrics.get("tasks", []) if f"source:{t}" in usage]
    if usage and tasks and layers:
        fig, axes = plt.subplots(len(tasks), len(layers), figsize=(2.6 * len(layers), 2.3 * len(tasks)),
                                 squeeze=False, sharey=True)
        rows = {"source": "tab:green", "merged": "tab:red", "calibrated": "tab:blue"}
        for i, t in enumerate(tasks):
            series = {"source": usage[f"source:{t}"][t], "merged": usage.get("merged", {}).get(t),
                      "calibrated": usage.get("calibrated", {}).get(t)}
            series = {k: v for k, v in series.items() if v}
            width = 0.8 / len(series)
            for j, l in enumerate(layers):
                ax = axes[i][j]
                for k, (name, per_layer) in enumerate(series.items()):
                    shares = per_layer[j]
                    xs = [e + (k - (len(series) - 1) / 2) * width for e in range(len(shares))]
                    ax.bar(xs, [100 * v for v in shares], width, color=rows[name], label=name)
                ax.set_title(f"{t}, layer {l}", fontsize=9)
                ax.set_xticks(range(len(series["source"][j])))
                ax.tick_params(labelsize=7)
                if j == 0:
                    ax.set_ylabel("% of selections")
        axes[0][0].legend(fontsize=7)
        fig.suptitle("Expert usage on each task's held-out text: its source, merged, calibrated")
        fig.tight_layout()
        fig.savefig(out_dir / "usage.png", dpi=100)
        plt.close(fig)
        written.append("usage.png")

    solve = metrics.get("solve", {})
    if solve:
        ls = sorted(solve, key=int)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([int(l) for l in ls], [solve[l].get("iterations") or 0 for l in ls], color="tab:gray")
        ax.set_xlabel("MoE layer")
        ax.set_xticks([int(l) for l in ls])
        ax.set_ylabel("solver iterations")
        ax2 = ax.twinx()
        res = [solve[l].get("relative_residual") for l in ls]
        if all(isinstance(r, (int, float)) and r > 0 for r in res):
            ax2.semilogy([int(l) for l in ls], res, "o-", color="tab:purple")
            ax2.set_ylabel("relative residual")
        ax.set_title("Router solves")
        fig.tight_layout()
        fig.savefig(out_dir / "solve.png", dpi=110)
        plt.close(fig)
        written.append("solve.png")
    return written


def _bars(ax, tasks, columns, value) -> None:
    width = 0.8 / len(columns)
    palette = {"base": "tab:green", "merged": "tab:red", "calibrated": "tab:blue", "oracle": "tab:gray"}
    others = iter(["tab:orange", "tab:purple", "tab:olive", "tab:cyan", "tab:brown", "tab:pink"] * 8)
    for j, name in enumerate(columns):
        xs = [i + (j - (len(columns) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(xs, [value(t, name) for t in tasks], width, label=name, color=palette.get(name) or next(others))
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks)
    ax.grid(axis="y", alpha=0.3)


# -- markdown ---------------------------------------------------------------------------------------

def write_markdown(metrics: dict, path: Path, plots: list[str]) -> None:

    lines = [f"# HARC report: {metrics.get('run', '')}", ""]
    s = metrics.get("summary", {})
    tasks = metrics.get("tasks", [])
    layers = metrics.get("layers", [])
    if metrics.get("note"):
        lines += [f"> {metrics['note']}", ""]
    lines += _story(metrics)
    if s:
        lines += ["## Summary", "", "| | merged | calibrated | change |", "|---|---|---|---|"]
        for view in ("router_level", "end_to_end"):
            v = s.get(view, {})
            if "merged" not in v or "calibrated" not in v:
                continue
            m, c = v["merged"], v["calibrated"]
            lines.append(f"| mean KL, {_VIEW_TITLES[view]} | {_fmt(m['kl_mean'])} | {_fmt(c['kl_mean'])} | "
                         f"{_pct(-v.get('kl_reduction', float('nan')))} |")
            lines.append(f"| mean top-k mismatch, {view.replace('_', '-')} | {_pct(m['topk_mismatch_mean'])} | "
                         f"{_pct(c['topk_mismatch_mean'])} | |")
            lines.append(f"| worst-layer top-k mismatch, {view.replace('_', '-')} | "
                         f"{_pct(m['topk_mismatch_worst_layer'])} | {_pct(c['topk_mismatch_worst_layer'])} | |")
            if "tokens_with_deviation" in m and "tokens_with_deviation" in c:
                lines.append(f"| tokens with a deviating expert set in some layer, end-to-end | "
                             f"{_pct(m['tokens_with_deviation'])} | {_pct(c['tokens_with_deviation'])} | |")
                lines.append(f"| layers with a deviating expert set per token (of {len(layers)}), end-to-end | "
                             f"{_fmt(m['deviating_layers_per_token'], '.2f')} | "
                             f"{_fmt(c['deviating_layers_per_token'], '.2f')} | |")
        lm = s.get("loss_mean", {})
        if "merged" in lm and "calibrated" in lm:
            lines.append(f"| mean held-out loss (nats/token) | {_fmt(lm['merged'])} | {_fmt(lm['calibrated'])} | "
                         f"{lm['calibrated'] - lm['merged']:+.4f} |")
        lines.append("")

    for view, models in metrics.get("routing", {}).items():
        lines += [f"## Routing, {_VIEW_TITLES.get(view, view)}", "",
                  "KL(r_i || r) / share of top-k selections that deviate from source i's, per layer.", ""]
        header = "| model | task | " + " | ".join(f"L{l}" for l in layers) + " |"
        lines += [header, "|" + "---|" * (2 + len(layers))]
        for name, per_task in models.items():
            rows = list(per_task.items())
            if per_task:
                rows.append(("mean", {"kl": layer_means(per_task, "kl"),
                                      "topk_mismatch": layer_means(per_task, "topk_mismatch")}))
            for task, vals in rows:
                cells = [f"{_fmt(k, '.3f')} / {_pct(x)}" for k, x in zip(vals["kl"], vals["topk_mismatch"])]
                lines.append(f"| {name} | {task} | " + " | ".join(cells) + " |")
        lines.append("")

    losses = metrics.get("loss", {})
    columns = _loss_columns(metrics)
    if losses and columns:
        lines += ["## Held-out loss (nats/token)", "",
                  "oracle: the merged model with source i's routers on task i.", "",
                  "| task | tokens | " + " | ".join(columns) + " |", "|" + "---|" * (2 + len(columns))]
        for t in tasks:
            mode = metrics.get("heldout_mode", {}).get(t, "full")
            scored = "" if mode == "full" else f" ({mode})"  # only the selected tokens' predictions count
            lines.append(f"| {t} | {metrics.get('heldout_tokens', {}).get(t, '')}{scored} | "
                         + " | ".join(_fmt(losses[t].get(c)) for c in columns) + " |")
        lm = s.get("loss_mean", {})
        lines.append("| mean | | " + " | ".join(_fmt(lm.get(c)) for c in columns) + " |")
        lines.append("")

    swap = metrics.get("router_swap")
    if swap:
        routers = ["merged"] + [t for t in tasks if any(t in swap[u] for u in swap)]
        lines += ["## Router swap (the paper's Fig. 1)", "",
                  "Held-out loss of the merged model run with each source's routers (rows) on each task "
                  "(columns); the diagonal is the oracle.", "",
                  "| routers | " + " | ".join(swap) + " |", "|" + "---|" * (1 + len(swap))]
        for r in routers:
            lines.append(f"| {r} | " + " | ".join(_fmt(swap[t].get(r)) for t in swap) + " |")
        lines.append("")

    lines += _training(metrics)

    solve = metrics.get("solve", {})
    if solve:
        lines += ["## Router solves", "", "| layer | iterations | relative residual | converged | seconds "
                  "| experts no calibration token reached |",
                  "|---|---|---|---|---|---|"]
        for l in sorted(solve, key=int):
            r = solve[l]
            lines.append(f"| {l} | {_fmt(r.get('iterations'), 'd') if isinstance(r.get('iterations'), int) else _fmt(r.get('iterations'))} | "
                         f"{_fmt(r.get('relative_residual'), '.2e')} | {_fmt(r.get('converged'))} | "
                         f"{_fmt(r.get('seconds'), '.2f')} | {unrouted_text(r.get('unrouted_experts'))} |")
        lines.append("")

    stages = metrics.get("stages", {})
    if stages:
        lines += ["## Stages", "", "| stage | tasks | ran on | wall s (sum) | wall s (max) | peak RSS MB (max) "
                  "| peak GPU MB (max) | on disk | deleted after use |", "|---|---|---|---|---|---|---|---|---|"]
        for name, st in stages.items():
            lines.append(f"| {name} | {st['tasks']} | {', '.join(st.get('devices', [])) or '-'} | "
                         f"{_fmt(st.get('wall_s_total'), '.1f')} | "
                         f"{_fmt(st.get('wall_s_max'), '.1f')} | {_fmt(st.get('peak_rss_mb_max'), '.0f')} | "
                         f"{_fmt(st.get('peak_gpu_mb_max'), '.0f')} | {_bytes(st.get('disk_bytes'))} | "
                         f"{_bytes(st.get('retired_bytes'))} |")
        lines.append("")

    if metrics.get("lm_eval"):
        header, rows = score_table(metrics["lm_eval"])
        lines += ["## Task scores (lm-evaluation-harness)", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        oracle = metrics["lm_eval"].get("oracle_sources")
        if oracle:
            lines.append("")
            lines.append("oracle: the merged model with " + ", ".join(f"{s}'s routers on {t}" for t, s in sorted(oracle.items())))
        lines.append("")

    for p in plots:
        lines += [f"![{p}]({p})", ""]

    man = metrics.get("manifest", {})
    if man:
        lines += ["## Manifest", "", f"- git revision: {man.get('git_revision') or 'unknown'}",
                  f"- config digest: {man.get('config_digest')}",
                  f"- results config digest: {man.get('results_config_digest')}",
                  "- packages: " + ", ".join(f"{k} {v}" for k, v in man.get("packages", {}).items()), ""]
        arts = man.get("artifacts", {})
        if arts:
            lines += ["| artifact | sha256 |", "|---|---|"]
            lines += [f"| {k} | {v[:16]}… |" for k, v in arts.items()]
            lines.append("")
    path.write_text("\n".join(lines))



def _training(metrics: dict) -> list[str]:
    """Closed form vs gradient steps (router-distill; docs/training.md): every repair's held-out loss,
    router-level KL and wall time, then per layer the KL on held-out calibration sequences."""
    tr = metrics.get("training")
    if not tr:
        return []
    tasks = metrics.get("tasks", [])
    losses = metrics.get("loss", {})
    rl = metrics.get("summary", {}).get("router_level", {})
    st = tr.get("settings", {})
    fst = (tr.get("finetune") or {}).get("settings") or {}
    out = ["## Closed form vs training", ""]
    if st:
        out += [f"router-distill: Adam (lr {st.get('lr')}, betas {st.get('betas')}) on the router-level KL HARC minimises, "
           f"{st.get('batch_tokens')} tokens of each task a step, at most {st.get('max_steps')} steps a layer, "
           f"stopped after {st.get('patience')} measurements (every {st.get('eval_every')} steps) without improvement "
           f"on {100 * (st.get('validation_fraction') or 0):.0f} % of each task's calibration sequences held out. "
           "Held-out loss and router-level KL on the held-out text; wall time: HARC's statistics and solves, "
           "training's Adam steps (from HARC's router: both).", ""]
    if fst:
        what = ("output-KL distillation (finetune, KL of each source's next-token distribution on its own task)"
                if fst.get("objective") == "output_kl" else "SFT (finetune)")
        out += [f"{what}: AdamW on {fst.get('params')} parameters, lr {fst.get('lr')} ({fst.get('warmup_steps')} "
                f"warm-up steps, then {fst.get('schedule')}), {fst.get('steps')} steps of {fst.get('batch_size')} "
                f"calibration sequences of at most {fst.get('seq_length')} tokens, seed {fst.get('seed')}; wall time: "
                "its steps (from HARC's model: HARC's too).", ""]
        fs = (tr.get("finetune") or {}).get("starts") or {}
        if "steps_to_other_final_loss" in fs.get("harc", {}):  # HARC as a starting point (report.training)
            def _reach(v):
                return "never" if v is None else f"after {v} steps"
            out += ["HARC as a starting point (training loss on the same batches, trailing mean): from HARC's model "
                    f"training reaches the merged start's final loss {_reach(fs['harc']['steps_to_other_final_loss'])}, "
                    f"from the merged model HARC's start's final loss {_reach(fs['merged']['steps_to_other_final_loss'])}.",
                    ""]
    walls = {k: v for k, v in (tr.get("stage_wall_s") or {}).items() if isinstance(v, (int, float))}
    if walls:
        out += ["Stage wall time, summed over tasks (on a shared machine: rough): "
                + ", ".join(f"{k} {v:.1f} s" for k, v in walls.items()) + ".", ""]
    out += ["| model | " + " | ".join(f"{t} loss" for t in tasks) + " | router-level KL | top-k mismatch | wall s | steps |",
            "|" + "---|" * (5 + len(tasks))]
    seconds = {"merged": None, "calibrated": tr.get("harc", {}).get("seconds")}
    steps = {"merged": None, "calibrated": 0}
    for start, v in [*tr.get("router_distill", {}).items(), *(tr.get("finetune") or {}).get("starts", {}).items()]:
        seconds[v["model"]], steps[v["model"]] = v.get("seconds"), v.get("steps")
    for label, name in (("merged", "merged"), ("merged + HARC", "calibrated"),
                        ("merged + router-distill", "router-distill"),
                        ("merged + HARC + router-distill", "harc+router-distill"),
                        ("merged + SFT", "sft"), ("merged + HARC + SFT", "harc+sft"),
                        ("merged + output-KL distillation", "output-kl"),
                        ("merged + HARC + output-KL distillation", "harc+output-kl")):
        if name not in rl and name not in seconds:
            continue
        kl = rl.get(name, {})
        out.append(f"| {label} | " + " | ".join(_fmt(losses.get(t, {}).get(name)) for t in tasks)
                   + f" | {_fmt(kl.get('kl_mean'))} | {_pct(kl.get('topk_mismatch_mean'))} | "
                   f"{_fmt(seconds.get(name), '.1f')} | {_fmt(steps.get(name), 'd') if isinstance(steps.get(name), int) else '–'} |")
    starts = list(tr.get("router_distill", {}))
    if not starts:
        return out + [""]
    out += ["", "Per layer, router-level KL (sum over tasks) on the held-out calibration sequences; steps: taken "
            "(best); reaches HARC: the first measured step at or below HARC's KL.", "",
            "| layer | merged | HARC | HARC s | " + " | ".join(
                f"from {s}: KL | steps | reaches HARC | s" for s in starts) + " |",
            "|" + "---|" * (4 + 4 * len(starts))]
    for row in tr.get("layers", []):
        cells = [str(row["layer"]), _fmt(row.get("merged_kl"), ".5f"), _fmt(row.get("harc_kl"), ".5f"),
                 _fmt(row.get("harc_seconds"), ".2f")]
        for s in starts:
            t = row.get(s) or {}
            reach = t.get("steps_to_harc_heldout_kl")
            cells += [_fmt(t.get("heldout_kl"), ".5f"), f"{t.get('steps', '–')} ({t.get('best_step', '–')})",
                      "never" if reach is None else str(reach), _fmt(t.get("seconds"), ".2f")]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    return out


def _story(metrics: dict) -> list[str]:
    """The report's first screen: per task, the losses (and task scores) of base, source, merged,
    calibrated and oracle, and the share of each gap that a repair closes."""
    losses = metrics.get("loss", {})
    shares = metrics.get("summary", {}).get("gap_shares", {})
    if not shares:
        return []
    tasks = [t for t in metrics.get("tasks", []) if t in shares]
    lm = metrics.get("lm_eval") or {}
    # task scores per domain: lm-eval tasks mapped to a source (harc-hpc's own tasks know theirs)
    scored = {t: [task for task, src in lm.get("oracle_sources", {}).items() if src == t] for t in tasks}
    rows = [("base", "base"), ("source (own task)", "source"), ("merged", "merged"),
            ("merged + HARC", "calibrated"),
            # the training baselines, when the run has them (a row with no figure is left out)
            ("merged + router-distill", "router-distill"), ("merged + HARC + router-distill", "harc+router-distill"),
            ("merged + SFT", "sft"), ("merged + HARC + SFT", "harc+sft"),
            ("merged + output-KL distillation", "output-kl"), ("merged + HARC + output-KL distillation", "harc+output-kl"),
            ("router-swap oracle", "oracle")]
    header = []
    for t in tasks:
        header.append(f"{t} loss")
        header += [f"{t}: {task}" for task in scored[t]]
    out = ["## The story", "",
           "Held-out loss (nats/token; lower is better)" + (" and task scores (higher is better)" if any(scored.values()) else "")
           + " on each task. The oracle is the merged model with that task's source routers.", "",
           "| model | " + " | ".join(header) + " |", "|" + "---|" * (1 + len(header))]
    for label, key in rows:
        cells = []
        for t in tasks:
            name = f"source:{t}" if key == "source" else key
            cells.append(_fmt(losses[t].get(name)))
            lm_name = {"source": f"source:{t}", "calibrated": "calibrated"}.get(key, key)
            for task in scored[t]:
                score = lm.get("models", {}).get(lm_name, {}).get(task, {})
                value = next(iter(lm_eval_scores(score).values()), None)
                cells.append(_fmt(value))
        if any(c != "–" for c in cells):
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append("")
    labels = {"merge_keeps_gain": "the merged model keeps of the fine-tune's gain over the base",
              "oracle_recovers": "the source's own routers win back of what the merge lost (high: routing is the failure)",
              "harc_recovers_of_oracle": "HARC reaches of the oracle's gain",
              "harc_recovers": "HARC wins back of what the merge lost"}
    out += ["| share of the gap | " + " | ".join(tasks) + " |", "|" + "---|" * (1 + len(tasks))]
    for key, text in labels.items():
        if any(key in shares[t] for t in tasks):
            out.append(f"| {text} | " + " | ".join(_pct(shares[t].get(key)) for t in tasks) + " |")
    overlap = metrics.get("summary", {}).get("expert_usage_overlap")
    if overlap:
        out += ["", "Expert-usage overlap of the sources, each on its own task, per layer (1 = same experts, "
                "0 = disjoint): " + ", ".join(_fmt(v, ".2f") for v in overlap) + "."]
    out.append("")
    return out


def lm_eval_scores(scores: dict) -> dict[str, float]:
    """The scores among lm-eval's result keys of one task: lm-eval names a score "<metric>,<filter>";
    its other keys (name, alias, sample_len) and the "<metric>_stderr,<filter>" entries are not."""
    return {k: v for k, v in sorted((scores or {}).items())
            if "," in k and not k.split(",")[0].endswith("_stderr")
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def score_table(lm: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the report's task-score table: one row per model, one column per task and
    metric (lm-eval's "<metric>,<filter>" names), "-" where a model was not scored on a task."""
    models = lm.get("models", {})
    columns: list[tuple[str, str]] = []
    for task in lm.get("tasks", []):
        metrics = sorted({m for per in models.values() for m in lm_eval_scores(per.get(task, {}))})
        columns += [(task, m) for m in metrics]
    header = ["model"] + [f"{t} {m}" for t, m in columns]
    rows = []
    for name, per in models.items():
        row = [name]
        for task, metric in columns:
            v = per.get(task, {}).get(metric)
            row.append(f"{v:.4f}" if isinstance(v, (int, float)) else "-")
        rows.append(row)
    return header, rows
