"""Quantized inputs (FP8 blocks as DeepSeek-V3 releases them, llm-compressor's compressed-tensors):
dequantized on read bit for bit as transformers / compressed-tensors do, merged, written bfloat16 or
(output.quantize: fp8-block) as FP8 blocks again; bad scales and unsupported formats refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harc_hpc.io.checkpoint import Checkpoint, SourceKind
from harc_hpc.io.quantized import QuantizedFormatError, quantize_fp8_block

BLOCK = (16, 16)


def _write(d: Path, tensors: dict, quantization_config: dict, **config) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"dtype": "bfloat16", **config,
                                               "quantization_config": quantization_config}))
    return d


FP8_CONFIG = {"quant_method": "fp8", "weight_block_size": list(BLOCK), "activation_scheme": "dynamic", "fmt": "e4m3"}


def test_fp8_blocks_dequantize_as_transformers_does_bit_for_bit(tmp_path):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    g = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (64, 48), "ragged.weight": (40, 24), "experts.gate_up_proj": (2, 32, 48)}
    stored, want = {}, {}
    for key, shape in shapes.items():
        v, s = quantize_fp8_block(torch.randn(shape, generator=g) * 3, BLOCK)
        stored[key], stored[key + "_scale_inv"] = v, s
        # transformers' backward dequantization handles a partial last block; computed in float32
        want[key] = _dequantize_fp8_weight(v, s, list(BLOCK), torch.float32).to(torch.bfloat16)
        if all(n % b == 0 for n, b in zip(shape[-2:], BLOCK)):  # its load-time dequantization (dequantize=True)
            assert torch.equal(want[key], Fp8Dequantize(None)._dequantize_one(v, s, output_dtype=torch.bfloat16))
    stored["norm.weight"] = torch.ones(8, dtype=torch.bfloat16)
    ck = Checkpoint(_write(tmp_path / "fp8", stored, FP8_CONFIG))
    assert ck.dequantized_by_kind() == {"fp8-block": sorted(shapes)}
    assert ck.info("a.weight").kind is SourceKind.FP8_BLOCK and ck.info("norm.weight").kind is SourceKind.SAFETENSORS
    for key in shapes:
        got = ck.get_tensor(key)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want[key]), key
        flat = want[key].reshape(-1)
        for start, n in ((0, 7), (33, 500), (flat.numel() - 100, 100)):  # any part: the same bits
            assert torch.equal(ck.read_part(key, start, n), flat[start:start + n])
    assert sorted(ck.stored_keys()) == sorted(stored)  # what is on disk, for copying it as stored
    assert torch.equal(ck.read_stored("a.weight_scale_inv"), stored["a.weight_scale_inv"])


def _ct_scheme(fmt: str):
    """(QuantizationArgs, compressor class) of compressed-tensors for ``fmt``: FP8 per channel, or
    4-bit integers packed, in groups of 16."""
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs

    if fmt == "float-quantized":
        args = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)
        return args, FloatQuantizationCompressor
    args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=16, symmetric=True, dynamic=False)
    return args, PackedQuantizationCompressor


def _ct_compress(w: torch.Tensor, fmt: str) -> tuple[dict, torch.Tensor]:
    """``w`` (rows, cols) compressed by compressed-tensors' own compressor (scales from its own
    calculate_qparams, in ``w``'s dtype): (the stored tensors under ``weight*`` names, the weight its
    own decompressor gives back, in ``w``'s dtype)."""
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args, comp = _ct_scheme(fmt)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    keep = fmt == "float-quantized"
    x = w.float() if keep else w.float().unflatten(-1, (w.shape[-1] // 16, 16))
    lo, hi = x.amin(dim=-1, keepdim=keep).clamp(max=0), x.amax(dim=-1, keepdim=keep).clamp(min=0)
    s, z = calculate_qparams(lo, hi, args)
    out = comp.compress({"weight": w, "weight_scale": s.to(w.dtype), "weight_zero_point": z}, scheme)
    return out, comp.decompress(out, scheme)["weight"].to(w.dtype)


def _ct_config(fmt: str, ignore: list) -> dict:
    args, _ = _ct_scheme(fmt)
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": args.model_dump(), "format": fmt}},
            "ignore": ignore}


def _compressed(tmp_path: Path, fmt: str):
    """A two-layer compressed-tensors checkpoint made by compressed-tensors' own compressors."""
    g = torch.Generator().manual_seed(1)
    stored, want = {"lm_head.weight": torch.randn(8, 64, generator=g).to(torch.bfloat16)}, {}
    for name in ("l0.q_proj", "l1.down_proj"):
        out, want[name + ".weight"] = _ct_compress(torch.randn(24, 64, generator=g).to(torch.bfloat16), fmt)
        stored.update({f"{name}.{k}": v for k, v in out.items()})
    return _write(tmp_path / fmt, stored, _ct_config(fmt, ["lm_head"])), want


@pytest.mark.parametrize("fmt", ["float-quantized", "pack-quantized"])
def test_compressed_tensors_dequantize_as_compressed_tensors_does(tmp_path, fmt):
    pytest.importorskip("compressed_tensors")
    path, want = _compressed(tmp_path, fmt)
    ck = Checkpoint(path)
    assert ck.dequantized_by_kind() == {"compressed-tensors": sorted(want)}
    for key, w in want.items():
        assert torch.equal(ck.get_tensor(key), w), key
        assert torch.equal(ck.read_part(key, 70, 300), w.reshape(-1)[70:370])
    assert ck.tensor_dtype("lm_head.weight") == torch.bfloat16 and not ck.is_dequantized("lm_head.weight")


def test_bad_scales_and_unsupported_formats_are_named(tmp_path):
    v, s = quantize_fp8_block(torch.randn(32, 32), BLOCK)
    with pytest.raises(QuantizedFormatError, match=r"tensor a\.weight is stored as float8 but its scales "
                                                   r"a\.weight_scale_inv are missing"):
        Checkpoint(_write(tmp_path / "missing", {"a.weight": v}, FP8_CONFIG))
    with pytest.raises(QuantizedFormatError, match=r"tensor a\.weight_scale_inv has shape \(1, 2\).*needs \(2, 2\)"):
        Checkpoint(_write(tmp_path / "shape", {"a.weight": v, "a.weight_scale_inv": s[:1]}, FP8_CONFIG))
    with pytest.raises(QuantizedFormatError, match=r"format 'nvfp4-pack-quantized' is not supported; supported: "
                                                   r"fp8; compressed-tensors \(float-quantized.*pack-quantized\)"):
        Checkpoint(_write(tmp_path / "nvfp4", {"a.weight": v.float()},
                          {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {}}))
    with pytest.raises(QuantizedFormatError, match=r"quant_method 'gptq' is not supported; supported: fp8"):
        Checkpoint(_write(tmp_path / "gptq", {"a.weight": v.float()}, {"quant_method": "gptq"}))


# -- a tiny FP8 DeepSeek-V3, end to end ------------------------------------------------------------------

def _to_fp8(src: Path, dst: Path) -> None:
    """``src`` (a bf16 model directory) with every linear weight of the decoder layers stored as
    FP8 blocks, routers, norms and embeddings as they are: how DeepSeek-V3 is released."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for key, t in tensors.items():
        if ".layers." in key and key.endswith("proj.weight") and t.dim() == 2:
            out[key], out[key + "_scale_inv"] = quantize_fp8_block(t, BLOCK)
        else:
            out[key] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    conf = json.loads((src / "config.json").read_text())
    conf["quantization_config"] = FP8_CONFIG
    (dst / "config.json").write_text(json.dumps(conf, indent=2))


def test_fp8_deepseek_v3_runs_the_pipeline_and_requantizes(tmp_path):
    from transformers import AutoModelForCausalLM

    from harc_hpc.config import load_config
    from harc_hpc.stages import layout, merge_experts
    from pipeline_fixtures import build_tiny_sources, run_pipeline, write_config

    bf16 = build_tiny_sources(tmp_path / "bf16", family="deepseek_v3", layers=2)
    src = dict(bf16)
    for name in ("base", "math", "code"):
        src[name] = tmp_path / "fp8" / name
        _to_fp8(bf16[name], src[name])
    fp8_keys = Checkpoint(src["base"]).fp8_blocks()
    assert fp8_keys and all(".mlp.gate.weight" not in k for k in fp8_keys)

    # bad input: a scale missing -> named, nothing written
    broken = tmp_path / "broken"
    shutil.copytree(src["code"], broken)
    t = load_file(str(broken / "model.safetensors"))
    gone = sorted(k for k in t if k.endswith("_scale_inv"))[0]
    del t[gone]
    save_file(t, str(broken / "model.safetensors"))
    (tmp_path / "bad").mkdir()
    bad = load_config(write_config(tmp_path / "bad", {**src, "code": broken}))
    with pytest.raises(QuantizedFormatError, match=gone):
        merge_experts.run(bad, bad.run_dir)
    assert not layout.merged_dir(bad.run_dir).exists()

    # the bf16 merge (the default): a plain bfloat16 checkpoint, the record says what was dequantized
    (tmp_path / "plain").mkdir()
    plain = load_config(write_config(tmp_path / "plain", src, name="plain"))
    merge_experts.run(plain, plain.run_dir)
    merged_plain = Checkpoint(layout.merged_dir(plain.run_dir))
    record = json.loads((layout.merged_dir(plain.run_dir) / "harc_merge.json").read_text())
    assert record["dequantized"] == {"fp8-block": sorted(fp8_keys)} and record["requantized"] == []
    assert "quantization_config" not in merged_plain.config and not merged_plain.dequantized
    # in the model's dtype (these tiny models are float32; a released DeepSeek-V3 is bfloat16)
    assert all(merged_plain.tensor_dtype(k) == torch.float32 for k in fp8_keys)

    # output.quantize: fp8-block, the whole pipeline
    cfg = load_config(write_config(tmp_path, src, harc={"dtype": "float64"}, extra={"output.quantize": "fp8-block"}))
    run_pipeline(cfg, cfg.run_dir)
    merged_dir = layout.merged_dir(cfg.run_dir)
    record = json.loads((merged_dir / "harc_merge.json").read_text())
    assert record["requantized"] == sorted(fp8_keys, key=lambda k: record["requantized"].index(k))
    assert sorted(record["requantized"]) == sorted(fp8_keys)
    merged = Checkpoint(merged_dir)
    assert merged.config["quantization_config"]["quant_method"] == "fp8"
    for key in fp8_keys:  # within FP8's rounding of the bf16 merge (3 mantissa bits, per-block scale)
        assert merged.stored_info(key).dtype == torch.float8_e4m3fn
        x = merged_plain.get_tensor(key).float()
        scale = merged.read_stored(key + "_scale_inv").repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)
        scale = scale[:x.shape[0], :x.shape[1]]
        err = (merged.get_tensor(key).float() - x).abs()
        assert bool((err <= x.abs() * (2**-4 + 2**-8) + scale * 2**-9).all()), key
    final = Checkpoint(layout.model_dir(cfg.run_dir))
    assert sorted(final.fp8_blocks()) == sorted(fp8_keys)  # the final model keeps the FP8 blocks
    model = AutoModelForCausalLM.from_pretrained(str(layout.model_dir(cfg.run_dir)), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 3, 7]])).logits
    assert torch.isfinite(logits).all()
    # transformers' own dequantization on load gives the reader's values, bit for bit
    params = dict(model.named_parameters())
    attn = [k for k in fp8_keys if ".self_attn." in k]
    assert attn
    for key in attn:
        assert torch.equal(params[key].detach(), final.get_tensor(key).to(torch.bfloat16)), key
    for l in layout.moe_layers(cfg):
        rep = json.loads(layout.router_report(cfg.run_dir, l).read_text())
        assert sum(rep["kl_after"].values()) < sum(rep["kl_before"].values()), rep
        router = final.get_tensor(f"model.layers.{l}.mlp.gate.weight")
        assert torch.equal(model.model.layers[l].mlp.gate.weight.detach().to(router.dtype), router)


# -- a tiny compressed-tensors FP8 MoE, end to end ---------------------------------------------------------

def _to_compressed(src: Path, dst: Path, fmt: str = "float-quantized") -> dict:
    """``src`` (a model directory) as llm-compressor writes a bfloat16 model quantized with ``fmt``:
    every linear weight of the decoder layers compressed by compressed-tensors, routers, norms,
    embeddings and the LM head bfloat16. Returns {weight key: what compressed-tensors decompresses}."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    out, want = {}, {}
    for key, t in load_file(str(src / "model.safetensors")).items():
        t = t.to(torch.bfloat16)
        if ".layers." in key and key.endswith("proj.weight") and t.dim() == 2:
            stored, want[key] = _ct_compress(t, fmt)
            out.update({f"{key[:-len('weight')]}{k}": v for k, v in stored.items()})
        else:
            out[key] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    conf = json.loads((src / "config.json").read_text())
    conf.update(dtype="bfloat16", quantization_config=_ct_config(fmt, ["lm_head", "re:.*mlp.gate$"]))
    (dst / "config.json").write_text(json.dumps(conf, indent=2))
    return want


def test_compressed_tensors_fp8_moe_runs_the_pipeline(tmp_path):
    """A compressed-tensors FP8 OLMoE: the merge dequantizes (a bfloat16 checkpoint, harc_merge.json
    lists what), capture, statistics, solve and assembly run, the model loads with transformers and
    its routers are closer to the sources than the merged ones."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from harc_hpc.config import load_config
    from harc_hpc.stages import layout
    from pipeline_fixtures import build_tiny_sources, run_pipeline, write_config

    plain = build_tiny_sources(tmp_path / "plain", family="olmoe", layers=1)
    src = dict(plain)
    for name in ("base", "math", "code"):
        src[name] = tmp_path / "ct" / name
        want = _to_compressed(plain[name], src[name])
    ck = Checkpoint(src["code"])
    assert ck.dequantized_by_kind() == {"compressed-tensors": sorted(want)}
    assert all(".mlp.gate." not in k for k in want)
    for key in (sorted(want)[0], sorted(want)[-1]):  # read as compressed-tensors decompresses
        assert torch.equal(ck.get_tensor(key), want[key]), key

    cfg = load_config(write_config(tmp_path, src, harc={"dtype": "float64"}))
    run_pipeline(cfg, cfg.run_dir)
    merged_dir = layout.merged_dir(cfg.run_dir)
    record = json.loads((merged_dir / "harc_merge.json").read_text())
    assert record["dequantized"] == {"compressed-tensors": sorted(want)} and record["requantized"] == []
    merged = Checkpoint(merged_dir)
    assert "quantization_config" not in merged.config and not merged.dequantized
    assert sorted(merged.keys()) == sorted(load_file(str(plain["base"] / "model.safetensors")))
    assert {merged.tensor_dtype(k) for k in merged.keys()} == {torch.bfloat16}
    final = layout.model_dir(cfg.run_dir)
    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 3, 7]])).logits
    assert torch.isfinite(logits).all()
    for l in layout.moe_layers(cfg):
        rep = json.loads(layout.router_report(cfg.run_dir, l).read_text())
        assert sum(rep["kl_after"].values()) < sum(rep["kl_before"].values()), rep


# -- harc-hpc plan: a dequantizing merge's output and the disk it needs ----------------------------------

def test_plan_states_the_dequantized_output_and_the_disk_it_needs(tmp_path):
    """Planned from config.json alone (Moonlight-16B-A3B's DeepSeek-V3 shape, released FP8 blocks as
    DeepSeek-V3 is; and as a compressed-tensors FP8 model): the merge's output is the dequantized
    model in its dtype, or FP8 blocks again with output.quantize: fp8-block, and the notes say so."""
    from conftest import write_toy_config

    from harc_hpc.config import load_config
    from harc_hpc.errors import format_bytes
    from harc_hpc.io.quantized import config_output_bytes
    from harc_hpc.pipeline.api import plan_estimates
    from harc_hpc.stages.estimate import ModelShape

    shape_conf = json.loads((Path(__file__).parent.parent / "configs" / "model-shapes" /
                             "moonlight-16b-a3b.json").read_text())
    fp8 = {**FP8_CONFIG, "weight_block_size": [128, 128]}

    def merge_estimate(quantization_config, **over):
        model = tmp_path / f"model-{len(list(tmp_path.glob('model-*')))}"
        model.mkdir()
        conf = {**shape_conf, **({"quantization_config": quantization_config} if quantization_config else {})}
        (model / "config.json").write_text(json.dumps(conf))  # all a plan reads of a model
        cfg = load_config(write_toy_config(tmp_path), overrides={
            "models.sources.a.path": str(model), "models.sources.b.path": str(model), **over})
        _, _, est, _ = plan_estimates(cfg)
        return next(e for e in est["stages"] if e["stage"] == "merge-experts"), est["table"]

    shape = ModelShape.from_config(shape_conf)
    params = shape.total_params()
    bf16 = params * 2
    plain, _ = merge_estimate(None)
    assert plain["scratch_bytes"] == bf16 and not any("quantized" in n for n in plain["notes"])

    deq, table = merge_estimate(fp8)
    assert deq["scratch_bytes"] == bf16  # the dequantized model, bfloat16 (its config's dtype)
    assert f"input quantized (fp8, ~" in table and "dequantized on read" in table
    assert f"written dequantized, bfloat16, {format_bytes(bf16)}; disk needed: {format_bytes(bf16)}" in table
    assert deq["seconds"] < plain["seconds"]  # the sources are read at a byte a weight

    req, table = merge_estimate(fp8, **{"output.quantize": "fp8-block"})
    kept = 2 * shape.vocab * shape.hidden + len(shape.moe_layers) * shape.experts * shape.hidden
    assert req["scratch_bytes"] == config_output_bytes({"quantization_config": fp8}, params, 2, "fp8-block", kept)
    assert 0.5 * bf16 < req["scratch_bytes"] < 0.6 * bf16  # a byte a weight, embeddings and routers bf16
    assert (f"re-quantized as FP8 blocks (output.quantize: fp8-block), {format_bytes(req['scratch_bytes'])}; "
            f"disk needed: {format_bytes(req['scratch_bytes'])}") in table

    f32, table = merge_estimate(fp8, **{"merge.out_dtype": "float32"})
    assert f32["scratch_bytes"] == params * 4 and "written dequantized, float32" in table

    ct, table = merge_estimate(_ct_config("float-quantized", ["lm_head"]), **{"output.quantize": "fp8-block"})
    assert ct["scratch_bytes"] == bf16 and "input quantized (compressed-tensors, ~" in table
    assert "re-quantizes FP8 block inputs only" in table


# -- peak host memory of a dequantizing merge ---------------------------------------------------------------

MERGE_RSS = r"""
import json, sys
from pathlib import Path

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

import torch  # noqa: F401  the import baseline
from harc_hpc.io.checkpoint import Checkpoint
from harc_hpc.merge import resolve_settings
from harc_hpc.merge.engine import MergeInput, merge_checkpoints

root = Path(sys.argv[1])
inputs = {n: MergeInput(n, Checkpoint(root / n, name=n)) for n in ("base", "a", "b")}
method, params = resolve_settings("task_arithmetic", None, {"lambda": 0.5}, ["a", "b"])
baseline = status("VmRSS")
stats = merge_checkpoints(root / "out", [inputs["a"], inputs["b"]], inputs["base"], method, params)
print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "requantized": stats["requantized"]}))
"""


def test_a_dequantizing_merge_keeps_the_merges_memory_bound(tmp_path):
    """Three FP8 checkpoints of two OLMoE-shaped experts (2048 x 4096 and 4096 x 2048 FP8 blocks of
    128 x 128; float32 models: 32 MiB a tensor dequantized, 192 MiB a model) merged in a fresh
    process (task arithmetic, what the merge stage runs): its peak RSS over the import baseline stays
    within the merge's bound, three of the largest (dequantized) tensors + 1 GiB (docs/merging.md).
    Measured on a 2-core VM: 0.3-0.4 GiB of the 1.1 GiB bound; with five experts (1.4 GiB of inputs
    dequantized, more than the bound) 0.34-0.45 GiB."""
    import subprocess
    import sys

    from transformers import OlmoeConfig

    d, inter, experts = 4096, 2048, 2
    conf = OlmoeConfig(vocab_size=32, hidden_size=d, intermediate_size=inter, num_hidden_layers=1,
                       num_attention_heads=32, num_key_value_heads=32, num_experts=experts,
                       num_experts_per_tok=2).to_dict()
    conf["dtype"] = "float32"
    g = torch.Generator().manual_seed(0)
    values = {}  # the models share their FP8 values (random bytes, never NaN), not their scales
    for e in range(experts):
        for proj, shape in (("gate_proj", (inter, d)), ("up_proj", (inter, d)), ("down_proj", (d, inter))):
            bits = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g) & 0xF7  # exponent < 15
            values[f"model.layers.0.mlp.experts.{e}.{proj}.weight"] = bits.view(torch.float8_e4m3fn)
    largest = max(v.numel() for v in values.values()) * 4  # dequantized to float32
    qc = {**FP8_CONFIG, "weight_block_size": [128, 128]}
    for name in ("base", "a", "b"):
        tensors = {"model.layers.0.mlp.gate.weight": torch.randn(experts, d, generator=g), **values}
        for key, v in values.items():
            tensors[key + "_scale_inv"] = torch.rand(v.shape[0] // 128, v.shape[1] // 128, generator=g) / 64
        _write(tmp_path / name, tensors, qc, **conf)
    dequantized = 3 * experts * 3 * largest
    bound = 3 * largest + 2**30
    out = subprocess.run([sys.executable, "-c", MERGE_RSS, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    over = got["peak"] - got["baseline"]
    print(f"peak RSS over the import baseline {over / 2**20:.0f} MiB; bound {bound / 2**20:.0f} MiB; "
          f"the inputs dequantized {dequantized / 2**20:.0f} MiB")
    assert over <= bound, (over, bound)
    # and below what holding every input dequantized would take: a merge that did not stream would fail
    assert over < dequantized, (over, dequantized)
    shutil.copyfile(tmp_path / "base" / "config.json", tmp_path / "out" / "config.json")
    merged = Checkpoint(tmp_path / "out")  # written dequantized: float32, not FP8
    assert got["requantized"] == [] and not merged.dequantized
    key = f"model.layers.0.mlp.experts.{experts - 1}.down_proj.weight"
    assert merged.tensor_dtype(key) == torch.float32 and tuple(merged.tensor_shape(key)) == (d, inter)
