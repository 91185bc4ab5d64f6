"""MoE model types beyond the first eight, run by the model's own code (harc_hpc.models.onload): for
each, the layer-wise forward against the whole model (router inputs and logits bit for bit on CPU),
then the whole pipeline (merge, capture, statistics, solve, assemble) on tiny random sources: the
assembled model loads with AutoModelForCausalLM, gives finite logits, and its calibrated routers are
closer to the sources than the merged ones."""

from __future__ import annotations

import json

import pytest
import torch

from harc_hpc.config import load_config
from harc_hpc.models.families import family_for_config
from harc_hpc.models.modeling import RouterInputRecorder, load_causal_lm
from harc_hpc.models.onload import OnloadedModel
from harc_hpc.stages import layout
from pipeline_fixtures import EXTRA_TINY_CONFIGS, build_tiny_sources, run_pipeline, tiny_config, write_config


def _config(model_type: str, kw):
    """A tiny config builder of ``model_type``: the shared small sizes, and ``kw(layers, hidden,
    experts, top_k)``, the type's own keys."""
    def build(layers, hidden, experts, top_k, common):
        from transformers import CONFIG_MAPPING

        return CONFIG_MAPPING[model_type](**{**common, **kw(layers, hidden, experts, top_k)})
    return build


EXTRA_TINY_CONFIGS.update({
    "flex_olmo": _config("flex_olmo", kw=lambda L, h, E, k: dict(num_experts=E, num_experts_per_tok=k)),
    "hunyuan_v1_moe": _config("hunyuan_v1_moe", kw=lambda L, h, E, k: dict(
        num_experts=E, moe_topk=k, head_dim=h // 4)),
    "granitemoe": _config("granitemoe", kw=lambda L, h, E, k: dict(
        num_local_experts=E, num_experts_per_tok=k, residual_multiplier=0.5, embedding_multiplier=2.0,
        logits_scaling=4.0)),
    "ernie4_5_moe": _config("ernie4_5_moe", kw=lambda L, h, E, k: dict(
        moe_num_experts=E, moe_k=k, moe_intermediate_size=h, moe_layer_start_index=0,
        moe_layer_end_index=L - 1, moe_num_shared_experts=1, head_dim=h // 4)),
    "aria_text": _config("aria_text", kw=lambda L, h, E, k: dict(
        moe_num_experts=E, moe_topk=k, moe_num_shared_experts=1, head_dim=h // 4)),
    "qwen3_5_moe_text": _config("qwen3_5_moe_text", kw=lambda L, h, E, k: dict(
        num_experts=E, num_experts_per_tok=k, moe_intermediate_size=h, shared_expert_intermediate_size=h,
        head_dim=h // 4, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, layer_types=(["linear_attention", "full_attention"] * L)[:L])),
    "mellum": _config("mellum", kw=lambda L, h, E, k: dict(num_local_experts=E, num_experts_per_tok=k, head_dim=h // 4)),
    "minimax": _config("minimax", kw=lambda L, h, E, k: dict(
        num_local_experts=E, num_experts_per_tok=k, head_dim=h // 4,
        layer_types=(["linear_attention", "full_attention"] * L)[:L])),
    "granitemoehybrid": _config("granitemoehybrid", kw=lambda L, h, E, k: dict(
        num_local_experts=E, num_experts_per_tok=k, shared_intermediate_size=h, residual_multiplier=0.5,
        layer_types=(["mamba", "attention"] * L)[:L], mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1,
        mamba_d_state=16, mamba_expand=2)),
    "deepseek_v2": _config("deepseek_v2", kw=lambda L, h, E, k: dict(
        n_routed_experts=2 * E, num_experts_per_tok=k, n_shared_experts=1, moe_intermediate_size=h,
        num_key_value_heads=4, topk_method="group_limited_greedy", n_group=2, topk_group=1,
        first_k_dense_replace=1 if L > 2 else 0)),
    "jamba": _config("jamba", kw=lambda L, h, E, k: dict(
        num_experts=E, num_experts_per_tok=k, attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=1,
        expert_layer_period=2, use_mamba_kernels=False)),
    "cohere2_moe": _config("cohere2_moe", kw=lambda L, h, E, k: dict(
        num_experts=E, num_experts_per_tok=k, head_dim=h // 4, layer_types=(["sliding_attention", "full_attention"] * L)[:L],
        mlp_layer_types=["sparse"] * L)),
    "granitemoe_swa": _config("granitemoe_swa", kw=lambda L, h, E, k: dict(
        num_local_experts=E, num_experts_per_tok=k, head_dim=h // 4, residual_multiplier=0.5,
        layer_types=(["full_attention", "sliding_attention"] * L)[:L])),
    "minimax_m3_vl_text": _config("minimax_m3_vl_text", kw=lambda L, h, E, k: dict(
        num_local_experts=E, num_experts_per_tok=k, head_dim=h // 4, mlp_layer_types=["sparse"] * L,
        layer_types=["full_attention"] * L)),
    "granitemoeshared": _config("granitemoeshared", kw=lambda L, h, E, k: dict(
        num_local_experts=E, num_experts_per_tok=k, shared_intermediate_size=h, residual_multiplier=0.5)),
    "lfm2_moe": _config("lfm2_moe", kw=lambda L, h, E, k: dict(
        num_experts=E, num_experts_per_tok=k, moe_intermediate_size=h, num_dense_layers=1 if L > 2 else 0,
        layer_types=(["conv", "full_attention"] * L)[:L])),
    "flint": _config("flint", kw=lambda L, h, E, k: dict(
        num_experts=E, num_experts_per_tok=k, moe_intermediate_size=h, shared_expert_intermediate_size=h,
        head_dim=h // 4, mlp_only_layers=[], layer_types=(["full_attention", "sliding_attention"] * L)[:L])),
    "kolibri1": _config("kolibri1", kw=lambda L, h, E, k: dict(
        num_local_experts=E, num_experts_per_tok=k, moe_intermediate_size=h, head_dim=h // 4,
        layer_types=(["sliding_attention", "full_attention"] * L)[:L])),
    "phimoe": _config("phimoe", kw=lambda L, h, E, k: dict(num_local_experts=E, num_experts_per_tok=k)),
    "gemma4_text": _config("gemma4_text", kw=lambda L, h, E, k: dict(
        enable_moe_block=True, num_experts=E, top_k_experts=k, moe_intermediate_size=h, head_dim=h // 4,
        hidden_size_per_layer_input=0, layer_types=(["sliding_attention", "full_attention"] * L)[:L], sliding_window=4)),
    "nemotron_h": _config("nemotron_h", kw=lambda L, h, E, k: dict(
        n_routed_experts=E, num_experts_per_tok=k, moe_intermediate_size=h, moe_shared_expert_intermediate_size=h,
        head_dim=h // 4, layers_block_type=(["attention", "moe", "mamba", "moe"] * L)[:L], mamba_num_heads=4,
        mamba_head_dim=16, n_groups=1, ssm_state_size=16, chunk_size=16)),
})


# model type -> what makes it new to the layer-wise forward
NEW_TYPES = {
    "qwen3_next": "gated linear attention beside full attention (layer_types); shared expert",
    "flex_olmo": "post-norm layers (captured layer-wise)",
    "hunyuan_v1_moe": "router at mlp.gate.wg; shared MLP; query/key norms",
    "granitemoe": "renamed fused experts; top-k-then-softmax router; residual, embedding and logit multipliers",
    "ernie4_5_moe": "softmax router whose choice adds a correction bias; renamed bias; shared experts",
    "aria_text": "renamed fused experts (fc1/fc2); top-k-then-softmax router; shared experts",
    "qwen3_5_moe_text": "Qwen3.5's text model: gated linear attention beside full attention; shared expert",
    "mellum": "rotary embeddings per layer type",
    "minimax": "lightning (linear) attention beside full attention; scaled residual branches",
    "granitemoehybrid": "Mamba-2 layers beside attention; Granite's router and multipliers",
    "deepseek_v2": "MLA attention; group-limited greedy choice over softmax scores",
    "jamba": "Mamba layers; MoE every other layer under feed_forward; final_layernorm",
    "cohere2_moe": "top-k-then-softmax router; sliding and full attention; mlp_layer_types",
    "granitemoe_swa": "Granite's router and multipliers with sliding-window attention; eager attention",
    "minimax_m3_vl_text": "sigmoid router with a correction bias; fused experts on disk",
    "granitemoeshared": "Granite-MoE with a shared expert",
    "lfm2_moe": "short-convolution layers beside attention; sigmoid router with an expert bias",
    "flint": "sigmoid router without a bias; sliding and full attention",
    "kolibri1": "biased choice on the logits, sigmoid weights",
    "phimoe": "sparsemixer router (renamed on load), LayerNorm layers",
    "gemma4_text": "a normed, scaled router beside a dense MLP; experts fused on disk; sliding / full attention",
    "nemotron_h": "single-mixer blocks (Mamba-2, attention, MoE); backbone. prefix on disk; un-gated experts",
}


@pytest.mark.parametrize("model_type", sorted(NEW_TYPES))
def test_the_layerwise_forward_is_the_whole_models_bit_for_bit(tmp_path, model_type):
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    conf = tiny_config(model_type, layers=4)
    AutoModelForCausalLM.from_config(conf).save_pretrained(tmp_path / "m")
    fam = family_for_config(json.loads((tmp_path / "m" / "config.json").read_text()))
    whole = load_causal_lm(tmp_path / "m", torch.device("cpu"))
    ids = torch.randint(0, conf.vocab_size, (3, 11))
    layers = fam.moe_layers(conf.to_dict())
    with RouterInputRecorder({l: fam.router_module(whole, l) for l in layers}) as rec:
        with torch.no_grad():
            ref_logits = whole(input_ids=ids).logits
        ref = {l: rec.pop(l) for l in layers}
    om = OnloadedModel(tmp_path / "m", torch.device("cpu"))
    h = om.embed(ids)
    for l in range(om.num_layers):
        om.onload(l)
        if l in layers and not fam.residual_capture:  # captured layer-wise: the router's own input
            with RouterInputRecorder({l: fam.router_module(om.model, l)}) as own:
                full = om.run_layer(l, h)
                assert torch.equal(own.pop(l).reshape(ref[l].shape), ref[l]), f"layer {l}: router inputs"
        else:
            full = om.run_layer(l, h)
        if l in layers and fam.residual_capture:  # captured streamed: split at the residual
            r = om.run_attention_half(l, h)
            x = fam.router_input_norm(om.layer(l))(r)
            assert torch.equal(x.reshape(ref[l].shape), ref[l]), f"layer {l}: router inputs"
            assert torch.equal(om.run_moe_half(l, r), full), f"layer {l}: the two halves != the layer"
        h = full
        om.offload(l)
    assert torch.equal(om.head_logits(h), ref_logits)
    om.close()


@pytest.mark.parametrize("model_type", sorted(NEW_TYPES))
def test_the_whole_pipeline_runs_and_calibrates(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    src = build_tiny_sources(tmp_path / "src", family=model_type, layers=2)
    cfg = load_config(write_config(tmp_path, src, harc={"dtype": "float64"}))
    run = cfg.run_dir
    run_pipeline(cfg, run)
    model = AutoModelForCausalLM.from_pretrained(str(layout.model_dir(run))).eval()
    for l in layout.moe_layers(cfg):
        rep = json.loads(layout.router_report(run, l).read_text())
        assert rep["converged"], rep
        assert sum(rep["kl_after"].values()) < sum(rep["kl_before"].values()), rep
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 3, 7]])).logits
    assert torch.isfinite(logits).all()


def _gemma4_router_with_logits(router):
    """Gemma 4's router returns probabilities, weights and choice: the logits are its ``proj``'s output."""
    def select(x):
        logits = []
        handle = router.proj.register_forward_hook(lambda m, args, out: logits.append(out))
        try:
            _, weights, chosen = router(x)
        finally:
            handle.remove()
        return logits[0], weights, chosen
    return select


# model type -> (the module whose forward returns (logits, weights, chosen experts), its bias or None)
SELECTORS = {
    "qwen3_next": lambda layer: (layer.mlp.gate, None),
    "flex_olmo": lambda layer: (layer.mlp.gate, None),
    "hunyuan_v1_moe": lambda layer: (layer.mlp.gate, None),
    "granitemoe": lambda layer: (layer.block_sparse_moe.router, None),
    "ernie4_5_moe": lambda layer: (layer.mlp.gate, layer.mlp.gate.moe_statics.e_score_correction_bias),
    "aria_text": lambda layer: (layer.mlp.router, None),
    "qwen3_5_moe_text": lambda layer: (layer.mlp.gate, None),
    "mellum": lambda layer: (layer.mlp.gate, None),
    "minimax": lambda layer: (layer.mlp.gate, None),
    "granitemoehybrid": lambda layer: (layer.block_sparse_moe.router, None),
    "deepseek_v2": lambda layer: (layer.mlp.gate, None),
    "jamba": lambda layer: (layer.feed_forward.router, None),
    "cohere2_moe": lambda layer: (layer.mlp.gate, None),
    "granitemoe_swa": lambda layer: (layer.block_sparse_moe.router, None),
    "minimax_m3_vl_text": lambda layer: (layer.mlp.gate, layer.mlp.gate.e_score_correction_bias),
    "granitemoeshared": lambda layer: (layer.block_sparse_moe.router, None),
    "lfm2_moe": lambda layer: (lambda x: layer.feed_forward.gate(x, layer.feed_forward.expert_bias),
                               layer.feed_forward.expert_bias),
    "flint": lambda layer: (layer.mlp.gate, None),
    "kolibri1": lambda layer: (layer.mlp.gate, layer.mlp.gate.e_score_correction_bias),
    "phimoe": lambda layer: (layer.mlp.router, None),
    "gemma4_text": lambda layer: (_gemma4_router_with_logits(layer.router), None),
    "nemotron_h": lambda layer: (layer.mixer.gate, layer.mixer.gate.e_score_correction_bias),
}


@pytest.mark.parametrize("model_type", sorted(NEW_TYPES))
def test_the_declared_selection_is_the_models_own(model_type):
    """The family's selection rule (top-k mismatch, the report) against what the model's router picks,
    on random inputs, with a non-zero correction bias where the router has one."""
    from transformers import AutoModelForCausalLM

    conf = tiny_config(model_type, layers=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf).eval()
    fam = family_for_config(conf.to_dict())
    l = fam.moe_layers(conf.to_dict())[-1]
    selector, bias = SELECTORS[model_type](model.model.layers[l])
    if bias is not None:
        with torch.no_grad():
            bias.copy_(0.3 * torch.randn(bias.shape))
    x = torch.randn(300, conf.hidden_size)
    with torch.no_grad():
        logits, _, chosen = selector(x)
    want = torch.zeros(logits.shape, dtype=torch.bool).scatter_(1, chosen, True)
    got = fam.selection_mask(conf.to_dict(), logits, None if bias is None else bias.detach())
    assert torch.equal(got, want)


# -- the coverage table -----------------------------------------------------------------------------

#: the first eight, each with its own test module (tests/test_<family>.py, the pipeline tests)
FIRST_TYPES = {"olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3", "glm4_moe", "gpt_oss", "llama4_text"}


def test_every_moe_model_type_is_supported_and_tested_or_refused_with_a_reason():
    from harc_hpc.models.coverage import UNSUPPORTED, moe_causal_lm_types
    from harc_hpc.models.families import supported_model_types
    from test_model_coverage_sigmoid import NEW_TYPES as SIGMOID_TYPES
    from test_multimodal_wrappers import WRAPPER_TYPES

    types = set(moe_causal_lm_types())
    assert len(types) >= 60 and {"mixtral", "qwen3_next", "deepseek_v32", "jamba"} <= types
    supported = set(supported_model_types()) & types
    tested = FIRST_TYPES | set(NEW_TYPES) | set(SIGMOID_TYPES) | set(WRAPPER_TYPES)
    assert supported <= tested, f"supported but not covered by a test: {sorted(supported - tested)}"
    unknown = types - supported - {t for t, why in UNSUPPORTED.items() if why}
    assert not unknown, f"MoE model types neither supported nor refused with a reason: {sorted(unknown)}"
    assert not supported & set(UNSUPPORTED), "a type is both supported and refused"


def test_the_docs_table_is_current():
    from pathlib import Path

    from harc_hpc.models.coverage import render

    page = Path(__file__).resolve().parents[1] / "docs" / "models.md"
    assert page.read_text() == render(), "regenerate: python -m harc_hpc.models.coverage --write docs/models.md"


def test_an_unsupported_type_gets_its_reason_and_the_same_exit_code_from_every_command(tmp_path):
    """JetMoE (two routers per layer): plan, a stage run and a submit all stop with the reason from
    docs/models.md and exit 2 (a usage error: the config names a model harc-hpc does not run), and
    nothing is written."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM, JetMoeConfig

    from harc_hpc.cli import main
    from harc_hpc.models.coverage import UNSUPPORTED
    from pipeline_fixtures import char_tokenizer

    torch.manual_seed(0)
    conf = JetMoeConfig(vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                        num_key_value_heads=2, kv_channels=8, num_local_experts=4, num_experts_per_tok=2)
    src = build_tiny_sources(tmp_path / "src", family="olmoe", layers=2)  # for the data files
    for name in ("base", "math", "code"):
        AutoModelForCausalLM.from_config(conf).save_pretrained(src[name])
        char_tokenizer().save_pretrained(src[name])
    config = write_config(tmp_path, src)
    codes = {}
    for args in (["plan", str(config)], ["stage", "merge-experts", str(config)],
                 ["submit", str(config), "--executor", "debug"]):
        out = CliRunner().invoke(main, args)
        codes[args[0]] = out.exit_code
        assert "two routers" in out.output and "docs/models.md" in out.output, out.output
        assert "Traceback" not in out.output
    assert set(codes.values()) == {2}, codes
    assert "two routers" in UNSUPPORTED["jetmoe"]
    run = load_config(config).run_dir
    assert not (run / "merged").exists()


def test_the_readme_names_the_count_of_the_table():
    import re
    from pathlib import Path

    from harc_hpc.models.coverage import coverage_rows

    rows = coverage_rows()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"\((\d+) of the (\d+) MoE model types", readme)
    assert m and (int(m.group(1)), int(m.group(2))) == (sum(r[2] == "yes" for r in rows), len(rows))


def test_gemma4_with_per_layer_inputs_or_shared_kv_is_refused_naming_the_key():
    """Gemma 4's per-layer input embeddings and KV sharing hand layers state from outside them."""
    from harc_hpc.errors import UnsupportedModelError

    cfg = tiny_config("gemma4_text", layers=2).to_dict()
    assert family_for_config(cfg).name == "gemma4_text"
    for key, value in (("hidden_size_per_layer_input", 8), ("num_kv_shared_layers", 1), ("enable_moe_block", False)):
        with pytest.raises(UnsupportedModelError, match=key):
            family_for_config({**cfg, key: value})
