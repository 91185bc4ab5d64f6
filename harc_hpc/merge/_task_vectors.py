"""Task-vector operations shared by task_arithmetic, ties, dare_linear and dare_ties.

The arithmetic follows mergekit 0.1.5's generalized task arithmetic step by step and in the same
dtype (the unit's compute dtype), so that the same parameters give the same tensors:

1. delta_i = x_i - base, optionally sparsified (top-|delta| magnitude or random drop),
2. weighted: delta_i * w_i, with w_i cast to the compute dtype,
3. with sign election: the sign of the sum of the weighted deltas; model i counts where its sign
   agrees (a zero never agrees); mixed = sum of agreeing weighted deltas, divisor = sum of agreeing
   weights (0 -> 1); without: mixed = sum, divisor = sum of weights (|.| < 1e-8 -> 1),
4. mixed /= divisor if normalise; mixed *= lambda if lambda != 1; result = base + mixed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Optional, Sequence

import torch

#: tensors up to this many elements have their task vectors ranked in parallel threads
PARALLEL_RANK_MAX_NUMEL = 1 << 24

Rescale = Literal["l1", "inverse_density", "none"]


def _l1_rescaled(tensor: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    before = tensor.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


Ranking = Literal["argsort", "threshold"]


def magnitude_sparsify(delta: torch.Tensor, density: float, rescale: Rescale = "none",
                       ranking: Ranking = "argsort") -> torch.Tensor:
    """Keep the ``k = max(1, int(density * numel))`` largest |delta|, zero the rest.

    ``argsort``: elements tied at the threshold are chosen by a descending argsort over the
    flattened tensor, exactly as mergekit does. ``threshold``: the k-th largest value is found by
    selection and ties at it are kept in index order; same k, ~5x faster, used where no mergekit
    result exists to match (per-expert ranking of expert matrices)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    n = delta.numel()
    k = max(1, int(density * n))
    w = delta.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    if ranking == "threshold":
        thr = torch.kthvalue(w, n - k + 1).values
        keep = w > thr
        ties = (w == thr).nonzero().squeeze(1)[:k - int(keep.sum())]
        keep[ties] = True
        del w, ties
        mask = keep.to(delta.dtype)
    else:
        top = torch.argsort(w, descending=True)[:k]
        del w  # the sort's workspace is the peak: allocate the mask only after it
        mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
        mask[top] = 1
        del top
    masked = delta * mask.reshape_as(delta)
    if rescale == "l1":
        return _l1_rescaled(delta, masked)
    if rescale == "inverse_density":
        return masked / density
    return masked


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator,
                rescale: Rescale = "l1") -> torch.Tensor:
    """DARE: keep each element with probability ``density`` and rescale the survivors, either so
    the L1 norm matches the original (mergekit's convention) or by 1/density (the paper's)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    work = delta.float()
    masked = work * keep.to(device=delta.device)
    del keep
    if rescale == "l1":
        masked = _l1_rescaled(work, masked)
    elif rescale == "inverse_density":
        masked = masked / density
    return masked.to(delta.dtype)


def sign_agreement(weighted: torch.Tensor) -> torch.Tensor:
    """Mask (n, ...) of the models whose sign agrees with the sign of the summed weighted deltas
    (ties at zero elect +)."""
    sign = weighted.sign()
    majority = (weighted.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
    return sign == majority


def combine(base: torch.Tensor, deltas: torch.Tensor, weights: Sequence[float], *, consensus: bool,
            normalize: bool, lam: float) -> torch.Tensor:
    """Steps 2-4 above; ``deltas`` is (n, *base.shape) in the compute dtype and is modified."""
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > w.dim():
        w.unsqueeze_(-1)
    deltas.mul_(w)
    if consensus:
        mask = sign_agreement(deltas)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)


def task_vector_merge(base: torch.Tensor, sources: Sequence[torch.Tensor], weights: Sequence[float],
                      *, densities: Optional[Sequence[float]] = None,
                      sparsify: Optional[Literal["magnitude", "random"]] = None,
                      rescale: Rescale = "none", consensus: bool = False, normalize: bool = False,
                      lam: float = 1.0, generators: Optional[Sequence[torch.Generator]] = None,
                      consume: bool = False, ranking: Ranking = "argsort") -> torch.Tensor:
    """``consume``: set each entry of ``sources`` to None once its delta is taken (the caller
    holds no other reference), so inputs do not outlive their use."""
    deltas = base.new_empty((len(sources), *base.shape))

    def one(i: int) -> None:
        x = sources[i]
        if consume:
            sources[i] = None
        delta = x - base
        del x
        if sparsify == "magnitude":
            delta = magnitude_sparsify(delta, densities[i], rescale, ranking)
        elif sparsify == "random":
            delta = random_drop(delta, densities[i], generators[i], rescale)
        deltas[i] = delta

    # The magnitude ranking (a single-threaded sort) dominates the time: rank the models' task
    # vectors side by side on small tensors; big ones one after another, to bound the memory.
    workers = min(len(sources), torch.get_num_threads())
    if sparsify == "magnitude" and workers > 1 and base.numel() <= PARALLEL_RANK_MAX_NUMEL:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, range(len(sources))))
    else:
        for i in range(len(sources)):
            one(i)
    return combine(base, deltas, weights, consensus=consensus, normalize=normalize, lam=lam)
