"""harc-hpc plan's figures against a measured tiny run, stage by stage (each stage owns its estimate:
stages/<stage>.yaml ``estimate:``, harc_hpc.stages.estimates).

One tiny run (2 layers, RegMean merge, report, router-distill and finetune on; run.retention keep,
so every artifact stays to be measured) runs in a fresh subprocess on the debug executor: every task
in that one process, each task's peak RSS windowed by the runner (``/proc/self/clear_refs``, VmHWM)
and recorded in its completion record, as are its artifacts' bytes. Its import baseline (torch,
transformers, harc_hpc) is measured in the same process before the run. Then ``plan_estimates`` on
the finished run directory (exact token counts from its token stores) gives the figures compared:

* host memory, per stage: measured peak RSS <= estimated host_bytes <= HOST_FACTOR x measured peak
  (the estimate is an upper bound, and not a loose one), and what the stage took over the import
  baseline <= what the estimate adds to its process allowance (PROCESS_BYTES) + HOST_MARGIN. On a run
  this small the process (torch's import) dominates; the data-dependent terms are KiB.
* scratch (disk), per stage with a scratch figure: measured bytes of what its tasks wrote within
  SCRATCH_FACTOR of the estimate, either way (zarr and safetensors headers and HDF5's layout move
  tiny files' sizes by a small factor; finetune's figure also counts the resume checkpoint it holds
  while it trains, gone from the finished run).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
HOST_FACTOR = 2.0
HOST_MARGIN = 128 * 2**20
SCRATCH_FACTOR = 4.0

RUN = r"""
import json, sys
sys.path.insert(0, {tests!r})
from pathlib import Path

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

import torch, transformers  # the import baseline every task pays
import harc_hpc.stages.capture_activations, harc_hpc.stages.solve_router  # noqa: F401
from pipeline_fixtures import build_tiny_sources, write_config
from harc_hpc.config import load_config
from harc_hpc.pipeline.api import submit_run

root = Path({root!r})
config = write_config(root, build_tiny_sources(root / "src", layers=2), executor="debug", method="regmean",
                      extra={{"run.retention": "keep", "report.enabled": True, "report.router_swap": False,
                              "report.top_k_end_to_end": False, "router_distill.enabled": True,
                              "router_distill.max_steps": 5, "router_distill.starts": ["harc"],
                              "finetune.enabled": True, "finetune.starts": ["harc"], "finetune.steps": 2,
                              "finetune.batch_size": 2}})
baseline = rss()
plan, outcome = submit_run(load_config(config), executor="debug", echo=lambda m: None)
assert outcome.ok, (outcome.failed, outcome.skipped)
print(json.dumps({{"baseline": baseline, "config": str(config), "run_dir": str(plan.run_dir)}}))
"""


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """(estimates by stage, measured by stage: peak RSS bytes, bytes written, import baseline)."""
    from harc_hpc.config import load_config
    from harc_hpc.pipeline.api import plan_estimates
    from harc_hpc.pipeline.records import disk_bytes

    root = tmp_path_factory.mktemp("estimates")
    child = subprocess.run([sys.executable, "-c", RUN.format(tests=str(TESTS), root=str(root))],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    out = json.loads(child.stdout.strip().splitlines()[-1])
    run_dir = Path(out["run_dir"])
    cfg = load_config(Path(run_dir) / "config.yaml")
    _, _, est, problems = plan_estimates(cfg, run_dir=run_dir)
    assert problems == []
    assert all("token store" in line for line in est["table"].splitlines() if line.startswith("calibration tokens"))
    runs: dict = {}
    for path in sorted((run_dir / "completions").rglob("*.json")):
        rec = json.loads(path.read_text())
        m = runs.setdefault(rec["stage"], {"peak": 0, "bytes": 0, "tasks": 0})
        m["peak"] = max(m["peak"], int(rec["peak_rss_mb"] * 2**20))
        m["bytes"] += disk_bytes(rec)
        m["tasks"] += 1
    return {e["stage"]: e for e in est["stages"]}, runs, out["baseline"]


STAGES = ["merge-statistics", "merge-experts", "capture-activations", "compute-statistics", "solve-router",
          "assemble-model", "router-distill", "router-distill-model", "finetune", "report"]


@pytest.mark.parametrize("stage", STAGES)
def test_plan_bounds_the_measured_peak_host_memory(measured, stage):
    from harc_hpc.stages.estimate import PROCESS_BYTES

    est, runs, baseline = measured
    e, m = est[stage], runs[stage]
    assert e["tasks"] == m["tasks"]
    assert m["peak"] <= e["host_bytes"] <= HOST_FACTOR * m["peak"], (stage, m["peak"], e["host_bytes"])
    assert m["peak"] - baseline <= e["host_bytes"] - PROCESS_BYTES + HOST_MARGIN, (stage, m["peak"], baseline)


@pytest.mark.parametrize("stage", [s for s in STAGES if s not in ("solve-router", "router-distill", "report")])
def test_plan_scratch_matches_what_the_stage_writes(measured, stage):
    est, runs, _ = measured
    e, m = est[stage], runs[stage]
    assert e["scratch_bytes"] / SCRATCH_FACTOR <= m["bytes"] <= e["scratch_bytes"] * SCRATCH_FACTOR, (
        stage, m["bytes"], e["scratch_bytes"])


def test_every_stage_spec_names_an_estimate():
    from harc_hpc.pipeline.planner import load_specs
    from harc_hpc.stages.estimate import stage_estimator

    for name, spec in load_specs().items():
        assert spec.estimate, f"stages/{name}.yaml names no estimate"
        assert callable(stage_estimator(spec)), name


def test_the_capture_estimate_places_states_by_the_capture_s_own_rule(monkeypatch):
    """capture_activations.placement_for is estimates.capture_activations.states_placement (one rule)
    on the device's and the host's free memory as the capture reads them: the same answer for every
    case, a GPU's free memory counted only for a GPU."""
    import torch

    from harc_hpc.stages import capture_activations as cap
    from harc_hpc.stages.estimates.capture_activations import states_placement

    gib = 2**30
    for device_free in (None, 10 * gib):
        for host_free in (2 * gib, 200 * gib):
            monkeypatch.setattr(cap, "free_memory_bytes", lambda device, f=device_free: f)
            monkeypatch.setattr(cap, "host_free_bytes", lambda f=host_free: f)
            device = torch.device("cpu" if device_free is None else "cuda")
            for nbytes in (gib, 7 * gib, 8 * gib, 100 * gib, 1000 * gib):
                for layer in (0, gib):
                    assert cap.placement_for(nbytes, device, layer) == states_placement(
                        nbytes, layer, device_free, host_free), (nbytes, layer, device_free, host_free)
