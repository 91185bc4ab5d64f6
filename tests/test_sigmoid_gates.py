"""Sigmoid gates (link="sigmoid"): Qwen2-MoE's shared-expert gate, DeepSeek-V3-style router scores.

The objective is sum_i E_{x~D_i} sum_k KL(Bernoulli(s_ik(x)) || Bernoulli(sigmoid(w_k x))), with
s_ik = sigmoid(w_ik x). Its Hessian at w_i is block-diagonal across outputs, E[s_ik (1 - s_ik) x x^T],
and HARC's regularised quadratic model gives one d x d system per output. Checked here against a
dense float64 reference written from that definition, and the definition itself against autograd.
"""

from __future__ import annotations

import pytest
import torch

from harc_hpc.math import solve_router
from harc_hpc.math.metrics import bernoulli_kl_sum, mean_kl
from harc_hpc.math.inputs import TokenChunks
from harc_hpc.math.statistics import compute_task_statistics
from harc_reference import make_problem

F64 = torch.float64


def rel(a, b):
    return float((a - b).norm() / b.norm())


def dense_sigmoid_solution(xs, ws, alpha):
    """Per output k: (sum_i S_ik,reg) w_k = sum_i S_ik,reg w_ik, S_ik = mean_n s(1-s) x x^T."""
    k, d = ws[0].shape
    out = torch.zeros(k, d, dtype=F64)
    for e in range(k):
        a = torch.zeros(d, d, dtype=F64)
        b = torch.zeros(d, dtype=F64)
        for x, w in zip(xs, ws):
            s = torch.sigmoid(x @ w[e])
            sig = (x * (s * (1 - s))[:, None]).T @ x / x.shape[0]
            reg = alpha * sig + (1 - alpha) * torch.diag(torch.diagonal(sig))
            a += reg
            b += reg @ w[e]
        out[e] = torch.linalg.solve(a, b)
    return out


@pytest.mark.parametrize("case", [(1, 1, 4, [30]), (2, 1, 6, [40, 25]), (3, 5, 4, [33, 12, 50])],
                         ids=lambda c: f"T{c[0]}K{c[1]}d{c[2]}")
@pytest.mark.parametrize("alpha", [0.9, 1.0])
def test_sigmoid_gate_solve_matches_the_dense_reference(case, alpha):
    tasks, k, d, tokens = case
    xs, ws, init = make_problem(tasks, k, d, tokens, seed=k + d, spread=0.7)
    ref = dense_sigmoid_solution(xs, ws, alpha)
    for solver, pre in [("direct", "none"), ("cg", "none"), ("pcg", "jacobi"), ("pcg", "kronecker"), ("pcg", "expert-block")]:
        for hessian in ("full", "diag"):  # the same model for sigmoid gates
            sol = solve_router(xs, ws, init, alpha=alpha, hessian=hessian, solver=solver, preconditioner=pre,
                               tol=1e-10, max_iter=2000, link="sigmoid")
            assert sol.converged, (solver, pre, hessian)
            assert rel(sol.weight, ref) < 1e-5, (solver, pre, hessian, rel(sol.weight, ref))


def test_the_quadratic_is_the_second_order_model_of_the_bernoulli_kl():
    """At w = w_i the task's objective has zero gradient and Hessian E[s (1 - s) x x^T] per output,
    (autograd on the definition); the statistics' diag and Sigma w are that Hessian's."""
    xs, ws, _ = make_problem(1, 2, 3, [20], seed=5)
    x, w_i = xs[0], ws[0]

    def objective(flat):
        w = flat.reshape(w_i.shape)
        return bernoulli_kl_sum(x @ w_i.T, x @ w.T) / x.shape[0]

    def objective_t(flat):  # the same, differentiable
        w = flat.reshape(w_i.shape)
        p, z = torch.sigmoid(x @ w_i.T), x @ w.T
        q = torch.sigmoid(z)
        return (p * (torch.log(p) - torch.log(q)) + (1 - p) * (torch.log(1 - p) - torch.log(1 - q))).sum() / x.shape[0]

    flat = w_i.reshape(-1).clone()
    assert abs(objective(flat)) < 1e-12 and abs(float(objective_t(flat))) < 1e-12
    grad = torch.autograd.functional.jacobian(objective_t, flat)
    assert float(grad.abs().max()) < 1e-12
    hess = torch.autograd.functional.hessian(objective_t, flat)
    k, d = w_i.shape
    s = torch.sigmoid(x @ w_i.T)
    for e in range(k):
        block = (x * (s[:, e] * (1 - s[:, e]))[:, None]).T @ x / x.shape[0]
        assert torch.allclose(hess[e * d:(e + 1) * d, e * d:(e + 1) * d], block, atol=1e-12)
        for f in range(k):
            if f != e:
                assert float(hess[e * d:(e + 1) * d, f * d:(f + 1) * d].abs().max()) < 1e-12
    st = compute_task_statistics(x, w_i, w_i * 0.5, hessian="full", link="sigmoid")
    dense = torch.block_diag(*[(x * (s[:, e] * (1 - s[:, e]))[:, None]).T @ x / x.shape[0] for e in range(k)])
    assert torch.allclose(st.sigma_diag.reshape(-1), torch.diagonal(dense), atol=1e-12)
    assert torch.allclose(st.sigma_w.reshape(-1), dense @ w_i.reshape(-1), atol=1e-12)
    assert st.hessian == "diag"


def test_bernoulli_kl_against_a_per_token_loop():
    xs, ws, init = make_problem(1, 3, 4, [17], seed=2)
    x, w_ref, w = xs[0], ws[0], init
    total = 0.0
    for row in x:
        for e in range(w.shape[0]):
            p = float(torch.sigmoid(row @ w_ref[e]))
            q = float(torch.sigmoid(row @ w[e]))
            total += p * torch.log(torch.tensor(p / q)).item() + (1 - p) * torch.log(torch.tensor((1 - p) / (1 - q))).item()
    got = mean_kl(TokenChunks(x), w_ref, w, link="sigmoid")
    assert abs(got - total / x.shape[0]) < 1e-9 * max(1.0, abs(total))


def test_the_fit_lowers_the_kl_to_the_sources_and_kl_objective_is_refused():
    xs, ws, init = make_problem(2, 1, 6, [60, 60], seed=4, spread=1.5)
    sol = solve_router(xs, ws, init, solver="direct", link="sigmoid")
    assert sum(sol.kl_after) < sum(sol.kl_before)
    with pytest.raises(ValueError, match="not implemented for sigmoid"):
        solve_router(xs, ws, init, objective="kl", link="sigmoid")
    with pytest.raises(ValueError, match="link must be one of"):
        solve_router(xs, ws, init, link="tanh")
