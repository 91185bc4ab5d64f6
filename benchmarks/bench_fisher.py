"""Fisher accumulation (harc_hpc.math.fisher.diagonal_fisher) against a plain forward + backward of the
same model on the same sequences, and its memory, on a synthetic OLMoE-shaped MoE on the CPU.

    python benchmarks/bench_fisher.py                      # d 128, 2 layers, 8 experts top-2: under a minute
    python benchmarks/bench_fisher.py --d 256 --layers 4 --experts 16 --top-k 4 --sequences 16 --length 256  # moderate
    python benchmarks/bench_fisher.py --json benchmarks/results/fisher.json --md benchmarks/results/fisher.md

Timed, each the best of ``--repeats`` interleaved rounds over the same ``--sequences`` x ``--length`` tokens:

* ``fwd+bwd batched``: the plain training step's work, the summed token log-likelihood of a batch
  of ``--batch`` sequences, one backward per batch (gradients kept in ``.grad``, zeroed per batch);
* ``fwd+bwd per sequence``: the same, one sequence at a time (what a per-example Fisher must do);
* ``fisher``: diagonal_fisher (one forward + backward per sequence, every gradient squared into a
  float32 accumulator as backward produces it), and the same with gradient checkpointing.

Memory: the resident set is sampled every 2 ms by a thread; each mode reports its peak above the
resident set just before it started (the model and the data already in memory), next to the bytes
of the model's parameters and of the Fisher accumulators (4 per parameter).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harc_hpc.math.fisher import diagonal_fisher, sequence_log_likelihood  # noqa: E402
from harc_hpc.models.onload import _return_freed_memory  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRss:
    """Peak resident set above the level at entry, sampled every ``period`` seconds."""

    def __init__(self, period=0.002):
        self.period = period

    def __enter__(self):
        _return_freed_memory()
        self.start = rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
        self.above = self.peak - self.start


def build_model(args):
    from transformers import OlmoeConfig, AutoModelForCausalLM

    cfg = OlmoeConfig(vocab_size=args.vocab, hidden_size=args.d, intermediate_size=args.d,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                      num_experts=args.experts, num_experts_per_tok=args.top_k,
                      max_position_embeddings=max(512, args.length), pad_token_id=None,
                      bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    return model


def fwd_bwd_batched(model, seqs, batch):
    for i in range(0, len(seqs), batch):
        ids = torch.stack(seqs[i:i + batch])  # equal lengths: no padding
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(2, ids[:, 1:, None]).sum()
        logp.backward()
        model.zero_grad(set_to_none=True)


def fwd_bwd_per_sequence(model, seqs):
    for ids in seqs:
        ll, _ = sequence_log_likelihood(model, ids, None)
        ll.backward()
        model.zero_grad(set_to_none=True)


def measure(modes: dict, repeats: int) -> dict:
    """{name: (best seconds, largest peak RSS above start)}; the modes run in interleaved rounds, so
    a burst of load from other processes hits every mode alike rather than one."""
    best = {name: (float("inf"), 0) for name in modes}
    for _ in range(repeats):
        for name, fn in modes.items():
            with PeakRss() as mem:
                t = time.perf_counter()
                fn()
                seconds = time.perf_counter() - t
            best[name] = (min(best[name][0], seconds), max(best[name][1], mem.above))
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    _return_freed_memory(first=True)
    model = build_model(args)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, args.vocab, (args.length,), generator=g) for _ in range(args.sequences)]
    n_params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fwd_bwd_per_sequence(model, seqs[:1])  # warm-up (allocator, kernels)

    result = {}

    def fisher(ckpt):
        result["r"] = diagonal_fisher(model, seqs, gradient_checkpointing=ckpt)

    rows = measure({
        "fwd+bwd batched": lambda: fwd_bwd_batched(model, seqs, args.batch),
        "fwd+bwd per sequence": lambda: fwd_bwd_per_sequence(model, seqs),
        "fisher": lambda: fisher(False),
        "fisher, gradient checkpointing": lambda: fisher(True),
    }, args.repeats)
    acc_bytes = result["r"].accumulator_bytes
    base_batched, base_seq = rows["fwd+bwd batched"][0], rows["fwd+bwd per sequence"][0]
    out = {
        "command": " ".join(["python benchmarks/bench_fisher.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": {"family": "olmoe (synthetic)", "hidden": args.d, "layers": args.layers, "experts": args.experts,
                  "top_k": args.top_k, "vocab": args.vocab, "parameters": n_params, "dtype": "float32"},
        "data": {"sequences": args.sequences, "length": args.length, "batch": args.batch},
        "parameter_bytes": model_bytes,
        "accumulator_bytes": acc_bytes,
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "rows": {name: {"seconds": round(s, 3), "vs_batched": round(s / base_batched, 2),
                        "vs_per_sequence": round(s / base_seq, 2), "peak_rss_above_start_bytes": peak}
                 for name, (s, peak) in rows.items()},
        "target": "fisher <= 3x a forward+backward (batched) on the same sequences",
    }
    out["target_met"] = out["rows"]["fisher"]["vs_batched"] <= 3.0
    text = render(out)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    if args.md:
        args.md.write_text(text)
    return 0


def render(out) -> str:
    mib = 1 << 20
    m, d = out["model"], out["data"]
    lines = [f"# Fisher accumulation (synthetic OLMoE: d {m['hidden']}, {m['layers']} layers, {m['experts']} experts "
             f"top-{m['top_k']}, vocab {m['vocab']}, {m['parameters'] / 1e6:.1f} M parameters, float32)", "",
             f"`{out['command']}`: {d['sequences']} sequences x {d['length']} tokens, batches of "
             f"{d['batch']} for the batched baseline; best of the interleaved rounds; {out['machine']['cpus']} CPUs, "
             f"{out['machine']['threads']} threads, torch {out['machine']['torch']}. Parameters "
             f"{out['parameter_bytes'] / mib:.1f} MiB, Fisher accumulators {out['accumulator_bytes'] / mib:.1f} MiB.", "",
             "| run | wall | vs fwd+bwd batched | vs fwd+bwd per sequence | peak RSS above start |",
             "|---|---|---|---|---|"]
    for name, r in out["rows"].items():
        lines.append(f"| {name} | {r['seconds']:.2f} s | {r['vs_batched']:.2f}x | {r['vs_per_sequence']:.2f}x | "
                     f"{r['peak_rss_above_start_bytes'] / mib:.1f} MiB |")
    lines += ["", f"Target ({out['target']}): {'met' if out['target_met'] else 'NOT met'}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
