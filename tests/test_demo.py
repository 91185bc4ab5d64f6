"""The demo sources: seeded generators, tokenizer, reproducible cached builds, config placeholders."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from harc_hpc.config import ConfigError, load_config
from harc_hpc.demo import QUICK_RECIPE, DemoRecipe, demo_dir, ensure_demo, has_placeholders, prepare_config
from harc_hpc.demo import build as demo_build
from harc_hpc.demo import corpus
from harc_hpc.demo.tokenizer import byte_tokenizer, encode

REPO = Path(__file__).resolve().parents[1]


def _tree_digests(root: Path, pattern: str = "*") -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob(pattern)) if p.is_file() and p.name != "build.json"}


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory) -> Path:
    return ensure_demo(QUICK_RECIPE, cache_dir=tmp_path_factory.mktemp("cache"))


# -- generators and tokenizer -------------------------------------------------------------------

@pytest.mark.parametrize("domain", ["math", "code", "text"])
def test_windows_are_seeded_ascii_and_exact_length(domain):
    a = corpus.packed_windows(domain, 20, 64, "s0")
    assert a == corpus.packed_windows(domain, 20, 64, "s0")
    assert a != corpus.packed_windows(domain, 20, 64, "s1")
    assert all(len(w) == 64 and w.isascii() for w in a)


def test_mixed_windows_follow_the_mix():
    ws = corpus.mixed_windows({"math": 0.5, "code": 0.5, "text": 0.0}, 200, 48, "m")
    assert ws == corpus.mixed_windows({"math": 0.5, "code": 0.5, "text": 0.0}, 200, 48, "m")
    code = sum("\n" in w for w in ws)
    assert 60 < code < 140  # every code window has a newline, math windows never do


def test_tokenizer_round_trip_through_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    byte_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    text = "def f(x):\n\treturn x * 2  # ok\n12+30=42."
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert ids == encode(text) == [ord(c) for c in text]
    assert tok.decode(ids) == text
    assert tok("é")["input_ids"] == [0]  # outside ASCII -> id 0


# -- builds -------------------------------------------------------------------------------------

def test_quick_build_layout(quick_build):
    root = quick_build
    assert root.name == QUICK_RECIPE.digest()
    for name in ("base", "math", "code"):
        assert (root / name / "model.safetensors").is_file()
        assert (root / name / "tokenizer.json").is_file()
        cfg = json.loads((root / name / "config.json").read_text())
        assert cfg["model_type"] == "olmoe" and cfg["num_experts"] == QUICK_RECIPE.num_experts
    for d in ("math", "code"):
        for split, n in (("calib", QUICK_RECIPE.calib_samples), ("heldout", QUICK_RECIPE.heldout_samples)):
            lines = (root / "data" / f"{d}-{split}.jsonl").read_text().splitlines()
            assert len(lines) == n
            assert all(len(json.loads(l)["text"]) == QUICK_RECIPE.seq_len for l in lines)
    assert json.loads((root / "recipe.json").read_text())["recipe"] == QUICK_RECIPE.to_json()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(root / "math"), local_files_only=True)
    assert model.config.num_experts_per_tok == QUICK_RECIPE.top_k


def test_finetunes_change_only_their_own_experts_and_the_routers(quick_build):
    """finetune_scope own_experts: math owns experts 0-1 of 4, code 2-3; everything else but the
    routers stays the base's, bit for bit, so task arithmetic keeps every source's experts."""
    from safetensors.torch import load_file

    base = load_file(str(quick_build / "base" / "model.safetensors"))
    for domain, own in (("math", [0, 1]), ("code", [2, 3])):
        src = load_file(str(quick_build / domain / "model.safetensors"))
        assert set(src) == set(base)
        moved_experts = set()
        for key, value in src.items():
            if key.endswith("mlp.gate.weight"):
                continue  # the routers are fine-tuned
            if ".mlp.experts." in key:  # saved one matrix per expert: ...mlp.experts.<e>.<proj>.weight
                if not torch.equal(value, base[key]):
                    moved_experts.add(int(key.split(".mlp.experts.")[1].split(".")[0]))
            else:
                assert torch.equal(value, base[key]), (domain, key)
        assert moved_experts == set(own), domain
        assert any(not torch.equal(src[k], base[k]) for k in src if k.endswith("mlp.gate.weight"))


def test_same_seed_gives_byte_identical_sources(quick_build, tmp_path):
    again = ensure_demo(QUICK_RECIPE, cache_dir=tmp_path)
    assert again != quick_build
    assert _tree_digests(again) == _tree_digests(quick_build)


def test_other_seed_gives_other_sources(quick_build, tmp_path):
    import dataclasses

    other = ensure_demo(dataclasses.replace(QUICK_RECIPE, seed=1), cache_dir=tmp_path)
    assert other.name != quick_build.name
    a, b = _tree_digests(quick_build), _tree_digests(other)
    assert a["math/model.safetensors"] != b["math/model.safetensors"]
    assert a["data/math-calib.jsonl"] != b["data/math-calib.jsonl"]


def test_second_call_reuses_the_cache(quick_build, monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("rebuilt a cached demo")

    monkeypatch.setattr(demo_build, "build_into", no_build)
    assert ensure_demo(QUICK_RECIPE, cache_dir=quick_build.parents[1]) == quick_build


def test_failed_build_leaves_no_cache(tmp_path, monkeypatch):
    def half_build(out, recipe, progress=None):
        (Path(out) / "base").mkdir()
        (Path(out) / "base" / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # what a killed job looks like from inside

    monkeypatch.setattr(demo_build, "build_into", half_build)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo(QUICK_RECIPE, cache_dir=tmp_path)
    assert list((tmp_path / "demo").iterdir()) == []


def test_leftovers_of_killed_builds_are_removed(tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys

    final = demo_dir(QUICK_RECIPE, tmp_path)
    final.parent.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that is gone
    host = socket.gethostname()
    dead = final.parent / f".{final.name}.tmp-{host}-{proc.pid}-0123abcd"
    alive = final.parent / f".{final.name}.tmp-{host}-{os.getpid()}-0123abcd"
    other_host = final.parent / f".{final.name}.tmp-elsewhere-{proc.pid}-0123abcd"
    for d in (dead, alive, other_host):
        d.mkdir()

    def failing_build(out, recipe, progress=None):
        raise RuntimeError("stop after the sweep")

    monkeypatch.setattr(demo_build, "build_into", failing_build)
    with pytest.raises(RuntimeError, match="after the sweep"):
        ensure_demo(QUICK_RECIPE, cache_dir=tmp_path, progress=lambda m: None)
    assert not dead.exists() and alive.exists() and other_host.exists()
    assert sorted(p.name for p in final.parent.iterdir()) == sorted([alive.name, other_host.name])


def test_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("HARC_HPC_CACHE", str(tmp_path / "env"))
    assert demo_dir(QUICK_RECIPE) == tmp_path / "env" / "demo" / QUICK_RECIPE.digest()
    assert demo_dir(QUICK_RECIPE, tmp_path / "x").parent == tmp_path / "x" / "demo"
    monkeypatch.delenv("HARC_HPC_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo_dir(QUICK_RECIPE).parents[1] == tmp_path / "home" / ".cache" / "harc-hpc"


def test_digest_tracks_the_recipe():
    assert DemoRecipe().digest() == DemoRecipe().digest()
    assert DemoRecipe(seed=1).digest() != DemoRecipe().digest()
    assert DemoRecipe(router_lr_mult=1.0).digest() != DemoRecipe().digest()


# -- config placeholders -------------------------------------------------------------------------

def _demo_config(tmp_path: Path, cache: Path, extra_source: dict | None = None) -> Path:
    sources = [
        {"name": d, "path": f"demo:{d}", "calibration": {"files": [f"demo:{d}-calib.jsonl"]},
         "heldout": {"files": [f"demo:{d}-heldout.jsonl"]}}
        for d in ("math", "code")
    ]
    if extra_source:
        sources.append(extra_source)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"name": "t", "output_dir": str(tmp_path / "runs")},
        "demo": {"enabled": True, "cache_dir": str(cache)},
        "models": {"base": "demo:base", "sources": sources},
    }))
    return path


def test_prepare_config_fills_in_demo_paths(quick_build, tmp_path):
    cfg = load_config(_demo_config(tmp_path, quick_build.parents[1]))
    assert has_placeholders(cfg)
    out = prepare_config(cfg, recipe=QUICK_RECIPE)
    assert not has_placeholders(out)
    assert has_placeholders(cfg)  # the input is not modified
    assert out.models.base == str(quick_build / "base")
    math = out.models.sources[0]
    assert math.path == str(quick_build / "math")
    assert math.calibration.files == [quick_build / "data" / "math-calib.jsonl"]
    assert out.models.sources[1].heldout.files == [quick_build / "data" / "code-heldout.jsonl"]


def test_prepare_config_names_unknown_placeholders(quick_build, tmp_path):
    cfg = load_config(_demo_config(tmp_path, quick_build.parents[1],
                                   {"name": "poetry", "path": "demo:poetry"}))
    with pytest.raises(ConfigError, match=r"models.sources\[2\].path: unknown demo model 'demo:poetry'"):
        prepare_config(cfg, recipe=QUICK_RECIPE)


def test_prepare_config_is_a_no_op_without_demo(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"models": {"sources": [{"name": "a", "path": "org/model"}]}}))
    cfg = load_config(path)
    assert prepare_config(cfg) is cfg


def test_tiny_config_uses_only_known_placeholders(quick_build, tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides={"demo.cache_dir": str(quick_build.parents[1])})
    assert cfg.demo.enabled and cfg.executor.kind == "local" and cfg.merge.method == "task_arithmetic"
    assert cfg.harc.block_size == 1
    out = prepare_config(cfg, recipe=QUICK_RECIPE)
    assert not has_placeholders(out)
    for src in out.models.sources:
        assert Path(src.path).is_dir()
        assert all(Path(f).is_file() for f in src.calibration.files + src.heldout.files)


@pytest.mark.slow
def test_the_demo_shows_breakdown_and_repair_deterministically(tmp_path):
    """The README's demo command on the shipped recipe, then the demo's targets from metrics.json.

    The sources are built once into a private cache (about 3.5 minutes on 2 cores); each pipeline run
    takes about a minute: configs/tiny.yaml, the same config again under another name (same bytes, same
    metrics), and the paper's alpha 0.9.
    """
    cache = tmp_path / "cache"
    harc_hpc = Path(sys.executable).with_name("harc-hpc")

    def config(name: str, lm_eval: bool = True, **harc) -> Path:
        raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
        raw["run"].update(name=name, output_dir=str(tmp_path / "runs"))
        raw["demo"]["cache_dir"] = str(cache)
        raw["harc"].update(harc)
        # lm-eval on 20 items per task keeps the test's time down (tests/test_lm_eval.py checks
        # the scores themselves; here they are only bounded); the alpha-0.9 run needs none.
        raw["report"]["lm_eval_options"] = {"limit": 20}
        if not lm_eval:
            raw["report"]["lm_eval_tasks"] = []
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    def submit(path: Path) -> str:
        res = subprocess.run([str(harc_hpc), "submit", str(path)], capture_output=True, text=True, timeout=1500)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res.stdout

    def metrics(name: str) -> dict:
        return json.loads((tmp_path / "runs" / name / "report" / "metrics.json").read_text())

    first = submit(config("tiny"))
    assert "report:" in first and "router-level top-k mismatch, worst layer" in first
    m = metrics("tiny")
    merged, calibrated = m["summary"]["router_level"]["merged"], m["summary"]["router_level"]["calibrated"]
    # routing breakdown: on its worst layer the merged router picks other experts for >= 15 % of selections
    assert merged["topk_mismatch_worst_layer"] >= 0.15
    # issue 14's targets on seed 0 (benchmarks/bench_demo_seeds.py has seeds 0-2; docs/demo.md):
    # router KL down >= 50 %, and on both domains the merge keeps <= 70 % of the fine-tune's gain,
    # the router-swap oracle wins back >= 50 % of what the merge lost (routing is the failure), and
    # HARC reaches >= 50 % of the oracle's gain.
    assert m["summary"]["router_level"]["kl_reduction"] >= 0.5
    assert calibrated["kl_mean"] < merged["kl_mean"]
    for task, share in m["summary"]["gap_shares"].items():
        assert share["merge_keeps_gain"] <= 0.7, (task, share)
        assert share["oracle_recovers"] >= 0.5, (task, share)
        assert share["harc_recovers_of_oracle"] >= 0.5, (task, share)
    lm = m["lm_eval"]["models"]
    assert set(lm) == {"base", "source:math", "source:code", "merged", "calibrated", "oracle"}
    assert all(0.0 <= lm[name][task]["exact_match,none"] <= 1.0 for name in lm for task in lm[name])
    assert "nothing to do" in submit(config("tiny"))  # a rerun reuses everything

    submit(config("tiny-again"))
    res = subprocess.run([str(harc_hpc), "compare", str(tmp_path / "runs" / "tiny"), str(tmp_path / "runs" / "tiny-again")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    routers = sorted((tmp_path / "runs" / "tiny" / "routers").glob("layer-*.safetensors"))
    assert len(routers) == 4
    for r in routers:
        assert r.read_bytes() == (tmp_path / "runs" / "tiny-again" / "routers" / r.name).read_bytes(), r.name

    # HARC with the paper's settings (alpha 0.9): mean router-level KL down by >= 30 % against the merge
    submit(config("tiny-paper", lm_eval=False, alpha=0.9, max_iter=1000))
    assert metrics("tiny-paper")["summary"]["router_level"]["kl_reduction"] >= 0.30
