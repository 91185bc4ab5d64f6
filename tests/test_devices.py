"""Which device each process computes on (harc_hpc.devices): the selection logic from the environment
and the GPU count, tested without a GPU; the process-group join with gloo; the local executor's one
GPU per task."""

from __future__ import annotations

import datetime
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from harc_hpc.devices import (
    RankEnvironment,
    choose_backend,
    duplicate_gpus,
    rank_device,
    resolve_device,
    worker_visible_devices,
)
from harc_hpc.errors import UsageError


def env_of(local_rank, local_world, rank=None, world=None, host="node1"):
    return RankEnvironment(rank=local_rank if rank is None else rank, world_size=world or local_world,
                           local_rank=local_rank, local_world_size=local_world, host=host)


# -- one device in one process --------------------------------------------------------------------

def test_resolve_device_names_the_key_when_the_device_does_not_exist():
    assert resolve_device("cpu", cuda_count=0) == torch.device("cpu")
    assert resolve_device("auto", cuda_count=0) == torch.device("cpu")
    assert resolve_device("auto", cuda_count=1) == torch.device("cuda", 0)  # an index, never bare "cuda"
    assert resolve_device("cuda", cuda_count=2) == torch.device("cuda", 0)
    assert resolve_device("cuda:1", cuda_count=2) == torch.device("cuda", 1)
    with pytest.raises(UsageError, match=r"harc\.device: 'cuda:3' does not exist: this process sees 2 CUDA"):
        resolve_device("cuda:3", "harc.device", cuda_count=2)
    with pytest.raises(UsageError, match=r"merge\.device: 'cuda' was asked for, but this process sees no CUDA"):
        resolve_device("cuda", "merge.device", cuda_count=0)
    with pytest.raises(UsageError, match=r"harc\.device: 'gpu0' is not a device"):
        resolve_device("gpu0", "harc.device", cuda_count=0)
    with pytest.raises(UsageError, match="cpu or cuda"):
        resolve_device("meta", cuda_count=0)


def test_pick_device_on_this_machine_and_a_missing_gpu_from_a_stage(tmp_path):
    from harc_hpc.models.modeling import pick_device

    # A test not marked gpu sees no GPU, on any machine (conftest): auto is the CPU, cuda an error.
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(UsageError, match=r"merge\.device: 'cuda:0' was asked for, but this process sees no CUDA"):
        pick_device("cuda:0", "merge.device")


# -- the ranks of a distributed task ---------------------------------------------------------------

def test_rank_environment_from_submitit_torchrun_and_bare_slurm():
    exported = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                "SLURMD_NODENAME": "gpu12", "SLURM_PROCID": "0"}  # torchrun / submitit's export wins
    assert RankEnvironment.from_env(exported) == RankEnvironment(5, 8, 1, 4, "gpu12")
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "2(x2)",
             "SLURMD_NODENAME": "gpu3"}
    assert RankEnvironment.from_env(slurm) == RankEnvironment(3, 4, 1, 2, "gpu3")
    nodes_only = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_JOB_NUM_NODES": "2"}
    assert RankEnvironment.from_env(nodes_only).local_world_size == 2
    single = RankEnvironment.from_env({})
    assert (single.rank, single.world_size, single.local_rank) == (0, 1, 0)


def test_every_rank_of_a_node_gets_its_own_gpu():
    # --gpus-per-node=4 --ntasks-per-node=4: all four GPUs visible to each rank; rank i takes GPU i.
    devices = [rank_device(env_of(i, 4), cuda_count=4) for i in range(4)]
    assert devices == [torch.device("cuda", i) for i in range(4)]
    assert len(set(devices)) == 4
    # two nodes: the local rank decides, not the global one
    assert rank_device(env_of(1, 4, rank=5, world=8), cuda_count=4) == torch.device("cuda", 1)
    # --gpus-per-task=1: each rank sees only its own GPU, as index 0
    assert [rank_device(env_of(i, 2), cuda_count=1) for i in range(2)] == [torch.device("cuda", 0)] * 2
    # more GPUs than ranks: the first ones
    assert rank_device(env_of(1, 2), cuda_count=8) == torch.device("cuda", 1)


def test_rank_device_refuses_what_would_put_two_ranks_on_one_gpu():
    with pytest.raises(UsageError, match="more ranks than GPUs on node1: 4 ranks per node, 2 GPUs"):
        rank_device(env_of(3, 4), cuda_count=2)
    with pytest.raises(UsageError, match=r"harc\.device: 'cuda:1' would put all 2 ranks of node1 on one GPU"):
        rank_device(env_of(0, 2), cuda_count=2, requested="cuda:1")
    with pytest.raises(UsageError, match="sees no CUDA device"):
        rank_device(env_of(0, 2), cuda_count=0, requested="cuda")


def test_cpu_ranks_stay_on_the_cpu():
    assert rank_device(env_of(1, 2), cuda_count=0) == torch.device("cpu")
    assert rank_device(env_of(1, 2), cuda_count=2, requested="cpu") == torch.device("cpu")
    assert rank_device(env_of(0, 1), cuda_count=2, requested="cuda:1") == torch.device("cuda", 1)


def test_backend_nccl_on_gpus_gloo_on_cpus_and_gloo_on_gpus_only_when_asked():
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert choose_backend(cpu) == ("gloo", None)
    assert choose_backend(gpu, nccl_available=True) == ("nccl", None)
    with pytest.raises(UsageError, match=r"NCCL is not available .* executor\.distributed_backend: gloo"):
        choose_backend(gpu, nccl_available=False)
    backend, note = choose_backend(gpu, "gloo", nccl_available=False)
    assert backend == "gloo" and "as asked" in note  # said in the task's log
    with pytest.raises(UsageError, match="nccl reduces CUDA tensors only"):
        choose_backend(cpu, "nccl")
    with pytest.raises(UsageError, match="is not one of"):
        choose_backend(cpu, "mpi")


def test_duplicate_gpus_are_found_per_host():
    ids = [("n1", "GPU-a"), ("n1", "GPU-b"), ("n2", "GPU-a"), ("n1", "GPU-a")]
    assert duplicate_gpus(ids) == [[0, 3]]  # the same UUID on another host is another GPU
    assert duplicate_gpus([("n1", "GPU-a"), ("n1", "GPU-b")]) == []


def test_plan_refuses_more_ranks_than_gpus_per_node(tmp_path):
    from conftest import write_toy_config

    from harc_hpc.config import load_config
    from harc_hpc.pipeline.executors.base import resolve_resources
    from harc_hpc.pipeline.planner import load_specs

    specs = load_specs()
    cfg = load_config(write_toy_config(tmp_path), overrides={
        "executor.stages": {"solve-router": {"gpus": 2, "tasks_per_node": 4}}})
    with pytest.raises(UsageError, match="more ranks than GPUs on a node: tasks_per_node 4 with gpus 2"):
        resolve_resources(cfg, specs["solve-router"])
    ok = load_config(write_toy_config(tmp_path), overrides={"executor.stages": {"solve-router": {"gpus": 4}}})
    assert resolve_resources(ok, specs["solve-router"])["tasks_per_node"] == 4  # one rank per GPU


def _join_worker(local_rank, world, port, out_dir):
    import os

    import torch.distributed as dist

    from harc_hpc.devices import init_rank_process_group
    from harc_hpc.math.distributed import ProcessGroupReducer

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(local_rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    placement = init_rank_process_group("cpu", "auto", timeout=datetime.timedelta(seconds=60))
    try:
        total = ProcessGroupReducer().sum(torch.tensor([float(local_rank + 1)], dtype=torch.float64))
        Path(out_dir, f"rank{local_rank}.json").write_text(json.dumps({
            "device": str(placement.device), "backend": placement.backend, "sum": float(total[0]),
            "env": [placement.env.rank, placement.env.local_rank, placement.env.world_size],
            "describe": placement.describe()}))
    finally:
        dist.destroy_process_group()


def test_ranks_join_with_gloo_on_cpu_from_the_environment(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_join_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [g["device"] for g in got] == ["cpu", "cpu"] and {g["backend"] for g in got} == {"gloo"}
    assert [g["sum"] for g in got] == [3.0, 3.0]
    assert [g["env"] for g in got] == [[0, 0, 2], [1, 1, 2]]
    assert "rank 1 of 2 (local 1 of 2" in got[1]["describe"]


# -- the local executor: one GPU per task ----------------------------------------------------------

def test_worker_visible_devices_keep_the_parents_numbering():
    assert worker_visible_devices(None, 2) == ["0", "1"]
    assert worker_visible_devices("4,6", 2) == ["4", "6"]
    assert worker_visible_devices("", 0) == []
    assert worker_visible_devices(None, 0) == []


def test_local_executor_gives_each_running_task_its_own_gpu(tmp_path, monkeypatch):
    from conftest import TOY_STAGES_DIR, write_toy_config

    from harc_hpc.config import load_config
    from harc_hpc.pipeline import records
    from harc_hpc.pipeline.api import submit_run

    monkeypatch.setenv("HARC_LOCAL_GPUS", "2")  # this machine has none: two GPU ids to hand out
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = load_config(write_toy_config(tmp_path), overrides={"executor.local_workers": 3})
    out: list[str] = []
    plan, outcome = submit_run(cfg, executor="local", specs_dir=TOY_STAGES_DIR, layers=[0, 1], echo=out.append)
    assert outcome.ok, out
    assert any("one GPU per task, 2 at a time" in line for line in out)
    spans = []
    for t in plan.tasks.values():
        rec = records.read_completion(plan.run_dir, t.stage, t.key)
        gpu = rec["job"].get("cuda_visible_devices")
        assert gpu in ("0", "1"), (t.id, rec["job"])
        spans.append((datetime.datetime.fromisoformat(rec["started"]),
                      datetime.datetime.fromisoformat(rec["finished"]), gpu, t.id))
    assert {s[2] for s in spans} == {"0", "1"}  # both were used
    for i, a in enumerate(spans):
        for b in spans[i + 1:]:
            if a[0] < b[1] and b[0] < a[1]:  # ran at the same time
                assert a[2] != b[2], f"{a[3]} and {b[3]} shared GPU {a[2]}"


# -- the resident device solve: one tensor per task, large blocks ---------------------------------

class _StoredChunks:
    """Stands in for a task's activation store: a length and re-iterable (n, d) numpy chunks."""

    def __init__(self, x: torch.Tensor, chunk: int):
        self.x, self.chunk = x, chunk

    def __len__(self):
        return int(self.x.shape[0])

    def __iter__(self):
        for s in range(0, len(self), self.chunk):
            yield self.x[s: s + self.chunk].numpy()


def test_join_on_device_and_block_size():
    from harc_hpc.stages.solve_router import join_on_device, solve_block_tokens

    x = torch.randn(1000, 16).to(torch.bfloat16)
    joined = join_on_device(_StoredChunks(x.float(), 96), torch.device("cpu"), torch.bfloat16)
    assert joined.dtype == torch.bfloat16 and torch.equal(joined, x)
    # d 2048, K 64, float64, 2 GiB headroom: 2^31 // (2048*8 + 6*64*8) = 110376 -> a multiple of 8192
    assert solve_block_tokens(10**7, 2048, 64, 8, 2 << 30, 8192) == 106496
    assert solve_block_tokens(10**7, 2048, 64, 8, 0, 8192) == 8192  # no headroom: the store's chunk
    assert solve_block_tokens(5000, 2048, 64, 8, 2 << 30, 8192) == 5000  # never more than the layer


def test_a_solve_over_joined_blocks_equals_the_chunked_solve():
    from harc_hpc.math import solve_router
    from harc_hpc.stages.solve_router import join_on_device

    g = torch.Generator().manual_seed(0)
    k, d = 6, 12
    xs = [torch.randn(700, d, generator=g) * 0.7, torch.randn(500, d, generator=g) * 0.7 + 0.2]
    sources = [torch.randn(k, d, generator=g, dtype=torch.float64) for _ in xs]
    init = 0.5 * (sources[0] + sources[1])
    kw = dict(alpha=0.9, tol=1e-10, max_iter=500, preconditioner="expert-block", compute_dtype=torch.float64)
    chunked = solve_router([_StoredChunks(x, 64) for x in xs], sources, init, chunk_tokens=64, **kw)
    joined = [join_on_device(_StoredChunks(x, 64), torch.device("cpu"), torch.float64) for x in xs]
    blocks = solve_router(joined, sources, init, chunk_tokens=512, **kw)
    assert chunked.converged and blocks.converged
    rel = float(torch.linalg.norm(blocks.weight - chunked.weight) / torch.linalg.norm(chunked.weight))
    assert rel < 1e-8, rel
