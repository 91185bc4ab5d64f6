"""Peak scratch disk of a run: the streamed capture (block size 1) against the layer-wise one.

    python benchmarks/bench_scratch.py [--layers 4] [--out benchmarks/results]

Runs the whole pipeline twice on the tiny OLMoE sources of the tests (debug executor, float32
stores, 64-token chunks, run.retention delete-intermediate): once as configured (harc.block_size 1:
the streamed capture, one residual store per layer, consumed chunk by chunk by the next capture) and
once with the layer-wise capture forced at block size 1 (hidden-state caches plus router inputs per
block, in-flight layer checkpoints: what the run did before). A probe sums the bytes under the run's
scratch folders (hidden/, activations/, partial/) after every chunk write, checkpoint and deletion,
and the peak is divided by one block's router inputs (one layer, every task's tokens). Both runs
must give the same routers and model, byte for byte. Writes scratch.json (the README's table quotes
it through readme_figures.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CHUNK = 64
SCRATCH = ("hidden", "activations", "partial")


def scratch_bytes(run_dir: Path) -> int:
    return sum(p.stat().st_size for sub in SCRATCH for p in (run_dir / sub).rglob("*")
               if p.is_file() and not p.is_symlink()) if run_dir.exists() else 0


def probed_run(config: Path, streamed: bool) -> tuple[int, int, dict]:
    """(peak scratch bytes, one block's router-input bytes, sha256 of the final routers and model)."""
    from harc_hpc.config import load_config
    from harc_hpc.io.activations import ActivationWriter, TokenStore
    from harc_hpc.pipeline import records
    from harc_hpc.pipeline.api import submit_run
    from harc_hpc.stages import capture_activations, layout
    from pipeline_fixtures import final_bytes

    cfg = load_config(config)
    peak = [0]
    patched = [(ActivationWriter, "write"), (ActivationWriter, "_flush"), (capture_activations, "_checkpoint"),
               (capture_activations, "_delete_chunks"), (records, "retire_if_consumed")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in patched]

    def probe(fn):
        def probed(*args, **kwargs):
            out = fn(*args, **kwargs)
            peak[0] = max(peak[0], scratch_bytes(cfg.run_dir))
            return out
        return probed

    for owner, name, fn in saved:
        setattr(owner, name, probe(fn))
    streamed_rule = capture_activations.streamed
    if not streamed:
        capture_activations.streamed = lambda c: False
    try:
        _, outcome = submit_run(cfg, executor="debug", echo=lambda line: None)
        if not outcome.ok:
            raise SystemExit(f"the run failed: {outcome.failed}")
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
        capture_activations.streamed = streamed_rule
    d = json.loads((cfg.run_dir / "merged" / "config.json").read_text())["hidden_size"]
    one_block = sum(TokenStore(layout.token_store(cfg.run_dir, t)).num_selected for t in cfg.task_names) * d * 4
    return peak[0], one_block, final_bytes(cfg.run_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args(argv)
    from pipeline_fixtures import build_tiny_sources, write_config

    with tempfile.TemporaryDirectory(prefix="harc-bench-scratch-") as tmp:
        tmp = Path(tmp)
        sources = build_tiny_sources(tmp / "src", layers=a.layers)
        runs = {}
        for name, streamed in (("streamed", True), ("layerwise", False)):
            config = write_config(tmp, sources, name=name, executor="debug", extra={
                "calibration.chunk_tokens": CHUNK, "calibration.batch_size": 2, "calibration.compression": "none"})
            runs[name] = probed_run(config, streamed)
    (peak, one, final), (before, _, final_before) = runs["streamed"], runs["layerwise"]
    out = {"setup": f"tiny OLMoE, {a.layers} layers, 2 tasks, float32 stores, {CHUNK}-token chunks",
           "one_block_bytes": one, "peak_bytes": peak, "before_peak_bytes": before,
           "peak_ratio": round(peak / one, 3), "before_ratio": round(before / one, 3),
           "same_model": final == final_before}
    print(json.dumps(out, indent=2))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "scratch.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0 if out["same_model"] else 1


if __name__ == "__main__":
    sys.exit(main())
