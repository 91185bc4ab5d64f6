"""Which device a process computes on, and how the ranks of a distributed task find their GPU.

Two rules make a first GPU run boring:

* **A named device must exist.** ``resolve_device("cuda:3")`` on a node with two GPUs is an error that
  names the config key, not a CUDA assert deep inside a stage. ``auto`` is the process's current CUDA
  device (``cuda:<index>``, never the bare ``cuda``), else the CPU.
* **One GPU per rank, chosen before CUDA is used.** A rank of a distributed task takes GPU
  ``LOCAL_RANK`` of the GPUs its job step shows it, calls ``torch.cuda.set_device`` and only then
  joins the process group (NCCL, ``device_id`` given so the communicator binds that GPU). Nothing
  rewrites ``CUDA_VISIBLE_DEVICES``: once CUDA has been asked anything (``torch.cuda.is_available()``
  included) a later change of it is ignored, which is how every rank used to land on GPU 0. Where the
  step binds one GPU to each task (``--gpus-per-task=1``, ``--gpu-bind``) a rank sees a single GPU and
  takes it; ranks that would share a GPU are refused before NCCL sees them ("Duplicate GPU detected").

The selection is pure functions of the environment and the GPU count (``rank_device``,
``choose_backend``, ``worker_visible_devices``), tested on CPU; ``init_rank_process_group`` applies
them.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch

from harc_hpc.errors import UsageError

BACKENDS = ("auto", "nccl", "gloo")


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(name: str = "auto", key: str = "device", cuda_count: Optional[int] = None) -> torch.device:
    """The device ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) stands for in this process, with
    an explicit index for CUDA. ``key`` names the config entry in the error when it does not exist."""
    count = cuda_device_count() if cuda_count is None else cuda_count
    name = str(name).strip()
    if name == "auto":
        return torch.device("cuda", _current_index(count)) if count else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"{key}: {name!r} is not a device (auto, cpu, cuda or cuda:N)") from e
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise UsageError(f"{key}: {name!r}: harc-hpc runs on cpu or cuda devices")
    if not count:
        raise UsageError(f"{key}: {name!r} was asked for, but this process sees no CUDA device "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!s}); "
                         "use 'auto' to fall back to the CPU")
    index = _current_index(count) if device.index is None else device.index
    if not 0 <= index < count:
        raise UsageError(f"{key}: {name!r} does not exist: this process sees {count} CUDA device(s) "
                         f"(cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", index)


def _current_index(count: int) -> int:
    # The current device is 0 unless set_device chose another (a distributed rank): never initialise
    # CUDA just to ask when only one GPU is visible.
    return torch.cuda.current_device() if count > 1 and torch.cuda.is_initialized() else 0


@dataclass(frozen=True)
class RankEnvironment:
    """Where a rank sits in its job: from torchrun's or submitit's variables, else SLURM's."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    host: str

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "RankEnvironment":
        env = os.environ if env is None else env

        def first(*names: str, default: Optional[int] = None) -> int:
            for n in names:
                if env.get(n, "").strip():
                    return int(env[n].split("(")[0])  # SLURM_TASKS_PER_NODE may read "4(x2)"
            if default is None:
                raise UsageError(f"a distributed task needs {' or '.join(names)} in its environment "
                                 "(it is started by srun or torchrun)")
            return default

        world = first("WORLD_SIZE", "SLURM_NTASKS", default=1)
        nodes = first("SLURM_JOB_NUM_NODES", "SLURM_NNODES", default=1)
        return cls(rank=first("RANK", "SLURM_PROCID", default=0), world_size=world,
                   local_rank=first("LOCAL_RANK", "SLURM_LOCALID", default=0),
                   local_world_size=first("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
                                          default=max(1, world // max(1, nodes))),
                   host=env.get("SLURMD_NODENAME") or socket.gethostname())


def rank_device(env: RankEnvironment, cuda_count: int, requested: str = "auto",
                key: str = "harc.device") -> torch.device:
    """The device rank ``env`` computes on, given the ``cuda_count`` GPUs it sees and the config's
    device (``auto``, ``cpu``, ``cuda``; a fixed ``cuda:N`` is one GPU for every rank and is refused
    when several ranks share a node)."""
    requested = str(requested).strip()
    if requested == "cpu" or (requested == "auto" and cuda_count == 0):
        return torch.device("cpu")
    if cuda_count == 0:
        raise UsageError(f"{key}: {requested!r} was asked for, but rank {env.rank} on {env.host} sees no CUDA "
                         "device; submit the stage with executor.stages.<stage>.gpus, or set it to 'auto' or 'cpu'")
    if requested not in ("auto", "cuda"):
        if env.local_world_size > 1:
            raise UsageError(f"{key}: {requested!r} would put all {env.local_world_size} ranks of {env.host} on one "
                             "GPU; use 'auto' (each rank takes GPU LOCAL_RANK)")
        return resolve_device(requested, key, cuda_count)
    if cuda_count >= env.local_world_size:
        return torch.device("cuda", env.local_rank)
    if cuda_count == 1:
        # The step bound one GPU to each task (or every rank sees the same one: told apart by the
        # GPU's UUID once the ranks can talk, check_distinct_gpus).
        return torch.device("cuda", 0)
    raise UsageError(f"more ranks than GPUs on {env.host}: {env.local_world_size} ranks per node, {cuda_count} GPUs "
                     "visible to each; set executor.stages.<stage>.tasks_per_node to at most its gpus")


def choose_backend(device: torch.device, requested: str = "auto", nccl_available: Optional[bool] = None,
                   key: str = "executor.distributed_backend") -> tuple[str, Optional[str]]:
    """(backend, a note to log or None): NCCL for GPU ranks, gloo for CPU ranks. gloo on GPU ranks
    only when asked for (``requested='gloo'``): it reduces through host copies, several times slower."""
    if requested not in BACKENDS:
        raise UsageError(f"{key}: {requested!r} is not one of {', '.join(BACKENDS)}")
    if device.type == "cpu":
        if requested == "nccl":
            raise UsageError(f"{key}: nccl reduces CUDA tensors only, and this rank computes on the CPU")
        return "gloo", None
    if nccl_available is None:
        import torch.distributed as dist

        nccl_available = dist.is_nccl_available()
    if requested == "gloo":
        return "gloo", f"{key}: gloo on GPU ranks, as asked: every all-reduce goes through host memory"
    if not nccl_available:
        raise UsageError(f"NCCL is not available in this torch build ({torch.__version__}) for the GPU ranks; "
                         f"install a CUDA build with NCCL, or set {key}: gloo to reduce through host memory")
    return "nccl", None


@dataclass(frozen=True)
class RankPlacement:
    env: RankEnvironment
    device: torch.device
    backend: str
    note: Optional[str] = None

    def describe(self) -> str:
        return (f"rank {self.env.rank} of {self.env.world_size} (local {self.env.local_rank} of "
                f"{self.env.local_world_size} on {self.env.host}): {self.device}, {self.backend}")


def init_rank_process_group(requested_device: str = "auto", requested_backend: str = "auto",
                            timeout: timedelta = timedelta(minutes=30),
                            env: Optional[RankEnvironment] = None) -> RankPlacement:
    """Pick this rank's device, make it current, join the default process group (env:// rendezvous:
    MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE are set) and check that no two ranks share a GPU."""
    import torch.distributed as dist

    env = env or RankEnvironment.from_env()
    device = rank_device(env, cuda_device_count(), requested_device)
    backend, note = choose_backend(device, requested_backend)
    kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if backend == "nccl" and cuda_device_count() >= env.local_world_size:
            kwargs["device_id"] = device  # distinct by construction: bind the communicator now
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    placement = RankPlacement(env, device, backend, note)
    if device.type == "cuda" and env.world_size > 1:
        check_distinct_gpus(placement)
    return placement


def gpu_identity(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def duplicate_gpus(identities: list[tuple[str, str]]) -> list[list[int]]:
    """Groups of ranks (indices into ``identities`` of (host, GPU id)) that share one GPU."""
    seen: dict[tuple[str, str], list[int]] = {}
    for rank, ident in enumerate(identities):
        seen.setdefault(tuple(ident), []).append(rank)
    return [ranks for ranks in seen.values() if len(ranks) > 1]


def check_distinct_gpus(placement: RankPlacement) -> None:
    """Raise on every rank when two ranks hold the same GPU (exchanged over a gloo group, so NCCL
    never sees the duplicate)."""
    import torch.distributed as dist

    group = dist.new_group(backend="gloo")
    try:
        mine = (placement.env.host, gpu_identity(placement.device))
        every: list = [None] * placement.env.world_size
        dist.all_gather_object(every, mine, group=group)
    finally:
        dist.destroy_process_group(group)
    shared = duplicate_gpus(every)
    if shared:
        where = "; ".join(f"ranks {', '.join(map(str, r))} on {every[r[0]][0]}" for r in shared)
        raise UsageError(f"more ranks than GPUs: {where} share one GPU; give each task its own "
                         "(--gpus-per-node >= --ntasks-per-node, or --gpus-per-task=1)")


def worker_visible_devices(parent_visible: Optional[str], cuda_count: int) -> list[str]:
    """The GPUs a local executor may hand out, one per worker, as ``CUDA_VISIBLE_DEVICES`` values
    in the parent's numbering (its own ``CUDA_VISIBLE_DEVICES`` list, or 0..count-1)."""
    if parent_visible is not None and parent_visible.strip() != "":
        ids = [p.strip() for p in parent_visible.split(",") if p.strip()]
        return ids[:cuda_count] if cuda_count else []
    return [str(i) for i in range(cuda_count)]
