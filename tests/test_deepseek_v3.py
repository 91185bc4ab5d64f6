"""DeepSeek-V3-style routers (sigmoid scores, selection-only correction bias, grouped top-k, shared
experts, a dense first layer), end to end: merge -> capture -> statistics -> solve -> assemble ->
load with transformers -> finite logits; the diagnostics' selection rule is the model's own."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from harc_hpc.config import load_config
from harc_hpc.models.families import family_for_config
from harc_hpc.stages import assemble_model, capture_activations, compute_statistics, layout, merge_experts
from harc_hpc.stages import solve_router as solve_router_stage
from harc_hpc.stages.compute_statistics import layer_inputs
from pipeline_fixtures import build_tiny_sources, run_pipeline, tiny_config, write_config


FAMILIES = ("deepseek_v3", "glm4_moe")


@pytest.mark.parametrize("family", FAMILIES)
def test_selection_rule_matches_the_transformers_router(family):
    """Groups, the correction bias and top-k chosen exactly as the transformers router chooses them."""
    from transformers import AutoModelForCausalLM

    conf = tiny_config(family, layers=3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf).eval()
    fam = family_for_config(conf.to_dict())
    assert fam.name == family and fam.moe_layers(conf.to_dict()) == [1, 2]
    router = model.model.layers[1].mlp.gate
    with torch.no_grad():
        router.weight.normal_(0, 1.0)
        router.e_score_correction_bias.copy_(0.3 * torch.randn(router.weight.shape[0]))
    x = torch.randn(500, conf.hidden_size)
    with torch.no_grad():
        logits, _, idx = router(x)
    want = torch.zeros(logits.shape, dtype=torch.bool).scatter_(1, idx, True)
    got = fam.selection_mask(conf.to_dict(), x @ router.weight.T, router.e_score_correction_bias)
    assert torch.equal(got, want)
    # the report's router logits are the module's own
    from harc_hpc.report.metrics import affine_logits, router_matrix

    assert torch.allclose(affine_logits(x, router_matrix(router)), logits, atol=1e-6)
    # without the bias (or the groups) the choice differs somewhere: the rule is not plain top-k
    plain = fam.__class__.__mro__[1].selection_mask(fam, conf.to_dict(), x @ router.weight.T, None)
    assert not torch.equal(plain, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_end_to_end(tmp_path, family):
    from transformers import AutoModelForCausalLM

    src = build_tiny_sources(tmp_path / "src", family=family, layers=3)
    cfg = load_config(write_config(tmp_path, src, harc={"dtype": "float64"}, extra={"report.enabled": True}))
    run = cfg.run_dir
    assert layout.moe_layers(cfg) == [1, 2]  # the first layer is dense
    run_pipeline(cfg, run)
    model = AutoModelForCausalLM.from_pretrained(str(layout.model_dir(run))).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(layout.merged_dir(run))).eval()
    for l in layout.moe_layers(cfg):
        rep = json.loads(layout.router_report(run, l).read_text())
        assert rep["link"] == "sigmoid" and rep["converged"]
        # the fitted gates are closer to each source's, in the sigmoid gates' own (Bernoulli) KL
        assert sum(rep["kl_after"].values()) < sum(rep["kl_before"].values()), rep
        w = load_file(str(layout.router_file(run, l)))["weight"]
        assert torch.allclose(model.model.layers[l].mlp.gate.weight.detach(), w.to(torch.float32))
        # the selection-only bias is carried over from the merge, never fitted
        assert torch.equal(model.model.layers[l].mlp.gate.e_score_correction_bias,
                           merged.model.layers[l].mlp.gate.e_score_correction_bias)
        # top-k mismatch of the merged router, by the model's own selection rule on the stored inputs
        result = compute_statistics.run(cfg, run, layer=l, task="math")
        x = layer_inputs(cfg, run, l, "math").load()  # harc.dtype float64
        conf = layout.reference_config(cfg)
        fam = layout.family(cfg)
        src_model = AutoModelForCausalLM.from_pretrained(str(src["math"])).eval()
        sg, mg = src_model.model.layers[l].mlp.gate, merged.model.layers[l].mlp.gate
        a = fam.selection_mask(conf, x @ sg.weight.double().T, sg.e_score_correction_bias)
        b = fam.selection_mask(conf, x @ mg.weight.double().T, mg.e_score_correction_bias)
        want = 1 - float((a & b).sum()) / (fam.top_k(conf) * x.shape[0])
        assert abs(result["topk_mismatch_merged"] - want) < 1e-12, (result, want)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 3, 7]])).logits
    assert torch.isfinite(logits).all()

    # the report measures the sigmoid router in its own terms: Bernoulli KL, the model's selection rule
    from harc_hpc.stages import report

    report.run(cfg, run)
    m = json.loads((run / "report" / "metrics.json").read_text())
    assert m["family"] == family and m["link"] == "sigmoid"
    rl = m["summary"]["router_level"]
    assert rl["calibrated"]["kl_mean"] < rl["merged"]["kl_mean"], rl
    for name in ("merged", "calibrated"):
        assert 0.0 <= rl[name]["topk_mismatch_mean"] <= 1.0


def test_report_divergence_uses_the_bernoulli_kl_and_the_given_selection():
    from harc_hpc.math.metrics import bernoulli_kl_sum
    from harc_hpc.report.metrics import routing_divergence

    conf = tiny_config("deepseek_v3", layers=3).to_dict()
    fam = family_for_config(conf)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    bias_a, bias_b = 0.5 * torch.randn(8, generator=g), 0.5 * torch.randn(8, generator=g)
    sa = lambda z: fam.selection_mask(conf, z, bias_a)  # noqa: E731
    sb = lambda z: fam.selection_mask(conf, z, bias_b)  # noqa: E731
    kl, miss = routing_divergence(a, b, 2, link="sigmoid", select_ref=sa, select=sb)
    assert abs(kl - bernoulli_kl_sum(a.double(), b.double()) / 50) < 1e-12
    assert abs(miss - (1 - float((sa(a.double()) & sb(b.double())).sum()) / 100)) < 1e-12


def test_a_quantized_checkpoint_of_an_unread_method_is_refused_not_merged_as_stored(tmp_path):
    """FP8 blocks are dequantized on read (tests/test_quantized_inputs.py); a method the reader does
    not dequantize is refused by name: merged as stored it would be wrong."""
    from harc_hpc.io.checkpoint import Checkpoint
    from harc_hpc.io.quantized import QuantizedFormatError

    src = build_tiny_sources(tmp_path / "src", family="deepseek_v3", layers=2)
    conf = json.loads((src["math"] / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src["math"] / "config.json").write_text(json.dumps(conf))
    with pytest.raises(QuantizedFormatError, match="quant_method 'gptq' is not supported.*dequantize it to bfloat16 first"):
        Checkpoint(src["math"])


def test_kimi_k2_checkpoints_are_the_deepseek_v3_family():
    conf = {**tiny_config("deepseek_v3", layers=3).to_dict(), "model_type": "kimi_k2"}
    fam = family_for_config(conf)
    assert fam.name == "deepseek_v3" and fam.router_link == "sigmoid" and fam.moe_layers(conf) == [1, 2]
