"""The expert-block preconditioner (harc_hpc.math.cg.ExpertBlockPreconditioner) against dense
constructions: the token selection, the Woodbury block solve, the balancing coarse correction."""

from __future__ import annotations

import math

import pytest
import torch

from harc_hpc.math import TaskCurvature, TokenChunks, solve_router
from harc_hpc.math.cg import ExpertBlockPreconditioner
from harc_hpc.math.solver import HarcSystem, sum_in_order
from harc_reference import dense_system, make_problem

F64 = torch.float64


def curvatures(xs, ws, hessian="full", chunk=7):
    return [TaskCurvature(TokenChunks(x, dim=x.shape[1], dtype=F64, chunk_tokens=chunk), w, hessian)
            for x, w in zip(xs, ws)]


def test_heaviest_token_rows_are_the_top_m_tokens_per_expert_ties_to_the_earlier():
    xs, ws, _ = make_problem(1, 5, 4, [41], seed=3)
    x = xs[0]
    x[30] = x[3]  # token 30 repeats token 3: equal weights for every expert, token 3 must win
    cv = curvatures(xs, ws)[0]
    m = 6
    rows = cv.heaviest_token_rows(m)
    p = torch.softmax(x @ ws[0].T, dim=1)
    h = p - p * p
    assert rows.shape == (5, m, 4)
    for k in range(5):
        # per-token loop: sort by (weight desc, index asc), keep m, back in index order
        order = sorted(range(x.shape[0]), key=lambda t: (-float(h[t, k]), t))[:m]
        expect = torch.stack([x[t] * math.sqrt(float(h[t, k]) / x.shape[0]) for t in sorted(order)])
        assert torch.allclose(rows[k], expect, rtol=1e-12, atol=1e-15), k
        if 3 in order or 30 in order:
            assert 3 in order
    # more than the task has: every token, once
    all_rows = cv.heaviest_token_rows(1000)
    assert all_rows.shape == (5, 41, 4)
    gram = torch.einsum("kmd,kme->kde", all_rows, all_rows)
    for k in range(5):
        assert torch.allclose(gram[k], (x * h[:, k:k + 1]).T @ x / x.shape[0], rtol=1e-10, atol=1e-14)


def _dense_blocks(a, k, d):
    out = torch.zeros_like(a)
    for e in range(k):
        out[e * d:(e + 1) * d, e * d:(e + 1) * d] = a[e * d:(e + 1) * d, e * d:(e + 1) * d]
    return out


@pytest.mark.parametrize("hessian", ["full", "diag"])
def test_with_every_token_the_blocks_are_exact_and_the_coarse_correction_is_the_balancing_formula(hessian):
    k, d, alpha = 4, 3, 0.9
    xs, ws, _ = make_problem(2, k, d, [30, 45], seed=5)
    cvs = curvatures(xs, ws, hessian)
    diagonal = sum_in_order(c.diagonal() for c in cvs)
    system = HarcSystem(cvs, diagonal, alpha)
    a, _ = dense_system(xs, ws, alpha, hessian)
    assert torch.allclose(system.dense(), a, rtol=1e-10, atol=1e-13)
    rows = torch.cat([c.heaviest_token_rows(100) for c in cvs], dim=1)
    coarse = hessian == "full"
    pre = ExpertBlockPreconditioner(rows, diagonal, alpha, 1 - alpha, coarse=coarse)
    r = torch.randn(k, d, dtype=F64, generator=torch.Generator().manual_seed(0))
    m_inv = torch.linalg.inv(_dense_blocks(a, k, d))
    assert torch.allclose(pre.blocks_solve(r).reshape(-1), m_inv @ r.reshape(-1), rtol=1e-9, atol=1e-12)
    if coarse:
        z = torch.cat([torch.eye(d, dtype=F64)] * k)  # w = 1 c^T: every expert moves by c
        assert float((a @ z).norm()) > 0 and torch.allclose(a @ z, (1 - alpha) * torch.diag(diagonal.reshape(-1)) @ z,
                                                             rtol=1e-9, atol=1e-12)  # Sigma_i Z = 0
        q = z @ torch.linalg.inv(z.T @ a @ z) @ z.T
        eye = torch.eye(k * d, dtype=F64)
        p = (eye - q @ a) @ m_inv @ (eye - a @ q) + q
        assert torch.allclose(pre(r).reshape(-1), p @ r.reshape(-1), rtol=1e-9, atol=1e-12)
        # symmetric positive definite, as PCG needs
        assert torch.allclose(p, p.T, rtol=1e-9, atol=1e-12)
        assert float(torch.linalg.eigvalsh((p + p.T) / 2).min()) > 0
    else:  # the diagonal Hessian's system is block diagonal: the preconditioner is its inverse
        assert torch.allclose(pre(r).reshape(-1), torch.linalg.solve(a, r.reshape(-1)), rtol=1e-9, atol=1e-12)


def _layer(k, d, tokens, seed):
    # inputs with correlated channels, routers with a few dominant experts per token: the regime
    # where Jacobi leaves the within-expert correlations and the shift directions to CG
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen, dtype=F64) / math.sqrt(d)
    spectrum = torch.arange(1, d + 1, dtype=F64) ** -0.7 * 3
    xs = [(torch.randn(n, d, generator=gen, dtype=F64) * spectrum) @ mix + 0.5 * torch.randn(d, generator=gen, dtype=F64)
          for n in tokens]
    base = 2.5 * torch.randn(k, d, generator=gen, dtype=F64)
    ws = [base + 1.5 * torch.randn(k, d, generator=gen, dtype=F64) for _ in tokens]
    return xs, ws, sum(ws) / len(ws)


def test_fewer_iterations_than_jacobi_and_kronecker_for_the_same_answer():
    xs, ws, init = _layer(16, 48, [1500, 1200], seed=1)
    runs = {pre: solve_router(xs, ws, init, alpha=0.9, solver="pcg", preconditioner=pre, tol=1e-8, max_iter=3000,
                              expert_block_tokens=64)
            for pre in ("jacobi", "kronecker", "expert-block")}
    assert all(r.converged for r in runs.values())
    ref = runs["jacobi"].weight
    assert float((runs["expert-block"].weight - ref).norm() / ref.norm()) < 1e-6
    its = {p: r.iterations for p, r in runs.items()}
    assert its["expert-block"] * 2 < its["jacobi"], its
    assert its["expert-block"] < its["kronecker"], its
