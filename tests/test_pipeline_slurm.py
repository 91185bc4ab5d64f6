"""The real pipeline (stage specs in stages/, real stage bodies) on the real local SLURM cluster.

Tiny OLMoE sources (3 MoE layers, tasks math and code, report disabled) from pipeline_fixtures; no
mock of sbatch. Each test lets the debug executor (in-process) do whatever SLURM is not the point
of, so only a few dependency hops go through the cluster. What is checked:

* a full run (block_size 3: arrays over layers and over layer x task, afterok chains) completes
  and writes the same router bytes as the debug executor; ``status`` says done; resubmit is a no-op;
* changed calibration data is resubmitted from capture-activations on (the merge is kept); with a
  corrupt JSONL line capture fails naming file:line, SLURM cancels its dependents before they
  start, ``status`` exits 1 naming the failure, its log and error; restoring the line resumes with
  capture alone (everything after it still matches its records);
* a solve-router task killed half-way through its writes, then resubmitted, gives the routers of
  an uninterrupted run (block_size 1: the kill cancels the later blocks' captures too);
* changing harc.alpha with block_size = #layers reruns only solve-router and assemble-model (with
  the same bytes as the debug executor); a calibration change is planned from capture on.

These tests fail when SLURM is missing, unless HARC_HPC_SKIP_SLURM=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import submitit
import yaml
from click.testing import CliRunner

from harc_hpc.cli import main
from harc_hpc.config import load_config
from harc_hpc.pipeline import records
from harc_hpc.pipeline.api import ActiveJobsError, plan_run, submit_run
from harc_hpc.pipeline.planner import default_specs_dir
from harc_hpc.pipeline.status import active_jobs, collect
from harc_hpc.pipeline.executors.base import read_submissions
from harc_hpc.pipeline.executors.slurm import wait_for_jobs
from pipeline_fixtures import build_tiny_sources, write_config
from pipeline_slurm_hooks import die_file, pause_file, started_file

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Small requests so that several array tasks run at once on the one-node cluster.
EXECUTOR = {"executor.cpus": 1, "executor.mem_gb": 1, "executor.time_min": 10,
            "executor.partition": os.environ.get("SLURM_LOCAL_PARTITION", "debug")}
WAIT_S = 300


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


@pytest.fixture(autouse=True)
def cancel_leftover_jobs(tmp_path):
    """A test that fails half-way must not leave its jobs (a paused task sleeps) on the shared cluster."""
    yield
    for sub in tmp_path.rglob("submissions.jsonl"):
        active = active_jobs(sub.parent)
        if active:
            subprocess.run(["scancel", *active], timeout=30, check=False)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return build_tiny_sources(tmp_path_factory.mktemp("src"), layers=3)


def config_file(root: Path, sources: dict, name: str, block_size: int, extra=None, **kw) -> Path:
    return write_config(root, sources, name=name, block_size=block_size, executor="slurm",
                        extra={**EXECUTOR, **(extra or {})}, **kw)


def submit(cfg, **kw):
    kw.setdefault("poll_s", 0.5)
    kw.setdefault("wait_timeout_s", WAIT_S)
    kw.setdefault("echo", lambda m: None)
    return submit_run(cfg, **kw)


def ancestors(plan, task_id: str) -> set[str]:
    out, todo = set(), list(plan.tasks[task_id].needs)
    while todo:
        tid = todo.pop()
        if tid not in out:
            out.add(tid)
            todo.extend(plan.tasks[tid].needs)
    return out


def only(ids):
    ids = set(ids)
    return lambda plan: [t for t in plan.tasks.values() if t.id in ids]


def result_bytes(run_dir: Path) -> dict[str, bytes]:
    """The calibrated routers and the assembled checkpoint's tensors."""
    files = sorted((run_dir / "routers").glob("layer-*.safetensors")) + sorted((run_dir / "model").glob("*.safetensors"))
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in files}


def completion_texts(run_dir: Path) -> dict[str, str]:
    root = run_dir / "completions"
    return {p.relative_to(root).with_suffix("").as_posix(): p.read_text() for p in root.rglob("*.json")}


def submitted_ids(outcome) -> list[str]:
    return sorted(t.id for s in outcome.submitted for t in s.group.tasks)


def status_cli(run_dir: Path):
    return CliRunner().invoke(main, ["status", str(run_dir)])


def wait_until(predicate, what: str, timeout_s: float = 120, every_s: float = 0.3):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


def test_full_run_matches_debug_executor_and_resubmit_is_a_noop(sources, tmp_path):
    config = config_file(tmp_path, sources, "full", block_size=3)
    reference, _ = submit(load_config(config), executor="debug", run_dir=tmp_path / "reference")

    cfg = load_config(config)
    plan, outcome = submit(cfg, wait=True)
    assert outcome.ok, (outcome.failed, outcome.skipped)
    run = plan.run_dir
    groups = [s.group.name for s in outcome.submitted]
    assert groups == ["merge-experts", "capture-activations/block-000", "compute-statistics/block-000",
                      "solve-router/block-000", "assemble-model"]
    by_name = {s.group.name: s for s in outcome.submitted}
    assert len(by_name["compute-statistics/block-000"].tasks) == 6  # 3 layers x 2 tasks, one array
    assert len(by_name["solve-router/block-000"].tasks) == 3
    assert by_name["merge-experts"].depends_on == []
    for up, down in zip(outcome.submitted, outcome.submitted[1:]):
        assert down.depends_on == [up.job_id], down.group.name
        assert down.parameters["slurm_dependency"] == f"afterok:{up.job_id}"

    # Every task ran as its own array task of its group's job, after everything it needs had finished.
    recs = {t.id: records.read_completion(run, t.stage, t.key) for t in plan.tasks.values()}
    for t in plan.tasks.values():
        job = recs[t.id]["job"]
        group = t.stage if t.block is None else f"{t.stage}/block-{t.block:03d}"
        assert job["submitit_executor"] == "slurm"
        assert job.get("slurm_array_job_id", job["slurm_job_id"]) == by_name[group].job_id, t.id
        for u in t.needs:
            assert recs[t.id]["started"] >= recs[u]["finished"], (t.id, u)

    mine, ref = result_bytes(run), result_bytes(reference.run_dir)
    assert len(mine) == 4 and mine == ref  # routers/layer-00{0,1,2}.safetensors, model/model.safetensors

    res = status_cli(run)
    assert res.exit_code == 0, res.output
    assert f"total: done {len(plan.tasks)}" in res.output
    for t in plan.tasks.values():
        assert re.search(rf"^  {re.escape(t.key)}\s+done\s+COMPLETED\s", res.output, re.M), (t.id, res.output)

    n_submissions = len(read_submissions(run))
    res = CliRunner().invoke(main, ["submit", str(config)])
    assert res.exit_code == 0, res.output
    assert "nothing to do: every task is complete" in res.output
    assert len(read_submissions(run)) == n_submissions
    _, again = submit(cfg)
    assert again.submitted == [] and sorted(again.already_complete) == sorted(plan.tasks)


def test_corrupt_calibration_fails_capture_cancels_dependents_and_fixed_data_resumes(sources, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sources["data"], data)
    config = config_file(tmp_path, {**sources, "data": data}, "fail", block_size=3)
    plan, outcome = submit(load_config(config), executor="debug")  # a completed run
    run = plan.run_dir
    capture = "capture-activations/block-000"
    records_before = completion_texts(run)
    results_before = result_bytes(run)
    logs_before = {p: p.read_text() for p in (run / "logs").rglob("*.log")}

    calib = data / "math-calib.jsonl"
    good = calib.read_text()
    bad_line = len(good.splitlines()) + 1
    calib.write_text(good + '{"text": "an unterminated record\n')
    plan, outcome = submit(load_config(config), wait=True)
    # New calibration data: everything from capture on reruns, the merge is kept.
    assert outcome.already_complete == ["merge-experts/all"]
    assert [s.group.name for s in outcome.submitted] == [
        "capture-activations/block-000", "compute-statistics/block-000", "solve-router/block-000", "assemble-model"]
    assert outcome.failed == ["capture-activations/block-000"]

    rows = {r.id: r for r in collect(run)}
    failed = rows["capture-activations/block-000"]
    where = f"{calib}:{bad_line}"
    assert failed.state == "failed" and failed.slurm_state == "FAILED"
    assert where in failed.error and "not valid JSON" in failed.error, failed.error
    assert where in Path(failed.log).read_text()
    assert rows["merge-experts/all"].state == "done"
    dependents = [tid for tid in plan.tasks if tid not in ("merge-experts/all", capture)]
    assert len(dependents) == 10
    for tid in dependents:
        r = rows[tid]
        assert r.state == "cancelled" and r.slurm_state == "CANCELLED", r
        assert r.error == "upstream capture-activations/block-000 failed", r
        assert r.log == ""  # it never started; its log is still the one of the earlier debug run
        lp = records.log_path(run, r.stage, r.key)
        assert lp.read_text() == logs_before[lp], tid

    res = status_cli(run)
    assert res.exit_code == 1, res.output
    assert re.search(r"^  block-000\s+failed\s+FAILED\s+\S+\s+" + re.escape(failed.log), res.output, re.M), res.output
    assert where in res.output
    assert "upstream capture-activations/block-000 failed" in res.output
    res = CliRunner().invoke(main, ["status", str(run), "--failed-only"])
    assert res.exit_code == 1 and "merge-experts" not in res.output.split("total:")[0]

    # Fix the line as it was: capture reruns, and finds the data everything after it was computed
    # from, so those records stand (the cancelled jobs never touched them) and only capture runs.
    calib.write_text(good)
    plan, outcome = submit(load_config(config), wait=True)
    assert outcome.ok, (outcome.failed, outcome.skipped)
    assert submitted_ids(outcome) == [capture]
    assert sorted(outcome.already_complete) == sorted(tid for tid in plan.tasks if tid != capture)
    after = completion_texts(run)
    assert {k: v for k, v in after.items() if k != capture} == {k: v for k, v in records_before.items() if k != capture}
    recap = records.read_completion(run, "capture-activations", "block-000")
    assert recap["job"]["submitit_executor"] == "slurm"
    assert recap["artifacts"] == json.loads(records_before[capture])["artifacts"]  # same tokens and activations
    assert not [s for s in read_submissions(run) if s.get("stage") == "merge-experts"]
    assert result_bytes(run) == results_before
    assert status_cli(run).exit_code == 0


def hooked_specs(tmp_path: Path, hook: str = "solve_router") -> Path:
    """The production specs, with solve-router run through a test wrapper (default: the pausable one)."""
    out = tmp_path / "stages"
    shutil.copytree(default_specs_dir(), out)
    spec = yaml.safe_load((out / "solve-router.yaml").read_text())
    assert spec["function"] == "harc_hpc.stages.solve_router:run"
    spec["function"] = f"pipeline_slurm_hooks:{hook}"
    (out / "solve-router.yaml").write_text(yaml.safe_dump(spec))
    return out


def test_solve_killed_mid_write_then_resubmitted_matches_uninterrupted_run(sources, tmp_path):
    config = config_file(tmp_path, sources, "killed", block_size=1)
    reference, _ = submit(load_config(config), executor="debug", run_dir=tmp_path / "reference")

    specs = hooked_specs(tmp_path)
    cfg = load_config(config)
    _, plan = plan_run(cfg, specs_dir=specs)
    victim = "solve-router/layer-001"
    plan, _ = submit(cfg, executor="debug", specs_dir=specs, select=only(ancestors(plan, victim)))
    run = plan.run_dir
    key = "layer-001"
    pause_file(run, "solve-router", key).write_text("120")
    plan, outcome = submit(cfg, specs_dir=specs)
    assert [s.group.name for s in outcome.submitted] == [
        "solve-router/block-001", "capture-activations/block-002", "compute-statistics/block-002",
        "solve-router/block-002", "assemble-model"]
    job = outcome.submitted[0].tasks[key]["job_id"]
    wait_until(lambda: started_file(run, "solve-router", key).exists(), f"{victim} to start", WAIT_S)
    with pytest.raises(ActiveJobsError):
        submit(cfg, specs_dir=specs)  # a second copy would race the queued jobs
    subprocess.run(["scancel", job], check=True, timeout=30)
    # The launcher's own wait: every array known to accounting, none active, confirmed twice.
    final = wait_for_jobs(outcome.job_ids(), poll_s=0.3, timeout_s=WAIT_S, echo=lambda m: None)
    assert final[job] == "CANCELLED" and set(final.values()) == {"CANCELLED"}, final

    # Killed between its two writes: the router is in place, its report is a temp file, no record.
    assert (run / f"routers/{key}.safetensors").is_file()
    assert not (run / f"routers/{key}.json").exists()
    assert list((run / "routers").glob(f".{key}.json.tmp-*"))
    assert records.read_completion(run, "solve-router", key) is None
    rows = {r.id: r for r in collect(run)}
    assert rows[victim].state == "cancelled" and rows[victim].log  # it started: its log shows how far
    for tid in plan.downstream([victim]):
        assert rows[tid].state == "cancelled" and rows[tid].error == f"upstream {victim} cancelled", rows[tid]
    assert status_cli(run).exit_code == 1

    pause_file(run, "solve-router", key).unlink()
    plan, outcome = submit(cfg, specs_dir=specs, wait=True)
    assert outcome.ok, (outcome.failed, outcome.skipped)
    assert submitted_ids(outcome) == sorted({victim} | plan.downstream([victim]))
    assert result_bytes(run) == result_bytes(reference.run_dir)
    assert status_cli(run).exit_code == 0


def test_alpha_change_reruns_only_solve_and_assemble(sources, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sources["data"], data)
    sources = {**sources, "data": data}
    keep = {"run.retention": "keep"}  # the router inputs stay, so nothing upstream of the solve reruns
    config = config_file(tmp_path, sources, "alpha", block_size=3, extra=keep)
    plan, _ = submit(load_config(config), executor="debug")
    run = plan.run_dir
    before = completion_texts(run)
    before_bytes = result_bytes(run)
    n_submissions = len(read_submissions(run))

    config = config_file(tmp_path, sources, "alpha", block_size=3, harc={"alpha": 0.5}, extra=keep)
    res = CliRunner().invoke(main, ["submit", str(config), "--wait"])
    assert res.exit_code == 0, res.output

    new = read_submissions(run)[n_submissions:]
    assert [s["group"] for s in new] == ["solve-router/block-000", "assemble-model"]
    ran = sorted(f"{s['stage']}/{k}" for s in new for k in s["tasks"])
    assert ran == ["assemble-model/all", "solve-router/layer-000", "solve-router/layer-001", "solve-router/layer-002"]
    after = completion_texts(run)
    assert sorted(after) == sorted(before)
    for name, text in after.items():
        stage, key = name.split("/", 1)
        if stage in ("solve-router", "assemble-model"):
            job = records.read_completion(run, stage, key)["job"]
            sub = next(s for s in new if s["stage"] == stage)
            assert job.get("slurm_array_job_id", job.get("slurm_job_id")) == sub["job_id"], name
        else:
            assert text == before[name], f"{name} reran"  # statistics do not depend on alpha
    changed = result_bytes(run)
    assert all(changed[k] != before_bytes[k] for k in changed)

    reference, _ = submit(load_config(config), executor="debug", run_dir=tmp_path / "reference")
    assert changed == result_bytes(reference.run_dir)

    # New calibration data or settings would rerun everything but the merge (planned only here; the
    # failure test submits such a change).
    _, dry = submit(load_config(config, overrides={"calibration.max_length": 48}), dry_run=True)
    assert dry.already_complete == ["merge-experts/all"]
    with open(data / "code-calib.jsonl", "a") as fh:
        fh.write('{"text": "def g(n):\\n    return n\\n"}\n')
    _, dry = submit(load_config(config), dry_run=True)
    assert dry.already_complete == ["merge-experts/all"]


def test_alpha_change_after_retention_recaptures_before_the_solve(sources, tmp_path):
    """With run.retention delete-intermediate the router inputs are gone once solved; an alpha change
    reruns the capture, and the solve job waits for it (afterok), although the statistics between
    the two are complete."""
    config = config_file(tmp_path, sources, "retire", block_size=3)
    plan, _ = submit(load_config(config), executor="debug")
    run = plan.run_dir
    assert not (run / "activations" / "block-000.zarr").exists()
    n_submissions = len(read_submissions(run))

    config = config_file(tmp_path, sources, "retire", block_size=3, harc={"alpha": 0.5})
    res = CliRunner().invoke(main, ["submit", str(config), "--wait"])
    assert res.exit_code == 0, res.output
    assert "rerunning capture-activations/block-000: solve-router/layer-000 needs activations/block-000.zarr" in res.output
    new = read_submissions(run)[n_submissions:]
    assert [s["group"] for s in new] == ["capture-activations/block-000", "solve-router/block-000", "assemble-model"]
    capture, solve = new[0], new[1]
    assert solve["depends_on"] == [capture["job_id"]], solve
    reference, _ = submit(load_config(config), executor="debug", run_dir=tmp_path / "reference")
    assert result_bytes(run) == result_bytes(reference.run_dir)


def test_solve_router_as_two_processes_per_task_equals_one_process(sources, tmp_path):
    """executor.stages.solve-router.tasks_per_node 2: each layer's solve is one SLURM job of two
    processes (srun), joined by torch.distributed (gloo), each holding half of every task's tokens;
    the router equals the one-process solve to 1e-6, and rank 0 alone writes it."""
    from safetensors.torch import load_file

    two = {"executor.stages": {"solve-router": {"tasks_per_node": 2, "cpus": 1}}}
    config = config_file(tmp_path, sources, "ranks", block_size=3, extra=two)
    cfg = load_config(config)
    plan, _ = submit(cfg, executor="debug", select=lambda p: [t for t in p.tasks.values() if t.stage != "solve-router"
                                                              and t.stage != "assemble-model"])
    run = plan.run_dir
    res = CliRunner().invoke(main, ["submit", str(config), "--wait"])
    assert res.exit_code == 0, res.output
    sub = next(s for s in read_submissions(run) if s.get("stage") == "solve-router")
    assert sub["parameters"]["tasks_per_node"] == 2
    reference, _ = submit(load_config(config_file(tmp_path, sources, "one", block_size=3)), executor="debug")
    for layer in range(3):
        name = f"routers/layer-{layer:03d}"
        rep = json.loads((run / f"{name}.json").read_text())
        assert rep["ranks"] == 2, rep
        ref_rep = json.loads((reference.run_dir / f"{name}.json").read_text())
        assert rep["tokens"] == ref_rep["tokens"] and rep["inputs_bytes"] < ref_rep["inputs_bytes"]
        got = load_file(run / f"{name}.safetensors")
        want = load_file(reference.run_dir / f"{name}.safetensors")
        for k in want:
            rel = float((got[k].double() - want[k].double()).norm() / want[k].double().norm())
            assert rel < 1e-6, (name, k, rel)
    # Both ranks ran (one SLURM log per rank), and only one wrote the task log and record.
    logs = sorted(p.name for p in (run / "slurm" / "solve-router").glob(f"{sub['job_id']}_0_*_log.err"))
    assert len(logs) == 2, logs
    assert "rank 1 of 2 (gloo)" in (run / "slurm" / "solve-router" / logs[1]).read_text()


def test_a_rank_lost_mid_solve_fails_the_task_and_a_resubmit_completes_it(sources, tmp_path):
    """Rank 1 of layer 1's two-process solve dies: rank 0's all-reduce fails, so the task fails as a
    whole (no router, no record), the other layers complete, and a resubmit runs only that layer
    and what follows."""
    from safetensors.torch import load_file

    two = {"executor.stages": {"solve-router": {"tasks_per_node": 2, "cpus": 1}}}
    config = config_file(tmp_path, sources, "lost", block_size=3, extra=two)
    cfg = load_config(config)
    specs = hooked_specs(tmp_path, "solve_router_rank_dies")
    upstream = lambda p: [t for t in p.tasks.values() if t.stage not in ("solve-router", "assemble-model")]  # noqa: E731
    plan, _ = submit(cfg, executor="debug", specs_dir=specs, select=upstream)
    run = plan.run_dir
    die_file(run, 1).write_text("")
    plan, outcome = submit(cfg, specs_dir=specs, wait=True)
    assert outcome.failed == ["solve-router/layer-001"], (outcome.failed, outcome.skipped)
    assert "assemble-model/all" in outcome.skipped
    assert not (run / "routers/layer-001.safetensors").exists()
    assert records.read_completion(run, "solve-router", "layer-001") is None
    done = {k: completion_texts(run)[f"solve-router/{k}"] for k in ("layer-000", "layer-002")}

    plan, outcome = submit(cfg, specs_dir=specs, wait=True)
    assert outcome.ok, (outcome.failed, outcome.skipped)
    assert submitted_ids(outcome) == ["assemble-model/all", "solve-router/layer-001"]
    assert {k: completion_texts(run)[f"solve-router/{k}"] for k in done} == done
    reference, _ = submit(load_config(config_file(tmp_path, sources, "lost-ref", block_size=3)), executor="debug")
    got = load_file(run / "routers/layer-001.safetensors")
    want = load_file(reference.run_dir / "routers/layer-001.safetensors")
    for k in want:
        assert float((got[k].double() - want[k].double()).norm() / want[k].double().norm()) < 1e-6
