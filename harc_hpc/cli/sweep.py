"""``harc-hpc sweep CONFIG``: a base config over a grid of config keys, as one set of runs sharing
every task whose digest is the same (harc_hpc.pipeline.sweep), and its table."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from harc_hpc.cli.launch import EXECUTORS, _echo, _fail
from harc_hpc.errors import HarcHpcError


@click.command("sweep")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--executor", type=EXECUTORS, default=None, help="default: executor.kind of the cells' config")
@click.option("--dry-run", is_flag=True, help="validate every cell, print what each would run and share; run nothing")
@click.option("--wait", is_flag=True, help="(SLURM) wait for the jobs, then write the table")
@click.option("--force", is_flag=True, help="rerun every task (each distinct task once, in the cell that owns it)")
@click.option("--table-only", is_flag=True, help="only (re)write table.md, table.csv and plot.png from the cells' reports")
@click.option("--stages-dir", type=click.Path(exists=True, file_okay=False), default=None)
def sweep_cmd(config, executor, dry_run, wait, force, table_only, stages_dir):
    """Expand CONFIG's `sweep:` grid into cells, validate every cell, run (or submit) them sharing
    every task two cells have in common, and write <sweep dir>/table.md, table.csv and plot.png.
    Exit 1 when a cell failed (the others still ran)."""
    from harc_hpc.pipeline.sweep import format_sweep_status, load_sweep, submit_sweep, sweep_status
    from harc_hpc.report.sweep_table import write_sweep_table

    started = time.time()
    try:
        if table_only:
            sweep_dir = load_sweep(config).dir
        else:
            outcome = submit_sweep(config, executor=executor, specs_dir=stages_dir, dry_run=dry_run, force=force,
                                   wait=wait, echo=_echo)
            if dry_run:
                sys.exit(0)
            sweep_dir = outcome.plan.sweep.dir
            if outcome.executor == "slurm" and not wait:
                click.echo(f"submitted {len(outcome.job_ids())} array job(s); follow with: harc-hpc status {sweep_dir}; "
                           f"then: harc-hpc sweep {config} --table-only")
                sys.exit(0)
        paths = write_sweep_table(Path(sweep_dir))
        cells = sweep_status(sweep_dir)
    except HarcHpcError as exc:
        _fail(str(exc), exc.exit_code)
    click.echo(f"table: {paths['md']} ({paths['csv'].name}, {paths['plot'].name})")
    bad = [c for c in cells if c.state == "failed"]
    if bad:
        click.echo(format_sweep_status(cells, failed_only=True), err=True)
        click.echo(f"{len(bad)} of {len(cells)} cell(s) failed; details: harc-hpc status {sweep_dir}", err=True)
    if not table_only:
        click.echo(f"sweep done in {time.time() - started:.0f}s")
    sys.exit(1 if bad else 0)
