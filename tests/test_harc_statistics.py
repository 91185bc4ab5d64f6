"""TaskStatistics: values, HDF5 round trip, alpha-independent reuse, metrics helpers."""

from __future__ import annotations

import pytest
import torch

from harc_hpc.io.statistics import load_statistics, save_statistics
from harc_hpc.math import compute_task_statistics, router_kl, solve_router, topk_mismatch
from harc_reference import dense_sigma, make_problem


def test_statistics_match_dense_sigma():
    xs, ws, init = make_problem(1, 5, 4, [37], seed=3)
    s = compute_task_statistics(xs[0], ws[0], init, hessian="full", top_k=2, input_gram=True, chunk_tokens=10)
    sigma = dense_sigma(xs[0], ws[0], "full")
    assert s.num_tokens == 37
    assert torch.allclose(s.sigma_diag.reshape(-1), torch.diag(sigma), rtol=1e-12, atol=0)
    assert torch.allclose(s.sigma_w.reshape(-1), sigma @ ws[0].reshape(-1), rtol=1e-10, atol=1e-14)
    assert torch.allclose(s.input_gram, xs[0].T @ xs[0] / 37, rtol=1e-12)
    r = torch.softmax(xs[0] @ ws[0].T, 1)
    assert torch.allclose(s.hessian_mean, (torch.diag_embed(r) - r[:, :, None] * r[:, None, :]).mean(0), atol=1e-15)
    assert s.kl == pytest.approx(router_kl(xs[0], ws[0], init), rel=1e-12)
    assert s.topk_mismatch == pytest.approx(topk_mismatch(xs[0], ws[0], init, 2))


def test_hdf5_round_trip(tmp_path):
    xs, ws, init = make_problem(1, 3, 4, [20], seed=1)
    s = compute_task_statistics(xs[0], ws[0], init, top_k=1)
    save_statistics(s, tmp_path / "s.h5")
    t = load_statistics(tmp_path / "s.h5")
    for name in ("sigma_diag", "sigma_w", "hessian_mean"):
        assert torch.equal(getattr(s, name), getattr(t, name))
    assert (t.num_tokens, t.hessian, t.kl, t.topk_mismatch, t.top_k, t.input_gram) == (
        s.num_tokens, s.hessian, s.kl, s.topk_mismatch, s.top_k, None)
    assert t.source_digest == s.source_digest


@pytest.mark.parametrize("alpha", [0.5, 0.9, 1.0])
def test_saved_statistics_are_reused_for_any_alpha(tmp_path, alpha):
    xs, ws, init = make_problem(2, 4, 5, [40, 25], seed=2)
    paths = []
    for i in range(2):
        save_statistics(compute_task_statistics(xs[i], ws[i], init, hessian="diag"), tmp_path / f"{i}.h5")
        paths.append(tmp_path / f"{i}.h5")
    stats = [load_statistics(p) for p in paths]
    fresh = solve_router(xs, ws, init, alpha=alpha, hessian="diag", solver="direct")
    reused = solve_router(xs, ws, init, alpha=alpha, hessian="diag", solver="direct", statistics=stats)
    assert torch.allclose(reused.weight, fresh.weight, rtol=1e-12, atol=1e-13)
    assert reused.kl_before == pytest.approx(fresh.kl_before, rel=1e-12)


def test_statistics_of_another_router_or_hessian_are_refused():
    xs, ws, init = make_problem(2, 4, 5, [40, 25], seed=2)
    stats = [compute_task_statistics(x, w, init) for x, w in zip(xs, ws)]
    with pytest.raises(ValueError, match="another source router"):
        solve_router(xs, [ws[1], ws[0]], init, statistics=stats)
    with pytest.raises(ValueError, match="hessian"):
        solve_router(xs, ws, init, hessian="diag", statistics=stats)
    with pytest.raises(ValueError, match="tokens"):
        solve_router([xs[0][:10], xs[1]], ws, init, statistics=stats)


def test_metrics_helpers():
    x = torch.randn(50, 6, dtype=torch.float64)
    w = torch.randn(4, 6, dtype=torch.float64)
    assert router_kl(x, w, w) == pytest.approx(0.0, abs=1e-15)
    assert topk_mismatch(x, w, w, 2) == 0.0
    assert topk_mismatch(x, w, -w, 2) == 1.0  # top-2 of 4 and bottom-2 of 4 never meet
    chunks = [x[:13], x[13:]]
    assert router_kl(chunks, w, 0.5 * w) == pytest.approx(router_kl(x, w, 0.5 * w), rel=1e-12)


def test_experts_no_token_reaches_are_counted_and_named(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(300, 8, dtype=torch.float64)
    x[:, 0] = 3.0  # a constant feature, like a bias
    w = torch.randn(5, 8, dtype=torch.float64)
    w[:, 0] = 0.0
    w[3, 0] = -100.0  # expert 3 is never in the top-2
    s = compute_task_statistics(x, w, w.clone() * 0.5, top_k=2)
    assert s.unrouted_experts() == [3]
    assert int(s.expert_tokens.sum()) == 300 * 2
    picked = torch.bincount(torch.topk(x @ w.T, 2, dim=1).indices.flatten(), minlength=5)
    assert torch.equal(s.expert_tokens, picked)
    assert s.unrouted_experts() == [int(e) for e in (picked == 0).nonzero().flatten()]
    save_statistics(s, tmp_path / "s.h5")
    assert torch.equal(load_statistics(tmp_path / "s.h5").expert_tokens, s.expert_tokens)
    assert compute_task_statistics(x, w, w.clone(), top_k=None).unrouted_experts() == []
