"""Merge methods on hand-computed small cases, parameter validation, presets, determinism."""

from __future__ import annotations

import pytest
import torch

from harc_hpc.merge import (METHODS, MergeConfigError, MergeContext, MergeUnit, Piece, get_method,
                           resolve_settings)
from harc_hpc.merge._task_vectors import _lean_magnitude_merge as _LEAN
from harc_hpc.merge._task_vectors import magnitude_sparsify, random_drop
from harc_hpc.merge.wudi import wudi_solve

SRC = ["a", "b"]


def unit(shape=(4,), name="t.weight", role="linear"):
    n = 1
    for s in shape:
        n *= s
    return MergeUnit(name, tuple(shape), (Piece(name, 0, n, tuple(shape)),), role)


def run(method, params, base, sources, names=SRC, u=None, seed=0):
    m, p = resolve_settings(method, None, params, names)
    u = u or unit(tuple(sources[0].shape))
    return m.merge(base, sources, u, p, names, MergeContext(seed=seed))


T = torch.tensor


def test_registry_has_all_methods():
    assert set(METHODS) == {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "wudi", "regmean",
                            "regmean_plusplus", "fisher"}
    with pytest.raises(MergeConfigError, match="available"):
        get_method("slerp")


def test_linear_hand_computed():
    a, b = T([1.0, 2.0]), T([3.0, 6.0])
    assert torch.equal(run("linear", {"weights": [1, 3]}, None, [a, b]), T([2.5, 5.0]))
    assert torch.equal(run("linear", {"weights": [1, 3], "normalize": False}, None, [a, b]),
                       T([10.0, 20.0]))
    assert torch.equal(run("linear", {}, None, [a, b]), T([2.0, 4.0]))
    assert torch.equal(run("linear", {"weights": {"b": 1, "a": 0}}, None, [a, b]), b)


def test_task_arithmetic_hand_computed():
    base = T([1.0, 1.0])
    out = run("task_arithmetic", {"weights": [1, 0.5], "lambda": 2}, base, [T([2.0, 3.0]), T([0.0, 5.0])])
    assert torch.equal(out, T([2.0, 9.0]))


def test_ties_hand_computed():
    base = torch.ones(4)
    a = base + T([3.0, -1.0, 2.0, 0.5])
    b = base + T([-1.0, -2.0, 1.0, 4.0])
    # density 0.75 keeps 3 of 4: a -> [3,-1,2,0], b -> [-1,-2,0,4]; weighted (1,3): b -> [-3,-6,0,12]
    # sum [0,-7,2,12] elects [+,-,+,+]; agreeing: a{0,1,2}, b{1,3}
    # mixed [3,-7,2,12] / divisor [1,4,1,3] = [3,-1.75,2,4]
    out = run("ties", {"density": 0.75, "weights": [1, 3]}, base, [a, b])
    assert torch.equal(out, base + T([3.0, -1.75, 2.0, 4.0]))
    out = run("ties", {"density": 0.75, "weights": [1, 3], "lambda": 0.5}, base, [a, b])
    assert torch.equal(out, base + 0.5 * T([3.0, -1.75, 2.0, 4.0]))
    out = run("ties", {"density": 0.75, "weights": [1, 3], "normalize": False}, base, [a, b])
    assert torch.equal(out, base + T([3.0, -7.0, 2.0, 12.0]))


def test_ties_elects_sign_by_sum_not_count():
    base = torch.zeros(1)
    out = run("ties", {}, base, [T([5.0]), T([-1.0]), T([-1.0])], names=["a", "b", "c"])
    assert torch.equal(out, T([5.0]))  # a majority count would have elected "-"


def test_ties_zero_delta_never_agrees_and_empty_divisor_is_one():
    base = torch.zeros(2)
    out = run("ties", {}, base, [T([0.0, 2.0]), T([0.0, 4.0])])
    assert torch.equal(out, T([0.0, 3.0]))


def test_magnitude_keeps_k_elements():
    x = torch.randn(101, generator=torch.Generator().manual_seed(0))
    kept = magnitude_sparsify(x, 0.3)
    assert int((kept != 0).sum()) == int(0.3 * 101)
    assert kept.abs().min() == 0 and set(kept[kept != 0].tolist()) <= set(x.tolist())
    threshold = kept[kept != 0].abs().min()
    assert (x.abs()[kept == 0] <= threshold).all()
    assert int((magnitude_sparsify(x, 1e-6) != 0).sum()) == 1  # at least one


def _mergekit_literal_gta(base, sources, weights, densities, consensus, normalize, lam):
    """An independent transcription of mergekit 0.1.5's generalized task arithmetic (magnitude)."""
    deltas = []
    for x, d in zip(sources, densities):
        delta = x - base
        if d < 1:
            k = max(1, int(d * delta.numel()))
            mask = torch.zeros(delta.numel(), dtype=delta.dtype)
            mask[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]] = 1
            delta = delta * mask.reshape_as(delta)
        deltas.append(delta)
    deltas = torch.stack(deltas)
    w = torch.tensor(weights, dtype=deltas.dtype).view(-1, *([1] * base.dim()))
    deltas = deltas * w
    if consensus:
        maj = (deltas.sum(0) >= 0).to(deltas.dtype) * 2 - 1
        mask = deltas.sign() == maj
        mixed, div = (deltas * mask).sum(0), (w * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed, div = deltas.sum(0), w.sum(0)
        div[div.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / div
    if lam != 1:
        mixed = mixed * lam
    return (base + mixed).to(base.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_matches_mergekit_semantics_in_compute_dtype(dtype):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 8, 5, generator=g).to(dtype)
    srcs = [(base.float() + 0.1 * torch.randn(6, 8, 5, generator=g)).to(dtype) for _ in range(2)]
    want = _mergekit_literal_gta(base, srcs, [0.4, 0.6], [0.6, 0.6], True, True, 0.7)
    got = run("ties", {"density": 0.6, "weights": [0.4, 0.6], "lambda": 0.7, "ranking": "mergekit"}, base, srcs)
    assert got.dtype == dtype
    assert torch.equal(got, want)
    want = _mergekit_literal_gta(base, srcs, [0.3, 0.9], [1, 1], False, False, 1.0)
    got = run("task_arithmetic", {"weights": [0.3, 0.9]}, base, srcs)
    assert torch.equal(got, want)


def test_ties_threshold_ranking_keeps_the_same_k_and_equals_mergekit_without_ties():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(40, 30, generator=g)
    srcs = [base + 0.1 * torch.randn(40, 30, generator=g) for _ in range(2)]  # float32: no ties at the threshold
    params = {"density": 0.6, "weights": [0.4, 0.6]}
    exact = run("ties", {**params, "ranking": "mergekit"}, base, srcs)
    lean = run("ties", {**params, "ranking": "threshold"}, base, srcs)
    assert torch.equal(exact, lean)
    assert torch.equal(run("ties", params, base, srcs), lean)  # auto: threshold with per_expert
    assert torch.equal(run("ties", {**params, "granularity": "fused"}, base, srcs), exact)  # auto: mergekit
    # with ties at the threshold both keep exactly k elements, possibly other ones among the tied
    tied = torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0, 2.0])
    for ranking in ("argsort", "threshold"):
        kept = magnitude_sparsify(tied, 0.5, ranking=ranking)
        assert int((kept != 0).sum()) == 3 and kept[0] == 3 and kept[5] == 2
    assert torch.equal(magnitude_sparsify(tied, 0.5, ranking="threshold"), torch.tensor([3.0, 1, 0, 0, 0, 2]))
    with pytest.raises(MergeConfigError, match="ranking"):
        resolve_settings("ties", None, {"ranking": "sorted"}, SRC)


def _kthvalue_selection(delta, density):
    n = delta.numel()
    k = max(1, int(density * n))
    w = delta.abs().reshape(-1).float()
    thr = torch.kthvalue(w, n - k + 1).values
    keep = w > thr
    keep[(w == thr).nonzero().squeeze(1)[:k - int(keep.sum())]] = True
    return delta * keep.to(delta.dtype).reshape_as(delta)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_radix_select_equals_kthvalue_selection_across_chunks(dtype, monkeypatch):
    from harc_hpc.merge import _task_vectors

    monkeypatch.setattr(_task_vectors, "SELECT_CHUNK", 1000)  # many chunks, ties spanning them
    g = torch.Generator().manual_seed(3)
    for n in (1, 7, 999, 5000, 23457):
        for density in (0.01, 0.3, 0.6, 0.999):
            d = (0.01 * torch.randn(n, generator=g)).to(dtype)
            if n > 10:
                d[::7] = 0
                d[::5] = d[3]  # a large tied group
            got = magnitude_sparsify(d, density, ranking="threshold")
            assert torch.equal(got, _kthvalue_selection(d, density)), (n, density)
            assert int((got != 0).sum()) <= max(1, int(density * n))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("consensus", [True, False])
def test_chunked_lean_magnitude_merge_is_bit_identical(dtype, consensus, monkeypatch):
    from harc_hpc.merge import _task_vectors as tv

    g = torch.Generator().manual_seed(4)
    base = (0.02 * torch.randn(30011, generator=g)).to(dtype)
    srcs = [(base.float() + 0.002 * torch.randn(30011, generator=g)).to(dtype) for _ in range(3)]
    kw = dict(densities=[0.6, 0.3, 1.0], sparsify="magnitude", consensus=consensus, normalize=True, lam=0.8,
              ranking="threshold")
    whole = tv.task_vector_merge(base, list(srcs), [0.4, 0.6, 0.3], **kw)
    monkeypatch.setattr(tv, "PARALLEL_RANK_MAX_NUMEL", 100)  # the lean path for this "big" tensor
    monkeypatch.setattr(tv, "SELECT_CHUNK", 1000)
    called = []
    monkeypatch.setattr(tv, "_lean_magnitude_merge",
                        lambda *a: called.append(1) or _LEAN(*a))
    inputs = list(srcs)
    lean = tv.task_vector_merge(base, inputs, [0.4, 0.6, 0.3], consume=True, **kw)
    assert called and inputs == [None, None, None]  # consumed as it went
    assert lean.dtype == dtype and torch.equal(lean, whole)


def test_dare_is_seeded_per_unit_and_model():
    base = torch.zeros(1000)
    srcs = [torch.ones(1000), 2 * torch.ones(1000)]
    p = {"density": 0.4, "rescale": "none"}
    one = run("dare_linear", p, base, srcs, u=unit((1000,), "x"))
    again = run("dare_linear", p, base, srcs, u=unit((1000,), "x"))
    other = run("dare_linear", p, base, srcs, u=unit((1000,), "y"))
    reseeded = run("dare_linear", p, base, srcs, u=unit((1000,), "x"), seed=1)
    assert torch.equal(one, again)
    assert not torch.equal(one, other) and not torch.equal(one, reseeded)
    g = MergeContext(seed=0).generator("x", 0)
    kept = (random_drop(torch.ones(100000), 0.4, g, "none") != 0).float().mean()
    assert abs(float(kept) - 0.4) < 0.01


def test_dare_rescale_conventions():
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    g = lambda: MergeContext(seed=3).generator("u", 0)  # noqa: E731
    l1 = random_drop(x, 0.4, g(), "l1")
    inv = random_drop(x, 0.4, g(), "inverse_density")
    raw = random_drop(x, 0.4, g(), "none")
    keep = raw != 0
    assert torch.allclose(l1.abs().sum(), x.abs().sum(), rtol=1e-5)
    assert torch.allclose(inv[keep], x[keep] / 0.4)
    assert torch.equal(raw[keep], x[keep])
    # mergekit's boolean spelling maps onto the named conventions
    _, p = resolve_settings("dare_ties", None, {"rescale": True}, SRC)
    assert p.rescale == "l1"
    _, p = resolve_settings("dare_ties", None, {"rescale": False}, SRC)
    assert p.rescale == "none"


def test_dare_ties_density_one_equals_ties_density_one():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=g)
    srcs = [base + torch.randn(5, 7, generator=g) for _ in range(2)]
    a = run("dare_ties", {"weights": [0.3, 0.7], "normalize": True}, base, srcs)
    b = run("ties", {"weights": [0.3, 0.7]}, base, srcs)
    assert torch.equal(a, b)


def _wudi_autograd(taus, lr, steps):
    m = taus.sum(0).clone().requires_grad_(True)
    opt = torch.optim.Adam([m], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(((m - t) @ t.T).pow(2).sum() / t.pow(2).sum() for t in taus)
        loss.backward()
        opt.step()
    return m.detach()


@pytest.mark.parametrize("shape", [(6, 20), (20, 6)])  # in >> out uses the direct gradient
def test_wudi_matches_autograd_adam(shape):
    g = torch.Generator().manual_seed(0)
    taus = torch.randn(3, *shape, generator=g, dtype=torch.float64).float()
    got = wudi_solve(taus, lr=1e-2, steps=50)
    want = _wudi_autograd(taus, 1e-2, 50)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(wudi_solve(taus, steps=0), taus.sum(0))


def test_wudi_lowers_its_loss_and_takes_base_for_nonlinear():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 12, generator=g)
    srcs = [base + 0.1 * torch.randn(8, 12, generator=g) for _ in range(2)]
    taus = torch.stack([s - base for s in srcs])

    def loss(m):
        return float(sum(((m - t) @ t.T).pow(2).sum() / t.pow(2).sum() for t in taus))

    merged = run("wudi", {"lr": 1e-3, "steps": 100}, base, srcs)
    assert loss(merged - base) < loss(taus.sum(0))
    norm = run("wudi", {}, base[0], [s[0] for s in srcs], u=unit((12,), "model.norm.weight", "norm"))
    assert torch.equal(norm, base[0])
    emb_u = unit((8, 12), "model.embed_tokens.weight", "embedding")
    assert torch.equal(run("wudi", {}, base, srcs, u=emb_u), base)
    mean = run("wudi", {"nonlinear": "mean"}, base, srcs, u=emb_u)
    torch.testing.assert_close(mean, base + taus.mean(0))


def test_parameter_validation_messages():
    with pytest.raises(MergeConfigError, match="densty"):
        resolve_settings("ties", None, {"densty": 0.5}, SRC)
    with pytest.raises(MergeConfigError, match="density"):
        resolve_settings("ties", None, {"density": 1.5}, SRC)
    with pytest.raises(MergeConfigError, match="3 values for 2"):
        resolve_settings("linear", None, {"weights": [1, 2, 3]}, SRC)
    with pytest.raises(MergeConfigError, match="missing"):
        resolve_settings("linear", None, {"weights": {"a": 1}}, SRC)
    with pytest.raises(MergeConfigError, match="granularity"):
        resolve_settings("ties", None, {"granularity": "layer"}, SRC)
    with pytest.raises(MergeConfigError, match="steps"):
        resolve_settings("wudi", None, {"steps": -1}, SRC)


def test_presets():
    m, p = resolve_settings("linear", "ties-paper", {}, SRC, method_explicit=False)
    assert m.name == "ties" and p.density == 0.6 and p.weights == [0.4, 0.6]
    m, p = resolve_settings(None, "dare-paper", {"density": 0.5}, SRC)
    assert m.name == "dare_ties" and p.density == 0.5 and p.weights == [0.3, 0.7]
    m, p = resolve_settings(None, "wudi-paper", {}, SRC)
    assert m.name == "wudi" and p.lr == 1e-5 and p.steps == 300
    with pytest.raises(MergeConfigError, match="for method 'ties'"):
        resolve_settings("linear", "ties-paper", {}, SRC, method_explicit=True)
    with pytest.raises(MergeConfigError, match="unknown merge preset"):
        resolve_settings(None, "nope", {}, SRC)
    with pytest.raises(MergeConfigError, match="2 values for 3"):
        resolve_settings(None, "ties-paper", {}, ["a", "b", "c"])


def test_threshold_ranking_keeps_the_same_top_k():
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(997, generator=g), (torch.randn(5000, generator=g) * 4).round()):
        for density in (0.1, 0.37, 0.6, 0.99):
            a = magnitude_sparsify(x, density, ranking="argsort")
            t = magnitude_sparsify(x, density, ranking="threshold")
            k = max(1, int(density * x.numel()))
            assert int((t != 0).sum()) == int((a != 0).sum()) == int((x[t != 0] != 0).sum())
            assert int((t != 0).sum()) <= k
            # same multiset of kept magnitudes: only which tied elements are kept may differ
            assert torch.equal(t.abs().sort().values, a.abs().sort().values)
