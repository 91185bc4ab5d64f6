"""Layer-wise onloading (harc_hpc.models.onload) and the capture stage built on it.

The reference is the whole-model path: the merged checkpoint loaded whole with from_pretrained, the
calibrated routers of earlier blocks written into it, and one full forward per batch with hooks on
the routers. The layer-wise capture must give the same router inputs and hidden states bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from harc_hpc.config import load_config
from harc_hpc.io.activations import ActivationArray, layer_name
from harc_hpc.io.calibration_data import tokenize_task
from harc_hpc.models.modeling import RouterInputRecorder, batches, load_causal_lm, pad_batch, unpad
from harc_hpc.models.onload import OnloadedModel
from harc_hpc.stages import capture_activations, layout, merge_experts
from harc_hpc.stages.compute_statistics import layer_inputs
from harc_hpc.stages.routers import merged_router, save_router
from pipeline_fixtures import build_tiny_sources, write_config

FAMILIES = ("olmoe", "qwen3_moe", "mixtral", "qwen2_moe")  # block size 1: the streamed capture


def whole_model_captures(cfg, run_dir, routers: dict, layers: list[int]):
    """Router inputs of ``layers`` per task from full forwards of the whole merged model."""
    from transformers import AutoTokenizer

    merged = layout.merged_dir(run_dir)
    model = load_causal_lm(merged, torch.device("cpu"))
    fam = layout.family(cfg)
    with torch.no_grad():
        for l, (w, b) in routers.items():
            fam.router_module(model, l).weight.copy_(w)
            if b is not None:  # a router with a bias (GPT-OSS)
                fam.router_module(model, l).bias.copy_(b)
    tok = AutoTokenizer.from_pretrained(str(merged))
    out = {}
    with RouterInputRecorder({l: fam.router_module(model, l) for l in layers}) as rec:
        for t in cfg.task_names:
            seqs = tokenize_task(cfg.calibration_for(t), cfg.calibration, tok)
            parts = {l: [] for l in layers}
            for idx in batches(len(seqs), cfg.calibration.batch_size):
                ids, lengths = pad_batch([torch.tensor(seqs[i]) for i in idx])
                with torch.no_grad():
                    model(input_ids=ids)
                for l in layers:
                    parts[l].append(unpad(rec.pop(l).reshape(ids.shape[0], ids.shape[1], -1), lengths))
            for l in layers:
                out[(l, t)] = torch.cat(parts[l])
    return out


def _check_blocks(cfg, run_dir):
    routers = {}
    for b, blk in enumerate(layout.blocks(cfg)):
        result = capture_activations.run(cfg, run_dir, block=b)
        assert result.get("hidden_states_in", "device") in ("device", "host", "disk")
        assert ("stored" in result) == capture_activations.streamed(cfg)
        assert result["peak_rss_bytes"] > 0
        ref = whole_model_captures(cfg, run_dir, routers, blk)
        for (l, t), x_ref in ref.items():
            # the one reader of router inputs (derived from the stored residual with block size 1)
            x = layer_inputs(cfg, run_dir, l, t, stored_dtype=True).load()
            assert x.dtype == x_ref.dtype and torch.equal(x, x_ref), f"block {b} layer {l} task {t}"
        # stand-in "calibrated" routers for this block, so the next block replays through them
        g = torch.Generator().manual_seed(b)
        d = layout.reference_config(cfg)["hidden_size"]
        for l in blk:
            w = merged_router(cfg, run_dir, l).float()  # [W | b] for a router with a bias
            w = w + 0.5 * w.std() * torch.randn(w.shape, generator=g)
            routers[l] = (w[:, :d], w[:, d] if w.shape[1] > d else None)
            save_router(run_dir, l, routers[l][0], {"layer": l}, bias=routers[l][1])


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_capture_equals_the_whole_model_bit_for_bit(tmp_path, family):
    src = build_tiny_sources(tmp_path / "src", family=family, layers=3)
    cfg = load_config(write_config(tmp_path, src, block_size=1))
    merge_experts.run(cfg, cfg.run_dir)
    _check_blocks(cfg, cfg.run_dir)


def test_layerwise_capture_with_blocks_and_spilled_states(tmp_path, monkeypatch):
    """block_size 2 over 3 layers, hidden states memory-mapped on local disk (run.node_local_dir):
    same bytes, and nothing left there."""
    src = build_tiny_sources(tmp_path / "src", family="olmoe", layers=3)
    cfg = load_config(write_config(tmp_path, src, block_size=2), {"run.node_local_dir": str(tmp_path / "local")})
    merge_experts.run(cfg, cfg.run_dir)
    seen = []
    real_init = capture_activations.BatchStates.__init__

    def spy(self, *a, **kw):
        real_init(self, *a, **kw)
        seen.append(self._file)

    monkeypatch.setattr(capture_activations.BatchStates, "__init__", spy)
    monkeypatch.setattr(capture_activations, "placement_for", lambda *a: "disk")
    (tmp_path / "local").mkdir()
    _check_blocks(cfg, cfg.run_dir)
    assert seen and all(str(f).startswith(str(tmp_path / "local")) for f in seen), seen
    assert list((tmp_path / "local").iterdir()) == [], "the spilled hidden states were not removed"


def test_onloaded_layer_from_a_fused_checkpoint(tmp_path):
    """A checkpoint holding transformers 5's fused expert tensors on disk loads the same layer."""
    from transformers import AutoModelForCausalLM

    src = build_tiny_sources(tmp_path / "src", family="qwen3_moe", layers=3)
    model = AutoModelForCausalLM.from_pretrained(str(src["base"]))
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(fused / "model.safetensors"))
    (fused / "config.json").write_text((src["base"] / "config.json").read_text())
    assert "model.layers.0.mlp.experts.gate_up_proj" in json.dumps(list(model.state_dict()))
    om = OnloadedModel(fused, torch.device("cpu"))
    ids = torch.randint(0, 100, (2, 9))
    h_ref = model.model.embed_tokens(ids)
    h = om.embed(ids)
    assert torch.equal(h, h_ref)
    for j in range(om.num_layers):
        om.onload(j)
        for name, value in model.model.layers[j].state_dict().items():
            assert torch.equal(om.layer(j).state_dict()[name], value), (j, name)
        om.offload(j)
        assert all(p.is_meta for p in om.layer(j).parameters())


def test_onload_names_a_missing_tensor(tmp_path):
    src = build_tiny_sources(tmp_path / "src", family="olmoe", layers=2)
    from safetensors.torch import load_file

    d = tmp_path / "broken"
    d.mkdir()
    state = load_file(str(src["base"] / "model.safetensors"))
    del state["model.layers.1.self_attn.q_proj.weight"]
    save_file(state, str(d / "model.safetensors"))
    (d / "config.json").write_text((src["base"] / "config.json").read_text())
    om = OnloadedModel(d, torch.device("cpu"))
    om.onload(0)
    from harc_hpc.io.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight.*layer 1"):
        om.onload(1)


def _store_files(store):
    return {p.relative_to(store): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kill_after", [1, 2])
def test_a_capture_killed_after_a_layer_resumes_there_with_the_same_bytes(tmp_path, monkeypatch, kill_after):
    """block 1 of a 2-layer-block run replays decoder layers 0-1 and captures 2-3; a task killed after
    its ``kill_after``-th layer resumes from the checkpoint (only the remaining layers are loaded)
    and writes the same stores, byte for byte, as an uninterrupted run."""
    src = build_tiny_sources(tmp_path / "src", family="olmoe", layers=4)
    cfg = load_config(write_config(tmp_path, src, block_size=2))
    run = cfg.run_dir
    merge_experts.run(cfg, run)
    capture_activations.run(cfg, run, block=0, task_digest="d0")
    for l in (0, 1):
        save_router(run, l, merged_router(cfg, run, l).float() * 1.1, {"layer": l})
    capture_activations.run(cfg, run, block=1, task_digest="d1")
    want = {s: _store_files(f(run, 1)) for s, f in (("h", layout.hidden_store), ("a", layout.activation_store))}
    for f in (layout.hidden_store, layout.activation_store):
        import shutil

        shutil.rmtree(f(run, 1))

    loaded = []
    real_onload, real_checkpoint = OnloadedModel.onload, capture_activations._checkpoint

    def onload(self, index, overrides=None):
        loaded.append(index)
        return real_onload(self, index, overrides)

    def killed_after_checkpoint(*args):
        real_checkpoint(*args)
        if len(loaded) == kill_after:
            raise KeyboardInterrupt("killed at the time limit")

    monkeypatch.setattr(OnloadedModel, "onload", onload)
    monkeypatch.setattr(capture_activations, "_checkpoint", killed_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        capture_activations.run(cfg, run, block=1, task_digest="d1")
    partial = layout.capture_partial(run, 1)
    assert json.loads((partial / "manifest.json").read_text())["next_layer"] == kill_after
    assert not layout.activation_store(run, 1).exists()  # nothing published half-done

    monkeypatch.setattr(capture_activations, "_checkpoint", real_checkpoint)
    loaded.clear()
    capture_activations.run(cfg, run, block=1, task_digest="d1")
    assert loaded == list(range(kill_after, 4)), loaded
    assert not partial.exists()
    got = {s: _store_files(f(run, 1)) for s, f in (("h", layout.hidden_store), ("a", layout.activation_store))}
    assert got == want


def test_a_partial_capture_of_other_inputs_is_not_resumed(tmp_path, monkeypatch):
    src = build_tiny_sources(tmp_path / "src", family="olmoe", layers=2)
    cfg = load_config(write_config(tmp_path, src, block_size=2))
    run = cfg.run_dir
    merge_experts.run(cfg, run)
    real_checkpoint = capture_activations._checkpoint

    def killed_after_checkpoint(*args):
        real_checkpoint(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(capture_activations, "_checkpoint", killed_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        capture_activations.run(cfg, run, block=0, task_digest="old")
    assert (layout.capture_partial(run, 0) / "manifest.json").exists()
    monkeypatch.setattr(capture_activations, "_checkpoint", real_checkpoint)
    loaded = []
    real_onload = OnloadedModel.onload
    monkeypatch.setattr(OnloadedModel, "onload",
                        lambda self, i, o=None: (loaded.append(i), real_onload(self, i, o))[1])
    capture_activations.run(cfg, run, block=0, task_digest="new")
    assert loaded == [0, 1]


def test_layer_checkpoints_off_writes_none(tmp_path, monkeypatch):
    src = build_tiny_sources(tmp_path / "src", family="olmoe", layers=2)
    cfg = load_config(write_config(tmp_path, src, block_size=2), {"calibration.layer_checkpoints": False})
    merge_experts.run(cfg, cfg.run_dir)

    def no_checkpoint(*args):
        raise AssertionError("calibration.layer_checkpoints is false")

    monkeypatch.setattr(capture_activations, "_checkpoint", no_checkpoint)
    capture_activations.run(cfg, cfg.run_dir, block=0, task_digest="d")
    assert layout.activation_store(cfg.run_dir, 0).exists() and not layout.capture_partial(cfg.run_dir, 0).exists()
