"""The GPU half of the scale benchmark: one prepared command for a machine with a CUDA GPU.

    python benchmarks/bench_gpu.py                 # on a CUDA machine: capture + solve, ~5 min on one H100/H200
    python benchmarks/bench_gpu.py --device cpu --quick   # the same code path at toy sizes (a check, not a figure)

1. **Capture** of the synthetic Mixtral-shaped checkpoint that ``bench_scale.py`` builds (24 layers,
   d 1024, 8 experts, bf16), on the device: the whole model (``from_pretrained`` + ``.to(device)``,
   what capture did before onloading) against the onloaded path (one decoder layer on the device at a
   time). Each path runs in its own process; printed: peak GPU memory (``torch.cuda.max_memory_allocated``),
   peak host RSS, tokens/s, and whether the router inputs agree (bf16 GEMMs on a GPU are not bitwise
   reproducible across different kernels, so: max relative difference).
2. **Solve** of one OLMoE-shaped layer (d 2048, K 64) with its inputs resident on the device in bf16
   (as the activation store keeps them), at ``--solve-tokens`` per task (default: the paper's 2.8 M,
   two tasks: 22.9 GB of inputs): ms per CG iteration and iterations to tol 1e-6 for the float32 solve
   and for ``inner_dtype=bfloat16`` (the default on such GPUs), against the H100 projection that
   ``bench_scale.py`` wrote into ``benchmarks/results/scale.json``.

Writes ``benchmarks/results/gpu.json`` and ``gpu.md``. Synthetic weights and inputs; nothing is
downloaded. Refuses to run on ``cuda`` without a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peaks(device) -> dict:
    import torch

    rss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    out = {"peak_rss_bytes": rss}
    if device.type == "cuda":
        out["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


def capture_child(mode: str, path: str, device_name: str, tokens: int, seq: int, out: str) -> None:
    """One capture path in this process; router inputs of 8 columns per layer kept for the comparison."""
    import torch

    from harc_hpc.models.modeling import RouterInputRecorder, load_causal_lm

    device = torch.device(device_name)
    torch.manual_seed(0)
    n_seq = max(1, tokens // seq)
    ids = torch.randint(0, 32000, (n_seq, seq))
    batch = 4
    records: dict[int, list] = {}
    _sync(device)
    t0 = time.perf_counter()
    if mode == "whole":
        model = load_causal_lm(path, device)
        layers = range(model.config.num_hidden_layers)
        with RouterInputRecorder({l: model.model.layers[l].mlp.gate for l in layers}) as rec, torch.no_grad():
            for s in range(0, n_seq, batch):
                model.model(input_ids=ids[s:s + batch].to(device))
                for l in layers:
                    records.setdefault(l, []).append(rec.pop(l)[:, :8].float().cpu())
    else:
        from harc_hpc.models.onload import OnloadedModel

        om = OnloadedModel(path, device)
        states = [om.embed(ids[s:s + batch].to(device)) for s in range(0, n_seq, batch)]
        om.release_embeddings()
        with RouterInputRecorder({l: om.layer(l).mlp.gate for l in range(om.num_layers)}) as rec:
            for l in range(om.num_layers):
                om.onload(l)
                for i, h in enumerate(states):
                    states[i] = om.run_layer(l, h)
                    records.setdefault(l, []).append(rec.pop(l)[:, :8].float().cpu())
                om.offload(l)
    _sync(device)
    seconds = time.perf_counter() - t0
    torch.save({l: torch.cat(v) for l, v in records.items()}, out + ".pt")
    Path(out).write_text(json.dumps({"mode": mode, "seconds": seconds, "tokens": n_seq * seq, **_peaks(device)}))


def capture_part(a, device) -> dict:
    import torch

    from bench_scale import build

    with tempfile.TemporaryDirectory(prefix="harc-bench-gpu-") as tmp:
        path = Path(tmp) / "model"
        model_bytes = build(path, a.layers, a.hidden, a.experts, a.intermediate)
        rows = {}
        for mode in ("whole", "onloaded"):
            out = str(Path(tmp) / f"{mode}.json")
            subprocess.run([sys.executable, __file__, "--child", mode, str(path), out, "--device", str(device),
                            "--tokens", str(a.tokens), "--seq", str(a.seq)], check=True)
            rows[mode] = json.loads(Path(out).read_text())
            rows[mode]["inputs"] = torch.load(out + ".pt")
        diff = max(float((rows["whole"]["inputs"][l] - rows["onloaded"]["inputs"][l]).norm()
                         / rows["whole"]["inputs"][l].norm().clamp(min=1e-30)) for l in rows["whole"]["inputs"])
        for r in rows.values():
            del r["inputs"]
    return {"model_bytes": model_bytes, "layers": a.layers, "whole": rows["whole"], "onloaded": rows["onloaded"],
            "router_inputs_max_rel_diff": diff}


def synthetic_inputs(n: int, d: int, device, seed: int, rank: int = 256):
    """(n, d) bf16 router-input-like rows made on the device: a decaying low-rank spectrum, a common
    and a per-task mean, noise, RMS-normalised (like bench_solver.make_layer, generated in chunks)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=g, device=device))[0]
    spectrum = 2.0 * torch.arange(1, rank + 1, device=device, dtype=torch.float32) ** -0.5
    mean = 0.3 * torch.randn(d, generator=g, device=device)
    out = torch.empty(n, d, dtype=torch.bfloat16, device=device)
    step = 1 << 18
    for s in range(0, n, step):
        m = min(step, n - s)
        h = (torch.randn(m, rank, generator=g, device=device) * spectrum) @ basis.T + mean
        h += 0.7 * torch.randn(m, d, generator=g, device=device)
        out[s:s + m] = (h / h.pow(2).mean(dim=1, keepdim=True).sqrt()).to(torch.bfloat16)
    return out


def solve_part(a, device) -> dict:
    import torch

    from harc_hpc.math import solve_router

    d, k, n = a.solve_d, a.solve_k, a.solve_tokens
    xs = [synthetic_inputs(n, d, device, seed=t + 1) for t in range(2)]
    g = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(k, d, generator=g, device=device) / math.sqrt(d)
    base *= 2.5 / float((xs[0][:4096].float() @ base.T).std())
    sources = [base + 0.8 * float(base.norm()) / math.sqrt(k * d) * torch.randn(k, d, generator=g, device=device)
               for _ in range(2)]
    merged = sum(sources) / 2
    rows = {}
    for name, inner in (("float32", None), ("bf16_inner", torch.bfloat16)):
        stamps = []
        _sync(device)
        t0 = time.perf_counter()
        sol = solve_router(xs, sources, merged, alpha=0.9, solver="pcg", tol=1e-6, max_iter=1000,
                           compute_dtype=torch.float32, keep_input_dtype=True, inner_dtype=inner,
                           chunk_tokens=1 << 20, callback=lambda it, rel: stamps.append(time.perf_counter()))
        _sync(device)
        wall = time.perf_counter() - t0
        per_it = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1) if len(stamps) > 1 else wall
        rows[name] = {"iterations": sol.iterations, "converged": sol.converged, "seconds": wall,
                      "ms_per_iteration": 1e3 * per_it, "kl_before": sum(sol.kl_before),
                      "kl_after": sum(sol.kl_after)}
        rows[name]["weight"] = sol.weight.double().cpu()
    diff = float((rows["float32"]["weight"] - rows["bf16_inner"]["weight"]).norm() / rows["float32"]["weight"].norm())
    for r in rows.values():
        del r["weight"]
    out = {"d": d, "K": k, "tokens_per_task": n, "inputs_bytes": 2 * n * d * 2, "solves": rows,
           "bf16_vs_float32_router_rel_diff": diff, **_peaks(device)}
    scale = ROOT / "benchmarks" / "results" / "scale.json"
    if scale.is_file():
        projection = json.loads(scale.read_text()).get("solve", {}).get("projection")
        if projection:
            out["h100_projection_from_scale_json"] = projection
    return out


def markdown(result: dict) -> list[str]:
    lines = [f"Device: {result['device']} ({result.get('device_name', '')}); torch {result['torch']}", ""]
    c = result.get("capture")
    if c:
        lines += ["## Capture", "", "| path | peak GPU | peak RSS | tokens/s |", "|---|---|---|---|"]
        for mode in ("whole", "onloaded"):
            r = c[mode]
            gpu = f"{r['peak_device_bytes'] / 2**30:.2f} GiB" if "peak_device_bytes" in r else "-"
            lines.append(f"| {mode} | {gpu} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['tokens'] / r['seconds']:.0f} |")
        lines += ["", f"Model {c['model_bytes'] / 2**30:.2f} GiB in bf16, {c['layers']} layers; router inputs max "
                      f"relative difference {c['router_inputs_max_rel_diff']:.1e}.", ""]
    s = result.get("solve")
    if s:
        lines += ["## Solve", "", f"d {s['d']}, K {s['K']}, 2 x {s['tokens_per_task']} tokens "
                                  f"({s['inputs_bytes'] / 1e9:.1f} GB of bf16 inputs resident)", "",
                  "| solve | iterations | ms / iteration | wall | KL before -> after |", "|---|---|---|---|---|"]
        for name, r in s["solves"].items():
            lines.append(f"| {name} | {r['iterations']} | {r['ms_per_iteration']:.1f} | {r['seconds']:.1f} s | "
                         f"{r['kl_before']:.4f} -> {r['kl_after']:.4f} |")
        lines += ["", f"bf16-inner router vs float32: {s['bf16_vs_float32_router_rel_diff']:.1e} relative."]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="toy sizes: a check of the code path, not a figure")
    ap.add_argument("--part", choices=("capture", "solve", "all"), default="all")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=65536, help="capture tokens")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--solve-tokens", type=int, default=2_800_000, help="tokens per task of the solve")
    ap.add_argument("--solve-d", type=int, default=2048, help="router input width (OLMoE: 2048)")
    ap.add_argument("--solve-k", type=int, default=64, help="experts (OLMoE: 64)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    import torch

    device = torch.device(a.device)
    if a.child:
        capture_child(a.child[0], a.child[1], a.device, a.tokens, a.seq, a.child[2])
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available (use --device cpu --quick to check the code path)",
              file=sys.stderr)
        return 2
    if a.quick:
        a.layers, a.hidden, a.intermediate, a.tokens, a.seq = 4, 256, 512, 1024, 256
        a.solve_tokens, a.solve_d, a.solve_k = 4096, 512, 16
    result = {"device": str(device), "torch": torch.__version__, "quick": a.quick}
    if device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(device)
    if a.part in ("capture", "all"):
        result["capture"] = capture_part(a, device)
    if a.part in ("solve", "all"):
        result["solve"] = solve_part(a, device)
    lines = markdown(result)
    print("\n".join(lines))
    if not a.quick:  # a toy run is not a figure
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
        (a.out / "gpu.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
