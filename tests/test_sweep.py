"""harc-hpc sweep: grid expansion and names, validation before any job, sharing by digest (each
distinct task runs once, in one cell), a failing cell that stops only itself, status and the table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from harc_hpc.cli import main
from harc_hpc.config import ConfigError, load_config
from harc_hpc.pipeline import sweep as sweep_mod
from harc_hpc.pipeline.sweep import SweepError, load_sweep, plan_sweep, submit_sweep, sweep_status
from harc_hpc.report.sweep_table import sweep_rows, write_sweep_table
from pipeline_fixtures import build_tiny_sources, write_config


def _base(root: Path, sources=None) -> dict:
    """A valid pipeline config tree (its model paths need not exist for expansion and validation)."""
    sources = sources or {"base": root / "base", "math": root / "math", "code": root / "code", "data": root / "data"}
    path = write_config(root, sources, name="base", block_size=2, executor="debug",
                        extra={"report.enabled": True, "report.top_k_end_to_end": False})
    return yaml.safe_load(path.read_text())


def _write_sweep(root: Path, sweep: dict, base: dict | None = None) -> Path:
    data = dict(base if base is not None else _base(root))
    data["sweep"] = sweep
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- expansion ------------------------------------------------------------------------------------

def test_grid_expands_in_order_with_exclusions_extra_cells_and_stable_names(tmp_path):
    path = _write_sweep(tmp_path, {
        "name": "s1",
        "grid": {"merge.method": ["linear", "ties"], "harc.alpha": [0.5, 0.9], "harc.layers": ["all", {"last": 1}]},
        "exclude": [{"merge.method": "ties", "harc.alpha": 0.5}],
        "cells": [{"merge.method": "dare_ties", "harc.hessian": "diag"},
                  {"merge.method": "linear", "harc.alpha": 0.5, "harc.layers": "all"}],  # already in the grid
    })
    sweep = load_sweep(path)
    names = [c.name for c in sweep.cells]
    assert names == [
        "method-linear+alpha-0.5+layers-all", "method-linear+alpha-0.5+layers-last1",
        "method-linear+alpha-0.9+layers-all", "method-linear+alpha-0.9+layers-last1",
        "method-ties+alpha-0.9+layers-all", "method-ties+alpha-0.9+layers-last1",
        "method-dare_ties+hessian-diag",
    ]
    assert sweep.cells[1].values == {"merge.method": "linear", "harc.alpha": 0.5, "harc.layers": {"last": 1}}
    assert sweep.dir == (tmp_path / "runs" / "s1").resolve()
    # Every cell validates into a full config of its own, in <sweep dir>/cells/<name>.
    sweep_mod.validate(sweep)
    cfg = sweep.cells[1].cfg
    assert (cfg.merge.method, cfg.harc.alpha, cfg.harc.layers) == ("linear", 0.5, {"last": 1})
    assert cfg.run_dir == sweep.dir / "cells" / "method-linear+alpha-0.5+layers-last1"
    assert sweep.cells[-1].cfg.harc.hessian == "diag" and sweep.cells[0].cfg.harc.hessian == "full"
    # A value added to the grid leaves the existing cells' names (their run directories) alone.
    again = _write_sweep(tmp_path, {"name": "s1", "grid": {"merge.method": ["linear", "ties", "wudi"],
                                                           "harc.alpha": [0.5, 0.9], "harc.layers": ["all", {"last": 1}]},
                                    "exclude": [{"merge.method": "ties", "harc.alpha": 0.5}]})
    assert set(names[:-1]) <= {c.name for c in load_sweep(again).cells}


def test_names_that_read_alike_get_a_digest_and_bad_sweep_sections_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    path = _write_sweep(tmp_path, {"grid": {"models.sources.math.calibration.files": [
        [str(tmp_path / "a" / "x.jsonl")], [str(tmp_path / "b" / "x.jsonl")]]}})
    names = [c.name for c in load_sweep(path).cells]
    assert len(set(names)) == 2 and all(n.startswith("files-x~") for n in names)
    for sweep, words in (
        ({"grid": {"harc.alpha": []}}, "sweep.grid.harc.alpha: must be a non-empty list"),
        ({"grid": {"run.name": ["a", "b"]}}, "sweep sets run.name itself"),
        ({"grid": {"harc.alpha": [0.5]}, "exclude": [{"harc.hessian": "diag"}]}, "sweep.exclude[0].harc.hessian: not a grid key"),
        ({"grid": {"harc.alpha": [0.5]}, "exclude": [{"harc.alpha": 0.5}]}, "no cells"),
        ({"name": "nothing"}, "no cells"),
        ({"grid": {"harc.alpha": [0.5]}, "gird": {}}, "sweep.gird: unknown key"),
    ):
        with pytest.raises(SweepError, match=words.replace("[", r"\[").replace("(", r"\(")):
            load_sweep(_write_sweep(tmp_path, sweep))


def test_sweep_base_file_with_overrides_beside_the_section(tmp_path):
    base_path = write_config(tmp_path, {"base": tmp_path / "base", "math": tmp_path / "m", "code": tmp_path / "c",
                                        "data": tmp_path / "d"}, name="b0")
    (tmp_path / "sw").mkdir()
    path = tmp_path / "sw" / "s.yaml"
    path.write_text(yaml.safe_dump({"sweep": {"base": "../b0.yaml", "grid": {"harc.alpha": [0.8]}},
                                    "harc": {"hessian": "diag"}}))
    sweep = load_sweep(path)
    sweep_mod.validate(sweep)
    assert sweep.name == "b0" and sweep.cells[0].cfg.harc.hessian == "diag" and sweep.cells[0].cfg.harc.alpha == 0.8
    assert sweep.cells[0].cfg.models.sources[0].path == str(tmp_path / "m")  # base's paths: relative to the base
    # `harc-hpc submit` on a sweep config says what to run instead.
    with pytest.raises(ConfigError, match="a sweep config .*harc-hpc sweep"):
        load_config(path)


# -- validation before any job ----------------------------------------------------------------------

@pytest.mark.parametrize("grid, words", [
    ({"harc.alpha": [0.5, 7]}, ["sweep.grid.harc.alpha: value 7 is not valid", "harc.alpha: must be in (0, 1]"]),
    ({"merge.method": ["linear", "regmean_x"]},
     ["sweep.grid.merge.method: value 'regmean_x' is not valid", "unknown merge method 'regmean_x'; available:"]),
    ({"harc.alphaa": [0.5]}, ["sweep.grid.harc.alphaa: value 0.5 is not valid", "Extra inputs are not permitted"]),
    ({"merge.parameters": [{"weights": [1, 2, 3]}]}, ["sweep.grid.merge.parameters", "weights"]),
])
def test_an_invalid_grid_value_is_refused_before_any_job(tmp_path, grid, words):
    path = _write_sweep(tmp_path, {"name": "bad", "grid": grid})
    result = CliRunner().invoke(main, ["sweep", str(path)])
    assert result.exit_code == 2, result.output
    for w in words:
        assert w in result.output, result.output
    assert not (tmp_path / "runs" / "bad").exists()  # nothing planned, linked or run


def test_a_combination_that_does_not_go_together_names_the_cell(tmp_path):
    path = _write_sweep(tmp_path, {"grid": {"merge.method": ["linear", "ties"]},
                                   "cells": [{"merge.method": "ties", "merge.preset": "no-such-preset"}]})
    with pytest.raises(SweepError, match=r"sweep.cells \(cell method-ties\+preset-no-such-preset\): merge.preset"):
        plan_sweep(load_sweep(path))


# -- a tiny sweep end to end ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """merge.method linear x harc.alpha {0.5, 0.9} (one merge, one capture and the statistics shared
    by both cells; block size = #layers, so the capture does not see alpha), and a ties cell whose
    code calibration file is missing: only detectable when its capture runs."""
    root = tmp_path_factory.mktemp("sweep")
    sources = build_tiny_sources(root, layers=2)
    path = _write_sweep(root, {
        "name": "tiny",
        "grid": {"merge.method": ["linear"], "harc.alpha": [0.5, 0.9]},
        "cells": [{"merge.method": "ties", "models.sources.code.calibration.files": [str(root / "missing.jsonl")]}],
    }, base=_base(root, sources))
    lines: list[str] = []
    outcome = submit_sweep(path, echo=lines.append)
    return path, outcome, lines


def _run_tasks(sweep_dir: Path) -> dict[str, list]:
    """The tasks that actually ran, from the run records: stats files are written by the runner of
    the task itself (a linked cell has none of its own)."""
    ran: dict[str, list] = {}
    for stats in sorted((sweep_dir / "cells").glob("*/stats/**/*.json")):
        assert not stats.is_symlink()
        rec = json.loads(stats.read_text())
        ran.setdefault(rec["id"].split("/")[0], []).append((stats.relative_to(sweep_dir).parts[1], rec["status"]))
    return ran


def test_tiny_sweep_runs_each_shared_task_once(tiny_sweep):
    path, outcome, lines = tiny_sweep
    sweep_dir = outcome.plan.sweep.dir
    a, b, bad = "method-linear+alpha-0.5", "method-linear+alpha-0.9", "method-ties+files-missing"
    assert [c.name for c in outcome.plan.cells] == [a, b, bad]
    ran = _run_tasks(sweep_dir)
    # Per stage, who ran what: the linear merge, capture and 2 layers x 2 tasks of statistics once
    # (in cell a) for both alpha cells; the solves and what follows per cell; the ties merge once.
    assert sorted(ran["merge-experts"]) == [(a, "done"), (bad, "done")]
    assert sorted(ran["capture-activations"]) == [(a, "done"), (bad, "failed")]
    assert sorted(ran["compute-statistics"]) == [(a, "done")] * 4
    assert sorted(ran["solve-router"]) == [(a, "done")] * 2 + [(b, "done")] * 2
    assert sorted(ran["assemble-model"]) == [(a, "done"), (b, "done")]
    assert sorted(ran["report"]) == [(a, "done"), (b, "done")]
    # Cell b links what it shares: records and artifacts point into cell a, and it counts as complete.
    cell_b = sweep_dir / "cells" / b
    assert (cell_b / "merged").is_symlink() and (cell_b / "merged").resolve() == (sweep_dir / "cells" / a / "merged").resolve()
    linked = sorted(p.relative_to(cell_b / "completions").as_posix() for p in (cell_b / "completions").rglob("*.json")
                    if p.is_symlink())
    assert linked == ["capture-activations/block-000.json", "compute-statistics/layer-000/task-code.json",
                      "compute-statistics/layer-000/task-math.json", "compute-statistics/layer-001/task-code.json",
                      "compute-statistics/layer-001/task-math.json", "merge-experts/all.json"]
    # Both alpha cells read the shared capture, so both keep their intermediate stores.
    assert yaml.safe_load((cell_b / "config.yaml").read_text())["run"]["retention"] == "keep"
    # The failing cell stopped only itself; the outcome says what failed and what could not run.
    cells = {c.name: c for c in outcome.cells}
    assert not cells[a].failed and not cells[b].failed and not cells[a].skipped and not cells[b].skipped
    assert cells[bad].failed == ["capture-activations/block-000"] and "report/all" in cells[bad].skipped
    assert any("FAILED in cell method-ties+files-missing: capture-activations/block-000" in l and "missing.jsonl" in l
               for l in lines)


def test_tiny_sweep_status_and_resume(tiny_sweep):
    path, outcome, _ = tiny_sweep
    sweep_dir = outcome.plan.sweep.dir
    states = {c.name: c for c in sweep_status(sweep_dir)}
    assert {n: c.state for n, c in states.items()} == {
        "method-linear+alpha-0.5": "done", "method-linear+alpha-0.9": "done", "method-ties+files-missing": "failed"}
    bad = states["method-ties+files-missing"]
    assert [r.id for r in bad.rows if r.state == "failed"] == ["capture-activations/block-000"]
    assert {r.state for r in bad.rows} == {"done", "failed", "blocked"}
    result = CliRunner().invoke(main, ["status", str(sweep_dir)])
    assert result.exit_code == 1
    assert "method-ties+files-missing" in result.output and "calibration file not found" in result.output
    assert "cells: done 2, failed 1" in result.output
    # A resubmit runs only the failed cell's capture again (it fails again): everything else is
    # complete, shared or not.
    before = _run_tasks(sweep_dir)
    again = submit_sweep(path, echo=lambda _: None)
    ran = [(c.name, t) for c in again.cells for t in c.ran + c.failed]
    assert ran == [("method-ties+files-missing", "capture-activations/block-000")]
    assert sum(map(len, _run_tasks(sweep_dir).values())) == sum(map(len, before.values()))



def test_tiny_sweep_recovers_a_killed_shared_task_and_a_lost_link(tiny_sweep):
    """A shared task killed before its record (here: its record removed) runs again once, in its
    owner; the cells linking it see it complete again and nothing downstream reruns (same digests).
    A link that went missing is made again without running anything."""
    path, outcome, _ = tiny_sweep
    sweep_dir = outcome.plan.sweep.dir
    a, b = sweep_dir / "cells" / "method-linear+alpha-0.5", sweep_dir / "cells" / "method-linear+alpha-0.9"
    (a / "completions" / "compute-statistics" / "layer-001" / "task-code.json").unlink()
    (b / "merged").unlink()
    states = {c.name: c.state for c in sweep_status(sweep_dir)}
    assert states["method-linear+alpha-0.5"] == "pending" and states["method-linear+alpha-0.9"] == "pending"
    again = submit_sweep(path, echo=lambda _: None)
    ran = [(c.name, t) for c in again.cells for t in c.ran]
    assert ran == [("method-linear+alpha-0.5", "compute-statistics/layer-001/task-code")]
    assert (b / "merged").is_symlink()
    states = {c.name: c.state for c in sweep_status(sweep_dir)}
    assert states["method-linear+alpha-0.5"] == "done" and states["method-linear+alpha-0.9"] == "done"


def test_tiny_sweep_table(tiny_sweep):
    _, outcome, _ = tiny_sweep
    sweep_dir = outcome.plan.sweep.dir
    paths = write_sweep_table(sweep_dir)
    columns, rows = sweep_rows(sweep_dir)
    # One harc row per cell, one none row per distinct merged model that was measured (linear: the
    # two alpha cells share it; ties never got to its report).
    assert [(r["cell"], r["repair"]) for r in rows] == [
        ("method-linear+alpha-0.5", "none"), ("method-linear+alpha-0.5", "harc"),
        ("method-linear+alpha-0.9", "harc"), ("method-ties+files-missing", "harc")]
    assert columns[:5] == ["cell", "method", "repair", "settings", "state"]
    assert {"loss:math", "loss:code", "router_kl", "topk_mismatch", "loss_mean"} <= set(columns)
    # The figures are the reports' own.
    m = json.loads((sweep_dir / "cells" / "method-linear+alpha-0.9" / "report" / "metrics.json").read_text())
    row = rows[2]
    assert row["loss:code"] == m["loss"]["code"]["calibrated"]
    assert row["router_kl"] == m["summary"]["router_level"]["calibrated"]["kl_mean"]
    assert row["harc_of_oracle:code"] == m["summary"]["gap_shares"]["code"]["harc_recovers_of_oracle"]
    assert rows[0]["router_kl"] == m["summary"]["router_level"]["merged"]["kl_mean"]
    assert rows[3]["state"] == "failed" and rows[3].get("router_kl") is None
    with open(paths["csv"]) as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    md = paths["md"].read_text().splitlines()
    assert sum(1 for line in md if line.startswith("| method-")) == len(rows)
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slurm_dry_run_waits_on_the_owner_cells_jobs(tiny_sweep):
    """On SLURM the sweep is one DAG: a cell's job waits (afterok) on the job of the cell that runs
    a task it shares. Shown on a fresh sweep directory (nothing complete yet) as a dry run."""
    path, _, _ = tiny_sweep
    data = yaml.safe_load(path.read_text())
    data["sweep"] = {"name": "fresh", "grid": {"harc.alpha": [0.5, 0.9]}}
    fresh = path.parent / "fresh.yaml"
    fresh.write_text(yaml.safe_dump(data, sort_keys=False))
    lines: list[str] = []
    submit_sweep(fresh, executor="slurm", dry_run=True, echo=lines.append)
    text = "\n".join(lines)
    assert not (path.parent / "runs" / "fresh").exists()
    a, b = "alpha-0.5", "alpha-0.9"
    block = text[text.index(f"== cell {b}"):]
    assert "[merge-experts]" not in block and "[capture-activations" not in block and "[compute-statistics" not in block
    solve = block[block.index("[solve-router/block-000]"):block.index("[assemble-model]")]
    for task in ("layer-000/task-math", "layer-000/task-code", "layer-001/task-math", "layer-001/task-code"):
        assert f"<{a}:compute-statistics/{task}>" in solve
    # The same through the planner: the solve group of cell b needs the job running a's statistics.
    plan = plan_sweep(load_sweep(fresh))
    cell_b = plan.cell(b)
    cell_b.plan.external_jobs = {tid: ("9001" if tid.startswith("compute-statistics") else "9000")
                                 for tid in plan.linked(cell_b)}
    solve_group = [g for g in cell_b.plan.groups(plan.owned(cell_b)) if g.stage == "solve-router"][0]
    assert cell_b.plan.external_needs(solve_group, []) == ["9001"]


# -- the shipped sweeps -----------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_shipped_sweeps_expand_and_validate():
    tiny = load_sweep(CONFIGS / "sweep-tiny.yaml")
    assert [c.name for c in tiny.cells] == [
        "method-task_arithmetic+objective-quadratic", "method-task_arithmetic+objective-kl",
        "method-ties+objective-quadratic", "method-ties+objective-kl"]
    sweep_mod.validate(tiny)
    assert all(c.cfg.harc.block_size == 4 and c.cfg.demo.enabled for c in tiny.cells)
    table1 = load_sweep(CONFIGS / "sweep-table1.yaml")
    assert [c.values["merge.method"] for c in table1.cells] == ["linear", "ties", "dare_ties", "wudi", "fisher",
                                                                "regmean", "wudi"]  # the last: Table 7 (training)
    sweep_mod.validate(table1)
    fisher, regmean = table1.cells[4], table1.cells[5]
    assert sweep_mod.cell_config(table1, fisher.values, fisher.name).merge.parameters == {"weights": [0.5, 0.5]}
    assert sweep_mod.cell_config(table1, regmean.values, regmean.name).merge.parameters["alpha"] == 0.9
    data_free = [c for c in table1.cells if c.values["merge.method"] not in ("fisher", "regmean")]
    for cell in data_free:
        cfg = sweep_mod.cell_config(table1, cell.values, cell.name)
        assert cfg.merge.method == cell.values["merge.method"] and cfg.harc.alpha == 0.9
        assert cfg.merge.preset == cell.values.get("merge.preset")


def test_tiny_sweep_cli_table_only_and_exit_code(tiny_sweep):
    path, outcome, _ = tiny_sweep
    result = CliRunner().invoke(main, ["sweep", str(path), "--table-only"])
    assert result.exit_code == 1  # a cell failed (the table is written all the same)
    assert "table: " in result.output and "1 of 3 cell(s) failed" in result.output
    assert (outcome.plan.sweep.dir / "table.csv").is_file()


def test_symlink_atomic_replaces_whatever_is_there(tmp_path):
    from harc_hpc.io.atomic import symlink_atomic

    target = tmp_path / "owner" / "merged"
    for kind in ("none", "file", "dir", "link"):
        link = tmp_path / kind / "merged"
        link.parent.mkdir()
        if kind == "file":
            link.write_text("old")
        elif kind == "dir":
            (link / "sub").mkdir(parents=True)
            (link / "sub" / "f").write_text("old")
        elif kind == "link":
            link.symlink_to(tmp_path / "elsewhere")
        symlink_atomic(link, target)  # the target need not exist yet
        assert link.is_symlink() and not link.exists()
        assert (link.parent / __import__("os").readlink(link)).resolve() == target.resolve()
        assert [p.name for p in link.parent.iterdir()] == ["merged"]  # no temporary left
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert (tmp_path / "dir" / "merged" / "config.json").read_text() == "{}"
