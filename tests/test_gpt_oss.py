"""GPT-OSS: a router with a bias (fitted as [W | b] on [x, 1]), fused (E, in, out) experts with biases,
end to end: merge -> capture -> statistics -> solve -> assemble -> load with transformers -> finite
logits, and the report; MXFP4 checkpoints are refused with a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from harc_hpc.config import load_config
from harc_hpc.merge.engine import plan_units
from harc_hpc.io.checkpoint import Checkpoint
from harc_hpc.models.families import family_for_config
from harc_hpc.stages import assemble_model, capture_activations, compute_statistics, layout, merge_experts, report
from harc_hpc.stages import solve_router as solve_router_stage
from pipeline_fixtures import build_tiny_sources, run_pipeline, tiny_config, write_config


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt-oss")
    return root, build_tiny_sources(root / "src", family="gpt_oss", layers=2)


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


def random_mxfp4(e, rows, cols, gen):
    """Random MXFP4 data as GPT-OSS stores it: blocks (e, rows, cols / 32, 16), scales (e, rows, cols / 32)."""
    blocks = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=gen, dtype=torch.int64).to(torch.uint8)
    scales = torch.randint(118, 123, (e, rows, cols // 32), generator=gen, dtype=torch.int64).to(torch.uint8)
    return blocks, scales


def test_mxfp4_dequantizes_as_transformers_does():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from harc_hpc.io.checkpoint import dequantize_mxfp4

    blocks, scales = random_mxfp4(3, 8, 64, torch.Generator().manual_seed(0))
    ours = dequantize_mxfp4(blocks, scales)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    assert ours.shape == (3, 64, 8) and ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)


def test_an_mxfp4_source_is_read_as_bfloat16_and_merged(sources, tmp_path):
    """The released GPT-OSS format: experts as *_blocks / *_scales and a quantization_config."""
    from transformers import AutoModelForCausalLM

    from harc_hpc.io.checkpoint import dequantize_mxfp4

    root, src = sources
    q = tmp_path / "mxfp4"
    q.mkdir()
    state = load_file(str(src["math"] / "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    expected = {}
    for key in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, cols, rows = state.pop(key).shape  # (E, in, out) in memory; stored (E, out, in / 32, 16)
        blocks, scales = random_mxfp4(e, rows, cols, gen)
        state[key + "_blocks"], state[key + "_scales"] = blocks, scales
        expected[key] = dequantize_mxfp4(blocks, scales)
    save_file(state, str(q / "model.safetensors"))
    conf = json.loads((src["math"] / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["router", "lm_head"]}
    (q / "config.json").write_text(json.dumps(conf))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (q / f).write_text((src["math"] / f).read_text())
    ck = Checkpoint(q)
    for key, want in expected.items():
        assert key in ck.keys() and key + "_blocks" not in ck.keys()
        assert ck.tensor_dtype(key) == torch.bfloat16 and torch.equal(ck.get_tensor(key), want)
        assert ck.is_dequantized(key) and torch.equal(ck.get_tensor(key, device=torch.device("cpu")), want)
        flat = want.reshape(-1)  # one expert read alone, as per-expert merges read them
        assert torch.equal(ck.read_part(key, flat.numel() // 4, flat.numel() // 4), flat[flat.numel() // 4: flat.numel() // 2])
    cfg = load_config(write_config(root, {**src, "math": q}, name="mxfp4"))
    merge_experts.run(cfg, cfg.run_dir)
    merged_dir = layout.merged_dir(cfg.run_dir)
    out_conf = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in out_conf
    record = json.loads((merged_dir / "harc_merge.json").read_text())
    assert sorted(record["dequantized_from_mxfp4"]) == sorted(expected)  # said, not silent
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()  # a plain bfloat16 model
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9]])).logits).all()


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
    from harc_hpc.report.metrics import affine_logits, router_matrix

    assert torch.allclose(affine_logits(x, router_matrix(router)), logits, atol=1e-6)  # the bias included
