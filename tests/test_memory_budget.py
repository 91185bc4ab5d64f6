"""Memory the scheduler will grant (issue 23, item 3): host budgets from the cgroup's limit and
SLURM's --mem as well as MemAvailable, GPU free memory counting torch's cache, a configured budget
over them refused with the key and both numbers (by the stage and by ``plan``), no pinned whole-batch
buffers, device-held capture states checkpointed through a bounded buffer, per-dtype throughput."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harc_hpc.config import ConfigError, load_config
from harc_hpc.models import modeling
from harc_hpc.models.modeling import (cgroup_free_bytes, check_memory_budget, gpu_free_bytes, host_free_bytes,
                                      host_memory_bounds, host_memory_limits, slurm_grant_bytes, tightest)

GiB = 2**30
V1_UNLIMITED = "9223372036854771712"


def _proc(root: Path, cgroup: str, available_kb: int | None = 16 * 2**20, rss_kb: int = 2**20) -> Path:
    """A fake /proc: meminfo, self/cgroup, self/status."""
    (root / "self").mkdir(parents=True, exist_ok=True)
    (root / "self" / "cgroup").write_text(cgroup)
    (root / "self" / "status").write_text(f"Name:\tpython\nVmHWM:\t{2 * rss_kb} kB\nVmRSS:\t{rss_kb} kB\n")
    lines = ["MemTotal:       65536000 kB", "MemFree:         1000 kB"]
    if available_kb is not None:
        lines.append(f"MemAvailable:   {available_kb} kB")
    (root / "meminfo").write_text("\n".join(lines) + "\n")
    return root


def _files(folder: Path, **values) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in values.items():
        (folder / name.replace("_", ".", 1)).write_text(f"{value}\n")


# -- GPU: the driver's free bytes plus torch's reserved-but-unallocated cache ----------------------

def test_gpu_free_counts_torchs_cache():
    assert gpu_free_bytes(10 * GiB, 30 * GiB, 18 * GiB) == 22 * GiB
    assert gpu_free_bytes(10 * GiB, 0, 0) == 10 * GiB
    assert gpu_free_bytes(10 * GiB, 5 * GiB, 5 * GiB) == 10 * GiB
    # allocated never exceeds reserved in torch; a torn read must not lower the figure
    assert gpu_free_bytes(10 * GiB, 5 * GiB, 6 * GiB) == 10 * GiB


# -- cgroups -----------------------------------------------------------------------------------------

def test_cgroup_v2_limit_of_the_job_binds_its_step_and_task(tmp_path):
    cg = tmp_path / "cg"
    _files(cg, cgroup_controllers="cpu memory")
    job = cg / "system.slice" / "slurmstepd.scope" / "job_42"
    _files(job, memory_max=8 * GiB, memory_current=3 * GiB, memory_stat=f"anon 1\ninactive_file {GiB}\nactive_file 5\n")
    _files(job / "step_0", memory_max="max", memory_current=2 * GiB)
    _files(job / "step_0" / "task_0", memory_max="max", memory_current=GiB)
    proc = _proc(tmp_path / "proc", "0::/system.slice/slurmstepd.scope/job_42/step_0/task_0\n")
    # the inactive page cache is reclaimable, so not counted as used: 8 - (3 - 1)
    assert cgroup_free_bytes(cg, proc) == 6 * GiB
    # a tighter limit lower down wins
    _files(job / "step_0", memory_max=4 * GiB, memory_current=2 * GiB)
    assert cgroup_free_bytes(cg, proc) == 2 * GiB


def test_cgroup_max_everywhere_is_unlimited(tmp_path):
    cg = tmp_path / "cg"
    _files(cg, cgroup_controllers="memory")
    _files(cg / "user.slice", memory_max="max", memory_current=GiB)
    proc = _proc(tmp_path / "proc", "0::/user.slice\n")
    assert cgroup_free_bytes(cg, proc) is None
    assert tightest(host_memory_limits({}, cg, proc)) == (16 * GiB, "MemAvailable")


def test_cgroup_v1_memory_controller(tmp_path):
    cg = tmp_path / "cg"
    _files(cg / "memory", memory_limit_in_bytes=V1_UNLIMITED, memory_usage_in_bytes=50 * GiB)
    _files(cg / "memory" / "slurm" / "uid_0" / "job_7", memory_limit_in_bytes=4 * GiB,
           memory_usage_in_bytes=GiB, memory_stat="cache 10\ntotal_inactive_file 0\n")
    proc = _proc(tmp_path / "proc", "12:pids:/\n4:memory:/slurm/uid_0/job_7\n1:name=systemd:/\n0::/\n")
    assert cgroup_free_bytes(cg, proc) == 3 * GiB
    # an unlimited v1 cgroup (this machine's kind): no bound
    _files(cg / "memory" / "slurm" / "uid_0" / "job_7", memory_limit_in_bytes=V1_UNLIMITED)
    assert cgroup_free_bytes(cg, proc) is None


def test_cgroup_namespace_reads_the_mounted_root(tmp_path):
    # inside a cgroup namespace the path in /proc/self/cgroup is not under the mount: the mount
    # root is the process's own cgroup
    cg = tmp_path / "cg"
    _files(cg, cgroup_controllers="memory", memory_max=2 * GiB, memory_current=GiB // 2)
    proc = _proc(tmp_path / "proc", "0::/kubepods/pod1/abc\n")
    assert cgroup_free_bytes(cg, proc) == GiB + GiB // 2


def test_no_cgroup_files_no_bound(tmp_path):
    proc = _proc(tmp_path / "proc", "0::/\n")
    assert cgroup_free_bytes(tmp_path / "nothing", proc) is None
    assert cgroup_free_bytes(tmp_path / "nothing", tmp_path / "noproc") is None


# -- SLURM ---------------------------------------------------------------------------------------------

def test_slurm_grant_from_mem_per_node_cpu_or_gpu():
    assert slurm_grant_bytes({"SLURM_MEM_PER_NODE": "4096"}) == 4 * GiB
    assert slurm_grant_bytes({"SLURM_MEM_PER_CPU": "1000", "SLURM_CPUS_ON_NODE": "4"}) == 4000 * 2**20
    assert slurm_grant_bytes({"SLURM_MEM_PER_GPU": "2048", "SLURM_GPUS_ON_NODE": "2"}) == 4 * GiB
    assert slurm_grant_bytes({"SLURM_MEM_PER_CPU": "1000"}) is None  # no CPU count: unknown
    assert slurm_grant_bytes({"SLURM_MEM_PER_NODE": "lots"}) is None
    assert slurm_grant_bytes({}) is None
    assert slurm_grant_bytes({"SLURM_JOB_ID": "3"}) is None


def test_host_budget_is_the_least_of_memavailable_cgroup_and_slurm_less_rss(tmp_path):
    cg = tmp_path / "cg"
    _files(cg, cgroup_controllers="memory")
    _files(cg / "job", memory_max=10 * GiB, memory_current=4 * GiB)
    proc = _proc(tmp_path / "proc", "0::/job\n", available_kb=16 * 2**20, rss_kb=2**20)  # 16 GiB, RSS 1 GiB
    env = {"SLURM_MEM_PER_NODE": str(8 * 1024)}  # 8 GiB, less the 1 GiB resident
    bounds = host_memory_limits(env, cg, proc)
    assert bounds == {"MemAvailable": 16 * GiB, "cgroup memory limit": 6 * GiB, "SLURM memory grant": 7 * GiB}
    assert host_free_bytes(env, cg, proc) == 6 * GiB
    assert tightest(host_memory_limits({"SLURM_MEM_PER_NODE": "4096"}, cg, proc)) == (3 * GiB, "SLURM memory grant")
    # none of them but MemAvailable: MemAvailable, as before
    assert host_free_bytes({}, tmp_path / "nothing", proc) == 16 * GiB
    # the stage's figure is what the plan computes from the same numbers
    assert host_memory_bounds(16 * GiB, 6 * GiB, 8 * GiB, GiB) == bounds


def test_free_memory_of_the_host_uses_the_host_budget(monkeypatch):
    monkeypatch.setattr(modeling, "host_memory_limits", lambda *a, **k: {"MemAvailable": 9 * GiB,
                                                                          "SLURM memory grant": 2 * GiB})
    assert modeling.free_memory_bytes(torch.device("cpu")) == 2 * GiB


# -- a configured budget over the grant --------------------------------------------------------------

def test_a_budget_over_the_grant_names_the_key_and_both_numbers():
    bounds = {"MemAvailable": 100 * GiB, "cgroup memory limit": 12 * GiB}
    check_memory_budget("harc.memory_budget_gb", 12 * GiB, bounds, "solve-router layer 0")  # fits: nothing
    check_memory_budget("harc.memory_budget_gb", 12 * GiB, {}, "solve-router layer 0")  # nothing known
    with pytest.raises(ConfigError) as err:
        check_memory_budget("harc.memory_budget_gb", 20 * GiB, bounds, "solve-router layer 0")
    msg = str(err.value)
    assert msg.startswith("solve-router layer 0: harc.memory_budget_gb is 20.0 GiB")
    assert "12.0 GiB" in msg and "cgroup memory limit" in msg and err.value.exit_code == 2


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """A tiny one-layer run up to the statistics of layer 0: what solve-router starts from."""
    from harc_hpc.stages import capture_activations, compute_statistics, merge_experts
    from pipeline_fixtures import build_tiny_sources, write_config

    root = tmp_path_factory.mktemp("budget")
    config = write_config(root, build_tiny_sources(root / "src", layers=1), executor="debug")
    cfg = load_config(config)
    run = root / "runs" / "run"
    merge_experts.run(cfg, run)
    capture_activations.run(cfg, run, block=0)
    for t in cfg.task_names:
        compute_statistics.run(cfg, run, layer=0, task=t)
    return config, run


def test_solve_refuses_a_budget_over_what_the_task_may_take(captured, monkeypatch):
    from harc_hpc.stages import solve_router

    config, run = captured
    monkeypatch.setattr(modeling, "device_memory_bounds",
                        lambda device: {"MemAvailable": 64 * GiB, "cgroup memory limit": GiB})
    with pytest.raises(ConfigError) as err:
        solve_router.run(load_config(config, {"harc.memory_budget_gb": 2}), run, layer=0)
    msg = str(err.value)
    assert msg.startswith("solve-router layer 0: harc.memory_budget_gb is 2.0 GiB") and "1.0 GiB" in msg
    assert "cgroup memory limit" in msg
    assert not (run / "routers" / "layer-000.safetensors").exists()
    # within it: the solve runs
    solve_router.run(load_config(config, {"harc.memory_budget_gb": 0.5}), run, layer=0)
    assert (run / "routers" / "layer-000.safetensors").exists()


def test_plan_refuses_a_budget_over_the_executors_memory(tmp_path):
    from harc_hpc.pipeline.api import plan_estimates

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "olmoe.yaml",
                      {"harc.memory_budget_gb": 200, "run.output_dir": str(tmp_path)})
    conf = _shape("olmoe-1b-7b")
    with pytest.raises(ConfigError) as err:
        plan_estimates(cfg, model_config=conf)
    msg = str(err.value)
    assert "harc.memory_budget_gb is 200.0 GiB" in msg and "executor.gpu_memory_gb" in msg
    assert "79.0 GiB" in msg  # 80 GB a GPU less the CUDA context
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "olmoe.yaml",
                      {"harc.memory_budget_gb": 60, "run.output_dir": str(tmp_path)})
    plan_estimates(cfg, model_config=conf)  # fits


def _shape(name: str) -> dict:
    import json

    return json.loads((Path(__file__).resolve().parents[1] / "configs" / "model-shapes" / f"{name}.json").read_text())


# -- capture: no pinned whole-batch buffer, bounded checkpoint copies --------------------------------

def _states(placement: str, device: str = "cpu"):
    from harc_hpc.stages.capture_activations import BatchStates

    st = BatchStates([(2, 5), (3, 7), (1, 1)], 6, torch.bfloat16, torch.device(device), placement)
    if st.flat.device.type == "cpu":
        st.flat.copy_(torch.randn(st.flat.numel(), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16))
    return st


def test_host_states_for_a_gpu_are_not_pinned():
    # pinning rounded the whole buffer up to a power of two; it is pageable now (and so can be
    # built on a machine without CUDA, where pin_memory would fail)
    st = _states("host", "cuda")
    assert st.flat.device.type == "cpu" and st.placement == "host"
    if torch.cuda.is_available():
        assert not st.flat.is_pinned()
    st.close()


def test_checkpoint_bytes_are_what_a_full_host_copy_writes(tmp_path):
    from harc_hpc.errors import CorruptArtifactError
    from harc_hpc.stages.capture_activations import _read_chunked, _write_chunked

    st = _states("device")
    reference = tmp_path / "reference.bin"
    st.flat.view(torch.uint8).cpu().numpy().tofile(str(reference))  # what save() wrote before
    st.save(tmp_path / "saved.bin")
    assert (tmp_path / "saved.bin").read_bytes() == reference.read_bytes()
    raw = st.flat.view(torch.uint8)
    for chunk in (1, 7, 64, raw.numel() - 1, raw.numel(), 10 * raw.numel()):  # through a bounded buffer
        _write_chunked(raw, tmp_path / f"chunked-{chunk}.bin", chunk)
        assert (tmp_path / f"chunked-{chunk}.bin").read_bytes() == reference.read_bytes()
        back = torch.zeros_like(raw)
        _read_chunked(back, tmp_path / f"chunked-{chunk}.bin", chunk)
        assert torch.equal(back, raw)
    other = _states("device")
    other.flat.zero_()
    other.load(reference)
    assert torch.equal(other.flat.view(torch.uint8), raw)
    (tmp_path / "short.bin").write_bytes(reference.read_bytes()[:-3])
    with pytest.raises(CorruptArtifactError, match="shorter than"):
        _read_chunked(torch.zeros_like(raw), tmp_path / "short.bin", 16)
    st.close()
    other.close()


def test_placement_uses_the_host_budget(monkeypatch):
    from harc_hpc.stages import capture_activations

    monkeypatch.setattr(capture_activations, "host_free_bytes", lambda: 10 * GiB)
    assert capture_activations.placement_for(8 * GiB, torch.device("cpu"), GiB) == "device"
    assert capture_activations.placement_for(9 * GiB, torch.device("cpu"), GiB) == "disk"


# -- plan: throughput by the dtype a stage computes in -----------------------------------------------

def test_plan_times_use_the_throughput_of_the_stages_dtype(tmp_path):
    from harc_hpc.pipeline.api import plan_estimates
    from harc_hpc.stages.estimate import CPU_TFLOPS, GPU_TFLOPS

    assert GPU_TFLOPS["float32"] == GPU_TFLOPS["float64"] == 50.0 and GPU_TFLOPS["bfloat16"] == 300.0
    assert CPU_TFLOPS == 0.1
    path = Path(__file__).resolve().parents[1] / "configs" / "olmoe.yaml"
    conf = _shape("olmoe-1b-7b")

    def seconds(overrides, tflops=None):
        cfg = load_config(path, {"run.output_dir": str(tmp_path), **overrides})
        _, _, est, _ = plan_estimates(cfg, model_config=conf, throughput_tflops=tflops)
        return {e["stage"]: e["seconds"] for e in est["stages"]}

    exact = {"harc.inner_dtype": None, "harc.dtype": "float32"}
    at_50, at_300 = seconds(exact), seconds(exact, tflops=300)
    # the float32 solve without mixed precision is compute-bound at 50 TFLOP/s: 6x the old figure's
    # compute time (it was memory-bound at 300)
    from harc_hpc.stages.estimate import SOLVE_ITERATIONS

    n, d, k, iters = 5_600_000, 2048, 64, SOLVE_ITERATIONS["expert-block"]
    assert at_50["solve-router"] == pytest.approx(iters * 4 * n * d * k / 50e12)
    assert at_300["solve-router"] < at_50["solve-router"]
    # the capture runs the bfloat16 checkpoint: 300 TFLOP/s, as --tflops 300
    assert at_50["capture-activations"] == pytest.approx(at_300["capture-activations"])
    # the statistics in harc.dtype
    assert at_50["compute-statistics"] == pytest.approx(6 * 2_800_000 * d * k / 50e12)


def test_a_cgroup_path_outside_the_mount_reads_the_mount_root(tmp_path):
    cg = tmp_path / "cg"
    _files(cg / "inner", cgroup_controllers="memory", memory_max=2 * GiB, memory_current=GiB)
    _files(cg, memory_max=GiB, memory_current=0)  # outside the mount: must not be read
    proc = _proc(tmp_path / "proc", "0::/../..\n")
    assert cgroup_free_bytes(cg / "inner", proc) == GiB
    assert slurm_grant_bytes({"SLURM_MEM_PER_NODE": "0"}) is None  # --mem=0: the whole node
