"""harc-hpc plan: per-stage estimates from config.json and the data; submit refuses what cannot fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from harc_hpc.cli import main
from harc_hpc.config import load_config
from harc_hpc.pipeline.api import plan_estimates
from pipeline_fixtures import build_tiny_sources, write_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    return write_config(root, build_tiny_sources(root / "src", layers=3), executor="slurm")


def test_plan_prints_every_stage_and_exits_0(config):
    result = CliRunner().invoke(main, ["plan", str(config)])
    assert result.exit_code == 0, result.output
    for stage in ("merge-experts", "capture-activations", "compute-statistics", "solve-router", "assemble-model"):
        assert stage in result.output
    assert "calibration tokens, math:" in result.output and "file sizes" in result.output


def test_estimates_follow_the_data_and_the_config(config):
    cfg = load_config(config)
    _, plan, est, problems = plan_estimates(cfg)
    by = {e["stage"]: e for e in est["stages"]}
    assert problems == []
    assert by["capture-activations"]["tasks"] == 3 and by["solve-router"]["tasks"] == 3
    # halving the tokens of the solve halves its resident inputs
    _, _, est2, _ = plan_estimates(load_config(config, {"harc.max_tokens": 10}))
    assert {e["stage"]: e for e in est2["stages"]}["solve-router"]["host_bytes"] < by["solve-router"]["host_bytes"]
    # keeping every store costs more scratch than deleting them after use
    _, _, est3, _ = plan_estimates(load_config(config, {"run.retention": "keep"}))
    assert ({e["stage"]: e for e in est3["stages"]}["capture-activations"]["scratch_bytes"]
            > by["capture-activations"]["scratch_bytes"])


def test_plan_names_the_stage_and_resource_that_do_not_fit(config):
    result = CliRunner().invoke(main, ["plan", str(config), "--set", "executor.stages.solve-router.mem_gb=0.001"])
    assert result.exit_code == 1
    assert "does not fit: solve-router: needs" in result.output and "executor.stages.solve-router.mem_gb" in result.output


def test_dry_run_prints_the_plan_estimates_with_the_dag(config):
    plan = CliRunner().invoke(main, ["plan", str(config)])
    dry = CliRunner().invoke(main, ["submit", str(config), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    table = plan.output.split("\n", 1)[1].split("does not fit")[0].strip()
    assert "estimated per task (harc-hpc plan):" in dry.output
    assert table.splitlines()[0] in dry.output and "--array=" in dry.output


def test_submit_refuses_a_plan_that_does_not_fit(config):
    result = CliRunner().invoke(main, ["submit", str(config), "--dry-run",
                                       "--set", "executor.stages.capture-activations.mem_gb=0.001"])
    assert result.exit_code == 2, result.output
    assert "does not fit" in result.output and "capture-activations" in result.output


@pytest.mark.parametrize("name,shape", [
    ("olmoe", "olmoe-1b-7b"), ("mixtral", "mixtral-8x7b"), ("qwen3-30b-a3b", "qwen3-30b-a3b"),
    ("qwen3-235b-a22b", "qwen3-235b-a22b"), ("moonlight-16b-a3b", "moonlight-16b-a3b"),
    ("gpt-oss-20b", "gpt-oss-20b"),
])
def test_shipped_configs_plan_to_fit_one_80gb_gpu_per_task(name, shape):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    conf = json.loads((REPO / "configs" / "model-shapes" / f"{shape}.json").read_text())
    _, plan, est, problems = plan_estimates(cfg, model_config=conf)
    assert problems == [], problems
    for e in est["stages"]:
        assert e["gpu_bytes"] <= 80 * 2**30, (e["stage"], e["gpu_bytes"])
    by = {e["stage"]: e for e in est["stages"]}
    assert by["capture-activations"]["gpu_bytes"] > 0  # capture runs on the GPU, onloaded
    # harc.inner_dtype: auto -> 16-bit products on the GPU solve
    assert any("products in bfloat16" in n for n in by["solve-router"]["notes"]), by["solve-router"]["notes"]


def test_layer_checkpoints_are_planned_as_scratch_and_can_be_turned_off(config):
    _, _, est, _ = plan_estimates(load_config(config, {"harc.block_size": 2}))
    _, _, off, _ = plan_estimates(load_config(config, {"harc.block_size": 2, "calibration.layer_checkpoints": False}))
    on_c = {e["stage"]: e for e in est["stages"]}["capture-activations"]
    off_c = {e["stage"]: e for e in off["stages"]}["capture-activations"]
    assert on_c["scratch_bytes"] > off_c["scratch_bytes"]
    assert any("checkpoints its in-flight states" in n for n in on_c["notes"])


def test_mla_attention_is_counted_from_its_ranks():
    from harc_hpc.stages.estimate import ModelShape

    conf = json.loads((REPO / "configs/model-shapes/moonlight-16b-a3b.json").read_text())
    shape = ModelShape.from_config(conf)
    d, h = 2048, 16
    want = d * h * 192 + d * (512 + 64) + 512 * h * (128 + 128) + h * 128 * d
    assert shape.attention_params() == want and shape.moe_layers == list(range(1, 27))
    assert shape.shared_intermediate == 2 * 1408
    # Moonlight-16B-A3B: ~16 B parameters in all
    assert 14e9 < shape.total_params() < 17e9, shape.total_params()


def test_inner_dtype_auto_is_16_bit_only_where_gemms_are_fast():
    from harc_hpc.stages.solve_router import resolve_inner_dtype

    assert resolve_inner_dtype("auto", True) == "bfloat16" and resolve_inner_dtype("auto", False) is None
    assert resolve_inner_dtype("float16", False) == "float16" and resolve_inner_dtype(None, True) is None


def test_a_distributed_solve_is_planned_per_rank_and_only_distributed_stages_take_ranks(config):
    model = REPO / "configs/model-shapes/olmoe-1b-7b.json"
    def solve_gpu_bytes(*sets):
        args = ["plan", str(REPO / "configs/olmoe.yaml"), "--model-config", str(model), "--json"]
        out = CliRunner().invoke(main, args + [a for s in sets for a in ("--set", s)])
        assert out.exit_code == 0, out.output
        return {e["stage"]: e for e in json.loads(out.output)["stages"]}["solve-router"]["gpu_bytes"]

    four = "executor.stages.solve-router.gpus=4"  # four ranks, one GPU each (tasks_per_node defaults to gpus)
    gpu = [solve_gpu_bytes("harc.preconditioner=jacobi"), solve_gpu_bytes("harc.preconditioner=jacobi", four)]
    assert 3.5 < gpu[0] / gpu[1] < 4.0  # the inputs are split four ways; a fixed allowance is not
    # the expert-block preconditioner (the default) is replicated on every rank: U, U G^-1 and the
    # capacitance inverses of 64 experts x 2 tasks x 256 tokens at d 2048, float32
    rows = 2 * 256
    assert solve_gpu_bytes() - gpu[0] == (2 * 64 * rows * 2048 + 64 * rows ** 2) * 4
    assert solve_gpu_bytes(four) - gpu[1] == (2 * 64 * rows * 2048 + 64 * rows ** 2) * 4
    shared = CliRunner().invoke(main, ["plan", str(REPO / "configs/olmoe.yaml"), "--model-config", str(model),
                                       "--set", "executor.stages.solve-router.tasks_per_node=4"])
    assert shared.exit_code == 2  # four ranks on the config's one GPU: refused before anything runs
    assert "more ranks than GPUs on a node: tasks_per_node 4 with gpus 1" in shared.output
    dry = CliRunner().invoke(main, ["submit", str(config), "--dry-run",
                                    "--set", "executor.stages.solve-router.tasks_per_node=2"])
    assert dry.exit_code == 0, dry.output
    solve = dry.output[dry.output.index("[solve-router"):]
    assert "--ntasks-per-node=2" in solve.splitlines()[2]
    bad = CliRunner().invoke(main, ["submit", str(config), "--dry-run",
                                    "--set", "executor.stages.compute-statistics.tasks_per_node=2"])
    assert bad.exit_code == 2
    assert "executor.stages.compute-statistics: nodes 1 x tasks_per_node 2" in bad.output


def test_solve_inputs_are_widened_once_when_that_fits_and_kept_as_stored_otherwise():
    from harc_hpc.stages.solve_router import choose_residency, resident_bytes

    n, d, k, chunk = 1_000_000, 2048, 64, 8192
    wide = resident_bytes(n, d, k, "bfloat16", "float32", None, chunk, keep_stored=False)
    narrow = resident_bytes(n, d, k, "bfloat16", "float32", None, chunk, keep_stored=True)
    assert wide == n * d * 4 + n * k * 4 and narrow == n * d * 2 + n * k * 4 + chunk * d * 4
    assert choose_residency(n, d, k, "bfloat16", "float32", None, chunk, budget=wide) == (False, wide)
    assert choose_residency(n, d, k, "bfloat16", "float32", None, chunk, budget=wide - 1) == (True, narrow)
    # mixed precision in the stored dtype: one bfloat16 copy serves both operators, whatever the budget
    keep, need = choose_residency(n, d, k, "bfloat16", "float32", "bfloat16", chunk, budget=10 * wide)
    assert keep and need == narrow + n * k * 4
    # float32 stored, float32 compute: nothing to narrow
    assert choose_residency(n, d, k, "float32", "float32", None, chunk, budget=1)[0] is False
