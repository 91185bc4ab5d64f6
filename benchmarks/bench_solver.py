"""solve_router against a paper-style reference solver on a synthetic OLMoE-shaped router layer.

    python benchmarks/bench_solver.py                 # d 2048, K 64, top-8 routers, 2 tasks x 8192 tokens
    python benchmarks/bench_solver.py --small         # d 1024, K 32, 2 x 4096 tokens: a few minutes on 2 cores
    python benchmarks/bench_solver.py --tokens 16384 --json out.json

Data: router inputs shaped like RMSNorm outputs (a decaying low-rank spectrum, per-task and
per-sequence offsets, a few outlier channels, per-channel gains), in sequences of 512 tokens, float32.
Routers: a base router whose top-8 of 64 carries most of the mass, two fine-tunes that move it in
task-specific directions, the merged router = their average.

Reference ("paper-style", as the published code computes it): per sequence and on every matvec it
recomputes R_i = softmax(X W_i^T), the logits X W^T, U = R*Z - R*rowsum(R*Z), X^T U and the diagonal
(R(1-R))^T (X*X), float32 GEMMs accumulated in float64, plain CG from the merged router, tol 1e-6,
max 1000 iterations. (The published code keeps its CG vectors in float32; here they are float64 so
both solvers converge to the same answer.)

Printed: wall time of each solver, the reference's time and speed-up, iterations of cg vs pcg
(expert-block, jacobi, kronecker; pcg-jacobi-bf16 = mixed precision), the relative difference of every solution to the reference, and the matvec's
achieved GFLOP/s against torch.mm on the same shapes (4 N d K flops per matvec: two GEMMs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from harc_hpc.math import TaskCurvature, TokenChunks, solve_router
from harc_hpc.math.solver import HarcSystem


# -- synthetic layer ---------------------------------------------------------------------------

def make_layer(d: int, k: int, tokens: int, tasks: int, seq_len: int, top_k: int, seed: int,
               anisotropic: bool = False):
    gen = torch.Generator().manual_seed(seed)
    rank = min(d, 256)
    # shared low-rank structure with a power-law spectrum, like real residual-stream activations
    basis = torch.linalg.qr(torch.randn(d, rank, generator=gen))[0]
    # default: a mild spectrum (the regime of the probe); anisotropic: steep spectrum, large
    # common mean and massive-activation channels, closer to real residual streams and much harder
    power, top, noise, out_amp, mean_amp = (0.8, 6.0, 0.3, 3.0, 0.8) if anisotropic else (0.5, 2.0, 0.7, 0.0, 0.3)
    spectrum = (torch.arange(1, rank + 1, dtype=torch.float32) ** -power) * top
    gain = torch.exp(0.3 * torch.randn(d, generator=gen))  # RMSNorm weight
    outliers = torch.randperm(d, generator=gen)[:6]
    xs = []
    for t in range(tasks):
        task_mean = mean_amp * torch.randn(d, generator=gen)
        task_mix = torch.eye(rank) + 0.3 * torch.randn(rank, rank, generator=gen) / math.sqrt(rank)
        seqs = []
        for _ in range(max(1, tokens // seq_len)):
            seq_mean = 0.4 * torch.randn(d, generator=gen)
            z = torch.randn(seq_len, rank, generator=gen) @ task_mix * spectrum
            h = z @ basis.T + task_mean + seq_mean + noise * torch.randn(seq_len, d, generator=gen)
            h[:, outliers] += out_amp * (1 + torch.rand(len(outliers), generator=gen))
            h = h / h.pow(2).mean(dim=1, keepdim=True).sqrt()  # RMSNorm
            seqs.append((h * gain).contiguous())
        xs.append(seqs)
    # base router: logits std ~2.5 so the top-8 of 64 carry most of the probability mass
    base = torch.randn(k, d, generator=gen) / math.sqrt(d)
    probe = torch.cat([torch.cat(s)[:2048] for s in xs])
    base *= 2.5 / float((probe @ base.T).std())
    sources = []
    for t in range(tasks):
        # fine-tunes move the router along the task's own input directions (low rank) plus noise
        task_dirs = torch.linalg.qr(torch.cat(xs[t])[:4096:37].T)[0][:, :16]
        delta = torch.randn(k, task_dirs.shape[1], generator=gen) @ task_dirs.T + 0.3 * torch.randn(k, d, generator=gen) / math.sqrt(d)
        delta *= 0.8 * float(base.norm()) / float(delta.norm())
        sources.append(base + delta)
    merged = sum(sources) / tasks
    return xs, sources, merged


# -- paper-style reference solver -----------------------------------------------------------

def paper_style_solve(seqs_per_task, sources, init, alpha: float, tol: float, max_iter: int):
    work = seqs_per_task[0][0].dtype  # float32 activations -> float32 GEMMs, as the published scripts
    srcs = [w.to(work) for w in sources]

    def operator(w64: torch.Tensor, rhs: bool = False) -> torch.Tensor:
        out = torch.zeros(w64.shape, dtype=torch.float64, device=w64.device)
        wf = w64.to(work)
        for i, seqs in enumerate(seqs_per_task):
            acc = torch.zeros(w64.shape[1], w64.shape[0], dtype=torch.float64, device=w64.device)
            diag = torch.zeros_like(acc)
            n = 0
            w_here = srcs[i] if rhs else wf
            for x in seqs:
                r = torch.softmax(x @ srcs[i].T, dim=1)
                z = x @ w_here.T
                rz = r * z
                hz = rz - r * rz.sum(dim=1, keepdim=True)
                acc += (x.T @ hz).double()
                diag += ((x * x).T @ (r * (1 - r))).double()
                n += x.shape[0]
            w_ref = sources[i].double() if rhs else w64
            out += alpha * acc.T / n + (1 - alpha) * (diag.T / n) * w_ref
        return out

    b = operator(init.double(), rhs=True)
    x = init.double().clone()
    r = b - operator(x)
    p = r.clone()
    rho = float((r * r).sum())
    b_norm = float(b.norm())
    it = 0
    while math.sqrt(rho) / b_norm > tol and it < max_iter:
        q = operator(p)
        step = rho / float((p * q).sum())
        x += step * p
        r -= step * q
        rho_new = float((r * r).sum())
        p = r + (rho_new / rho) * p
        rho = rho_new
        it += 1
    return x, it, math.sqrt(rho) / b_norm


SAME_ANSWER_RTOL = 1e-4  # both solvers must reach the same router to this relative (Frobenius) difference


# -- measurements ------------------------------------------------------------------------------

def best_time(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matvec_throughput(xs_flat, sources, merged, alpha):
    k, d = merged.shape
    n = sum(x.shape[0] for x in xs_flat)
    flops = 4.0 * n * d * k
    curv = [TaskCurvature(TokenChunks(x), w.double(), "full") for x, w in zip(xs_flat, sources)]
    system = HarcSystem(curv, sum(c.diagonal() for c in curv), alpha)
    w = merged.double()
    t_ours = best_time(lambda: system.apply(w))
    wt = merged.float().T.contiguous()
    u = [torch.randn(x.shape[0], k) for x in xs_flat]
    t_mm = best_time(lambda: [(x @ wt, uu.T @ x) for x, uu in zip(xs_flat, u)])
    return {"matvec_s": t_ours, "matvec_gflops": flops / t_ours / 1e9, "mm_s": t_mm,
            "mm_gflops": flops / t_mm / 1e9, "fraction_of_mm": t_mm / t_ours}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="d 1024, K 32, 4096 tokens per task")
    ap.add_argument("--d", type=int, default=None)
    ap.add_argument("--experts", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None, help="tokens per task (default 8192; --small 4096)")
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--reference-max-iter", type=int, default=None,
                    help="iteration cap of the paper-style reference (default --max-iter); raise it to run "
                         "the reference to convergence on ill-conditioned layers for the same-answer check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reference", choices=["full", "extrapolate", "skip"], default="full",
                    help="run the paper-style solver to convergence, or time a few of its matvecs and "
                         "extrapolate to plain CG's iteration count (stated as such in the output)")
    ap.add_argument("--solvers", default="pcg-expert-block,pcg-kronecker,pcg-jacobi,pcg-jacobi-bf16,cg",
                    help="comma-separated subset of pcg-expert-block (the default preconditioner),pcg-kronecker,"
                         "pcg-jacobi,pcg-jacobi-bf16 (mixed precision: "
                         "bfloat16 corrections refined to tol),cg (cg is always run: the "
                         "reference extrapolation and the iteration ratios need it)")
    ap.add_argument("--expert-block-tokens", type=int, default=None,
                    help="tokens per task and expert in the expert-block preconditioner (default: solve_router's)")
    ap.add_argument("--anisotropic", action="store_true", help="steep spectrum, large mean, outlier channels")
    ap.add_argument("--bf16-inputs", action="store_true",
                    help="round the router inputs to bfloat16 values, as the activation store keeps them for a "
                         "bf16 model; every solver sees the same values (the mixed-precision one shares a "
                         "bf16 copy, the others widen to float32)")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    d = args.d or (1024 if args.small else 2048)
    k = args.experts or (32 if args.small else 64)
    tokens = args.tokens or (4096 if args.small else 8192)
    top_k = max(1, k // 8)
    print(f"layer: d={d} K={k} top-{top_k}, {args.tasks} tasks x {tokens} tokens in sequences of {args.seq_len}, "
          f"alpha={args.alpha} tol={args.tol}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    seqs, sources, merged = make_layer(d, k, tokens, args.tasks, args.seq_len, top_k, args.seed, args.anisotropic)
    if args.bf16_inputs:
        seqs = [[x.to(torch.bfloat16).float() for x in s] for s in seqs]
    xs_flat = [torch.cat(s) for s in seqs]
    out = {"bf16_inputs": args.bf16_inputs, "anisotropic": args.anisotropic, "d": d, "K": k, "tokens_per_task": tokens, "tasks": args.tasks, "alpha": args.alpha, "tol": args.tol,
           "threads": torch.get_num_threads()}

    runs = {}
    wanted = set(args.solvers.split(",")) | {"cg"}
    for name, solver, pre, inner in [("pcg-expert-block", "pcg", "expert-block", None),
                                     ("pcg-kronecker", "pcg", "kronecker", None), ("pcg-jacobi", "pcg", "jacobi", None),
                                     ("pcg-jacobi-bf16", "pcg", "jacobi", torch.bfloat16), ("cg", "cg", "none", None)]:
        if name not in wanted:
            continue
        # a bf16-valued layer reaches the mixed-precision solve as the store hands it over: bf16, kept
        shared = inner is not None and args.bf16_inputs
        xs_in = [x.to(torch.bfloat16) for x in xs_flat] if shared else xs_flat
        t = time.perf_counter()
        sol = solve_router(xs_in, sources, merged, alpha=args.alpha, solver=solver, preconditioner=pre,
                           tol=args.tol, max_iter=args.max_iter, inner_dtype=inner,
                           compute_dtype=torch.float32, keep_input_dtype=shared,
                           **({"expert_block_tokens": args.expert_block_tokens} if args.expert_block_tokens else {}))
        wall = time.perf_counter() - t
        runs[name] = sol
        out[name] = {"seconds": wall, "iterations": sol.iterations, "relative_residual": sol.relative_residual,
                     "converged": sol.converged, "kl_before": sum(sol.kl_before), "kl_after": sum(sol.kl_after)}
        print(f"{name:14s} {wall:8.2f} s  {sol.iterations:5d} it  rel.res {sol.relative_residual:.2e}  "
              f"KL {sum(sol.kl_before):.4f} -> {sum(sol.kl_after):.4f}", flush=True)
    base = runs["cg"].weight.double()
    for name in ("pcg-expert-block", "pcg-kronecker", "pcg-jacobi", "pcg-jacobi-bf16"):
        if name in runs:
            out[name]["rel_diff_to_cg"] = float((runs[name].weight.double() - base).norm() / base.norm())
            out[f"iterations_ratio_{name}_vs_cg"] = runs[name].iterations / max(runs["cg"].iterations, 1)

    mv = matvec_throughput(xs_flat, sources, merged, args.alpha)
    out["matvec"] = mv
    print(f"matvec: {mv['matvec_s'] * 1e3:.1f} ms = {mv['matvec_gflops']:.1f} GFLOP/s; torch.mm same shapes "
          f"{mv['mm_s'] * 1e3:.1f} ms = {mv['mm_gflops']:.1f} GFLOP/s -> {100 * mv['fraction_of_mm']:.0f}% of torch.mm",
          flush=True)

    w_ref = None
    if args.reference == "full":
        t = time.perf_counter()
        w_ref, it_ref, res_ref = paper_style_solve(seqs, sources, merged, args.alpha, args.tol,
                                                     args.reference_max_iter or args.max_iter)
        wall = time.perf_counter() - t
        out["paper_style"] = {"seconds": wall, "iterations": it_ref, "relative_residual": res_ref}
        print(f"{'paper-style':14s} {wall:8.2f} s  {it_ref:5d} it  rel.res {res_ref:.2e}", flush=True)
    elif args.reference == "extrapolate":
        # same algorithm as our plain CG: its iteration count is ours; time 3 of its matvecs
        it_ref = runs["cg"].iterations
        t = time.perf_counter()
        paper_style_solve(seqs, sources, merged, args.alpha, 0.0, 1)  # rhs + residual + 1 iteration
        per_matvec = (time.perf_counter() - t) / 3
        wall = per_matvec * (it_ref + 2)
        out["paper_style"] = {"seconds_extrapolated": wall, "seconds_per_matvec": per_matvec, "iterations": it_ref}
        print(f"{'paper-style':14s} {wall:8.2f} s  EXTRAPOLATED: {per_matvec:.2f} s/matvec measured x "
              f"({it_ref} cg iterations + 2)", flush=True)
    if args.reference != "skip":
        for name in runs:
            out[name]["speedup_vs_paper_style"] = wall / out[name]["seconds"]
            line = f"  {name:14s} speed-up {wall / out[name]['seconds']:6.1f}x"
            if w_ref is not None:
                diff = float((runs[name].weight.double() - w_ref).norm() / w_ref.norm())
                out[name]["rel_diff_to_paper_style"] = diff
                line += f"  rel.diff to paper-style {diff:.1e}"
                # the same-answer check is only meaningful between solves that both reached tol
                both = res_ref <= args.tol * 1.5 and runs[name].converged
                if diff > SAME_ANSWER_RTOL:
                    if both:
                        line += f"  DIFFERENT ANSWER (> {SAME_ANSWER_RTOL:g})"
                        out["same_answer"] = False
                    else:
                        line += "  (not both converged: not a same-answer check)"
            print(line)
    print("iterations: " + ", ".join(
        f"{name} {runs[name].iterations}" + (f" ({out[f'iterations_ratio_{name}_vs_cg']:.2f} of cg)" if name != "cg" else "")
        for name in runs))
    if w_ref is not None and res_ref > args.tol * 1.5:
        print(f"note: the paper-style reference stopped at {it_ref} iterations with rel.res {res_ref:.1e} > tol "
              f"{args.tol:g} (raise --reference-max-iter to run it to convergence)")
        out.setdefault("same_answer", None)
    out.setdefault("same_answer", True if w_ref is not None else None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    # exit 1 when a solver disagrees with the reference: the timings would compare different work
    sys.exit(1 if main().get("same_answer") is False else 0)
