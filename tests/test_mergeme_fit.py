"""MergeME router fit (issue 15 item 2): the target-distribution math against dense autograd
references, the pipeline fit on tiny models, and bad input."""

from __future__ import annotations

import pytest
import torch

from harc_hpc.math.targets import domain_targets, fit_router_to_targets, target_kl, target_share
from harc_hpc.math.inputs import TokenChunks


def _tasks(k=3, d=5, n=(40, 30, 50), seed=0, sep=1.5):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(n), d, generator=g, dtype=torch.float64) * sep
    xs = [centres[i] + torch.randn(m, d, generator=g, dtype=torch.float64) for i, m in enumerate(n)]
    return xs


def _loss(w, xs, qs):
    """sum_i mean_x KL(q_i || softmax(w x)), written out per token."""
    total = 0.0
    for x, q in zip(xs, qs):
        logp = torch.log_softmax(x @ w.T, dim=1)
        total = total + (torch.special.xlogy(q, q).sum() - (logp * q).sum(dim=1)).mean()
    return total


def _dense_quadratic(xs, qs, w0, alpha):
    """W0 + Sigma_reg^-1 (-g) with gradient and Hessian of the loss by autograd (flattened W)."""
    k, d = w0.shape
    f = lambda v: _loss(v.reshape(k, d), xs, qs)  # noqa: E731
    v0 = w0.reshape(-1).clone().requires_grad_(True)
    g = torch.autograd.grad(f(v0), v0)[0]
    h = torch.autograd.functional.hessian(f, w0.reshape(-1))
    a = alpha * h + (1 - alpha) * torch.diag(torch.diagonal(h))
    step = torch.linalg.pinv(a, hermitian=True) @ (-g)
    return (w0.reshape(-1) + step).reshape(k, d)


@pytest.mark.parametrize("solver", ["direct", "pcg", "cg"])
@pytest.mark.parametrize("alpha", [0.9, 1.0])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_quadratic_step_equals_dense_autograd_newton_step(solver, alpha, smoothing):
    xs = _tasks()
    qs = domain_targets(3, [0, 1, 2], smoothing)
    g = torch.Generator().manual_seed(1)
    for w0 in (torch.zeros(3, 5, dtype=torch.float64), 0.3 * torch.randn(3, 5, generator=g, dtype=torch.float64)):
        sol = fit_router_to_targets(xs, qs, w0, alpha=alpha, solver=solver, tol=1e-12, max_iter=500)
        ref = _dense_quadratic(xs, qs, w0, alpha)
        assert sol.converged
        # alpha = 1: the shift null space; both are the minimum-change solution from w0
        torch.testing.assert_close(sol.weight, ref, atol=1e-7, rtol=1e-7)
        assert sol.kl_before == pytest.approx([float(_loss(w0, [x], [q])) for x, q in zip(xs, qs)], rel=1e-10)
        assert sol.kl_after == pytest.approx([float(_loss(sol.weight, [x], [q])) for x, q in zip(xs, qs)], rel=1e-10)


def test_uniform_step_is_least_squares_regression_of_centred_targets():
    """At W0 = 0 and alpha = 1 the Newton step is the regression of K (q_i - 1/K) on x."""
    xs = _tasks()
    qs = domain_targets(3, [2, 0, 1], 0.0)
    sol = fit_router_to_targets(xs, qs, torch.zeros(3, 5, dtype=torch.float64), alpha=1.0, solver="direct")
    # normal equations with tasks weighted equally (means per task)
    c = sum(x.T @ x / len(x) for x in xs)
    rhs = sum(3 * (q - 1 / 3)[:, None] * x.mean(0)[None, :] for x, q in zip(xs, qs))
    torch.testing.assert_close(sol.weight, rhs @ torch.linalg.inv(c), atol=1e-9, rtol=1e-9)


def test_exact_kl_fit_reaches_the_autograd_minimum():
    xs = _tasks(sep=0.8)
    qs = domain_targets(3, [0, 1, 2], 0.2)
    w0 = torch.zeros(3, 5, dtype=torch.float64)
    sol = fit_router_to_targets(xs, qs, w0, alpha=0.9, objective="kl", solver="pcg", tol=1e-10, max_iter=500)
    assert sol.converged and sol.newton_steps >= 1
    w = sol.weight.clone().requires_grad_(True)
    grad = torch.autograd.grad(_loss(w, xs, qs), w)[0]
    assert float(grad.norm()) < 1e-8
    # slow reference: plain Newton with the dense autograd Hessian (pseudo-inverse for the shift)
    v = torch.zeros(15, dtype=torch.float64)
    f = lambda u: _loss(u.reshape(3, 5), xs, qs)  # noqa: E731
    for _ in range(60):
        vv = v.clone().requires_grad_(True)
        g = torch.autograd.grad(f(vv), vv)[0]
        v = v - torch.linalg.pinv(torch.autograd.functional.hessian(f, v), hermitian=True) @ g
    assert float(_loss(sol.weight, xs, qs)) == pytest.approx(float(f(v)), abs=1e-12)
    # same routing distribution on every token (the weights agree up to the shift null space)
    for x in xs:
        torch.testing.assert_close(torch.softmax(x @ sol.weight.T, 1), torch.softmax(x @ v.reshape(3, 5).T, 1),
                                   atol=1e-7, rtol=1e-7)
    # and the exact fit is lower than the one quadratic step
    quad = fit_router_to_targets(xs, qs, w0, alpha=0.9, solver="direct")
    assert sum(sol.kl_after) < sum(quad.kl_after)


def test_fit_routes_each_domain_to_its_expert_and_chunking_does_not_matter():
    xs = [x.float() for x in _tasks(k=4, d=8, n=(200, 150, 180), sep=2.0)]
    qs = domain_targets(4, [1, 3, 0], 0.1)  # expert 2 belongs to no domain
    w0 = torch.zeros(4, 8)
    sol = fit_router_to_targets(xs, qs, w0, alpha=0.95, tol=1e-10)
    chunked = fit_router_to_targets([TokenChunks(x, chunk_tokens=64) for x in xs], qs, w0, alpha=0.95, tol=1e-10)
    torch.testing.assert_close(sol.weight, chunked.weight, atol=1e-5, rtol=1e-5)
    for x, e in zip(xs, [1, 3, 0]):
        assert target_share(TokenChunks(x), e, sol.weight, 1) > 0.9
    assert all(a < b for a, b in zip(sol.kl_after, sol.kl_before))


def test_target_kl_matches_per_token_loop():
    x = _tasks()[0]
    q = domain_targets(3, [1], 0.0)[0]
    w = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    loop = sum(sum(float(qk) * (float(torch.log(qk)) - float(lp)) for qk, lp in zip(q, torch.log_softmax(w @ xi, 0))
                   if qk > 0) for xi in x) / len(x)
    assert target_kl(TokenChunks(x, chunk_tokens=7), q, w) == pytest.approx(loop, rel=1e-12)


def test_bad_targets_are_refused():
    xs = _tasks()
    w0 = torch.zeros(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="expert 3 is not one of the 3"):
        domain_targets(3, [0, 3], 0.1)
    with pytest.raises(ValueError, match="smoothing"):
        domain_targets(3, [0, 1], 1.0)
    with pytest.raises(ValueError, match="target 1 has shape"):
        fit_router_to_targets(xs[:2], [torch.tensor([1.0, 0, 0]), torch.tensor([1.0, 0])], w0)
    with pytest.raises(ValueError, match="not a probability"):
        fit_router_to_targets(xs[:1], [torch.tensor([0.5, 0.6, -0.1])], w0)
    with pytest.raises(ValueError, match="one input set per target"):
        fit_router_to_targets(xs, domain_targets(3, [0, 1], 0.1), w0)
    with pytest.raises(ValueError, match="needs every target probability > 0"):
        fit_router_to_targets(xs, domain_targets(3, [0, 1, 2], 0.0), w0, objective="kl")
