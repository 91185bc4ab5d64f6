"""The generic router objective (harc_hpc.math.generic_objective): autograd curvature against the
closed forms, against dense float64 Hessians of the exact objective, and its solves."""

from __future__ import annotations

import pytest
import torch

from harc_hpc.math.generic_objective import (
    GenericCurvature,
    GenericKLTask,
    generic_kl,
    generic_router_operator,
    is_shift_invariant,
    solve_generic,
)
from harc_hpc.math.inputs import TokenChunks
from harc_hpc.math.operator import TaskCurvature
from harc_hpc.math.solver import solve_router

K, D, N = 4, 6, 50
F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    # tiny shapes: intra-op threads only add synchronisation (10x slower on a loaded machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def softmax(z):
    return torch.softmax(z, dim=-1)


def sigmoid(z):
    return torch.sigmoid(z)


def scaled_softmax(z):
    return torch.softmax(0.7 * z, dim=-1)


def normalised_sigmoid(z):  # DeepSeek-V3-style weights: sigmoid scores normalised over the experts
    s = torch.sigmoid(z)
    return s / s.sum(dim=-1, keepdim=True)


def capped_softmax(z):  # logit soft-capping, then a softmax
    return torch.softmax(2.0 * torch.tanh(z / 2.0), dim=-1)


FUNCTIONS = {"softmax": (softmax, "categorical"), "sigmoid": (sigmoid, "bernoulli"),
             "scaled_softmax": (scaled_softmax, "categorical"),
             "normalised_sigmoid": (normalised_sigmoid, "categorical"),
             "capped_softmax": (capped_softmax, "categorical")}


def problem(seed=0, tasks=3, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(N, D, generator=g, dtype=F64) + 0.3 * i for i in range(tasks)]
    ws = [scale * torch.randn(K, D, generator=g, dtype=F64) for _ in range(tasks)]
    return xs, ws, sum(ws) / tasks


def reference_divergence(r, q, divergence):
    """Written out independently of the module: the KL (outputs sum to 1) or per-output Bernoulli KL."""
    if divergence == "bernoulli":
        return (r * (r.log() - q.log()) + (1 - r) * ((1 - r).log() - (1 - q).log())).sum(-1)
    return (r * (r.log() - q.log())).sum(-1)


def task_loss(w_flat, x, w_src, fn, divergence):
    w = w_flat.reshape(K, D)
    return reference_divergence(fn(x @ w_src.T), fn(x @ w.T), divergence).mean()


def total_loss(w_flat, xs, ws, fn, divergence):
    return sum(task_loss(w_flat, x, w_i, fn, divergence) for x, w_i in zip(xs, ws))


def hessian(fn_of_flat, w):
    return torch.autograd.functional.hessian(fn_of_flat, w.reshape(-1).clone())


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


@pytest.mark.parametrize("name,link,hessian_kind", [("softmax", "softmax", "full"), ("sigmoid", "sigmoid", "diag")])
def test_operator_equals_the_closed_form(name, link, hessian_kind):
    fn, div = FUNCTIONS[name]
    xs, ws, _ = problem()
    chunks = TokenChunks(xs[0], dim=D, chunk_tokens=16)  # 4 chunks, the last one short
    gen = GenericCurvature(chunks, ws[0], fn, div)
    ref = TaskCurvature(chunks, ws[0], "full", link=link)
    assert ref.hessian == hessian_kind
    v = torch.randn(K, D, generator=torch.Generator().manual_seed(5), dtype=F64)
    assert rel(gen.matvec(v), ref.matvec(v)) < 1e-13
    assert rel(gen.diagonal(), ref.diagonal()) < 1e-13
    assert rel(gen.hessian_mean(), ref.hessian_mean()) < 1e-13
    assert rel(gen.input_gram(), ref.input_gram()) < 1e-13
    assert rel(gen.heaviest_token_rows(5), ref.heaviest_token_rows(5)) < 1e-13
    assert rel(gen.dense(), ref.dense()) < 1e-13


def test_scaled_softmax_is_the_closed_form_at_the_scaled_router():
    # softmax(s W x): Sigma = s^2 E[H(softmax(s W x)) kron x x^T]
    xs, ws, _ = problem()
    chunks = TokenChunks(xs[1], dim=D)
    v = torch.randn(K, D, generator=torch.Generator().manual_seed(6), dtype=F64)
    gen = GenericCurvature(chunks, ws[1], scaled_softmax).matvec(v)
    ref = 0.49 * TaskCurvature(chunks, 0.7 * ws[1], "full").matvec(v)
    assert rel(gen, ref) < 1e-13
    assert is_shift_invariant(scaled_softmax, xs[0] @ ws[0].T)
    assert not is_shift_invariant(normalised_sigmoid, xs[0] @ ws[0].T)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_curvature_is_the_exact_hessian_at_the_source(name):
    fn, div = FUNCTIONS[name]
    xs, ws, _ = problem(seed=1)
    cv = GenericCurvature(TokenChunks(xs[0], dim=D, chunk_tokens=20), ws[0], fn, div)
    exact = hessian(lambda w: task_loss(w, xs[0], ws[0], fn, div), ws[0])
    dense = cv.dense()
    assert rel(dense, exact) < 1e-10
    v = torch.randn(K, D, generator=torch.Generator().manual_seed(7), dtype=F64)
    assert rel(cv.matvec(v).reshape(-1), dense @ v.reshape(-1)) < 1e-12
    assert rel(cv.diagonal().reshape(-1), torch.diagonal(dense)) < 1e-12


def test_curvatures_away_from_the_source():
    xs, ws, w0 = problem(seed=2)
    x, w_src = xs[0], ws[0]
    chunks = TokenChunks(x, dim=D)
    # the exact Hessian at any W, for a function with no closed form
    task = GenericKLTask(chunks, w_src, normalised_sigmoid, "categorical")
    exact = hessian(lambda w: task_loss(w, x, w_src, normalised_sigmoid, "categorical"), w0)
    cv = GenericCurvature(chunks, w0, normalised_sigmoid, curvature="exact", targets=task.targets)
    assert rel(cv.dense(), exact) < 1e-10
    # Gauss-Newton: J^T diag(r / q^2) J kron x x^T with the Jacobians built per token by jacrev
    z = x @ w0.T
    jac = torch.func.vmap(torch.func.jacrev(normalised_sigmoid))(z)  # (n, K, K): dq_l / dz_k
    q, r = normalised_sigmoid(z), normalised_sigmoid(x @ w_src.T)
    g = torch.einsum("tlk,tl,tlm->tkm", jac, r / q**2, jac)
    ref = torch.einsum("tkm,ta,tb->kamb", g, x, x).reshape(K * D, K * D) / x.shape[0]
    gn = GenericCurvature(chunks, w0, normalised_sigmoid, curvature="gauss-newton", targets=task.targets)
    assert rel(gn.dense(), ref) < 1e-12
    assert rel(gn.dense(), exact) > 1e-3  # away from the source it is an approximation
    # softmax's Fisher form is its exact Hessian everywhere (canonical link)
    exact_sm = hessian(lambda w: task_loss(w, x, w_src, softmax, "categorical"), w0)
    assert rel(GenericCurvature(chunks, w0, softmax).dense(), exact_sm) < 1e-10
    # the objective and gradient the solver uses, against the written-out ones
    loss, grad = task.evaluate(w0)
    w_req = w0.reshape(-1).clone().requires_grad_()
    ref_loss = task_loss(w_req, x, w_src, normalised_sigmoid, "categorical")
    assert abs(loss - float(ref_loss.detach())) < 1e-13
    assert rel(grad.reshape(-1), torch.autograd.grad(ref_loss, w_req)[0]) < 1e-12
    assert abs(generic_kl(x, w_src, w0, normalised_sigmoid) - float(ref_loss.detach())) < 1e-13


@pytest.mark.parametrize("alpha", [0.9, 1.0])
@pytest.mark.parametrize("name,link", [("softmax", "softmax"), ("sigmoid", "sigmoid")])
def test_quadratic_solves_equal_solve_router(name, link, alpha):
    fn, div = FUNCTIONS[name]
    xs, ws, w0 = problem(seed=3)
    ref = solve_router(xs, ws, w0, alpha=alpha, solver="direct", link=link).weight
    runs = [("direct", "none"), ("pcg", "jacobi"), ("pcg", "expert-block")]
    if name == "softmax":
        runs += [("cg", "none"), ("pcg", "kronecker")]
    for solver, pre in runs:
        sol = solve_generic(xs, ws, w0, fn, divergence=div, alpha=alpha, solver=solver, preconditioner=pre,
                            tol=1e-13, chunk_tokens=32)
        assert sol.converged, (solver, pre)
        assert rel(sol.weight, ref) < 1e-10, (solver, pre, rel(sol.weight, ref))


@pytest.mark.parametrize("name", ["normalised_sigmoid", "capped_softmax"])
def test_quadratic_solve_without_closed_form_equals_the_dense_reference(name):
    fn, div = FUNCTIONS[name]
    xs, ws, w0 = problem(seed=4)
    alpha = 0.9
    a = torch.zeros(K * D, K * D, dtype=F64)
    b = torch.zeros(K * D, dtype=F64)
    for x, w_i in zip(xs, ws):
        h = hessian(lambda w: task_loss(w, x, w_i, fn, div), w_i)
        reg = alpha * h + (1 - alpha) * torch.diag(torch.diagonal(h))
        a += reg
        b += reg @ w_i.reshape(-1)
    ref = torch.linalg.solve(a, b).reshape(K, D)
    system = generic_router_operator(xs, ws, fn, alpha=alpha, divergence=div)
    assert rel(system.rhs.reshape(-1), b) < 1e-10
    assert rel(system.dense(), a) < 1e-10
    v = torch.randn(K, D, generator=torch.Generator().manual_seed(8), dtype=F64)
    assert rel(system.apply(v).reshape(-1), a @ v.reshape(-1)) < 1e-10
    for solver, pre in [("direct", "none"), ("pcg", "jacobi"), ("pcg", "kronecker")]:
        sol = solve_generic(xs, ws, w0, fn, divergence=div, alpha=alpha, solver=solver, preconditioner=pre, tol=1e-13)
        assert sol.converged and rel(sol.weight, ref) < 1e-10, (solver, pre)


@pytest.mark.parametrize("name,curvature,solver,tol", [
    ("normalised_sigmoid", "exact", "pcg", 1e-10), ("normalised_sigmoid", "gauss-newton", "direct", 1e-8),
    ("capped_softmax", "exact", "direct", 1e-10), ("capped_softmax", "exact", "pcg", 1e-10)])
def test_kl_objective_reaches_a_minimiser_of_the_exact_kl(name, curvature, solver, tol):
    fn, div = FUNCTIONS[name]
    xs, ws, w0 = problem(seed=5, tasks=2)
    quad = solve_generic(xs, ws, w0, fn, divergence=div, solver="direct")
    sol = solve_generic(xs, ws, w0, fn, divergence=div, objective="kl", curvature=curvature, solver=solver,
                        tol=tol, kl_max_steps=120)
    assert sol.converged
    w = sol.weight.reshape(-1).clone().requires_grad_()
    loss = total_loss(w, xs, ws, fn, div)
    (g,) = torch.autograd.grad(loss, w)
    w_start = w0.reshape(-1).clone().requires_grad_()
    (g0,) = torch.autograd.grad(total_loss(w_start, xs, ws, fn, div), w_start)
    assert float(g.abs().max()) < 10 * tol * float(g0.abs().max())
    # below the merged start and below HARC's quadratic-model solution
    assert float(loss.detach()) < min(total_loss(quad.weight.reshape(-1), xs, ws, fn, div), total_loss(w0.reshape(-1), xs, ws, fn, div))
    assert abs(sum(sol.kl_after) - float(loss.detach())) < 1e-12
    # a minimum, not a saddle: the exact Hessian is positive semi-definite there
    lam = torch.linalg.eigvalsh(hessian(lambda v: total_loss(v, xs, ws, fn, div), sol.weight))
    assert float(lam.min()) > -1e-10 * float(lam.max())


def test_kl_objective_for_softmax_equals_solve_router():
    xs, ws, w0 = problem(seed=6, tasks=2)
    ref = solve_router(xs, ws, w0, solver="direct", objective="kl", tol=1e-11).weight
    sol = solve_generic(xs, ws, w0, softmax, solver="direct", objective="kl", curvature="fisher", tol=1e-11)
    # the minimiser is a line w + 1 c^T (a shared shift changes no softmax): compare the distributions
    for x in xs:
        assert rel(softmax(x @ sol.weight.T), softmax(x @ ref.T)) < 1e-9


def test_router_with_a_bias_equals_solve_router():
    xs, ws, _ = problem(seed=7)
    g = torch.Generator().manual_seed(9)
    wb = [torch.cat([w, torch.randn(K, 1, generator=g, dtype=F64)], dim=1) for w in ws]
    init = sum(wb) / len(wb)
    ref = solve_router(xs, wb, init, solver="direct", intercept=True).weight
    sol = solve_generic(xs, wb, init, softmax, solver="pcg", tol=1e-13, intercept=True)
    assert rel(sol.weight, ref) < 1e-10


def test_the_size_chosen_preconditioner_is_resolved_as_solve_router_resolves_it():
    """preconditioner 'auto' (harc.preconditioner: auto): Jacobi for a router this small, as in
    solve_router; the same answer as naming it."""
    xs, ws, w0 = problem(seed=3)
    auto = solve_generic(xs, ws, w0, softmax, solver="pcg", preconditioner="auto", tol=1e-12)
    named = solve_generic(xs, ws, w0, softmax, solver="pcg", preconditioner="jacobi", tol=1e-12)
    assert auto.preconditioner == "jacobi" and torch.equal(auto.weight, named.weight)


def test_bad_arguments_are_refused():
    xs, ws, w0 = problem()
    with pytest.raises(ValueError, match="row by row"):
        solve_generic(xs, ws, w0, lambda z: z.sum(-1))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        solve_generic(xs, ws, w0, torch.exp, divergence="bernoulli")
    with pytest.raises(ValueError, match="divergence"):
        solve_generic(xs, ws, w0, softmax, divergence="js")
    with pytest.raises(ValueError, match="curvature"):
        solve_generic(xs, ws, w0, softmax, curvature="newton")
    with pytest.raises(ValueError, match="source router 1"):
        solve_generic(xs, [ws[0], ws[1][:, :3], ws[2]], w0, softmax)
    with pytest.raises(ValueError, match="one input set per source"):
        solve_generic(xs[:2], ws, w0, softmax)
    with pytest.raises(ValueError, match="alpha"):
        generic_router_operator(xs, ws, softmax, alpha=0.0)
    with pytest.raises(ValueError, match="targets"):
        GenericCurvature(TokenChunks(xs[0], dim=D), w0, softmax, curvature="gauss-newton")
