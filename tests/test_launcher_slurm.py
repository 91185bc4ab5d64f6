"""The launcher against the real local SLURM cluster (slurm/start-local-slurm.sh): afterok chains of
array jobs, failure propagation and resume, and a task killed mid-run then resubmitted.

No mock of sbatch: toy stages (tests/harc_toy_stages.py, specs built from the real stages/ in tests/conftest.py) run as real
array jobs. These tests fail when SLURM is missing, unless HARC_HPC_SKIP_SLURM=1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import submitit
from click.testing import CliRunner

from conftest import TOY_STAGES_DIR, write_toy_config
from harc_hpc.config import load_config
from harc_hpc.pipeline import records, sacct
from harc_hpc.pipeline.api import ActiveJobsError, submit_run
from harc_hpc.pipeline.status import collect

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    if os.environ.get("HARC_HPC_SKIP_SLURM") == "1":
        pytest.skip("HARC_HPC_SKIP_SLURM=1: SLURM tests disabled")
    if shutil.which("sbatch") is None:
        pytest.fail("sbatch not found: start the cluster with `bash slurm/start-local-slurm.sh` "
                    "(or set HARC_HPC_SKIP_SLURM=1 to skip the SLURM tests)")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "UP" not in ping.stdout:
        pytest.fail(f"slurmctld is not answering ({ping.stdout.strip() or ping.stderr.strip()}): "
                    "run `bash slurm/start-local-slurm.sh`")


@pytest.fixture(autouse=True)
def no_result_grace(monkeypatch):
    monkeypatch.setattr(submitit.core.core.Job, "_results_timeout_s", 0)


def submit(cfg, **kw):
    kw.setdefault("layers", [0])
    kw.setdefault("specs_dir", TOY_STAGES_DIR)
    kw.setdefault("poll_s", 0.5)
    kw.setdefault("wait_timeout_s", 120)
    kw.setdefault("echo", lambda m: None)
    return submit_run(cfg, **kw)


def stages_of(plan, *stages):
    return lambda p: [t for t in p.tasks.values() if t.stage in stages]


def test_afterok_chain_of_arrays_completes(tmp_path):
    cfg = load_config(write_toy_config(tmp_path, block_size=2))
    plan, outcome = submit(cfg, executor="slurm", layers=[0, 1], wait=True)
    assert outcome.ok, (outcome.failed, outcome.skipped)
    assert len(outcome.submitted) == 6  # merge, capture, statistics[4], solve[2], assemble, report
    by_name = {s.group.name: s for s in outcome.submitted}
    stats = by_name["compute-statistics/block-000"]
    assert len(stats.tasks) == 4 and stats.depends_on == [by_name["capture-activations/block-000"].job_id]
    assert by_name["merge-experts"].depends_on == []
    assert by_name["assemble-model"].depends_on == [by_name["solve-router/block-000"].job_id]
    assert all(r.state == "done" for r in collect(plan.run_dir))

    # afterok held every task until all it needs had finished.
    recs = {t.id: records.read_completion(plan.run_dir, t.stage, t.key) for t in plan.tasks.values()}
    for t in plan.tasks.values():
        job = recs[t.id]["job"]
        assert job.get("slurm_array_job_id", job["slurm_job_id"]) == by_name[
            t.stage if t.block is None else f"{t.stage}/block-{t.block:03d}"].job_id
        for u in t.needs:
            assert recs[t.id]["started"] >= recs[u]["finished"], (t.id, u)
    assert (plan.run_dir / "report/metrics.json").is_file()
    log = Path(records.log_path(plan.run_dir, "solve-router", "layer-001")).read_text()
    assert "solve-router/layer-001: done" in log

    # Nothing left to do: a resubmit submits nothing.
    _, again = submit(cfg, executor="slurm", layers=[0, 1])
    assert again.submitted == [] and len(again.already_complete) == len(plan.tasks)


def test_failure_cancels_dependents_and_rerun_resumes(tmp_path):
    from harc_hpc.cli import main

    cfg = load_config(write_toy_config(tmp_path))
    # Upstream done in-process, so the cluster only runs what this test is about.
    plan, _ = submit(cfg, executor="debug", select=stages_of(None, "merge-experts", "capture-activations"))
    run = plan.run_dir
    (run / "fail-statistics-layer0-taskb").write_text("")
    plan, outcome = submit(cfg, executor="slurm", wait=True)
    assert [s.group.name for s in outcome.submitted] == [
        "compute-statistics/block-000", "solve-router/block-000", "assemble-model", "report"]
    assert outcome.failed == ["compute-statistics/layer-000/task-b"]
    # slurmdbd records a job's end a moment after squeue stops listing it (seen lagging on a loaded
    # CI machine): give accounting a few seconds to catch up before reading SLURM's states
    for _ in range(30):
        rows = {r.id: r for r in collect(run)}
        if all(r.slurm_state for r in rows.values() if r.job_id):
            break
        time.sleep(1)
    assert rows["compute-statistics/layer-000/task-a"].state == "done"
    failed = rows["compute-statistics/layer-000/task-b"]
    assert failed.state == "failed" and failed.slurm_state == "FAILED"
    assert "injected failure" in Path(failed.log).read_text()
    for tid in ("solve-router/layer-000", "assemble-model/all", "report/all"):
        assert rows[tid].state == "cancelled" and rows[tid].slurm_state == "CANCELLED", rows[tid]
        assert not records.log_path(run, *tid.split("/", 1)).exists()  # never started
    res = CliRunner().invoke(main, ["status", str(run)])
    assert res.exit_code == 1
    assert "layer-000/task-b" in res.output and "failed" in res.output and str(failed.log) in res.output

    (run / "fail-statistics-layer0-taskb").unlink()
    plan, outcome = submit(cfg, executor="slurm", wait=True)
    assert outcome.ok, (outcome.failed, outcome.skipped)
    assert sorted(t.id for s in outcome.submitted for t in s.group.tasks) == [
        "assemble-model/all", "compute-statistics/layer-000/task-b", "report/all", "solve-router/layer-000"]
    assert "compute-statistics/layer-000/task-a" in outcome.already_complete
    res = CliRunner().invoke(main, ["status", str(run)])
    assert res.exit_code == 0 and "report: done 1" in res.output


def test_killed_task_resubmitted_gives_identical_artifacts(tmp_path):
    config = write_toy_config(tmp_path)
    reference, _ = submit(load_config(config), executor="debug", run_dir=tmp_path / "reference")
    cfg = load_config(config)
    plan, _ = submit(cfg, executor="debug",
                     select=stages_of(None, "merge-experts", "capture-activations", "compute-statistics"))
    run = plan.run_dir
    (run / "slow-solve-layer0").write_text("60")
    plan, outcome = submit(cfg, executor="slurm")
    solve_job = outcome.submitted[0].tasks["layer-000"]["job_id"]
    deadline = time.monotonic() + 60
    while not (run / "started-solve-layer0").exists():
        assert time.monotonic() < deadline, "solve-router never started"
        time.sleep(0.2)
    with pytest.raises(ActiveJobsError):
        submit(cfg, executor="slurm")  # a second submit while jobs are queued would duplicate them
    subprocess.run(["scancel", solve_job], check=True, timeout=30)
    deadline = time.monotonic() + 60

    task_jobs = [info["job_id"] for sub in outcome.submitted for info in sub.tasks.values()]

    def settled(states):
        # every task's job listed and ended: a dependent that accounting has not yet recorded is
        # absent, not ended (seen on a loaded CI machine), and would still block the next submit
        return all(j in states and states[j] not in sacct.ACTIVE_STATES for j in task_jobs)

    while sacct.states([solve_job]).get(solve_job) != "CANCELLED" or not settled(sacct.states(task_jobs)):
        assert time.monotonic() < deadline, sacct.states(task_jobs)
        time.sleep(0.3)
    assert list((run / "routers").glob(".layer-000.json.tmp-*"))  # killed half-way through its write
    assert not (run / "routers/layer-000.json").exists()
    assert records.read_completion(run, "solve-router", "layer-000") is None
    assert {r.id: r.state for r in collect(run)}["solve-router/layer-000"] == "cancelled"

    (run / "slow-solve-layer0").unlink()
    plan, outcome = submit(cfg, executor="slurm", wait=True)
    assert outcome.ok, (outcome.failed, outcome.skipped)
    for t in plan.tasks.values():
        mine = records.read_completion(run, t.stage, t.key)
        ref = records.read_completion(reference.run_dir, t.stage, t.key)
        assert mine["artifacts"] == ref["artifacts"], t.id
    assert (run / "report/metrics.json").read_bytes() == (reference.run_dir / "report/metrics.json").read_bytes()


def test_start_script_is_a_quick_noop_when_the_cluster_is_up():
    if os.geteuid() != 0:
        pytest.skip("the start script needs root")
    script = Path(__file__).resolve().parent.parent / "slurm" / "start-local-slurm.sh"
    t0 = time.monotonic()
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SLURM_LOCAL_INSTALL": "0"})
    assert res.returncode == 0, res.stderr
    assert "starting" not in res.stderr and "up: cluster" in res.stderr
    print(f"no-op start took {time.monotonic() - t0:.1f} s")


def test_start_script_refuses_to_replace_a_config_it_did_not_write():
    if os.geteuid() != 0:
        pytest.skip("the start script needs root")
    # gres.conf is not written without fake GPUs, so a foreign one can be planted and removed safely
    foreign = Path("/etc/slurm/gres.conf")
    if foreign.exists():
        pytest.skip(f"{foreign} exists on this host")
    script = Path(__file__).resolve().parent.parent / "slurm" / "start-local-slurm.sh"
    foreign.write_text("NodeName=somewhere Name=gpu File=/dev/nvidia0\n")
    try:
        res = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "SLURM_LOCAL_INSTALL": "0"})
        assert res.returncode != 0
        assert "/etc/slurm/gres.conf exists and was not written by this script" in res.stderr
        assert foreign.read_text().startswith("NodeName=somewhere")
    finally:
        foreign.unlink()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HARC_HPC_SLOW_SLURM_TESTS") != "1",
                    reason="takes about 3 minutes (1-minute time limit + SLURM's requeue hold); "
                           "set HARC_HPC_SLOW_SLURM_TESTS=1")
def test_time_limit_requeues_the_task_and_it_completes(tmp_path):
    cfg = load_config(write_toy_config(tmp_path), overrides={
        "executor.stages": {"solve-router": {"time_min": 1}}, "executor.signal_delay_s": 45})
    plan, _ = submit(cfg, executor="debug",
                     select=stages_of(None, "merge-experts", "capture-activations", "compute-statistics"))
    (plan.run_dir / "slowonce-solve-layer0").write_text("200")  # past the limit, first attempt only
    plan, outcome = submit(cfg, executor="slurm", wait=True, poll_s=2, wait_timeout_s=400)
    assert outcome.ok, (outcome.failed, outcome.skipped)
    job = records.read_completion(plan.run_dir, "solve-router", "layer-000")["job"]
    assert job["slurm_restart_count"] == "1"  # submitit caught USR2 and requeued the Checkpointable runner
    # the requeued task finished with the result of an uninterrupted run
    reference, _ = submit(cfg, executor="debug", run_dir=tmp_path / "reference")
    for t in plan.tasks.values():
        mine = records.read_completion(plan.run_dir, t.stage, t.key)
        ref = records.read_completion(reference.run_dir, t.stage, t.key)
        assert mine["artifacts"] == ref["artifacts"], t.id


def test_cli_stage_submit_reruns_one_task_as_a_slurm_job(tmp_path, monkeypatch):
    from harc_hpc.cli import main
    from harc_hpc.pipeline import planner as planner_mod

    monkeypatch.setattr(planner_mod, "default_layers", lambda c: [0, 1])
    config = str(write_toy_config(tmp_path, block_size=2))
    run_dir = tmp_path / "run"
    common = ["--stages-dir", str(TOY_STAGES_DIR), "--run-dir", str(run_dir)]
    cli = CliRunner()
    res = cli.invoke(main, ["submit", config, "--executor", "debug", *common])
    assert res.exit_code == 0, res.output
    before = {k: records.read_completion(run_dir, "solve-router", k) for k in ("layer-000", "layer-001")}
    assert "slurm_job_id" not in before["layer-001"]["job"]  # ran here, in this process

    res = cli.invoke(main, ["stage", "solve-router", config, "--layer", "1", "--force", "--submit", "--wait", *common])
    assert res.exit_code == 0, res.output
    after = {k: records.read_completion(run_dir, "solve-router", k) for k in ("layer-000", "layer-001")}
    job = after["layer-001"]["job"]
    assert job["submitit_executor"] == "slurm" and job["slurm_job_id"]
    state = sacct.states([job.get("slurm_array_job_id", job["slurm_job_id"])])
    assert any(s.startswith("COMPLETED") for s in state.values()), state
    assert after["layer-000"] == before["layer-000"]  # nothing else ran
    assert after["layer-001"]["artifacts"] == before["layer-001"]["artifacts"]  # same inputs, same result


def test_sacct_states_of_array_tasks_listed_under_the_bare_array_id(monkeypatch):
    """An array cancelled before any task started can be listed by accounting as the bare array id
    ("351|CANCELLED by 0", seen on this cluster): its tasks take that state, ranges are expanded, and
    ids not listed stay absent. (sacct's own output, as it printed it, fed to the parser.)"""
    import types

    printed = "351|CANCELLED by 0\n352_[0-2]|PENDING\n353_1|COMPLETED\n"
    monkeypatch.setattr(sacct, "available", lambda: True)
    monkeypatch.setattr(sacct.subprocess, "run", lambda *a, **k: types.SimpleNamespace(stdout=printed))
    got = sacct.states(iter(["351_0", "352_2", "353_1", "353_0", "354_0"]))
    assert got["351_0"] == "CANCELLED" and got["352_2"] == "PENDING" and got["353_1"] == "COMPLETED"
    assert "353_0" not in got and "354_0" not in got
