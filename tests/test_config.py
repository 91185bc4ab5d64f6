from pathlib import Path

import pytest

from harc_hpc.config import ConfigError, load_config

MINIMAL = """
run: {name: r1, output_dir: out}
models:
  sources:
    - {name: math, path: ./m, calibration: {files: [data/m.jsonl]}}
"""


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_minimal_config_resolves_paths_against_the_file(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.run_dir == tmp_path / "out" / "r1"
    assert cfg.models.sources[0].path == str(tmp_path / "m")
    assert cfg.calibration_for("math").files == [tmp_path / "data" / "m.jsonl"]
    assert cfg.harc.alpha == 0.9 and cfg.harc.tol == 1e-6 and cfg.harc.block_size == 1


def test_hub_ids_are_left_alone(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL.replace("./m", "allenai/OLMoE-1B-7B-0125")))
    assert cfg.models.sources[0].path == "allenai/OLMoE-1B-7B-0125"


@pytest.mark.parametrize(
    "patch, expected",
    [
        ("harc: {alpha: 1.5}", "harc.alpha: must be in (0, 1]"),
        ("harc: {alpah: 0.5}", "harc.alpah: Extra inputs are not permitted"),
        ("harc: {block_size: two}", "harc.block_size"),
        ("harc: {solver: magic}", "harc.solver"),
        ("harc: {inner_dtype: int8}", "harc.inner_dtype"),
        ("harc: {layers: {first: 2}}", "harc.layers"),
        ("executor: {kind: kubernetes}", "executor.kind"),
    ],
)
def test_errors_name_the_file_and_key_path(tmp_path, patch, expected):
    path = write(tmp_path, MINIMAL + patch + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_duplicate_source_names_are_rejected(tmp_path):
    text = MINIMAL + "    - {name: math, path: ./n}\n"
    with pytest.raises(ConfigError, match="duplicate names"):
        load_config(write(tmp_path, text))


def test_overrides(tmp_path):
    path = write(tmp_path, MINIMAL)
    a = load_config(path)
    b = load_config(path, overrides={"harc.alpha": 0.99})
    assert b.harc.alpha == 0.99 and a.harc.alpha != 0.99


def test_shipped_configs_validate():
    """Every shipped pipeline config loads and its merge settings resolve (a preset that does not
    exist was once in six of them and only failed inside merge-experts)."""
    from harc_hpc.stages.merge_experts import check_config

    root = Path(__file__).resolve().parents[1] / "configs"
    checked = 0
    for path in sorted(root.glob("*.yaml")):
        if path.name.startswith("sweep-"):
            continue  # sweep configs: tests/test_sweep.py
        check_config(load_config(path))
        checked += 1
    assert checked >= 7


def test_submit_refuses_an_unknown_preset_before_any_job(tmp_path):
    from harc_hpc.merge import MergeConfigError
    from harc_hpc.pipeline.submit import apply_prepare_hook

    cfg = load_config(write(tmp_path, MINIMAL), overrides={"merge.preset": "paper"})
    with pytest.raises(MergeConfigError, match="unknown merge preset 'paper'"):
        apply_prepare_hook(cfg)


def test_dump_round_trip_keeps_defaults_apart_from_explicit_values(tmp_path):
    """Jobs load the run's dumped config: unset per-task calibration settings must still inherit the
    calibration section, and unset merge.method / executor resources must stay unset."""
    import yaml

    from harc_hpc.io.calibration_data import data_digest, effective_settings
    from harc_hpc.config import dump_config

    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n')
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "models": {"sources": [
            {"name": "a", "path": "/x/a", "calibration": {"files": ["a.jsonl"]}},
            {"name": "b", "path": "/x/b", "calibration": {"files": ["a.jsonl"], "seed": 7},
             "heldout": {"files": ["a.jsonl"]}},
        ]},
        "calibration": {"max_length": 64, "seed": 3},
        "merge": {"preset": "p"},
        "executor": {"cpus": 2},
    }))
    cfg = load_config(path)
    (tmp_path / "run").mkdir()
    again_path = tmp_path / "run" / "config.yaml"
    again_path.write_text(dump_config(cfg))
    again = load_config(again_path)
    assert again == cfg
    for task in ("a", "b"):
        assert effective_settings(again.calibration_for(task), again.calibration) == \
            effective_settings(cfg.calibration_for(task), cfg.calibration)
        assert data_digest(again.calibration_for(task), again.calibration) == \
            data_digest(cfg.calibration_for(task), cfg.calibration)
    assert effective_settings(again.calibration_for("a"), again.calibration)["max_length"] == 64
    assert effective_settings(again.calibration_for("b"), again.calibration)["seed"] == 7
    assert "method" not in again.merge.model_fields_set
    assert again.executor.model_fields_set == {"cpus"}
    assert yaml.safe_load(again_path.read_text())["harc"]["alpha"] == 0.9  # the rest in full
