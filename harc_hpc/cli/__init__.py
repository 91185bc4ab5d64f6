"""The ``harc-hpc`` command. Each part of the toolkit registers its commands here with one line."""

from __future__ import annotations

import logging
import sys
import traceback

import click

from harc_hpc.errors import DiskFullError, HarcHpcError


class HarcGroup(click.Group):
    """Turns harc-hpc's errors into one message format and stable exit codes (harc_hpc.errors):
    ``error: <where>: <what> (<what to do>)`` on stderr, no traceback unless ``--debug``."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except HarcHpcError as exc:
            _exit_with(ctx, exc, exc.exit_code)
        except OSError as exc:
            from harc_hpc.io.atomic import _is_disk_full

            if _is_disk_full(exc):
                _exit_with(ctx, DiskFullError(exc.filename or "?"), DiskFullError.exit_code)
            _exit_with(ctx, exc, 1)
        except Exception as exc:  # noqa: BLE001 - an internal error: say so, keep the traceback for --debug
            _exit_with(ctx, exc, 1)


def _exit_with(ctx: click.Context, exc: BaseException, code: int):
    if ctx.find_root().params.get("debug"):
        traceback.print_exception(exc)
    if isinstance(exc, HarcHpcError):
        click.echo(f"error: {exc}", err=True)
    else:
        click.echo(f"error: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                   err=True)
    ctx.exit(code)


@click.group(cls=HarcGroup)
@click.option("-v", "--verbose", count=True, help="more log output (-vv: debug)")
@click.option("--debug", is_flag=True, help="show tracebacks of errors")
@click.version_option(package_name="harc-hpc")
def main(verbose: int, debug: bool) -> None:
    """Merge fine-tuned MoE LLMs and recalibrate their routers (HARC) as resumable batch pipelines.

    Exit codes: 0 success, 1 a task failed or an internal error, 2 usage or config error, 3 bad input
    data (models, calibration files, artifacts, disk full), 4 run state (locked, jobs queued, upstream
    missing).
    """
    level = logging.WARNING - 10 * min(verbose + 1, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


from harc_hpc.cli.launch import plan_cmd, stage_alias, stage_cmd, status_cmd, submit_cmd  # noqa: E402
from harc_hpc.cli.mergeme import build_hetero_moe_command, build_moe_command  # noqa: E402
from harc_hpc.cli.report import compare_command, report_command  # noqa: E402
from harc_hpc.cli.sweep import sweep_cmd  # noqa: E402
from harc_hpc.stages.merge_experts import merge_experts_command  # noqa: E402
from harc_hpc.stages.generate_responses import generate_responses_command  # noqa: E402

main.add_command(submit_cmd)
main.add_command(plan_cmd)
main.add_command(stage_cmd)
main.add_command(status_cmd)
main.add_command(sweep_cmd)
main.add_command(report_command)
main.add_command(compare_command)
# merge-experts also works standalone (a merge with no pipeline around it, like mergekit-yaml);
# the other stages only make sense inside a run, so their commands are `stage NAME` with the name fixed.
main.add_command(merge_experts_command)
# build-moe (issue 15): an MoE from dense experts, standalone like merge-experts
main.add_command(build_moe_command)
main.add_command(build_hetero_moe_command)  # MergeME §3.2 heterogeneous experts
main.add_command(generate_responses_command)  # on-policy calibration data (SrcCrt / SrcAll)


def _add_stage_aliases() -> None:
    """``harc-hpc NAME CONFIG`` for every stage spec that has no command of its own, with the
    index options of its split."""
    from harc_hpc.pipeline.planner import PlanError, load_specs

    try:
        specs = load_specs()
    except (PlanError, OSError):  # no stage specs found: `harc-hpc stage NAME` still works
        return
    for spec in specs.values():
        if spec.name not in main.commands:
            main.add_command(stage_alias(spec.name, spec.split))


_add_stage_aliases()
