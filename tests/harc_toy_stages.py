"""Toy stage functions for the launcher tests: cheap, deterministic, file-writing stand-ins for the
real stages, importable inside SLURM jobs (tests/conftest.py puts tests/ on PYTHONPATH).

Every artifact is a small JSON derived from the config, the index and the upstream artifacts, so a
rerun with the same inputs writes byte-identical files. Control files in the run directory inject
behaviour: ``fail-<stage>-<key>`` makes a task raise, ``slow-<stage>-<key>`` (containing seconds)
makes it sleep after writing a partial temp file (to be killed mid-run), ``slowonce-<stage>-<key>``
does so on the first attempt only (to hit a time limit, then finish when requeued).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path


def _key(stage: str, index: dict) -> str:
    return "-".join([stage] + [f"{k}{index[k]}" for k in sorted(index)])


def _control(run_dir: Path, stage: str, index: dict) -> None:
    key = _key(stage, index)
    if (run_dir / f"fail-{key}").exists():
        raise RuntimeError(f"injected failure in {key}")
    once = run_dir / f"slowonce-{key}"  # slow on the first attempt only (a requeued attempt is fast)
    if once.exists():
        seconds = float(once.read_text().strip() or 30)
        once.unlink()
        (run_dir / f"started-{key}").write_text(str(os.getpid()))
        time.sleep(seconds)
    slow = run_dir / f"slow-{key}"
    if slow.exists():
        seconds = float(slow.read_text().strip() or 30)
        (run_dir / f"started-{key}").write_text(str(os.getpid()))
        time.sleep(seconds)


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else "<missing>"


def _write(path: Path, payload: dict) -> tuple[Path, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("partial")  # what a kill mid-run leaves behind; the rename below never happens then
    return tmp, json.dumps(payload, sort_keys=True)


def _commit(tmp: Path, text: str, path: Path) -> None:
    tmp.write_text(text)
    os.replace(tmp, path)


def _emit(run_dir: Path, stage: str, index: dict, rel: str, payload: dict) -> dict:
    path = run_dir / rel
    tmp, text = _write(path, payload)
    _control(run_dir, stage, index)
    _commit(tmp, text, path)
    return {"digest": hashlib.sha256(text.encode()).hexdigest()[:12]}


def merge_statistics(cfg, run_dir, **index):
    run_dir = Path(run_dir)
    data = {t: [str(f) for f in cfg.calibration_for(t).files] for t in cfg.task_names}
    return _emit(run_dir, "merge_statistics", index, "merge-statistics/stats.json",
                 {"sources": [s.path for s in cfg.models.sources], "data": data})


def merge(cfg, run_dir, **index):
    run_dir = Path(run_dir)
    return _emit(run_dir, "merge", index, "merged/model.json",
                 {"sources": [s.path for s in cfg.models.sources], "method": cfg.merge.method,
                  "statistics": _read(run_dir / "merge-statistics/stats.json")})


def capture(cfg, run_dir, block):
    run_dir = Path(run_dir)
    prev = _read(run_dir / f"activations/block-{block - 1:03d}.json") if block > 0 else ""
    routers = sorted(p.name + _read(p) for p in (run_dir / "routers").glob("*.json")) if block > 0 else []
    data = {t: [str(f) for f in cfg.calibration_for(t).files] for t in cfg.task_names}
    return _emit(run_dir, "capture", {"block": block}, f"activations/block-{block:03d}.json",
                 {"block": block, "merged": _read(run_dir / "merged/model.json"), "prev": prev,
                  "routers": routers, "data": data})


def statistics(cfg, run_dir, layer, task):
    run_dir = Path(run_dir)
    acts = sorted(_read(p) for p in (run_dir / "activations").glob("*.json"))
    return _emit(run_dir, "statistics", {"layer": layer, "task": task},
                 f"statistics/layer-{layer:03d}/{task}.json",
                 {"layer": layer, "task": task, "hessian": cfg.harc.hessian, "acts": acts})


def solve(cfg, run_dir, layer):
    run_dir = Path(run_dir)
    stats = [_read(run_dir / f"statistics/layer-{layer:03d}/{t}.json") for t in cfg.task_names]
    out = _emit(run_dir, "solve", {"layer": layer}, f"routers/layer-{layer:03d}.json",
                {"layer": layer, "alpha": cfg.harc.alpha, "stats": stats})
    return {**out, "layer": layer, "converged": True}


def assemble(cfg, run_dir, **index):
    run_dir = Path(run_dir)
    routers = sorted(p.name + _read(p) for p in (run_dir / "routers").glob("*.json"))
    return _emit(run_dir, "assemble", index, "model/model.json", {"routers": routers})


def report(cfg, run_dir, **index):
    run_dir = Path(run_dir)
    return _emit(run_dir, "report", index, "report/metrics.json", {"model": _read(run_dir / "model/model.json")})


def router_distill(cfg, run_dir, layer):
    run_dir = Path(run_dir)
    return _emit(run_dir, "router_distill", {"layer": layer}, f"router-distill/layer-{layer:03d}.json",
                 {"layer": layer, "router": _read(run_dir / f"routers/layer-{layer:03d}.json"),
                  "lr": cfg.router_distill.lr})


def router_distill_model(cfg, run_dir, **index):
    run_dir = Path(run_dir)
    layers = sorted(p.name + _read(p) for p in (run_dir / "router-distill").glob("layer-*.json"))
    return _emit(run_dir, "router_distill_model", index, "router-distill/models/summary.json",
                 {"layers": layers, "model": _read(run_dir / "model/model.json")})


def finetune(cfg, run_dir, **index):
    run_dir = Path(run_dir)
    return _emit(run_dir, "finetune", index, "finetune/models/summary.json",
                 {"merged": _read(run_dir / "merged/model.json"), "model": _read(run_dir / "model/model.json"),
                  "lr": cfg.finetune.lr, "steps": cfg.finetune.steps})
