"""Command-line options that come from one source: ``--set`` overrides, stage commands generated
from the stage specs, and the spec's config keys honoured by the stage code."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from harc_hpc.cli import main
from harc_hpc.config import ConfigError, apply_override, load_config, parse_override
from harc_hpc.pipeline.planner import load_specs


def test_parse_override_reads_yaml_values():
    assert parse_override("harc.alpha=0.5") == ("harc.alpha", 0.5)
    assert parse_override("harc.layers=[1, 3]") == ("harc.layers", [1, 3])
    assert parse_override("executor.extra_sbatch={constraint: a100}") == ("executor.extra_sbatch", {"constraint": "a100"})
    assert parse_override("run.name=a=b") == ("run.name", "a=b")
    for bad in ("harc.alpha", "=3", "harc..alpha=1", "x=[1,"):
        with pytest.raises(ConfigError, match="--set"):
            parse_override(bad)


def test_override_enters_lists_by_name_or_index():
    data = {"models": {"sources": [{"name": "math", "path": "a"}, {"name": "code", "path": "b"}]}}
    apply_override(data, "models.sources.code.path", "/x")
    apply_override(data, "models.sources.0.path", "/y")
    assert [s["path"] for s in data["models"]["sources"]] == ["/y", "/x"]
    with pytest.raises(ConfigError, match="names no item"):
        apply_override(data, "models.sources.chat.path", "/z")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_override(data, "models.sources.math.path.deeper", 1)


def test_set_on_submit_changes_the_planned_config(toy_config, tmp_path, monkeypatch):
    from harc_hpc.pipeline import planner

    monkeypatch.setattr(planner, "default_layers", lambda c: [0, 1])
    config = toy_config()
    stages = str(__import__("conftest").TOY_STAGES_DIR)
    res = CliRunner().invoke(main, ["submit", str(config), "--dry-run", "--stages-dir", stages,
                                    "--set", "harc.alpha=0.25", "--set", "executor.partition=other"])
    assert res.exit_code == 0, res.output
    assert "--partition=other" in res.output, res.output
    res = CliRunner().invoke(main, ["submit", str(config), "--dry-run", "--stages-dir", stages, "--set", "harc.alpha=7"])
    assert res.exit_code == 2 and "harc.alpha" in res.output, res.output
    assert load_config(config, {"harc.alpha": 0.25}).harc.alpha == 0.25


def test_stage_commands_come_from_the_specs_with_their_split_options():
    specs = load_specs()
    for name, spec in specs.items():
        if name in ("merge-experts", "report"):
            continue  # commands of their own
        cmd = main.commands[name]
        opts = {p.name for p in cmd.params}
        assert {"force", "to_slurm", "wait", "run_dir", "overrides", "allow_incomplete_upstream"} <= opts
        assert ("block" in opts) == (spec.split != "none"), (name, spec.split)
        assert ("layer" in opts) == (spec.split in ("layer", "layer_task")), (name, spec.split)
        assert ("task_name" in opts) == (spec.split == "layer_task"), (name, spec.split)
    stage_opts = {p.name for p in main.commands["stage"].params} - {"name"}
    alias_opts = {p.name for p in main.commands["compute-statistics"].params}
    assert alias_opts == stage_opts  # the alias takes stage's own options, not a hand-made copy


def test_pipeline_hooks_are_data_beside_the_specs(tmp_path):
    from harc_hpc.pipeline.planner import PlanError, load_hooks

    hooks = load_hooks()
    assert hooks.prepare == "harc_hpc.demo:prepare_config"
    assert hooks.layers == "harc_hpc.stages.layout:moe_layers" and hooks.headline.endswith(":headline")
    assert load_hooks(tmp_path) == hooks  # a folder without pipeline.yaml (toy stages) uses the installed one
    (tmp_path / "pipeline.yaml").write_text("kind: pipeline\nlayers: json:loads\nprepare: null\n")
    own = load_hooks(tmp_path)
    assert own.layers == "json:loads" and own.prepare is None and own.call("layers", "[3, 5]") == [3, 5]
    (tmp_path / "pipeline.yaml").write_text("kind: pipeline\nlayer: x:y\n")
    with pytest.raises(PlanError, match="pipeline.yaml"):
        load_hooks(tmp_path)
    assert "pipeline" not in load_specs()  # not a stage
