"""objective="kl": damped Newton on the exact sum_i E KL(r_i || softmax(W x))."""

from __future__ import annotations

import pytest
import torch

from harc_hpc.math import solve_router
from harc_reference import exact_kl, kl_gradient, make_problem


@pytest.mark.parametrize("solver,pre", [("direct", "none"), ("pcg", "jacobi"), ("pcg", "kronecker"), ("pcg", "expert-block")])
def test_exact_kl_fit_beats_quadratic_and_reaches_a_stationary_point(solver, pre):
    xs, ws, init = make_problem(2, 6, 5, [120, 80], seed=12, spread=1.5)
    quad = solve_router(xs, ws, init, solver=solver, preconditioner=pre, tol=1e-9)
    fit = solve_router(xs, ws, init, solver=solver, preconditioner=pre, objective="kl", tol=1e-9)
    assert fit.converged and fit.newton_steps >= 1
    assert exact_kl(xs, ws, fit.weight) < exact_kl(xs, ws, quad.weight) - 1e-4
    assert sum(fit.kl_after) == pytest.approx(exact_kl(xs, ws, fit.weight), rel=1e-12)
    g_end = kl_gradient(xs, ws, fit.weight).norm()
    g_start = kl_gradient(xs, ws, quad.weight).norm()
    assert float(g_end) < 1e-7 * float(g_start)


def test_exact_kl_fit_is_the_minimiser_not_just_a_descent():
    xs, ws, init = make_problem(2, 4, 3, [60, 60], seed=13)
    fit = solve_router(xs, ws, init, solver="direct", objective="kl", tol=1e-10).weight
    best = exact_kl(xs, ws, fit)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert exact_kl(xs, ws, fit + 1e-3 * torch.randn(fit.shape, generator=gen, dtype=torch.float64)) > best


def test_kl_objective_with_float32_inputs():
    xs, ws, init = make_problem(2, 8, 16, [400, 300], seed=14, spread=1.0)
    fit = solve_router([x.float() for x in xs], [w.float() for w in ws], init.float(), objective="kl",
                       solver="pcg", tol=1e-5)
    quad = solve_router(xs, ws, init, solver="direct")
    assert exact_kl(xs, ws, fit.weight.double()) < exact_kl(xs, ws, quad.weight)
