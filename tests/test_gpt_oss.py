"""GPT-OSS: a router with a bias (fitted as [W | b] on [x, 1]), fused (E, in, out) experts with biases,
end to end: merge -> capture -> statistics -> solve -> assemble -> load with transformers -> finite
logits, and the report; MXFP4 checkpoints are refused with a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from harc_hpc.config import load_config
from harc_hpc.errors import HarcHpcError
from harc_hpc.merge.engine import plan_units
from harc_hpc.io.checkpoint import Checkpoint
from harc_hpc.models.families import family_for_config
from harc_hpc.stages import assemble_model, capture_activations, compute_statistics, layout, merge_experts, report
from harc_hpc.stages import solve_router as solve_router_stage
from pipeline_fixtures import build_tiny_sources, tiny_config, write_config


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt-oss")
    return root, build_tiny_sources(root / "src", family="gpt_oss", layers=2)


def run_pipeline(cfg, run_dir):
    merge_experts.run(cfg, run_dir)
    for b, blk in enumerate(layout.blocks(cfg)):
        capture_activations.run(cfg, run_dir, block=b)
        for l in blk:
            for t in cfg.task_names:
                compute_statistics.run(cfg, run_dir, layer=l, task=t)
            solve_router_stage.run(cfg, run_dir, layer=l)
    assemble_model.run(cfg, run_dir)


def test_the_router_and_its_bias_are_fitted_and_assembled(sources):
    from transformers import AutoModelForCausalLM

    root, src = sources
    cfg = load_config(write_config(root, src, name="e2e", harc={"dtype": "float64"}, extra={"report.enabled": True}))
    run = cfg.run_dir
    run_pipeline(cfg, run)
    model = AutoModelForCausalLM.from_pretrained(str(layout.model_dir(run))).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(layout.merged_dir(run))).eval()
    for l in layout.moe_layers(cfg):
        saved = load_file(str(layout.router_file(run, l)))
        rep = json.loads(layout.router_report(run, l).read_text())
        assert rep["converged"] and sum(rep["kl_after"].values()) < sum(rep["kl_before"].values()), rep
        router = model.model.layers[l].mlp.router
        assert torch.allclose(router.weight.detach(), saved["weight"]) and torch.allclose(router.bias.detach(), saved["bias"])
        # the bias moved too: it is part of the fit, not carried over from the merge
        assert float((router.bias - merged.model.layers[l].mlp.router.bias).abs().max()) > 1e-4
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 3, 7]])).logits
    assert torch.isfinite(logits).all()
    report.run(cfg, run)
    m = json.loads((run / "report" / "metrics.json").read_text())
    rl = m["summary"]["router_level"]
    assert m["family"] == "gpt_oss" and rl["calibrated"]["kl_mean"] < rl["merged"]["kl_mean"], rl


def test_wudi_merges_the_in_out_experts_transposed(sources):
    root, src = sources
    fam = family_for_config(json.loads((src["math"] / "config.json").read_text()))
    units = plan_units(Checkpoint(src["math"]), fam, "per_expert")
    experts = [u for u in units if u.role == "expert"]
    assert experts and all(u.transposed for u in experts)
    assert {u.shape for u in experts if "gate_up" in u.name} == {(32, 64)}  # (d, 2I) per expert, whole
    cfg = load_config(write_config(root, src, name="wudi", method="wudi"), {"merge.parameters": {"steps": 5}})
    merge_experts.run(cfg, cfg.run_dir)
    merged = load_file(str(next(layout.merged_dir(cfg.run_dir).glob("*.safetensors"))))
    assert all(torch.isfinite(v).all() for v in merged.values())


def test_an_mxfp4_checkpoint_is_refused_naming_a_tensor(sources, tmp_path):
    root, src = sources
    bad = tmp_path / "mxfp4"
    bad.mkdir()
    state = load_file(str(src["math"] / "model.safetensors"))
    w = state.pop("model.layers.0.mlp.experts.gate_up_proj")
    state["model.layers.0.mlp.experts.gate_up_proj_blocks"] = torch.zeros(w.shape[0], 4, 16, dtype=torch.uint8)
    state["model.layers.0.mlp.experts.gate_up_proj_scales"] = torch.zeros(w.shape[0], 4, dtype=torch.uint8)
    save_file(state, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((src["math"] / "config.json").read_text())
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (bad / f).write_text((src["math"] / f).read_text())
    cfg = load_config(write_config(root, {**src, "math": bad}, name="mxfp4"))
    with pytest.raises(HarcHpcError, match=r"MXFP4 \(model.layers.0.mlp.experts.gate_up_proj_blocks"):
        merge_experts.run(cfg, cfg.run_dir)


def test_the_selection_is_the_top_k_of_the_biased_logits_as_the_model_does():
    from transformers import AutoModelForCausalLM

    conf = tiny_config("gpt_oss", layers=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf).eval()
    fam = family_for_config(conf.to_dict())
    router = fam.router_module(model, 0)
    with torch.no_grad():
        router.bias.copy_(torch.randn(router.bias.shape) * 2.0)  # a bias that changes the choice
        x = torch.randn(300, conf.hidden_size)
        logits, _, idx = router(x)
    want = torch.zeros(logits.shape, dtype=torch.bool).scatter_(1, idx, True)
    # the statistics and the report score [x, 1] against [W | b]: the biased logits
    x1 = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    w1 = torch.cat([router.weight.detach(), router.bias.detach()[:, None]], dim=1)
    assert torch.equal(fam.selection_mask(conf.to_dict(), x1 @ w1.T, None), want)
    assert not torch.equal(fam.selection_mask(conf.to_dict(), x @ router.weight.detach().T, None), want)
