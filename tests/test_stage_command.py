"""`harc-hpc stage` with upstream tasks incomplete (refuses, exit 4, unless --allow-incomplete-upstream)
and the error line of a failed task in what `submit` / `stage` print (toy stages, no SLURM needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import TOY_STAGES_DIR, write_toy_config
from harc_hpc.io.atomic import write_json_atomic
from harc_hpc.cli import main
from harc_hpc.errors import RunStateError
from harc_hpc.pipeline import planner as planner_mod
from harc_hpc.pipeline import records

FAILING = "compute-statistics/layer-000/task-b"
INJECTED = "RuntimeError: injected failure in statistics-layer0-taskb"


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """(config path, run dir, invoke) for a one-layer toy run in tmp_path/run."""
    monkeypatch.setattr(planner_mod, "default_layers", lambda c: [0])
    config = str(write_toy_config(tmp_path))
    run_dir = tmp_path / "run"
    common = ["--stages-dir", str(TOY_STAGES_DIR), "--run-dir", str(run_dir)]
    cli = CliRunner()

    def invoke(*args):
        return cli.invoke(main, [*args, *common])

    return config, run_dir, invoke


def test_stage_with_incomplete_upstream_refuses_with_exit_4_and_writes_nothing(toy):
    config, run_dir, invoke = toy
    res = invoke("stage", "compute-statistics", config, "--layer", "0", "--task", "a")
    assert res.exit_code == RunStateError.exit_code == 4, res.output
    assert "upstream task(s) not complete: capture-activations/block-000" in res.stderr
    assert "harc-hpc stage capture-activations" in res.stderr and "harc-hpc submit" in res.stderr
    assert "--allow-incomplete-upstream" in res.stderr
    assert "running" not in res.output
    assert records.read_completion(run_dir, "compute-statistics", "layer-000/task-a") is None
    assert not run_dir.exists()  # no plan, config snapshot, log or stats a later run could pick up


def test_stage_alias_refuses_too_and_lists_at_most_ten_upstream_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(planner_mod, "default_layers", lambda c: list(range(12)))
    config = str(write_toy_config(tmp_path))
    run_dir = tmp_path / "run"
    res = CliRunner().invoke(main, ["assemble-model", config, "--stages-dir", str(TOY_STAGES_DIR),
                                    "--run-dir", str(run_dir)])
    assert res.exit_code == 4, res.output
    assert "solve-router/layer-000" in res.stderr and "solve-router/layer-009" in res.stderr
    assert "solve-router/layer-010" not in res.stderr and "layer-009 ..." in res.stderr
    assert "harc-hpc stage solve-router" in res.stderr
    assert not run_dir.exists()


def test_allow_incomplete_upstream_warns_and_runs(toy):
    config, run_dir, invoke = toy
    res = invoke("stage", "compute-statistics", config, "--layer", "0", "--task", "a",
                 "--allow-incomplete-upstream")
    assert res.exit_code == 0, res.output  # the toy stage reads a missing upstream artifact as "<missing>"
    assert "warning: upstream task(s) not complete: capture-activations/block-000" in res.stderr
    assert "running compute-statistics/layer-000/task-a" in res.output
    assert records.read_completion(run_dir, "compute-statistics", "layer-000/task-a")["status"] == "done"
    # The alias takes the flag as well.
    res = invoke("solve-router", config, "--layer", "0", "--allow-incomplete-upstream")
    assert res.exit_code == 0, res.output
    assert "warning: upstream task(s) not complete: compute-statistics/layer-000/task-b" in res.stderr
    assert records.read_completion(run_dir, "solve-router", "layer-000") is not None


def test_stage_with_complete_upstream_runs_without_the_flag(toy):
    config, run_dir, invoke = toy
    assert invoke("stage", "merge-experts", config).exit_code == 0
    res = invoke("stage", "capture-activations", config, "--block", "0")
    assert res.exit_code == 0, res.output
    assert "upstream" not in res.output
    assert records.read_completion(run_dir, "capture-activations", "block-000") is not None


@pytest.mark.parametrize("executor", ["local", "debug"])
def test_submit_prints_the_error_line_of_a_failed_task(toy, executor):
    config, run_dir, invoke = toy
    run_dir.mkdir()
    (run_dir / "fail-statistics-layer0-taskb").write_text("")
    res = invoke("submit", config, "--executor", executor)
    assert res.exit_code == 1, res.output
    log = records.log_path(run_dir, "compute-statistics", "layer-000/task-b")
    # Once while running, once in the summary at the end (stderr).
    assert res.output.count(f"FAILED: {FAILING}: {INJECTED}\n    log: {log}\n") == 2, res.output
    assert f"FAILED: {FAILING}: {INJECTED}\n    log: {log}\n" in res.stderr
    assert "not run: solve-router/layer-000" in res.stderr


def test_stage_prints_the_error_line_of_its_failed_task(toy):
    config, run_dir, invoke = toy
    assert invoke("stage", "merge-experts", config).exit_code == 0
    assert invoke("stage", "capture-activations", config).exit_code == 0
    (run_dir / "fail-statistics-layer0-taskb").write_text("")
    res = invoke("stage", "compute-statistics", config, "--layer", "0", "--task", "b")
    assert res.exit_code == 1, res.output
    assert f"FAILED: {FAILING}: {INJECTED}" in res.stderr


def _stats(run_dir: Path, data: dict) -> None:
    write_json_atomic(records.stats_path(run_dir, "solve-router", "layer-003"), data)


def test_failure_line_reads_the_last_failed_attempt_only(tmp_path):
    assert records.failure_line(tmp_path, "solve-router", "layer-003") is None  # no stats file
    _stats(tmp_path, {"status": "done", "started": "2024-01-01T00:00:00+00:00"})
    assert records.failure_line(tmp_path, "solve-router", "layer-003") is None
    _stats(tmp_path, {"status": "failed", "started": "2024-01-01T00:00:00+00:00",
                      "error": "ValidationError: 2 errors\n  harc.alpha\n    must be > 0\n"})
    assert records.failure_line(tmp_path, "solve-router", "layer-003") == "ValidationError: 2 errors harc.alpha must be > 0"
    # An attempt that started before this run is an earlier run's record (the new one was killed).
    assert records.failure_line(tmp_path, "solve-router", "layer-003", since=1.9e9) is None
    assert records.failure_line(tmp_path, "solve-router", "layer-003", since=1.7e9) is not None
    _stats(tmp_path, {"status": "interrupted", "started": "2024-01-01T00:00:00+00:00", "error": "SystemExit: 0"})
    assert records.failure_line(tmp_path, "solve-router", "layer-003") == "interrupted (SystemExit: 0)"
    _stats(tmp_path, {"status": "failed", "error": "OSError: " + "x" * 2000})
    line = records.failure_line(tmp_path, "solve-router", "layer-003")
    assert line.startswith("OSError: xxx") and line.endswith(" ...") and len(line) == records.FAILURE_LINE_MAX_CHARS
    records.stats_path(tmp_path, "solve-router", "layer-003").write_text(json.dumps(["not", "a", "dict"]))
    assert records.failure_line(tmp_path, "solve-router", "layer-003") is None


def test_report_of_a_waited_slurm_run_names_each_failure_and_its_logs(tmp_path, capsys):
    """`submit --wait` on SLURM: the failed ids come from the run's status; the error line from the
    stats file the job wrote (a record older than the submission is not shown as its error)."""
    import time

    from harc_hpc.config import load_config
    from harc_hpc.pipeline.api import submit_run
    from harc_hpc.cli.launch import _report
    from harc_hpc.pipeline.executors.base import Outcome, SubmittedGroup

    cfg = load_config(write_toy_config(tmp_path))
    run = Path(cfg.run_dir)
    run.mkdir(parents=True)
    (run / "fail-statistics-layer0-taskb").write_text("")
    before = time.time() - 60
    plan, done = submit_run(cfg, executor="debug", specs_dir=TOY_STAGES_DIR, layers=[0], echo=lambda m: None)
    assert done.failed == [FAILING]
    group = next(g for g in plan.groups() if g.stage == "compute-statistics")
    stderr = str(run / "slurm" / "compute-statistics" / "77_1_log.err")
    outcome = Outcome("slurm", submitted=[SubmittedGroup(group, "77", {
        t.key: {"job_id": f"77_{i}", "stderr": stderr if t.id == FAILING else "x"} for i, t in enumerate(group.tasks)})],
        failed=[FAILING], skipped=["solve-router/layer-000"])
    assert _report(plan, outcome, "slurm", waited=True, since=before) == 1
    err = capsys.readouterr().err
    log = records.log_path(run, "compute-statistics", "layer-000/task-b")
    assert f"FAILED: {FAILING}: {INJECTED}\n    log: {log}\n    SLURM log: {stderr}\n" in err
    assert "not run: solve-router/layer-000" in err
    # Killed without writing stats (OOM, time limit): the older record is not passed off as its error.
    assert _report(plan, outcome, "slurm", waited=True, since=time.time() + 60) == 1
    err = capsys.readouterr().err
    assert f"FAILED: {FAILING}: no error recorded" in err and "injected failure" not in err
