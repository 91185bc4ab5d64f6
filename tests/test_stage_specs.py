"""The stage specs are the single source of truth for the digests: every config key a stage reads
is covered by its spec's ``config_sections`` (or by a stage upstream of it, whose digest its own
digest contains), and every key a spec lists is read by that stage.

Each stage function runs on a tiny pipeline with a config proxy that records the dotted path of
every leaf it reads (``models.sources.*.path`` for an item of a list).
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from pydantic import BaseModel

from harc_hpc.config import load_config
from harc_hpc.pipeline.planner import RUNTIME_ONLY_KEYS, load_specs
from harc_hpc.stages import assemble_model, capture_activations, compute_statistics, layout, merge_experts
from harc_hpc.stages import merge_statistics
from harc_hpc.stages import solve_router as solve_router_stage
from pipeline_fixtures import build_tiny_sources, write_config

# Where a run lives and how it is executed, not what it computes: never part of a digest.
NOT_RESULT_KEYS = {"run.output_dir", "run.name", "executor", "demo", *RUNTIME_ONLY_KEYS}


class _Reads:
    def __init__(self):
        self.keys: set[str] = set()


def _wrap(value, path: str, reads: _Reads):
    if isinstance(value, BaseModel):
        return _ModelProxy(value, path, reads)
    if isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
        return [_ModelProxy(v, f"{path}.*", reads) for v in value]
    reads.keys.add(path)
    return value


class _ModelProxy:
    """Reads of a pydantic model, recorded by dotted path; methods and properties run on the proxy
    so that what they read is recorded too."""

    def __init__(self, obj, path: str, reads: _Reads):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_reads", reads)

    def __getattr__(self, name):
        obj, path, reads = (object.__getattribute__(self, n) for n in ("_obj", "_path", "_reads"))
        sub = f"{path}.{name}" if path else name
        attr = getattr(type(obj), name, None)
        if name.startswith("model_") or name.startswith("__"):
            reads.keys.add(path or "<whole config>")  # a dump or copy reads everything below
            return getattr(obj, name)
        if isinstance(attr, property):
            return attr.fget(self)
        if isinstance(attr, types.FunctionType):
            return types.MethodType(attr, self)
        return _wrap(getattr(obj, name), sub, reads)

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_obj"), name, value)


def _norm(key: str, tasks) -> str:
    parts = key.removesuffix("?").split(".")  # "mergeme?": an optional section
    return ".".join("*" if p in tasks or p == "{task}" else p for p in parts)


def _covers(section: str, key: str) -> bool:
    return key == section or key.startswith(section + ".")


@pytest.fixture(scope="module")
def stage_reads(tmp_path_factory):
    root = tmp_path_factory.mktemp("specs")
    sources = build_tiny_sources(root / "src", layers=2)
    config = write_config(root, sources, name="run", executor="debug")
    cfg = load_config(config)
    run_dir = root / "runs" / "run"
    calls = {
        "merge-experts": lambda c: merge_experts.run(c, run_dir),
        "capture-activations": lambda c, b: capture_activations.run(c, run_dir, block=b),
        "compute-statistics": lambda c, l, t: compute_statistics.run(c, run_dir, layer=l, task=t),
        "solve-router": lambda c, l: solve_router_stage.run(c, run_dir, layer=l),
        "assemble-model": lambda c: assemble_model.run(c, run_dir),
    }
    reads = {name: _Reads() for name in calls}

    def proxied(name):
        return _ModelProxy(cfg, "", reads[name])

    calls["merge-experts"](proxied("merge-experts"))
    for b, blk in enumerate(layout.blocks(cfg)):
        calls["capture-activations"](proxied("capture-activations"), b)
        for l in blk:
            for t in cfg.task_names:
                calls["compute-statistics"](proxied("compute-statistics"), l, t)
            calls["solve-router"](proxied("solve-router"), l)
    calls["assemble-model"](proxied("assemble-model"))
    # merge-statistics runs for a data-driven method only: RegMean, in a run of its own
    regmean = load_config(write_config(root, sources, name="regmean", executor="debug", method="regmean"))
    reads["merge-statistics"] = _Reads()
    merge_statistics.run(_ModelProxy(regmean, "", reads["merge-statistics"]), root / "runs" / "regmean")
    # RegMean++ takes its Grams in merge-experts: what it reads there must be in a digest too
    plusplus = load_config(write_config(root, sources, name="plusplus", executor="debug", method="regmean_plusplus"))
    merge_statistics.run(plusplus, root / "runs" / "plusplus")
    merge_experts.run(_ModelProxy(plusplus, "", reads["merge-experts"]), root / "runs" / "plusplus")
    tasks = set(cfg.task_names)
    return {name: {_norm(k, tasks) for k in r.keys} for name, r in reads.items()}, tasks


def _upstream(specs, name) -> set[str]:
    seen, todo = set(), [n.stage for n in specs[name].needs]
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo += [n.stage for n in specs[s].needs]
    return seen


STAGES = ["merge-statistics", "merge-experts", "capture-activations", "compute-statistics", "solve-router",
          "assemble-model"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_key_a_stage_reads_is_in_a_digest(stage, stage_reads):
    reads, tasks = stage_reads
    specs = load_specs()
    own = [_norm(s, tasks) for s in specs[stage].config_sections]
    inherited = [_norm(s, tasks) for up in _upstream(specs, stage) for s in specs[up].config_sections]
    missing = sorted(k for k in reads[stage]
                     if not any(_covers(s, k) for s in own + inherited)
                     and not any(_covers(x, k) for x in NOT_RESULT_KEYS))
    assert not missing, f"{stage} reads {missing}, which no digest of it or its upstream covers"


@pytest.mark.parametrize("stage", STAGES)
def test_every_key_a_spec_lists_is_read_by_its_stage(stage, stage_reads):
    reads, tasks = stage_reads
    unread = [s for s in load_specs()[stage].config_sections
              if not any(_covers(_norm(s, tasks), k) or _covers(k, _norm(s, tasks)) for k in reads[stage])]
    assert not unread, f"stages/{stage}.yaml lists {unread} in config_sections, but the stage never reads them"


def test_the_proxy_records_what_is_read():
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")
    reads = _Reads()
    p = _ModelProxy(cfg, "", reads)
    _ = p.harc.alpha, p.task_names, p.run_dir
    assert {"harc.alpha", "models.sources.*.name", "run.output_dir", "run.name"} <= reads.keys
