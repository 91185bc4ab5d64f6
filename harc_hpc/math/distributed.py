"""Data-parallel solves: every token sum of the solver goes through a ``Reducer``.

Each process holds a shard of every task's tokens (contiguous rows; uneven or empty shards are
fine). The solver computes each token sum locally, un-normalised and in float64, hands it to
``Reducer.sum`` (torch.distributed.all_reduce, SUM) and only then divides by the *global* token
count. Everything after the reductions (CG vectors, scalars, preconditioners) is replicated and
identical on every rank, so every rank runs the same iterations and returns the same router.

``LOCAL`` (the default everywhere) is the identity: the single-process code path is unchanged.
The all-reduced result must be bitwise identical on all ranks (gloo and NCCL guarantee it) and the
ranks must run the same torch build with the same thread count, so that the replicated vector
arithmetic agrees and every rank takes the same branch of CG.
"""

from __future__ import annotations

from typing import Optional, Union

import torch


class Reducer:
    """The identity reducer: one process holds all tokens."""

    distributed = False
    rank = 0
    world_size = 1

    def __init__(self):
        self.calls = 0  # all-reduce calls made (distributed only)
        self.bytes = 0  # payload bytes all-reduced (distributed only)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over all ranks; may reduce ``t`` in place and return it."""
        return t

    def sum_float(self, v: float) -> float:
        return v

    def sum_int(self, n: int) -> int:
        return n

    def offset(self, n: int) -> int:
        """Number of rows held by lower ranks, given this rank holds ``n`` (an exclusive prefix sum)."""
        return 0

    def check_replicated(self, t: torch.Tensor, what: str = "tensor") -> None:
        """Raise on every rank unless ``t`` is bitwise the same on all ranks."""


LOCAL = Reducer()


class ProcessGroupReducer(Reducer):
    """torch.distributed.all_reduce (SUM) over ``group`` (None: the default group)."""

    distributed = True

    def __init__(self, group=None):
        super().__init__()
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # NCCL reduces CUDA tensors only: CPU-held counters travel through the current device
        backend = str(dist.get_backend(group)).lower()
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None

    def _all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        op = self._dist.ReduceOp.SUM if op is None else op
        self.calls += 1
        self.bytes += t.numel() * t.element_size()
        if self.device is not None and t.device != self.device:
            moved = t.to(self.device)
            self._dist.all_reduce(moved, op=op, group=self.group)
            return moved.to(t.device)
        t = t.contiguous()
        self._dist.all_reduce(t, op=op, group=self.group)
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t)

    def sum_float(self, v: float) -> float:
        return float(self._all_reduce(torch.tensor([v], dtype=torch.float64))[0])

    def sum_int(self, n: int) -> int:
        return int(self._all_reduce(torch.tensor([n], dtype=torch.int64))[0])

    def offset(self, n: int) -> int:
        counts = torch.zeros(self.world_size, dtype=torch.int64)
        counts[self.rank] = n
        counts = self._all_reduce(counts)
        return int(counts[: self.rank].sum())

    def check_replicated(self, t: torch.Tensor, what: str = "tensor") -> None:
        top = self._all_reduce(t.clone(), op=self._dist.ReduceOp.MAX)
        same = bool(torch.isclose(top, t, rtol=0.0, atol=0.0, equal_nan=True).all())
        if self.sum_int(0 if same else 1):
            raise RuntimeError(f"the {what} differs across ranks: the ranks must run the same torch "
                               "build and thread count, and the all-reduce must give every rank the same sum")


def as_reducer(process_group: Union[None, Reducer, object]) -> Reducer:
    """None -> LOCAL (single process); a Reducer -> itself; a ProcessGroup -> its reducer."""
    if process_group is None:
        return LOCAL
    if isinstance(process_group, Reducer):
        return process_group
    return ProcessGroupReducer(process_group)


def shard_rows(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of ``n`` that rank ``rank`` of ``world_size`` holds: contiguous, in rank
    order, sizes differing by at most one; ranks beyond ``n`` get an empty range."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def take_shard(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous shard of the rows of ``x`` (a view; possibly empty)."""
    start, stop = shard_rows(int(x.shape[0]), rank, world_size)
    return x[start:stop]


ProcessGroupLike = Optional[Union[Reducer, object]]
