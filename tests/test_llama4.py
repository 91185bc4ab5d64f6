"""Llama 4 text models: the sigmoid top-k router under ``feed_forward``, fused (E, in, out) experts and
a shared expert, end to end: merge -> capture -> statistics -> solve -> assemble -> load with
transformers -> finite logits, and the report in the router's own terms."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from harc_hpc.config import load_config
from harc_hpc.models.families import family_for_config
from harc_hpc.stages import assemble_model, capture_activations, compute_statistics, layout, merge_experts, report
from harc_hpc.stages import solve_router as solve_router_stage
from pipeline_fixtures import build_tiny_sources, run_pipeline, tiny_config, write_config


def test_the_router_is_found_and_selects_as_the_model_does():
    from transformers import AutoModelForCausalLM

    conf = tiny_config("llama4_text", layers=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf).eval()
    fam = family_for_config(conf.to_dict())
    assert fam.name == "llama4_text" and fam.moe_layers(conf.to_dict()) == [0, 1]
    router = fam.router_module(model, 1)
    x = torch.randn(200, conf.hidden_size)
    with torch.no_grad():
        scores, logits = router(x)
    want = scores > 0  # the chosen experts get sigmoid(logit) > 0, the others exactly 0
    assert torch.equal(fam.selection_mask(conf.to_dict(), logits, None), want)
    from harc_hpc.report.metrics import affine_logits, router_matrix

    assert torch.allclose(affine_logits(x, router_matrix(router)), logits, atol=1e-6)


def test_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM

    src = build_tiny_sources(tmp_path / "src", family="llama4_text", layers=2)
    cfg = load_config(write_config(tmp_path, src, harc={"dtype": "float64"}, extra={"report.enabled": True}))
    run = cfg.run_dir
    run_pipeline(cfg, run)
    model = AutoModelForCausalLM.from_pretrained(str(layout.model_dir(run))).eval()
    for l in layout.moe_layers(cfg):
        rep = json.loads(layout.router_report(run, l).read_text())
        assert rep["link"] == "sigmoid" and rep["converged"]
        assert sum(rep["kl_after"].values()) < sum(rep["kl_before"].values()), rep
        w = load_file(str(layout.router_file(run, l)))["weight"]
        assert torch.allclose(model.model.layers[l].feed_forward.router.weight.detach(), w)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 3, 7]])).logits
    assert torch.isfinite(logits).all()
    report.run(cfg, run)
    m = json.loads((run / "report" / "metrics.json").read_text())
    assert m["family"] == "llama4_text" and m["link"] == "sigmoid"
    rl = m["summary"]["router_level"]
    assert rl["calibrated"]["kl_mean"] < rl["merged"]["kl_mean"], rl
