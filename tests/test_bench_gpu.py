"""benchmarks/bench_gpu.py on the CPU: ``--device cpu --quick`` runs every row kind of the GPU benchmark
(the code path a GPU node runs, at toy sizes), writes its rows to ``--out``, and keeps to its time guard."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"

# (kind, name) of every row the benchmark plans, in the order it runs them (CPU: gloo; its default
# inner_dtype is none, so the precision variant is the bfloat16 inner solve).
EXPECTED = [("solve", "default"), ("distributed", "1-rank gloo"), ("solve", "jacobi"),
            ("paper_style", "20 iterations"), ("capture", "onloaded"), ("capture", "whole"),
            ("solve", "inner bfloat16"), ("solve", "chunk 2048"), ("solve", "chunk 1048576")]


def run_bench(out: Path, *extra: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def numbers(value, path="row"):
    """Every int / float inside ``value`` (bools excluded), with where it sits."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-gpu")
    res = run_bench(out)
    assert res.returncode == 0, f"--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-4000:]}"
    return out, json.loads((out / "gpu.json").read_text()), res


def rows_by_name(result: dict) -> dict:
    return {(r["kind"], r["name"]): r for r in result["rows"]}


@pytest.mark.slow
def test_every_row_kind_runs_and_has_finite_figures(quick_run):
    out, result, _ = quick_run
    rows = rows_by_name(result)
    assert [(r["kind"], r["name"]) for r in result["rows"]] == EXPECTED
    for key, r in rows.items():
        assert r["status"] == "ok", (key, r.get("reason"), r.get("traceback"))
        found = list(numbers(r))
        assert found, key
        bad = [(where, v) for where, v in found if not math.isfinite(v)]
        assert not bad, (key, bad)
    for key in [k for k in EXPECTED if k[0] == "solve"]:
        r = rows[key]
        assert r["iterations"] > 0 and r["converged"], key
        assert r["ms_per_iteration"] > 0 and r["setup_s"] >= 0 and r["peak_bytes"] > 0, key
        assert r["projection"]["ms_per_iteration"] > 0 and r["projection"]["iterations"] > 0, key
    d = rows[("solve", "default")]["settings"]
    assert (d["solver"], d["preconditioner"], d["chunk_tokens"]) == ("pcg", "expert-block", 8192)
    assert rows[("solve", "jacobi")]["settings"]["preconditioner"] == "jacobi"
    assert rows[("solve", "inner bfloat16")]["settings"]["inner_dtype"] == "bfloat16"
    # every variant reaches the default's router (same system, same tol)
    for key in EXPECTED[2:]:
        if key[0] == "solve":
            assert rows[key]["router_rel_diff_to_default"] < 1e-4, key
    paper = rows[("paper_style", "20 iterations")]
    assert paper["iterations"] == 20 and paper["ms_per_iteration"] > 0
    for mode in ("onloaded", "whole"):
        c = rows[("capture", mode)]
        assert c["load_s"] > 0 and c["forward_s"] > 0 and c["tokens"] > 0, mode
        assert c["projection"]["forward_s"] > 0 and c["projection"]["load_s"] > 0, mode
    assert rows[("capture", "whole")]["router_inputs_max_rel_diff"] == 0.0  # bit for bit on the CPU
    header = result["header"]
    assert header["finished"] and header["device"] == "cpu" and header["device_name"]
    md = (out / "gpu.md").read_text()
    assert header["device_name"] in md
    for heading in ("## Solve", "## Paper-style operator", "## Capture", "## Distributed smoke"):
        assert heading in md
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # the atomic rewrites left nothing


@pytest.mark.slow
def test_distributed_one_rank_solve_equals_the_local_one(quick_run):
    _, result, _ = quick_run
    r = rows_by_name(result)[("distributed", "1-rank gloo")]
    assert r["status"] == "ok" and r["backend"] == "gloo" and r["world_size"] == 1
    assert r["all_reduce_ok"] and r["all_reduce_device"] == "cpu"
    assert r["equal_bitwise"] and r["rel_diff"] == 0.0
    assert r["local_iterations"] == r["distributed_iterations"] > 0
    assert r["all_reduce_calls"] > 0 and r["all_reduce_bytes"] > 0  # the solve really went through the group


def test_a_tiny_time_limit_skips_the_rows_and_records_them(tmp_path):
    res = run_bench(tmp_path, "--time-limit-s", "0.01", timeout=120)
    assert res.returncode == 0, res.stderr[-4000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert [(r["kind"], r["name"]) for r in result["rows"]] == EXPECTED  # none missing
    for r in result["rows"]:
        assert r["status"] == "skipped", r
        assert "time limit" in r["reason"], r
    assert result["header"]["finished"] and result["header"]["time_limit_s"] == 0.01
    assert "skipped: " in (tmp_path / "gpu.md").read_text()


def test_a_short_time_limit_stops_or_skips_later_rows_without_an_error(tmp_path):
    """A limit that the first rows can spend: what is left is skipped (or stopped mid-row), never
    missing, never an error."""
    res = run_bench(tmp_path, "--time-limit-s", "6", "--part", "solve", "--part", "paper-style", timeout=120)
    assert res.returncode == 0, res.stderr[-4000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    statuses = [r["status"] for r in result["rows"]]
    assert len(statuses) == 6 and "error" not in statuses
    assert statuses[-1] in ("skipped", "stopped") or result["header"]["elapsed_s"] <= 6 + 2, statuses
    for r in result["rows"]:
        assert r["status"] in ("ok", "skipped", "stopped")
        if r["status"] != "ok":
            assert r["reason"], r


def test_a_cpu_run_does_not_write_the_gpu_figures(tmp_path):
    results = ROOT / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.glob("gpu.*")}
    res = run_bench(results, "--time-limit-s", "0.01", timeout=120)
    assert res.returncode == 2 and "not a GPU figure" in res.stderr
    assert {p.name: p.stat().st_mtime_ns for p in results.glob("gpu.*")} == before


def test_cuda_without_a_gpu_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    res = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no CUDA device" in res.stderr
    assert not (tmp_path / "gpu.json").exists()
