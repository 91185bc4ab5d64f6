"""Remote code: a tiny MoE whose modeling code comes with the checkpoint (standing in for Kimi-K2:
``model_type: kimi_k2``, DeepSeek-V3's architecture and tensor names, classes of its own under
``auto_map``) loads, merges and plans with ``models.trust_remote_code: true``, and is refused
clearly, naming the key, without it."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from harc_hpc.config import ConfigError, load_config

CONFIGURATION = '''from transformers import DeepseekV3Config


class TinyKimiConfig(DeepseekV3Config):
    model_type = "kimi_k2"
'''
MODELING = '''from transformers import DeepseekV3ForCausalLM

from .configuration_tiny_kimi import TinyKimiConfig


class TinyKimiForCausalLM(DeepseekV3ForCausalLM):
    config_class = TinyKimiConfig
'''
AUTO_MAP = {"AutoConfig": "configuration_tiny_kimi.TinyKimiConfig",
            "AutoModelForCausalLM": "modeling_tiny_kimi.TinyKimiForCausalLM"}


def _remote_code_checkpoint(path, state=None, seed=0):
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    conf = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                            n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                            first_k_dense_replace=0, moe_intermediate_size=16, q_lora_rank=None, kv_lora_rank=16,
                            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(conf)
    if state is not None:
        model.load_state_dict(state)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(path)
    cfg_file = path / "config.json"
    data = json.loads(cfg_file.read_text())
    data.update(model_type="kimi_k2", architectures=["TinyKimiForCausalLM"], auto_map=AUTO_MAP)
    cfg_file.write_text(json.dumps(data, indent=2))
    (path / "configuration_tiny_kimi.py").write_text(CONFIGURATION)
    (path / "modeling_tiny_kimi.py").write_text(MODELING)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-code")
    state = _remote_code_checkpoint(root / "tiny_kimi_base")
    _remote_code_checkpoint(root / "tiny_kimi_a", state, seed=1)
    _remote_code_checkpoint(root / "tiny_kimi_b", state, seed=2)
    return {n: root / f"tiny_kimi_{n}" for n in ("base", "a", "b")}


def _config(tmp_path, kimi, trust, name="run"):
    data = {"run": {"name": name, "output_dir": str(tmp_path / "runs")},
            "models": {"base": str(kimi["base"]), "trust_remote_code": trust,
                       "sources": [{"name": "a", "path": str(kimi["a"])}, {"name": "b", "path": str(kimi["b"])}]},
            "merge": {"method": "task_arithmetic", "parameters": {"lambda": 0.5}}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def _finite_logits(model):
    with torch.no_grad():
        logits = model(torch.randint(0, 64, (2, 6))).logits
    assert torch.isfinite(logits).all()


def test_config_and_model_load_with_the_key_and_are_refused_without(kimi):
    from transformers import AutoConfig

    from harc_hpc.models.modeling import check_remote_code, load_causal_lm, needs_remote_code

    conf = json.loads((kimi["a"] / "config.json").read_text())
    assert needs_remote_code(conf)
    with pytest.raises(ConfigError) as err:
        check_remote_code(conf, False, where="models.sources[a].path")
    text = str(err.value)
    assert text.startswith("models.sources[a].path: model_type 'kimi_k2' is not in transformers")
    assert "models.trust_remote_code: true" in text and "configuration_tiny_kimi.py" in text
    check_remote_code(conf, True, where="x")
    assert type(AutoConfig.from_pretrained(str(kimi["a"]), trust_remote_code=True)).__name__ == "TinyKimiConfig"
    with pytest.raises(ConfigError, match="models.trust_remote_code"):
        load_causal_lm(kimi["a"], torch.device("cpu"))  # no prompt, no transformers error: the key
    model = load_causal_lm(kimi["a"], torch.device("cpu"), trust_remote_code=True)
    assert type(model).__name__ == "TinyKimiForCausalLM"
    _finite_logits(model)


def test_merge_with_the_key_carries_the_code_and_loads(tmp_path, kimi):
    from transformers import AutoModelForCausalLM

    from harc_hpc.stages.merge_experts import run

    cfg = _config(tmp_path, kimi, trust=True)
    run(cfg, cfg.run_dir)
    out = cfg.run_dir / "merged"
    assert (out / "modeling_tiny_kimi.py").is_file() and (out / "configuration_tiny_kimi.py").is_file()
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == "kimi_k2" and conf["auto_map"] == AUTO_MAP
    assert json.loads((out / "harc_merge.json").read_text())["family"] == "deepseek_v3"
    model = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    assert type(model).__name__ == "TinyKimiForCausalLM"
    _finite_logits(model)


def test_plan_with_the_key_and_a_clear_error_without(tmp_path, kimi):
    from harc_hpc.errors import HarcHpcError
    from harc_hpc.pipeline.api import plan_run

    _, plan = plan_run(_config(tmp_path, kimi, trust=True))
    assert plan.layers == [0, 1] and "merge-experts/all" in plan.tasks
    with pytest.raises(HarcHpcError) as err:
        plan_run(_config(tmp_path, kimi, trust=False, name="untrusted"))
    text = str(err.value)
    assert "models.sources[a].path" in text and "models.trust_remote_code: true" in text


def _as_remote_code(path):
    """A model directory made a remote-code one: ``model_type: kimi_k2``, its classes under ``auto_map``."""
    cfg_file = path / "config.json"
    data = json.loads(cfg_file.read_text())
    data.update(model_type="kimi_k2", architectures=["TinyKimiForCausalLM"], auto_map=AUTO_MAP)
    cfg_file.write_text(json.dumps(data, indent=2))
    (path / "configuration_tiny_kimi.py").write_text(CONFIGURATION)
    (path / "modeling_tiny_kimi.py").write_text(MODELING)


def test_the_whole_pipeline_runs_and_calibrates_remote_code(tmp_path):
    """merge, capture (the layer-wise engine builds the remote classes), statistics, solve and
    assembly run the remote-code MoE; the result loads with its own class and routes closer to the
    sources than the merged model."""
    from transformers import AutoModelForCausalLM

    from harc_hpc.stages import layout
    from pipeline_fixtures import build_tiny_sources, run_pipeline, write_config

    src = build_tiny_sources(tmp_path / "src", family="deepseek_v3", layers=1)
    for name in ("base", "math", "code"):
        _as_remote_code(src[name])
    cfg = load_config(write_config(tmp_path, src, harc={"dtype": "float64"},
                                   extra={"models.trust_remote_code": True}))
    run_pipeline(cfg, cfg.run_dir)
    out = layout.model_dir(cfg.run_dir)
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == "kimi_k2" and conf["auto_map"] == AUTO_MAP
    assert (out / "modeling_tiny_kimi.py").is_file()
    assert layout.moe_layers(cfg)
    for l in layout.moe_layers(cfg):
        rep = json.loads(layout.router_report(cfg.run_dir, l).read_text())
        assert rep["converged"], rep
        assert sum(rep["kl_after"].values()) < sum(rep["kl_before"].values()), rep
    model = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    assert type(model).__name__ == "TinyKimiForCausalLM"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 3, 7]])).logits
    assert torch.isfinite(logits).all()
