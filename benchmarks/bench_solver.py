"""The router solve against the official HARC code's best option, on OLMoE-shaped and trained layers.

    python benchmarks/bench_solver.py                          # synthetic OLMoE-shaped layer, d 2048, K 64, 2 x 8192 tokens
    python benchmarks/bench_solver.py --layer heavy-tailed     # heavy-tailed anisotropic residual-stream-like inputs
    python benchmarks/bench_solver.py --layer demo             # layer 1 of the demo's trained MoE (needs its cached build)
    python benchmarks/bench_solver.py --official ~/src/HARC    # baseline: the official code itself, imported from a checkout
    python benchmarks/bench_solver.py --tokens 65536 --baseline extrapolate --json out.json

Baseline. With ``--official PATH`` (a checkout of github.com/huangcb01/HARC; it has no licence, so nothing
of it is copied here) its ``src/merge_method/router_calibration_cg.py`` is imported from PATH as a user
would, and its own operator (``_compute_sigma_w_worker``: per 512-token sequence, softmax(X W_i^T), X W^T,
X^T H and the diagonal recomputed on every matvec) and its own ``_conjugate_gradient`` solve the layer with
its diagonal preconditioner (the system's diagonal clamped at 1e-10 and divided by its median), float32
activations, from the merged router, tol 1e-6. The few lines joining them (sum over domains, the
regularisation, the preconditioner) mirror the closure in its ``router_calibration_cg``, which cannot be
called without model files. Modules that its top-level imports need but this environment lacks
(datasets, old transformers class names) are stubbed: the solve touches none of them. Without
``--official`` the baseline is ``paper_style_solve(..., preconditioner="diagonal")``, the same
algorithm written here. ``--baseline extrapolate`` times 3 of the baseline's matvecs and multiplies by
the iteration count of our Jacobi PCG on the same system (the same algorithm: the median scaling does
not change PCG's iterates); it is labelled as extrapolated in the output and the README.

Ours: ``solve_router`` as the pipeline calls it (statistics, KL before and after, the preconditioner's
setup and the solve all inside the timing), for each configuration of ``--solvers``. Every answer is
compared with a tight solve (expert-block PCG with float64 GEMMs to tol 1e-10; with ``--fast-tight``
the same residual reached by refinement from bfloat16 corrections): ``error`` = ||W - W_tight|| / ||W_tight||.

Layers. ``synthetic``: RMSNorm-like inputs with a mild decaying low-rank spectrum, per-task and
per-sequence offsets and per-channel gains, top-8-style routers, fine-tunes along task directions,
merged = their average. ``heavy-tailed``: the same construction with a steep power-law spectrum
(eigenvalues ~ i^-1.6), Student-t (3 degrees of freedom) latent coordinates, a large common mean, 6
massive-activation channels (a large offset on every token and a 30x burst on the first token of each
sequence, like attention sinks) and log-normal channel gains, all before RMSNorm. ``demo``: the demo's
trained 4-layer MoE (d 128, 8 experts; its cached build, ``--demo-dir``): the merged model (task
arithmetic) is run over each domain's calibration text and the inputs of ``--demo-layer``'s router
captured; sources = the fine-tuned routers, init = the merged one.

Printed and written (``--json``): per solver wall time, iterations, setup time (to the first CG
iteration), ms per iteration, its ratio to one matvec (two float32 GEMMs of N x d x K, timed right
before and right after that solve: the ratio is to their mean, so a load change on a shared machine
moves both), the error, and the baseline's time over ours.
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
               anisotropic: bool = False, heavy_tailed: bool = False):
    gen = torch.Generator().manual_seed(seed)
    rank = min(d, 256)
    # shared low-rank structure with a power-law spectrum, like real residual-stream activations
    basis = torch.linalg.qr(torch.randn(d, rank, generator=gen))[0]
    # default: a mild spectrum (the regime of the probe); anisotropic: steep spectrum, large
    # common mean and massive-activation channels, closer to real residual streams and much harder
    power, top, noise, out_amp, mean_amp = (0.8, 6.0, 0.3, 3.0, 0.8) if anisotropic else (0.5, 2.0, 0.7, 0.0, 0.3)
    if heavy_tailed:  # eigenvalues ~ i^-1.6, a small isotropic floor, a large common mean
        power, top, noise, out_amp, mean_amp = (0.8, 8.0, 0.15, 8.0, 1.2)
    spectrum = (torch.arange(1, rank + 1, dtype=torch.float32) ** -power) * top
    gain = torch.exp((0.5 if heavy_tailed else 0.3) * torch.randn(d, generator=gen))  # RMSNorm weight
    outliers = torch.randperm(d, generator=gen)[:6]
    xs = []
    for t in range(tasks):
        task_mean = mean_amp * torch.randn(d, generator=gen)
        task_mix = torch.eye(rank) + 0.3 * torch.randn(rank, rank, generator=gen) / math.sqrt(rank)
        seqs = []
        for _ in range(max(1, tokens // seq_len)):
            seq_mean = 0.4 * torch.randn(d, generator=gen)
            if heavy_tailed:
                # Student-t latent coordinates (heavy tails), sampled through the generator: t = g / sqrt(c / nu)
                g = torch.randn(seq_len, rank, generator=gen)
                c = torch.zeros(seq_len, rank)
                for _ in range(3):
                    c += torch.randn(seq_len, rank, generator=gen) ** 2
                z = (g / (c / 3.0).sqrt().clamp(min=1e-3)) @ task_mix * spectrum
            else:
                z = torch.randn(seq_len, rank, generator=gen) @ task_mix * spectrum
            h = z @ basis.T + task_mean + seq_mean + noise * torch.randn(seq_len, d, generator=gen)
            h[:, outliers] += out_amp * (1 + torch.rand(len(outliers), generator=gen))
            if heavy_tailed:  # massive activations: a burst on the first token of every sequence
                h[0, outliers] *= 30.0
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

def paper_style_solve(seqs_per_task, sources, init, alpha: float, tol: float, max_iter: int,
                      preconditioner: str = "none"):
    """The published solver's algorithm, written here: ``preconditioner="diagonal"`` is its diagonal
    option (the diagonal of the system, clamped at 1e-10 and divided by its median), "none" its default.
    CG vectors in float64; stops on the recursive residual like the published code."""
    work = seqs_per_task[0][0].dtype  # float32 activations -> float32 GEMMs, as the published scripts
    srcs = [w.to(work) for w in sources]
    diag_total = [None]

    def operator(w64: torch.Tensor, rhs: bool = False) -> torch.Tensor:
        out = torch.zeros(w64.shape, dtype=torch.float64, device=w64.device)
        diag_sum = torch.zeros(w64.shape, dtype=torch.float64, device=w64.device)
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
            diag_sum += diag.T / n
        diag_total[0] = diag_sum
        return out

    b = operator(init.double(), rhs=True)
    precond = None
    if preconditioner == "diagonal":
        dg = diag_total[0].clamp(min=1e-10)
        dg = dg / dg.flatten().median()
        precond = lambda v: v / dg  # noqa: E731
    elif preconditioner != "none":
        raise ValueError(f"unknown preconditioner {preconditioner!r}")
    x = init.double().clone()
    r = b - operator(x)
    z = precond(r) if precond else r
    p = z.clone()
    rho = float((r * z).sum())
    b_norm = float(b.norm())
    res = float(r.norm()) / b_norm
    it = 0
    while res > tol and it < max_iter:
        q = operator(p)
        step = rho / float((p * q).sum())
        x += step * p
        r -= step * q
        res = float(r.norm()) / b_norm
        z = precond(r) if precond else r
        rho_new = float((r * z).sum())
        p = z + (rho_new / rho) * p
        rho = rho_new
        it += 1
    return x, it, res


# -- the official code, imported from a user's checkout ------------------------------------------

def load_official(path):
    """Import ``router_calibration_cg`` from a checkout of the official HARC repository at ``path``.
    Modules (or names) its top-level imports need that are missing here are stubbed; returns the module
    and the list of stubs made."""
    import importlib.util
    import types
    from pathlib import Path

    src = Path(path).expanduser() / "src"
    file = src / "merge_method" / "router_calibration_cg.py"
    if not file.is_file():
        raise SystemExit(f"--official {path}: no {file.relative_to(Path(path).expanduser())} there")
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    stubs = []

    def placeholder(name):
        return type(name, (), {"__init__": lambda self, *a, **k: (_ for _ in ()).throw(
            RuntimeError(f"{name} is a stub made by bench_solver.load_official"))})

    for _ in range(20):
        spec = importlib.util.spec_from_file_location("harc_official_router_calibration_cg", file)
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
            return mod, stubs
        except ModuleNotFoundError as e:  # a whole package missing (e.g. datasets)
            stub = types.ModuleType(e.name)
            stub.__getattr__ = lambda attr, _n=e.name: placeholder(f"{_n}.{attr}")  # noqa: B023
            sys.modules[e.name] = stub
            stubs.append(e.name)
        except ImportError as e:  # a name missing from an installed module (renamed transformers classes)
            if e.name is None or e.name not in sys.modules or "cannot import name" not in str(e):
                raise
            missing = str(e).split("'")[1]
            setattr(sys.modules[e.name], missing, placeholder(missing))
            stubs.append(f"{e.name}.{missing}")
    raise SystemExit(f"--official {path}: could not import {file}")


def official_solve(mod, seqs_per_task, sources, init, alpha: float, tol: float, max_iter: int,
                   preconditioner: str = "diagonal", progress: bool = False):
    """The official operator (``_compute_sigma_w_worker``) and CG (``_conjugate_gradient``), joined the way
    its ``router_calibration_cg`` closure joins them: per-domain sums / token counts, regularisation
    gamma S w + (1 - gamma) diag(S) w, float32 vectors (the activations' dtype), the diagonal
    preconditioner clamped at 1e-10 and divided by its median. Returns (W, iterations, relative residual)."""
    from types import SimpleNamespace

    dtype = seqs_per_task[0][0].dtype
    k, d = init.shape
    mod.ctx = SimpleNamespace(device="cpu", hidden_state_tensors=seqs_per_task)
    srcs = [w.to(dtype) for w in sources]
    totals = [sum(int(x.shape[0]) for x in s) for s in seqs_per_task]
    calls = [0]

    def compute_sigma_w(w=None, return_diagonal=False):
        calls[0] += 1
        if progress and calls[0] % 50 == 0:
            print(f"  official code: {calls[0]} products", flush=True)
        if w is not None and w.dim() == 1:
            w = w.view(k, d)
        result = torch.zeros(k * d, dtype=torch.float64)
        diagonal = torch.zeros(k * d, dtype=torch.float64)
        for i in range(len(seqs_per_task)):
            target = w if w is not None else srcs[i]
            sw, dg = mod._compute_sigma_w_worker(i, srcs[i], target)
            sw, dg = sw / totals[i], dg / totals[i]
            if alpha < 1.0:
                sw = alpha * sw + (1.0 - alpha) * dg * target.reshape(-1)
            result += sw
            diagonal += dg
        return (result.to(dtype), diagonal.to(dtype)) if return_diagonal else result.to(dtype)

    rhs, diagonal = compute_sigma_w(None, return_diagonal=True)
    precond = None
    if preconditioner == "diagonal":
        dg = torch.clamp(diagonal, min=1e-10)
        dg = dg / torch.median(dg)
        precond = lambda r: r / dg  # noqa: E731
    calls[0] = 0
    x = mod._conjugate_gradient(compute_sigma_w, rhs, init.to(dtype).reshape(-1).clone(), precond, max_iter, tol,
                                verbose=False)
    iterations = calls[0] - 1  # one matvec for the initial residual, one per iteration
    w = x.view(k, d).double()
    res = float((rhs.double() - compute_sigma_w(x).double()).norm() / rhs.double().norm())
    return w, iterations, res


# -- the demo's trained layer ----------------------------------------------------------------

def demo_layer(demo_dir, layer: int, max_tokens: int):
    """Router inputs of ``layer`` of the demo's merged model (task arithmetic of its cached sources) on each
    domain's calibration text, the sources' routers and the merged router. Returns (seqs, sources, merged)."""
    import glob
    import json as _json
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if demo_dir is None:
        builds = [Path(p).parent for p in glob.glob(str(Path.home() / ".cache/harc-hpc/demo/*/recipe.json"))
                  if "num_experts" in _json.loads(Path(p).read_text())["recipe"]]
        if not builds:
            raise SystemExit("--layer demo: no cached MoE demo build (run harc-hpc submit configs/tiny.yaml once)")
        demo_dir = max(builds, key=lambda b: b.stat().st_mtime)
    demo_dir = Path(demo_dir)
    load = lambda name: AutoModelForCausalLM.from_pretrained(demo_dir / name, dtype=torch.float32).eval()  # noqa: E731
    base, srcs = load("base"), [load("math"), load("code")]
    merged = load("base")
    with torch.no_grad():
        state = merged.state_dict()
        bs = base.state_dict()
        for key in state:
            state[key].copy_(bs[key] + sum(s.state_dict()[key] - bs[key] for s in srcs))
    gate = lambda m: m.model.layers[layer].mlp.gate  # noqa: E731
    routers = [gate(s).weight.detach().clone().float() for s in srcs]
    init = gate(merged).weight.detach().clone().float()
    tok = AutoTokenizer.from_pretrained(demo_dir / "base")
    seqs = []
    for domain in ("math", "code"):
        texts = [_json.loads(line)["text"] for line in (demo_dir / "data" / f"{domain}-calib.jsonl").read_text().splitlines()]
        captured = []
        hook = gate(merged).register_forward_pre_hook(lambda mod, args: captured.append(args[0].reshape(-1, args[0].shape[-1]).detach().clone()))
        n = 0
        with torch.no_grad():
            for t in texts:
                ids = tok(t, return_tensors="pt")["input_ids"]
                merged(input_ids=ids)
                n += ids.shape[1]
                if n >= max_tokens:
                    break
        hook.remove()
        seqs.append([c.float().contiguous() for c in captured])
    return seqs, routers, init


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


def matvec_time(xs, sources, merged, alpha) -> float:
    """Best of 3 of one product of the system (two float32 GEMMs of N x d x K, float64 sums)."""
    curv = [TaskCurvature(TokenChunks(x), w.double(), "full") for x, w in zip(xs, sources)]
    system = HarcSystem(curv, sum(c.diagonal() for c in curv), alpha)
    return best_time(lambda: system.apply(merged.double()))


SOLVERS = {  # name: solve_router arguments
    "expert-block": dict(solver="pcg", preconditioner="expert-block"),
    "expert-block-bf16": dict(solver="pcg", preconditioner="expert-block", inner_dtype=torch.bfloat16),
    "jacobi": dict(solver="pcg", preconditioner="jacobi"),
    "jacobi-bf16": dict(solver="pcg", preconditioner="jacobi", inner_dtype=torch.bfloat16),
    "kronecker": dict(solver="pcg", preconditioner="kronecker"),
    "cg": dict(solver="cg", preconditioner="none"),
}


def run_ours(name, xs, sources, merged, args):
    first = [None]

    def callback(i, r):
        if first[0] is None:
            first[0] = time.perf_counter()

    base, _, m = name.partition("@")  # "expert-block-bf16@128": 128 tokens per task and expert
    kw = dict(SOLVERS[base])
    if "expert-block" in base and (m or args.expert_block_tokens):
        kw["expert_block_tokens"] = int(m or args.expert_block_tokens)
    t, c = time.perf_counter(), time.process_time()
    sol = solve_router(xs, sources, merged, alpha=args.alpha, tol=args.tol, max_iter=args.max_iter,
                       compute_dtype=torch.float32, callback=callback, **kw)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    setup = (first[0] - t) if first[0] is not None else wall
    return sol, wall, setup, cpu


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", choices=["synthetic", "heavy-tailed", "demo"], default="synthetic")
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per task (demo: at most this many)")
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--max-iter", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--demo-dir", default=None, help="the demo's cached build (default: the newest MoE build)")
    ap.add_argument("--demo-layer", type=int, default=1)
    ap.add_argument("--official", default=None, metavar="PATH", help="a checkout of github.com/huangcb01/HARC")
    ap.add_argument("--baseline", choices=["full", "extrapolate", "skip"], default="full")
    ap.add_argument("--baseline-max-iter", type=int, default=1000)
    ap.add_argument("--baseline-none", action="store_true",
                    help="also run the baseline without a preconditioner (the official code's default)")
    ap.add_argument("--solvers", default="expert-block,expert-block-bf16,jacobi,jacobi-bf16",
                    help=f"comma-separated subset of {','.join(SOLVERS)}; NAME@M: M tokens per task and expert")
    ap.add_argument("--expert-block-tokens", type=int, default=None)
    ap.add_argument("--bf16-inputs", action="store_true", help="round the router inputs to bfloat16 values")
    ap.add_argument("--no-tight", action="store_true", help="skip the tight solve (no errors reported)")
    ap.add_argument("--fast-tight", action="store_true",
                    help="the tight solve by refinement: float64 residuals to 1e-10, bfloat16 corrections (large layers)")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.layer == "demo":
        seqs, sources, merged = demo_layer(args.demo_dir, args.demo_layer, args.tokens)
        layer_name = f"demo's trained MoE, layer {args.demo_layer}"
    else:
        seqs, sources, merged = make_layer(args.d, args.experts, args.tokens, args.tasks, args.seq_len,
                                           max(1, args.experts // 8), args.seed,
                                           heavy_tailed=args.layer == "heavy-tailed")
        layer_name = "synthetic OLMoE-shaped" if args.layer == "synthetic" else "heavy-tailed anisotropic OLMoE-shaped"
    if args.bf16_inputs:
        seqs = [[x.to(torch.bfloat16).float() for x in s] for s in seqs]
    xs = [torch.cat(s) for s in seqs]
    k, d = merged.shape
    out = {"format": 2, "layer": args.layer, "layer_name": layer_name, "d": d, "K": k,
           "tokens_per_task": [int(x.shape[0]) for x in xs], "tasks": len(xs), "alpha": args.alpha,
           "tol": args.tol, "threads": torch.get_num_threads(), "bf16_inputs": args.bf16_inputs,
           "torch": torch.__version__, "solvers": {}}
    print(f"layer: {layer_name}, d={d} K={k}, tokens {out['tokens_per_task']}, alpha={args.alpha} tol={args.tol}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    t = time.perf_counter()
    tight = None if args.no_tight else solve_router(
        xs, sources, merged, alpha=args.alpha, solver="pcg", preconditioner="expert-block", tol=1e-10,
        max_iter=20000, compute_dtype=torch.float64, inner_dtype=torch.bfloat16 if args.fast_tight else None)
    if tight is not None:
        w_tight = tight.weight.double()
        out["tight"] = {"float64_residual_refined_from_bfloat16": args.fast_tight, "iterations": tight.iterations,
                        "relative_residual": tight.relative_residual, "seconds": time.perf_counter() - t}
        print(f"tight solve (expert-block, float64 GEMMs, tol 1e-10): {tight.iterations} it, "
              f"rel.res {tight.relative_residual:.1e}", flush=True)
    # without a tight solve (--no-tight) every error is NaN and no answer is called closer than another
    err = (lambda w: float("nan")) if tight is None else (  # noqa: E731
        lambda w: float((w.double() - w_tight).norm() / w_tight.norm()))

    # one matvec: two float32 GEMMs of N x d x K (the unit of work of every solver here)
    matvec_s = matvec_time(xs, sources, merged, args.alpha)
    out["matvec_s"] = matvec_s
    print(f"one matvec (2 float32 GEMMs): {matvec_s * 1e3:.1f} ms", flush=True)

    names = [n for n in args.solvers.split(",") if n]
    for name in names:
        # the matvec timed again right after the solve: on a shared machine the load moves between
        # the two, so each iteration is compared with the mean of the product timed before and after it
        before = matvec_s if not out["solvers"] else out["solvers"][list(out["solvers"])[-1]]["matvec_after_s"]
        sol, wall, setup, cpu = run_ours(name, xs, sources, merged, args)
        after = matvec_time(xs, sources, merged, args.alpha)
        per_it = (wall - setup) / max(sol.iterations, 1)
        bracket = 0.5 * (before + after)
        row = {"seconds": wall, "cpu_seconds": cpu, "setup_seconds": setup, "iterations": sol.iterations,
               "ms_per_iteration": per_it * 1e3, "iteration_over_matvec": per_it / bracket,
               "matvec_before_s": before, "matvec_after_s": after, "preconditioner": sol.preconditioner,
               "relative_residual": sol.relative_residual, "converged": sol.converged,
               "error_vs_tight": err(sol.weight), "kl_before": sum(sol.kl_before), "kl_after": sum(sol.kl_after)}
        out["solvers"][name] = row
        print(f"{name:18s} {wall:7.2f} s  {sol.iterations:5d} it  setup {setup:5.2f} s  {per_it * 1e3:6.1f} ms/it "
              f"({per_it / bracket:.2f} matvec, {before * 1e3:.0f}/{after * 1e3:.0f} ms before/after)  rel.res {sol.relative_residual:.1e}  error {row['error_vs_tight']:.1e}",
              flush=True)

    if args.baseline != "skip":
        mod = stubs = None
        if args.official:
            mod, stubs = load_official(args.official)
            print(f"official code imported from {args.official}" + (f" (stubbed: {', '.join(stubs)})" if stubs else ""))
        kinds = ["diagonal"] + (["none"] if args.baseline_none else [])
        for kind in kinds:
            label = ("official HARC code" if mod else "official-style rewrite") + f", {kind} preconditioner"
            if args.baseline == "full":
                t, c = time.perf_counter(), time.process_time()
                if mod:
                    w_b, it_b, res_b = official_solve(mod, seqs, sources, merged, args.alpha, args.tol,
                                                      args.baseline_max_iter, kind, progress=True)
                else:
                    w_b, it_b, res_b = paper_style_solve(seqs, sources, merged, args.alpha, args.tol,
                                                         args.baseline_max_iter, kind)
                wall_b = time.perf_counter() - t
                row = {"label": label, "seconds": wall_b, "cpu_seconds": time.process_time() - c,
                       "iterations": it_b, "relative_residual": res_b,
                       "error_vs_tight": err(w_b), "extrapolated": False}
            else:
                # same algorithm as our PCG with the same diagonal (Jacobi; "none": plain CG): its iterations
                ref = "jacobi" if kind == "diagonal" else "cg"
                it_b = out["solvers"][ref]["iterations"] if ref in out["solvers"] else run_ours(ref, xs, sources, merged, args)[0].iterations
                t, c = time.perf_counter(), time.process_time()
                if mod:
                    official_solve(mod, seqs, sources, merged, args.alpha, 0.0, 1, kind)
                else:
                    paper_style_solve(seqs, sources, merged, args.alpha, 0.0, 1, kind)
                per = (time.perf_counter() - t) / 4  # rhs + initial residual + 1 iteration (+ final residual)
                wall_b = per * (it_b + 3)
                row = {"label": label + " (extrapolated)", "seconds": wall_b, "seconds_per_matvec": per,
                       "cpu_seconds": (time.process_time() - c) / 4 * (it_b + 3),
                       "iterations": it_b, "extrapolated": True}
            out.setdefault("baselines", {})[kind] = row
            print(f"{row['label']}: {wall_b:.2f} s, {it_b} it" +
                  (f", rel.res {row['relative_residual']:.1e}, error {row['error_vs_tight']:.1e}" if "error_vs_tight" in row else ""),
                  flush=True)
        base = out["baselines"]["diagonal"]
        for name, row in out["solvers"].items():
            row["speedup_vs_baseline"] = base["seconds"] / row["seconds"]
            row["cpu_speedup_vs_baseline"] = base["cpu_seconds"] / row["cpu_seconds"]
            if "error_vs_tight" not in base or math.isnan(row["error_vs_tight"]):
                same = None  # nothing to compare: an extrapolated baseline or no tight solve
            else:
                same = row["error_vs_tight"] <= base["error_vs_tight"] * 1.05
            row["answer_as_close_as_baseline"] = same
            print(f"  {name:18s} {row['speedup_vs_baseline']:6.1f}x the baseline's wall time "
                  f"({row['cpu_speedup_vs_baseline']:.1f}x its CPU time)"
                  + ("  (answer further from the tight solve than the baseline's)" if same is False else ""))
    best = min(out["solvers"], key=lambda n: out["solvers"][n]["seconds"]) if out["solvers"] else None
    out["fastest"] = best
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
