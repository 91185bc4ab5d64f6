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


def _spec_build_command(name: str):
    """A build command of SPEC (a YAML file) with the options every spec-driven build has."""
    def wrap(f):
        f = click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")(f)
        f = click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
                         help="Output directory (default: the spec's output).")(f)
        f = click.argument("spec", type=click.Path(exists=True, dir_okay=False, path_type=Path))(f)
        return click.command(name)(f)
    return wrap


def _with_overrides(settings, output: Optional[Path], overwrite: bool):
    """The spec ``settings`` with the command line's ``--output`` / ``--overwrite`` applied."""
    updates = {}
    if output is not None:
        updates["output"] = output.resolve()
    if overwrite:
        updates["overwrite"] = True
    return settings.model_copy(update=updates) if updates else settings


@_spec_build_command("build-moe")
def build_moe_command(spec: Path, output: Optional[Path], overwrite: bool) -> None:
    """Build the MoE checkpoint that SPEC (YAML: base, experts, output, top_k, merge, router)
    describes; see docs/mergeme.md. Prints a JSON summary."""
    settings = _with_overrides(load_spec(spec), output, overwrite)
    click.echo(json.dumps(build_moe(settings), indent=2))


@_spec_build_command("build-hetero-moe")
def build_hetero_moe_command(spec: Path, output: Optional[Path], overwrite: bool) -> None:
    """Join dense experts of different widths / depths (one tokenizer) into a MergeME §3.2 MoE
    and fine-tune its projectors and router on calibration data (SPEC, YAML: experts, output,
    top_k, projector, router, train); a killed run resumes from its last checkpoint. See
    docs/mergeme.md. Prints a JSON summary."""
    from harc_hpc.mergeme.hetero_build import build_hetero_moe
    from harc_hpc.mergeme.hetero_spec import load_hetero_spec

    settings = _with_overrides(load_hetero_spec(spec), output, overwrite)
    click.echo(json.dumps(build_hetero_moe(settings), indent=2))
