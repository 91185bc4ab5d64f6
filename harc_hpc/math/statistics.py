"""Per-task sufficient statistics of the HARC system, independent of alpha (stored as HDF5 by
harc_hpc.io.statistics).

For task i: N_i, diag(Sigma_i) and Sigma_i w_i as (K, d) float64 matrices, E[H_i] (K, K) and
optionally E[x x^T] (d, d). Since Sigma_reg,i w_i = alpha * sigma_w + (1 - alpha) * sigma_diag * W_i,
the right-hand side and the Jacobi preconditioner for any alpha follow without another data pass.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from harc_hpc.math.distributed import as_reducer
from harc_hpc.math.inputs import DEFAULT_CHUNK_TOKENS, TokenChunks, TokenInput
from harc_hpc.math.metrics import gate_kl_sum, topk_common
from harc_hpc.math.operator import TaskCurvature, check_hessian, hessian_diagonal, hessian_times, log_probs



def router_digest(w: torch.Tensor) -> str:
    """Content digest of a router's values (float64), to catch statistics reused with another source."""
    data = w.detach().to(device="cpu", dtype=torch.float64).contiguous().numpy().tobytes()
    return hashlib.sha256(data + str(tuple(w.shape)).encode()).hexdigest()[:32]


@dataclass
class TaskStatistics:
    num_tokens: int
    hessian: str
    sigma_diag: torch.Tensor  # (K, d) float64, diag(Sigma_i)
    sigma_w: torch.Tensor  # (K, d) float64, Sigma_i w_i
    hessian_mean: torch.Tensor  # (K, K) float64, E[H_i]
    kl: float  # mean KL(r_i || r_merged) on these inputs
    topk_mismatch: Optional[float] = None
    top_k: Optional[int] = None
    input_gram: Optional[torch.Tensor] = None  # (d, d) float64, E[x x^T]
    source_digest: str = ""
    expert_tokens: Optional[torch.Tensor] = None  # (K,) int64: tokens whose source top-k picks each expert

    def unrouted_experts(self) -> list[int]:
        """Experts that the source router sends no token of this task to (their rows of the system
        are fixed by the regularisation alone)."""
        return [] if self.expert_tokens is None else [int(e) for e in (self.expert_tokens == 0).nonzero().flatten()]

    def is_finite(self) -> bool:
        tensors = [t for t in (self.sigma_diag, self.sigma_w, self.hessian_mean, self.input_gram) if t is not None]
        return all(bool(t.isfinite().all()) for t in tensors) and math.isfinite(self.kl)

    def rhs(self, source_router: torch.Tensor, alpha: float) -> torch.Tensor:
        w_i = source_router.to(device=self.sigma_w.device, dtype=torch.float64)
        return alpha * self.sigma_w + (1.0 - alpha) * self.sigma_diag * w_i

    def to(self, device) -> "TaskStatistics":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TaskStatistics(self.num_tokens, self.hessian, move(self.sigma_diag), move(self.sigma_w),
                              move(self.hessian_mean), self.kl, self.topk_mismatch, self.top_k,
                              move(self.input_gram), self.source_digest, self.expert_tokens)


Selector = Callable[[torch.Tensor], torch.Tensor]  # router logits (n, K) -> selected experts (n, K) bool


def statistics_from_curvature(curv: TaskCurvature, source_router: torch.Tensor, merged_router: torch.Tensor,
                              *, top_k: Optional[int] = None, input_gram: bool = False,
                              select: Optional[tuple[Selector, Selector]] = None) -> TaskStatistics:
    """All statistics of one task in one pass over its inputs (plus one for the Gram if asked).
    With a distributed ``curv.reducer`` the inputs are this rank's shard and the statistics are
    those of all ranks' tokens (the same on every rank). ``select`` (source's, merged's): the
    model's own expert-selection rule for the top-k diagnostics (grouped, biased selection of a
    DeepSeek-V3 router); default: the top-k logits."""
    k, d = source_router.shape
    dev = merged_router.device
    sigma_w = torch.zeros(k, d, dtype=torch.float64, device=dev)
    diag = torch.zeros(k, d, dtype=torch.float64, device=dev)
    # sums stay on the device until the pass ends (one host sync per pass, not per chunk)
    kl = 0.0
    missed = 0
    expert_tokens = torch.zeros(k, dtype=torch.int64, device=dev)
    ws = wm = None
    for x, p in curv.pairs():
        if ws is None:
            ws = source_router.to(dtype=x.dtype, device=x.device).T.contiguous()
            wm = merged_router.to(dtype=x.dtype, device=x.device).T.contiguous()
        zs = x @ ws
        sigma_w += (hessian_times(p, zs, curv.hessian).T @ x).to(torch.float64)
        diag += (hessian_diagonal(p, curv.hessian, x, k).T @ (x * x)).to(torch.float64)
        kl = kl + gate_kl_sum(x, ws, wm, curv.link)
        if top_k and select is not None:
            chosen = select[0](zs)
            missed = missed + (int(x.shape[0]) * top_k - (chosen & select[1](x @ wm)).sum())
            expert_tokens += chosen.sum(dim=0).to(device=dev, dtype=torch.int64)
        elif top_k:
            missed = missed + (int(x.shape[0]) * top_k - topk_common(zs, log_probs(x, wm), top_k))
            expert_tokens += torch.bincount(torch.topk(zs, top_k, dim=1).indices.flatten(), minlength=k).to(dev)
    kl, missed, expert_tokens = float(kl), int(missed), expert_tokens.cpu()
    red = curv.reducer
    if red.distributed:
        sigma_w, diag, kl = red.sum(sigma_w), red.sum(diag), red.sum_float(kl)
        if top_k:
            missed, expert_tokens = red.sum_int(missed), red.sum(expert_tokens)
    n = curv.num_tokens
    return TaskStatistics(
        num_tokens=n,
        hessian=curv.hessian,
        sigma_diag=diag / n,
        sigma_w=sigma_w / n,
        hessian_mean=curv.hessian_mean(),
        kl=kl / n,
        topk_mismatch=(missed / (top_k * n)) if top_k else None,
        top_k=top_k if top_k else None,
        input_gram=curv.input_gram() if input_gram else None,
        source_digest=router_digest(source_router),
        expert_tokens=expert_tokens if top_k else None,
    )


def compute_task_statistics(
    inputs_i: TokenInput,
    source_router: torch.Tensor,
    merged_router: torch.Tensor,
    hessian: str = "full",
    top_k: Optional[int] = None,
    *,
    input_gram: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    process_group=None,
    link: str = "softmax",
    select: Optional[tuple[Selector, Selector]] = None,
    intercept: bool = False,
    device: Optional[torch.device] = None,
) -> TaskStatistics:
    """Statistics of one task: ``inputs_i`` (N, d) tensor or re-iterable of chunks, routers (K, d).
    ``process_group`` (a torch.distributed group or a Reducer): ``inputs_i`` is this rank's shard of
    the task's tokens and the result covers all ranks' tokens. ``device``: where the passes compute
    (each chunk is moved there as it is read; the statistics stay there); default: where the inputs are."""
    check_hessian(hessian)
    if source_router.shape != merged_router.shape:
        raise ValueError(f"source router {tuple(source_router.shape)} != merged {tuple(merged_router.shape)}")
    if device is not None:
        source_router, merged_router = source_router.to(device), merged_router.to(device)
    chunks = TokenChunks(inputs_i, dim=int(source_router.shape[1]), chunk_tokens=chunk_tokens, intercept=intercept,
                         device=device)
    curv = TaskCurvature(chunks, source_router, hessian, reducer=as_reducer(process_group), link=link)
    return statistics_from_curvature(curv, source_router, merged_router, top_k=top_k, input_gram=input_gram,
                                     select=select)
