"""harc.shared_expert_gate: Qwen2-MoE's sigmoid shared-expert gate calibrated with its router, end to end
(merge -> capture -> statistics -> solve -> assemble -> load with transformers -> finite logits)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from harc_hpc.config import load_config
from harc_hpc.errors import UsageError

from harc_hpc.math import solve_router
from harc_hpc.stages import assemble_model, capture_activations, compute_statistics, layout, merge_experts
from harc_hpc.stages import solve_router as solve_router_stage
from harc_hpc.stages.compute_statistics import layer_inputs
from harc_hpc.stages.routers import merged_shared_expert_gate, source_shared_expert_gate
from pipeline_fixtures import build_tiny_sources, run_pipeline, write_config


@pytest.fixture(scope="module")
def qwen2_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2-gate")
    return root, build_tiny_sources(root / "src", family="qwen2_moe", layers=2)


def test_shared_expert_gates_are_calibrated_and_assembled(qwen2_sources):
    from transformers import AutoModelForCausalLM

    root, src = qwen2_sources
    cfg = load_config(write_config(root, src, name="gate", harc={"shared_expert_gate": True, "dtype": "float64"}))
    run = cfg.run_dir
    run_pipeline(cfg, run)
    model = AutoModelForCausalLM.from_pretrained(str(layout.model_dir(run))).eval()
    for l in layout.moe_layers(cfg):
        saved = load_file(str(layout.router_file(run, l)))
        gate = saved["shared_expert_gate"].double()
        report = json.loads(layout.router_report(run, l).read_text())["shared_expert_gate"]
        assert report["converged"]
        # the same fit from the stored inputs, solved densely here: the stage solved what it says
        xs = [layer_inputs(cfg, run, l, t).load()  # harc.dtype float64
              for t in cfg.task_names]
        ref = solve_router(xs, [source_shared_expert_gate(cfg, t, l).double() for t in cfg.task_names],
                           merged_shared_expert_gate(cfg, run, l).double(), alpha=cfg.harc.alpha,
                           solver="direct", link="sigmoid")
        assert float((gate - ref.weight).norm() / ref.weight.norm()) < 1e-6, l
        merged = merged_shared_expert_gate(cfg, run, l).double()
        assert float((gate - merged).norm()) > 1e-3  # it moved
        assert sum(report["kl_after"].values()) < sum(report["kl_before"].values()), report
        # assembled into the final model, which transformers loads and runs
        in_model = model.model.layers[l].mlp.shared_expert_gate.weight.detach().double()
        assert torch.allclose(in_model, gate.to(in_model.dtype), atol=1e-6)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 3]])).logits
    assert torch.isfinite(logits).all()


def test_without_the_option_the_gate_is_left_as_merged(qwen2_sources):
    root, src = qwen2_sources
    cfg = load_config(write_config(root, src, name="nogate"))
    run = cfg.run_dir
    run_pipeline(cfg, run)
    for l in layout.moe_layers(cfg):
        assert "shared_expert_gate" not in load_file(str(layout.router_file(run, l)))
        assert "shared_expert_gate" not in json.loads(layout.router_report(run, l).read_text())


def test_a_family_without_a_shared_expert_gate_is_a_config_error(tmp_path):
    src = build_tiny_sources(tmp_path / "src", family="olmoe", layers=1)
    cfg = load_config(write_config(tmp_path, src, harc={"shared_expert_gate": True}))
    run = cfg.run_dir
    merge_experts.run(cfg, run)
    capture_activations.run(cfg, run, block=0)
    for t in cfg.task_names:
        compute_statistics.run(cfg, run, layer=0, task=t)
    with pytest.raises(UsageError, match="harc.shared_expert_gate: the olmoe family has no sigmoid shared-expert gate"):
        solve_router_stage.run(cfg, run, layer=0)
    assert not layout.router_file(run, 0).exists()
