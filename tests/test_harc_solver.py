"""solve_router against a dense per-token Kronecker reference; operator against App. A.3 Eq. 12."""

from __future__ import annotations

import pytest
import torch

from harc_hpc.math import TaskCurvature, TokenChunks, solve_router
from harc_hpc.math.cg import refine
from harc_hpc.math.solver import HarcSystem
from harc_reference import dense_solution, dense_system, eq12_product, exact_kl, make_problem

CASES = [  # (tasks, K, d, tokens per task)
    (1, 2, 3, [17]),
    (2, 4, 5, [23, 61]),
    (3, 8, 4, [40, 9, 33]),
    (2, 16, 3, [50, 31]),
]


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("hessian", ["full", "diag", "identity"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}K{c[1]}d{c[2]}")
def test_solvers_match_dense_reference(case, hessian):
    tasks, k, d, tokens = case
    xs, ws, init = make_problem(tasks, k, d, tokens, seed=k + d)
    ref = dense_solution(xs, ws, 0.9, hessian)
    direct = solve_router(xs, ws, init, alpha=0.9, hessian=hessian, solver="direct")
    assert rel(direct.weight, ref) < 1e-8
    for solver, pre in [("cg", "none"), ("pcg", "jacobi"), ("pcg", "kronecker"), ("pcg", "expert-block")]:
        sol = solve_router(xs, ws, init, alpha=0.9, hessian=hessian, solver=solver, preconditioner=pre, tol=1e-8)
        assert sol.converged, (solver, pre, sol.relative_residual)
        assert rel(sol.weight, ref) < 1e-5, (solver, pre)
        assert sol.relative_residual < 1e-7
    # mixed precision: 16-bit inner solves, refined against the exact operator, same answer
    for solver, pre in [("cg", "none"), ("pcg", "jacobi"), ("pcg", "kronecker"), ("pcg", "expert-block")]:
        for inner in (torch.bfloat16, torch.float16):
            sol = solve_router(xs, ws, init, alpha=0.9, hessian=hessian, solver=solver, preconditioner=pre,
                               tol=1e-8, inner_dtype=inner)
            assert sol.converged and sol.relative_residual < 1e-8, (solver, pre, inner, sol.relative_residual)
            assert rel(sol.weight, ref) < 1e-5, (solver, pre, inner)


def test_refinement_converges_with_a_good_inner_operator_and_gives_up_on_a_bad_one():
    torch.manual_seed(0)
    m = torch.randn(30, 30, dtype=torch.float64)
    a = m @ m.T + 30 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, 1, dtype=torch.float64)
    exact = torch.linalg.solve(a, b)
    close = a * (1 + 1e-3 * torch.rand(30, 30, dtype=torch.float64))
    close = (close + close.T) / 2  # a symmetric 0.1 % perturbation of A
    res = refine(lambda x: a @ x, lambda x: close @ x, b, torch.zeros_like(b), tol=1e-12, max_iter=500)
    assert res.converged and rel(res.x, exact) < 1e-10
    assert len(res.history) <= 8  # each refinement step gains about as much as the inner tolerance
    off = lambda x: 0.2 * (a @ x)  # 5x off: corrections overshoot, the residual does not halve
    res = refine(lambda x: a @ x, off, b, torch.zeros_like(b), tol=1e-12, max_iter=500)
    assert not res.converged and res.iterations < 500


def test_mixed_precision_of_a_bad_kind_is_refused():
    xs, ws, init = make_problem(1, 3, 4, [30], seed=0)
    with pytest.raises(ValueError, match="inner_dtype"):
        solve_router(xs, ws, init, inner_dtype=torch.int8)


def test_tasks_weigh_equally_whatever_their_token_counts():
    xs, ws, init = make_problem(2, 4, 3, [10, 10], seed=3)
    once = solve_router(xs, ws, init, solver="direct").weight
    repeated = [xs[0], xs[1].repeat(5, 1)]  # same distribution, 5x the tokens
    assert rel(solve_router(repeated, ws, init, solver="direct").weight, once) < 1e-10


def test_operator_is_eq12_per_token():
    xs, ws, _ = make_problem(2, 5, 6, [31, 17], seed=7)
    w = torch.randn(5, 6, dtype=torch.float64)
    alpha = 0.8
    curvatures = [TaskCurvature(TokenChunks(x, chunk_tokens=8), s, "full") for x, s in zip(xs, ws)]
    diagonal = sum(c.diagonal() for c in curvatures)
    got = HarcSystem(curvatures, diagonal, alpha).apply(w)
    want = sum(eq12_product(x, s, w, alpha) for x, s in zip(xs, ws))
    assert rel(got, want) < 1e-12
    a, _ = dense_system(xs, ws, alpha, "full")
    assert rel(got.reshape(-1), a @ w.reshape(-1)) < 1e-12


def test_chunked_iterable_inputs_give_the_same_answer():
    xs, ws, init = make_problem(2, 6, 5, [70, 45], seed=11)
    whole = solve_router(xs, ws, init, solver="pcg", tol=1e-10)
    chunked = [[x[s : s + 7] for s in range(0, x.shape[0], 7)] for x in xs]  # lists are re-iterable
    streamed = solve_router(chunked, ws, init, solver="pcg", tol=1e-10, cache_bytes=0)
    assert rel(streamed.weight, whole.weight) < 1e-9
    with pytest.raises(TypeError, match="re-iterable"):
        solve_router([iter(c) for c in chunked], ws, init)


@pytest.mark.parametrize("inner", [None, torch.bfloat16])
@pytest.mark.parametrize("objective", ["quadratic", "kl"])
def test_inputs_kept_in_bfloat16_give_the_same_bytes_in_a_quarter_of_the_memory(inner, objective):
    """bfloat16 store chunks kept resident as they are and widened per use = widened up front."""
    xs, ws, init = make_problem(2, 6, 5, [70, 45], seed=13)
    chunked = [[x[s : s + 16].to(torch.bfloat16) for s in range(0, x.shape[0], 16)] for x in xs]
    widened = [[c.to(torch.float64) for c in cs] for cs in chunked]
    kw = dict(solver="pcg", tol=1e-10, compute_dtype=torch.float64, inner_dtype=inner, objective=objective)
    want = solve_router(widened, ws, init, **kw)
    got = solve_router(chunked, ws, init, keep_input_dtype=True, **kw)
    assert torch.equal(got.weight, want.weight) and got.iterations == want.iterations
    kept = TokenChunks(chunked[0], dtype=torch.float64, cache_bytes=1 << 20, keep_input_dtype=True)
    assert [c.dtype for c in kept] == [torch.float64] * 5  # the operator sees the compute dtype
    assert {c.dtype for c in kept.resident_chunks()} == {torch.bfloat16}
    assert sum(c.numel() * c.element_size() for c in kept.resident_chunks()) == 70 * 5 * 2
    # float32 inputs given as a tensor are never narrowed
    full = TokenChunks(xs[0].float(), dtype=torch.float64, keep_input_dtype=True)
    assert {c.dtype for c in full.resident_chunks()} == {torch.float32}


def test_cpu_result_is_bitwise_deterministic():
    xs, ws, init = make_problem(2, 8, 6, [90, 50], seed=5)
    a = solve_router(xs, ws, init, solver="pcg", preconditioner="kronecker", tol=1e-9)
    b = solve_router(xs, ws, init, solver="pcg", preconditioner="kronecker", tol=1e-9)
    assert torch.equal(a.weight, b.weight)
    assert a.iterations == b.iterations


def test_output_keeps_init_dtype_and_float32_inputs_work():
    xs, ws, init = make_problem(2, 4, 8, [200, 150], seed=2)
    ref = dense_solution(xs, ws, 0.9, "full")
    sol = solve_router([x.float() for x in xs], [w.float() for w in ws], init.float(), solver="pcg", tol=1e-6)
    assert sol.weight.dtype == torch.float32
    assert sol.converged
    assert rel(sol.weight.double(), ref) < 1e-4


@pytest.mark.parametrize("solver,pre", [("direct", "none"), ("cg", "none"), ("pcg", "jacobi"), ("pcg", "kronecker"), ("pcg", "expert-block")])
def test_alpha_one_singular_system_gives_the_minimum_change_solution(solver, pre):
    # alpha = 1, full Hessian: w -> w + 1 c^T is a null direction. Every solver must return a finite
    # solution of the consistent system that leaves the expert-mean of init unchanged.
    xs, ws, init = make_problem(2, 5, 4, [60, 40], seed=9)
    a, b = dense_system(xs, ws, 1.0, "full")
    sol = solve_router(xs, ws, init, alpha=1.0, solver=solver, preconditioner=pre, tol=1e-9)
    assert torch.isfinite(sol.weight).all()
    w = sol.weight.reshape(-1)
    assert float((a @ w - b).norm() / b.norm()) < 1e-7
    assert float((sol.weight - init).mean(0).norm()) < 1e-8 * float(init.norm())
    # the shift is invisible to the objective
    shifted = sol.weight + torch.randn(1, 4, dtype=torch.float64)
    assert abs(exact_kl(xs, ws, shifted) - exact_kl(xs, ws, sol.weight)) < 1e-12


def test_null_space_in_init_does_not_break_any_solver():
    xs, ws, init = make_problem(2, 4, 3, [40, 40], seed=4)
    shifted = init + 50.0 * torch.ones(4, 1, dtype=torch.float64) * torch.randn(1, 3, dtype=torch.float64)
    for solver, pre in [("direct", "none"), ("cg", "none"), ("pcg", "jacobi"), ("pcg", "kronecker"), ("pcg", "expert-block")]:
        sol = solve_router(xs, ws, shifted, solver=solver, preconditioner=pre, tol=1e-9)
        assert torch.isfinite(sol.weight).all() and sol.converged


def test_dead_input_coordinate_is_left_alone():
    xs, ws, init = make_problem(2, 4, 5, [40, 40], seed=8)
    for x in xs:
        x[:, 2] = 0.0
    for solver, pre in [("direct", "none"), ("pcg", "jacobi"), ("pcg", "kronecker"), ("pcg", "expert-block")]:
        sol = solve_router(xs, ws, init, solver=solver, preconditioner=pre, tol=1e-9)
        assert torch.isfinite(sol.weight).all()
        assert torch.allclose(sol.weight[:, 2], init[:, 2])


def test_calibration_beats_weight_averaging_on_kl():
    xs, ws, init = make_problem(2, 8, 6, [200, 200], seed=1, spread=1.5)
    sol = solve_router(xs, ws, init, hessian="full", solver="pcg", tol=1e-8)
    assert sum(sol.kl_after) < 0.8 * sum(sol.kl_before)
    assert abs(sum(sol.kl_before) - exact_kl(xs, ws, init)) < 1e-12
    assert abs(sum(sol.kl_after) - exact_kl(xs, ws, sol.weight)) < 1e-12


def test_auto_picks_direct_when_small_and_pcg_otherwise():
    xs, ws, init = make_problem(1, 3, 4, [30], seed=0)
    assert solve_router(xs, ws, init, solver="auto").solver == "direct"
    assert solve_router(xs, ws, init, solver="auto", direct_max_size=4).solver == "pcg"


def test_direct_refuses_a_system_too_large_to_materialise():
    k, d = 64, 2048  # OLMoE's router: (K d)^2 float64 = 128 GiB
    x = torch.randn(4, d)
    w = torch.randn(k, d)
    with pytest.raises(ValueError, match=r"solver='direct' would materialise a \(131072\)\^2"):
        solve_router([x], [w], w, solver="direct")


def test_bad_arguments_are_rejected():
    xs, ws, init = make_problem(2, 3, 4, [10, 10])
    with pytest.raises(ValueError, match="alpha"):
        solve_router(xs, ws, init, alpha=0.0)
    with pytest.raises(ValueError, match="hessian"):
        solve_router(xs, ws, init, hessian="fisher")
    with pytest.raises(ValueError, match="one input set per source"):
        solve_router(xs[:1], ws, init)
    with pytest.raises(ValueError, match="width"):
        solve_router([x[:, :3] for x in xs], ws, init)
