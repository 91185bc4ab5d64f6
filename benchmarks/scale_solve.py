"""The solve half of benchmarks/bench_scale.py: one OLMoE-shaped layer's solve from a real
bfloat16 activation store, resident in float32 (what solve-router kept before), resident in the
store's bfloat16 (what it keeps now), streamed from the store on every CG iteration, and on a
40 % token subsample; the matvec against torch.mm's GEMM roofline; and a projection of the paper's
full run (OLMoE-1B-7B, 16 layers, 2 x 2.8 M tokens) for this CPU and for one H100."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_solver import make_layer, matvec_throughput
from harc_hpc.io.activations import ActivationArray, ActivationWriter, token_subsample
from harc_hpc.math import router_kl, solve_router

PAPER_TOKENS = 2 * 2_800_000  # two domains, ~2.8 M tokens each (HARC paper's OLMoE setup)
PAPER_LAYERS = 16
H100 = {"hbm_bytes_per_s": 3.35e12, "bf16_flops": 989e12, "tf32_flops": 494e12, "fp32_flops": 67e12}
# OLMoE-1B-7B: 1.3 B active of 6.9 B parameters (13.8 GB in bf16). Capture runs every decoder layer
# about twice over the run (block_size 1: once to capture, once to propagate calibrated routers);
# a forward costs ~2 FLOPs per active parameter and token. Assumed: 40 % of the bf16 peak in the
# forward, 2 GB/s of checkpoint I/O for merge and assembly (three checkpoints read or written).
OLMOE = {"active_params": 1.3e9, "bytes": 13.8e9, "forward_passes": 2, "mfu": 0.4, "io_bytes_per_s": 2e9}


def _timed_solve(inputs, sources, init, **kw):
    stamps = []
    t0 = time.perf_counter()
    sol = solve_router(inputs, sources, init, callback=lambda it, rel: stamps.append(time.perf_counter()), **kw)
    wall = time.perf_counter() - t0
    per_it = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1) if len(stamps) > 1 else wall
    return sol, wall, per_it




def run(d: int = 2048, k: int = 64, tokens: int = 16384, fraction: float = 0.4, stream_iters: int = 30,
        tol: float = 1e-6, threads: int = 2) -> dict:
    torch.set_num_threads(threads)
    xs, sources, merged = make_layer(d, k, tokens, 2, 512, 8, seed=0)
    flat = [torch.cat(s) for s in xs]
    offsets = [np.arange(0, x.shape[0] + 1, 512, dtype=np.int64) for x in flat]
    out: dict = {"shape": {"d": d, "K": k, "tasks": 2, "tokens_per_task": tokens, "dtype": "float32 compute",
                           "store": "bfloat16 Zarr, 8192-token chunks, no compression"},
                 "threads": threads, "tol": tol, "preconditioner": "expert-block"}
    with tempfile.TemporaryDirectory(prefix="harc-bench-solve-") as tmp:
        store = Path(tmp) / "acts.zarr"
        w = ActivationWriter(store, 8192, "bfloat16")
        for t, x in enumerate(flat):
            w.create(f"layer-000/t{t}", x.shape[0], d, offsets[t])
            w.write(f"layer-000/t{t}", 0, x)
        w.close()

        def arrays(out_dtype=None, rows=None):
            return [ActivationArray(store, f"layer-000/t{t}", out_dtype=out_dtype,
                                    rows=None if rows is None else rows[t]) for t in range(2)]

        # the product's default preconditioner (harc.preconditioner: expert-block)
        base = dict(solver="pcg", preconditioner="expert-block", tol=tol, max_iter=1000, compute_dtype=torch.float32)
        srcs = [s.float() for s in sources]
        init = merged.float()
        n_all = 2 * tokens
        # 1. resident float32 (the store decoded to the compute dtype and kept: the old path)
        f32, f32_wall, f32_it = _timed_solve(arrays(torch.float32), srcs, init, cache_bytes=1 << 40, **base)
        # 2. resident in the store's bfloat16, widened per chunk (the path solve-router takes now)
        bf, bf_wall, bf_it = _timed_solve(arrays(None), srcs, init, cache_bytes=1 << 40, keep_input_dtype=True, **base)
        # 2a. the same with the previous default preconditioner (Jacobi)
        jb, jb_wall, jb_it = _timed_solve(arrays(None), srcs, init, cache_bytes=1 << 40, keep_input_dtype=True,
                                          **{**base, "preconditioner": "jacobi"})
        # 2b. mixed precision on that same bfloat16 copy (bf16 GEMMs, refined against the float32 operator)
        mx, mx_wall, mx_it = _timed_solve(arrays(None), srcs, init, cache_bytes=1 << 40, keep_input_dtype=True,
                                          inner_dtype=torch.bfloat16, **base)
        # 3. streamed from the store on every iteration (fixed iteration count: it is slow)
        capped = {**base, "tol": 1e-30, "max_iter": stream_iters}
        st, st_wall, st_it = _timed_solve(arrays(None), srcs, init, cache_bytes=0, keep_input_dtype=True, **capped)
        ref_capped, _, _ = _timed_solve(arrays(None), srcs, init, cache_bytes=1 << 40, keep_input_dtype=True, **capped)
        # 4. a seeded, sequence-stratified subsample of each task's tokens
        m = int(fraction * tokens)
        rows = [token_subsample(offsets[t], m, seed=t) for t in range(2)]
        sub, sub_wall, sub_it = _timed_solve(arrays(None, rows), srcs, init, cache_bytes=1 << 40,
                                             keep_input_dtype=True, **base)
        kl_full = [float(router_kl(flat[t], srcs[t], bf.weight.float())) for t in range(2)]
        kl_sub = [float(router_kl(flat[t], srcs[t], sub.weight.float())) for t in range(2)]
        kl_merged = [float(router_kl(flat[t], srcs[t], init)) for t in range(2)]
    roof = matvec_throughput([x.float() for x in flat], srcs, init, 0.9)

    def row(name, sol, wall, per_it, nbytes, tokens_used):
        return {"run": name, "iterations": int(sol.iterations), "converged": bool(sol.converged),
                "ms_per_iteration": round(per_it * 1e3, 2), "wall_s": round(wall, 2),
                "resident_bytes": int(nbytes), "tokens": int(tokens_used)}

    out["runs"] = [
        row("resident, float32 copy (before)", f32, f32_wall, f32_it, n_all * d * 4, n_all),
        row("resident, bfloat16 as stored, widened per chunk", bf, bf_wall, bf_it, n_all * d * 2, n_all),
        row("resident, bfloat16 as stored, widened per chunk, Jacobi preconditioner (the previous default)", jb,
            jb_wall, jb_it, n_all * d * 2, n_all),
        row("resident, bfloat16 as stored, mixed precision (inner_dtype bfloat16)", mx, mx_wall, mx_it,
            n_all * d * 2, n_all),
        row(f"streamed from the store ({stream_iters} iterations)", st, st_wall, st_it, 0, n_all),
        row(f"subsampled to {fraction:.0%} of the tokens", sub, sub_wall, sub_it, 2 * m * d * 2, 2 * m),
    ]
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    out["same_answer"] = {
        "bf16_resident_vs_float32_resident_bitwise": bool(torch.equal(bf.weight, f32.weight)),
        "streamed_vs_resident_at_same_iterations_bitwise": bool(torch.equal(st.weight, ref_capped.weight)),
        "subsample_vs_full_rel_diff": rel(sub.weight, bf.weight),
        "mixed_vs_full_rel_diff": rel(mx.weight, bf.weight),
        "jacobi_vs_expert_block_rel_diff": rel(jb.weight, bf.weight),
        "kl_merged": kl_merged, "kl_full_solve": kl_full, "kl_subsample_solve": kl_sub,
    }
    out["ratios"] = {
        "streamed_over_resident_per_iteration": round(st_it / bf_it, 2),
        "bf16_over_float32_per_iteration": round(bf_it / f32_it, 3),
        "subsample_speedup_wall": round(bf_wall / sub_wall, 2),
        "mixed_speedup_wall_vs_float32_resident": round(f32_wall / mx_wall, 2),
        "expert_block_speedup_wall_vs_jacobi": round(jb_wall / bf_wall, 2),
    }
    out["matvec_roofline"] = {k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in roof.items()}
    # Projection of the paper's run: per-iteration cost linear in tokens, the measured iteration count.
    iters, mixed_iters = bf.iterations, mx.iterations
    cpu_it = f32_it * PAPER_TOKENS / n_all  # the exact path solve-router takes when a float32 copy fits
    matvec_flops = 4.0 * PAPER_TOKENS * d * k
    x_bytes = PAPER_TOKENS * d * 2
    h100_fp32_it = max(matvec_flops / H100["fp32_flops"], 2 * PAPER_TOKENS * d * 4 / H100["hbm_bytes_per_s"])
    h100_bf16_it = max(matvec_flops / H100["bf16_flops"], 2 * x_bytes / H100["hbm_bytes_per_s"])
    capture_s = (OLMOE["forward_passes"] * 2 * OLMOE["active_params"] * PAPER_TOKENS
                 / (OLMOE["mfu"] * H100["bf16_flops"]))
    io_s = 3 * OLMOE["bytes"] / OLMOE["io_bytes_per_s"]
    out["projection"] = {
        "assumptions": (f"{PAPER_LAYERS} layers, {PAPER_TOKENS} tokens a layer, {iters} pcg iterations a layer "
                        "(measured here; real layers may differ); a CG iteration = one matvec (two GEMMs of "
                        "N x d x K) plus O(K d) vector work; H100 SXM peaks, no overlap of compute and memory"),
        "resident_bytes_bf16": x_bytes,
        "cpu_s_per_iteration": round(cpu_it, 2),
        "cpu_hours_solve": round(cpu_it * iters * PAPER_LAYERS / 3600, 1),
        "h100_ms_per_iteration_fp32": round(h100_fp32_it * 1e3, 1),
        "h100_ms_per_iteration_bf16_gemm": round(h100_bf16_it * 1e3, 1),
        "h100_min_solve_fp32": round(h100_fp32_it * iters * PAPER_LAYERS / 60, 1),
        "h100_min_solve_bf16_gemm": round(h100_bf16_it * iters * PAPER_LAYERS / 60, 1),
        "mixed_iterations": int(mixed_iters),
        "h100_min_solve_mixed": round(h100_bf16_it * mixed_iters * PAPER_LAYERS / 60, 1),
        "h100_min_capture": round(capture_s / 60, 1),
        "h100_min_merge_and_assemble": round(io_s / 60, 1),
        "h100_min_end_to_end_fp32": round((capture_s + io_s + h100_fp32_it * iters * PAPER_LAYERS) / 60, 1),
        "h100_min_end_to_end_mixed": round((capture_s + io_s + h100_bf16_it * mixed_iters * PAPER_LAYERS) / 60, 1),
    }
    return out


def markdown(r: dict) -> list[str]:
    gib = 2**30
    s = r["shape"]
    lines = [
        f"Solve of one layer: d {s['d']}, K {s['K']}, 2 tasks x {s['tokens_per_task']} tokens, {s['store']}, "
        f"{s['dtype']}, pcg with the {r.get('preconditioner', 'jacobi')} preconditioner unless the row says "
        f"otherwise, tol {r['tol']}, {r['threads']} threads.",
        "",
        "| inputs | iterations | ms / CG iteration | resident inputs | tokens |",
        "|---|---|---|---|---|",
    ]
    for row in r["runs"]:
        lines.append(f"| {row['run']} | {row['iterations']}{'' if row['converged'] else ' (cap)'} | "
                     f"{row['ms_per_iteration']} | {row['resident_bytes'] / gib:.3f} GiB | {row['tokens']} |")
    a, q, m, p = r["same_answer"], r["ratios"], r["matvec_roofline"], r["projection"]
    lines += [
        "",
        f"bfloat16-resident router equal to the float32-resident one, bit for bit: "
        f"{a['bf16_resident_vs_float32_resident_bitwise']}; streamed equal to resident at the same iteration count: "
        f"{a['streamed_vs_resident_at_same_iterations_bitwise']}. Streamed / resident per iteration: "
        f"{q['streamed_over_resident_per_iteration']}x; bfloat16 / float32 resident per iteration: "
        f"{q['bf16_over_float32_per_iteration']}x (the per-chunk widening). Subsample: "
        f"{q['subsample_speedup_wall']}x faster, router {a['subsample_vs_full_rel_diff']:.1e} from the full "
        f"solve; KL to the sources on all tokens: merged {', '.join(f'{v:.4f}' for v in a['kl_merged'])}, full "
        f"solve {', '.join(f'{v:.4f}' for v in a['kl_full_solve'])}, subsample solve "
        f"{', '.join(f'{v:.4f}' for v in a['kl_subsample_solve'])}. Mixed precision on the bfloat16 copy: "
        f"{q['mixed_speedup_wall_vs_float32_resident']}x less wall time than the float32-resident solve, "
        f"router {a['mixed_vs_full_rel_diff']:.1e} from it (both to tol; iterations count inner and refinement "
        f"steps)."
        + (f" Expert-block against Jacobi: {q['expert_block_speedup_wall_vs_jacobi']}x less wall time, router "
           f"{a['jacobi_vs_expert_block_rel_diff']:.1e} from it." if "expert_block_speedup_wall_vs_jacobi" in q else ""),
        f"Matvec: {m['matvec_gflops']:.0f} GFLOP/s, {m['fraction_of_mm']:.0%} of torch.mm on the same GEMMs "
        f"({m['mm_gflops']:.0f} GFLOP/s).",
        "",
        f"Projection of the paper's solve ({p['assumptions']}): inputs resident in bf16 "
        f"{p['resident_bytes_bf16'] / 1e9:.1f} GB a layer (float32: twice that); this CPU, float32-resident, "
        f"{p['cpu_s_per_iteration']} s an iteration, "
        f"~{p['cpu_hours_solve']} h for 16 layers; one H100 {p['h100_ms_per_iteration_fp32']} ms an iteration "
        f"in float32 (~{p['h100_min_solve_fp32']} min for 16 layers), {p['h100_ms_per_iteration_bf16_gemm']} ms "
        f"with bf16 GEMMs (memory-bound: X read twice; ~{p['h100_min_solve_bf16_gemm']} min at the float32 "
        f"iteration count, ~{p['h100_min_solve_mixed']} min at the {p['mixed_iterations']} iterations the mixed "
        f"solve took). End to end on one H100 (adding capture ~{p['h100_min_capture']} min at 40 % of the bf16 "
        f"peak and merge + assembly ~{p['h100_min_merge_and_assemble']} min of checkpoint I/O): "
        f"~{p['h100_min_end_to_end_fp32']} min with float32 solves, ~{p['h100_min_end_to_end_mixed']} min with "
        f"`inner_dtype: bfloat16` (the paper reports 36.2 min). Projections, not measured on a GPU.",
    ]
    return lines
