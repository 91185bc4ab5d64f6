"""A generic router objective: any probability function of the logits, curvature by autograd.

A router is given by its probability function p = f(z) of the logits z = W x (``intercept``: the
bias as one more input column, harc_hpc.math.inputs). ``f`` is any differentiable torch function
that maps an (n, K) block of logits to (n, K) outputs row by row (softmax, softmax(z / T), sigmoid,
sigmoid normalised over the experts, a softmax of normalised logits, ...). The per-token divergence
between the source's outputs r = f(W_i x) and the refit's q = f(W x) is one of

* ``"categorical"``: D(r, q) = sum_k r_k log(r_k / q_k) - r_k + q_k, the generalised KL. For an f
  whose outputs sum to 1 (a distribution over the experts) it *is* KL(r || q); for unnormalised
  positive outputs it is still a divergence (>= 0, zero only at q = r).
* ``"bernoulli"``: D(r, q) = sum_k KL(Bernoulli(r_k) || Bernoulli(q_k)), independent gates in (0, 1)
  (the per-output objective of harc_hpc.math.operator's ``link="sigmoid"``).

Objective: L(W) = sum_i E_{x ~ D_i} D(f(W_i x), f(W x)), tasks weighted equally.

Curvature. With J = df/dz (K x K per token) and the chain rule, the Hessian of D(r, f(z)) in z is

    J^T [d^2 D / dq^2] J  +  sum_k (dD / dq_k) d^2 f_k / dz^2.

At the source point (q = r) dD/dq = 0 for both divergences (the generalised KL's 1 - r/q and the
Bernoulli (q - r) / (q (1 - q)) vanish there), so the second term vanishes and the Gauss-Newton form
G = J^T M J with M = diag(1 / r) (categorical) or diag(1 / (r (1 - r))) (bernoulli) is the *exact*
Hessian of each token's divergence at W = W_i. Hence Sigma_i = E_{D_i}[G_i(x) kron x x^T] is exactly
the Hessian of task i's objective at its own router, HARC's quadratic model (paper Eq. 11) holds with
it unchanged, and for f = softmax it is the closed form H = diag(r) - r r^T, for f = sigmoid with the
Bernoulli divergence diag(s (1 - s)). Approximate there, as for the closed forms: only the quadratic
model itself (the objective is the sum of second-order expansions about each source router).

Away from the sources (the Newton steps of ``objective="kl"``) the dropped term is not zero. Three
curvatures are offered there:

* ``"exact"`` (solve_generic's default): the full Hessian of the per-token divergence in z (reverse
  over reverse autograd), J^T d^2D/dq^2 J + sum_k dD/dq_k d^2 f_k/dz^2. Newton's quadratic local
  convergence (about 10 steps on the tests' problems against 80-200 for the two below); it can be
  indefinite far from a minimum, which the Levenberg-Marquardt damping (on |diag|) and the
  acceptance test on the exact objective handle (CG stops at a direction of non-positive curvature).

* ``"fisher"``: M evaluated at the refit's own outputs q, G = J^T diag(1/q) J (or with
  1 / (q (1 - q))). For a canonical link (softmax with the categorical KL, sigmoid with the
  Bernoulli one) this *is* the exact Hessian at every W (the existing closed-form Newton path);
  otherwise it is the Fisher information of the refit router.
* ``"gauss-newton"``: M = d^2 D / dq^2 at (r, q): diag(r / q^2) or diag(r / q^2 + (1 - r) / (1 - q)^2),
  the generalised Gauss-Newton matrix of the exact KL.

Either only shapes the Levenberg-Marquardt path: the gradient is the exact one (autograd), steps are
accepted on the exact objective, and the fixed point is a stationary point of the exact KL.

Products. Sigma W = (1 / N) sum_chunks U^T X with U = G(z) (X W^T) row by row, where G(z) t is J t
(the vjp of the linear map u -> J^T u, double backward) scaled by M and pulled back, J^T (M J t):
one evaluation of f and three backward passes per chunk, O(n K) next to the two O(n K d) GEMMs
(plain torch.autograd: torch.func's forward mode costs ~10x more per call at small sizes). ``f``
must be twice differentiable by autograd (every torch op is; a custom autograd.Function needs a
differentiable backward). Memory: the chunk's logits at the
curvature point (n K, in the inputs' dtype, like TaskCurvature's probabilities) plus f's autograd
state for one chunk. The logit-space work runs in ``logit_dtype`` (float64 by default); the GEMMs
run in the chunk dtype and every sum across chunks is float64 in chunk order.
The exact diagonal E[G_kk x_a^2] (Jacobi), E[G] (Kronecker expert factor) and the heaviest-token
rows (expert-block) come from one pass that forms G's K columns per chunk (one batched backward
over the K unit directions, in token blocks of bounded size), no sampling. ``GenericCurvature`` has TaskCurvature's operator interface (matvec, diagonal,
hessian_mean, input_gram, heaviest_token_rows, dense), so it fits wherever those are consumed.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch

from harc_hpc.errors import UsageError
from harc_hpc.math.cg import (
    PRECONDITIONERS,
    ExpertBlockPreconditioner,
    KroneckerPreconditioner,
    conjugate_gradient,
    jacobi_preconditioner,
)
from harc_hpc.math.distributed import LOCAL, ProcessGroupLike, Reducer, as_reducer
from harc_hpc.math.inputs import DEFAULT_CHUNK_TOKENS, TokenChunks, TokenInput
from harc_hpc.math.settings import SolverSettings, resolve_preconditioner, settings_of
from harc_hpc.math.solver import HarcSystem, RouterSolution

ProbFn = Callable[[torch.Tensor], torch.Tensor]

DIVERGENCES = ("categorical", "bernoulli")
CURVATURES = ("fisher", "gauss-newton", "exact")
GENERIC_SOLVERS = ("cg", "pcg", "direct")
GENERIC_OBJECTIVES = ("quadratic", "kl")
# the per-token K x K curvatures are formed in token blocks of about this many numbers
COLUMN_BLOCK_NUMBERS = 1 << 22
# solver="direct" materialises the (K d)^2 float64 system: refused beyond this
GENERIC_DIRECT_MAX_BYTES = 4 << 30


def _check_choice(name: str, value: str, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def divergence_rows(r: torch.Tensor, q: torch.Tensor, divergence: str) -> torch.Tensor:
    """Per-token D(r, q) (n,) for (n, K) outputs (0 log 0 = 0)."""
    xlogy = torch.special.xlogy
    if divergence == "bernoulli":
        s, t = 1.0 - r, 1.0 - q
        return (xlogy(r, r) - xlogy(r, q) + xlogy(s, s) - xlogy(s, t)).sum(dim=-1)
    return (xlogy(r, r) - xlogy(r, q) - r + q).sum(dim=-1)


def divergence_weights(q: torch.Tensor, r: Optional[torch.Tensor], divergence: str, curvature: str) -> torch.Tensor:
    """The diagonal M of the curvature J^T M J in output space, (n, K): d^2 D / dq^2 at (r, q) for
    ``"gauss-newton"``, at (q, q) for ``"fisher"`` (or when ``r`` is None). Outputs at the boundary
    (q = 0, or q = 1 for a Bernoulli gate) have J = 0 there and get weight 0 instead of inf."""
    gn = curvature == "gauss-newton" and r is not None
    if divergence == "bernoulli":
        inside = (q > 0) & (q < 1)
        qs = torch.where(inside, q, torch.full_like(q, 0.5))
        m = r / (qs * qs) + (1.0 - r) / ((1.0 - qs) * (1.0 - qs)) if gn else 1.0 / (qs * (1.0 - qs))
        return torch.where(inside, m, torch.zeros_like(q))
    inside = q > 0
    qs = torch.where(inside, q, torch.ones_like(q))
    m = r / (qs * qs) if gn else 1.0 / qs
    return torch.where(inside, m, torch.zeros_like(q))


def check_prob_fn(prob_fn: ProbFn, z: torch.Tensor, divergence: str) -> torch.Tensor:
    """f(z) for a block of logits, checked: same shape, finite, in the divergence's domain."""
    p = prob_fn(z)
    if not torch.is_tensor(p) or tuple(p.shape) != tuple(z.shape):
        raise ValueError(f"prob_fn must map (n, K) logits to (n, K) outputs row by row, got "
                         f"{tuple(getattr(p, 'shape', ()))} for {tuple(z.shape)}")
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ValueError("prob_fn returned negative or non-finite outputs")
    if divergence == "bernoulli" and bool((p > 1).any()):
        raise ValueError("divergence='bernoulli' needs outputs in [0, 1] (independent gates)")
    return p


def is_shift_invariant(prob_fn: ProbFn, z: torch.Tensor, tol: float = 1e-10) -> bool:
    """Whether f(z + c 1) = f(z) on these logits (a softmax of any scale): then a shift shared by
    all experts (w -> w + 1 c^T) carries no curvature, Sigma_i (1 c^T) = 0 exactly."""
    z = z.detach()
    gen = torch.Generator(device="cpu").manual_seed(0)
    shift = (torch.rand(z.shape[0], 1, generator=gen, dtype=torch.float64) * 4.0 - 2.0).to(z)
    with torch.no_grad():
        a, b = prob_fn(z), prob_fn(z + shift)
    return bool(((a - b).abs() <= tol * (1.0 + a.abs())).all())


class GenericCurvature:
    """Sigma = E_x[G(x) kron x x^T] of one task, G = J^T M J of ``prob_fn`` at the logits
    ``weight`` x (module docstring), with TaskCurvature's operator interface.

    ``targets``: per-chunk outputs r (n, K) of the source, needed only for ``curvature=
    "gauss-newton"`` away from the source; at the source point both curvatures coincide.
    ``reducer``: distributed as TaskCurvature (``chunks`` is this rank's shard, every method returns
    the global mean); the expert-block rows are local only.
    """

    hessian = "full"
    link = "generic"

    def __init__(self, chunks: TokenChunks, weight: torch.Tensor, prob_fn: ProbFn, divergence: str = "categorical",
                 *, curvature: str = "fisher", targets: Optional[Sequence[torch.Tensor]] = None,
                 reducer: Reducer = LOCAL, logit_dtype: torch.dtype = torch.float64):
        self.chunks = chunks
        self.prob_fn = prob_fn
        self.divergence = _check_choice("divergence", divergence, DIVERGENCES)
        self.curvature = _check_choice("curvature", curvature, CURVATURES)
        if curvature != "fisher" and targets is None:
            raise ValueError(f"curvature={curvature!r} away from the source needs the source's outputs (targets)")
        self.reducer = reducer
        self.logit_dtype = logit_dtype
        self.num_experts = int(weight.shape[0])
        self.dim = int(weight.shape[1])
        self.logits: list[torch.Tensor] = []
        self.sizes: list[int] = []
        wt = None
        for x in chunks:
            if wt is None:
                wt = weight.detach().to(device=x.device, dtype=x.dtype).T.contiguous()
            z = x @ wt
            if not self.logits:
                check_prob_fn(prob_fn, z.to(logit_dtype), divergence)
            self.logits.append(z)
            self.sizes.append(int(x.shape[0]))
        self.targets = None if targets is None else list(targets)
        if self.targets is not None and [int(t.shape[0]) for t in self.targets] != self.sizes:
            raise ValueError("targets must be given per chunk, with the chunks' sizes")
        self.local_tokens = sum(self.sizes)
        self.num_tokens = reducer.sum_int(self.local_tokens)
        if self.num_tokens == 0:
            raise ValueError("a task has no tokens")

    # -- per chunk, in logit space --------------------------------------------------------------

    def _triples(self):
        count = 0
        targets = self.targets if self.targets is not None else [None] * len(self.logits)
        for x, z, r in zip(self.chunks, self.logits, targets):
            count += 1
            yield x, z.to(self.logit_dtype), r
        if count != len(self.logits):
            raise RuntimeError("the inputs changed their chunking between passes")

    def _linearised(self, z: torch.Tensor, r: Optional[torch.Tensor]):
        """t -> G t for one chunk's logits z (n, K), row by row, for one t (n, K) or a batch (B, n, K):
        G t = J^T (M (J t)), J t by double backward (the vjp u -> J^T u is linear in u; its vjp is
        J t), or for ``"exact"`` the Hessian of the per-token divergence in z (reverse over reverse).
        Plain torch.autograd: far less per-call overhead than forward-mode transforms at these sizes."""
        zz = z.detach().requires_grad_()
        with torch.enable_grad():
            q = self.prob_fn(zz)
            if self.curvature == "exact":
                loss = divergence_rows(r.to(q), q, self.divergence).sum()
                (gz,) = torch.autograd.grad(loss, zz, create_graph=True)

                def apply(t: torch.Tensor) -> torch.Tensor:
                    batched = t.ndim == 3
                    return torch.autograd.grad(gz, zz, t, retain_graph=True, is_grads_batched=batched)[0]

                return apply
            u = torch.zeros_like(q, requires_grad=True)
            (jtu,) = torch.autograd.grad(q, zz, u, create_graph=True)
        m = divergence_weights(q.detach(), None if r is None else r.to(q), self.divergence, self.curvature)

        def apply(t: torch.Tensor) -> torch.Tensor:
            batched = t.ndim == 3
            (jt,) = torch.autograd.grad(jtu, u, t, retain_graph=True, is_grads_batched=batched)
            return torch.autograd.grad(q, zz, m * jt, retain_graph=True, is_grads_batched=batched)[0]

        return apply

    def _column_blocks(self, z: torch.Tensor, r: Optional[torch.Tensor]):
        """Per token, G's columns, in token blocks of bounded size (about 2^22 numbers each):
        yields (start, (b, K, K) with [t, l, k] = G_lk(x_t)). The K products of a block run as one
        batched backward (a loop of K where ``prob_fn``'s backward cannot be batched)."""
        n, k = z.shape
        block = max(1, COLUMN_BLOCK_NUMBERS // (k * k))
        for s in range(0, n, block):
            zb = z[s : s + block]
            apply = self._linearised(zb, None if r is None else r[s : s + block])
            basis = torch.eye(k, dtype=zb.dtype, device=zb.device)[:, None, :].expand(k, zb.shape[0], k)
            try:
                cols = apply(basis)
            except RuntimeError:
                cols = torch.stack([apply(basis[e].contiguous()) for e in range(k)])
            yield s, cols.permute(1, 2, 0)

    def logit_products(self, t_chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """G(x) t per token for per-chunk logit-space directions t (n, K): the operator in logit space."""
        return [self._linearised(z, r)(t.to(z)) for (_, z, r), t in zip(self._triples(), t_chunks)]

    # -- TaskCurvature's interface ---------------------------------------------------------------

    def matvec(self, w: torch.Tensor) -> torch.Tensor:
        """Sigma W (mean over tokens) as a float64 (K, d) matrix."""
        acc = torch.zeros(w.shape, dtype=torch.float64, device=w.device)
        wt = None
        for x, z, r in self._triples():
            if wt is None:
                wt = w.to(dtype=x.dtype, device=x.device).T.contiguous()
            u = self._linearised(z, r)((x @ wt).to(z.dtype))
            acc += (u.to(x.dtype).T @ x).to(device=acc.device, dtype=torch.float64)
        return self.reducer.sum(acc) / self.num_tokens

    def _device(self):
        return self.logits[0].device if self.logits else (self.chunks.device or torch.device("cpu"))

    def diagonal(self) -> torch.Tensor:
        """diag(Sigma) as a float64 (K, d) matrix, E[G_kk x_a^2], exact (one pass, G's K columns per token)."""
        acc = torch.zeros(self.num_experts, self.dim, dtype=torch.float64, device=self._device())
        mean = torch.zeros(self.num_experts, self.num_experts, dtype=torch.float64, device=self._device())
        for x, z, r in self._triples():
            for s, g in self._column_blocks(z, r):
                xb = x[s : s + g.shape[0]]
                h = torch.diagonal(g, dim1=1, dim2=2)
                acc += (h.to(x.dtype).T @ (xb * xb)).to(device=acc.device, dtype=torch.float64)
                mean += g.sum(0).to(device=mean.device, dtype=torch.float64)
        self._hessian_mean = self.reducer.sum(mean) / self.num_tokens
        return self.reducer.sum(acc) / self.num_tokens

    def hessian_mean(self) -> torch.Tensor:
        """E[G] (K, K) float64, the expert factor of the Kronecker preconditioner."""
        if getattr(self, "_hessian_mean", None) is None:
            self.diagonal()
        return self._hessian_mean

    def input_gram(self, max_tokens: Optional[int] = None) -> torch.Tensor:
        """E[x x^T] (d, d) float64; ``max_tokens``: from every stride-th token of each chunk (it only
        has to precondition)."""
        stride = 1 if not max_tokens else max(1, -(-self.num_tokens // max_tokens))
        acc = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self._device())
        count = 0
        for x, _, _ in self._triples():
            xs = x[::stride]
            acc += (xs.T @ xs).to(device=acc.device, dtype=torch.float64)
            count += int(xs.shape[0])
        return self.reducer.sum(acc) / max(1, self.reducer.sum_int(count))

    def heaviest_token_rows(self, m: int) -> torch.Tensor:
        """Per expert k, the rows sqrt(G_kk / N) x of the ``m`` tokens with the largest G_kk (ties:
        the earlier token), (K, m, d) in the inputs' dtype (cg.ExpertBlockPreconditioner). Local only."""
        if self.reducer.distributed:
            raise ValueError("the expert-block preconditioner of the generic objective is one-process only: "
                             "use preconditioner='jacobi' or 'kronecker'")
        k = self.num_experts
        m = max(1, min(int(m), self.num_tokens))
        device = self._device()
        best_v = torch.zeros((k, 0), dtype=torch.float64, device=device)
        best_i = torch.zeros((k, 0), dtype=torch.int64, device=device)
        position = 0
        for _, z, r in self._triples():
            h = torch.cat([torch.diagonal(g, dim1=1, dim2=2) for _, g in self._column_blocks(z, r)])
            h = h.T.to(device=device, dtype=torch.float64)
            n = h.shape[1]
            idx = torch.arange(position, position + n, device=device).expand(k, n)
            vals, ids = torch.cat([best_v, h], 1), torch.cat([best_i, idx], 1)
            if vals.shape[1] > m:
                top = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :m]
                top = torch.sort(top, dim=1).values  # increasing token order: stable ties prefer earlier
                vals, ids = vals.gather(1, top), ids.gather(1, top)
            best_v, best_i = vals, ids
            position += n
        rows = None
        position = 0
        for x, _, _ in self._triples():
            n = x.shape[0]
            if rows is None:
                rows = torch.zeros(k, m, x.shape[1], dtype=x.dtype, device=x.device)
            local = (best_i >= position) & (best_i < position + n)
            if bool(local.any()):
                e, j = local.nonzero(as_tuple=True)
                t = (best_i[e, j] - position).to(x.device)
                scale = (best_v[e, j].clamp(min=0) / self.num_tokens).sqrt().to(device=x.device, dtype=x.dtype)
                rows[e.to(x.device), j.to(x.device)] = x[t] * scale[:, None]
            position += n
        return rows

    def dense(self) -> torch.Tensor:
        """Sigma materialised, (K d, K d) float64, index k d + a; only for small K d."""
        k, d = self.num_experts, self.dim
        out = torch.zeros(k * d, k * d, dtype=torch.float64, device=self._device())
        for x, z, r in self._triples():
            for s, g in self._column_blocks(z, r):
                xb = x[s : s + g.shape[0]].to(torch.float64)
                out += torch.einsum("tlk,ta,tb->lakb", g.to(torch.float64), xb, xb).reshape(k * d, k * d)
        return self.reducer.sum(out) / self.num_tokens


class GenericSystem(HarcSystem):
    """alpha sum_i Sigma_i + damping diag(D), D = sum_i diag(Sigma_i): HARC's regularised system
    (HarcSystem's operator, on generic curvatures). ``rhs`` is sum_i Sigma_reg,i w_i when built by
    ``generic_router_operator``."""

    def __init__(self, curvatures: Sequence[GenericCurvature], diagonal: torch.Tensor, alpha: float,
                 shift: float = 0.0, rhs: Optional[torch.Tensor] = None, shift_invariant: bool = False):
        super().__init__(curvatures, diagonal, float(alpha), shift)
        self.rhs = rhs
        self.shift_invariant = shift_invariant

    @property
    def singular_shift(self) -> bool:
        """No damping and a shift-invariant f: singular along w -> w + 1 c^T (keep updates out of it)."""
        return self.damping == 0.0 and self.shift_invariant

    def preconditioner(self, kind: str, *, kronecker_tokens: Optional[int] = 8192, expert_block_tokens: int = 256):
        """The preconditioner ``kind`` (cg.PRECONDITIONERS) of this system, or None for "none"."""
        _check_choice("preconditioner", kind, PRECONDITIONERS)
        project = self.singular_shift
        if kind == "jacobi":
            return jacobi_preconditioner(self.jacobi_diagonal(), project_null=project)
        if kind == "kronecker":
            expert = sum_in_order(c.hessian_mean() for c in self.curvatures)
            grams = [c.input_gram(kronecker_tokens) for c in self.curvatures]
            scale = self.alpha + self.damping
            inner = KroneckerPreconditioner(expert, sum_in_order(grams) / len(grams), self.diagonal,
                                            self.alpha / scale, project_null=project)
            return lambda r: inner(r) / scale
        if kind == "expert-block":
            rows = torch.cat([c.heaviest_token_rows(expert_block_tokens) for c in self.curvatures], dim=1)
            return ExpertBlockPreconditioner(rows, self.diagonal, self.alpha, self.damping,
                                             coarse=self.shift_invariant, project_null=project)
        return None


def sum_in_order(values):
    total = None
    for v in values:
        total = v.clone() if total is None else total + v
    return total


def _chunks_of(inputs: Sequence[TokenInput], d: int, *, compute_dtype, device, chunk_tokens, intercept,
               cache_bytes: int = 4 << 30) -> list[TokenChunks]:
    chunks = [x if isinstance(x, TokenChunks) else
              TokenChunks(x, dim=d, dtype=compute_dtype, device=device, chunk_tokens=chunk_tokens,
                          cache_bytes=cache_bytes, intercept=intercept)
              for x in inputs]
    for c in chunks:
        if c.dim is not None and c.dim != d or c.intercept != intercept:
            raise ValueError(f"TokenChunks of width {c.dim} (intercept={c.intercept}) given for a router of "
                             f"width {d} with intercept={intercept}")
    return chunks


def _first_logits(chunks: TokenChunks, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    for x in chunks:
        return (x @ w.to(dtype=x.dtype, device=x.device).T).to(dtype)
    raise ValueError("a task has no tokens")


def generic_router_operator(
    inputs_per_source: Sequence[TokenInput],
    source_weights: Sequence[torch.Tensor],
    prob_fn: ProbFn,
    *,
    alpha: float = 0.9,
    divergence: str = "categorical",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    compute_dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
    intercept: bool = False,
    process_group: ProcessGroupLike = None,
    logit_dtype: torch.dtype = torch.float64,
    shift_invariant: Optional[bool] = None,
) -> GenericSystem:
    """HARC's system for a router with probability function ``prob_fn``: the operator
    w -> sum_i Sigma_reg,i w (``.apply`` on (K, d) float64 matrices) and ``.rhs`` = sum_i Sigma_reg,i w_i,
    Sigma_reg,i = alpha Sigma_i + (1 - alpha) diag(Sigma_i), each Sigma_i the exact Hessian of task
    i's divergence at its source router ``source_weights[i]`` (K, d) (module docstring).
    ``inputs_per_source[i]``: task i's router inputs, (N_i, d) or a re-iterable of (n, d) chunks (or a
    TokenChunks, used as it is). ``shift_invariant``: whether f(z + c 1) = f(z) (None: tested on the
    first chunk's logits); it decides how the preconditioners treat the expert-shift directions."""
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    _check_choice("divergence", divergence, DIVERGENCES)
    if len(inputs_per_source) != len(source_weights) or not source_weights:
        raise ValueError(f"need one input set per source router, got {len(inputs_per_source)} and {len(source_weights)}")
    k, d = source_weights[0].shape
    for i, w in enumerate(source_weights):
        if w.ndim != 2 or tuple(w.shape) != (k, d):
            raise ValueError(f"source router {i} has shape {tuple(w.shape)}, router 0 {(k, d)}")
    device = source_weights[0].device if device is None else device
    reducer = as_reducer(process_group)
    chunks = _chunks_of(inputs_per_source, d, compute_dtype=compute_dtype, device=device,
                        chunk_tokens=chunk_tokens, intercept=intercept)
    sources = [w.detach().to(device=device, dtype=torch.float64) for w in source_weights]
    return _system_at_sources(chunks, sources, prob_fn, float(alpha), divergence, reducer, logit_dtype, shift_invariant)


def _system_at_sources(chunks, sources, prob_fn, alpha, divergence, reducer, logit_dtype, shift_invariant):
    curvatures = [GenericCurvature(c, w, prob_fn, divergence, reducer=reducer, logit_dtype=logit_dtype)
                  for c, w in zip(chunks, sources)]
    diagonals = [cv.diagonal() for cv in curvatures]
    rhs = sum_in_order(alpha * cv.matvec(w) + (1.0 - alpha) * dg * w
                       for cv, dg, w in zip(curvatures, diagonals, sources))
    if shift_invariant is None:
        shift_invariant = is_shift_invariant(prob_fn, _first_logits(chunks[0], sources[0], logit_dtype))
    system = GenericSystem(curvatures, sum_in_order(diagonals), alpha, rhs=rhs, shift_invariant=bool(shift_invariant))
    system.chunks = chunks
    return system


def _dense_solve(a: torch.Tensor, b: torch.Tensor, w0: torch.Tensor, positive_definite: bool) -> torch.Tensor:
    """A w = b densely; where A is singular, the solution nearest ``w0`` (pseudo-inverse correction)."""
    shape = w0.shape
    r = (b - (a @ w0.reshape(-1)).reshape(shape)).reshape(-1)
    if positive_definite:
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return w0 + torch.cholesky_solve(r[:, None], chol)[:, 0].reshape(shape)
    lam, q = torch.linalg.eigh(a)
    keep = lam > lam.max().clamp(min=0) * a.shape[0] * torch.finfo(a.dtype).eps
    return w0 + (q[:, keep] @ ((q[:, keep].T @ r) / lam[keep])).reshape(shape)


class GenericKLTask:
    """One task's exact objective E_x D(f(W_i x), f(W x)) and its gradient by autograd; caches the
    source's outputs per chunk (n, K) in ``logit_dtype``."""

    def __init__(self, chunks: TokenChunks, source: torch.Tensor, prob_fn: ProbFn, divergence: str,
                 reducer: Reducer = LOCAL, logit_dtype: torch.dtype = torch.float64):
        self.chunks, self.prob_fn, self.divergence = chunks, prob_fn, divergence
        self.reducer, self.logit_dtype = reducer, logit_dtype
        self.targets = []
        ws = None
        with torch.no_grad():
            for x in chunks:
                if ws is None:
                    ws = source.to(dtype=x.dtype, device=x.device).T.contiguous()
                self.targets.append(prob_fn((x @ ws).to(logit_dtype)).detach())
        self.num_tokens = reducer.sum_int(sum(int(t.shape[0]) for t in self.targets))

    def evaluate(self, w: torch.Tensor, with_gradient: bool = True):
        """(mean divergence, its gradient (K, d) float64 or None)."""
        loss = torch.zeros((), dtype=torch.float64)
        grad = torch.zeros(w.shape, dtype=torch.float64, device=w.device) if with_gradient else None
        wt = None
        for x, r in zip(self.chunks, self.targets):
            if wt is None:
                wt = w.to(dtype=x.dtype, device=x.device).T.contiguous()
            z = (x @ wt).to(self.logit_dtype)
            if with_gradient:
                z.requires_grad_()
                with torch.enable_grad():
                    value = divergence_rows(r, self.prob_fn(z), self.divergence).sum()
                    (gz,) = torch.autograd.grad(value, z)
                grad += (gz.to(x.dtype).T @ x).to(device=grad.device, dtype=torch.float64)
            else:
                with torch.no_grad():
                    value = divergence_rows(r, self.prob_fn(z), self.divergence).sum()
            loss = loss + value.detach().to(device="cpu", dtype=torch.float64)
        n = self.num_tokens
        loss = self.reducer.sum_float(float(loss)) / n
        return loss, (self.reducer.sum(grad) / n if with_gradient else None)


def generic_kl(inputs: TokenInput, source: torch.Tensor, weight: torch.Tensor, prob_fn: ProbFn,
               divergence: str = "categorical", *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
               intercept: bool = False) -> float:
    """Mean D(f(source x), f(weight x)) over ``inputs`` (the exact objective of one task), float64."""
    _check_choice("divergence", divergence, DIVERGENCES)
    chunks = _chunks_of([inputs], int(weight.shape[1]), compute_dtype=None, device=weight.device,
                        chunk_tokens=chunk_tokens, intercept=intercept)[0]
    task = GenericKLTask(chunks, source.detach().to(torch.float64), prob_fn, divergence)
    return task.evaluate(weight.detach().to(torch.float64), False)[0]


def _solve_quadratic(system: GenericSystem, b, w0, *, solver, preconditioner, tol, max_iter, callback,
                     kronecker_tokens, expert_block_tokens):
    if solver == "direct":
        w = _dense_solve(system.dense(), b, w0, positive_definite=system.damping > 0)
        residual = float(torch.linalg.vector_norm(b - system.apply(w)) / torch.linalg.vector_norm(b).clamp(min=1e-300))
        return w, 0, residual, bool(torch.isfinite(w).all()), []
    pre = None if solver == "cg" else system.preconditioner(
        preconditioner, kronecker_tokens=kronecker_tokens, expert_block_tokens=expert_block_tokens)
    res = conjugate_gradient(system.apply, b, w0, precondition=pre, tol=tol, max_iter=max_iter, callback=callback)
    return res.x, res.iterations, res.relative_residual, res.converged, res.history


def _fit_generic_kl(chunks, tasks, w_start, prob_fn, *, divergence, curvature, alpha, solver, preconditioner,
                    max_iter, max_steps, grad_tol, reducer, logit_dtype, shift_invariant, kronecker_tokens,
                    expert_block_tokens):
    """Levenberg-Marquardt on the exact objective: each step solves (G + lambda diag(G)) dW = -grad
    with G the chosen curvature at the current W, the step accepted on the exact objective."""
    lam = (1.0 - alpha) / alpha if alpha < 1.0 else 1e-3
    lam_min = 1e-9
    w = w_start.clone()
    total_iterations, steps, converged = 0, 0, False
    g0, rel_grad = None, float("nan")
    evaluations = [t.evaluate(w, True) for t in tasks]
    while True:
        loss = sum(e[0] for e in evaluations)
        grad = sum_in_order(e[1] for e in evaluations)
        g_norm = float(torch.linalg.vector_norm(grad))
        g0 = g_norm if g0 is None else g0
        rel_grad = g_norm / g0 if g0 > 0 else 0.0
        if rel_grad <= grad_tol or g_norm == 0.0:
            converged = True
            break
        if steps >= max_steps:
            break
        curvatures = [GenericCurvature(c, w, prob_fn, divergence, curvature=curvature, targets=t.targets,
                                       reducer=reducer, logit_dtype=logit_dtype) for c, t in zip(chunks, tasks)]
        # the damping's scale: diag of the curvature (its magnitude for the possibly indefinite "exact")
        diagonal = sum_in_order(cv.diagonal().abs() for cv in curvatures)
        accepted = False
        while not accepted and steps < max_steps:
            steps += 1
            system = GenericSystem(curvatures, diagonal, alpha=1.0, shift=lam, shift_invariant=shift_invariant)
            if solver == "direct":
                delta = _dense_solve(system.dense(), -grad, torch.zeros_like(w), positive_definite=True)
            else:
                pre = None if solver == "cg" else system.preconditioner(
                    preconditioner, kronecker_tokens=kronecker_tokens, expert_block_tokens=expert_block_tokens)
                res = conjugate_gradient(system.apply, -grad, torch.zeros_like(w), precondition=pre,
                                         tol=max(min(0.1, rel_grad ** 0.5), 1e-12), max_iter=max_iter)
                delta = res.x
                total_iterations += res.iterations
            predicted = -0.5 * float(torch.sum(grad * delta)) + 0.5 * lam * float(torch.sum(diagonal * delta * delta))
            trial = w + delta
            trial_loss = sum(t.evaluate(trial, False)[0] for t in tasks)
            rho = (loss - trial_loss) / predicted if predicted > 0 else -1.0
            noise = 64 * torch.finfo(torch.float64).eps * max(abs(loss), 1e-300)
            trial_eval = None
            if trial_loss < loss - noise:
                accepted = True
            elif trial_loss <= loss + noise:
                # a decrease float64 cannot resolve in the loss: judge the step by the gradient
                trial_eval = [t.evaluate(trial, True) for t in tasks]
                accepted = float(torch.linalg.vector_norm(sum_in_order(e[1] for e in trial_eval))) < g_norm
                rho = 1.0 if accepted else -1.0
            if accepted:
                w = trial
                lam = max(lam / 3.0, lam_min) if rho > 0.75 else (lam * 2.0 if rho < 0.25 else lam)
                evaluations = trial_eval if trial_eval is not None else [t.evaluate(w, True) for t in tasks]
            else:
                lam *= 4.0
        if not accepted:
            break
    return {"weight": w, "iterations": total_iterations, "steps": steps, "relative_gradient": rel_grad,
            "converged": converged}


def solve_generic(
    inputs_per_source: Sequence[TokenInput],
    source_weights: Sequence[torch.Tensor],
    init: torch.Tensor,
    prob_fn: ProbFn,
    settings: Optional[SolverSettings] = None,
    *,
    divergence: str = "categorical",
    curvature: str = "exact",
    process_group: ProcessGroupLike = None,
    callback: Optional[Callable[[int, float], None]] = None,
    logit_dtype: torch.dtype = torch.float64,
    shift_invariant: Optional[bool] = None,
    **fields,
) -> RouterSolution:
    """The refit router (K, d) for a router with probability function ``prob_fn`` (module docstring),
    with the solver settings ``solve_router`` takes (``settings``, keyword ``fields`` on top: alpha,
    objective, solver, preconditioner, tol, max_iter, kl_max_steps, kl_tol, chunk_tokens,
    compute_dtype, intercept, kronecker_tokens, expert_block_tokens; ``hessian`` and ``inner_dtype``
    have no meaning here and must stay at their defaults).

    ``objective="quadratic"``: HARC's system (sum_i Sigma_reg,i) w = sum_i Sigma_reg,i w_i with the
    autograd curvature, solved from ``init`` by CG / PCG (``preconditioner``: none, jacobi, kronecker,
    expert-block) or densely (``solver="direct"``, small K d; the solution nearest ``init`` where the
    system is singular; ``auto``: direct up to ``direct_max_size`` unknowns). ``objective="kl"``
    continues with Levenberg-Marquardt steps on the exact objective sum_i E D(f(W_i x), f(W x))
    (``curvature``: "exact", "fisher" or "gauss-newton") until ||grad|| <= ``kl_tol`` (default
    ``tol``) times its value at the quadratic solution. ``kl_before`` / ``kl_after``: per task, the
    mean divergence at ``init`` and at the result. ``intercept``: routers (K, d + 1) = [W | b],
    inputs (n, d) get a column of ones.
    """
    t_start = time.perf_counter()
    s = settings_of(settings, fields)
    if init.ndim != 2:
        raise ValueError(f"init must be (K, d), got {tuple(init.shape)}")
    if s.inner_dtype is not None or s.hessian != "full":
        raise UsageError("the generic objective has its exact curvature only: hessian must be 'full' and "
                         "inner_dtype None", where="solver settings")
    k, d = init.shape
    alpha, objective, tol, max_iter = s.alpha, s.objective, s.tol, s.max_iter
    preconditioner = resolve_preconditioner(s.preconditioner, k, d, s.expert_block_min_size)
    solver = s.solver if s.solver != "auto" else ("direct" if k * d <= s.direct_max_size else "pcg")
    _check_choice("objective", objective, GENERIC_OBJECTIVES)
    _check_choice("solver", solver, GENERIC_SOLVERS)
    _check_choice("curvature", curvature, CURVATURES)
    _check_choice("divergence", divergence, DIVERGENCES)
    if len(inputs_per_source) != len(source_weights) or not source_weights:
        raise ValueError(f"need one input set per source router, got {len(inputs_per_source)} and {len(source_weights)}")
    for i, w in enumerate(source_weights):
        if tuple(w.shape) != (k, d):
            raise ValueError(f"source router {i} has shape {tuple(w.shape)}, init {(k, d)}")
    if solver == "direct" and (k * d) ** 2 * 8 > GENERIC_DIRECT_MAX_BYTES:
        raise ValueError(f"solver='direct' would materialise a ({k * d})^2 float64 system: use solver='pcg'")
    device = init.device
    reducer = as_reducer(process_group)
    chunks = _chunks_of(inputs_per_source, d, compute_dtype=s.compute_dtype, device=device,
                        chunk_tokens=s.chunk_tokens, intercept=s.intercept)
    sources = [w.detach().to(device=device, dtype=torch.float64) for w in source_weights]
    w0 = init.detach().to(dtype=torch.float64)
    system = _system_at_sources(chunks, sources, prob_fn, alpha, divergence, reducer, logit_dtype, shift_invariant)
    tasks = [GenericKLTask(c, src, prob_fn, divergence, reducer, logit_dtype) for c, src in zip(chunks, sources)]
    kl_before = [t.evaluate(w0, False)[0] for t in tasks]
    w, iterations, residual, converged, history = _solve_quadratic(
        system, system.rhs, w0, solver=solver, preconditioner=preconditioner, tol=tol, max_iter=max_iter,
        callback=callback, kronecker_tokens=s.kronecker_tokens, expert_block_tokens=s.expert_block_tokens)
    quadratic_iterations = iterations
    newton_steps = 0
    if objective == "kl":
        fit = _fit_generic_kl(chunks, tasks, w, prob_fn, divergence=divergence, curvature=curvature, alpha=alpha,
                              solver=solver, preconditioner=preconditioner, max_iter=max_iter,
                              max_steps=s.kl_max_steps, grad_tol=s.kl_gradient_tol, reducer=reducer,
                              logit_dtype=logit_dtype, shift_invariant=system.shift_invariant,
                              kronecker_tokens=s.kronecker_tokens, expert_block_tokens=s.expert_block_tokens)
        w = fit["weight"]
        iterations += fit["iterations"]
        residual, converged, newton_steps = fit["relative_gradient"], fit["converged"], fit["steps"]
    kl_after = [t.evaluate(w, False)[0] for t in tasks]
    reducer.check_replicated(w, "solved router")
    return RouterSolution(
        weight=w.to(dtype=init.dtype, device=init.device), iterations=int(iterations),
        relative_residual=float(residual), converged=bool(converged),
        kl_before=[float(v) for v in kl_before], kl_after=[float(v) for v in kl_after],
        solver=solver, preconditioner="none" if solver in ("cg", "direct") else preconditioner,
        objective=objective, hessian="full", alpha=alpha, residual_history=history, newton_steps=newton_steps,
        seconds=time.perf_counter() - t_start, quadratic_iterations=int(quadratic_iterations))
