"""Routers with a bias (GPT-OSS): calibrated as [W | b] on inputs [x, 1] (``intercept=True``)."""

from __future__ import annotations

import pytest
import torch

from harc_hpc.math import compute_task_statistics, solve_router
from harc_reference import dense_solution, make_problem

F64 = torch.float64


def augmented(xs):
    return [torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1) for x in xs]


@pytest.mark.parametrize("hessian", ["full", "diag"])
def test_the_bias_is_one_more_input_column(hessian):
    xs, ws, _ = make_problem(2, 4, 5, [37, 22], seed=1)
    g = torch.Generator().manual_seed(2)
    ws = [torch.cat([w, 0.5 * torch.randn(w.shape[0], 1, generator=g, dtype=F64)], dim=1) for w in ws]
    init = sum(ws) / len(ws)
    ref = dense_solution(augmented(xs), ws, 0.9, hessian)  # the paper's system on [x, 1]
    for solver in ("direct", "pcg"):
        sol = solve_router(xs, ws, init, alpha=0.9, hessian=hessian, solver=solver, tol=1e-11, intercept=True)
        assert float((sol.weight - ref).norm() / ref.norm()) < 1e-6, solver
    explicit = solve_router(augmented(xs), ws, init, alpha=0.9, hessian=hessian, solver="pcg", tol=1e-11)
    sol = solve_router(xs, ws, init, alpha=0.9, hessian=hessian, solver="pcg", tol=1e-11, intercept=True)
    assert torch.equal(sol.weight, explicit.weight) and sol.kl_after == explicit.kl_after
    st = compute_task_statistics(xs[0], ws[0], init, hessian=hessian, intercept=True)
    st_ref = compute_task_statistics(augmented(xs)[0], ws[0], init, hessian=hessian)
    assert torch.equal(st.sigma_w, st_ref.sigma_w) and torch.equal(st.sigma_diag, st_ref.sigma_diag)


def test_a_router_of_the_wrong_width_is_named():
    xs, ws, init = make_problem(1, 3, 4, [10], seed=0)
    with pytest.raises(ValueError, match=r"\(\+1: the bias column\)"):
        solve_router(xs, ws, init, intercept=True)  # (K, d) routers: the bias column is missing
