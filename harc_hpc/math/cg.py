"""(Preconditioned) conjugate gradients on (K, d) float64 matrices, and the preconditioners.

Plain CG is the paper's Algorithm 2. Convergence is judged on the unpreconditioned residual,
||b - A w|| / ||b|| <= tol, so cg and pcg stop at the same accuracy and their iteration counts compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

Operator = Callable[[torch.Tensor], torch.Tensor]

PRECONDITIONERS = ("none", "jacobi", "kronecker", "expert-block")


@dataclass
class CGResult:
    x: torch.Tensor
    iterations: int
    relative_residual: float  # recomputed from b - A x at the end, not the recurrence
    converged: bool
    history: list = field(default_factory=list)  # recurrence relative residual after each iteration


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.sum(a * b))


def conjugate_gradient(
    apply: Operator,
    b: torch.Tensor,
    x0: torch.Tensor,
    *,
    precondition: Optional[Operator] = None,
    tol: float = 1e-6,
    max_iter: int = 1000,
    callback: Optional[Callable[[int, float], None]] = None,
) -> CGResult:
    """``callback(iteration, relative_residual)`` after every iteration (progress reporting)."""
    x = x0.clone()
    r = b - apply(x)
    b_norm = float(torch.linalg.vector_norm(b))
    scale = b_norm if b_norm > 0 else 1.0
    rel = float(torch.linalg.vector_norm(r)) / scale
    history = []
    if rel <= tol:
        return CGResult(x, 0, rel, True, history)
    z = precondition(r) if precondition is not None else r
    p = z.clone()
    rz = _dot(r, z)
    iterations = 0
    converged = False
    while iterations < max_iter:
        q = apply(p)
        curvature = _dot(p, q)
        # p^T A p <= 0 only happens on a (numerically) singular direction: the consistent part of the
        # system is solved as far as the arithmetic allows, so stop with the current iterate.
        if not (curvature > 0.0) or rz == 0.0:
            break
        step = rz / curvature
        x.add_(p, alpha=step)
        r.add_(q, alpha=-step)
        iterations += 1
        rel = float(torch.linalg.vector_norm(r)) / scale
        history.append(rel)
        if callback is not None:
            callback(iterations, rel)
        if rel <= tol:
            converged = True
            break
        z = precondition(r) if precondition is not None else r
        rz_new = _dot(r, z)
        p.mul_(rz_new / rz).add_(z)
        rz = rz_new
    true_rel = float(torch.linalg.vector_norm(b - apply(x))) / scale
    return CGResult(x, iterations, true_rel, converged, history)


def _guarded_reciprocal(diag: torch.Tensor) -> torch.Tensor:
    # An input coordinate that is zero on every token has a zero diagonal (and a zero row in the
    # system): leave that coordinate of the update alone instead of dividing by zero.
    positive = diag > 0
    floor = diag[positive].max() * 1e-14 if bool(positive.any()) else torch.tensor(1.0, dtype=diag.dtype)
    inv = torch.zeros_like(diag)
    inv[positive] = 1.0 / torch.clamp(diag[positive], min=float(floor))
    return inv


def _expert_centred(v: torch.Tensor) -> torch.Tensor:
    return v - v.mean(dim=0, keepdim=True)


def jacobi_preconditioner(diagonal: torch.Tensor, *, project_null: bool = False) -> Operator:
    """M = diag(A). ``project_null`` keeps every update orthogonal to the shift null space."""
    inv = _guarded_reciprocal(diagonal)
    if project_null:
        return lambda r: _expert_centred(inv * _expert_centred(r))
    return lambda r: inv * r


class KroneckerPreconditioner:
    """M = (Q_A kron Q_B) diag(S) (Q_A kron Q_B)^T, built once from two small eigendecompositions.

    A = sum_i E[H_i] (K x K), B = mean_i E[x x^T] (d x d), A = Q_A L_A Q_A^T, B = Q_B L_B Q_B^T and

        S = alpha * L_A L_B^T  +  (1 - alpha) * (Q_A^2)^T D (Q_B^2)  (+ a tiny floor)

    The second term is the exact diagonal, in the Kronecker eigenbasis, of the system's own damping
    (1 - alpha) diag(D), D = sum_i diag(Sigma_i): the damping is projected rather than guessed. It
    also damps the direction 1/sqrt(K) along which A is singular (softmax Hessians have zero row
    sums): there the alpha term vanishes and only the diagonal term remains. With alpha = 1 and the
    full Hessian the system itself is singular along that direction, so the preconditioner is
    restricted to its complement (updates keep the expert-mean of w fixed).
    """

    def __init__(self, expert_factor: torch.Tensor, input_factor: torch.Tensor, diagonal: torch.Tensor,
                 alpha: float, *, project_null: bool = False, floor: float = 1e-10,
                 diagonal_scaling: bool = True):
        a = expert_factor.to(torch.float64)
        if project_null:
            # lift A's zero eigenvalue along 1 to a typical one: that direction is projected out anyway,
            # and lifting it keeps it from mixing with genuinely small directions in the eigenbasis
            k = a.shape[0]
            a = a + (torch.trace(a) / k) * torch.full_like(a, 1.0 / k)
        la, qa = torch.linalg.eigh(a)
        lb, qb = torch.linalg.eigh(input_factor.to(torch.float64))
        la = la.clamp(min=0.0)
        lb = lb.clamp(min=0.0)
        s = alpha * la[:, None] * lb[None, :]
        if alpha < 1.0:
            s = s + (1.0 - alpha) * ((qa * qa).T @ diagonal.to(torch.float64) @ (qb * qb))
        top = float(s.max()) if s.numel() else 1.0
        self.inv_s = 1.0 / s.clamp(min=max(top, 1e-300) * floor)
        self.qa, self.qb = qa, qb
        self.project_null = project_null
        # coordinates with no curvature at all (an input dimension that is zero on every token) are
        # rows of zeros in the system: keep the update there exactly zero, like Jacobi does
        live = diagonal > 0
        self.mask = None if bool(live.all()) else live.to(torch.float64)
        self.scale = None
        if diagonal_scaling:
            # M's own diagonal is C = (Q_A^2) S (Q_B^2)^T; rescale M to the system's true diagonal D
            # (Jacobi) while keeping its Kronecker correlation structure: M' = s M s, s = sqrt(D / C)
            c = (qa * qa) @ s @ (qb * qb).T
            d64 = diagonal.to(torch.float64)
            ratio = torch.where(live, c / d64.clamp(min=1e-300), torch.ones_like(c))
            self.scale = ratio.clamp(min=0).sqrt()

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            r = r * self.mask
        if self.project_null:
            r = _expert_centred(r)
        if self.scale is not None:
            r = r * self.scale
        t = self.qa.T @ r @ self.qb
        t = t * self.inv_s
        out = self.qa @ t @ self.qb.T
        if self.scale is not None:
            out = out * self.scale
        if self.project_null:
            out = _expert_centred(out)
        return out * self.mask if self.mask is not None else out


class ExpertBlockPreconditioner:
    """Two-level preconditioner: per-expert blocks plus a coarse correction on the expert-shift space.

    The system is A = damping diag(D) + alpha sum_i Sigma_i on (K, d) matrices. Its diagonal block for
    expert k is B_k = alpha sum_i E_i[h_k x x^T] + damping diag(D_k) (h_k = H_kk); the Jacobi
    preconditioner keeps only its diagonal, which leaves the within-expert correlation of the inputs
    to CG. Here B_k is approximated by the tokens that carry most of it: U_k (M x d) holds the rows
    sqrt(alpha h_k / N_i) x of each task's ``m`` heaviest tokens for expert k (TaskCurvature.
    heaviest_token_rows) and

        B_k ~ G_k + U_k^T U_k,   G_k diagonal, chosen so that diag(B_k) is exact,

    inverted by Woodbury through an M x M capacitance matrix per expert (setup K M^2 d, each
    application 4 K M d: a few percent of one matvec at real widths, and independent of the token count).

    The experts are coupled through -E[r r^T] in H, and the directions w = 1 c^T (the same change for
    every expert, which no softmax sees) have no curvature but the damping: block preconditioners
    alone leave them as A's smallest eigenvalues. With the full softmax Hessian they form an exactly
    known subspace Z, Sigma_i Z = 0, so A Z c = damping D (1 c^T) and Z^T A Z = damping diag(sum_k D_k)
    are diagonal: the balancing (deflation) preconditioner

        P = (I - Q A) M^-1 (I - A Q) + Q,   Q = Z (Z^T A Z)^-1 Z^T

    solves that subspace exactly at O(K d) per application (``coarse``). With alpha = 1 the system
    is singular there and ``project_null`` keeps every update out of it instead. On a synthetic
    OLMoE-like layer this takes pcg from ~180 iterations (Jacobi) to ~50 (benchmarks/bench_solver.py).
    """

    GAP_FLOOR = 1e-2

    def __init__(self, rows: torch.Tensor, diagonal: torch.Tensor, alpha: float, damping: float, *,
                 coarse: bool, project_null: bool = False):
        d64 = diagonal.to(torch.float64)
        live = d64 > 0
        exact = (alpha + damping) * d64  # diag(B_k)
        u = rows * (alpha ** 0.5)
        # diag(U_k^T U_k), summed over the rows by a GEMM (a strided float64 reduction is ~10x slower)
        low = torch.bmm(torch.ones(u.shape[0], 1, u.shape[1], dtype=u.dtype, device=u.device), u * u)[:, 0].double()
        # G_k >= GAP_FLOOR diag(B_k): with no damping (alpha = 1, late Newton steps) and every token of
        # an expert selected, exact - low is rounding noise, and the Woodbury terms G^-1 r and
        # G^-1 U^T C^-1 U G^-1 r would cancel catastrophically; a 1 % heavier diagonal costs nothing
        g = torch.maximum(exact - low, torch.maximum(damping * d64, self.GAP_FLOOR * exact))
        # coordinates with no curvature at all stay exactly zero in every update (as with Jacobi)
        self.g_inv = torch.where(live, 1.0 / g, torch.zeros_like(g))
        self.ug = u * self.g_inv.to(u.dtype)[:, None, :]  # U G^-1
        cap = torch.bmm(self.ug, u.transpose(1, 2))
        cap.diagonal(dim1=1, dim2=2).add_(1.0)
        self.cap_inv = self.spd_inverse(cap)
        self.project_null = project_null
        self.coarse = coarse and damping > 0 and not project_null
        if self.coarse:
            self.shift_d = damping * d64  # A Z c = shift_d * c, broadcast over experts
            e = self.shift_d.sum(0)
            self.e_inv = torch.where(e > 0, 1.0 / e.clamp(min=1e-300), torch.zeros_like(e))

    @staticmethod
    def spd_inverse(cap: torch.Tensor) -> torch.Tensor:
        """C^-1 of the batched capacitance matrices C = I + U G^-1 U^T (eigenvalues >= 1) in C's dtype:
        Cholesky, the triangular inverse L^-1 by a batched triangular solve and C^-1 = L^-T L^-1 by a GEMM.
        In float32 (the inputs' dtype) where that factorisation succeeds, float64 otherwise; about 3x
        faster than float64 cholesky_inverse on CPUs (measured in benchmarks/bench_solver.py's setup)."""
        chol, info = torch.linalg.cholesky_ex(cap)
        if bool((info != 0).any()) and cap.dtype != torch.float64:
            chol = torch.linalg.cholesky(cap.double())
        eye = torch.eye(cap.shape[-1], dtype=chol.dtype, device=chol.device).expand_as(chol)
        l_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
        return torch.bmm(l_inv.transpose(1, 2), l_inv).to(cap.dtype)

    def blocks_solve(self, r: torch.Tensor) -> torch.Tensor:
        """M^-1 r, expert by expert (Woodbury); row-vector bmm: batched GEMV is slow on CPUs."""
        t = torch.bmm(r.to(self.ug.dtype).unsqueeze(1), self.ug.transpose(1, 2))  # (K, 1, M): U G^-1 r
        t = torch.bmm(t, self.cap_inv)
        return self.g_inv * r - torch.bmm(t, self.ug).squeeze(1).to(r.dtype)

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        if self.project_null:
            return _expert_centred(self.blocks_solve(_expert_centred(r)))
        if not self.coarse:
            return self.blocks_solve(r)
        c = r.sum(0) * self.e_inv  # (Z^T A Z)^-1 Z^T r
        y = self.blocks_solve(r - self.shift_d * c)  # M^-1 (I - A Q) r
        return y - (self.shift_d * y).sum(0) * self.e_inv + c  # (I - Q A) y + Q r


def refine(
    apply: Operator,
    apply_inner: Operator,
    b: torch.Tensor,
    x0: torch.Tensor,
    *,
    precondition: Optional[Operator] = None,
    tol: float = 1e-6,
    max_iter: int = 1000,
    inner_tol: float = 1e-2,
    callback: Optional[Callable[[int, float], None]] = None,
) -> CGResult:
    """Iterative refinement: the residual b - A x with the exact operator ``apply``, each correction
    by PCG on the cheap approximate operator ``apply_inner`` to ``inner_tol``. Converges while the
    approximation is good to better than a factor of 2 in every direction; stops at ``tol`` on the
    exact residual like conjugate_gradient. ``iterations`` counts the inner iterations (each costs a
    cheap operator application) plus one exact application per refinement step."""
    x = x0.clone()
    b_norm = float(torch.linalg.vector_norm(b))
    scale = b_norm if b_norm > 0 else 1.0
    history: list = []
    iterations = 0
    previous = float("inf")
    while True:
        r = b - apply(x)
        rel = float(torch.linalg.vector_norm(r)) / scale
        history.append(rel)
        if rel <= tol:
            return CGResult(x, iterations, rel, True, history)
        # no progress (the approximation is too coarse for this system) or out of budget
        if iterations >= max_iter or rel > 0.5 * previous:
            return CGResult(x, iterations, rel, False, history)
        previous = rel
        # a truncated inner solve is still a correction; the cap keeps a useless inner operator from
        # spending the whole budget (the exact solve then finishes, see solve_router)
        budget = min(max_iter - iterations, max(25, max_iter // 5))
        step_cb = None if callback is None else (lambda i, res, done=iterations, r0=rel: callback(done + i, r0 * res))
        inner = conjugate_gradient(apply_inner, r, torch.zeros_like(x), precondition=precondition,
                                   tol=max(inner_tol, 0.5 * tol / rel), max_iter=budget, callback=step_cb)
        x += inner.x
        iterations += inner.iterations + 1

