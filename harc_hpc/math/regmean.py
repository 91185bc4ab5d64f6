"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", 2023) for
one linear layer: the weight that minimises sum_i ||X_i W^T - X_i W_i^T||^2 over every source's
inputs X_i, in closed form

    W^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T,   G_i = X_i^T X_i,   G~_i = a G_i + (1 - a) diag(G_i)

(``a``: the paper's regularisation, scaling the off-diagonal of each Gram; 0.9 in the HARC paper's
baselines). The Grams are token *sums*, not means, as in the paper: a source with more calibration
tokens weighs more. ``a = 0`` gives the per-input-channel weighted average (diagonal Grams); equal
Grams give the plain average.

Memory does not grow with the number of sources: ``GramSum`` keeps only sum_i G~_i (in x in) and
sum_i G~_i W_i^T (in x out), float64, and sources are added one at a time.

Directions that no source's inputs span (an expert never routed to, a dead channel) leave sum G~
singular. There the data say nothing, and the rule is stated, not silent: a ridge of
``ridge * mean(diag(sum G~))`` toward ``fallback`` (the data-free merge of the same weights, e.g.
their average), W^T = (S + r I)^-1 (B + r fallback^T). It is off (0) by default and turned on only
when the Cholesky factorisation of S fails, with the smallest ridge in 1e-10, 1e-8, ..., 1e-2 that
factorises; ``RegMeanSolution.method`` says which was used. Everything is float64 on the device of
the inputs; the tensors in and out are plain ``(out, in)`` weights (torch.nn.Linear's layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

RIDGES = (1e-10, 1e-8, 1e-6, 1e-4, 1e-2)


def gram(chunks: Iterable[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(X^T X as float64, number of rows) over (n, in) chunks of a linear layer's inputs."""
    acc: Optional[torch.Tensor] = None
    n = 0
    for x in chunks:
        x = x.to(torch.float64)
        g = x.T @ x
        acc = g if acc is None else acc.add_(g)
        n += int(x.shape[0])
    if acc is None:
        raise ValueError("no inputs: a Gram needs at least one chunk")
    return acc, n


def regularized(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """a G + (1 - a) diag(G): the off-diagonal scaled by ``alpha``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = g.to(torch.float64) * alpha
    out.diagonal().add_(g.diagonal().to(torch.float64) * (1.0 - alpha))
    return out


@dataclass
class RegMeanSolution:
    weight: torch.Tensor  # (out, in), float64
    method: str  # "cholesky", or "cholesky+ridge <r>" (see the module docstring)
    ridge: float  # the relative ridge used (0: none)
    uncovered_channels: int  # input channels no source's inputs reach (zero diagonal of sum G~)


class GramSum:
    """sum_i G~_i and sum_i G~_i W_i^T of one linear layer, one source at a time."""

    def __init__(self, alpha: float = 0.9):
        self.alpha = float(alpha)
        self.lhs: Optional[torch.Tensor] = None  # (in, in)
        self.rhs: Optional[torch.Tensor] = None  # (in, out)
        self.sources = 0

    def add(self, g: torch.Tensor, weight: torch.Tensor) -> None:
        """Add one source: its Gram (in, in) and its weight (out, in)."""
        if g.ndim != 2 or g.shape[0] != g.shape[1]:
            raise ValueError(f"a Gram must be square, got shape {tuple(g.shape)}")
        if weight.ndim != 2 or weight.shape[1] != g.shape[0]:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not take {g.shape[0]} inputs")
        gt = regularized(g, self.alpha)
        b = gt @ weight.to(device=gt.device, dtype=torch.float64).T
        if self.lhs is None:
            self.lhs, self.rhs = gt, b
        else:
            if self.lhs.shape != gt.shape or self.rhs.shape != b.shape:
                raise ValueError(f"source {self.sources}: shapes {tuple(gt.shape)}, {tuple(b.shape)} differ from "
                                 f"the first source's {tuple(self.lhs.shape)}, {tuple(self.rhs.shape)}")
            self.lhs.add_(gt)
            self.rhs.add_(b)
        self.sources += 1

    def solve(self, fallback: Optional[torch.Tensor] = None) -> RegMeanSolution:
        """The merged (out, in) weight. ``fallback`` (out, in): where the Grams leave directions
        undetermined, the ridge pulls toward it (default: zeros, i.e. the minimum-norm answer)."""
        if self.lhs is None:
            raise ValueError("no source added")
        s, b = self.lhs, self.rhs
        uncovered = int((s.diagonal() <= 0).sum())
        chol, info = torch.linalg.cholesky_ex(s)
        if int(info) == 0 and uncovered == 0 and not _numerically_singular(chol, s):
            return RegMeanSolution(torch.cholesky_solve(b, chol).T.contiguous(), "cholesky", 0.0, 0)
        scale = float(s.diagonal().clamp(min=0).mean())
        if scale <= 0:
            raise ValueError("every Gram is zero: no source has inputs for this layer")
        fb = (torch.zeros_like(b) if fallback is None
              else fallback.to(device=b.device, dtype=torch.float64).T)
        for r in RIDGES:
            shifted = s.clone()
            shifted.diagonal().add_(r * scale)
            chol, info = torch.linalg.cholesky_ex(shifted)
            if int(info) == 0:
                w = torch.cholesky_solve(b + (r * scale) * fb, chol).T.contiguous()
                return RegMeanSolution(w, f"cholesky+ridge {r:g}", r, uncovered)
        raise ValueError(f"the summed Gram is not positive definite even with a ridge of {RIDGES[-1]:g} x its "
                         f"mean diagonal (non-finite inputs?)")


def _numerically_singular(chol: torch.Tensor, s: torch.Tensor) -> bool:
    """Whether a factorisation that succeeded did so only by rounding: a pivot at the size of the
    matrix's rounding error (n eps max diag). A rank-deficient sum then factorises or not depending on
    the BLAS kernel's order of operations; this makes the answer the same on every CPU."""
    pivots = chol.diagonal().square()
    return bool(pivots.numel()) and float(pivots.min()) <= s.shape[0] * torch.finfo(s.dtype).eps * float(s.diagonal().max())


def regmean_merge(grams: list[torch.Tensor], weights: list[torch.Tensor], alpha: float = 0.9,
                  fallback: Optional[torch.Tensor] = None) -> RegMeanSolution:
    """RegMean of one linear layer from every source's Gram (in, in) and weight (out, in)."""
    if len(grams) != len(weights) or not grams:
        raise ValueError(f"need one Gram per weight, got {len(grams)} Grams and {len(weights)} weights")
    acc = GramSum(alpha)
    for g, w in zip(grams, weights):
        acc.add(g, w)
    return acc.solve(fallback)
