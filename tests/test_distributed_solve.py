"""Data-parallel solve_router (process_group=...): gloo processes on CPU, each holding a shard of every
task's tokens, give the one-process answer, the same on every rank; empty shards included."""

from __future__ import annotations

import datetime
import itertools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harc_hpc.math import compute_task_statistics, solve_router
from harc_hpc.math.distributed import LOCAL, ProcessGroupReducer, as_reducer, shard_rows, take_shard

K, D = 4, 6
TOL = 1e-6  # asserted relative (Frobenius) agreement with the one-process solve


def make_problem(seed: int, dtype: torch.dtype, tokens=(300, 170)):
    gen = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(n, D, generator=gen) * (1.0 + 0.5 * i) + 0.3 * torch.randn(D, generator=gen)).to(dtype)
          for i, n in enumerate(tokens)]
    sources = [torch.randn(K, D, generator=gen, dtype=torch.float64) for _ in tokens]
    init = sum(sources) / len(sources)
    return xs, sources, init


def balanced(tokens, world):
    return [[shard_rows(n, r, world) for n in tokens] for r in range(world)]


def cases_world2():
    out = {}
    tokens = (300, 170)
    # task 0 split unevenly by hand, task 1 by shard_rows
    splits = [[(0, 97), shard_rows(170, 0, 2)], [(97, 300), shard_rows(170, 1, 2)]]
    for hessian, pre, objective, stats in itertools.product(("full", "diag"), ("jacobi", "kronecker", "expert-block"),
                                                             ("quadratic", "kl"), (False, True)):
        name = f"{hessian}-{pre}-{objective}-{'stats' if stats else 'nostats'}"
        out[name] = dict(seed=1, dtype=torch.float64, tokens=tokens, splits=splits, stats=stats,
                         kwargs=dict(hessian=hessian, preconditioner=pre, objective=objective, solver="pcg",
                                     tol=1e-10, kl_tol=1e-9, chunk_tokens=64))
    extra = {
        "cg-alpha1": dict(solver="cg", alpha=1.0, hessian="full"),
        "direct": dict(solver="direct"),
        "direct-kl": dict(solver="direct", objective="kl", kl_tol=1e-9),
        "identity": dict(hessian="identity", preconditioner="kronecker"),
        "kronecker-strided": dict(preconditioner="kronecker", kronecker_tokens=50),
        # fewer heaviest tokens than a shard holds: the global selection must not depend on the sharding
        "expert-block-few-tokens": dict(preconditioner="expert-block", expert_block_tokens=7),
        "expert-block-alpha1": dict(preconditioner="expert-block", alpha=1.0),
        "bf16-refine": dict(inner_dtype=torch.bfloat16),
    }
    for name, kw in extra.items():
        out[name] = dict(seed=2, dtype=torch.float64, tokens=tokens, splits=balanced(tokens, 2), stats=False,
                         kwargs={"tol": 1e-10, **kw})
    # float32 GEMMs: re-chunking alone moves the one-process answer by ~eps32 * cond (1e-6 at alpha 0.9
    # here), so this case uses a better conditioned alpha to keep the comparison meaningful at TOL
    out["float32"] = dict(seed=3, dtype=torch.float32, tokens=tokens, splits=balanced(tokens, 2), stats=False,
                          kwargs=dict(tol=1e-9, alpha=0.5))
    return out


def cases_world3():
    # task 1 has 2 tokens for 3 ranks: rank 2 holds none of it; "rank2-idle" leaves rank 2 with no token at all
    tokens = (300, 2)
    holes = [[(0, 0), shard_rows(2, 0, 3)], [(0, 120), shard_rows(2, 1, 3)], [(120, 300), shard_rows(2, 2, 3)]]
    idle = [[(0, 150), (0, 1)], [(150, 300), (1, 2)], [(300, 300), (2, 2)]]
    out = {}
    for name, splits, kw, stats in [
        ("holes-jacobi-quadratic", holes, dict(preconditioner="jacobi"), False),
        ("holes-kronecker-kl-stats", holes, dict(preconditioner="kronecker", objective="kl", kl_tol=1e-9), True),
        ("holes-expert-block", holes, dict(preconditioner="expert-block", expert_block_tokens=5), False),
        ("idle-jacobi-kl", idle, dict(objective="kl", hessian="diag", kl_tol=1e-9), False),
        ("idle-kronecker-stats", idle, dict(preconditioner="kronecker"), True),
    ]:
        out[name] = dict(seed=4, dtype=torch.float64, tokens=tokens, splits=splits, stats=stats,
                         kwargs={"tol": 1e-10, "chunk_tokens": 64, **kw})
    return out


def task_statistics(xs, sources, init, hessian, process_group=None):
    return [compute_task_statistics(x, w, init, hessian, top_k=2, input_gram=True, chunk_tokens=64,
                                    process_group=process_group) for x, w in zip(xs, sources)]


def run_case(case, rank=None, group=None):
    xs, sources, init = make_problem(case["seed"], case["dtype"], case["tokens"])
    if rank is not None:
        xs = [x[lo:hi] for x, (lo, hi) in zip(xs, case["splits"][rank])]
    hessian = case["kwargs"].get("hessian", "full")
    stats = task_statistics(xs, sources, init, hessian, group) if case["stats"] else None
    sol = solve_router(xs, sources, init, statistics=stats, process_group=group, **case["kwargs"])
    return {"weight": sol.weight, "kl_before": sol.kl_before, "kl_after": sol.kl_after,
            "converged": sol.converged, "stats": stats}


def _worker(rank, world, init_file, cases, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {name: run_case(case, rank, dist.group.WORLD) for name, case in cases.items()}
        xs, sources, init = make_problem(1, torch.float64)
        results["_statistics"] = task_statistics([take_shard(x, rank, world) for x in xs], sources, init, "full",
                                                 dist.group.WORLD)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(world, cases, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "rendezvous"), cases, str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]  # written by the workers


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def centred(w):
    return w - w.mean(dim=0, keepdim=True)


def check_statistics(got, want):
    for g, w in zip(got, want):
        assert g.num_tokens == w.num_tokens and g.hessian == w.hessian and g.source_digest == w.source_digest
        for field in ("sigma_diag", "sigma_w", "hessian_mean", "input_gram"):
            assert rel(getattr(g, field), getattr(w, field)) <= 1e-12, field
        assert g.kl == pytest.approx(w.kl, rel=1e-12)
        assert g.topk_mismatch == pytest.approx(w.topk_mismatch, rel=1e-12)
        assert torch.equal(g.expert_tokens, w.expert_tokens)


def check_world(world, cases, tmp_path):
    ranks = spawn(world, cases, tmp_path)
    for name, case in cases.items():
        want = run_case(case)
        got = ranks[0][name]
        for other in ranks[1:]:
            assert torch.equal(other[name]["weight"], got["weight"]), f"{name}: ranks disagree"
        assert got["weight"].dtype == want["weight"].dtype
        kw = case["kwargs"]
        if kw.get("objective") == "kl" and kw.get("hessian", "full") == "full":
            # the exact KL is flat along W -> W + 1 c^T (no softmax changes) and nothing pins that
            # component but the damped Newton path, which a CG iteration more or less moves: equal
            # routers modulo the shift, and close as matrices
            assert rel(centred(got["weight"]), centred(want["weight"])) <= 1e-9, name
            assert rel(got["weight"], want["weight"]) <= 1e-5, name
        else:
            assert rel(got["weight"], want["weight"]) <= TOL, name
        assert got["converged"] == want["converged"], name
        assert got["kl_before"] == pytest.approx(want["kl_before"], rel=1e-9), name
        assert got["kl_after"] == pytest.approx(want["kl_after"], rel=1e-6), name
        if case["stats"]:
            check_statistics(got["stats"], want["stats"])
    xs, sources, init = make_problem(1, torch.float64)
    for r in range(world):
        check_statistics(ranks[r]["_statistics"], task_statistics(xs, sources, init, "full"))


def test_two_processes_match_one(tmp_path):
    check_world(2, cases_world2(), tmp_path)


def test_three_processes_with_empty_shards_match_one(tmp_path):
    check_world(3, cases_world3(), tmp_path)


def test_shard_rows_cover_rows_in_order():
    for n, world in [(10, 3), (7, 7), (2, 3), (0, 2), (5, 1), (1000, 16)]:
        spans = [shard_rows(n, r, world) for r in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        sizes = [hi - lo for lo, hi in spans]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert [shard_rows(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [shard_rows(2, r, 3) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]
    x = torch.arange(12.0).reshape(6, 2)
    assert torch.equal(torch.cat([take_shard(x, r, 4) for r in range(4)]), x)
    assert take_shard(x[:1], 3, 4).shape == (0, 2)
    for bad in [(5, 3, 3), (5, -1, 2), (5, 0, 0), (-1, 0, 1)]:
        with pytest.raises(ValueError):
            shard_rows(bad[0], bad[1], bad[2])


def test_no_group_is_the_identity_reducer():
    assert as_reducer(None) is LOCAL and not LOCAL.distributed
    t = torch.ones(3)
    assert LOCAL.sum(t) is t and LOCAL.sum_int(4) == 4 and LOCAL.sum_float(0.5) == 0.5
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="not initialised"):
            ProcessGroupReducer()
