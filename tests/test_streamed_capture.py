"""The streamed capture (harc.block_size 1): one residual store per calibrated layer, the router
inputs derived from it on read, the previous store consumed chunk by chunk.

References: each family's own decoder-layer forward (the two halves must equal it bit for bit), the
whole-model forward (test_onload's, for the families that file does not cover), and the bytes on
disk measured after every write and delete of a tiny pipeline run (the scratch peak).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harc_hpc.config import load_config
from harc_hpc.io.activations import ActivationWriter, TokenStore
from harc_hpc.models.onload import OnloadedModel
from harc_hpc.pipeline import records
from harc_hpc.pipeline.api import submit_run
from harc_hpc.stages import capture_activations, layout, merge_experts
from harc_hpc.stages.routers import merged_router, save_router
from pipeline_fixtures import build_tiny_sources, final_bytes, submit_debug, tiny_config, write_config

ALL_FAMILIES = ("olmoe", "qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3", "glm4_moe", "gpt_oss", "llama4_text")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_the_two_halves_of_a_decoder_layer_are_its_forward_bit_for_bit(tmp_path, family):
    """attention_half then moe_half == the layer's own forward, on a right-padded batch, for every
    layer (dense ones included) of every family: what the streamed capture relies on."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(family, layers=3)).save_pretrained(tmp_path / "m")
    model = OnloadedModel(tmp_path / "m", torch.device("cpu"))
    h = torch.randn(3, 21, 32)
    h[1, 15:] = 0  # the pads a stored residual is re-padded with
    for j in range(model.num_layers):
        model.onload(j)
        full = model.run_layer(j, h)
        residual = model.run_attention_half(j, h)
        assert not torch.equal(residual, h)
        assert torch.equal(model.run_moe_half(j, residual), full), (family, j)
        # the router reads the post-attention norm of that residual
        if j in model.family.moe_layers(json.loads((tmp_path / "m" / "config.json").read_text())):
            seen = []
            router = model.family.router_module(model.model, j)
            handle = router.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
            model.run_layer(j, h)
            handle.remove()
            norm = model.family.router_input_norm(model.layer(j))
            assert torch.equal(seen[0].reshape(-1, 32), norm(residual).reshape(-1, 32)), (family, j)
        model.offload(j)
        h = full


@pytest.mark.parametrize("family", ("deepseek_v3", "gpt_oss", "llama4_text"))
def test_streamed_router_inputs_equal_the_whole_model_bit_for_bit(tmp_path, family):
    """test_onload covers OLMoE, Qwen3-MoE, Mixtral and Qwen2-MoE; these add DeepSeek-V3 (a dense
    first layer before the first calibrated one), GPT-OSS (sliding-window layers, a router with a
    bias) and Llama 4. (GLM-4's tiny model differs from its whole-model forward by an ulp in a few
    rows of its second block with the layer-wise capture too: it is not bit-reproducible there.)"""
    from test_onload import _check_blocks

    src = build_tiny_sources(tmp_path / "src", family=family, layers=3)
    cfg = load_config(write_config(tmp_path, src, block_size=1))
    assert capture_activations.streamed(cfg)
    merge_experts.run(cfg, cfg.run_dir)
    _check_blocks(cfg, cfg.run_dir)


# -- the scratch peak ------------------------------------------------------------------------------

SCRATCH = ("hidden", "activations", "partial")


def scratch_bytes(run_dir: Path) -> int:
    return sum(p.stat().st_size for sub in SCRATCH for p in (run_dir / sub).rglob("*")
               if p.is_file() and not p.is_symlink()) if run_dir.exists() else 0


class ScratchProbe:
    """The bytes under a run's scratch folders after every write of a store chunk, every capture
    checkpoint and every deletion (the peak is right after a write)."""

    def __init__(self, monkeypatch, run_dir: Path):
        self.run_dir = run_dir
        self.peak = 0
        self.samples = 0
        for owner, name in ((ActivationWriter, "write"), (ActivationWriter, "_flush"),
                            (capture_activations, "_checkpoint"), (capture_activations, "_delete_chunks"),
                            (records, "retire_if_consumed")):
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, fn):
        def probed(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.samples += 1
            self.peak = max(self.peak, scratch_bytes(self.run_dir))
            return out

        return probed  # a plain function: as a class attribute it still receives self


def block_router_input_bytes(run_dir: Path, cfg) -> int:
    """One block's router inputs (one layer, every task's selected tokens), float32, d = 32."""
    return sum(TokenStore(layout.token_store(run_dir, t)).num_selected for t in cfg.task_names) * 32 * 4


CHUNK = 64  # calibration.chunk_tokens (its minimum): small beside a task's ~700 tokens


def config_for(root: Path, sources: dict, name: str, **extra) -> Path:
    return write_config(root, sources, name=name, executor="debug", extra={
        "calibration.chunk_tokens": CHUNK, "calibration.batch_size": 2, "calibration.compression": "none", **extra})


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return build_tiny_sources(tmp_path_factory.mktemp("src"), layers=3)


@pytest.fixture(scope="module")
def reference(sources, tmp_path_factory):
    """An uninterrupted run that keeps its stores: its final bytes, and every store verifies."""
    root = tmp_path_factory.mktemp("ref")
    plan = submit_debug(config_for(root, sources, "ref", **{"run.retention": "keep"}))
    return plan.run_dir, final_bytes(plan.run_dir)


def test_keep_keeps_every_store_whole(reference):
    run_dir, _ = reference
    assert sorted(p.name for p in (run_dir / "activations").iterdir()) == [f"block-00{b}.zarr" for b in range(3)]
    assert not (run_dir / "hidden").exists()
    for b in range(3):
        rec = records.read_completion(run_dir, "capture-activations", f"block-00{b}")
        assert not rec.get("retired") and rec["result"]["input_consumed"] is False
        assert records.verify_artifacts(run_dir, rec["artifacts"], deep=True) is None


def test_streamed_scratch_peak_is_one_block_of_router_inputs(sources, tmp_path, monkeypatch, reference):
    """delete-intermediate, block size 1: the scratch never exceeds 1.2x one block's router inputs
    plus a chunk per task, and the run's result is the kept run's, byte for byte."""
    config = config_for(tmp_path, sources, "streamed")
    cfg = load_config(config)
    probe = ScratchProbe(monkeypatch, cfg.run_dir)
    submit_debug(config)
    one_block = block_router_input_bytes(cfg.run_dir, cfg)
    chunk_bytes = CHUNK * 32 * 4
    ratio = probe.peak / one_block
    print(f"streamed capture: scratch peak {probe.peak} B = {ratio:.3f} x one block's router inputs "
          f"({one_block} B), {probe.samples} samples")
    assert probe.samples > 50
    assert probe.peak <= 1.2 * one_block + len(cfg.task_names) * chunk_bytes, ratio
    assert probe.peak >= one_block  # the probe sees the stores (one whole store, at least)
    assert final_bytes(cfg.run_dir) == reference[1]
    assert scratch_bytes(cfg.run_dir) == 0


def test_layerwise_capture_at_block_size_1_peaks_at_three_blocks(sources, tmp_path, monkeypatch, reference):
    """The same probe on the layer-wise capture (hidden states + router inputs per block, what block
    sizes > 1 use), forced at block size 1: ~3x, the figure the streamed capture removes."""
    monkeypatch.setattr(capture_activations, "streamed", lambda cfg: False)
    config = config_for(tmp_path, sources, "layerwise")
    cfg = load_config(config)
    probe = ScratchProbe(monkeypatch, cfg.run_dir)
    submit_debug(config)
    ratio = probe.peak / block_router_input_bytes(cfg.run_dir, cfg)
    print(f"layer-wise capture: scratch peak {probe.peak} B = {ratio:.3f} x one block's router inputs")
    assert ratio >= 2.5, ratio
    assert final_bytes(cfg.run_dir) == reference[1]  # the same model either way (float32 stores)


# -- kill and resume -------------------------------------------------------------------------------

def killed_mid_capture_1(sources, root: Path, monkeypatch, name: str, deletions: int = 3):
    """A run killed (KeyboardInterrupt, as a job at its time limit) inside capture 1, after it has
    deleted ``deletions`` batches' worth of the store it consumes."""
    config = config_for(root, sources, name)
    cfg = load_config(config)
    real = capture_activations._delete_chunks
    calls = {"n": 0}

    def delete_then_die(array_dir, first, stop):
        out = real(array_dir, first, stop)
        if "block-000.zarr" in str(array_dir) and stop > first:
            calls["n"] += 1
            if calls["n"] == deletions:
                raise KeyboardInterrupt("killed at the time limit")
        return out

    monkeypatch.setattr(capture_activations, "_delete_chunks", delete_then_die)
    with pytest.raises(KeyboardInterrupt):
        submit_run(cfg, executor="debug", echo=lambda line: None)
    monkeypatch.setattr(capture_activations, "_delete_chunks", real)
    return config, cfg.run_dir


def test_a_capture_killed_while_consuming_resumes_without_its_producer(sources, tmp_path, monkeypatch, reference):
    config, run_dir = killed_mid_capture_1(sources, tmp_path, monkeypatch, "killed")
    consumed = layout.activation_store(run_dir, 0)
    rec = records.read_completion(run_dir, "capture-activations", "block-000")
    # before the first chunk went, the producer's record retired the store, naming its consumer
    assert "activations/block-000.zarr" not in rec["artifacts"]
    assert rec["retired"]["activations/block-000.zarr"]["consumed_by"]["key"] == "block-001"
    with pytest.raises(Exception, match="missing"):  # half deleted: no reader trusts it
        from harc_hpc.io.activations import ActivationArray

        ActivationArray(consumed, "layer-000/math")
    manifest = json.loads((layout.capture_partial(run_dir, 1) / "manifest.json").read_text())
    assert 0 < manifest["flushed"]["math"] and manifest["flushed"]["math"] % CHUNK == 0
    lines: list[str] = []
    submit_debug(config, lines)
    ran = [l.split()[1] for l in lines if l.startswith("running ")]
    assert ran[0] == "capture-activations/block-001" and "capture-activations/block-000" not in ran, ran
    assert not any("rerunning" in l for l in lines), lines
    assert final_bytes(run_dir) == reference[1]
    assert scratch_bytes(run_dir) == 0


def test_a_resumed_streamed_capture_writes_the_same_store(sources, tmp_path, monkeypatch, reference):
    """Stage level, nothing deleted (no retire entries): a capture killed after some durable chunks
    resumes at the batch holding its first row not yet durable and writes the store of an
    uninterrupted run, file for file."""
    ref_dir, _ = reference
    cfg = load_config(config_for(tmp_path, sources, "stage"))
    run = cfg.run_dir
    merge_experts.run(cfg, run)
    capture_activations.run(cfg, run, block=0, task_digest="d0")
    for f in ("routers/layer-000.safetensors", "routers/layer-000.json"):
        (run / f).parent.mkdir(parents=True, exist_ok=True)
        (run / f).write_bytes((ref_dir / f).read_bytes())
    want = {p.relative_to(layout.activation_store(ref_dir, 1)): p.read_bytes()
            for p in sorted(layout.activation_store(ref_dir, 1).rglob("*")) if p.is_file()}
    real = capture_activations._fsync_chunks
    calls = {"n": 0}

    def fsync_then_die(*args):
        real(*args)
        calls["n"] += 1
        if calls["n"] == 4:  # math done, code part way
            raise KeyboardInterrupt

    monkeypatch.setattr(capture_activations, "_fsync_chunks", fsync_then_die)
    with pytest.raises(KeyboardInterrupt):
        capture_activations.run(cfg, run, block=1, task_digest="d1")
    monkeypatch.setattr(capture_activations, "_fsync_chunks", real)
    written, onloaded = [], []
    real_write, real_onload = ActivationWriter.write, OnloadedModel.onload
    monkeypatch.setattr(ActivationWriter, "write",
                        lambda self, name, start, values: (written.append((name, start)),
                                                           real_write(self, name, start, values))[1])
    monkeypatch.setattr(OnloadedModel, "onload", lambda self, index, overrides=None, parts=None: (
        onloaded.append((index, parts)), real_onload(self, index, overrides, parts))[1])
    capture_activations.run(cfg, run, block=1, task_digest="d1")
    assert written and written[0][1] > 0 and written[0][1] % CHUNK == 0, written[:3]  # resumed, not restarted
    # only the halves that run: layer 0's feed-forward half (calibrated router), layer 1's attention
    assert [(i, tuple(sorted(p))) for i, p in onloaded] == [(0, ("mlp", "post_attention_layernorm")),
                                                             (1, ("input_layernorm", "self_attn"))]
    got = {p.relative_to(layout.activation_store(run, 1)): p.read_bytes()
           for p in sorted(layout.activation_store(run, 1).rglob("*")) if p.is_file()}
    assert got == want


def test_a_config_change_after_the_kill_reruns_the_producer(sources, tmp_path, monkeypatch):
    """After the kill, harc.alpha changes: solve 0 must run again and read the half-consumed store,
    so capture 0 runs first (the normal chain), and capture 1 starts over from its new inputs."""
    config, run_dir = killed_mid_capture_1(sources, tmp_path, monkeypatch, "changed")
    lines: list[str] = []
    submit_run(load_config(config, {"harc.alpha": 0.5}), executor="debug", echo=lines.append)
    text = "\n".join(lines)
    assert ("rerunning capture-activations/block-000: solve-router/layer-000 needs activations/block-000.zarr"
            in text), text
    assert not any(l.startswith("FAILED") for l in lines), text
    assert records.read_completion(run_dir, "assemble-model", "all") is not None
    assert scratch_bytes(run_dir) == 0


def test_a_corrupt_chunk_of_a_store_being_consumed_reruns_its_producer(sources, tmp_path, monkeypatch, reference):
    """A chunk not yet consumed fails its checksum when the resumed capture reads it: its producer's
    record (which retired the store) is dropped, so the next submit reruns capture 0 and capture 1
    resumes on the recomputed, byte-identical store."""
    config, run_dir = killed_mid_capture_1(sources, tmp_path, monkeypatch, "corrupt")
    last = max((p for p in (layout.activation_store(run_dir, 0) / "layer-000" / "code" / "c").rglob("*")
                if p.is_file()), key=lambda p: int(p.parent.name))
    data = bytearray(last.read_bytes())
    data[-8] ^= 0xFF  # same size: only decoding sees it
    last.write_bytes(bytes(data))
    lines: list[str] = []
    plan, outcome = submit_run(load_config(config), executor="debug", echo=lines.append)
    assert outcome.failed == ["capture-activations/block-001"], (outcome.failed, lines)
    assert "CorruptArtifactError" in records.failure_line(run_dir, "capture-activations", "block-001")
    assert records.read_completion(run_dir, "capture-activations", "block-000") is None
    lines.clear()
    submit_debug(config, lines)
    ran = [l.split()[1] for l in lines if l.startswith("running ")]
    assert ran[:2] == ["capture-activations/block-000", "capture-activations/block-001"], ran
    assert final_bytes(run_dir) == reference[1]


def test_a_bfloat16_residual_gives_router_inputs_within_its_rounding(sources, tmp_path):
    """calibration.dtype bfloat16: the residual is stored in 16 bits (half the bytes) and the router
    inputs are the norm of the rounded residual, rounded again: within two bfloat16 roundings of the
    float32 capture's, and stored (as read with stored_dtype) in bfloat16."""
    from harc_hpc.stages.compute_statistics import layer_inputs

    got = {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_config(config_for(tmp_path, sources, f"dtype-{dtype}", **{"calibration.dtype": dtype}))
        merge_experts.run(cfg, cfg.run_dir)
        capture_activations.run(cfg, cfg.run_dir, block=0)
        got[dtype] = layer_inputs(cfg, cfg.run_dir, 0, "math", stored_dtype=True).load()
        got[f"{dtype}-bytes"] = sum(p.stat().st_size for p in layout.activation_store(cfg.run_dir, 0).rglob("c/*/*"))
    assert got["bfloat16"].dtype == torch.bfloat16 and got["float32"].dtype == torch.float32
    ref, x = got["float32"], got["bfloat16"].float()
    assert not torch.equal(ref, x)
    assert float((x - ref).abs().max() / ref.abs().max()) < 2 * 2 ** -8
    assert abs(got["bfloat16-bytes"] / got["float32-bytes"] - 0.5) < 0.01  # (a CRC32C per chunk aside)
