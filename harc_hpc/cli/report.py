"""``harc-hpc report RUN_DIR`` and ``harc-hpc compare RUN_A RUN_B`` (registered in cli.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Config to use instead of RUN_DIR/config.yaml.")
def report_command(run_dir: Path, config_path) -> None:
    """Write RUN_DIR/report/ (metrics.json, report.md, plots) for a finished run."""
    from harc_hpc.config import load_config
    from harc_hpc.errors import HarcHpcError, InputDataError
    from harc_hpc.stages.report import run

    path = config_path or run_dir / "config.yaml"
    try:
        cfg = load_config(path)
        result = run(cfg, run_dir)
    except HarcHpcError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except FileNotFoundError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(InputDataError.exit_code)
    click.echo(f"report written to {run_dir / 'report'}")
    if result.get("kl_reduction") is not None:
        click.echo(f"router-level KL: merged {result['kl_merged']:.4f} -> calibrated {result['kl_calibrated']:.4f} "
                   f"({100 * result['kl_reduction']:.1f}% lower)")
    for name, loss in sorted(result.get("loss_mean", {}).items()):
        click.echo(f"mean held-out loss {name}: {loss:.4f}")


@click.command("compare")
@click.argument("run_a", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("run_b", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--rtol", type=float, default=1e-3, show_default=True,
              help="Relative tolerance of a metric (losses, routing KL and mismatch).")
@click.option("--atol", type=float, default=1e-6, show_default=True, help="Absolute tolerance of a metric.")
@click.option("--all", "show_all", is_flag=True, help="Also list metrics that differ within tolerance.")
def compare_command(run_a: Path, run_b: Path, rtol: float, atol: float, show_all: bool) -> None:
    """Compare the reports of two runs; exit 1 when a metric moved beyond tolerance or artifacts
    that should be identical differ, 2 when a report is missing."""
    from harc_hpc.report.compare import CompareError, compare_metrics, format_comparison, load_metrics

    try:
        a, b = load_metrics(run_a), load_metrics(run_b)
    except CompareError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    result = compare_metrics(a, b, rtol=rtol, atol=atol)
    click.echo(format_comparison(result, str(run_a), str(run_b), show_all=show_all))
    sys.exit(0 if result.ok else 1)
