"""Activation-store write throughput: slices buffered to whole chunks vs every slice written at once.

    python benchmarks/bench_zarr_writes.py [--tokens 65536] [--dim 2048] [--batch 4096] [--chunk 16384]
                                           [--compression]

Capture writes one batch of router inputs at a time (calibration.batch_size sequences) into arrays
chunked along tokens (calibration.chunk_tokens). Written straight through, every batch that covers
part of a chunk makes Zarr read, decode, merge, encode and write the whole chunk again; buffered
(the default of ActivationWriter), each chunk is encoded and written once. Both runs write the
same synthetic bf16 data, in the same process; the script prints MB/s of each and the ratio, and
checks that the two stores hold identical chunk files.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harc_hpc.io.activations import COMPRESSIONS, ActivationArray, ActivationWriter  # noqa: E402


def write_store(root: Path, x: torch.Tensor, batch: int, chunk: int, buffered: bool) -> float:
    t0 = time.perf_counter()
    w = ActivationWriter(root, chunk_tokens=chunk, dtype="bfloat16", buffer_chunks=buffered)
    w.create("layer-000/task", x.shape[0], x.shape[1], np.array([0, x.shape[0]]))
    for start in range(0, x.shape[0], batch):
        w.write("layer-000/task", start, x[start:start + batch])
    w.close()
    return time.perf_counter() - t0


def chunk_bytes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "zarr.json"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compression", action="store_true", help="also measure each store compression")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.dim).to(torch.bfloat16)
    mb = x.numel() * 2 / 1e6
    work = Path(tempfile.mkdtemp(prefix="bench-zarr-"))
    best = {}
    try:
        for r in range(args.repeats):
            for buffered in (False, True):  # interleaved, so both see the same page-cache state
                root = work / f"{buffered}-{r}.zarr"
                s = write_store(root, x, args.batch, args.chunk, buffered)
                best[buffered] = min(best.get(buffered, float("inf")), s)
        same = chunk_bytes(work / "True-0.zarr") == chunk_bytes(work / "False-0.zarr")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.tokens} tokens x {args.dim} bf16 ({mb:.0f} MB), {args.batch}-token batches into "
          f"{args.chunk}-token chunks; torch {torch.__version__}, best of {args.repeats}")
    print(f"written straight through : {best[False]:6.2f} s  {mb / best[False]:7.1f} MB/s")
    print(f"buffered to whole chunks : {best[True]:6.2f} s  {mb / best[True]:7.1f} MB/s")
    print(f"ratio (buffered / straight): {best[False] / best[True]:.2f}x; identical chunk files: {same}")
    ok = compression_table(args, x) if args.compression else True
    return 0 if same and ok else 1


def store_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def read_pass(root: Path) -> tuple[float, torch.Tensor]:
    """One pass over the array as a streamed solve makes it: chunk by chunk, checksummed, decoded."""
    t0 = time.perf_counter()
    last = None
    for last in ActivationArray(root, "layer-000/task", out_dtype=None):
        pass
    return time.perf_counter() - t0, last


def compression_table(args, gaussian: torch.Tensor) -> bool:
    """Compression of the stores: ratio, write and read MB/s per codec, on two kinds of synthetic
    bf16 inputs (i.i.d. Gaussian; Gaussian with 16 outlier channels x30, as LLM hidden states have)."""
    g = torch.Generator().manual_seed(1)
    scale = torch.ones(args.dim)
    scale[torch.randperm(args.dim, generator=g)[:16]] = 30.0
    kinds = {"gaussian": gaussian, "outlier channels": (gaussian.float() * scale).to(torch.bfloat16)}
    mb = gaussian.numel() * 2 / 1e6
    rows, identical = [], True
    work = Path(tempfile.mkdtemp(prefix="bench-zarr-codec-"))
    try:
        for kind, x in kinds.items():
            best: dict = {}
            for r in range(args.repeats + 1):  # interleaved; the first round warms the page cache
                for comp in COMPRESSIONS:
                    root = work / f"{comp}-{r}.zarr"
                    t0 = time.perf_counter()
                    w = ActivationWriter(root, chunk_tokens=args.chunk, dtype="bfloat16", compression=comp)
                    w.create("layer-000/task", x.shape[0], x.shape[1], np.array([0, x.shape[0]]))
                    for start in range(0, x.shape[0], args.batch):
                        w.write("layer-000/task", start, x[start:start + args.batch])
                    w.close()
                    wt = time.perf_counter() - t0
                    rt, last = read_pass(root)
                    identical &= torch.equal(last, x[-last.shape[0]:])
                    if r:
                        b = best.setdefault(comp, {"write": float("inf"), "read": float("inf")})
                        b["write"], b["read"] = min(b["write"], wt), min(b["read"], rt)
                        b["bytes"] = store_bytes(root)
                    shutil.rmtree(root)
            raw = best["none"]["bytes"]
            for comp in COMPRESSIONS:
                b = best[comp]
                rows.append((kind, comp, raw / b["bytes"], mb / b["write"], mb / b["read"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ncompression ({args.tokens} tokens x {args.dim} bf16, {args.batch}-token batches, "
          f"{args.chunk}-token chunks, best of {args.repeats}; ratio = uncompressed / compressed bytes)")
    print("| inputs | compression | ratio | write MB/s | read (one streamed pass) MB/s |")
    print("|---|---|---|---|---|")
    for kind, comp, ratio, w, r in rows:
        print(f"| {kind} | {comp} | {ratio:.3f} | {w:.1f} | {r:.1f} |")
    print(f"decoded values identical: {identical}")
    return identical


if __name__ == "__main__":
    sys.exit(main())
