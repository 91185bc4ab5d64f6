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

#: elements per pass of the chunked radix select (bounds its temporaries to a few tens of MB)
SELECT_CHUNK = 1 << 22


def _magnitude_keys(w: torch.Tensor) -> torch.Tensor:
    """|x| as int32 keys ordered like the values: the bit pattern of a non-negative float32."""
    return w.abs().to(torch.float32).view(torch.int32)


def kth_largest_key(w: torch.Tensor, k: int) -> tuple[int, int]:
    """The k-th largest |w| (as its float32 bit pattern) and how many elements lie strictly above it,
    by a two-pass radix select over chunks (high 16 bits, then low 16 bits within the chosen bucket).
    Exact, like kthvalue, without sorting or copying the tensor: the temporaries are one chunk."""
    flat = w.reshape(-1)
    n = flat.numel()

    def histogram(select_high: Optional[int]) -> torch.Tensor:
        hist = torch.zeros(1 << 16, dtype=torch.int64, device=flat.device)
        for lo in range(0, n, SELECT_CHUNK):
            keys = _magnitude_keys(flat[lo:lo + SELECT_CHUNK])
            if select_high is None:
                digits = keys >> 16
            else:
                digits = keys[(keys >> 16) == select_high] & 0xFFFF
            hist += torch.bincount(digits.long(), minlength=1 << 16)
        return hist

    def pick(hist: torch.Tensor, rank: int) -> tuple[int, int]:
        # the digit holding the rank-th largest element, and how many lie in higher digits
        above = torch.cumsum(hist.flip(0), 0)
        i = int(torch.searchsorted(above, torch.tensor(rank, device=above.device)))
        digit = (1 << 16) - 1 - i
        return digit, (int(above[i - 1]) if i > 0 else 0)

    high, above_high = pick(histogram(None), k)
    low, above_low = pick(histogram(high), k - above_high)
    return (high << 16) | low, above_high + above_low


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
    if ranking == "threshold":
        masked = delta.clone(memory_format=torch.contiguous_format)  # reshape(-1) is then a view
        _threshold_mask_(masked.reshape(-1), density)
    else:
        w = delta.abs().reshape(-1)
        if w.device.type == "cpu":
            w = w.float()
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


def _threshold_mask_(row: torch.Tensor, density: float) -> None:
    """magnitude_sparsify(row, density, ranking="threshold") in place, chunk by chunk."""
    if density >= 1:
        return
    n = row.numel()
    if density <= 0 or n == 0:
        row.zero_()
        return
    k = max(1, int(density * n))
    thr, strictly_above = kth_largest_key(row, k)
    missing = k - strictly_above
    for lo in range(0, n, SELECT_CHUNK):
        chunk = row[lo:lo + SELECT_CHUNK]
        keys = _magnitude_keys(chunk)
        keep = keys > thr
        if missing > 0:
            tied = (keys == thr).nonzero().squeeze(1)[:missing]
            keep[tied] = True
            missing -= int(tied.numel())
        chunk.mul_(keep.to(row.dtype))  # x * 0, as the whole-tensor path does (keeps -0.0)


def _lean_magnitude_merge(base, sources, weights, densities, consensus, normalize, lam, consume):
    """The threshold-ranked magnitude merge of one big tensor with no temporary the size of the
    tensor beyond the (n, numel) task vectors: deltas are formed, sparsified and combined in
    chunks (every step is element-wise once the threshold is known), bit-identical to the
    whole-tensor path."""
    flat_base = base.reshape(-1)
    numel = flat_base.numel()
    deltas = base.new_empty((len(sources), numel))
    for i in range(len(sources)):
        x = sources[i].reshape(-1)
        if consume:
            sources[i] = None
        for lo in range(0, numel, SELECT_CHUNK):
            torch.sub(x[lo:lo + SELECT_CHUNK], flat_base[lo:lo + SELECT_CHUNK], out=deltas[i, lo:lo + SELECT_CHUNK])
        del x
        _threshold_mask_(deltas[i], densities[i])
    out = torch.empty_like(flat_base)
    for lo in range(0, numel, SELECT_CHUNK):
        out[lo:lo + SELECT_CHUNK] = combine(flat_base[lo:lo + SELECT_CHUNK], deltas[:, lo:lo + SELECT_CHUNK],
                                            weights, consensus=consensus, normalize=normalize, lam=lam)
    return out.reshape(base.shape)


def task_vector_merge(base: torch.Tensor, sources: Sequence[torch.Tensor], weights: Sequence[float],
                      *, densities: Optional[Sequence[float]] = None,
                      sparsify: Optional[Literal["magnitude", "random"]] = None,
                      rescale: Rescale = "none", consensus: bool = False, normalize: bool = False,
                      lam: float = 1.0, generators: Optional[Sequence[torch.Generator]] = None,
                      consume: bool = False, ranking: Ranking = "argsort") -> torch.Tensor:
    """``consume``: set each entry of ``sources`` to None once its delta is taken (the caller
    holds no other reference), so inputs do not outlive their use."""
    if (sparsify == "magnitude" and ranking == "threshold" and rescale == "none"
            and base.numel() > PARALLEL_RANK_MAX_NUMEL):
        return _lean_magnitude_merge(base, sources, weights, densities, consensus, normalize, lam, consume)
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
