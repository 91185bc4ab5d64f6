"""MoE model types whose router is a sigmoid with a selection-only correction bias and (group-limited)
top-k, as DeepSeek-V3's (harc_hpc/models/families/sigmoid_routers.py). Per type: the family's expert
selection is the model's own router's choice on random inputs (with a random correction bias); the
layer-wise forward equals the whole model bit for bit; the whole pipeline runs end to end and its
calibrated routers are closer to the sources than the merged ones (tests/test_model_coverage.py's two
checks, run on the tiny configs registered here)."""

from __future__ import annotations

import pytest
import torch

import pipeline_fixtures
import test_model_coverage as cov
from harc_hpc.models.families import family_for_config
from pipeline_fixtures import tiny_config


# -- tiny configs (2 layers, hidden 32, 4 or 8 experts in 2 groups where the router groups) ---------------

def _mla() -> dict:
    return dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def _sparse(layers: int) -> list[str]:
    """A dense first layer where there are more than two layers, MoE layers after it."""
    return (["dense"] if layers > 2 else []) + ["sparse"] * (layers - (1 if layers > 2 else 0))


def _glm4_moe_lite(layers, hidden, experts, top_k, common):
    from transformers import Glm4MoeLiteConfig

    common = {**common, "num_key_value_heads": 4}
    return Glm4MoeLiteConfig(n_routed_experts=experts, num_experts_per_tok=top_k, n_group=2, topk_group=1,
                             n_shared_experts=1, moe_intermediate_size=hidden, mlp_layer_types=_sparse(layers),
                             **_mla(), **common)


def _deepseek_v32(layers, hidden, experts, top_k, common):
    from transformers import DeepseekV32Config

    common = {**common, "num_key_value_heads": 4}
    return DeepseekV32Config(n_routed_experts=experts, num_experts_per_tok=top_k, n_group=2, topk_group=1,
                             n_shared_experts=1, moe_intermediate_size=hidden, mlp_layer_types=_sparse(layers),
                             index_topk=4, index_head_dim=16, index_n_heads=2, **_mla(), **common)


def _glm_moe_dsa(layers, hidden, experts, top_k, common):
    from transformers import GlmMoeDsaConfig

    common = {**common, "num_key_value_heads": 4}
    return GlmMoeDsaConfig(n_routed_experts=experts, num_experts_per_tok=top_k, n_group=2, topk_group=1,
                           n_shared_experts=1, moe_intermediate_size=hidden, mlp_layer_types=_sparse(layers),
                           index_topk=4, index_head_dim=16, index_n_heads=2, **_mla(), **common)


def _minimax_m2(layers, hidden, experts, top_k, common):
    from transformers import MiniMaxM2Config

    return MiniMaxM2Config(num_local_experts=experts, num_experts_per_tok=top_k, head_dim=hidden // 4, **common)


def _solar_open(layers, hidden, experts, top_k, common):
    from transformers import SolarOpenConfig

    common = {k: v for k, v in common.items() if k != "intermediate_size"}
    return SolarOpenConfig(n_routed_experts=experts, num_experts_per_tok=top_k, n_group=2, topk_group=1,
                           n_shared_experts=1, moe_intermediate_size=hidden, head_dim=hidden // 4, **common)


def _dots1(layers, hidden, experts, top_k, common):
    from transformers import Dots1Config

    return Dots1Config(n_routed_experts=experts, num_experts_per_tok=top_k, n_group=2, topk_group=1,
                       n_shared_experts=1, moe_intermediate_size=hidden, first_k_dense_replace=1 if layers > 2 else 0,
                       head_dim=hidden // 4, **common)


def _mimo_v2_flash(layers, hidden, experts, top_k, common):
    from transformers import MiMoV2FlashConfig

    return MiMoV2FlashConfig(n_routed_experts=experts, num_experts_per_tok=top_k, n_group=2, topk_group=1,
                             moe_intermediate_size=hidden, mlp_layer_types=_sparse(layers), head_dim=hidden // 4,
                             v_head_dim=hidden // 8, sliding_window=4,
                             layer_types=(["full_attention", "sliding_attention"] * layers)[:layers], **common)


def _afmoe(layers, hidden, experts, top_k, common):
    from transformers import AfmoeConfig

    return AfmoeConfig(num_experts=experts, num_experts_per_tok=top_k, num_shared_experts=1,
                       num_dense_layers=1 if layers > 2 else 0, moe_intermediate_size=hidden, head_dim=hidden // 4,
                       global_attn_every_n_layers=2, sliding_window=4, **common)


def _hy_v3(layers, hidden, experts, top_k, common):
    from transformers import HYV3Config

    return HYV3Config(num_experts=experts, num_experts_per_tok=top_k, num_shared_experts=1,
                      moe_intermediate_size=hidden, mlp_layer_types=_sparse(layers), head_dim=hidden // 4, **common)


def _exaone_moe(layers, hidden, experts, top_k, common):
    from transformers import ExaoneMoeConfig

    return ExaoneMoeConfig(num_experts=experts, num_experts_per_tok=top_k, n_group=2, topk_group=1,
                           num_shared_experts=1, moe_intermediate_size=hidden, mlp_layer_types=_sparse(layers),
                           sliding_window=4, sliding_window_pattern=2, head_dim=hidden // 4, **common)


def _minicpm5_moe(layers, hidden, experts, top_k, common):
    from transformers import MiniCPM5MoeConfig

    return MiniCPM5MoeConfig(n_routed_experts=experts, num_experts_per_tok=top_k, n_group=2, topk_group=1,
                             n_shared_experts=1, moe_intermediate_size=hidden, mlp_layer_types=_sparse(layers),
                             head_dim=hidden // 4, **common)


def _kimi_linear(layers, hidden, experts, top_k, common):
    from transformers import KimiLinearConfig

    common = {**common, "num_key_value_heads": 4}
    return KimiLinearConfig(num_local_experts=experts, num_experts_per_tok=top_k, num_expert_group=2, topk_group=1,
                            n_shared_experts=1, moe_intermediate_size=hidden, mlp_layer_types=_sparse(layers),
                            q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                            linear_head_dim=8, linear_num_heads=4,
                            layer_types=(["linear_attention", "full_attention"] * layers)[:layers], **common)


def _laguna(layers, hidden, experts, top_k, common, softcap=0.0):
    from transformers import LagunaConfig

    return LagunaConfig(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=hidden,
                        shared_expert_intermediate_size=hidden, head_dim=hidden // 4, mlp_layer_types=_sparse(layers),
                        moe_router_logit_softcapping=softcap, **common)


TINY = {
    "glm4_moe_lite": _glm4_moe_lite,
    "deepseek_v32": _deepseek_v32,
    "glm_moe_dsa": _glm_moe_dsa,
    "minimax_m2": _minimax_m2,
    "solar_open": _solar_open,
    "dots1": _dots1,
    "mimo_v2_flash": _mimo_v2_flash,
    "afmoe": _afmoe,
    "hy_v3": _hy_v3,
    "exaone_moe": _exaone_moe,
    "minicpm5_moe": _minicpm5_moe,
    "kimi_linear": _kimi_linear,
    "laguna": _laguna,
}
pipeline_fixtures.EXTRA_TINY_CONFIGS.update(TINY)

# model type -> what makes it new
NEW_TYPES = {
    "glm4_moe_lite": "MLA attention, grouped biased sigmoid router, MoE layers from mlp_layer_types",
    "deepseek_v32": "indexed (sparse) attention: the indexer runs inside the layer's own forward",
    "solar_open": "every layer MoE with shared experts, grouped biased sigmoid router",
    "dots1": "sliding / full attention (layer_types), grouped biased sigmoid router",
    "minimax_m2": "Mixtral's on-disk layout, the correction bias beside the router, no groups",
    "afmoe": "router under mlp.router.gate, bias mlp.expert_bias, norms on both sides of each half",
    "mimo_v2_flash": "attention sinks (eager attention), sliding / full attention, no shared experts",
    "exaone_moe": "the correction bias renamed on load (conversion mapping), sliding / full attention",
    "minicpm5_moe": "a gated query projection renamed on load (conversion mapping)",
    "hy_v3": "router, bias and shared experts renamed on load (conversion mapping), no groups",
    "glm_moe_dsa": "indexed attention whose layers return the indexer's top-k beside the hidden state",
    "laguna": "the correction bias beside the experts on disk, renamed on load; gated attention output",
    "kimi_linear": "KDA linear attention beside MLA; Mixtral's layout renamed on load; Kimi's config keys",
}

# the submodule of the MoE block whose forward returns (router logits, top-k weights, top-k indices):
# the model's own choice
_CHOOSER = {"afmoe": "router"}


def _model(model_type: str, layers: int = 2, experts: int = 4):
    from transformers import AutoModelForCausalLM

    conf = tiny_config(model_type, layers=layers, experts=experts)
    torch.manual_seed(0)
    return conf, AutoModelForCausalLM.from_config(conf).eval()


@pytest.mark.parametrize("model_type", sorted(NEW_TYPES))
def test_the_selection_is_the_model_routers_own(tmp_path, model_type):
    """The family's expert choice (the correction bias, the groups, top-k) equals what the model's own
    router module chooses; the router, its bias and the experts are where the family says on disk."""
    from safetensors import safe_open

    from harc_hpc.report.metrics import affine_logits, router_matrix

    # a dense first layer where the type has one; 8 experts: two groups of four
    conf, model = _model(model_type, layers=3, experts=8)
    cfg = conf.to_dict()
    fam = family_for_config(cfg)
    assert fam.name == model_type and fam.router_link == "sigmoid"
    layers = fam.moe_layers(cfg)

    def has_router(l):
        try:
            return fam.router_module(model, l) is not None
        except ValueError:
            return False

    assert layers and layers == [l for l in range(conf.num_hidden_layers) if has_router(l)], cfg
    block = fam.decoder_layers(model)[layers[-1]]
    router = fam.router_module(model, layers[-1])
    bias = next(t for n, t in [*block.mlp.named_parameters(), *block.mlp.named_buffers()]
                if n.endswith(("e_score_correction_bias", "expert_bias")))
    with torch.no_grad():
        router.weight.normal_(0, 1.0)
        bias.copy_(0.3 * torch.randn(bias.shape))
    chosen = []
    handle = block.mlp.get_submodule(_CHOOSER.get(model_type, "gate")).register_forward_hook(
        lambda m, args, out: chosen.append(out))
    x = torch.randn(1, 500, conf.hidden_size)
    try:
        with torch.no_grad():
            block.mlp(x)
    finally:
        handle.remove()
    logits, _, idx = chosen[0]
    want = torch.zeros(logits.shape, dtype=torch.bool).scatter_(1, idx, True)
    ours = affine_logits(x[0], router_matrix(router))
    assert torch.allclose(ours, logits, atol=1e-6)
    assert torch.equal(fam.selection_mask(cfg, ours, bias.detach()), want)
    # without the bias the choice differs somewhere: the rule is not plain top-k
    assert not torch.equal(fam.selection_mask(cfg, ours, None), want)

    model.save_pretrained(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert fam.detect_layout(keys) == "per_expert"
    assert sorted(k for k in keys if fam.is_router_disk_key(k)) == sorted(fam.router_disk_key(l) for l in layers)
    E = fam.num_experts(cfg)
    for l in layers:
        assert fam.find_router_disk_key(l, keys) == fam.router_disk_key(l)
        assert fam.router_bias_key(l) in keys
        assert {fam.expert_key(l, e, p) for e in range(E) for p in ("gate", "up", "down")} <= keys
    parsed = [fam.parse_expert_key(k) for k in keys]
    assert sum(p is not None for p in parsed) == 3 * E * len(layers)


def _random_routers_at_init(monkeypatch, model_type: str) -> None:
    """AFMoE initialises its routers to zero, and the tiny sources' router noise is relative to the
    router's spread: draw them at random instead, as a trained model's are."""
    if model_type != "afmoe":
        return
    from transformers.models.afmoe import modeling_afmoe as m

    init_weights = m.AfmoePreTrainedModel._init_weights

    def _init_weights(self, module):
        init_weights(self, module)
        if isinstance(module, m.AfmoeTokenChoiceRouter):
            torch.nn.init.normal_(module.gate.weight, std=self.config.initializer_range)

    monkeypatch.setattr(m.AfmoePreTrainedModel, "_init_weights", _init_weights)


@pytest.mark.parametrize("model_type", sorted(NEW_TYPES))
def test_the_layerwise_forward_is_the_whole_models_bit_for_bit(tmp_path, monkeypatch, model_type):
    _random_routers_at_init(monkeypatch, model_type)
    cov.test_the_layerwise_forward_is_the_whole_models_bit_for_bit(tmp_path, model_type)


@pytest.mark.parametrize("model_type", sorted(NEW_TYPES))
def test_the_whole_pipeline_runs_and_calibrates(tmp_path, monkeypatch, model_type):
    _random_routers_at_init(monkeypatch, model_type)
    cov.test_the_whole_pipeline_runs_and_calibrates(tmp_path, model_type)


def test_glm5_with_shared_indexers_is_refused_naming_the_layers():
    """A shared indexer reuses the previous layer's top-k: state across layers, refused with a reason."""
    from harc_hpc.errors import UnsupportedModelError

    cfg = tiny_config("glm_moe_dsa", layers=3).to_dict()
    assert family_for_config(cfg).name == "glm_moe_dsa"
    cfg["indexer_types"] = ["full", "shared", "full"]
    with pytest.raises(UnsupportedModelError, match=r"indexer_types.*layers \[1\].*previous layer's top-k"):
        family_for_config(cfg)


def test_a_soft_capped_router_is_calibrated_with_the_generic_objective(tmp_path):
    """Laguna with moe_router_logit_softcapping > 0: the gates are sigmoid(c tanh(z / c)), which no
    closed-form curvature fits. The family's selection is the model router's own; the solve uses the
    generic (autograd Gauss-Newton) objective on those exact gates; the assembled model loads and
    its routers are closer to the sources than the merged ones under the capped gates' KL."""
    import json
    from functools import partial

    from transformers import AutoModelForCausalLM

    from harc_hpc.config import load_config
    from harc_hpc.stages import layout
    from pipeline_fixtures import build_tiny_sources, run_pipeline, write_config

    pipeline_fixtures.EXTRA_TINY_CONFIGS["laguna"] = partial(_laguna, softcap=1.5)
    try:
        conf, model = _model("laguna", layers=2, experts=4)
        fam = family_for_config(conf.to_dict())
        assert fam.router_logit_map(conf.to_dict()) is not None
        block = model.model.layers[1]
        with torch.no_grad():
            block.mlp.gate.weight.normal_(0, 2.0)  # logits past the cap
            block.mlp.gate.e_score_correction_bias.copy_(0.3 * torch.randn(4))
        x = torch.randn(400, conf.hidden_size)
        with torch.no_grad():
            capped, _, idx = block.mlp.gate(x)
        raw = x @ block.mlp.gate.weight.T
        assert torch.allclose(fam.router_logit_map(conf.to_dict())(raw), capped, atol=1e-6)
        want = torch.zeros(capped.shape, dtype=torch.bool).scatter_(1, idx, True)
        assert torch.equal(fam.selection_mask(conf.to_dict(), raw, block.mlp.gate.e_score_correction_bias), want)

        src = build_tiny_sources(tmp_path / "src", family="laguna", layers=2)
        cfg = load_config(write_config(tmp_path, src, harc={"dtype": "float64"}))
        run_pipeline(cfg, cfg.run_dir)
    finally:
        pipeline_fixtures.EXTRA_TINY_CONFIGS["laguna"] = _laguna
    for l in layout.moe_layers(cfg):
        rep = json.loads(layout.router_report(cfg.run_dir, l).read_text())
        assert rep["curvature"].startswith("generic") and rep["converged"], rep
        assert sum(rep["kl_after"].values()) < sum(rep["kl_before"].values()), rep
    out = AutoModelForCausalLM.from_pretrained(str(layout.model_dir(cfg.run_dir))).eval()
    with torch.no_grad():
        assert torch.isfinite(out(input_ids=torch.tensor([[1, 5, 9, 3, 7]])).logits).all()
