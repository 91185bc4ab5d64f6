"""A router fitted to fixed per-task target distributions (MergeME's router fit, issue 15 item 2).

HARC fits one router to the *source routers*: task i's tokens should be routed as softmax(W_i x).
An MoE built from dense experts (harc_hpc.mergeme) has no source routers; what is known instead is
which expert each domain's tokens belong to. Task (domain) i gets one target distribution q_i over
the K experts for every one of its tokens: the one-hot "expert e(i)", or smoothed,
q_i = (1 - s) onehot(e(i)) + s / K. The objective is HARC's with r_i replaced by q_i,

    L(W) = sum_i E_{x ~ D_i} KL(q_i || softmax(W x))
         = sum_i E_{x ~ D_i} [ -q_i . log softmax(W x) ] + const,

soft-label multinomial logistic regression, tasks weighted equally. Gradient
g(W) = sum_i E_i[(softmax(W x) - q_i) x^T]; Hessian Sigma(W) = sum_i E_i[H(softmax(W x)) kron x x^T],
HARC's operator with the softmax taken at W (harc_hpc.math.operator).

``objective="quadratic"``: one regularised Newton step from ``init`` W0 (the built MoE's router),

    Sigma_reg(W0) (W - W0) = -g(W0),  Sigma_reg = alpha Sigma + (1 - alpha) diag(Sigma),

HARC's system with the curvature at W0 instead of at W_i and -g(W0) added to its right-hand side;
solved by the same CG / PCG / direct solvers. At the uniform router (W0 = 0) and alpha = 1 the
Hessian is (I - 11^T / K) / K kron C, C = sum_i E_i[x x^T], and the step is the least-squares
regression of the centred, K-scaled targets K (q_i - 1/K) on the inputs: it exists for one-hot
targets too.

``objective="kl"``: Levenberg-Marquardt Newton steps from that point to the exact minimiser
(solver._fit_kl, shared with HARC's exact-KL path). It needs every q_i > 0 (smoothing > 0): with a
zero target probability and domains that are linearly separable in the router inputs the infimum
is at infinite weights, and the fit would not stop.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch

from harc_hpc.errors import UsageError
from harc_hpc.math.distributed import LOCAL, ProcessGroupLike, Reducer, as_reducer
from harc_hpc.math.inputs import TokenChunks, TokenInput
from harc_hpc.math.operator import TaskCurvature
from harc_hpc.math.settings import SolverSettings, settings_of
from harc_hpc.math.solver import (HarcSystem, RouterSolution, _check_statistics, _KLTask, _preconditioner, fit_kl,
                                  resolve_solver, solve_quadratic, sum_in_order, token_chunks)
from harc_hpc.math.statistics import TaskStatistics


def domain_targets(num_experts: int, experts: Sequence[int], smoothing: float = 0.0) -> list[torch.Tensor]:
    """q_i = (1 - smoothing) onehot(experts[i]) + smoothing / K, float64 (K,), one per task."""
    if not 0.0 <= float(smoothing) < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    out = []
    for i, e in enumerate(experts):
        if not 0 <= int(e) < num_experts:
            raise ValueError(f"task {i}: expert {e} is not one of the {num_experts} experts")
        q = torch.full((num_experts,), float(smoothing) / num_experts, dtype=torch.float64)
        q[int(e)] += 1.0 - float(smoothing)
        out.append(q)
    return out


def _check_targets(targets, k: int) -> list[torch.Tensor]:
    out = []
    for i, q in enumerate(targets):
        q = torch.as_tensor(q).detach().to(device="cpu", dtype=torch.float64)
        if q.shape != (k,):
            raise ValueError(f"target {i} has shape {tuple(q.shape)}, expected ({k},) for a router of {k} experts")
        if not bool(torch.isfinite(q).all()) or bool((q < 0).any()) or abs(float(q.sum()) - 1.0) > 1e-9:
            raise ValueError(f"target {i} is not a probability distribution (non-negative, sum 1): {q.tolist()}")
        out.append(q)
    return out


def target_kl(chunks: TokenChunks, q: torch.Tensor, w: torch.Tensor, reducer: Reducer = LOCAL) -> float:
    """E_x KL(q || softmax(w x)) over the chunks (0 log 0 = 0), float64."""
    total, n = 0.0, 0
    wt = None
    for x in chunks:
        if wt is None:
            wt = w.to(dtype=x.dtype, device=x.device).T.contiguous()
        lm = torch.log_softmax((x @ wt).to(torch.float64), dim=1)
        qd = q.to(device=lm.device)
        entropy_part = torch.special.xlogy(qd, qd).sum()
        total += float(x.shape[0] * entropy_part - (lm * qd).sum())
        n += int(x.shape[0])
    return reducer.sum_float(total) / reducer.sum_int(n)


def target_gradient(chunks: TokenChunks, q: torch.Tensor, w: torch.Tensor, reducer: Reducer = LOCAL) -> torch.Tensor:
    """E_x[(softmax(w x) - q) x^T], float64 (K, d)."""
    acc = torch.zeros(w.shape, dtype=torch.float64, device=w.device)
    wt = None
    n = 0
    for x in chunks:
        if wt is None:
            wt = w.to(dtype=x.dtype, device=x.device).T.contiguous()
        p = torch.softmax(x @ wt, dim=1)
        acc += ((p - q.to(device=p.device, dtype=p.dtype)).T @ x).to(device=acc.device, dtype=torch.float64)
        n += int(x.shape[0])
    return reducer.sum(acc) / reducer.sum_int(n)


def target_share(chunks: TokenChunks, expert: int, w: torch.Tensor, top_k: int = 1, reducer: Reducer = LOCAL) -> float:
    """The share of the tokens whose top-``top_k`` experts under router ``w`` include ``expert``
    (over all ranks' shards with a distributed ``reducer``)."""
    hit, n = 0, 0
    wt = None
    for x in chunks:
        if wt is None:
            wt = w.to(dtype=x.dtype, device=x.device).T.contiguous()
        chosen = torch.topk(x @ wt, top_k, dim=1).indices
        hit += int((chosen == expert).any(dim=1).sum())
        n += int(x.shape[0])
    return reducer.sum_int(hit) / max(1, reducer.sum_int(n))


def target_fit_problems(s: SolverSettings) -> list[str]:
    """The settings a target fit does not take, one line each (empty: none)."""
    out = []
    if s.preconditioner == "kronecker":
        out.append("preconditioner 'kronecker' is not offered for target fits: use 'jacobi'")
    if s.link != "softmax" or s.intercept:
        out.append("a target fit is for softmax routers without a bias (link='softmax', intercept=False)")
    if s.inner_dtype is not None:
        out.append("a target fit has no mixed precision (inner_dtype=None)")
    return out


def fit_router_to_targets(
    inputs: Sequence[TokenInput],
    targets: Sequence[torch.Tensor],
    init: torch.Tensor,
    settings: Optional[SolverSettings] = None,
    *,
    statistics: Optional[Sequence[TaskStatistics]] = None,
    callback: Optional[Callable[[int, float], None]] = None,
    process_group: ProcessGroupLike = None,
    **fields,
) -> RouterSolution:
    """The router (K, d) minimising sum_i E_{x in task i} KL(q_i || softmax(W x)) (module docstring).

    inputs[i]: task i's router inputs, an (N_i, d) tensor or a re-iterable of (n, d) chunks;
    targets[i]: q_i, a probability vector (K,) (``domain_targets``); init: W0 (K, d), the point of
    the quadratic model and the starting point. ``settings``, keyword ``fields``, ``callback`` and
    ``process_group`` are ``solve_router``'s (``target_fit_problems``: what a target fit refuses).
    ``kl_before`` / ``kl_after`` are the per-task mean KL(q_i || softmax(W x)) at W0 and at the fit.
    ``statistics``: each task's ``TaskStatistics`` computed with W0 as the source router (the
    curvature at W0: diag(Sigma_i) and Sigma_i W0, as compute-statistics stores them); they replace
    a pass over the inputs and must belong to W0 and these inputs.
    """
    t_start = time.perf_counter()
    s = settings_of(settings, fields)
    problems = target_fit_problems(s)
    if problems:
        raise UsageError("; ".join(problems), where="solver settings")
    reducer = as_reducer(process_group)
    if init.ndim != 2:
        raise ValueError(f"init must be (K, d), got {tuple(init.shape)}")
    k, d = init.shape
    if len(inputs) != len(targets) or not inputs:
        raise ValueError(f"need one input set per target, got {len(inputs)} and {len(targets)}")
    qs = _check_targets(targets, k)
    if s.objective == "kl":
        zero = [i for i, q in enumerate(qs) if bool((q == 0).any())]
        if zero:
            raise ValueError(f"objective='kl' needs every target probability > 0 (targets {zero} have zeros; "
                             f"with separable tasks the minimiser is at infinite weights): smooth the targets "
                             f"or use objective='quadratic'")
    device = init.device
    chunks = token_chunks(inputs, s, init)
    w0 = init.detach().to(dtype=torch.float64)
    qs = [q.to(device) for q in qs]
    s = resolve_solver(s, k, d)

    # The curvature of the quadratic model is taken at W0 (HARC takes it at each source router).
    curvatures = [TaskCurvature(c, w0, s.hessian, reducer=reducer) for c in chunks]
    gradient = sum_in_order(target_gradient(c, q, w0, reducer) for c, q in zip(chunks, qs))
    kl_before = [target_kl(c, q, w0, reducer) for c, q in zip(chunks, qs)]
    if statistics is not None:
        if len(statistics) != len(chunks):
            raise ValueError(f"{len(statistics)} statistics for {len(chunks)} tasks")
        for i, (st, cv) in enumerate(zip(statistics, curvatures)):
            _check_statistics(st, i, cv.hessian, w0, cv.num_tokens)
        stats = [st.to(device) for st in statistics]
        diagonal = sum_in_order(st.sigma_diag for st in stats)
        system = HarcSystem(curvatures, diagonal, s.alpha)
        # Sigma_reg,i W0 = alpha Sigma_i W0 + (1 - alpha) diag(Sigma_i) W0, from the statistics
        b = sum_in_order(st.rhs(w0, s.alpha) for st in stats) - gradient
    else:
        diagonal = sum_in_order(cv.diagonal() for cv in curvatures)
        system = HarcSystem(curvatures, diagonal, s.alpha)
        b = system.apply(w0) - gradient
    project_null = s.alpha == 1.0 and s.hessian == "full"
    fit = solve_quadratic(system, b, w0, s, callback,
                          lambda: _preconditioner(s.preconditioner, system, None, None, project_null,
                                                  s.expert_block_tokens))
    if s.objective == "kl":
        fit = fit_kl(fit, [_KLTask(c, None, reducer, target=q) for c, q in zip(chunks, qs)], chunks, s, None,
                     reducer)
    kl_after = [target_kl(c, q, fit.weight, reducer) for c, q in zip(chunks, qs)]
    reducer.check_replicated(fit.weight, "fitted router")
    return fit.solution(init, s, kl_before, kl_after, time.perf_counter() - t_start)
