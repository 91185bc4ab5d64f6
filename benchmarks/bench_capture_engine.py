"""Capture time of the layer-wise engine against an earlier version of it, on the same checkpoint.

    python benchmarks/bench_capture_engine.py --baseline-root /path/to/old/checkout
        [--layers 24] [--hidden 1024] [--experts 8] [--intermediate 2048] [--tokens 2048] [--repeats 2]

The engine now runs the model's own forward (the backbone records each decoder layer's call, stand-in
layers, transformers' conversion mapping); the one it replaced re-derived masks and rotary embeddings
by hand. This builds bench_scale's synthetic Mixtral-shaped checkpoint (random bf16 weights, no
download) once and runs the same capture loop (embed every batch, then per decoder layer: onload,
every batch through it with the routers' inputs recorded, offload) in a fresh process per run,
importing ``harc_hpc`` from ``--baseline-root`` or from this checkout, alternating them ``--repeats``
times. It prints and writes (``capture_engine.json`` / ``.md`` under ``--out``) the best time of
each, their ratio and whether the router inputs are identical (bit for bit on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(root: str, path: str, tokens: int, seq: int, out: str) -> None:
    sys.path.insert(0, root)
    import torch

    from harc_hpc.models.modeling import RouterInputRecorder
    from harc_hpc.models.onload import OnloadedModel

    assert Path(sys.modules["harc_hpc"].__file__).resolve().is_relative_to(Path(root).resolve())
    import transformers  # noqa: F401  (in the import baseline, as in a stage)

    imported = _status_bytes("VmRSS")
    torch.manual_seed(0)
    n_seq = max(1, tokens // seq)
    ids = torch.randint(0, 32000, (n_seq, seq))
    batch = 4
    t0 = time.perf_counter()
    om = OnloadedModel(path, torch.device("cpu"))
    states = [om.embed(ids[s:s + batch]) for s in range(0, n_seq, batch)]
    om.release_embeddings()
    records: dict[int, list] = {}
    with RouterInputRecorder({l: om.layer(l).mlp.gate for l in range(om.num_layers)}) as rec:
        for l in range(om.num_layers):
            om.onload(l)
            for i, h in enumerate(states):
                states[i] = om.run_layer(l, h)
                records.setdefault(l, []).append(rec.pop(l).clone())
            om.offload(l)
    seconds = time.perf_counter() - t0
    torch.save({l: torch.cat(v) for l, v in records.items()}, out + ".pt")
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve (the parent built the checkpoint)
    Path(out).write_text(json.dumps({"seconds": seconds, "tokens": n_seq * seq, "import_rss_bytes": imported,
                                     "peak_rss_bytes": _status_bytes("VmHWM")}))


def _status_bytes(field: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-root", type=Path, help="a checkout of the earlier version (its harc_hpc is imported)")
    ap.add_argument("--baseline-name", default="earlier engine")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--child", nargs=3, metavar=("ROOT", "PATH", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.tokens, a.seq, a.child[2])
        return 0
    if a.baseline_root is None:
        ap.error("--baseline-root is required")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    from bench_scale import build

    roots = {"baseline": str(a.baseline_root.resolve()), "current": str(ROOT)}
    times: dict[str, list[float]] = {k: [] for k in roots}
    over_import: dict[str, list[int]] = {k: [] for k in roots}
    with tempfile.TemporaryDirectory(prefix="harc-bench-engine-") as tmp:
        tmp = Path(tmp)
        model_bytes = build(tmp / "model", a.layers, a.hidden, a.experts, a.intermediate)
        records = {}
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        for r in range(a.repeats):
            for name, root in roots.items():
                out = str(tmp / f"{name}-{r}.json")
                subprocess.run([sys.executable, __file__, "--tokens", str(a.tokens), "--seq", str(a.seq),
                                "--child", root, str(tmp / "model"), out], check=True, env=env)
                res = json.loads(Path(out).read_text())
                times[name].append(res["seconds"])
                over_import[name].append(res["peak_rss_bytes"] - res["import_rss_bytes"])
                records[name] = torch.load(out + ".pt")
                print(f"run {r + 1}: {name}: {res['seconds']:.1f} s", flush=True)
        same = all(torch.equal(records["baseline"][l], records["current"][l]) for l in records["baseline"])
    best = {k: min(v) for k, v in times.items()}
    row = {
        "model": {"layers": a.layers, "hidden": a.hidden, "experts": a.experts, "intermediate": a.intermediate,
                  "bf16_bytes": model_bytes},
        "tokens": a.tokens, "repeats": a.repeats, "baseline": a.baseline_name,
        "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "best_seconds": {k: round(v, 2) for k, v in best.items()},
        "current_over_baseline": round(best["current"] / best["baseline"], 3),
        "peak_rss_over_import_bytes": {k: max(v) for k, v in over_import.items()},
        "peak_rss_over_import_x_model": {k: round(max(v) / model_bytes, 3) for k, v in over_import.items()},
        "router_inputs_identical": same,
        "note": "CPU, one process per run, runs alternated; best of the repeats",
    }
    lines = [
        "| engine | best capture time | runs | peak RSS over imports | x model (bf16) |",
        "|---|---|---|---|---|",
        *(f"| {label} | {best[k]:.1f} s | {', '.join(f'{t:.1f}' for t in times[k])} | "
          f"{max(over_import[k]) / 2**30:.2f} GiB | {row['peak_rss_over_import_x_model'][k]:.2f} |"
          for k, label in (("baseline", a.baseline_name), ("current", "current (the model's own forward)"))),
        "",
        f"Model: {a.layers} layers, d {a.hidden}, {a.experts} experts, I {a.intermediate} "
        f"({model_bytes / 2**30:.2f} GiB bf16); {a.tokens} tokens. Current / earlier: "
        f"{row['current_over_baseline']:.2f}x; router inputs identical: {same}.",
    ]
    print("\n".join(lines))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "capture_engine.json").write_text(json.dumps(row, indent=2) + "\n")
    (a.out / "capture_engine.md").write_text("\n".join(lines) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
