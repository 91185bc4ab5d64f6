"""Router agreement metrics, the one implementation: KL between routing distributions and top-k
overlap of expert selections, per chunk of logits (``kl_sum``, ``topk_common``) and as means over a
task's inputs (``mean_kl``, ``router_kl``, ``topk_mismatch``). Statistics, solver and reports use these.

The per-chunk sums are 0-d tensors on the chunk's device (float64 for KL, int64 for counts): a pass
adds them up there and reads the total once, so a GPU pass over hundreds of chunks waits for the
host once, not once per chunk. Adding float64 0-d tensors rounds exactly as adding Python floats,
so the totals are the same bits as before.
"""

from __future__ import annotations

import torch

from harc_hpc.math.distributed import LOCAL, Reducer
from harc_hpc.math.inputs import TokenChunks, TokenInput
from harc_hpc.math.operator import log_probs


def kl_sum(log_p_ref: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """sum over rows of KL(p_ref || p), from row-wise log-probabilities (float64 advised); 0-d float64."""
    return (log_p_ref.exp() * (log_p_ref - log_p)).sum().to(torch.float64)


def bernoulli_kl_sum(z_ref: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """sum over rows and outputs of KL(Bernoulli(sigmoid(z_ref)) || Bernoulli(sigmoid(z))), from
    logits (float64 advised), with log-sigmoids so that saturated gates stay finite."""
    p = torch.sigmoid(z_ref)
    lp, lq = torch.nn.functional.logsigmoid(z_ref), torch.nn.functional.logsigmoid(z)
    lp1, lq1 = torch.nn.functional.logsigmoid(-z_ref), torch.nn.functional.logsigmoid(-z)
    return (p * (lp - lq) + (1 - p) * (lp1 - lq1)).sum().to(torch.float64)


def gate_kl_sum(x: torch.Tensor, w_ref_t: torch.Tensor, w_t: torch.Tensor, link: str = "softmax") -> torch.Tensor:
    """sum over the rows of ``x`` of the gate's KL(reference || other) for weights given transposed
    (d, K): categorical over experts for softmax, per-output Bernoulli summed over outputs for sigmoid."""
    if link == "sigmoid":
        return bernoulli_kl_sum((x @ w_ref_t).to(torch.float64), (x @ w_t).to(torch.float64))
    return kl_sum(log_probs(x, w_ref_t), log_probs(x, w_t))


def topk_common(scores_ref: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Number of (row, expert) selections the two top-k choices share, summed over rows; 0-d int64."""
    ref = torch.zeros(scores_ref.shape, dtype=torch.bool, device=scores_ref.device)
    got = torch.zeros_like(ref)
    ref.scatter_(1, torch.topk(scores_ref, k, dim=1).indices, True)
    got.scatter_(1, torch.topk(scores, k, dim=1).indices, True)
    return (ref & got).sum()


def mean_kl(chunks: TokenChunks, w_ref: torch.Tensor, w: torch.Tensor, reducer: Reducer = LOCAL,
            link: str = "softmax") -> float:
    """E_x KL(softmax(w_ref x) || softmax(w x)) over the chunks, float64 (over all ranks' shards
    with a distributed ``reducer``); for ``link="sigmoid"`` the per-output Bernoulli KL summed."""
    total = 0.0
    n = 0
    wr = wt = None
    for x in chunks:
        if wt is None:
            wr = w_ref.to(dtype=x.dtype, device=x.device).T.contiguous()
            wt = w.to(dtype=x.dtype, device=x.device).T.contiguous()
        total = total + gate_kl_sum(x, wr, wt, link)
        n += x.shape[0]
    total = float(total)
    if reducer.distributed:
        total, n = reducer.sum_float(total), reducer.sum_int(int(n))
    return total / max(n, 1)


def router_kl(x: TokenInput, w_ref: torch.Tensor, w: torch.Tensor) -> float:
    """Mean over tokens of KL(softmax(w_ref x) || softmax(w x)), accumulated in float64."""
    return mean_kl(TokenChunks(x, dim=int(w.shape[1])), w_ref, w)


def topk_mismatch(x: TokenInput, w_ref: torch.Tensor, w: torch.Tensor, k: int) -> float:
    """Mean over tokens of 1 - |topk(w_ref x) & topk(w x)| / k."""
    if not 1 <= k <= w.shape[0]:
        raise ValueError(f"k must be in [1, {w.shape[0]}], got {k}")
    missed = 0
    n = 0
    wr = wt = None
    for xc in TokenChunks(x, dim=int(w.shape[1])):
        if wt is None:
            wr = w_ref.to(dtype=xc.dtype, device=xc.device).T.contiguous()
            wt = w.to(dtype=xc.dtype, device=xc.device).T.contiguous()
        missed = missed + (int(xc.shape[0]) * k - topk_common(xc @ wr, xc @ wt, k))
        n += xc.shape[0]
    return int(missed) / (k * n) if n else 0.0
