"""solve_router: HARC's calibrated router for one MoE layer.

System (paper Eq. 11), tasks weighted equally whatever their token counts:

    (sum_i Sigma_reg,i) w = sum_i Sigma_reg,i w_i,   Sigma_reg,i = alpha Sigma_i + (1 - alpha) diag(Sigma_i)

solved matrix-free by CG / PCG (Jacobi or Kronecker preconditioner) or, for small K d, densely.
``objective="kl"`` then continues from that solution with Levenberg-Marquardt damped Newton steps
on the exact objective sum_i E KL(r_i || softmax(W x)), each solved by the same machinery.

Singular systems. Sigma_i (full Hessian) is singular along w -> w + 1 c^T (a shift shared by all
experts changes no softmax). For alpha < 1 the diagonal term makes the system positive definite.
For alpha = 1 the system is consistent but singular; every solver then returns the solution that
changes ``init`` least: CG iterates stay in init + range(A) (the preconditioners are restricted to
the complement of the shift null space), and the direct solver adds the pseudo-inverse (minimum
norm) correction to ``init``.

Multi-process (``process_group``): each rank passes its shard of every task's tokens; every token
sum is all-reduced before dividing by the global count (harc_hpc.math.distributed), the CG vectors
are replicated, and every rank returns the same router.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from harc_hpc.math.cg import (
    ExpertBlockPreconditioner,
    KroneckerPreconditioner,
    conjugate_gradient,
    jacobi_preconditioner,
    refine,
)
from harc_hpc.math.distributed import LOCAL, ProcessGroupLike, Reducer, as_reducer
from harc_hpc.math.inputs import TokenChunks, TokenInput
from harc_hpc.math.metrics import mean_kl
from harc_hpc.math.operator import TaskCurvature, curvature_hessian, log_probs
from harc_hpc.math.settings import OBJECTIVES, SOLVERS, SolverSettings, resolve_preconditioner, settings_of
from harc_hpc.math.statistics import TaskStatistics, router_digest, statistics_from_curvature

__all__ = ["OBJECTIVES", "SOLVERS", "RouterSolution", "SolverSettings", "solve_router"]
# solver="direct" materialises the (K d)^2 float64 system; beyond this it is refused rather than
# letting a cluster job die in the allocator (OLMoE's K d = 131072 would need 137 GB).
DIRECT_MAX_BYTES = 4 << 30


@dataclass
class RouterSolution:
    weight: torch.Tensor  # (K, d), dtype/device of init
    iterations: int  # CG iterations (all Newton steps included for objective="kl")
    relative_residual: float  # quadratic: ||b - A w|| / ||b||; kl: ||grad|| / ||grad at start||
    converged: bool
    kl_before: list  # per task, mean KL(r_i || softmax(init x))
    kl_after: list  # per task, mean KL(r_i || softmax(weight x))
    solver: str = ""
    preconditioner: str = "none"
    objective: str = "quadratic"
    hessian: str = "full"
    alpha: float = 0.9
    residual_history: list = field(default_factory=list)
    newton_steps: int = 0
    seconds: float = 0.0
    quadratic_iterations: int = 0


class HarcSystem:
    """sum_i Sigma_reg,i as an operator on (K, d) float64 matrices, with its preconditioners."""

    def __init__(self, curvatures: Sequence[TaskCurvature], diagonal: torch.Tensor, alpha: float,
                 shift: float = 0.0):
        # A w = scale_sigma * sum_i Sigma_i w + damping * D w; kept in this form so the Newton
        # system (Sigma + lambda D) is the same object with other coefficients.
        self.curvatures = list(curvatures)
        self.diagonal = diagonal
        self.alpha = alpha
        self.damping = (1.0 - alpha) + shift

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        acc = self.damping * self.diagonal * w
        for c in self.curvatures:
            acc += self.alpha * c.matvec(w)
        return acc

    def jacobi_diagonal(self) -> torch.Tensor:
        return (self.alpha + self.damping) * self.diagonal

    def dense(self) -> torch.Tensor:
        a = None
        for c in self.curvatures:
            part = c.dense()
            a = part if a is None else a + part
        a *= self.alpha
        a += torch.diag(self.damping * self.diagonal.reshape(-1))
        return a


def _min_change_dense_solve(a: torch.Tensor, b: torch.Tensor, w0: torch.Tensor, positive_definite: bool):
    shape = w0.shape
    r = (b - (a @ w0.reshape(-1)).reshape(shape)).reshape(-1)
    if positive_definite:
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return w0 + torch.cholesky_solve(r[:, None], chol)[:, 0].reshape(shape)
    lam, q = torch.linalg.eigh(a)
    keep = lam > lam.max().clamp(min=0) * a.shape[0] * torch.finfo(a.dtype).eps
    coef = (q[:, keep].T @ r) / lam[keep]
    return w0 + (q[:, keep] @ coef).reshape(shape)


def choose_solver(solver: str, preconditioner: str, k: int, d: int, direct_max_size: int,
                  expert_block_min_size: int = SolverSettings.expert_block_min_size) -> tuple[str, str]:
    """The solver (``auto``: ``direct`` up to ``direct_max_size`` unknowns, else ``pcg``) and the
    preconditioner it uses for a (k, d) router (``auto``: by size, resolve_preconditioner); a dense
    system over DIRECT_MAX_BYTES is refused."""
    preconditioner = resolve_preconditioner(preconditioner, k, d, expert_block_min_size)
    if solver == "auto":
        solver = "direct" if k * d <= direct_max_size else "pcg"
    if solver == "direct" and (k * d) ** 2 * 8 > DIRECT_MAX_BYTES:
        raise ValueError(
            f"solver='direct' would materialise a ({k * d})^2 float64 system "
            f"({(k * d) ** 2 * 8 / 2**30:.1f} GiB > {DIRECT_MAX_BYTES / 2**30:.0f} GiB) for a "
            f"({k}, {d}) router: use solver='pcg' (or 'auto')")
    return solver, ("none" if solver in ("cg", "direct") else preconditioner)


def solve_direct(system: "HarcSystem", b: torch.Tensor, w0: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    """The quadratic system solved densely, the solution nearest ``w0`` where it is singular:
    (w, relative residual, converged)."""
    w = _min_change_dense_solve(system.dense(), b, w0, positive_definite=system.alpha < 1.0)
    residual = float(torch.linalg.vector_norm(b - system.apply(w)) / torch.linalg.vector_norm(b).clamp(min=1e-300))
    return w, residual, bool(torch.isfinite(w).all())


def _check_statistics(s: TaskStatistics, i: int, hessian: str, w_i: torch.Tensor, num_tokens: int):
    if s.hessian != hessian:
        raise ValueError(f"statistics {i} were computed with hessian={s.hessian!r}, solving with {hessian!r}")
    if tuple(s.sigma_w.shape) != tuple(w_i.shape):
        raise ValueError(f"statistics {i} have shape {tuple(s.sigma_w.shape)}, router {tuple(w_i.shape)}")
    if s.source_digest and s.source_digest != router_digest(w_i):
        raise ValueError(f"statistics {i} belong to another source router")
    if s.num_tokens != num_tokens:
        raise ValueError(f"statistics {i} counted {s.num_tokens} tokens, the inputs have {num_tokens}")


DEFAULT_EXPERT_BLOCK_TOKENS = SolverSettings.expert_block_tokens


def expert_block_rows(curvatures, expert_block_tokens: int) -> torch.Tensor:
    """Every task's heaviest-token rows per expert, (K, tasks * m, d): they depend on the curvatures
    only, not on the damping, so one set serves every damping tried on the same curvatures."""
    return torch.cat([c.heaviest_token_rows(expert_block_tokens) for c in curvatures], dim=1)


def _preconditioner(kind, system: HarcSystem, expert_factor, input_factor, project_null,
                    expert_block_tokens: int = DEFAULT_EXPERT_BLOCK_TOKENS, rows: Optional[torch.Tensor] = None):
    kind = resolve_preconditioner(kind, *system.diagonal.shape)
    if kind == "expert-block":
        if rows is None:
            rows = expert_block_rows(system.curvatures, expert_block_tokens)
        # the shift space 1 c^T is exactly curvature-free only for the full softmax Hessian
        coarse = all(c.hessian == "full" and c.link == "softmax" for c in system.curvatures)
        return ExpertBlockPreconditioner(rows, system.diagonal, system.alpha, system.damping, coarse=coarse,
                                         project_null=project_null)
    if kind == "jacobi":
        return jacobi_preconditioner(system.jacobi_diagonal(), project_null=project_null)
    if kind == "kronecker":
        scale = system.alpha + system.damping
        inner = KroneckerPreconditioner(expert_factor, input_factor, system.diagonal, system.alpha / scale,
                                        project_null=project_null)
        return lambda r: inner(r) / scale
    return None


def solve_router(
    inputs: Sequence[TokenInput],
    source_routers: Sequence[torch.Tensor],
    init: torch.Tensor,
    settings: Optional[SolverSettings] = None,
    *,
    statistics: Optional[Sequence[TaskStatistics]] = None,
    callback: Optional[Callable[[int, float], None]] = None,
    process_group: ProcessGroupLike = None,
    **fields,
) -> RouterSolution:
    """Calibrate one layer's router.

    inputs[i]: task i's router inputs (merged model), an (N_i, d) tensor or a re-iterable of (n, d)
    chunks (one that is already a ``TokenChunks`` is used as it is: two solves on the same inputs, a
    router and its shared-expert gate, then read them once); source_routers[i]: W_i (K, d); init: the
    merged router (K, d), the starting point. ``settings`` (harc_hpc.math.settings.SolverSettings,
    default: its defaults) say how; keyword ``fields`` change single settings of it
    (``solve_router(xs, ws, w0, solver="direct")``). All reductions, CG vectors and scalars are float64.

    ``statistics``: each task's ``TaskStatistics`` (compute-statistics' output, the global ones in a
    distributed solve); they replace a pass over the inputs and must belong to these routers and inputs.
    ``callback(iteration, relative_residual)`` follows the quadratic solve's CG iterations.

    ``process_group`` (a torch.distributed process group, e.g. ``dist.group.WORLD``, or a ``Reducer``):
    data-parallel solve. Every rank calls solve_router with the same routers and settings and its own
    shard of each task's tokens (contiguous rows, any sizes, empty allowed). Every token sum is
    computed locally in float64, all-reduced and divided by the global token count; all ranks return
    the same router, equal to the one-process solve up to the rounding of the changed summation
    order. None: one process.
    """
    t_start = time.perf_counter()
    s = settings_of(settings, fields)
    reducer = as_reducer(process_group)
    _check_problem(inputs, source_routers, init, statistics)
    k, d = init.shape
    device = init.device
    chunks = token_chunks(inputs, s, init)
    sources = [w.detach().to(device=device, dtype=torch.float64) for w in source_routers]
    w0 = init.detach().to(dtype=torch.float64)
    s = resolve_solver(s, k, d)

    curvatures = [TaskCurvature(c, w, s.hessian, reducer=reducer, link=s.link) for c, w in zip(chunks, sources)]
    if statistics is not None:
        stats = []
        for i, (st, w, cv) in enumerate(zip(statistics, sources, curvatures)):
            _check_statistics(st, i, curvature_hessian(s.hessian, s.link), w, cv.num_tokens)
            stats.append(st.to(device))
        kl_before = [mean_kl(c, w, w0, reducer, s.link) for c, w in zip(chunks, sources)]
    else:
        stats = [statistics_from_curvature(cv, w, w0) for cv, w in zip(curvatures, sources)]
        kl_before = [st.kl for st in stats]

    diagonal = sum_in_order(st.sigma_diag for st in stats)
    b = sum_in_order(st.rhs(w, s.alpha) for st, w in zip(stats, sources))
    system = HarcSystem(curvatures, diagonal, s.alpha)
    expert_factor = input_factor = None
    if s.preconditioner == "kronecker":
        expert_factor = sum_in_order(st.hessian_mean for st in stats)
        grams = [st.input_gram if st.input_gram is not None else cv.input_gram(s.kronecker_tokens)
                 for st, cv in zip(stats, curvatures)]
        input_factor = sum_in_order(grams) / len(grams)
    project_null = s.alpha == 1.0 and s.hessian == "full" and s.link == "softmax"
    fit = solve_quadratic(system, b, w0, s, callback,
                          lambda: _preconditioner(s.preconditioner, system, expert_factor, input_factor,
                                                  project_null, s.expert_block_tokens))
    if s.objective == "kl":
        fit = fit_kl(fit, [_KLTask(c, w, reducer) for c, w in zip(chunks, sources)], chunks, s, input_factor,
                     reducer)
    kl_after = [mean_kl(c, w, fit.weight, reducer, s.link) for c, w in zip(chunks, sources)]
    reducer.check_replicated(fit.weight, "solved router")
    return fit.solution(init, s, kl_before, kl_after, time.perf_counter() - t_start)


def _check_problem(inputs, source_routers, init, statistics) -> None:
    if init.ndim != 2:
        raise ValueError(f"init must be (K, d), got {tuple(init.shape)}")
    if len(inputs) != len(source_routers) or len(inputs) == 0:
        raise ValueError(f"need one input set per source router, got {len(inputs)} and {len(source_routers)}")
    for i, w in enumerate(source_routers):
        if tuple(w.shape) != tuple(init.shape):
            raise ValueError(f"source router {i} has shape {tuple(w.shape)}, init {tuple(init.shape)}")
    if statistics is not None and len(statistics) != len(inputs):
        raise ValueError(f"{len(statistics)} statistics for {len(inputs)} tasks")


def token_chunks(inputs: Sequence[TokenInput], s: SolverSettings, init: torch.Tensor) -> list[TokenChunks]:
    """Each task's inputs as ``TokenChunks`` for a router like ``init``, held as the settings say (one
    that already is a ``TokenChunks`` is used as it is)."""
    k, d = init.shape
    device = init.device
    chunks = [x if isinstance(x, TokenChunks) else
              TokenChunks(x, dim=d, dtype=s.compute_dtype, device=device, chunk_tokens=s.chunk_tokens,
                          cache_bytes=s.cache_bytes, keep_input_dtype=s.keep_input_dtype, intercept=s.intercept)
              for x in inputs]
    for c in chunks:
        if c.dim is not None and c.dim != d or c.intercept != s.intercept:
            raise ValueError(f"TokenChunks of width {c.dim} (intercept={c.intercept}) given for a ({k}, {d}) "
                             f"router with intercept={s.intercept}")
    return chunks


def resolve_solver(s: SolverSettings, k: int, d: int) -> SolverSettings:
    """The settings with ``solver`` and ``preconditioner`` as used for a (k, d) router (choose_solver)."""
    solver, precond = choose_solver(s.solver, s.preconditioner, k, d, s.direct_max_size, s.expert_block_min_size)
    return s.replace(solver=solver, preconditioner=precond)


@dataclass
class QuadraticFit:
    """Where a fit got: the iterate and how (turned into a RouterSolution by ``solution``)."""

    weight: torch.Tensor  # float64 (K, d)
    iterations: int
    residual: float
    converged: bool
    history: list
    quadratic_iterations: int = 0
    newton_steps: int = 0

    def solution(self, init: torch.Tensor, s: SolverSettings, kl_before, kl_after, seconds: float) -> RouterSolution:
        return RouterSolution(
            weight=self.weight.to(dtype=init.dtype, device=init.device),
            iterations=int(self.iterations),
            relative_residual=float(self.residual),
            converged=bool(self.converged),
            kl_before=[float(v) for v in kl_before],
            kl_after=[float(v) for v in kl_after],
            solver=s.solver,
            preconditioner=s.preconditioner,
            objective=s.objective,
            hessian=s.hessian,
            alpha=s.alpha,
            residual_history=self.history,
            newton_steps=self.newton_steps,
            seconds=seconds,
            quadratic_iterations=int(self.quadratic_iterations),
        )


def solve_quadratic(system: HarcSystem, b: torch.Tensor, w0: torch.Tensor, s: SolverSettings,
                    callback: Optional[Callable[[int, float], None]], preconditioner: Callable) -> QuadraticFit:
    """system w = b from ``w0`` by the settings' (resolved) solver: dense, PCG, or, with
    ``inner_dtype``, mixed-precision refinement that plain PCG finishes if it stalls.
    ``preconditioner()`` builds the preconditioner (not needed by the dense solve)."""
    if s.solver == "direct":
        w, residual, converged = solve_direct(system, b, w0)
        return QuadraticFit(w, 0, residual, converged, [])
    pre = preconditioner()
    if s.inner_dtype is None:
        res = conjugate_gradient(system.apply, b, w0, precondition=pre, tol=s.tol, max_iter=s.max_iter,
                                 callback=callback)
    else:
        low = HarcSystem([c.lowered(s.inner_dtype) for c in system.curvatures], system.diagonal, system.alpha)
        res = refine(system.apply, low.apply, b, w0, precondition=pre, tol=s.tol, max_iter=s.max_iter,
                     inner_tol=s.inner_tol, callback=callback)
        del low
        if not res.converged and res.iterations < s.max_iter:
            done = res.iterations
            rest = conjugate_gradient(system.apply, b, res.x, precondition=pre, tol=s.tol,
                                      max_iter=s.max_iter - done,
                                      callback=None if callback is None else (lambda i, r: callback(done + i, r)))
            rest.iterations += done
            rest.history = res.history + rest.history
            res = rest
    return QuadraticFit(res.x, res.iterations, res.relative_residual, res.converged, res.history,
                        quadratic_iterations=res.iterations)


def fit_kl(start: QuadraticFit, tasks: Sequence["_KLTask"], chunks, s: SolverSettings, input_factor,
           reducer: Reducer) -> QuadraticFit:
    """objective="kl": Levenberg-Marquardt steps on the exact objective from the quadratic solution."""
    fit = _fit_kl(tasks, chunks, start.weight, s, input_factor, reducer)
    return QuadraticFit(fit["weight"], start.iterations + fit["iterations"], fit["relative_gradient"],
                        fit["converged"], start.history, quadratic_iterations=start.iterations,
                        newton_steps=fit["steps"])


def sum_in_order(values):
    total = None
    for v in values:
        total = v.clone() if total is None else total + v
    return total


# -- exact KL objective --------------------------------------------------------------------------


class _KLTask:
    """One task's exact-KL pieces: cached target log-probabilities per chunk (this rank's shard;
    loss and gradient are means over all ranks' tokens). The target of every token is the source
    router's distribution softmax(W_i x), or, with ``target`` (K,), one fixed distribution q_i for
    all of the task's tokens (harc_hpc.math.targets: a domain's expert, smoothed)."""

    def __init__(self, chunks: TokenChunks, source: Optional[torch.Tensor], reducer: Reducer = LOCAL,
                 target: Optional[torch.Tensor] = None):
        self.chunks = chunks
        self.reducer = reducer
        self.log_r = []
        ws = None
        for x in chunks:
            if target is not None:
                log_q = torch.log(target.to(device=x.device, dtype=torch.float64))
                self.log_r.append(log_q.expand(x.shape[0], -1))
                continue
            if ws is None:
                ws = source.to(dtype=x.dtype, device=x.device).T.contiguous()
            self.log_r.append(log_probs(x, ws))
        self.num_tokens = reducer.sum_int(sum(lr.shape[0] for lr in self.log_r))

    def evaluate(self, w: torch.Tensor, with_gradient: bool):
        """Mean KL(r || softmax(w x)), its gradient (K, d) and softmax(w x) per chunk."""
        loss = 0.0
        grad = torch.zeros(w.shape, dtype=torch.float64, device=w.device) if with_gradient else None
        probs = []
        wt = None
        for x, lr in zip(self.chunks, self.log_r):
            if wt is None:
                wt = w.to(dtype=x.dtype, device=x.device).T.contiguous()
            lm = log_probs(x, wt)
            r = lr.exp()
            loss = loss + (r * (lr - lm)).sum().to(torch.float64)  # read once, after the pass
            if with_gradient:
                pm = lm.exp()
                grad += ((pm - r).to(x.dtype).T @ x).to(torch.float64)
                probs.append(pm.to(x.dtype))
        n = self.num_tokens
        loss = self.reducer.sum_float(float(loss))
        if with_gradient:
            grad = self.reducer.sum(grad)
        return loss / n, (grad / n if with_gradient else None), probs


def _fit_kl(tasks: Sequence[_KLTask], chunks, w_start, s: SolverSettings, input_factor, reducer: Reducer = LOCAL):
    """Levenberg-Marquardt on sum_i E KL(r_i || softmax(W x)).

    Each step solves (Hess(W) + lambda diag(Hess(W))) dW = -grad. The loss is convex soft-label
    multinomial regression and Hess(W) = sum_i E[H(p) kron x x^T] is its exact Hessian, i.e. HARC's
    Sigma with the softmax taken at the current W instead of at W_i. lambda starts at
    (1 - alpha) / alpha, the damping HARC's alpha itself applies, and adapts to the ratio of actual
    to predicted decrease, so the last steps are undamped Newton steps (fast local convergence).
    """
    alpha, solver, preconditioner = s.alpha, s.solver, s.preconditioner
    max_iter, max_steps, grad_tol = s.max_iter, s.kl_max_steps, s.kl_gradient_tol
    expert_block_tokens = s.expert_block_tokens
    lam = (1.0 - alpha) / alpha if alpha < 1.0 else 1e-3
    lam_min = 1e-9
    w = w_start.clone()
    total_iterations = 0
    steps = 0
    g0 = None
    rel_grad = float("nan")
    converged = False
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
        curvatures = [TaskCurvature.from_probs(c, e[2], reducer=reducer, num_experts=w.shape[0])
                      for c, e in zip(chunks, evaluations)]
        diagonal = sum_in_order(cv.diagonal() for cv in curvatures)
        expert_factor = (sum_in_order(cv.hessian_mean() for cv in curvatures)
                         if preconditioner == "kronecker" else None)
        # two passes over the inputs: once per Newton point, not once per damping tried there
        rows = (expert_block_rows(curvatures, expert_block_tokens)
                if preconditioner == "expert-block" and solver != "direct" else None)
        accepted = False
        while not accepted and steps < max_steps:
            steps += 1
            # (Sigma + lam D) = (1 + lam) * (a Sigma + (1 - a) D) with a = 1 / (1 + lam)
            system = HarcSystem(curvatures, diagonal, alpha=1.0, shift=lam)
            if solver == "direct":
                a = system.dense()
                delta = _min_change_dense_solve(a, -grad, torch.zeros_like(w), positive_definite=True)
            else:
                inner_tol = max(min(0.1, rel_grad ** 0.5), 1e-12)
                res = conjugate_gradient(
                    system.apply, -grad, torch.zeros_like(w),
                    precondition=_preconditioner(preconditioner, system, expert_factor, input_factor, False,
                                                 expert_block_tokens, rows),
                    tol=inner_tol, max_iter=max_iter,
                )
                delta = res.x
                total_iterations += res.iterations
            predicted = -0.5 * float(torch.sum(grad * delta)) + 0.5 * lam * float(torch.sum(diagonal * delta * delta))
            trial = w + delta
            trial_loss = sum(t.evaluate(trial, False)[0] for t in tasks)
            rho = (loss - trial_loss) / predicted if predicted > 0 else -1.0
            noise = 64 * torch.finfo(torch.float64).eps * max(abs(loss), 1e-300)
            if trial_loss < loss - noise:
                accepted = True
            elif trial_loss <= loss + noise:
                # the decrease is below what float64 can resolve in the loss: judge the step by the
                # gradient instead (this is where Newton's local convergence happens)
                trial_grad = sum_in_order(t.evaluate(trial, True)[1] for t in tasks)
                accepted = float(torch.linalg.vector_norm(trial_grad)) < g_norm
                rho = 1.0 if accepted else -1.0
            if accepted:
                w = trial
                lam = max(lam / 3.0, lam_min) if rho > 0.75 else (lam * 2.0 if rho < 0.25 else lam)
            else:
                lam *= 4.0
        if not accepted:
            break
        evaluations = [t.evaluate(w, True) for t in tasks]
    return {"weight": w, "iterations": total_iterations, "steps": steps, "relative_gradient": rel_grad,
            "converged": converged}
