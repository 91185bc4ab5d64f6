"""Multimodal wrappers (Llama 4, Qwen3.5-MoE, Gemma 4: harc_hpc.models.families.wrappers) on tiny
random wrappers built from their config classes, vision towers included: the layer-wise engine runs
the wrapper's text model bit for bit as the wrapper's own forward does on text; the whole pipeline
merges every tensor, calibrates the text model's routers on text, and writes the whole checkpoint
back, which loads with the wrapper's own class with its processor and tokenizer files; the vision
tower can be taken from the base instead (``merge.vision: base``); a wrapper whose text model is not
where it should be is refused, naming the checkpoint and what was looked for, with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import test_model_coverage  # noqa: F401  (registers the tiny qwen3_5_moe_text and gemma4_text configs)
from harc_hpc.config import load_config
from harc_hpc.models.families import family_for_config
from harc_hpc.models.families.wrappers import WRAPPERS, WrapperTextModelError
from harc_hpc.stages import layout, merge_experts
from pipeline_fixtures import _texts, char_tokenizer, run_pipeline, tiny_config, write_config

#: the wrapper model types these tests run (tests/test_model_coverage.py counts them as tested)
WRAPPER_TYPES = ("gemma4", "llama4", "qwen3_5_moe")

#: tiny vision towers (and what else the wrapper's config needs)
VISION = {
    "llama4": lambda: {"vision_config": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, image_size=28, patch_size=14, vision_output_dim=32,
                                             projector_input_dim=32, projector_output_dim=32)},
    "qwen3_5_moe": lambda: {"vision_config": dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                                                  out_hidden_size=32, patch_size=4, num_position_embeddings=16,
                                                  temporal_patch_size=2, spatial_merge_size=2)},
    "gemma4": lambda: {"audio_config": None,
                       "vision_config": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, head_dim=8, patch_size=4,
                                             position_embedding_size=16)},
}
PROCESSOR_FILES = {"preprocessor_config.json": '{"image_processor_type": "tiny", "patch_size": 4}\n',
                   "processor_config.json": '{"processor_class": "tiny"}\n',
                   "chat_template.jinja": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}


def tiny_wrapper_config(model_type: str, layers: int = 2):
    from transformers import CONFIG_MAPPING

    text = tiny_config(WRAPPERS[model_type][0], layers=layers)
    text.pad_token_id = 0  # Gemma 4's wrapper masks multimodal tokens with it
    return CONFIG_MAPPING[model_type](text_config=text.to_dict(), **VISION[model_type]())


def build_wrapper_sources(root: Path, model_type: str, seed: int = 0, tasks=("math", "code")) -> dict:
    """build_tiny_sources for a wrapper: a base wrapper and one fine-tune-like source per task (base
    plus noise everywhere, the text model's routers moved a lot), each with tokenizer and processor
    files; the calibration data is text."""
    from transformers import AutoModelForImageTextToText

    root = Path(root)
    tok = char_tokenizer()
    conf = tiny_wrapper_config(model_type)
    torch.manual_seed(seed)
    base = AutoModelForImageTextToText.from_config(conf)
    paths = {"base": root / "base", "data": root / "data"}

    def save(model, path: Path):
        model.save_pretrained(path)
        tok.save_pretrained(path)
        for name, text in PROCESSOR_FILES.items():
            (path / name).write_text(text)

    save(base, paths["base"])
    (root / "data").mkdir(parents=True, exist_ok=True)
    for t_i, task in enumerate(tasks):
        g = torch.Generator().manual_seed(seed * 100 + t_i + 1)
        src = AutoModelForImageTextToText.from_config(conf)
        src.load_state_dict(base.state_dict())
        with torch.no_grad():
            for name, p in src.named_parameters():
                router = (name.endswith(("gate.weight", "router.weight", "router.proj.weight")) and p.dim() == 2
                          and p.shape[0] < 16)
                p.add_((1.0 if router else 0.02) * torch.randn(p.shape, generator=g) * (p.std() if p.numel() > 1 else 1.0))
        paths[task] = root / task
        save(src, paths[task])
        for split, n, s in (("calib", 12, seed), ("heldout", 6, seed + 1000)):
            with open(root / "data" / f"{task}-{split}.jsonl", "w") as fh:
                for text in _texts(task, n, s):
                    fh.write(json.dumps({"text": text}) + "\n")
    return paths


def _tensors(path: Path) -> dict:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("model_type", WRAPPER_TYPES)
def test_the_layerwise_forward_is_the_wrappers_own_on_text(tmp_path, model_type):
    """The text model lies where save_pretrained of the wrapper class puts it (WRAPPERS), and the
    layer-wise engine's text causal LM, read from there, gives the wrapper's own logits bit for bit."""
    from transformers import AutoModelForImageTextToText

    from harc_hpc.models.onload import OnloadedModel

    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(tiny_wrapper_config(model_type)).save_pretrained(tmp_path / "m")
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    fam = family_for_config(conf)
    keys = set(_tensors(tmp_path / "m"))
    assert fam.name == model_type and fam.text_model_type == WRAPPERS[model_type][0]
    assert {fam.find_router_disk_key(l, keys) for l in fam.moe_layers(conf)} <= keys
    assert any(not fam.is_text_key(k) for k in keys)  # a vision tower beside the text model
    model = OnloadedModel(tmp_path / "m", torch.device("cpu"))
    ids = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 8, 1, 0, 0]])
    hidden = model.embed(ids)
    for i in range(model.num_layers):
        model.onload(i)
        hidden = model.run_layer(i, hidden)
        model.offload(i)
    whole = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()
    with torch.no_grad():
        want = whole(input_ids=ids).logits
    assert torch.equal(model.head_logits(hidden), want)


@pytest.mark.parametrize("model_type", WRAPPER_TYPES)
def test_the_whole_pipeline_calibrates_the_text_model_and_writes_the_whole_wrapper(tmp_path, model_type):
    import transformers

    src = build_wrapper_sources(tmp_path / "src", model_type)
    with_report = model_type == "llama4"  # the report stage too, once (the suite's time)
    cfg = load_config(write_config(tmp_path, src, harc={"dtype": "float64"}, extra={"report.enabled": with_report}))
    run = cfg.run_dir
    run_pipeline(cfg, run)
    if with_report:
        from harc_hpc.stages import report

        report.run(cfg, run)
        m = json.loads((run / "report" / "metrics.json").read_text())
        rl = m["summary"]["router_level"]
        assert m["family"] == model_type and rl["calibrated"]["kl_mean"] < rl["merged"]["kl_mean"], rl
    out = layout.model_dir(run)
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == json.loads((src["base"] / "config.json").read_text())["architectures"]
    for name, text in PROCESSOR_FILES.items():
        assert (out / name).read_text() == text
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    # the routers: closer to the sources than the merged ones, written under the wrapper's names
    fam = family_for_config(conf)
    final, merged = _tensors(out), _tensors(layout.merged_dir(run))
    assert set(final) == set(merged)
    for l in layout.moe_layers(cfg):
        rep = json.loads(layout.router_report(run, l).read_text())
        assert rep["converged"], rep
        assert sum(rep["kl_after"].values()) < sum(rep["kl_before"].values()), rep
        w = load_file(str(layout.router_file(run, l)))["weight"]
        assert torch.equal(final[fam.router_disk_key(l)], w.to(final[fam.router_disk_key(l)].dtype))
    # the vision tower and projector: merged like any other tensor (linear: the sources' mean)
    sources = [_tensors(src[t]) for t in ("math", "code")]
    vision = [k for k in final if not fam.is_text_key(k)]
    assert vision
    for k in vision:
        assert torch.equal(final[k], merged[k])
        assert torch.allclose(final[k], (sources[0][k] + sources[1][k]) / 2, atol=1e-6), k
    record = json.loads((layout.merged_dir(run) / "harc_merge.json").read_text())
    assert record["wrapper"]["vision"] == "merge" and record["wrapper"]["non_text_tensors"] == len(vision)
    # loads with the wrapper's own class; finite logits on text
    model = getattr(transformers, conf["architectures"][0]).from_pretrained(str(out)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 3, 7]])).logits
    assert logits.shape[-1] == 128 and torch.isfinite(logits).all()


def test_the_vision_tower_from_the_base(tmp_path):
    src = build_wrapper_sources(tmp_path / "src", "llama4")
    cfg = load_config(write_config(tmp_path, src, extra={"merge.vision": "base"}))
    merge_experts.run(cfg, cfg.run_dir)
    merged, base = _tensors(layout.merged_dir(cfg.run_dir)), _tensors(src["base"])
    fam = family_for_config(json.loads((src["base"] / "config.json").read_text()))
    vision = [k for k in merged if not fam.is_text_key(k)]
    assert vision and all(torch.equal(merged[k], base[k]) for k in vision)
    assert not torch.equal(merged["language_model.model.embed_tokens.weight"],
                           base["language_model.model.embed_tokens.weight"])
    record = json.loads((layout.merged_dir(cfg.run_dir) / "harc_merge.json").read_text())
    assert record["wrapper"]["vision"] == "base" and set(vision) <= set(record["excluded_tensors"])


def test_a_wrapper_without_its_text_model_is_refused_with_nothing_written(tmp_path):
    src = build_wrapper_sources(tmp_path / "src", "llama4", tasks=("math",))
    # the code source's text model saved under another prefix than the wrapper's
    bad = tmp_path / "src" / "code"
    bad.mkdir()
    for f in src["math"].iterdir():
        if f.suffix != ".safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    save_file({k.replace("language_model.", "text_model.", 1): v for k, v in _tensors(src["math"]).items()},
              str(bad / "model.safetensors"), metadata={"format": "pt"})
    src["code"] = bad
    for task in ("code",):
        for split in ("calib", "heldout"):
            (src["data"] / f"{task}-{split}.jsonl").write_text('{"text": "x"}\n')
    cfg = load_config(write_config(tmp_path, src))
    with pytest.raises(WrapperTextModelError) as exc:
        merge_experts.run(cfg, cfg.run_dir)
    msg = str(exc.value)
    assert str(bad) in msg and "'language_model.model.layers.'" in msg and "llama4_text" in msg, msg
    assert not (cfg.run_dir / "merged").exists()
    # a wrapper's config without its text model
    conf = json.loads((src["math"] / "config.json").read_text())
    del conf["text_config"]
    with pytest.raises(WrapperTextModelError, match="no text_config"):
        family_for_config(conf)


def test_plan_reads_a_wrappers_shape_from_its_text_config():
    """The plan's model shape of a wrapper is its text model's (heads, head width, vocabulary)."""
    from harc_hpc.stages.estimate import ModelShape

    text = tiny_config("qwen3_5_moe_text", layers=2).to_dict()
    wrapper = {"model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
               "text_config": text, "vision_config": {}}
    assert ModelShape.from_config(wrapper) == ModelShape.from_config(text)
    assert ModelShape.from_config(wrapper).heads == text["num_attention_heads"] > 1
