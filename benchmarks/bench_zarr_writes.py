"""Activation-store write throughput: slices buffered to whole chunks vs every slice written at once.

    python benchmarks/bench_zarr_writes.py [--tokens 65536] [--dim 2048] [--batch 4096] [--chunk 16384]

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

from harc_hpc.io.activations import ActivationWriter  # noqa: E402


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
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
