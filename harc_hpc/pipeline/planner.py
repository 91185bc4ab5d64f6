"""The pipeline DAG: stage specs (YAML data) + a config -> tasks with Merkle digests, grouped for submission.

A task's digest covers everything its result depends on: the stage's identity and spec version, its
index, the config keys its spec lists (``config_sections``), the contents of the input files its spec
lists (``file_inputs``), the package version, and the digests of the upstream tasks it needs. A
completed task whose recorded digest still equals the planned one is skipped; any change upstream
changes every digest downstream of it, so a rerun redoes exactly what changed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from harc_hpc.errors import UsageError
import harc_hpc
from harc_hpc.config import PipelineConfig
from harc_hpc.io.atomic import write_json_atomic
from harc_hpc.pipeline import records

SPECS_ENV = "HARC_HPC_STAGES"

# Settings that change where or how fast a task runs, never what it produces.
RUNTIME_ONLY_KEYS = ("harc.device", "merge.device", "harc.memory_budget_gb", "harc.stream_inputs", "run.retention",
                     "run.node_local_dir", "calibration.compression", "calibration.layer_checkpoints")  # where and how, not what

Split = Literal["none", "block", "layer", "layer_task"]


class PlanError(UsageError):
    """A problem with the stage specs or with what the config asks of them."""


# -- specs ---------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Need(_Strict):
    """Upstream tasks a task needs: every task of ``stage`` whose index matches ``where``.

    ``where`` maps an index key (block, layer, task) to ``same`` (equal to this task's) or
    ``previous`` (one less; block only: no upstream for block 0). Empty: every task of the stage.
    ``optional``: when ``stage`` is left out of the plan (its ``enabled_if`` is false) the need is
    dropped instead of being an error (merge-experts needs merge-statistics only for a method with
    statistics); the digest then has no such upstream, as if the need had never been declared.
    """

    stage: str
    where: dict[Literal["block", "layer", "task"], Literal["same", "previous"]] = Field(default_factory=dict)
    optional: bool = False


class Resources(_Strict):
    cpus: Optional[int] = Field(default=None, ge=1)
    mem_gb: Optional[float] = Field(default=None, gt=0)
    gpus: Optional[int] = Field(default=None, ge=0)
    time_min: Optional[int] = Field(default=None, ge=1)


class StageSpec(_Strict):
    name: str
    function: str  # "package.module:callable"
    # "package.module:callable" of (EstimateContext, stage) -> StageEstimate: what a task of the stage
    # needs (harc-hpc plan), computed with the sizing helpers the stage itself runs with
    estimate: Optional[str] = None
    split: Split = "none"
    description: str = ""
    version: int = 1
    needs: list[Need] = Field(default_factory=list)
    # Dotted config paths whose values enter the task's digest ({task}, {layer}, {block} filled from its
    # index; * maps over a list). A trailing "?" marks one optional: in the digest only when set
    # (config_keys, docs/extending.md).
    config_sections: list[str] = Field(default_factory=list)
    file_inputs: list[str] = Field(default_factory=list)
    reads: list[str] = Field(default_factory=list)
    writes: list[str] = Field(default_factory=list)
    # Those of ``writes`` that only later stages read: deleted under run.retention
    # delete-intermediate once every task that reads them is complete.
    scratch: list[str] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)
    # The stage function takes ``process_group=`` and shards a task over the ranks of a multi-process
    # job (executor.stages.<name>.{nodes, tasks_per_node}); others run one process per task.
    distributed: bool = False
    # When false the stage is left out of the plan: a config key (dotted, e.g. report.enabled), or a
    # callable ``package.module:function`` of the validated config, for a condition no single key
    # holds (merge-statistics: "the merge method has statistics").
    enabled_if: Optional[str] = None

    @field_validator("function", "estimate")
    @classmethod
    def _function_form(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        module, sep, attr = v.partition(":")
        if not sep or not module or not attr:
            raise ValueError("must look like 'package.module:function'")
        return v

    def load_function(self):
        return load_callable(self.function)


def load_callable(dotted: str):
    """``package.module:attr`` -> the object (stage functions and pipeline hooks are named so)."""
    import importlib

    module, _, attr = dotted.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


PIPELINE_FILE = "pipeline.yaml"


class PipelineHooks(_Strict):
    """``stages/pipeline.yaml``: what the launcher calls by name around the stages."""

    kind: Literal["pipeline"] = "pipeline"
    prepare: Optional[str] = None  # cfg -> cfg, before planning
    layers: Optional[str] = None  # cfg -> the calibrated layers
    headline: Optional[str] = None  # run_dir -> lines, after a waited run
    estimate: Optional[str] = None  # (cfg, plan, resources, config.json, tflops) -> estimates
    check_config: Optional[str] = None  # cfg -> None; raises a UsageError naming the key (sweeps check every cell)
    template_values: Optional[str] = None  # cfg -> values the specs' path templates may name beyond an index

    def call(self, hook: str, *args):
        name = getattr(self, hook)
        return None if name is None else load_callable(name)(*args)


def load_hooks(specs_dir: Optional[os.PathLike] = None) -> PipelineHooks:
    """The hooks of a stages folder; a folder without ``pipeline.yaml`` (a test's toy stages) uses
    the installed pipeline's."""
    for folder in ([Path(specs_dir)] if specs_dir is not None else []) + [default_specs_dir()]:
        path = folder / PIPELINE_FILE
        if path.is_file():
            try:
                return PipelineHooks.model_validate(yaml.safe_load(path.read_text()) or {})
            except (yaml.YAMLError, ValidationError) as exc:
                raise PlanError(f"{path}: invalid pipeline hooks:\n{exc}") from None
    return PipelineHooks()


def default_specs_dir() -> Path:
    """``$HARC_HPC_STAGES``; else the ``stages/`` folder of a source checkout (next to the package
    directory: editable installs); else the copy a wheel installs as data (``<prefix>/share/harc-hpc/stages``)."""
    env = os.environ.get(SPECS_ENV)
    if env:
        return Path(env).expanduser().resolve()
    checkout = Path(harc_hpc.__file__).resolve().parent.parent / "stages"
    if checkout.is_dir():
        return checkout
    installed = Path(sysconfig.get_path("data")) / "share" / "harc-hpc" / "stages"
    return installed if installed.is_dir() else checkout


def load_specs(specs_dir: Optional[os.PathLike] = None) -> dict[str, StageSpec]:
    """Every ``*.yaml`` spec of a directory, validated, keyed by stage name."""
    specs_dir = Path(specs_dir) if specs_dir is not None else default_specs_dir()
    if not specs_dir.is_dir():
        raise PlanError(f"{specs_dir}: stage spec directory not found (set ${SPECS_ENV} or pass specs_dir)")
    specs: dict[str, StageSpec] = {}
    for path in sorted(specs_dir.glob("*.yaml")):
        if path.name == PIPELINE_FILE:
            continue
        try:
            data = yaml.safe_load(path.read_text()) or {}
            spec = StageSpec.model_validate(data)
        except (yaml.YAMLError, ValidationError) as exc:
            raise PlanError(f"{path}: invalid stage spec:\n{exc}") from None
        if spec.name in specs:
            raise PlanError(f"{path}: stage {spec.name!r} is defined twice")
        specs[spec.name] = spec
    if not specs:
        raise PlanError(f"{specs_dir}: no *.yaml stage specs")
    for spec in specs.values():
        for need in spec.needs:
            if need.stage not in specs:
                raise PlanError(f"stage {spec.name}: needs unknown stage {need.stage!r}")
            up = specs[need.stage]
            for key, rel in need.where.items():
                own = _index_keys(spec.split)
                theirs = _index_keys(up.split)
                if key not in own or key not in theirs:
                    raise PlanError(
                        f"stage {spec.name}: 'where: {key}' needs both {spec.name} ({spec.split}) and "
                        f"{up.name} ({up.split}) to have a {key}"
                    )
                if rel == "previous" and key != "block":
                    raise PlanError(f"stage {spec.name}: 'previous' applies to block only")
    _stage_order(specs)  # a cycle between stages is an error here, before any config is planned
    return specs


def _index_keys(split: str) -> tuple[str, ...]:
    """Index keys a task of this split can be matched on (layer tasks also have their block)."""
    return {"none": (), "block": ("block",), "layer": ("block", "layer"), "layer_task": ("block", "layer", "task")}[
        split
    ]


def _stage_order(specs: dict[str, StageSpec]) -> list[str]:
    """Stage names, each after the stages it needs. Needs on an earlier block point backwards in the
    block order and cannot close a cycle (capture-activations[b] needs solve-router[b-1], which needs
    capture-activations[b-1]), so they are not followed here; ``dependency_order`` orders the tasks."""
    return _topological(specs, lambda name: [n.stage for n in specs[name].needs if "previous" not in n.where.values()],
                        "stage specs: dependency cycle")


def _topological(nodes: Iterable[str], edges: Callable[[str], Iterable[str]], what: str) -> list[str]:
    """``nodes`` each after the nodes its ``edges`` name (depth first, in the given order); a cycle is
    a PlanError "<what> a -> b -> a". The planner's one cycle check: stages and tasks are ordered by it."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(node: str, chain: tuple[str, ...]) -> None:
        if state.get(node) == 2:
            return
        if state.get(node) == 1:
            raise PlanError(f"{what} {' -> '.join(chain + (node,))}")
        state[node] = 1
        for other in edges(node):
            visit(other, chain + (node,))
        state[node] = 2
        order.append(node)

    for node in nodes:
        visit(node, ())
    return order


# -- tasks ---------------------------------------------------------------------------------------

def task_key(split: str, index: dict) -> str:
    """The task's name within its stage: ``all``, ``block-001``, ``layer-003``, ``layer-003/task-math``."""
    if split == "none":
        return "all"
    if split == "block":
        return f"block-{index['block']:03d}"
    if split == "layer":
        return f"layer-{index['layer']:03d}"
    return f"layer-{index['layer']:03d}/task-{index['task']}"


@dataclass
class Task:
    stage: str
    key: str
    index: dict[str, Any]  # keyword arguments of the stage function
    block: Optional[int]  # None for split "none"
    needs: list[str] = field(default_factory=list)  # upstream task ids
    digest: str = ""
    inputs: dict[str, Any] = field(default_factory=dict)  # what the digest was computed from
    extra_values: dict[str, Any] = field(default_factory=dict)  # the pipeline's template_values

    @property
    def id(self) -> str:
        return f"{self.stage}/{self.key}"

    @property
    def group(self) -> tuple[str, Optional[int]]:
        return (self.stage, self.block)

    def template_values(self) -> dict[str, Any]:
        values = {**self.extra_values, **self.index}
        if self.block is not None:
            values["block"] = self.block
            if self.block > 0:
                values["prev_block"] = self.block - 1
        return values


@dataclass
class Group:
    """The unit of submission: one array job over the incomplete tasks of (stage, block)."""

    stage: str
    block: Optional[int]
    tasks: list[Task]

    @property
    def name(self) -> str:
        return self.stage if self.block is None else f"{self.stage}/block-{self.block:03d}"


@dataclass
class Plan:
    run_dir: Path
    specs_dir: Path
    specs: dict[str, StageSpec]
    layers: list[int]
    blocks: list[list[int]]
    task_names: list[str]
    tasks: dict[str, Task]  # id -> task, in a dependency order
    config_path: Optional[Path] = None  # the config snapshot jobs load (set by save_run_config)
    retention: str = "keep"  # run.retention
    # Tasks of this plan that another run directory runs (a sweep cell's task that an earlier cell
    # owns), id -> the SLURM job that runs it there: its dependents wait for that job too.
    external_jobs: dict[str, str] = field(default_factory=dict)

    # -- intermediate artifacts -------------------------------------------------------------------
    def scratch_of(self, task: Task) -> dict[str, list[Task]]:
        """Each scratch artifact of ``task`` and the tasks that read it."""
        cache = self.__dict__.setdefault("_scratch_cache", {})
        if task.id in cache:
            return cache[task.id]
        out = cache[task.id] = {}
        for rel in format_templates(self.specs[task.stage].scratch, task.template_values()):
            key = rel.rstrip("/")
            out[rel] = [t for t in self.tasks.values() if t is not task and any(
                r.rstrip("/") == key or key.startswith(r.rstrip("/") + "/")
                for r in format_templates(self.specs[t.stage].reads, t.template_values()))]
        return out

    def restore_reason(self, task: Task, todo: Optional[Iterable[str]] = None) -> Optional[str]:
        """Why a complete ``task`` must run again: a deleted artifact of it is read by a task that is
        to run (one in ``todo``; without ``todo``, any incomplete one)."""
        rec = records.read_completion(self.run_dir, task.stage, task.key) or {}
        retired = rec.get("retired") or {}
        if not retired:
            return None
        todo = None if todo is None else set(todo)
        for rel, readers in self.scratch_of(task).items():
            if rel not in retired:
                continue
            for r in readers:
                if records.resumes_consumption(self.run_dir, retired[rel], r.stage, r.key, r.digest):
                    continue  # it resumes from its partial work and needs only what is still there
                if (r.id in todo) if todo is not None else not self.is_complete(r):
                    return f"{r.id} needs {rel}, which was deleted after use (run.retention)"
        return None

    # -- completion -------------------------------------------------------------------------------
    def is_complete(self, task: Task) -> bool:
        return records.is_complete(self.run_dir, task.stage, task.key, task.digest)

    def why_incomplete(self, task: Task) -> Optional[str]:
        """None when complete; else why the task must run ("artifact ..." when its record no longer
        matches what is on disk)."""
        return records.why_incomplete(self.run_dir, task.stage, task.key, task.digest)

    def incomplete(self) -> list[Task]:
        return [t for t in self.tasks.values() if not self.is_complete(t)]

    # -- grouping ---------------------------------------------------------------------------------
    def groups(self, tasks: Optional[Iterable[Task]] = None) -> list[Group]:
        """Groups of the given tasks (default: all), in a dependency order."""
        chosen = list(self.tasks.values()) if tasks is None else list(tasks)
        wanted = {t.id for t in chosen}
        out: dict[tuple, Group] = {}
        for t in self.tasks.values():  # plan order, so groups come out in dependency order
            if t.id in wanted:
                out.setdefault(t.group, Group(t.stage, t.block, [])).tasks.append(t)
        return list(out.values())

    def waits_for(self, task: Task, pending: Iterable[str]) -> list[str]:
        """The pending tasks ``task`` must wait for: its upstream tasks that are pending, and, through
        upstream tasks that are complete, theirs. A complete task in between does not cut the chain:
        a rerun producer (say a capture whose deleted store a solve reads) is still upstream."""
        pending = set(pending)
        out: list[str] = []
        seen: set[str] = set()
        todo = list(task.needs)
        while todo:
            up = todo.pop(0)
            if up in seen:
                continue
            seen.add(up)
            if up in pending:
                out.append(up)
            else:
                todo.extend(self.tasks[up].needs)
        return out

    def group_needs(self, group: Group, submitted: Iterable[Group]) -> list[Group]:
        """The submitted groups that hold a task this group waits for (completed ones need no wait)."""
        by_task = {t.id: g for g in submitted for t in g.tasks}
        seen: list[Group] = []
        for t in group.tasks:
            for up in self.waits_for(t, by_task):
                g = by_task[up]
                if g is not group and all(g is not s for s in seen):
                    seen.append(g)
        return seen

    def external_needs(self, group: Group, submitted: Iterable[Group]) -> list[str]:
        """The jobs of ``external_jobs`` this group waits for (directly, or through complete tasks)."""
        if not self.external_jobs:
            return []
        pending = {t.id for g in submitted for t in g.tasks} | set(self.external_jobs)
        out: list[str] = []
        for t in group.tasks:
            for up in self.waits_for(t, pending):
                job = self.external_jobs.get(up)
                if job and job not in out:
                    out.append(job)
        return out

    def downstream(self, task_ids: Iterable[str]) -> set[str]:
        """Every task that needs one of these, directly or not."""
        hit = set(task_ids)
        for t in self.tasks.values():  # dependency order: one pass suffices
            if any(u in hit for u in t.needs):
                hit.add(t.id)
        return hit - set(task_ids)

    def select(self, stage: str, layer=None, task=None, block=None) -> list[Task]:
        if stage not in self.specs:
            raise PlanError(f"unknown stage {stage!r} (stages: {', '.join(self.specs)})")
        out = []
        for t in self.tasks.values():
            if t.stage != stage:
                continue
            if layer is not None:
                # A block stage's task is selected by any layer of its block.
                in_block = "layer" not in t.index and t.block is not None and layer in self.blocks[t.block]
                if t.index.get("layer") != layer and not in_block:
                    continue
            if task is not None and t.index.get("task") != task:
                continue
            if block is not None and t.block != block:
                continue
            out.append(t)
        if not out:
            raise PlanError(f"no task of {stage} matches layer={layer} task={task} block={block}")
        return out

    def to_json(self) -> dict:
        return {
            "specs_dir": str(self.specs_dir),
            "layers": self.layers,
            "blocks": self.blocks,
            "task_names": self.task_names,
            "package_version": harc_hpc.__version__,
            "tasks": [
                {"id": t.id, "stage": t.stage, "key": t.key, "index": t.index, "block": t.block,
                 "needs": t.needs, "digest": t.digest}
                for t in self.tasks.values()
            ],
        }

    def save(self) -> Path:
        path = Path(self.run_dir) / "plan.json"
        write_json_atomic(path, self.to_json())
        return path


def default_layers(cfg: PipelineConfig) -> list[int]:
    """The calibrated layers, from the pipeline's ``layers`` hook."""
    layers = load_hooks().call("layers", cfg)
    if layers is None:
        raise PlanError("no layers given and the pipeline has no 'layers' hook (stages/pipeline.yaml)")
    return list(layers)


def make_blocks(layers: Sequence[int], block_size: int) -> list[list[int]]:
    return [list(layers[i : i + block_size]) for i in range(0, len(layers), block_size)]


def build_plan(
    cfg: PipelineConfig,
    run_dir: Optional[os.PathLike] = None,
    specs_dir: Optional[os.PathLike] = None,
    layers: Optional[Sequence[int]] = None,
    specs: Optional[dict[str, StageSpec]] = None,
) -> Plan:
    """Expand every stage into tasks and compute their digests, in four phases: the enabled specs
    and the layers, the tasks of each stage (``expand_tasks``), what each task needs
    (``link_needs``, then ``dependency_order``), and the digests (``set_digests``).

    ``layers``: the calibrated MoE layers; default: the pipeline's ``layers`` hook.
    """
    specs_path = Path(specs_dir) if specs_dir is not None else default_specs_dir()
    specs = specs if specs is not None else load_specs(specs_path)
    dump = cfg.model_dump(mode="json")
    specs = _enabled_specs(specs, dump, cfg)
    layers = _checked_layers(cfg, layers)
    blocks = make_blocks(layers, cfg.harc.block_size)
    by_stage = expand_tasks(specs, layers, blocks, cfg.task_names, _extra_template_values(specs, specs_dir, cfg))
    link_needs(specs, by_stage)
    ordered = dependency_order(by_stage)
    set_digests(ordered, specs, blocks, dump)
    return Plan(
        run_dir=Path(run_dir) if run_dir is not None else Path(cfg.run_dir),
        specs_dir=specs_path.resolve(),
        specs=specs,
        layers=layers,
        blocks=blocks,
        task_names=cfg.task_names,
        tasks=ordered,
        retention=cfg.run.retention,
    )


def _checked_layers(cfg: PipelineConfig, layers: Optional[Sequence[int]]) -> list[int]:
    """The layers given, else the pipeline's ``layers`` hook's: non-empty, no duplicates."""
    if layers is None:
        try:
            layers = default_layers(cfg)
        except Exception as exc:  # the model config is unreadable from here: say so, plainly
            raise PlanError(f"cannot determine the MoE layers to calibrate: {type(exc).__name__}: {exc}") from exc
    layers = [int(l) for l in layers]
    if not layers:
        raise PlanError("no layers to calibrate")
    if len(set(layers)) != len(layers):
        raise PlanError(f"duplicate layers in {layers}")
    return layers


def expand_tasks(specs: dict[str, StageSpec], layers: list[int], blocks: list[list[int]], task_names: list[str],
                 extra_values: dict[str, Any]) -> dict[str, list[Task]]:
    """Each stage's tasks by its ``split`` (one task; one per block; per layer; per layer and task),
    stages in dependency order."""
    block_of = {l: b for b, blk in enumerate(blocks) for l in blk}
    by_stage: dict[str, list[Task]] = {}
    for name in _stage_order(specs):
        split = specs[name].split
        if split == "none":
            indices = [({}, None)]
        elif split == "block":
            indices = [({"block": b}, b) for b in range(len(blocks))]
        elif split == "layer":
            indices = [({"layer": l}, block_of[l]) for l in layers]
        else:
            indices = [({"layer": l, "task": t}, block_of[l]) for l in layers for t in task_names]
        by_stage[name] = [Task(name, task_key(split, idx), idx, block, extra_values=extra_values)
                          for idx, block in indices]
    return by_stage


def need_matches(need: Need, down: Task, up: Task) -> bool:
    """Whether task ``up`` is one that ``need`` of task ``down`` names (its ``where`` keys agree)."""
    for key, rel in need.where.items():
        mine = down.block if key == "block" else down.index.get(key)
        theirs = up.block if key == "block" else up.index.get(key)
        if rel == "same" and mine != theirs:
            return False
        if rel == "previous" and (mine is None or theirs != mine - 1):
            return False
    return True


def link_needs(specs: dict[str, StageSpec], by_stage: dict[str, list[Task]]) -> None:
    """Fill every task's ``needs``: the ids of the upstream tasks its stage's needs match."""
    for name, tasks in by_stage.items():
        for t in tasks:
            for need in specs[name].needs:
                for u in by_stage[need.stage]:
                    if u is not t and need_matches(need, t, u) and u.id not in t.needs:
                        t.needs.append(u.id)


def dependency_order(by_stage: dict[str, list[Task]]) -> dict[str, Task]:
    """Every task after the tasks it needs (stages may need their own earlier blocks)."""
    all_tasks = {t.id: t for ts in by_stage.values() for t in ts}
    return {i: all_tasks[i] for i in _topological(all_tasks, lambda i: all_tasks[i].needs, "task dependency cycle")}


def set_digests(ordered: dict[str, Task], specs: dict[str, StageSpec], blocks: list[list[int]], dump: dict) -> None:
    """Each task's digest over what it computes from: its stage's function and version, its index,
    the config keys its spec names (``config_keys``; the runtime-only keys left out), the
    fingerprints of the files they name, the package version and its upstream tasks' digests."""
    dump = copy.deepcopy(dump)
    for key in RUNTIME_ONLY_KEYS:
        _drop(dump, key.split("."))
    file_cache: dict[str, str] = {}
    version = harc_hpc.__version__
    for t in ordered.values():
        spec = specs[t.stage]
        values = t.template_values()
        config_slice = {}
        for key in config_keys(spec):
            value = config_slice_of(dump, key.path, values)
            if not (key.optional and value is None):
                config_slice[key.path] = value
        files = {}
        for p in spec.file_inputs:
            for f in _flatten(config_slice_of(dump, p, values)):
                if f not in file_cache:
                    file_cache[f] = records.fingerprint_input_file(Path(f))
                files[f] = file_cache[f]
        t.inputs = {
            "stage": t.stage,
            "function": spec.function,
            "spec_version": spec.version,
            "index": t.index,
            "layers_of_block": blocks[t.block] if t.block is not None else None,
            "package_version": version,
            "config": config_slice,
            "files": files,
            "upstream": {u: ordered[u].digest for u in sorted(t.needs)},
        }
        t.digest = digest_of(t.inputs)


@dataclass(frozen=True)
class ConfigKey:
    """One entry of a spec's ``config_sections``: a dotted config path, and whether it is optional."""

    path: str
    optional: bool = False


def config_keys(spec: StageSpec) -> list[ConfigKey]:
    """The spec's ``config_sections`` as keys. An entry ending in ``?`` (``mergeme?``) is optional:
    its value enters the digest only when it is set (not None), so that adding an optional section to
    a spec leaves the digest of every config without it unchanged. Any other entry is always in the
    digest, None included."""
    return [ConfigKey(p[:-1], True) if p.endswith("?") else ConfigKey(p) for p in spec.config_sections]


_INDEX_VALUES = {"block", "prev_block", "layer", "task"}


def _extra_template_values(specs: dict[str, StageSpec], specs_dir, cfg: PipelineConfig) -> dict[str, Any]:
    """The values the specs' path templates name beyond a task's index, from the pipeline's
    ``template_values`` hook (called only when some template names one)."""
    import string

    names = {field_name.split(".")[0].split("[")[0] for spec in specs.values()
             for tpl in (*spec.reads, *spec.writes, *spec.scratch)
             for _, field_name, _, _ in string.Formatter().parse(tpl) if field_name}
    if not names - _INDEX_VALUES:
        return {}
    from harc_hpc.errors import UnsupportedModelError

    try:
        return dict(load_hooks(specs_dir).call("template_values", cfg) or {})
    except (UsageError, UnsupportedModelError):  # an unsupported model: its own error and exit code
        raise
    except Exception as exc:  # the model config is unreadable from here: say so, plainly
        raise PlanError(f"cannot fill the stage specs' path templates {sorted(names - _INDEX_VALUES)}: "
                        f"{type(exc).__name__}: {exc}") from exc


def is_enabled(spec: StageSpec, cfg: PipelineConfig, dump: Optional[dict] = None) -> bool:
    """Whether ``spec``'s ``enabled_if`` (a dotted config key or a ``module:function`` of the config)
    holds for ``cfg``."""
    cond = spec.enabled_if
    if cond is None:
        return True
    if ":" in cond:
        try:
            fn = load_callable(cond)
        except (ImportError, AttributeError) as exc:
            raise PlanError(f"stage {spec.name}: enabled_if {cond!r} cannot be loaded: {exc}") from None
        return bool(fn(cfg))
    return bool(config_slice_of(dump if dump is not None else cfg.model_dump(mode="json"), cond))


def _enabled_specs(specs: dict[str, StageSpec], dump: dict, cfg: PipelineConfig) -> dict[str, StageSpec]:
    kept = {n: s for n, s in specs.items() if is_enabled(s, cfg, dump)}
    for name, spec in list(kept.items()):
        needs = []
        for need in spec.needs:
            if need.stage in kept:
                needs.append(need)
            elif not need.optional:
                raise PlanError(f"stage {name} needs {need.stage}, which is disabled ({specs[need.stage].enabled_if})")
        if len(needs) != len(spec.needs):
            kept[name] = spec.model_copy(update={"needs": needs})
    return kept


def digest_of(payload: Any) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def config_slice_of(tree: Any, dotted: str, values: Optional[dict] = None) -> Any:
    """The config value at a dotted path; ``*`` maps over a list, a name picks a list element by name.

    ``{task}`` / ``{layer}`` / ``{block}`` in the path are filled from the task's index.
    """
    if values and "{" in dotted:
        try:
            dotted = dotted.format(**values)
        except (KeyError, IndexError):
            raise PlanError(f"config path {dotted!r} uses an index this stage does not have") from None
    return _walk(tree, dotted.split("."))


def _walk(node: Any, parts: list[str]) -> Any:
    if not parts:
        return node
    head, rest = parts[0], parts[1:]
    if isinstance(node, list):
        if head == "*":
            return [_walk(x, rest) for x in node]
        hit = next((x for x in node if isinstance(x, dict) and x.get("name") == head), None)
        return None if hit is None else _walk(hit, rest)
    if isinstance(node, dict):
        if head == "*":
            return {k: _walk(v, rest) for k, v in node.items()}
        return _walk(node.get(head), rest) if head in node else None
    return None


def _drop(tree: dict, parts: list[str]) -> None:
    node = tree
    for p in parts[:-1]:
        node = node.get(p) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(parts[-1], None)


def _flatten(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [f for v in value for f in _flatten(v)]
    return [str(value)]


def format_templates(templates: Iterable[str], values: dict) -> list[str]:
    """Fill path templates; a template that needs a value this task lacks (prev_block of block 0) is dropped."""
    out = []
    for tpl in templates:
        try:
            out.append(tpl.format(**values))
        except (KeyError, IndexError):
            continue
    return out
