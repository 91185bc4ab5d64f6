"""Sweeps: one base config expanded over a grid of config keys into cells, run as one set of runs
that share every task whose digest is the same.

A sweep config is a pipeline config with a ``sweep:`` section (docs/sweep.md)::

    sweep:
      base: olmoe.yaml               # optional: start from this config; the keys beside `sweep:` override it
      name: table1                   # the sweep directory is <output_dir>/<name>
      grid: {merge.method: [linear, ties], harc.alpha: [0.9, 0.99]}
      cells: [{merge.method: wudi, harc.hessian: diag}]   # extra cells beyond the grid's product
      exclude: [{merge.method: ties, harc.alpha: 0.99}]   # grid cells left out

Every cell is a whole run directory, ``<sweep dir>/cells/<cell name>/``, named from its values
(``method-ties+alpha-0.9``). Sharing is by digest: the planner's task digest covers everything a
task's result depends on (a Merkle chain over its upstream), so two cells' tasks with the same
(stage, task, digest) produce the same artifacts. Each such task has one *owner* cell, where it
runs: the first cell (in sweep order) that already holds it complete, else the first cell that has
it. Every other cell *links* it: its completion record and the artifacts its spec writes are
relative symbolic links into the owner's run directory, made before any job runs. A linked task is
complete exactly when the owner's is (the record is the owner's, its manifest is checked against
the same files), so resume, kills and reruns need no bookkeeping of their own: a cell that later
runs such a task itself (``harc-hpc submit`` on the cell) replaces the links with its own files.

Execution: the cells are executed in sweep order, each through the ordinary executor with only the
tasks it owns. Local and debug executors finish a cell before the next, so a linked task is done
(or has failed) before a cell that links it starts; a cell's task that waits on a failed task of
another cell is skipped, and every other cell goes on. On SLURM all cells are submitted in one pass:
a task that waits on a task another cell owns gets ``afterok`` on that cell's job, so the sweep is
one DAG over the cells' run directories.

Intermediate stores (``run.retention``) are per run directory, so a store that a cell shares with
another is kept (``run.retention: keep`` in every cell sharing a task that writes scratch); cells
that share none delete theirs after use as usual.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from harc_hpc.config import ConfigError, PipelineConfig, apply_override, parse_config
from harc_hpc.errors import HarcHpcError, RunStateError
from harc_hpc.io.atomic import symlink_atomic, write_json_atomic
from harc_hpc.pipeline import records
from harc_hpc.pipeline.planner import Plan, format_templates, load_hooks

SWEEP_FILE = "sweep.json"
CELLS_DIR = "cells"
# Keys a sweep sets itself in every cell.
RESERVED_KEYS = ("run.name", "run.output_dir")


class SweepError(ConfigError):
    """A sweep config that cannot be expanded or whose cells are not valid configs."""


# -- the sweep config -----------------------------------------------------------------------------

@dataclass
class Cell:
    name: str
    values: dict[str, Any]  # dotted key -> value (grid keys first, then an extra cell's own keys)
    cfg: Optional[PipelineConfig] = None
    plan: Optional[Plan] = None

    @property
    def run_dir(self) -> Path:
        return Path(self.plan.run_dir) if self.plan is not None else Path(self.cfg.run_dir)


@dataclass
class Sweep:
    source: Path
    name: str
    dir: Path
    base: dict  # the base config tree (raw, before validation)
    base_dir: Path  # relative paths in the base config (and in grid values) resolve against it
    grid: dict[str, list]
    cells: list[Cell]


def _merge_trees(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge_trees(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise SweepError(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: the top level must be a mapping of sections")
    return data


def load_sweep(path: os.PathLike) -> Sweep:
    """Read a sweep config and expand its cells (names and values; configs not yet validated)."""
    path = Path(path).resolve()
    data = _read_yaml(path, "sweep config")
    spec = data.pop("sweep", None)
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: no `sweep:` section (a mapping with grid / cells / exclude)")
    unknown = sorted(set(spec) - {"base", "name", "output_dir", "grid", "cells", "exclude"})
    if unknown:
        raise SweepError(f"{path}: sweep.{unknown[0]}: unknown key (sweep takes base, name, output_dir, grid, "
                         f"cells, exclude)")
    base_dir = path.parent
    base = data
    if spec.get("base") is not None:
        base_path = (path.parent / str(spec["base"])).resolve()
        base = _merge_trees(_read_yaml(base_path, "sweep.base config"), data)
        if "sweep" in base:
            raise SweepError(f"{base_path}: sweep.base is itself a sweep config")
        base_dir = base_path.parent
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict):
        raise SweepError(f"{path}: sweep.grid must map dotted config keys to lists of values")
    for key, values in grid.items():
        _check_key(path, f"sweep.grid.{key}", key)
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: sweep.grid.{key}: must be a non-empty list of values")
    extra = spec.get("cells") or []
    exclude = spec.get("exclude") or []
    for what, entries in (("cells", extra), ("exclude", exclude)):
        if not isinstance(entries, list) or not all(isinstance(e, dict) and e for e in entries):
            raise SweepError(f"{path}: sweep.{what} must be a list of mappings of dotted keys to values")
        for i, e in enumerate(entries):
            for key in e:
                _check_key(path, f"sweep.{what}[{i}].{key}", key)
    for i, e in enumerate(exclude):
        for key in e:
            if key not in grid:
                raise SweepError(f"{path}: sweep.exclude[{i}].{key}: not a grid key (exclude matches grid cells; "
                                 f"grid keys: {', '.join(grid) or 'none'})")

    combos: list[dict] = []
    keys = list(grid)
    for values in (itertools.product(*(grid[k] for k in keys)) if keys else ()):  # no grid: the cells alone
        cell = dict(zip(keys, values))
        if any(all(_same(cell[k], v) for k, v in e.items()) for e in exclude):
            continue
        combos.append(cell)
    for e in extra:
        cell = dict(e)
        if not any(_same_cell(cell, c) for c in combos):
            combos.append(cell)
    if not combos:
        raise SweepError(f"{path}: the sweep has no cells (an empty grid, or everything excluded)")

    output_dir = spec.get("output_dir")
    try:
        out_root = ((path.parent / str(output_dir)).resolve() if output_dir is not None
                    else _base_output_dir(base, base_dir))
    except HarcHpcError as exc:
        raise SweepError(f"{path}: {exc}") from None
    name = str(spec.get("name") or (base.get("run") or {}).get("name") or path.stem)
    if not _NAME_OK.match(name):
        raise SweepError(f"{path}: sweep.name {name!r}: use letters, digits, '.', '-', '_' and '+'")
    return Sweep(path, name, out_root / name, base, base_dir, grid, _name_cells(path, combos))


def _base_output_dir(base: dict, base_dir: Path) -> Path:
    out = Path(os.path.expandvars(str((base.get("run") or {}).get("output_dir", "runs")))).expanduser()
    return out if out.is_absolute() else (base_dir / out).resolve()


def _check_key(path: Path, where: str, key: Any) -> None:
    if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
        raise SweepError(f"{path}: {where}: keys are dotted config keys, e.g. harc.alpha")
    if key in RESERVED_KEYS:
        raise SweepError(f"{path}: {where}: the sweep sets {key} itself (cells are <sweep dir>/cells/<cell name>)")


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _same_cell(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)


# -- names ------------------------------------------------------------------------------------------

_NAME_OK = re.compile(r"^[A-Za-z0-9._+=-]+$")


def format_value(value: Any) -> str:
    """A value as it appears in a cell name: short, deterministic, safe in a path."""
    if isinstance(value, bool) or value is None:
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = "_".join(format_value(v) for v in value) or "none"
    elif isinstance(value, dict):
        text = "_".join(f"{k}{format_value(v)}" for k, v in value.items()) or "none"
    else:
        text = str(value)
        if "/" in text:  # a path: its file name says enough
            text = Path(text).stem
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
    return text or "empty"


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Each key by its last part, unless two keys share it (then the whole dotted key)."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (l if last.count(l) == 1 else k) for k, l in zip(keys, last)}


def _name_cells(path: Path, combos: list[dict]) -> list[Cell]:
    keys: list[str] = []
    for c in combos:
        keys += [k for k in c if k not in keys]
    short = _short_keys(keys)
    names = ["+".join(f"{short[k]}-{format_value(c[k])}" for k in keys if k in c) or "base" for c in combos]
    # Two cells whose values read alike (files of one name in two folders): a digest of the values.
    for n in {n for n in names if names.count(n) > 1}:
        for i, c in enumerate(combos):
            if names[i] == n:
                names[i] = f"{n}~{_values_digest(c)[:6]}"
    return [Cell(n, c) for n, c in zip(names, combos)]


def _values_digest(values: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


# -- validation -------------------------------------------------------------------------------------

def cell_config(sweep: Sweep, values: dict, name: str, specs_dir: Optional[os.PathLike] = None) -> PipelineConfig:
    data = copy.deepcopy(sweep.base)
    for key, value in values.items():
        apply_override(data, key, copy.deepcopy(value))
    run = data.setdefault("run", {})
    if not isinstance(run, dict):
        raise ConfigError("run: must be a section")
    run["name"] = name
    run["output_dir"] = str(sweep.dir / CELLS_DIR)
    cfg = parse_config(data, source=f"sweep {sweep.name}, cell {name}", base_dir=sweep.base_dir)
    load_hooks(specs_dir).call("check_config", cfg)
    return cfg


def validate(sweep: Sweep, specs_dir: Optional[os.PathLike] = None) -> None:
    """Every cell's config, before anything is planned or run. A failing cell is reported by the
    grid key and value that is invalid on its own (``sweep.grid.harc.alpha: value 7 is not valid:
    ...``), else as the cell with all its values (a combination that does not go together)."""
    for cell in sweep.cells:
        try:
            cell.cfg = cell_config(sweep, cell.values, cell.name, specs_dir)
        except HarcHpcError as exc:
            for key, value in cell.values.items():
                try:
                    cell_config(sweep, {key: value}, cell.name, specs_dir)
                except HarcHpcError as own:
                    where = f"sweep.grid.{key}" if key in sweep.grid else f"sweep.cells (cell {cell.name}): {key}"
                    raise SweepError(f"{sweep.source}: {where}: value {value!r} is not valid: {_indent(own)}") from None
            shown = ", ".join(f"{k}={v!r}" for k, v in cell.values.items())
            raise SweepError(f"{sweep.source}: cell {cell.name} ({shown}) is not valid: {_indent(exc)}") from None


def _indent(exc: BaseException) -> str:
    return str(exc).replace("\n", "\n    ")


# -- planning and sharing ---------------------------------------------------------------------------

Ident = tuple[str, str, str]  # (stage, task key, digest)


def ident(task) -> Ident:
    return (task.stage, task.key, task.digest)


def _own_complete(run_dir: Path, task) -> bool:
    """The cell holds the task complete in its own files (its record is not a link)."""
    path = records.completion_path(run_dir, task.stage, task.key)
    return not path.is_symlink() and records.is_complete(run_dir, task.stage, task.key, task.digest)


@dataclass
class SweepPlan:
    sweep: Sweep
    owner: dict[Ident, str]  # the cell each distinct task runs in
    cells: list[Cell] = field(default_factory=list)

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)

    def linked(self, cell: Cell) -> dict[str, str]:
        """Task id -> owner cell, for the tasks ``cell`` links rather than runs."""
        return {t.id: self.owner[ident(t)] for t in cell.plan.tasks.values() if self.owner[ident(t)] != cell.name}

    def owned(self, cell: Cell) -> list:
        return [t for t in cell.plan.tasks.values() if self.owner[ident(t)] == cell.name]

    def distinct_tasks(self) -> int:
        return len(self.owner)

    def to_json(self) -> dict:
        return {
            "format": "harc-sweep/1",
            "name": self.sweep.name,
            "source": str(self.sweep.source),
            "grid": self.sweep.grid,
            "written": datetime.now(timezone.utc).isoformat(),
            # values as [key, value] pairs: the grid's order survives the JSON writer's sorted keys
            "cells": [{"name": c.name, "values": [[k, v] for k, v in c.values.items()], "run_dir": os.path.relpath(c.run_dir, self.sweep.dir),
                       "linked": self.linked(c)} for c in self.cells],
        }


def plan_sweep(sweep: Sweep, specs_dir: Optional[os.PathLike] = None) -> SweepPlan:
    """Validate, plan every cell, choose each distinct task's owner and each cell's retention."""
    from harc_hpc.pipeline.api import plan_run

    validate(sweep, specs_dir)
    for cell in sweep.cells:
        try:
            cell.cfg, cell.plan = plan_run(cell.cfg, specs_dir=specs_dir)
        except HarcHpcError as exc:
            raise SweepError(f"{sweep.source}: cell {cell.name} cannot be planned: {_indent(exc)}") from None
    owner: dict[Ident, str] = {}
    for cell in sweep.cells:  # first a cell that holds the task complete ...
        for t in cell.plan.tasks.values():
            if ident(t) not in owner and _own_complete(cell.run_dir, t):
                owner[ident(t)] = cell.name
    for cell in sweep.cells:  # ... else the first cell that has it
        for t in cell.plan.tasks.values():
            owner.setdefault(ident(t), cell.name)
    plan = SweepPlan(sweep, owner, list(sweep.cells))
    # A shared task that writes scratch: its stores are read from several run directories, whose
    # retention cannot see each other's readers, so every cell sharing one keeps its stores.
    users: dict[Ident, set[str]] = {}
    for cell in sweep.cells:
        for t in cell.plan.tasks.values():
            users.setdefault(ident(t), set()).add(cell.name)
    keep = {name for cell in sweep.cells for t in cell.plan.tasks.values()
            if cell.plan.specs[t.stage].scratch and len(users[ident(t)]) > 1 for name in users[ident(t)]}
    for cell in sweep.cells:
        if cell.name in keep and cell.plan.retention != "keep":
            cell.cfg.run.retention = "keep"  # runtime-only: no digest changes
            cell.plan.retention = "keep"
    return plan


def link_cell(plan: SweepPlan, cell: Cell) -> int:
    """Point the records and artifacts of the tasks ``cell`` links at their owner's; returns how many
    tasks are linked. A task the cell already holds complete in its own files keeps them."""
    n = 0
    writers: dict[str, int] = {}
    for t in cell.plan.tasks.values():
        for rel in format_templates(cell.plan.specs[t.stage].writes, t.template_values()):
            writers[rel] = writers.get(rel, 0) + 1
    for tid, owner_name in plan.linked(cell).items():
        t = cell.plan.tasks[tid]
        if _own_complete(cell.run_dir, t):
            continue
        owner_dir = plan.cell(owner_name).run_dir
        for rel in format_templates(cell.plan.specs[t.stage].writes, t.template_values()):
            mine = cell.run_dir / rel.rstrip("/")
            # A folder several tasks write (capture's tokens/, content-addressed inside) is linked
            # only when absent: this cell's own tasks may have filled it.
            if writers[rel] > 1 and mine.exists() and not mine.is_symlink():
                continue
            symlink_atomic(mine, owner_dir / rel.rstrip("/"))
        # The record last: the task counts as complete here only once everything it lists is linked.
        symlink_atomic(records.completion_path(cell.run_dir, t.stage, t.key),
                       records.completion_path(owner_dir, t.stage, t.key))
        n += 1
    return n


# -- running ----------------------------------------------------------------------------------------

@dataclass
class CellOutcome:
    name: str
    ran: list[str] = field(default_factory=list)  # task ids this cell ran (or submitted)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # not run: an upstream task failed
    linked: int = 0
    already_complete: int = 0
    job_ids: list[str] = field(default_factory=list)


@dataclass
class SweepOutcome:
    plan: SweepPlan
    executor: str
    cells: list[CellOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(c.failed or c.skipped for c in self.cells)

    def job_ids(self) -> list[str]:
        return [j for c in self.cells for j in c.job_ids]


def submit_sweep(path: os.PathLike, executor: Optional[str] = None, specs_dir: Optional[os.PathLike] = None,
                 dry_run: bool = False, force: bool = False, wait: bool = False,
                 wait_timeout_s: Optional[float] = None, poll_s: float = 1.0,
                 echo: Callable[[str], None] = print) -> SweepOutcome:
    """Expand, validate and plan every cell, link what cells share, then run (or submit) each
    cell's own tasks; a failure in one cell stops only what depends on it."""
    from harc_hpc.pipeline.lock import RunLock
    from harc_hpc.pipeline.submit import refuse_active_jobs, wait_if_asked

    sweep = load_sweep(path)
    plan = plan_sweep(sweep, specs_dir)
    executor = executor or sweep.cells[0].cfg.executor.kind
    if executor == "slurm":  # every cell fits its jobs, or nothing is submitted
        from harc_hpc.pipeline.api import check_slurm_fits

        for cell in plan.cells:
            try:
                check_slurm_fits(cell.cfg, cell.plan, specs_dir, echo)
            except HarcHpcError as exc:
                raise SweepError(f"{sweep.source}: cell {cell.name}: {_indent(exc)}") from None
    total = sum(len(c.plan.tasks) for c in plan.cells)
    echo(f"sweep {sweep.name}: {len(plan.cells)} cell(s), {total} task(s), {plan.distinct_tasks()} distinct "
         f"(the rest shared between cells); directory {sweep.dir}")
    outcome = SweepOutcome(plan, executor)
    if dry_run:
        _dry_run(plan, executor, force, echo)
        return outcome

    with RunLock(sweep.dir):
        if executor == "slurm":  # every cell idle, or nothing is submitted
            refuse_active_jobs({f"cell {c.name}": c.run_dir for c in plan.cells}, where=str(sweep.dir))
        write_json_atomic(sweep.dir / SWEEP_FILE, plan.to_json())
        lost: set[Ident] = set()  # distinct tasks that failed or were not run in this call
        jobs: dict[Ident, str] = {}  # distinct task -> the SLURM job running it (this call)
        for cell in plan.cells:
            outcome.cells.append(_submit_cell(plan, cell, executor, force, lost, jobs, echo))
    if wait_if_asked(wait, executor, outcome.job_ids(), poll_s, wait_timeout_s, echo):
        states = {c.name: c for c in sweep_status(sweep.dir)}
        for co in outcome.cells:
            st = states[co.name]
            co.failed = [r.id for r in st.rows if r.state == "failed"]
            co.skipped = [r.id for r in st.rows if r.state in ("cancelled", "blocked")]
    return outcome


def _dry_run(plan: SweepPlan, executor: str, force: bool, echo: Callable[[str], None]) -> None:
    """What each cell would run, linked tasks of other cells shown as placeholders for their jobs."""
    from harc_hpc.pipeline.submit import execute

    for cell in plan.cells:
        linked = plan.linked(cell)
        echo(f"== cell {cell.name}: {len(cell.plan.tasks)} task(s), {len(linked)} linked from other cells"
             + (f" ({', '.join(sorted(set(linked.values())))})" if linked else ""))
        cell.plan.external_jobs = {tid: f"<{o}:{tid}>" for tid, o in linked.items()
                                   if not plan.cell(o).plan.is_complete(plan.cell(o).plan.tasks[tid])}
        execute(cell.plan, cell.cfg, executor, tasks=plan.owned(cell), force=force, dry_run=True,
                explicit_executor_keys=set(cell.cfg.executor.model_fields_set), echo=echo)


def _submit_cell(plan: SweepPlan, cell, executor: str, force: bool, lost: set, jobs: dict,
                 echo: Callable[[str], None]) -> CellOutcome:
    """One cell through the run's submit path (submit.submit_plan), its own tasks only: what it
    shares with an earlier cell is linked, and what waits on a shared task that failed (or was not
    run) in its owner cell (``lost``) is blocked. ``jobs`` and ``lost`` gain this cell's."""
    from harc_hpc.pipeline.submit import submit_plan

    co = CellOutcome(cell.name)
    blocked: set[str] = set()

    def own_tasks(cell_plan) -> list:
        cell_plan.save()
        co.linked = link_cell(plan, cell)
        linked = plan.linked(cell)
        cell_plan.external_jobs = {tid: jobs[ident(cell_plan.tasks[tid])] for tid in linked
                                   if ident(cell_plan.tasks[tid]) in jobs}
        bad = {tid for tid in linked if ident(cell_plan.tasks[tid]) in lost}
        blocked.update(cell_plan.downstream(bad) if bad else set())
        own = [t for t in plan.owned(cell) if t.id not in blocked]
        echo(f"== cell {cell.name}: {len(own)} own task(s), {len(linked)} linked"
             + (f", {len(blocked)} blocked by a failed shared task" if blocked else ""))
        return own

    # (as a run's submit: another host's temporaries are stale once no job of the cell is alive; the
    # sweep refused active jobs of every cell before any was submitted)
    res = submit_plan(cell.plan, cell.cfg, executor, choose=own_tasks, force=force, allow_active=True,
                      explicit_executor_keys=set(cell.cfg.executor.model_fields_set), echo=echo)
    co.already_complete = len(res.already_complete)
    co.failed = list(res.failed)
    co.skipped = sorted(set(res.skipped) | {tid for tid in blocked if not cell.plan.is_complete(
        cell.plan.tasks[tid])})
    co.ran = list(res.completed) + [t.id for s in res.submitted for t in s.group.tasks]
    co.job_ids = res.job_ids()
    for s in res.submitted:
        for t in s.group.tasks:
            jobs[ident(t)] = s.job_id
    for tid in co.failed + co.skipped:
        lost.add(ident(cell.plan.tasks[tid]))
    for tid in co.failed:
        echo(f"FAILED in cell {cell.name}: {tid}: "
             f"{records.failure_line(cell.run_dir, *tid.split('/', 1)) or 'no error recorded'}")
    return co


# -- status -----------------------------------------------------------------------------------------

@dataclass
class CellStatus:
    name: str
    values: dict
    run_dir: Path
    rows: list  # status.TaskStatus, linked tasks with their owner's state
    linked: dict[str, str]

    @property
    def state(self) -> str:
        states = {r.state for r in self.rows}
        if states & {"failed", "cancelled", "invalid", "blocked"}:
            return "failed"
        if states == {"done"}:
            return "done"
        return "running" if "running" in states else "pending"

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.state] = out.get(r.state, 0) + 1
        return out


def read_sweep(sweep_dir: os.PathLike) -> dict:
    path = Path(sweep_dir) / SWEEP_FILE
    data = records.read_json(path)
    if not isinstance(data, dict):
        raise RunStateError(f"no {SWEEP_FILE} here (not a sweep directory, or nothing submitted yet)",
                            where=str(sweep_dir))
    return data


def is_sweep_dir(path: os.PathLike) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def sweep_status(sweep_dir: os.PathLike) -> list[CellStatus]:
    """Every cell's tasks: its own as ``harc-hpc status`` sees them, a linked one in its owner's
    state (failed there: failed here too), and a task waiting on a failed one ``blocked``."""
    from harc_hpc.pipeline import status as status_mod

    sweep_dir = Path(sweep_dir)
    data = read_sweep(sweep_dir)
    rows: dict[str, dict] = {}
    for c in data["cells"]:
        run_dir = sweep_dir / c["run_dir"]
        try:
            rows[c["name"]] = {r.id: r for r in status_mod.collect(run_dir)}
        except FileNotFoundError:
            rows[c["name"]] = {}
    out = []
    for c in data["cells"]:
        run_dir = sweep_dir / c["run_dir"]
        mine = rows[c["name"]]
        for tid, owner in c.get("linked", {}).items():
            theirs = rows.get(owner, {}).get(tid)
            if tid in mine and theirs is not None and mine[tid].state != "done":
                r = copy.copy(theirs)
                if r.state in ("failed", "cancelled") and not r.error.startswith("in cell"):
                    r.error = f"in cell {owner}: {r.error}" if r.error else f"in cell {owner}"
                mine[tid] = r
        plan = records.read_json(run_dir / "plan.json") or {"tasks": []}
        needs = {t["id"]: t["needs"] for t in plan["tasks"]}
        for t in plan["tasks"]:  # dependency order
            r = mine.get(t["id"])
            if r is None or r.state != "pending":
                continue
            bad = next((u for u in needs[t["id"]] if u in mine and mine[u].state in
                        ("failed", "cancelled", "blocked", "invalid")), None)
            if bad is not None:
                r.state, r.error = "blocked", f"upstream {bad} {mine[bad].state}"
        out.append(CellStatus(c["name"], dict(c.get("values", [])), run_dir, list(mine.values()), c.get("linked", {})))
    return out


def format_sweep_status(cells: list[CellStatus], failed_only: bool = False) -> str:
    lines = []
    width = max([len(c.name) for c in cells] + [4])
    for c in cells:
        if failed_only and c.state != "failed":
            continue
        counts = ", ".join(f"{k} {v}" for k, v in sorted(c.counts().items()))
        lines.append(f"{c.name:<{width}}  {c.state:<8} {counts}; {len(c.linked)} linked")
        for r in c.rows:
            if r.state in ("failed", "cancelled", "invalid"):
                lines.append(f"    {r.id}: {r.state}" + (f" ({r.log or r.slurm_log})" if (r.log or r.slurm_log) else ""))
                if r.error:
                    lines.append(f"        {r.error}")
        blocked = [r.id for r in c.rows if r.state == "blocked"]
        if blocked:
            lines.append(f"    blocked (an upstream task failed): {', '.join(blocked[:6])}"
                         + (" ..." if len(blocked) > 6 else ""))
    return "\n".join(lines)


def cell_dirs(sweep_dir: os.PathLike) -> list[tuple[str, dict, Path]]:
    """(name, values, run directory) of every cell, in sweep order."""
    data = read_sweep(sweep_dir)
    return [(c["name"], dict(c.get("values", [])), Path(sweep_dir) / c["run_dir"]) for c in data["cells"]]

