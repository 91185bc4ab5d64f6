"""Router-level agreement metrics for reports: mean KL and top-k mismatch against a reference router."""

from __future__ import annotations

import torch

from harc_hpc.harc.inputs import TokenChunks, TokenInput
from harc_hpc.harc.operator import mean_kl


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
        ref = torch.zeros(xc.shape[0], w.shape[0], dtype=torch.bool, device=xc.device)
        got = torch.zeros_like(ref)
        ref.scatter_(1, torch.topk(xc @ wr, k, dim=1).indices, True)
        got.scatter_(1, torch.topk(xc @ wt, k, dim=1).indices, True)
        missed += int(xc.shape[0]) * k - int((ref & got).sum())
        n += xc.shape[0]
    return missed / (k * n) if n else 0.0
