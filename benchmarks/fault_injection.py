"""Fault injection: kill -9 the whole process group of a running submit, resubmit, compare bytes.

    python benchmarks/fault_injection.py --trials 20 [--config configs/tiny.yaml] [--seed 0]

First an uninterrupted reference run (its wall time sets the range of kill moments), then per trial:
a fresh run directory, ``harc-hpc submit CONFIG --executor local`` in its own process group, SIGKILL
to the group at a uniformly random moment of the reference's duration, then the same submit again
until it exits. A trial passes when the resubmit exits 0, the final model's files (model/) and every
calibrated router are byte-identical to the reference's, and no temporary (``.*.tmp-*``) is left in
the run directory. Writes benchmarks/results/fault_injection.{json,md}; exits 1 if a trial failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harc_hpc.io.atomic import is_temporary  # noqa: E402


def submit(config: Path, run_dir: Path, log) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "harc-hpc"), "submit", str(config), "--executor", "local", "--run-dir", str(run_dir)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=ROOT)


def final_bytes(run_dir: Path) -> dict[str, str]:
    out = {}
    for sub in ("model", "routers"):
        for p in sorted((run_dir / sub).rglob("*")):
            if p.is_file() and p.suffix in (".safetensors", ".json") and not p.name.startswith("."):
                out[p.relative_to(run_dir).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    # The router reports hold wall-clock seconds: compare the tensors and the model only.
    return {k: v for k, v in out.items() if not (k.startswith("routers/") and k.endswith(".json"))}


def temporaries(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if is_temporary(p.name))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.yaml")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/harc-fault-injection"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    logs = args.work / "logs"
    logs.mkdir()

    # The demo sources are built (or reused) by a first submit; time only the pipeline itself.
    ref = args.work / "reference"
    with open(logs / "reference.log", "w") as log:
        t0 = time.monotonic()
        rc = submit(args.config, ref, log).wait()
        ref_s = time.monotonic() - t0
    if rc != 0:
        print(f"reference run failed (exit {rc}); see {logs / 'reference.log'}")
        return 1
    reference = final_bytes(ref)
    print(f"reference: {ref_s:.1f}s, {len(reference)} final files")

    rows = []
    for i in range(args.trials):
        run = args.work / f"trial-{i:02d}"
        kill_at = rng.uniform(0.0, ref_s)
        with open(logs / f"trial-{i:02d}.log", "w") as log:
            proc = submit(args.config, run, log)
            try:
                proc.wait(timeout=kill_at)
                killed = False  # finished before the kill moment
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
            left_after_kill = temporaries(run) if run.exists() else []
            log.write(f"\n=== killed at {kill_at:.1f}s: {killed}; temporaries {left_after_kill}; resubmit ===\n")
            log.flush()
            t0 = time.monotonic()
            rc = submit(args.config, run, log).wait()
            resume_s = time.monotonic() - t0
        got = final_bytes(run) if rc == 0 else {}
        left = temporaries(run)
        identical = rc == 0 and got == reference
        ok = identical and not left
        rows.append({"trial": i, "kill_at_s": round(kill_at, 1), "killed": killed,
                     "temporaries_after_kill": len(left_after_kill), "resubmit_exit": rc,
                     "resume_s": round(resume_s, 1), "identical": identical, "temporaries_left": left, "ok": ok})
        print(f"trial {i:2d}: kill at {kill_at:6.1f}s ({'killed' if killed else 'finished first'}), "
              f"{len(left_after_kill)} temporaries after the kill, resubmit exit {rc} in {resume_s:.1f}s, "
              f"{'identical' if identical else 'DIFFERENT'}, {len(left)} temporaries left -> {'ok' if ok else 'FAIL'}",
              flush=True)
        if ok:
            shutil.rmtree(run, ignore_errors=True)

    passed = sum(r["ok"] for r in rows)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
               "trials": len(rows), "passed": passed, "reference_s": round(ref_s, 1), "seed": args.seed,
               "rows": rows}
    (args.out / "fault_injection.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# Fault injection ({summary['config']}, seed {args.seed})", "",
             f"kill -9 of the submit's process group at a random moment of the {ref_s:.0f} s reference run, "
             f"then resubmit: **{passed} of {len(rows)}** trials byte-identical with no temporaries left.", "",
             "| trial | kill at (s) | killed | temporaries after kill | resubmit exit | resume (s) | identical | left |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['trial']} | {r['kill_at_s']} | {r['killed']} | {r['temporaries_after_kill']} | "
                     f"{r['resubmit_exit']} | {r['resume_s']} | {r['identical']} | {len(r['temporaries_left'])} |")
    (args.out / "fault_injection.md").write_text("\n".join(lines) + "\n")
    print(f"{passed} of {len(rows)} trials passed; table in {args.out / 'fault_injection.md'}")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
