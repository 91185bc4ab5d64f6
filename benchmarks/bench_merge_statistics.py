"""Gram accumulation of merge-statistics (RegMean) against a plain layer-by-layer forward.

    python benchmarks/bench_merge_statistics.py [--hidden 512 --experts 16 --layers 2 --tokens 4096]
        [--json benchmarks/results/merge_statistics.json]

Builds a synthetic OLMoE-shaped model (random weights, float32, saved per-expert like the hub) and
pushes the same batches through it twice with harc_hpc.models.onload (one decoder layer on the
device at a time): once plainly, once with the stage's hooks (harc_hpc.stages.merge_statistics.
LayerGrams) accumulating every Gram, and once more with the hooks but without the Gram products
(the experts then run the pass's eager loop instead of transformers' implementation: the Grams'
own cost). Prints, per decoder layer, both times, their ratio (target
<= 1.5) and the device bytes of the layer's Gram accumulators, and the process's peak RSS. CPU, about a
minute with the defaults. Wall and CPU (process) times are both reported. Each pass runs ``--repeat`` times, alternating, and the fastest
of each counts (on a shared machine the slowest mostly measure the neighbours).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch


def build(root: Path, args) -> Path:
    from transformers import AutoModelForCausalLM, OlmoeConfig

    conf = OlmoeConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden // 2,
                       num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                       num_experts=args.experts, num_experts_per_tok=args.top_k, pad_token_id=None,
                       bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf)
    model.save_pretrained(root / "model")
    return root / "model"


def passes(path: Path, args) -> dict:
    from harc_hpc.io import merge_statistics as ms
    from harc_hpc.models.modeling import batches
    from harc_hpc.models.onload import OnloadedModel
    from harc_hpc.stages.merge_statistics import LayerGrams, _disk_key_fn

    device = torch.device("cpu")
    model = OnloadedModel(path, device)
    fam = model.family
    conf = model.ckpt.config
    seq = args.tokens // args.sequences
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1024, (args.sequences, seq), generator=g)
    plan = list(batches(args.sequences, args.batch_size))
    hidden = [model.embed(ids[idx.start:idx.stop]) for idx in plan]
    valid = [torch.ones(len(idx) * seq, dtype=torch.bool) for idx in plan]
    layers = []
    for j in range(model.num_layers):
        model.onload(j)
        # alternate the two passes and keep each one's fastest: the machine may be shared
        t_plain = t_grams = c_plain = c_grams = t_loop = float("inf")
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            plain = [model.run_layer(j, h) for h in hidden]
            t_plain, c_plain = min(t_plain, time.perf_counter() - t0), min(c_plain, time.process_time() - c0)
            grams = LayerGrams(model.layer(j), fam.router_module(model.model, j),
                               _disk_key_fn(model.ckpt, fam, j),
                               lambda e, j=j: ms.expert_unit_names(fam, j, e, "per_expert"), fam.num_experts(conf))
            t0, c0 = time.perf_counter(), time.process_time()
            out = []
            for h, v in zip(hidden, valid):
                grams.begin(v)
                out.append(model.run_layer(j, h))
                grams.end()
            t_grams, c_grams = min(t_grams, time.perf_counter() - t0), min(c_grams, time.process_time() - c0)
            grams.close()
            # the same pass (eager expert loop, hooks, masks) with the Gram products left out: what
            # the Grams themselves cost, apart from the experts' implementation
            bare = LayerGrams(model.layer(j), fam.router_module(model.model, j), _disk_key_fn(model.ckpt, fam, j),
                              lambda e, j=j: ms.expert_unit_names(fam, j, e, "per_expert"), fam.num_experts(conf))
            bare._add = lambda name, x: None
            t0 = time.perf_counter()
            for h, v in zip(hidden, valid):
                bare.begin(v)
                model.run_layer(j, h)
                bare.end()
            t_loop = min(t_loop, time.perf_counter() - t0)
            bare.close()
        # the Gram pass runs the experts' eager loop: the same layer output up to rounding
        diff = max(float((a - b).abs().max()) for a, b in zip(plain, out))
        scale = max(float(a.abs().max()) for a in plain)
        assert diff <= 1e-4 * scale, (diff, scale)
        nbytes = grams.nbytes()
        grams.finish()
        layers.append({"layer": j, "forward_s": round(t_plain, 3), "forward_with_grams_s": round(t_grams, 3),
                       "ratio": round(t_grams / t_plain, 2),
                       "forward_eager_experts_no_grams_s": round(t_loop, 3),
                       "ratio_to_eager": round(t_grams / t_loop, 2),
                       "forward_cpu_s": round(c_plain, 3), "forward_with_grams_cpu_s": round(c_grams, 3),
                       "cpu_ratio": round(c_grams / c_plain, 2), "gram_accumulator_bytes": nbytes,
                       "grams": len(grams.sums), "max_abs_output_difference": diff})
        model.offload(j)
        hidden = out
    model.close()
    return {"layers": layers}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp), args)
        result = passes(path, args)
    result["shape"] = {"hidden": args.hidden, "intermediate": args.hidden // 2, "experts": args.experts,
                       "top_k": args.top_k, "tokens": args.tokens, "batch_size": args.batch_size,
                       "dtype": "float32", "device": "cpu", "threads": torch.get_num_threads(),
                       "repeat": args.repeat}
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    total_f = sum(l["forward_s"] for l in result["layers"])
    total_g = sum(l["forward_with_grams_s"] for l in result["layers"])
    result["ratio"] = round(total_g / total_f, 2)
    result["ratio_to_eager"] = round(total_g / sum(l["forward_eager_experts_no_grams_s"] for l in result["layers"]), 2)
    result["cpu_ratio"] = round(sum(l["forward_with_grams_cpu_s"] for l in result["layers"])
                                / sum(l["forward_cpu_s"] for l in result["layers"]), 2)
    print(f"shape: {result['shape']}")
    print(f"{'layer':>5} {'forward s':>10} {'eager s':>8} {'+grams s':>10} {'ratio':>6} {'CPU ratio':>9} "
          f"{'vs eager':>8} {'Gram acc. MiB':>14}")
    for l in result["layers"]:
        print(f"{l['layer']:>5} {l['forward_s']:>10.3f} {l['forward_eager_experts_no_grams_s']:>8.3f} "
              f"{l['forward_with_grams_s']:>10.3f} {l['ratio']:>6.2f} {l['cpu_ratio']:>9.2f} "
              f"{l['ratio_to_eager']:>8.2f} {l['gram_accumulator_bytes'] / 2**20:>14.1f}")
    print(f"total: forward {total_f:.3f} s, with Grams {total_g:.3f} s, ratio {result['ratio']:.2f} "
          f"(CPU time ratio {result['cpu_ratio']:.2f}; target <= 1.5); against the same pass without the Gram "
          f"products {result['ratio_to_eager']:.2f}; peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
