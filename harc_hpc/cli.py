"""The ``harc-hpc`` command. Each part of the toolkit registers its commands here with one line."""

from __future__ import annotations

import logging
import sys

import click


@click.group()
@click.option("-v", "--verbose", count=True, help="more log output (-vv: debug)")
@click.version_option(package_name="harc-hpc")
def main(verbose: int) -> None:
    """Merge fine-tuned MoE LLMs and recalibrate their routers (HARC) as resumable batch pipelines."""
    level = logging.WARNING - 10 * min(verbose + 1, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


from harc_hpc.launcher.commands import stage_alias, stage_cmd, status_cmd, submit_cmd  # noqa: E402
from harc_hpc.report_cli import compare_command, report_command  # noqa: E402
from harc_hpc.stages.merge_experts import merge_experts_command  # noqa: E402

main.add_command(submit_cmd)
main.add_command(stage_cmd)
main.add_command(status_cmd)
main.add_command(report_command)
main.add_command(compare_command)
# merge-experts also works standalone (a merge with no pipeline around it, like mergekit-yaml);
# the other stages only make sense inside a run, so their commands are `stage NAME` with the name fixed.
main.add_command(merge_experts_command)
for _name in ("capture-activations", "compute-statistics", "solve-router", "assemble-model"):
    main.add_command(stage_alias(_name))
