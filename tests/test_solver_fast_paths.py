"""The solver's fast paths against slow, obviously correct references on small shapes."""

from __future__ import annotations

import pytest
import torch

from harc_hpc.math import TaskCurvature, TokenChunks
from harc_reference import make_problem


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("hessian", ["full", "diag", "identity"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lowered_operator_approximates_the_exact_one(hessian, dtype):
    xs, ws, init = make_problem(2, 8, 24, [300, 170], seed=3)
    w = torch.randn(8, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for x, wi in zip(xs, ws):
        cv = TaskCurvature(TokenChunks(x.float(), chunk_tokens=128), wi, hessian)
        exact = TaskCurvature(TokenChunks(x.double(), chunk_tokens=128), wi, hessian).matvec(w)
        low = cv.lowered(dtype).matvec(w)
        assert low.dtype == torch.float64 and low.shape == w.shape
        assert rel(low, exact) < 2e-2, rel(low, exact)


def test_lowered_full_hessian_ignores_a_shift_shared_by_all_experts_exactly():
    # H 1 = 0: Sigma (W + 1 c^T) = Sigma W. The lowered operator centres W over the experts before
    # rounding it, so a large shared shift adds no rounding noise at all
    xs, ws, init = make_problem(1, 8, 24, [300], seed=4)
    curvature = TaskCurvature(TokenChunks(xs[0].float(), chunk_tokens=100), ws[0], "full")
    low = curvature.lowered(torch.bfloat16)
    exact = TaskCurvature(TokenChunks(xs[0].double(), chunk_tokens=100), ws[0], "full")
    w = torch.randn(8, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # integers: the expert mean of 8 equal rows is then exact in float64
    shift = torch.round(1e3 * torch.randn(1, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(low.matvec(torch.zeros_like(w) + shift), torch.zeros_like(w))
    # rounded as it is, the shift (1000x the rest) would swamp W's own logits
    assert rel(low.matvec(w + shift), exact.matvec(w)) < 2e-2
