"""``harc-hpc build-moe SPEC``: an MoE from dense fine-tuned experts (BTX / MergeME §3.1).

A standalone command, like merge-experts: the build needs no pipeline run around it. The pipeline
stages of issue 15 (HARC-fitted routers) come later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click

from harc_hpc.mergeme import build_moe, load_spec


@click.command("build-moe")
@click.argument("spec", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory (default: the spec's output).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def build_moe_command(spec: Path, output: Optional[Path], overwrite: bool) -> None:
    """Build the MoE checkpoint that SPEC (YAML: base, experts, output, top_k, merge, router)
    describes; see docs/mergeme.md. Prints a JSON summary."""
    settings = load_spec(spec)
    updates = {}
    if output is not None:
        updates["output"] = output.resolve()
    if overwrite:
        updates["overwrite"] = True
    if updates:
        settings = settings.model_copy(update=updates)
    click.echo(json.dumps(build_moe(settings), indent=2))


@click.command("build-hetero-moe")
@click.argument("spec", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory (default: the spec's output).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def build_hetero_moe_command(spec: Path, output: Optional[Path], overwrite: bool) -> None:
    """Join dense experts of different widths / depths (one tokenizer) into a MergeME §3.2 MoE
    and fine-tune its projectors and router on calibration data (SPEC, YAML: experts, output,
    top_k, projector, router, train); a killed run resumes from its last checkpoint. See
    docs/mergeme.md. Prints a JSON summary."""
    from harc_hpc.mergeme.hetero_build import build_hetero_moe
    from harc_hpc.mergeme.hetero_spec import load_hetero_spec

    settings = load_hetero_spec(spec)
    updates = {}
    if output is not None:
        updates["output"] = output.resolve()
    if overwrite:
        updates["overwrite"] = True
    if updates:
        settings = settings.model_copy(update=updates)
    click.echo(json.dumps(build_hetero_moe(settings), indent=2))
