"""Hub sources (harc_hpc.io.sources): ``owner/name@rev`` parsed and pinned to a commit once per run,
read from a local directory laid out as the hub cache (never the network), the files a snapshot
fetches, and ``plan`` on the shipped configs before any weights exist."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from harc_hpc.cli import main
from harc_hpc.config import load_config
from harc_hpc.io.checkpoint import CheckpointError, resolve_model_path
from harc_hpc.io.sources import (HubSourceError, allow_patterns, hub_source, pin_sources, source_record,
                                 split_revision)
from harc_hpc.pipeline.submit import save_run_config

REPO = Path(__file__).resolve().parents[1]
SHA1 = "1111111111111111111111111111111111111111"
SHA2 = "2222222222222222222222222222222222222222"


@pytest.fixture
def hub(tmp_path, monkeypatch, moe_models):
    """A hub cache holding ``owner/tiny`` (an OLMoE toy) at SHA1 (main and tag v1), offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    models = moe_models("olmoe")

    def add(repo: str, commit: str, src: Path, refs=("main",)) -> Path:
        root = cache / f"models--{repo.replace('/', '--')}"
        shutil.copytree(src, root / "snapshots" / commit)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        for ref in refs:
            (root / "refs" / ref).write_text(commit)
        return root / "snapshots" / commit

    add("owner/tiny", SHA1, models["a"], refs=("main", "v1"))
    return cache, add, models


def _config(tmp_path, a="owner/tiny", b="owner/tiny@v1", base="owner/tiny", name="run", **models):
    import yaml

    data = {"run": {"name": name, "output_dir": str(tmp_path / "runs")},
            "models": {"base": base, "sources": [{"name": "a", "path": a}, {"name": "b", "path": b}], **models},
            "merge": {"method": "linear"}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def test_split_revision_only_for_hub_ids(tmp_path):
    assert split_revision("owner/name@v1.2") == ("owner/name", "v1.2")
    assert split_revision("owner/name@refs/pr/3") == ("owner/name", "refs/pr/3")
    assert split_revision("owner/name") == ("owner/name", None)
    local = tmp_path / "user@host" / "model"
    local.mkdir(parents=True)
    assert split_revision(str(local)) == (str(local), None)  # a local path keeps its @
    assert split_revision("./x@y") == ("./x@y", None)
    assert hub_source(str(local)) is None and hub_source("/no/such@dir") is None
    assert hub_source("owner/name@main") == ("owner/name", "main")


def test_allow_patterns_fetch_only_what_the_stages_read():
    from huggingface_hub.utils import filter_repo_objects

    from harc_hpc.io.sources import IGNORE

    files = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "preprocessor_config.json", "modeling_x.py", "configuration_x.py",
             "pytorch_model.bin", "original/model.safetensors", "original/params.json", "README.md",
             ".gitattributes", "LICENSE", "metal/model.bin"]

    def kept(trust):
        return set(filter_repo_objects(files, allow_patterns=allow_patterns(trust), ignore_patterns=IGNORE))

    plain = {"config.json", "generation_config.json", "model-00001-of-00002.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "preprocessor_config.json"}
    assert kept(False) == plain
    assert kept(True) == plain | {"modeling_x.py", "configuration_x.py"}


def test_hub_id_with_revision_resolves_from_the_cache(hub):
    cache, add, _ = hub
    snap = cache / "models--owner--tiny" / "snapshots" / SHA1
    assert resolve_model_path("owner/tiny") == snap
    assert resolve_model_path("owner/tiny@v1") == snap
    assert resolve_model_path(f"owner/tiny@{SHA1}") == snap
    assert resolve_model_path("owner/tiny@v1", revision="nope") == snap  # @ wins over models.revision
    with pytest.raises(CheckpointError) as err:
        resolve_model_path("owner/tiny@v9")
    assert "owner/tiny (revision v9)" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)


def test_submit_pins_once_and_a_resubmit_keeps_the_commit(tmp_path, hub):
    cache, add, models = hub
    cfg = _config(tmp_path)
    snapshot = save_run_config(cfg, cfg.run_dir)
    assert [s.path for s in cfg.models.sources] == [f"owner/tiny@{SHA1}"] * 2
    assert cfg.models.base == f"owner/tiny@{SHA1}"
    again = load_config(snapshot)  # what the jobs load
    assert [s.path for s in again.models.sources] == [f"owner/tiny@{SHA1}"] * 2
    rec = source_record(cfg.run_dir)
    assert rec["models.sources[a].path"]["requested"] == "owner/tiny"
    assert rec["models.sources[b].path"]["revision"] == "v1"
    assert {e["commit"] for e in rec.values()} == {SHA1}
    assert "*.py" not in rec["models.base"]["allow_patterns"]

    # main moves on: the same run keeps its commit, a new run follows the branch
    add("owner/tiny", SHA2, models["b"], refs=("main",))
    cfg = _config(tmp_path)
    save_run_config(cfg, cfg.run_dir)
    assert cfg.models.sources[0].path == f"owner/tiny@{SHA1}"
    fresh = _config(tmp_path, name="nightly")
    save_run_config(fresh, fresh.run_dir)
    assert fresh.models.sources[0].path == f"owner/tiny@{SHA2}"
    assert fresh.models.sources[1].path == f"owner/tiny@{SHA1}"  # the tag did not move
    # and a pinned source reads its own commit's bytes
    assert resolve_model_path(fresh.models.sources[0].path).name == SHA2


def test_pinned_hub_sources_merge_offline(tmp_path, hub):
    from harc_hpc.io.checkpoint import Checkpoint
    from harc_hpc.stages.merge_experts import run

    cache, add, models = hub
    cfg = _config(tmp_path, base=str(models["base"]))
    save_run_config(cfg, cfg.run_dir)
    stats = run(cfg, cfg.run_dir)
    assert stats["tensors"] == len(Checkpoint(models["base"]).keys())
    rec = json.loads((cfg.run_dir / "merged" / "harc_merge.json").read_text())
    assert SHA1 in json.dumps(rec["sources"])


def test_unresolvable_hub_id_names_the_key_and_the_id(tmp_path, hub):
    cfg = _config(tmp_path, b="owner/missing@v2")
    with pytest.raises(HubSourceError) as err:
        pin_sources(cfg, cfg.run_dir, download=False)
    text = str(err.value)
    assert text.startswith("models.sources[b].path: ") and "owner/missing@v2" in text
    assert "HF_HUB_OFFLINE" in text and not (cfg.run_dir / "sources.json").exists()
    # a commit hash that is not in the cache: offline, nothing to fetch it from
    cfg = _config(tmp_path, a=f"owner/tiny@{SHA2}")
    with pytest.raises(HubSourceError) as err:
        pin_sources(cfg, cfg.run_dir)
    assert str(err.value).startswith("models.sources[a].path: ") and f"owner/tiny@{SHA2}" in str(err.value)


def test_plan_on_a_shipped_config_before_the_weights_exist(tmp_path, hub):
    result = CliRunner().invoke(main, ["plan", str(REPO / "configs" / "olmoe.yaml")])
    assert result.exit_code == 0, result.output
    assert "planned from the shape " in result.output and "olmoe-1b-7b.json" in result.output
    assert "models.sources[math].path is not readable yet" in result.output
    assert "16 layers" in result.output

    # with the base in the hub cache: its config.json
    cache, add, models = hub
    add("allenai/OLMoE-1B-7B-0125", SHA1, models["base"])
    result = CliRunner().invoke(main, ["plan", str(REPO / "configs" / "olmoe.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["model_config"].startswith("planned from the config.json of models.base allenai/OLMoE-1B-7B-0125")
