"""Capture at real widths: one decoder layer onloaded at a time vs the whole model loaded.

    python benchmarks/bench_scale.py [--layers 24] [--hidden 1024] [--experts 8] [--intermediate 2048]
                                     [--tokens 2048] [--out benchmarks/results]

A synthetic Mixtral-shaped checkpoint (random bf16 weights written with save_pretrained, no
download) is pushed through both paths, each in its own process so that its peak RSS is its own:

* whole-model: ``from_pretrained`` of the whole checkpoint (what capture did before), one forward
  per batch with hooks on every router;
* onloaded: harc_hpc.models.onload.OnloadedModel, the path capture-activations runs: the skeleton on
  the meta device, one decoder layer read from the shards at a time, every batch through it.

Both record the router inputs of every layer, and the script checks that they are identical (bit
for bit on CPU), then prints peak RSS, tokens/s and their ratios, and writes
``scale.json`` / ``scale.md`` under ``--out``. The layer count is a parameter so that the flat
memory of the onloaded path can be seen against the model's size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build(path: Path, layers: int, hidden: int, experts: int, intermediate: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                        num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=4096,
                        dtype="bfloat16")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="1GB")
    return sum(p.numel() for p in model.parameters()) * 2


def child(mode: str, path: str, tokens: int, seq: int, out: str) -> None:
    import torch

    torch.manual_seed(0)
    from harc_hpc.models.modeling import RouterInputRecorder, load_causal_lm

    n_seq = max(1, tokens // seq)
    ids = torch.randint(0, 32000, (n_seq, seq))
    batch = 4
    t0 = time.perf_counter()
    records: dict[int, list] = {}
    if mode == "whole":
        model = load_causal_lm(path, torch.device("cpu"))
        layers = range(model.config.num_hidden_layers)
        routers = {l: model.model.layers[l].mlp.gate for l in layers}
        with RouterInputRecorder(routers) as rec, torch.no_grad():
            for s in range(0, n_seq, batch):
                model.model(input_ids=ids[s:s + batch])
                for l in layers:
                    records.setdefault(l, []).append(rec.pop(l)[:, :8].clone())
    else:
        from harc_hpc.models.onload import OnloadedModel

        om = OnloadedModel(path, torch.device("cpu"))
        states = [om.embed(ids[s:s + batch]) for s in range(0, n_seq, batch)]
        om.release_embeddings()
        routers = {l: om.layer(l).mlp.gate for l in range(om.num_layers)}
        with RouterInputRecorder(routers) as rec:
            for l in range(om.num_layers):
                om.onload(l)
                for i, h in enumerate(states):
                    states[i] = om.run_layer(l, h)
                    records.setdefault(l, []).append(rec.pop(l)[:, :8].clone())
                om.offload(l)
    seconds = time.perf_counter() - t0
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child would report the peak
    # of the parent that built the checkpoint.
    rss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    torch.save({l: torch.cat(v) for l, v in records.items()}, out + ".pt")
    Path(out).write_text(json.dumps({"mode": mode, "seconds": seconds, "peak_rss_bytes": rss,
                                     "tokens": n_seq * seq}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--part", choices=("capture", "solve", "all"), default="all",
                    help="capture (onloaded vs whole model), solve (resident / streamed / subsampled), or both")
    ap.add_argument("--solve-tokens", type=int, default=16384, help="tokens per task of the solve part")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.tokens, a.seq, a.child[2])
        return 0
    previous = json.loads((a.out / "scale.json").read_text()) if (a.out / "scale.json").is_file() else {}
    ok = True
    capture = previous.get("capture", previous if "whole" in previous else None)  # (the older flat layout)
    if a.part in ("capture", "all"):
        capture, lines_capture, ok = capture_part(a)
    solve = previous.get("solve")
    if a.part in ("solve", "all"):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import scale_solve

        solve = scale_solve.run(tokens=a.solve_tokens)
        ok = ok and solve["same_answer"]["bf16_resident_vs_float32_resident_bitwise"] \
            and solve["same_answer"]["streamed_vs_resident_at_same_iterations_bitwise"]
    lines = ["## Capture", ""] + (capture_markdown(capture) if capture else ["(not run)"])
    lines += ["", "## Solve", ""] + (scale_solve_markdown(solve) if solve else ["(not run)"])
    print("\n".join(lines))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "scale.json").write_text(json.dumps({"capture": capture, "solve": solve}, indent=2) + "\n")
    (a.out / "scale.md").write_text("\n".join(lines) + "\n")
    return 0 if ok else 1


def scale_solve_markdown(solve: dict) -> list[str]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import scale_solve

    return scale_solve.markdown(solve)


def capture_part(a):
    import torch

    with tempfile.TemporaryDirectory(prefix="harc-bench-scale-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        model_bytes = build(tmp / "model", a.layers, a.hidden, a.experts, a.intermediate)
        print(f"synthetic Mixtral-shaped checkpoint: {a.layers} layers, d {a.hidden}, {a.experts} experts, "
              f"I {a.intermediate}: {model_bytes / 2**30:.2f} GiB bf16 (built in {time.perf_counter() - t0:.0f} s)")
        results = {}
        for mode in ("whole", "onload"):
            out = str(tmp / f"{mode}.json")
            subprocess.run([sys.executable, __file__, "--tokens", str(a.tokens), "--seq", str(a.seq),
                            "--child", mode, str(tmp / "model"), out], check=True)
            results[mode] = json.loads(Path(out).read_text())
            results[mode]["records"] = torch.load(out + ".pt")
        same = all(torch.equal(results["whole"]["records"][l], results["onload"]["records"][l])
                   for l in results["whole"]["records"])
    w, o = results["whole"], results["onload"]
    row = {
        "model": {"layers": a.layers, "hidden": a.hidden, "experts": a.experts, "intermediate": a.intermediate,
                  "bf16_bytes": model_bytes},
        "tokens": w["tokens"],
        "whole": {"peak_rss_bytes": w["peak_rss_bytes"], "seconds": round(w["seconds"], 2),
                  "tokens_per_s": round(w["tokens"] / w["seconds"], 1)},
        "onload": {"peak_rss_bytes": o["peak_rss_bytes"], "seconds": round(o["seconds"], 2),
                   "tokens_per_s": round(o["tokens"] / o["seconds"], 1)},
        "rss_ratio_whole_over_onload": round(w["peak_rss_bytes"] / o["peak_rss_bytes"], 2),
        "speed_ratio_onload_over_whole": round(w["seconds"] / o["seconds"], 2),
        "router_inputs_identical": same,
        "note": "CPU, float32 compute (a bf16 checkpoint is upcast on CPU), peak RSS of each child process",
    }
    return row, capture_markdown(row), same


def capture_markdown(row: dict) -> list[str]:
    gib = 2**30
    w, o, m = row["whole"], row["onload"], row["model"]
    model_bytes = m["bf16_bytes"]
    layer_bytes = model_bytes / m["layers"]  # roughly: embeddings spread over the layers
    same = row["router_inputs_identical"]
    return [
        "| path | peak RSS | x model (bf16) | tokens/s |",
        "|---|---|---|---|",
        f"| whole model | {w['peak_rss_bytes'] / gib:.2f} GiB | {w['peak_rss_bytes'] / model_bytes:.2f} | {row['whole']['tokens_per_s']} |",
        f"| onloaded, one layer at a time | {o['peak_rss_bytes'] / gib:.2f} GiB | {o['peak_rss_bytes'] / model_bytes:.2f} | {row['onload']['tokens_per_s']} |",
        "",
        f"Model: {m['layers']} layers, d {m['hidden']}, {m['experts']} experts, I {m['intermediate']} "
        f"({model_bytes / gib:.2f} GiB bf16, ~{layer_bytes / gib:.2f} GiB a layer); {row['tokens']} tokens. "
        f"Whole / onloaded peak RSS: {row['rss_ratio_whole_over_onload']}x; speed onloaded / whole: "
        f"{row['speed_ratio_onload_over_whole']}x; router inputs identical: {same}.",
    ]


if __name__ == "__main__":
    sys.exit(main())
