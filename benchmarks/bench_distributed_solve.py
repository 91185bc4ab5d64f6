"""Data-parallel solve_router (process_group=...) against one process, on a synthetic OLMoE-shaped layer.

    python benchmarks/bench_distributed_solve.py            # d 2048, K 64, 2 tasks x 4096 tokens, float32
    python benchmarks/bench_distributed_solve.py --tokens 2048 --processes 2

Runs, all pcg with the Jacobi preconditioner, alpha 0.9, tol 1e-6 (the same layer and arguments):
  * baseline: 1 process, 1 thread, all tokens;
  * 1 process, as many threads as processes (the other way to use the same cores);
  * N gloo processes on 127.0.0.1 (torch.multiprocessing spawn), 1 thread each, each holding a
    contiguous shard of every task's tokens.

Printed and written to benchmarks/results/distributed_solve.{json,md}: the relative difference
(Frobenius) of each answer to the baseline's and whether every rank returned the same router,
seconds per CG iteration (timed between the first and the last CG callback: setup excluded),
speed ratio against the baseline, payload bytes all-reduced per CG iteration and the seconds per
iteration spent inside all_reduce (on rank 0, waiting for the slower rank included).
The layer comes from bench_solver.make_layer (RMSNorm-like inputs, top-8-style routers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_solver import make_layer  # noqa: E402

from harc_hpc.math import solve_router  # noqa: E402
from harc_hpc.math.distributed import ProcessGroupReducer, take_shard  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class TimedReducer(ProcessGroupReducer):
    """The library's reducer, also timing every all_reduce."""

    def __init__(self, group=None):
        super().__init__(group)
        self.seconds = 0.0

    def _all_reduce(self, t, op=None):
        start = time.perf_counter()
        out = super()._all_reduce(t, op)
        self.seconds += time.perf_counter() - start
        return out


def timed_solve(xs, sources, init, args, reducer=None):
    """solve_router with a callback stamping the time (and the reducer's counters) per CG iteration."""
    stamps = []

    def callback(iteration, residual):
        stamps.append((time.perf_counter(), reducer.bytes if reducer else 0, reducer.seconds if reducer else 0.0))

    start = time.perf_counter()
    sol = solve_router(xs, sources, init, alpha=args.alpha, solver="pcg", preconditioner="jacobi", tol=args.tol,
                       max_iter=args.max_iter, callback=callback, process_group=reducer)
    wall = time.perf_counter() - start
    span = max(len(stamps) - 1, 1)
    (t0, b0, c0), (t1, b1, c1) = stamps[0], stamps[-1]
    return sol, {
        "iterations": sol.iterations,
        "relative_residual": sol.relative_residual,
        "converged": sol.converged,
        "kl_after": sum(sol.kl_after),
        "solve_seconds": wall,
        "seconds_per_iteration": (t1 - t0) / span,
        "allreduce_bytes_per_iteration": (b1 - b0) / span,
        "allreduce_seconds_per_iteration": (c1 - c0) / span,
        "allreduce_bytes_total": reducer.bytes if reducer else 0,
        "allreduce_calls_total": reducer.calls if reducer else 0,
    }


def worker(rank, world, data_path, port, args, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        xs, sources, init = torch.load(data_path)
        shards = [take_shard(x, rank, world).clone() for x in xs]
        del xs
        reducer = TimedReducer(dist.group.WORLD)
        dist.barrier()
        sol, info = timed_solve(shards, sources, init, args, reducer)
        info["local_tokens"] = [int(x.shape[0]) for x in shards]
        torch.save({"weight": sol.weight, "info": info}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per task")
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "distributed_solve"), help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    world = args.processes
    torch.set_num_threads(1)
    seqs, sources, merged = make_layer(args.d, args.experts, args.tokens, args.tasks, 512, max(1, args.experts // 8),
                                       args.seed)
    xs = [torch.cat(s).contiguous() for s in seqs]
    k, d = merged.shape
    print(f"layer: d={d} K={k}, {args.tasks} tasks x {args.tokens} tokens float32, pcg jacobi, alpha {args.alpha}, "
          f"tol {args.tol}; torch {torch.__version__}, {os.cpu_count()} cores", flush=True)
    out = {"d": d, "K": k, "tasks": args.tasks, "tokens_per_task": args.tokens, "dtype": "float32",
           "solver": "pcg", "preconditioner": "jacobi", "alpha": args.alpha, "tol": args.tol,
           "torch": torch.__version__, "cores": os.cpu_count(), "runs": {}}

    base, info = timed_solve(xs, sources, merged, args)
    info.update(processes=1, threads=1)
    out["runs"]["1 process, 1 thread"] = info
    runs = {"1 process, 1 thread": (base.weight, info)}
    print(f"1 process, 1 thread: {info['iterations']} it, {info['seconds_per_iteration'] * 1e3:.1f} ms/it", flush=True)

    torch.set_num_threads(world)
    sol, info = timed_solve(xs, sources, merged, args)
    info.update(processes=1, threads=world)
    name = f"1 process, {world} threads"
    out["runs"][name] = info
    runs[name] = (sol.weight, info)
    print(f"{name}: {info['iterations']} it, {info['seconds_per_iteration'] * 1e3:.1f} ms/it", flush=True)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "layer.pt"
        torch.save((xs, sources, merged), data)
        mp.spawn(worker, args=(world, str(data), free_port(), args, tmp), nprocs=world, join=True)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
    name = f"{world} gloo processes, 1 thread each"
    info = dict(ranks[0]["info"], processes=world, threads=1,
                local_tokens_per_rank=[r["info"]["local_tokens"] for r in ranks],
                ranks_identical=all(torch.equal(r["weight"], ranks[0]["weight"]) for r in ranks[1:]))
    out["runs"][name] = info
    runs[name] = (ranks[0]["weight"], info)
    print(f"{name}: {info['iterations']} it, {info['seconds_per_iteration'] * 1e3:.1f} ms/it, "
          f"all-reduce {info['allreduce_bytes_per_iteration'] / 2**20:.2f} MiB / "
          f"{info['allreduce_seconds_per_iteration'] * 1e3:.2f} ms per it, ranks identical: {info['ranks_identical']}",
          flush=True)

    info["allreduce_seconds_per_iteration_per_rank"] = [r["info"]["allreduce_seconds_per_iteration"] for r in ranks]
    t_base = runs["1 process, 1 thread"][1]["seconds_per_iteration"]
    for name, (w, info) in runs.items():
        info["rel_diff_to_baseline"] = rel(w, base.weight)
        # the answer's residual in the one-process system (max_iter=0: CG only evaluates b - A w)
        info["residual_in_one_process_system"] = solve_router(
            xs, sources, w, alpha=args.alpha, solver="pcg", preconditioner="jacobi", tol=0.0,
            max_iter=0).relative_residual
        info["speed_ratio_vs_baseline"] = t_base / info["seconds_per_iteration"]
    out["expected_allreduce_bytes_per_iteration"] = args.tasks * k * d * 8  # one float64 (K, d) per task matvec

    lines = [f"# Multi-process solve (d {d}, K {k}, {args.tasks} x {args.tokens} tokens float32, pcg Jacobi, "
             f"alpha {args.alpha}, tol {args.tol:g})", "",
             f"`python benchmarks/bench_distributed_solve.py` on {os.cpu_count()} CPU cores, torch {torch.__version__}, "
             "gloo on 127.0.0.1. Seconds per CG iteration are timed between the first and the last CG "
             "iteration (setup excluded).", "",
             "| run | iterations | rel. residual (own; in the 1-process system) | ms / iteration | speed vs baseline "
             "| answer rel. diff to baseline | KL after | all-reduced / iteration | all-reduce ms / iteration (rank 0; per rank) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, (w, info) in runs.items():
        comm = (f"{info['allreduce_bytes_per_iteration'] / 2**20:.2f} MiB" if info["processes"] > 1 else "-")
        comm_t = (f"{info['allreduce_seconds_per_iteration'] * 1e3:.2f} ("
                  + ", ".join(f"{v * 1e3:.2f}" for v in info["allreduce_seconds_per_iteration_per_rank"]) + ")"
                  if info["processes"] > 1 else "-")
        lines.append(f"| {name} | {info['iterations']} | {info['relative_residual']:.2e}; "
                     f"{info['residual_in_one_process_system']:.2e} | "
                     f"{info['seconds_per_iteration'] * 1e3:.1f} | {info['speed_ratio_vs_baseline']:.2f}x | "
                     f"{info['rel_diff_to_baseline']:.1e} | {info['kl_after']:.6f} | {comm} | {comm_t} |")
    multi = runs[f"{world} gloo processes, 1 thread each"][1]
    lines += ["", f"Every rank returned the same router: {multi['ranks_identical']}. Shards (tokens per task, per rank): "
              f"{multi['local_tokens_per_rank']}."]
    text = "\n".join(lines) + "\n"
    print(text)
    target = Path(args.out)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    target.with_suffix(".md").write_text(text)
    return out


if __name__ == "__main__":
    main()
