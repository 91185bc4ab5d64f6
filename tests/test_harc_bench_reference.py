"""The benchmark's paper-style reference solver and solve_router agree on a tiny synthetic layer."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_solver import make_layer, paper_style_solve  # noqa: E402

from harc_hpc.math import solve_router  # noqa: E402


def test_paper_style_reference_matches_solve_router():
    torch.manual_seed(0)
    seqs, sources, merged = make_layer(d=48, k=6, tokens=512, tasks=2, seq_len=64, top_k=2, seed=1)
    seqs = [[x.double() for x in s] for s in seqs]
    w_ref, iters, res = paper_style_solve(seqs, sources, merged, alpha=0.9, tol=1e-10, max_iter=5000)
    assert res <= 1e-10
    xs = [torch.cat(s) for s in seqs]
    direct = solve_router(xs, [w.double() for w in sources], merged.double(), solver="direct")
    assert float((direct.weight - w_ref).norm() / w_ref.norm()) < 1e-6
