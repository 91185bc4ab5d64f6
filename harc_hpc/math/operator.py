"""Matrix-free products with Sigma_i = E_x[H(x) kron x x^T] and its reductions.

Conventions: a router is a (K, d) matrix W and w = vec(W^T) is W flattened row by row (expert-major),
so a (K, d) matrix *is* the vector; every operator here maps (K, d) -> (K, d). For a chunk X (n, d)
with logits Z = X W^T (n, K) and curvature probabilities P (n, K):

    Sigma W = (1/N) sum_chunks U^T X,   U = H(Z) row-wise (App. A.3, Eq. 12 for all tokens at once)

with H(z) = diag(p) z - p (p.z) ("full"), (p - p^2) * z ("diag") or z ("identity"). GEMMs run in the
chunk dtype (float32 for real activations); every sum across chunks is float64 in chunk order.
With a distributed ``reducer`` each process holds a shard of the tokens: every token sum is
all-reduced before it is divided by the global token count (harc_hpc.math.distributed).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from harc_hpc.math.distributed import LOCAL, Reducer
from harc_hpc.math.inputs import TokenChunks

HESSIANS = ("full", "diag", "identity")
# How a gate turns logits into routing weights: "softmax" over the experts (the MoE router), or an
# independent "sigmoid" per output (Qwen2-MoE's shared-expert gate, DeepSeek-V3-style routers). For a
# sigmoid gate the objective is the per-output Bernoulli KL, whose exact Hessian is diagonal across
# outputs, diag(s (1 - s)) kron x x^T: "full" and "diag" are then the same model (docs/solver.md).
LINKS = ("softmax", "sigmoid")


def check_hessian(hessian: str) -> str:
    if hessian not in HESSIANS:
        raise ValueError(f"hessian must be one of {HESSIANS}, got {hessian!r}")
    return hessian


def check_link(link: str) -> str:
    if link not in LINKS:
        raise ValueError(f"link must be one of {LINKS}, got {link!r}")
    return link


def gate_probs(z: torch.Tensor, link: str = "softmax") -> torch.Tensor:
    """Routing weights of logits ``z`` (n, K): softmax over K, or an independent sigmoid each."""
    return torch.softmax(z, dim=1) if link == "softmax" else torch.sigmoid(z)


def curvature_hessian(hessian: str, link: str) -> str:
    """The Hessian form the operator applies: a sigmoid gate's exact ("full") Hessian is diagonal."""
    return "diag" if link == "sigmoid" and hessian == "full" else hessian


def hessian_times(probs: Optional[torch.Tensor], z: torch.Tensor, hessian: str) -> torch.Tensor:
    """Row-wise H(p) z for a block of tokens."""
    if hessian == "full":
        return probs * (z - (probs * z).sum(dim=1, keepdim=True))
    if hessian == "diag":
        return (probs - probs * probs) * z
    return z


def hessian_diagonal(probs: Optional[torch.Tensor], hessian: str, like: torch.Tensor, k: int) -> torch.Tensor:
    if hessian == "identity":
        return torch.ones(like.shape[0], k, dtype=like.dtype, device=like.device)
    return probs - probs * probs


class TaskCurvature:
    """Sigma_i of one task: its inputs and, per chunk, the probabilities at which H is evaluated.

    ``weight`` fixes the probabilities, P = softmax(X weight^T): the source router W_i for HARC's
    quadratic model, the current iterate for Newton steps on the exact KL objective.
    ``reducer``: with a distributed one, ``chunks`` are this process's shard of the task's tokens
    (possibly none), ``num_tokens`` is the global count and every method returns the global mean.
    """

    def __init__(self, chunks: TokenChunks, weight: torch.Tensor, hessian: str = "full",
                 reducer: Reducer = LOCAL, link: str = "softmax"):
        self.chunks = chunks
        self.link = check_link(link)
        self.hessian = curvature_hessian(check_hessian(hessian), link)
        self.reducer = reducer
        self.num_experts = int(weight.shape[0])
        self.dim = int(weight.shape[1])
        self.probs: list[Optional[torch.Tensor]] = []
        self.sizes: list[int] = []
        wt = weight.to(device=chunks.device, dtype=chunks.dtype).T.contiguous() if chunks.dtype else None
        n = 0
        for x in chunks:
            if wt is None:
                wt = weight.to(device=x.device, dtype=x.dtype).T.contiguous()
            self.probs.append(None if hessian == "identity" else gate_probs(x @ wt, link))
            self.sizes.append(int(x.shape[0]))
            n += x.shape[0]
        self.local_tokens = n
        n = reducer.sum_int(n)
        if n == 0:
            raise ValueError("a task has no tokens")
        self.num_tokens = n

    @classmethod
    def from_probs(cls, chunks: TokenChunks, probs: Sequence[torch.Tensor], hessian: str = "full", *,
                   reducer: Reducer = LOCAL, num_experts: Optional[int] = None) -> "TaskCurvature":
        """Sigma_i with H evaluated at given per-chunk probabilities (a Newton step's iterate).
        ``num_experts`` is needed when this shard has no chunks."""
        cv = cls.__new__(cls)
        cv.chunks = chunks
        cv.link = "softmax"
        cv.hessian = check_hessian(hessian)
        cv.reducer = reducer
        cv.num_experts = int(probs[0].shape[1]) if num_experts is None else int(num_experts)
        cv.dim = chunks.dim
        cv.probs = list(probs)
        cv.sizes = [int(p.shape[0]) for p in probs]
        cv.local_tokens = sum(cv.sizes)
        cv.num_tokens = reducer.sum_int(cv.local_tokens)
        return cv

    def pairs(self):
        """(inputs chunk, probabilities) pairs, one per chunk; the chunking must not change."""
        count = 0
        for x, p in zip(self.chunks, self.probs):
            count += 1
            yield x, p
        if count != len(self.probs):
            raise RuntimeError("the inputs changed their chunking between passes")

    def matvec(self, w: torch.Tensor) -> torch.Tensor:
        """Sigma_i W (mean over tokens) as a float64 (K, d) matrix."""
        acc = torch.zeros(w.shape, dtype=torch.float64, device=w.device)
        wt = None
        for x, p in self.pairs():
            if wt is None:
                wt = w.to(dtype=x.dtype, device=x.device).T.contiguous()
            u = hessian_times(p, x @ wt, self.hessian)
            acc += (u.T @ x).to(device=acc.device, dtype=torch.float64)
        return self.reducer.sum(acc) / self.num_tokens

    def lowered(self, dtype: torch.dtype) -> "LowPrecisionCurvature":
        """The same Sigma_i with its GEMMs in ``dtype`` (bfloat16/float16): the inner operator of a
        mixed-precision solve. Keeps a ``dtype`` copy of the inputs in memory (N d 2 bytes)."""
        return LowPrecisionCurvature(self, dtype)

    def diagonal(self) -> torch.Tensor:
        """diag(Sigma_i) as a float64 (K, d) matrix: E[h_kk x_a^2]."""
        acc = None
        for x, p in self.pairs():
            part = (hessian_diagonal(p, self.hessian, x, self.num_experts).T @ (x * x)).to(torch.float64)
            acc = part if acc is None else acc + part
        if acc is None:  # an empty shard
            acc = torch.zeros(self.num_experts, self.dim, dtype=torch.float64, device=self._device())
        return self.reducer.sum(acc) / self.num_tokens

    def hessian_mean(self) -> torch.Tensor:
        """E[H] (K, K) float64, the expert factor of the Kronecker preconditioner."""
        k = self.num_experts
        acc = torch.zeros(k, k, dtype=torch.float64, device=self._device())
        for n, p in zip(self.sizes, self.probs):
            if self.hessian == "identity":
                acc += torch.eye(k, dtype=torch.float64, device=acc.device) * n
                continue
            p64 = p.to(torch.float64)
            if self.hessian == "full":
                acc += torch.diag(p64.sum(0)) - p64.T @ p64
            else:
                acc += torch.diag((p64 - p64 * p64).sum(0))
        return self.reducer.sum(acc) / self.num_tokens

    def input_gram(self, max_tokens: Optional[int] = None) -> torch.Tensor:
        """E[x x^T] (d, d) float64, the input factor of the Kronecker preconditioner.

        ``max_tokens`` estimates it from an evenly strided subset (it only has to precondition):
        the d x d GEMM costs d / (2 K) operator applications per token otherwise. Distributed, the
        subset is every stride-th row of the concatenated shards (one process strides per chunk).
        """
        stride = 1 if not max_tokens else max(1, -(-self.num_tokens // max_tokens))
        red = self.reducer
        acc = None
        count = 0
        position = red.offset(self.local_tokens) if red.distributed and stride > 1 else 0
        for x, _ in self.pairs():
            if red.distributed:
                xs = x[(-position) % stride :: stride] if stride > 1 else x
                position += x.shape[0]
            else:
                xs = x[::stride] if stride > 1 else x
            part = (xs.T @ xs).to(torch.float64)
            count += xs.shape[0]
            acc = part if acc is None else acc + part
        if not red.distributed:
            return acc / count
        if acc is None:  # an empty shard
            acc = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self._device())
        return red.sum(acc) / red.sum_int(count)

    def heaviest_token_rows(self, m: int) -> torch.Tensor:
        """Per expert k, the rows sqrt(h_k / N) x of the ``m`` tokens with the largest curvature weight
        h_k = H_kk (ties: the earlier token), as a (K, m, d) tensor in the inputs' dtype: then
        sum_rows U_k^T U_k is the part of this task's expert block E[h_k x x^T] that those tokens carry,
        the low-rank term of the expert-block preconditioner (harc_hpc.math.cg). Two passes over the
        inputs (select, then gather). Distributed: the global top m over all ranks' tokens, the same
        (K, m, d) tensor on every rank (candidates and rows are exchanged by all-reduce)."""
        k = self.num_experts
        red = self.reducer
        m = max(1, min(int(m), self.num_tokens))
        device = self._device()
        best_v = torch.zeros((k, 0), dtype=torch.float64, device=device)
        best_i = torch.zeros((k, 0), dtype=torch.int64, device=device)
        start = red.offset(self.local_tokens) if red.distributed else 0
        position = start
        for x, p in self.pairs():
            n = x.shape[0]
            h = hessian_diagonal(p, self.hessian, x, k).T.to(device=device, dtype=torch.float64)  # (K, n)
            idx = torch.arange(position, position + n, device=device).expand(k, n)
            best_v, best_i = _top_by_value_then_index(torch.cat([best_v, h], 1), torch.cat([best_i, idx], 1), m)
            position += n
        if red.distributed:
            # every rank's candidates (at most m each) reach every rank through one all-reduce (each
            # slot has one writer); the global top m is then the same selection everywhere
            vals = torch.zeros((red.world_size, k, m), dtype=torch.float64, device=device)
            slots = torch.zeros((red.world_size, k, m), dtype=torch.int64, device=device)  # index + 1; 0: empty
            vals[red.rank, :, : best_v.shape[1]] = best_v
            slots[red.rank, :, : best_i.shape[1]] = best_i + 1
            vals, slots = red.sum(vals), red.sum(slots)
            flat_v = vals.permute(1, 0, 2).reshape(k, -1)
            flat_i = slots.permute(1, 0, 2).reshape(k, -1) - 1
            flat_v = flat_v.masked_fill(flat_i < 0, -1.0)  # empty slots lose to every real token (h >= 0)
            order = torch.argsort(flat_i.masked_fill(flat_i < 0, torch.iinfo(torch.int64).max), dim=1, stable=True)
            best_v, best_i = _top_by_value_then_index(flat_v.gather(1, order), flat_i.gather(1, order), m)
        rows = None
        position = start
        for x, p in self.pairs():
            n = x.shape[0]
            if rows is None:
                rows = torch.zeros(k, m, x.shape[1], dtype=x.dtype, device=x.device)
            local = (best_i >= position) & (best_i < position + n)
            if bool(local.any()):
                e, j = local.nonzero(as_tuple=True)
                t = (best_i[e, j] - position).to(x.device)
                w = (best_v[e, j] / self.num_tokens).sqrt().to(device=x.device, dtype=x.dtype)
                rows[e.to(x.device), j.to(x.device)] = x[t] * w[:, None]
            position += n
        if rows is None:  # an empty shard
            rows = torch.zeros(k, m, self.dim, dtype=self.chunks.dtype or torch.float32, device=device)
        return red.sum(rows) if red.distributed else rows

    def dense(self, block_tokens: int = 2048) -> torch.Tensor:
        """Sigma_i materialised, (K d, K d) float64; only for small K d (the direct solver)."""
        k = self.num_experts
        d = self.dim
        out = torch.zeros(k * d, k * d, dtype=torch.float64, device=self._device())
        for x, p in self.pairs():
            for s in range(0, x.shape[0], block_tokens):
                xb = x[s : s + block_tokens].to(torch.float64)
                pb = None if p is None else p[s : s + block_tokens].to(torch.float64)
                if self.hessian == "identity":
                    g = xb.T @ xb
                    for e in range(k):
                        out[e * d : (e + 1) * d, e * d : (e + 1) * d] += g
                    continue
                weights = pb if self.hessian == "full" else pb - pb * pb
                for e in range(k):
                    out[e * d : (e + 1) * d, e * d : (e + 1) * d] += (xb * weights[:, e : e + 1]).T @ xb
                if self.hessian == "full":
                    v = (pb[:, :, None] * xb[:, None, :]).reshape(xb.shape[0], k * d)
                    out -= v.T @ v
        return self.reducer.sum(out) / self.num_tokens

    def _device(self):
        for p in self.probs:
            if p is not None:
                return p.device
        return self.chunks.device or torch.device("cpu")


class LowPrecisionCurvature:
    """Sigma_i W with both GEMMs in a 16-bit type (bfloat16 GEMMs on CPUs with AMX run ~10x the
    float32 ones, tensor cores on GPUs). The probabilities stay float32 and every product is
    accumulated in float64 across chunks; the 16-bit rounding of X, W and the per-chunk products
    (~4e-3 relative) makes this an approximation of Sigma_i, used only inside iterative refinement
    against the exact operator.

    Two exact rewrites keep the rounding noise small and the GEMMs fast:
    - for the full softmax Hessian, H 1 = 0, so Sigma_i W = Sigma_i (W - 1 mean_k(W_k)): W is centred
      over the experts before it is rounded, so a common shift of the experts' rows (which carries no
      curvature) adds no rounding noise to the logits;
    - on a CPU U^T is made contiguous before U^T X: a transposed 16-bit operand is ~2x slower there
      (on a GPU the layout is free).
    """

    def __init__(self, curvature: TaskCurvature, dtype: torch.dtype):
        self.hessian = curvature.hessian
        self.num_tokens = curvature.num_tokens
        self.reducer = curvature.reducer
        self.dtype = dtype
        # Inputs already resident in this dtype (bfloat16 kept from the store) are shared, not copied.
        kept = curvature.chunks.resident_chunks()
        if kept is not None and len(kept) == len(curvature.probs) and all(c.dtype == dtype for c in kept):
            xs = kept
        else:  # one chunk widened/narrowed at a time
            xs = [x.to(dtype) for x, _ in curvature.pairs()]
        self.pairs = [(x, None if p is None else p.float()) for x, p in zip(xs, curvature.probs)]

    def matvec(self, w: torch.Tensor) -> torch.Tensor:
        acc = torch.zeros(w.shape, dtype=torch.float64, device=w.device)
        if self.hessian == "full":
            w = w - w.mean(dim=0, keepdim=True)  # exact: H 1 = 0 (see the class docstring)
        wt = None
        for x, p in self.pairs:
            if wt is None:
                wt = w.to(dtype=self.dtype, device=x.device).T.contiguous()
            z = x @ wt
            if self.hessian == "full":  # p * (z - rowsum(p * z)) in two elementwise passes (p float32, z 16-bit)
                pz = p * z
                u = torch.addcmul(pz, p, pz.sum(dim=1, keepdim=True), value=-1.0).to(self.dtype)
            else:
                u = hessian_times(p, z.float(), self.hessian).to(self.dtype)
            part = (u.T.contiguous() if x.device.type == "cpu" else u.T) @ x
            acc += part.to(device=acc.device, dtype=torch.float64)
        return self.reducer.sum(acc) / self.num_tokens


def _top_by_value_then_index(values: torch.Tensor, indices: torch.Tensor, m: int):
    """Per row, the ``m`` largest values (ties: the smaller index), returned in increasing index
    order; ``indices`` must be increasing along each row (a stable sort then breaks ties by index)."""
    if values.shape[1] <= m:
        return values, indices
    top = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :m]
    top = torch.sort(top, dim=1).values  # back to increasing index order
    return values.gather(1, top), indices.gather(1, top)


def log_probs(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """float64 log-softmax of the logits x @ wt (GEMM in x's dtype)."""
    return torch.log_softmax((x @ wt).to(torch.float64), dim=1)
