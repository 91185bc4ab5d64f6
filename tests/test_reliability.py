"""Trust nothing unchecked: one test per row of the bad-input matrix (issue 12).

A finished tiny run (debug executor, in-process) is damaged the way a shared filesystem, a killed
job or a bad model damages it; the next submit must notice, say why, rerun what is needed and end
with the same bytes as the undamaged run, or stop with a clear error and a non-zero exit.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from harc_hpc.io.atomic import atomic_dir, atomic_path, is_temporary, json_text, sweep_stale_temporaries, write_json_atomic
from harc_hpc.config import load_config
from harc_hpc.errors import (CorruptArtifactError, DiskFullError, HarcHpcError, InputDataError, RunStateError,
                             UsageError)
from harc_hpc.pipeline import records
from harc_hpc.pipeline.api import submit_run
from harc_hpc.pipeline.lock import RunLock, RunLockedError
from harc_hpc.stages import layout
from pipeline_fixtures import build_tiny_sources, write_config


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return build_tiny_sources(tmp_path_factory.mktemp("src"), layers=2)


def final_bytes(run_dir: Path) -> dict:
    out = {}
    for sub in ("model", "routers"):
        for p in sorted((run_dir / sub).glob("*")):
            if p.is_file() and p.suffix == ".safetensors":
                out[f"{sub}/{p.name}"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_debug(config: Path, run_dir: Path):
    lines: list[str] = []
    plan, outcome = submit_run(load_config(config), executor="debug", run_dir=run_dir, echo=lines.append)
    return plan, outcome, lines


@pytest.fixture(scope="module")
def finished(sources, tmp_path_factory):
    """A finished run and its final bytes; tests copy it before damaging it."""
    root = tmp_path_factory.mktemp("finished")
    # run.retention keep: these tests damage and read the intermediate stores of a finished run
    config = write_config(root, sources, name="run", executor="debug", extra={"run.retention": "keep"})
    plan, outcome, _ = run_debug(config, root / "runs" / "run")
    assert outcome.ok, (outcome.failed, outcome.skipped)
    return config, plan.run_dir, final_bytes(plan.run_dir)


@pytest.fixture
def damaged(finished, tmp_path):
    config, run_dir, reference = finished
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return config, copy, reference


def _flip_bytes(path: Path, offset_from_end: int = 16) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) - offset_from_end
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# -- row 1: bytes of a finished router or statistics file overwritten ------------------------------

@pytest.mark.parametrize("artifact,task", [
    ("routers/layer-001.safetensors", "solve-router/layer-001"),
    ("statistics/layer-000/math.h5", "compute-statistics/layer-000/task-math"),
])
def test_overwritten_artifact_is_rerun_and_says_why(damaged, artifact, task):
    config, run, reference = damaged
    _flip_bytes(run / artifact)
    plan, outcome, lines = run_debug(config, run)
    assert outcome.ok
    assert any(line.startswith(f"rerunning {task}: artifact {artifact}") and "sha256" in line for line in lines), lines
    assert task in outcome.completed
    assert final_bytes(run) == reference


def test_corrupt_statistics_with_alpha_changed_never_solves_on_bad_data(damaged):
    """The issue's worst case: alpha changed on corrupted statistics "converged" with KL 27 540."""
    config, run, _ = damaged
    _flip_bytes(run / "statistics/layer-001/code.h5", offset_from_end=200)
    cfg = load_config(config)
    cfg.harc.alpha = 0.5
    lines: list[str] = []
    plan, outcome = submit_run(cfg, executor="debug", run_dir=run, echo=lines.append)
    assert outcome.ok
    assert "compute-statistics/layer-001/task-code" in outcome.completed
    rep = json.loads((run / "routers/layer-001.json").read_text())
    assert rep["converged"] and max(rep["kl_after"].values()) < 1.0, rep


def test_checksum_failure_on_read_names_the_store_and_drops_the_producer(damaged):
    """Bytes changed inside a Zarr chunk (size unchanged): the reader's CRC32C catches it, the task
    fails naming store and rows, the producer's record goes, and the next submit repairs the run."""
    config, run, reference = damaged
    store = run / "activations/block-001.zarr"
    chunk = next(p for p in sorted(store.rglob("*")) if p.is_file() and p.name != "zarr.json" and "layer-001" in str(p))
    _flip_bytes(chunk, offset_from_end=8)
    for rec in (run / "completions/compute-statistics").rglob("*.json"):  # force a reader to run
        rec.unlink()
    plan, outcome, lines = run_debug(config, run)
    assert not outcome.ok and any(t.startswith("compute-statistics/layer-001") for t in outcome.failed)
    err = records.failure_line(run, "compute-statistics", "layer-001/task-math") or \
        records.failure_line(run, "compute-statistics", "layer-001/task-code")
    assert "CorruptArtifactError" in err and "block-001.zarr" in err and "checksum" in err, err
    assert records.read_completion(run, "capture-activations", "block-001") is None
    plan, outcome, lines = run_debug(config, run)
    assert outcome.ok and "capture-activations/block-001" in outcome.completed
    assert final_bytes(run) == reference


# -- row 2: one Zarr chunk file deleted ------------------------------------------------------------

def test_deleted_zarr_chunk_is_detected_and_rerun(damaged):
    config, run, reference = damaged
    store = run / "activations/block-000.zarr"
    chunk = next(p for p in sorted(store.rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.unlink()
    plan, outcome, lines = run_debug(config, run)
    rel = chunk.relative_to(store).as_posix()
    assert any(line.startswith("rerunning capture-activations/block-000: artifact activations/block-000.zarr")
               and rel in line and "missing" in line for line in lines), lines
    assert outcome.ok and final_bytes(run) == reference


def test_reader_refuses_an_array_with_missing_chunks(damaged):
    from harc_hpc.io.activations import ActivationArray

    _, run, _ = damaged
    store = run / "activations/block-000.zarr"
    chunk = next(p for p in sorted(store.rglob("*")) if p.is_file() and p.name != "zarr.json" and "math" in str(p))
    chunk.unlink()
    name = "layer-000/math"
    with pytest.raises(CorruptArtifactError, match="chunks are missing"):
        ActivationArray(store, name)


def test_status_verify_decodes_every_chunk_and_marks_the_task_invalid(damaged):
    from harc_hpc.cli import main

    _, run, _ = damaged
    result = CliRunner().invoke(main, ["status", str(run)])
    assert result.exit_code == 0, result.output
    store = run / "activations/block-000.zarr"
    chunk = next(p for p in sorted(store.rglob("*")) if p.is_file() and p.name != "zarr.json")
    _flip_bytes(chunk, offset_from_end=8)  # same size: only decoding sees it
    assert CliRunner().invoke(main, ["status", str(run)]).exit_code == 0
    result = CliRunner().invoke(main, ["status", str(run), "--verify"])
    assert result.exit_code == 1
    assert "invalid" in result.output and "activations/block-000.zarr" in result.output, result.output
    assert records.read_completion(run, "capture-activations", "block-000") is None


# -- row 3: NaN / Inf ------------------------------------------------------------------------------

def test_nan_router_inputs_stop_capture_naming_layer_task_and_rows(sources, tmp_path, monkeypatch):
    from harc_hpc.stages import capture_activations

    real_unpad = capture_activations.unpad
    calls = {"n": 0}

    def poisoned(x, lengths):
        out = real_unpad(x, lengths)
        calls["n"] += 1
        # the streamed capture (block size 1) unpads one batch at a time: call 2 is block 0, task
        # math, the residual its second batch's router inputs derive from
        if calls["n"] == 2:
            out = out.clone()
            out[3, 1] = float("nan")
        return out

    monkeypatch.setattr(capture_activations, "unpad", poisoned)
    config = write_config(tmp_path, sources, name="nan", executor="debug")
    plan, outcome, lines = run_debug(config, tmp_path / "runs" / "nan")
    assert outcome.failed == ["capture-activations/block-000"], outcome.failed
    err = records.failure_line(plan.run_dir, "capture-activations", "block-000")
    assert "InputDataError" in err and "router inputs of layer 0" in err and "task math" in err, err
    assert "sequences 4-7" in err and "NaN/Inf" in err, err
    assert not layout.activation_store(plan.run_dir, 0).exists()
    assert not [p for p in plan.run_dir.rglob("*") if is_temporary(p.name)]


def test_nan_statistics_stop_the_solve_naming_the_file(damaged):
    from harc_hpc.io.statistics import load_statistics, save_statistics
    from harc_hpc.stages import solve_router

    config, run, _ = damaged
    path = run / "statistics/layer-000/code.h5"
    stats = load_statistics(path)
    stats.sigma_w[0, 0] = float("nan")
    path.unlink()
    save_statistics(stats, path)
    with pytest.raises(InputDataError, match=r"code\.h5.*NaN/Inf") as info:
        solve_router.run(load_config(config), run, layer=0)
    assert info.value.exit_code == 3


def test_nan_activations_stop_the_statistics_naming_rows(damaged):
    import zarr

    from harc_hpc.io.activations import to_storage
    from harc_hpc.stages import compute_statistics

    config, run, _ = damaged
    arr = zarr.open_group(str(run / "activations/block-000.zarr"), mode="r+")["layer-000/code"]
    bad = torch.from_numpy(arr[5:6].copy()).float()
    bad[0, 2] = float("inf")
    arr[5:6] = to_storage(bad, arr.attrs["dtype"])
    with pytest.raises(InputDataError, match=r"layer 0, task code.*NaN/Inf in rows 0:"):
        compute_statistics.run(load_config(config), run, layer=0, task="code")


def test_records_are_strict_json(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"kl": float("nan"), "x": [1.0, float("inf")], "ok": 0.5})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"kl": None, "x": [1.0, None], "ok": 0.5}
    json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert json.loads(json_text({"a": math.nan})) == {"a": None}


# -- row 4: two submits on one run directory; concurrent replacement ------------------------------

def _hold_lock(run_dir: str, ready, release):
    with RunLock(run_dir, command="harc-hpc submit held.yaml"):
        ready.set()
        release.wait(30)


def test_second_submit_on_a_locked_run_dir_names_the_holder(finished, tmp_path):
    config, _, _ = finished
    run = tmp_path / "locked"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(run), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RunLockedError) as info:
            submit_run(load_config(config), executor="debug", run_dir=run, echo=lambda m: None)
        msg = str(info.value)
        assert f"pid {holder.pid}" in msg and socket.gethostname() in msg and "held.yaml" in msg, msg
        assert info.value.exit_code == 4
        assert not (run / "plan.json").exists()  # refused before planning anything into it
    finally:
        release.set()
        holder.join(30)
    # The holder is gone (the kernel dropped its flock): the run directory is free again.
    with RunLock(run):
        pass


def test_lock_of_a_killed_holder_is_free(tmp_path):
    code = ("import sys, time; from harc_hpc.pipeline.lock import RunLock\n"
            "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError):
        RunLock(tmp_path).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    RunLock(tmp_path).acquire().release()


def _replace_many(final: str, tag: int, n: int, errors):
    try:
        for i in range(n):
            with atomic_dir(final) as tmp:
                for j in range(3):
                    (tmp / f"part-{j}").write_text(f"{tag}-{i}")
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        errors.put(f"{type(exc).__name__}: {exc}")


def test_two_processes_replacing_one_directory_never_fail(tmp_path):
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    final = tmp_path / "store.zarr"
    procs = [ctx.Process(target=_replace_many, args=(str(final), k, 400, errors)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, found[:3]
    parts = sorted(p.name for p in final.iterdir())
    assert parts == ["part-0", "part-1", "part-2"]
    assert len({(final / n).read_text() for n in parts}) == 1  # one writer's whole result
    assert not [p for p in tmp_path.iterdir() if is_temporary(p.name)]


def test_a_second_runner_of_one_task_waits_and_skips(finished, tmp_path):
    """Two runners of one task (a duplicated job): the second waits on the task lock, then finds
    the record and skips, so the task body runs once."""
    from harc_hpc.pipeline.lock import TaskLock
    from harc_hpc.pipeline.runner import task_payload

    config, run_dir, _ = finished
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    cfg = load_config(config)
    from harc_hpc.pipeline.api import plan_run

    cfg, plan = plan_run(cfg, run)
    task = plan.tasks["assemble-model/all"]
    payload = task_payload(plan, task)
    stamp = (run / "completions/assemble-model/all.json").stat().st_mtime_ns
    with TaskLock(run, task.stage, task.key):
        proc = subprocess.Popen([sys.executable, "-m", "harc_hpc.pipeline.runner", "--run-dir", str(run),
                                 "--payload", json.dumps(payload)], stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert proc.poll() is None  # blocked on the lock
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "already complete, skipping" in err
    assert (run / "completions/assemble-model/all.json").stat().st_mtime_ns == stamp


# -- row 5: temporaries of killed tasks -------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_dead_tasks_are_removed_on_resume(damaged):
    config, run, reference = damaged
    host, dead = socket.gethostname(), _dead_pid()
    stale = [run / "activations" / f".block-001.zarr.tmp-{host}-{dead}-0123abcd",
             run / "hidden" / f".block-000.zarr.tmp-{dead}",  # the name earlier versions used
             run / "routers" / f".layer-000.json.tmp-{host}-{dead}-89abcdef"]
    for p in stale[:2]:
        (p / "layer-000").mkdir(parents=True)
        (p / "layer-000" / "c0").write_bytes(b"x" * 1000)
    stale[2].write_text("{partial")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    alive = run / "routers" / f".layer-001.json.tmp-{host}-{sleeper.pid}-00000000"
    alive.write_text("{still being written")
    try:
        plan, outcome, lines = run_debug(config, run)
        assert outcome.ok
        assert not any(p.exists() for p in stale)
        assert alive.exists()  # its writer is alive: never touched
        assert any(line.startswith("removed 3 temporary file(s) left by killed tasks") for line in lines), lines
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sweep_stale_temporaries(run) == [alive]


def test_a_killed_writer_not_yet_reaped_counts_as_dead(tmp_path):
    """A writer killed with its process group stays a zombie until reaped; a resubmit sweeping in
    that window must still remove its temporary (seen once in CI: a retire write cut by the kill)."""
    host = socket.gethostname()
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    tmp = tmp_path / f".block-000.json.tmp-{host}-{writer.pid}-0759e5b4"
    tmp.write_text("{partial")
    try:
        writer.kill()
        deadline = time.monotonic() + 10
        while open(f"/proc/{writer.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert sweep_stale_temporaries(tmp_path) == [tmp]  # a zombie: not reaped, yet dead
    finally:
        writer.wait()


def test_a_failing_write_leaves_no_temporary(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out.zarr") as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


# -- row 8: disk full -------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root, as here and in CI)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_mid_write_names_the_path_and_leaves_nothing(small_disk):
    final = small_disk / "activations" / "block-000.zarr"
    with pytest.raises(DiskFullError) as info:
        with atomic_dir(final) as tmp:
            (tmp / "chunk").write_bytes(os.urandom(2 << 20))
    msg = str(info.value)
    assert str(final) in msg and "no space left on device" in msg and "free" in msg, msg
    assert info.value.exit_code == 3
    assert not [p for p in small_disk.rglob("*") if p.is_file()]


def test_disk_too_small_is_refused_before_writing(small_disk):
    with pytest.raises(DiskFullError, match=r"needs about 4\.0 MiB"):
        with atomic_path(small_disk / "x.bin", needed_bytes=4 << 20) as tmp:
            tmp.write_bytes(b"never")
    assert list(small_disk.iterdir()) == []


def test_standalone_merge_experts_on_a_full_disk_says_so_without_traceback(sources, small_disk, tmp_path):
    big = tmp_path / "big"  # a source bigger than the 1 MiB disk
    from transformers import AutoModelForCausalLM

    from pipeline_fixtures import tiny_config

    conf = tiny_config("olmoe", layers=2)
    conf.hidden_size, conf.intermediate_size = 128, 256
    torch.manual_seed(0)
    for name in ("base", "a", "b"):
        AutoModelForCausalLM.from_config(conf).save_pretrained(big / name)
    cfg_text = (f"run: {{name: merged, output_dir: {small_disk}}}\n"
                f"models:\n  base: {big / 'base'}\n  sources:\n    - {{name: a, path: {big / 'a'}}}\n"
                f"    - {{name: b, path: {big / 'b'}}}\nmerge: {{method: linear}}\n")
    config = tmp_path / "merge.yaml"
    config.write_text(cfg_text)
    res = subprocess.run([str(Path(sys.executable).parent / "harc-hpc"), "merge-experts", str(config)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stderr
    assert "no space left on device" in res.stderr and str(small_disk / "merged" / "merged") in res.stderr, res.stderr
    assert "needs about" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not [p for p in small_disk.rglob("*") if p.is_file()]


# -- the error base --------------------------------------------------------------------------------

def test_every_harc_error_class_derives_from_one_base():
    import importlib
    import inspect
    import pkgutil

    import harc_hpc

    found = []
    for mod in pkgutil.walk_packages(harc_hpc.__path__, "harc_hpc."):
        if mod.name.startswith("harc_hpc.demo"):
            continue
        module = importlib.import_module(mod.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == module.__name__:
                found.append(obj)
    assert len(found) >= 12
    assert all(issubclass(c, HarcHpcError) for c in found), [c for c in found if not issubclass(c, HarcHpcError)]
    assert {UsageError.exit_code, InputDataError.exit_code, RunStateError.exit_code} == {2, 3, 4}


def test_cli_maps_errors_to_exit_codes_without_traceback(tmp_path):
    from harc_hpc.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {name: x}\nmodels: {sources: []}\nharc: {alpha: 7}\n")
    result = CliRunner().invoke(main, ["submit", str(bad), "--dry-run"])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output, result.output


# -- kill -9 of a whole local submit, then resubmit ------------------------------------------------

@pytest.mark.slow
def test_submit_killed_mid_run_resumes_to_the_same_bytes_with_no_temporaries(sources, finished, tmp_path):
    """What benchmarks/fault_injection.py does 20 times on configs/tiny.yaml, once, at a moment
    when tasks are certainly in flight (right after the first router was written)."""
    _, _, reference = finished
    config = write_config(tmp_path, sources, name="killed", executor="local")
    run = tmp_path / "runs" / "killed"
    cmd = [str(Path(sys.executable).parent / "harc-hpc"), "submit", str(config), "--executor", "local"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((run / "completions" / "solve-router").glob("*.json")):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert records.read_completion(run, "assemble-model", "all") is None  # it was killed mid-run
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "already complete" in res.stdout
    assert final_bytes(run) == reference
    assert not [p for p in run.rglob("*") if is_temporary(p.name)]


def test_the_completion_record_says_what_a_resume_verifies(finished):
    _, run, _ = finished
    rec = records.read_completion(run, "capture-activations", "block-000")
    v = rec["verification"]
    assert v["format"] == "harc-manifest/1" and "CRC32C" in v["on_resume"]
    assert v["files"] == v["sha256"] + v["edges"] + v["size_only"] and v["size_only"] > 0 and v["sha256"] > 0
    files = [p for a in rec["artifacts"] for p in (run / a).rglob("*") if p.is_file()] + \
        [run / a for a in rec["artifacts"] if (run / a).is_file()]
    assert v["files"] == len(files) and v["bytes"] == sum(p.stat().st_size for p in files)


def test_memory_budget_too_small_is_an_error_unless_streaming_is_asked_for(damaged, caplog):
    """harc.memory_budget_gb below a layer's inputs: a clear error naming the max_tokens that fits and
    writing nothing; with harc.stream_inputs they are streamed every iteration, same router bytes."""
    from harc_hpc.errors import InputDataError
    from harc_hpc.stages import solve_router

    config, run, _ = damaged
    router = run / "routers/layer-001.safetensors"
    before = router.read_bytes()
    rep = json.loads((run / "routers/layer-001.json").read_text())
    assert rep["inputs_resident"] is True and 0 < rep["inputs_bytes"] < rep["resident_bytes"]
    assert rep["inputs_kept_as"] == "float64"  # plenty of room: widened once to the compute dtype
    from safetensors.torch import load_file

    k, d = next(iter(load_file(router).values())).shape
    n = sum(rep["tokens"].values())
    # over the budget resident, within it streamed 64 tokens at a time
    small_chunks = {"calibration.chunk_tokens": 64}
    tight = (rep["resident_bytes"] + solve_router.streamed_bytes(n, d, k, "float64", 64)) / 2 / 2**30
    solve_router.run(load_config(config, small_chunks), run, layer=1)  # resident, chunked alike
    before = router.read_bytes()
    router.unlink()
    with pytest.raises(InputDataError) as err:
        solve_router.run(load_config(config, {"harc.memory_budget_gb": tight, **small_chunks}), run, layer=1)
    msg = str(err.value)
    assert msg.startswith("solve-router layer 1:") and "over the memory budget" in msg
    fits = int(msg.split("harc.max_tokens <= ")[1].split(" ")[0])
    assert 0 < fits < max(rep["tokens"].values()) and "harc.stream_inputs: true" in msg and "s per iteration" in msg
    assert not router.exists()

    cfg = load_config(config, {"harc.memory_budget_gb": tight, "harc.stream_inputs": True, **small_chunks})
    with caplog.at_level("WARNING"):
        solve_router.run(cfg, run, layer=1)
    rep = json.loads((run / "routers/layer-001.json").read_text())
    assert rep["inputs_resident"] is False
    assert "read from the store on every CG iteration" in caplog.text and "per iteration measured" in caplog.text
    assert router.read_bytes() == before

    # a budget too small even to stream one chunk: an error whatever harc.stream_inputs says
    router.unlink()
    for stream in (False, True):
        cfg = load_config(config, {"harc.memory_budget_gb": 1e-9, "harc.stream_inputs": stream})
        with pytest.raises(InputDataError, match="too small even to stream them: one chunk of") as err:
            solve_router.run(cfg, run, layer=1)
        assert "harc.stream_inputs" not in str(err.value) and "calibration.chunk_tokens" in str(err.value)
        assert not router.exists()


def test_max_tokens_subsamples_statistics_and_solve_alike_and_deterministically(damaged):
    from harc_hpc.io.statistics import load_statistics
    from harc_hpc.stages import compute_statistics, solve_router

    config, run, _ = damaged
    full = (run / "routers/layer-000.safetensors").read_bytes()
    total = load_statistics(run / "statistics/layer-000/math.h5").num_tokens
    cfg = load_config(config, {"harc.max_tokens": total // 2})
    outs = []
    for _ in range(2):
        for t in cfg.task_names:
            compute_statistics.run(cfg, run, layer=0, task=t)
        solve_router.run(cfg, run, layer=0)
        outs.append((run / "routers/layer-000.safetensors").read_bytes())
    rep = json.loads((run / "routers/layer-000.json").read_text())
    assert rep["tokens"] == {t: total // 2 for t in cfg.task_names}
    assert load_statistics(run / "statistics/layer-000/code.h5").num_tokens == total // 2
    assert outs[0] == outs[1] and outs[0] != full
