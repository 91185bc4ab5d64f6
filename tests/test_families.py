"""harc_hpc.models.families: on-disk names, MoE layers, router hooks, both expert layouts."""

from __future__ import annotations

import pytest
import torch

from conftest import MOE_FAMILIES, save_tiny_moe, tiny_moe_config
from harc_hpc.io.checkpoint import Checkpoint
from harc_hpc.models.families import FAMILIES, UnsupportedModelError, family_for_config


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_on_disk_names_match_save_pretrained(moe_models, family):
    ck = Checkpoint(moe_models(family)["base"])
    fam = family_for_config(ck.config)
    assert fam.name == family
    cfg = ck.config
    keys = set(ck.keys())
    E, d = fam.num_experts(cfg), fam.hidden_size(cfg)
    assert E == 4 and d == 32 and fam.top_k(cfg) == 2
    assert fam.detect_layout(keys) == "per_expert"
    for layer in fam.moe_layers(cfg):
        assert ck.tensor_shape(fam.router_disk_key(layer)) == (E, d)
        assert fam.find_router_disk_key(layer, keys) == fam.router_disk_key(layer)
        for e in range(E):
            for proj in ("gate", "up", "down"):
                k = fam.expert_key(layer, e, proj)
                assert k in keys
                parsed = fam.parse_expert_key(k)
                assert (parsed.layer, parsed.expert, parsed.proj) == (layer, e, proj)
    routers = [k for k in keys if fam.is_router_disk_key(k)]
    assert sorted(routers) == sorted(fam.router_disk_key(l) for l in fam.moe_layers(cfg))


def test_normalize_topk_flags():
    assert FAMILIES["mixtral"].normalize_topk({}) is True
    assert FAMILIES["olmoe"].normalize_topk({"norm_topk_prob": False}) is False
    assert FAMILIES["qwen3_moe"].normalize_topk({"norm_topk_prob": True}) is True


def test_qwen_dense_layers_have_no_router(tmp_path):
    cfg = tiny_moe_config("qwen3_moe", layers=4, mlp_only_layers=[0], decoder_sparse_step=2)
    save_tiny_moe(tmp_path / "q", cfg, seed=0)
    ck = Checkpoint(tmp_path / "q")
    fam = family_for_config(ck.config)
    assert fam.moe_layers(ck.config) == [1, 3]
    keys = set(ck.keys())
    assert fam.router_disk_key(1) in keys and fam.router_disk_key(3) in keys
    assert fam.router_disk_key(0) not in keys and fam.router_disk_key(2) not in keys
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="no router"):
        fam.router_module(model, 0)


def test_qwen2_shared_expert_gate_is_not_the_router(moe_models):
    ck = Checkpoint(moe_models("qwen2_moe")["base"])
    fam = family_for_config(ck.config)
    key = fam.shared_expert_gate_key(0)
    assert ck.tensor_shape(key) == (1, 32)
    assert not fam.is_router_disk_key(key)
    assert fam.is_router_disk_key(fam.router_disk_key(0))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_router_hook_input_is_post_attention_norm(moe_models, family):
    from transformers import AutoModelForCausalLM

    path = moe_models(family)["base"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    fam = family_for_config(Checkpoint(path).config)
    layer = fam.moe_layers(model.config.to_dict())[-1]
    seen = {}
    router = fam.router_module(model, layer)
    norm = fam.decoder_layers(model)[layer].post_attention_layernorm

    def grab(name, use_input):
        def hook(module, inp, out):
            seen[name] = inp[0] if use_input else out  # returns None: the output is untouched
        return hook

    h1 = router.register_forward_hook(grab("x", True))
    h2 = norm.register_forward_hook(grab("norm", False))
    with torch.no_grad():
        out = model(torch.randint(0, 64, (2, 5)), output_router_logits=True)
    h1.remove(), h2.remove()
    x = seen["x"]
    assert x.shape == (10, 32)
    assert torch.equal(x, seen["norm"].reshape(-1, 32))
    logits = out.router_logits[fam.moe_layers(model.config.to_dict()).index(layer)]
    torch.testing.assert_close(logits, x @ router.weight.T)
    weight = Checkpoint(path).get_tensor(fam.router_disk_key(layer))
    assert torch.equal(router.weight.detach(), weight)


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_fused_layout_is_detected(tmp_path, family):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    cfg = tiny_moe_config(family)
    state = save_tiny_moe(tmp_path / "m", cfg, seed=0)
    (tmp_path / "m" / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "m" / "model.safetensors"),
              metadata={"format": "pt"})
    ck = Checkpoint(tmp_path / "m")
    fam = family_for_config(ck.config)
    keys = set(ck.keys())
    assert fam.detect_layout(keys) == "fused"
    assert fam.fused_key(0, "gate_up") in keys and fam.fused_key(0, "down") in keys
    assert fam.find_router_disk_key(0, keys) == fam.router_disk_key(0, "fused")
    assert ck.tensor_shape(fam.fused_key(0, "gate_up")) == (4, 32, 32)
    AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # transformers reads it too


def test_unknown_architecture_lists_supported():
    with pytest.raises(UnsupportedModelError) as err:
        family_for_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    msg = str(err.value)
    assert "llama" in msg
    for name in ("deepseek_v3", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"):
        assert name in msg
    assert "docs/extending.md" in msg  # how to add one
