"""RegMean against its definition: the minimiser of sum_i ||X_i W^T - X_i W_i^T||^2 (regularised
Grams), computed here the slow, obvious way (a dense least-squares problem over every output)."""

from __future__ import annotations

import pytest
import torch

from harc_hpc.math.regmean import GramSum, gram, regmean_merge, regularized


def problem(sources=3, n=(40, 25, 60), d_in=6, d_out=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n[i], d_in, generator=g, dtype=torch.float64) for i in range(sources)]
    ws = [torch.randn(d_out, d_in, generator=g, dtype=torch.float64) for _ in range(sources)]
    return xs, ws


def reference(xs, ws, alpha):
    """argmin_W sum_i ||X_i W^T - X_i W_i^T||^2 with G~_i: stack the normal equations of every output
    row and solve them densely, one output at a time (no shared factorisation, no Cholesky)."""
    d_out, d_in = ws[0].shape
    out = torch.empty(d_out, d_in, dtype=torch.float64)
    for o in range(d_out):
        a = torch.zeros(d_in, d_in, dtype=torch.float64)
        b = torch.zeros(d_in, dtype=torch.float64)
        for x, w in zip(xs, ws):
            g = torch.zeros(d_in, d_in, dtype=torch.float64)
            for row in x:  # per-token outer products
                g += torch.outer(row, row)
            g_reg = alpha * g + (1 - alpha) * torch.diag(torch.diag(g))
            a += g_reg
            b += g_reg @ w[o]
        out[o] = torch.linalg.solve(a, b)
    return out


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.5, 0.0])
def test_regmean_equals_the_dense_least_squares_reference(alpha):
    xs, ws = problem()
    grams = [gram([x[:7], x[7:]])[0] for x in xs]  # chunked accumulation
    sol = regmean_merge(grams, ws, alpha)
    want = reference(xs, ws, alpha)
    assert sol.method == "cholesky" and sol.ridge == 0.0
    assert float((sol.weight - want).norm() / want.norm()) < 1e-10
    if alpha == 1.0:  # the unregularised fit is the least-squares solution of the stacked problem
        x = torch.cat(xs)
        y = torch.cat([xi @ wi.T for xi, wi in zip(xs, ws)])
        lstsq = torch.linalg.lstsq(x, y).solution.T
        assert float((sol.weight - lstsq).norm() / lstsq.norm()) < 1e-10


def test_equal_grams_give_the_plain_average_and_diagonal_grams_a_channel_weighted_one():
    xs, ws = problem()
    g = gram([xs[0]])[0]
    avg = regmean_merge([g, g, g], ws, alpha=0.9).weight
    assert torch.allclose(avg, sum(ws) / 3, atol=1e-12)
    # alpha 0: per input channel c, sum_i G_i[c, c] W_i[:, c] / sum_i G_i[c, c]
    grams = [gram([x])[0] for x in xs]
    diag = torch.stack([gi.diagonal() for gi in grams])  # (sources, in)
    want = sum(w * dg for w, dg in zip(ws, diag)) / diag.sum(0)
    assert torch.allclose(regmean_merge(grams, ws, alpha=0.0).weight, want, atol=1e-12)


def test_sources_are_added_one_at_a_time_in_constant_memory():
    xs, ws = problem()
    acc = GramSum(0.9)
    for x, w in zip(xs, ws):
        acc.add(gram([x])[0], w)
    assert acc.sources == 3 and acc.lhs.shape == (6, 6) and acc.rhs.shape == (6, 4)
    assert torch.allclose(acc.solve().weight, reference(xs, ws, 0.9), atol=1e-10)


def test_directions_no_source_reaches_fall_back_by_a_stated_ridge():
    """An input channel that is zero in every source's inputs (an expert's dead channel): the Gram is
    singular; the ridge rule keeps the fallback (the average) there and fits the data elsewhere."""
    xs, ws = problem()
    xs = [x.clone() for x in xs]
    for x in xs:
        x[:, 2] = 0.0
    grams = [gram([x])[0] for x in xs]
    avg = sum(ws) / 3
    sol = regmean_merge(grams, ws, 0.9, fallback=avg)
    assert sol.method.startswith("cholesky+ridge") and sol.ridge > 0 and sol.uncovered_channels == 1
    assert torch.allclose(sol.weight[:, 2], avg[:, 2], atol=1e-8)
    keep = [c for c in range(6) if c != 2]
    want = reference([x[:, keep] for x in xs], [w[:, keep] for w in ws], 0.9)
    assert float((sol.weight[:, keep] - want).norm() / want.norm()) < 1e-5
    # a source with no inputs at all for this weight (an expert it never routes to) adds nothing
    zero = torch.zeros(6, 6, dtype=torch.float64)
    only_two = regmean_merge([gram([xs[0]])[0] + 0, zero, gram([xs[2]])[0]], ws, 0.9, fallback=avg)
    sub = regmean_merge([gram([xs[0]])[0], gram([xs[2]])[0]], [ws[0], ws[2]], 0.9, fallback=avg)
    assert torch.allclose(only_two.weight, sub.weight, atol=1e-12)


def test_bad_inputs_say_what_is_wrong():
    xs, ws = problem()
    g = gram([xs[0]])[0]
    with pytest.raises(ValueError, match="does not take 6 inputs"):
        regmean_merge([g], [torch.zeros(4, 5)])
    with pytest.raises(ValueError, match="one Gram per weight"):
        regmean_merge([g, g], [ws[0]])
    with pytest.raises(ValueError, match="every Gram is zero"):
        regmean_merge([torch.zeros(6, 6)], [ws[0]])
    with pytest.raises(ValueError, match="alpha must be in"):
        regularized(g, 1.5)
    with pytest.raises(ValueError, match="no inputs"):
        gram([])
