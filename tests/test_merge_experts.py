"""The merge-experts stage: every family, loadable output, determinism, layouts, bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import MOE_FAMILIES, save_tiny_moe, tiny_moe_config, write_merge_config
from harc_hpc.io.checkpoint import Checkpoint
from harc_hpc.config import load_config
from harc_hpc.models.families import family_for_config
from harc_hpc.stages.merge_experts import merge_experts_command, run


def _run(tmp_path, models, merge, name="run", seed=0, base=True):
    cfg_file = write_merge_config(tmp_path / f"{name}.yaml", models, tmp_path / name, merge, seed,
                                  base=base)
    cfg = load_config(cfg_file)
    stats = run(cfg, cfg.run_dir)
    return cfg.run_dir / "merged", stats


def _finite_logits(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 64, (2, 6))).logits
    assert torch.isfinite(logits).all()
    return model


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_family_merges_and_loads(tmp_path, moe_models, family):
    models = moe_models(family)
    out, stats = _run(tmp_path, models, {"method": "ties", "parameters": {"density": 0.5},
                                         "max_shard_size": "30KB"})
    assert stats["tensors"] == len(Checkpoint(models["base"]).keys())
    assert (out / "model.safetensors.index.json").is_file()
    assert (out / "generation_config.json").is_file()
    _finite_logits(out)
    rec = json.loads((out / "harc_merge.json").read_text())
    assert rec["method"] == "ties" and rec["parameters"]["density"] == 0.5
    assert rec["family"] == family and rec["layout"] == "per_expert"
    assert rec["base"]["digest"] == Checkpoint(models["base"]).digest()
    assert [s["name"] for s in rec["sources"]] == ["a", "b"]
    assert rec["versions"]["torch"] and rec["versions"]["transformers"]
    # every tensor is merged, routers and norms included
    assert rec["merged_by_role"]["router"] == len(family_for_config(rec_cfg(out)).moe_layers(rec_cfg(out)))
    assert rec["merged_by_role"]["norm"] > 0 and rec["merged_by_role"]["embedding"] == 1


def rec_cfg(out):
    return json.loads((out / "config.json").read_text())


def test_linear_output_values_and_exclude(tmp_path, moe_models):
    models = moe_models("olmoe")
    out, _ = _run(tmp_path, models, {"method": "linear", "exclude": [r"\.mlp\.gate\.weight$"]})
    merged, a, b, base = (Checkpoint(p) for p in (out, models["a"], models["b"], models["base"]))
    k = "model.layers.0.mlp.experts.2.up_proj.weight"
    torch.testing.assert_close(merged.get_tensor(k), (a.get_tensor(k) + b.get_tensor(k)) / 2)
    r = "model.layers.1.mlp.gate.weight"
    assert torch.equal(merged.get_tensor(r), base.get_tensor(r))


def test_dtype_rules(tmp_path, moe_models):
    models = moe_models("mixtral")
    out, _ = _run(tmp_path, models, {"method": "task_arithmetic", "dtype": "bfloat16",
                                     "out_dtype": "float16"})
    ck = Checkpoint(out)
    assert {ck.tensor_dtype(k) for k in ck.keys()} == {torch.float16}
    assert rec_cfg(out)["dtype"] == "float16"
    _finite_logits(out)


def test_deterministic_bytes(tmp_path, moe_models):
    models = moe_models("qwen3_moe")
    merge = {"method": "dare_ties", "parameters": {"density": 0.5}, "max_shard_size": "40KB"}
    one, _ = _run(tmp_path, models, merge, name="one", seed=7)
    two, _ = _run(tmp_path, models, merge, name="two", seed=7)
    three, _ = _run(tmp_path, models, merge, name="three", seed=8)
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in two.iterdir())
    for f in files:
        if f != "harc_merge.json":  # the record names its run's paths
            assert (one / f).read_bytes() == (two / f).read_bytes(), f
    differing = [f for f in files
                 if f.startswith("model-") and (one / f).read_bytes() != (three / f).read_bytes()]
    assert differing  # another seed draws other masks
    r1 = json.loads((one / "harc_merge.json").read_text())
    r2 = json.loads((two / "harc_merge.json").read_text())
    assert r1["sources"] == r2["sources"] and r1["parameters"] == r2["parameters"]


def _fuse_to_disk(src, dst):
    """A copy of a per-expert checkpoint in transformers 5's fused in-memory layout."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    model = AutoModelForCausalLM.from_pretrained(src)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})


def test_fused_layout_and_granularity(tmp_path, moe_models):
    """ties with granularity fused ranks a layer's whole fused tensor: per-expert inputs and fused
    inputs give the same merged experts, and each output keeps its inputs' layout."""
    models = moe_models("olmoe")
    fused = {n: tmp_path / f"fused-{n}" for n in models}
    for n, p in models.items():
        _fuse_to_disk(p, fused[n])
    merge = {"method": "ties", "parameters": {"density": 0.3, "weights": [0.4, 0.6],
                                              "granularity": "fused"}}
    out_per, _ = _run(tmp_path, models, merge, name="per")
    out_fused, _ = _run(tmp_path, fused, merge, name="fus")
    per, fus = Checkpoint(out_per), Checkpoint(out_fused)
    fam = family_for_config(per.config)
    assert fam.detect_layout(per.keys()) == "per_expert" and fam.detect_layout(fus.keys()) == "fused"
    for layer in (0, 1):
        gu = fus.get_tensor(fam.fused_key(layer, "gate_up"))
        dn = fus.get_tensor(fam.fused_key(layer, "down"))
        for e in range(4):
            g = per.get_tensor(fam.expert_key(layer, e, "gate"))
            u = per.get_tensor(fam.expert_key(layer, e, "up"))
            assert torch.equal(gu[e], torch.cat([g, u]))
            assert torch.equal(dn[e], per.get_tensor(fam.expert_key(layer, e, "down")))
    _finite_logits(out_fused)
    # per-expert ranking keeps `density` of every expert matrix; fused ranking only per layer
    out_pe, _ = _run(tmp_path, fused, {**merge, "parameters": {**merge["parameters"],
                                                                "granularity": "per_expert"}},
                     name="pe")
    assert not torch.equal(Checkpoint(out_pe).get_tensor(fam.fused_key(0, "gate_up")),
                           fus.get_tensor(fam.fused_key(0, "gate_up")))
    assert fam.detect_layout(Checkpoint(out_pe).keys()) == "fused"


def test_wudi_stage(tmp_path, moe_models):
    models = moe_models("qwen2_moe")
    out, _ = _run(tmp_path, models, {"preset": "wudi-paper", "parameters": {"steps": 5}})
    rec = json.loads((out / "harc_merge.json").read_text())
    assert rec["method"] == "wudi" and rec["parameters"]["steps"] == 5
    base, merged = Checkpoint(models["base"]), Checkpoint(out)
    k = "model.embed_tokens.weight"
    assert torch.equal(merged.get_tensor(k), base.get_tensor(k))
    # the record names every tensor WUDI did not merge and what it took instead
    (treatment, names), = rec["not_merged_by_method"].items()
    assert treatment == "not WUDI-merged: the base's value (nonlinear=base)"
    keys = set(base.keys())
    expected = {n for n in keys if base.tensor_shape(n).__len__() != 2
                or "embed_tokens" in n or "lm_head" in n}
    assert set(names) == expected and k in names and "model.norm.weight" in names
    assert not any(".mlp.gate.weight" in n or "shared_expert_gate" in n for n in names)
    assert "norm" not in rec["merged_by_role"] and "embedding" not in rec["merged_by_role"]
    for n in names:
        assert torch.equal(merged.get_tensor(n), base.get_tensor(n)), n
    _finite_logits(out)


# -- bad inputs: clear error, non-zero exit, no output directory --------------------------------

def _cli_fails(tmp_path, models, merge, expect, base=True):
    cfg_file = write_merge_config(tmp_path / "bad.yaml", models, tmp_path / "badrun", merge, base=base)
    result = CliRunner().invoke(merge_experts_command, [str(cfg_file)])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    for piece in expect:
        assert piece in result.output, result.output
    run_dir = tmp_path / "badrun"
    assert not (run_dir / "merged").exists()
    assert not run_dir.exists() or [p.name for p in run_dir.iterdir()] == []
    return result.output


def _variant(tmp_path, models, name, **cfg_overrides):
    d = tmp_path / name
    cfg = tiny_moe_config(family_for_config(Checkpoint(models["base"]).config).name, **cfg_overrides)
    save_tiny_moe(d, cfg, seed=5)
    return d


def test_cli_success(tmp_path, moe_models):
    models = moe_models("olmoe")
    cfg_file = write_merge_config(tmp_path / "ok.yaml", models, tmp_path / "okrun", {"method": "linear"})
    other = tmp_path / "elsewhere"
    result = CliRunner().invoke(merge_experts_command, [str(cfg_file), "--run-dir", str(other)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["method"] == "linear"
    assert (other / "merged" / "harc_merge.json").is_file()


def test_different_architectures(tmp_path, moe_models):
    models = dict(moe_models("olmoe"))
    models["b"] = moe_models("mixtral")["b"]
    _cli_fails(tmp_path, models, {"method": "linear"}, ["different architectures", "'b'"])


def test_different_expert_counts(tmp_path, moe_models):
    models = dict(moe_models("olmoe"))
    models["b"] = _variant(tmp_path, models, "e8", experts=8)
    _cli_fails(tmp_path, models, {"method": "linear"}, ["expert counts", "'b'"])


def test_different_vocabularies(tmp_path, moe_models):
    models = dict(moe_models("olmoe"))
    models["a"] = _variant(tmp_path, models, "v96", vocab=96)
    _cli_fails(tmp_path, models, {"method": "linear"}, ["vocabularies", "'a'"])


def test_different_shapes(tmp_path, moe_models):
    models = dict(moe_models("olmoe"))
    d = _variant(tmp_path, models, "i8")
    # same config as the others, but one tensor of another shape
    state = {k: Checkpoint(models["b"]).get_tensor(k) for k in Checkpoint(models["b"]).keys()}
    key = "model.layers.1.mlp.experts.3.down_proj.weight"
    state[key] = torch.zeros(32, 8)
    (d / "model.safetensors").unlink()
    shutil.copyfile(models["b"] / "config.json", d / "config.json")
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    models["b"] = d
    _cli_fails(tmp_path, models, {"method": "linear"}, ["'b'", "model.safetensors", key, "shape"])


def test_different_key_sets(tmp_path, moe_models):
    models = dict(moe_models("olmoe"))
    d = tmp_path / "missing-key"
    shutil.copytree(models["b"], d)
    ck = Checkpoint(d)
    key = "model.layers.0.self_attn.q_norm.weight"
    state = {k: ck.get_tensor(k) for k in ck.keys() if k != key}
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    models["b"] = d
    _cli_fails(tmp_path, models, {"method": "linear"}, ["'b'", key, "missing"])


def test_missing_base_for_task_vector_method(tmp_path, moe_models):
    _cli_fails(tmp_path, moe_models("olmoe"), {"method": "ties"}, ["needs a base", "models.base"],
               base=False)


def test_truncated_and_missing_shards(tmp_path, moe_models):
    models = dict(moe_models("olmoe"))
    d = tmp_path / "trunc"
    shutil.copytree(models["a"], d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    models["a"] = d
    _cli_fails(tmp_path, models, {"method": "linear"}, ["truncated", str(f)])
    # a sharded model with a shard gone
    out, _ = _run(tmp_path, moe_models("olmoe"), {"method": "linear", "max_shard_size": "20KB"},
                  name="sharded")
    shards = sorted(out.glob("model-*.safetensors"))
    shards[1].unlink()
    models["a"] = out
    _cli_fails(tmp_path, models, {"method": "linear"}, [shards[1].name, "missing"])


def test_nan_in_a_tensor(tmp_path, moe_models):
    models = dict(moe_models("olmoe"))
    d = tmp_path / "nan"
    shutil.copytree(models["b"], d)
    ck = Checkpoint(d)
    state = {k: ck.get_tensor(k) for k in ck.keys()}
    key = "model.layers.1.mlp.experts.0.gate_proj.weight"
    state[key][0, 0] = float("nan")
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    models["b"] = d
    _cli_fails(tmp_path, models, {"method": "ties"}, ["'b'", "model.safetensors", key, "NaN"])


def test_pickle_source_refused(tmp_path, moe_models):
    models = dict(moe_models("olmoe"))
    d = tmp_path / "pk"
    d.mkdir()
    shutil.copyfile(models["b"] / "config.json", d / "config.json")
    ck = Checkpoint(models["b"])
    torch.save({k: ck.get_tensor(k) for k in ck.keys()}, d / "pytorch_model.bin")
    models["b"] = d
    _cli_fails(tmp_path, models, {"method": "linear"}, ["pickle", "allow_pickle"])


def test_bad_parameters_exit_nonzero(tmp_path, moe_models):
    _cli_fails(tmp_path, moe_models("olmoe"), {"method": "ties", "parameters": {"densty": 0.5}},
               ["densty"])


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_elementwise_methods_in_slices_give_the_same_bytes(tmp_path, moe_models, monkeypatch, method):
    from harc_hpc.merge import engine

    models = moe_models("qwen2_moe")
    whole, _ = _run(tmp_path, models, {"method": method, "parameters": {"weights": [0.3, 0.7]}},
                    name="whole")
    monkeypatch.setattr(engine, "CHUNK_NUMEL", 77)  # slices that straddle rows and tensors
    monkeypatch.setattr(engine, "PREFETCH_MAX_NUMEL", 100)
    sliced, stats = _run(tmp_path, models, {"method": method, "parameters": {"weights": [0.3, 0.7]}},
                         name="sliced")
    assert stats["merged_tensors"] == stats["tensors"]
    for f in sorted(p.name for p in whole.iterdir()):
        if f != "harc_merge.json":
            assert (whole / f).read_bytes() == (sliced / f).read_bytes(), f
