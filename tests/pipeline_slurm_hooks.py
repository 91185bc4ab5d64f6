"""Test-only wrappers of real stage functions, importable inside SLURM jobs (tests/ is on PYTHONPATH).

A test stage-spec directory points a stage's ``function`` here instead of at the production module;
the wrapper runs the real stage unchanged unless a control file in the run directory asks it to
pause, so a test can kill a real task half-way through writing its artifacts. Nothing in the
production code paths sleeps or reads these files.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path


def pause_file(run_dir: Path, stage: str, key: str) -> Path:
    return Path(run_dir) / f"pause-{stage}-{key}"


def started_file(run_dir: Path, stage: str, key: str) -> Path:
    return Path(run_dir) / f"paused-{stage}-{key}"


def solve_router(cfg, run_dir, layer):
    """The real solve-router; with ``pause-solve-router-layer-LLL`` (seconds) present it stops after the
    router's safetensors is in place and while its JSON report is still a temp file."""
    from harc_hpc.stages import routers
    from harc_hpc.stages import solve_router as stage

    key = f"layer-{layer:03d}"
    control = pause_file(run_dir, "solve-router", key)
    if not control.exists():
        return stage.run(cfg, run_dir, layer=layer)
    seconds = float(control.read_text().strip() or 120)
    real_atomic_path = routers.atomic_path

    @contextmanager
    def pausing_atomic_path(final):
        with real_atomic_path(final) as tmp:
            yield tmp
            if Path(final).suffix == ".json":
                started_file(run_dir, "solve-router", key).write_text(str(os.getpid()))
                time.sleep(seconds)

    routers.atomic_path = pausing_atomic_path
    try:
        return stage.run(cfg, run_dir, layer=layer)
    finally:
        routers.atomic_path = real_atomic_path


def die_file(run_dir: Path, layer: int) -> Path:
    return Path(run_dir) / f"die-solve-router-layer-{layer:03d}"


def solve_router_rank_dies(cfg, run_dir, layer, process_group=None):
    """The real solve-router; with ``die-solve-router-layer-LLL`` present, rank 1 of a distributed
    task removes it and exits at once, as a lost node would, while rank 0 goes on into the solve's
    first all-reduce."""
    from harc_hpc.stages import solve_router as stage

    if process_group is not None and die_file(run_dir, layer).exists():
        import torch.distributed as dist

        if dist.get_rank(process_group) == 1:
            die_file(run_dir, layer).unlink()
            os._exit(1)
    return stage.run(cfg, run_dir, layer=layer, process_group=process_group)
