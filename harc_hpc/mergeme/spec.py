"""What to build: the settings of one dense-to-MoE build, validated (unknown keys are errors).

The same model is the Python API's argument (``build_moe(MoEBuildSpec(...))``) and the YAML file of
``harc-hpc build-moe``; relative paths in a YAML file are resolved against the file's directory.
``parse_spec`` / ``load_spec`` report a bad setting as ``MergeConfigError`` (exit code 2, every
problem with its key path); constructing ``MoEBuildSpec`` directly raises pydantic's error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harc_hpc.merge.base import MergeConfigError

RouterInit = Literal["random", "uniform", "hidden_state", "task_vector"]

#: the name the base takes as an expert (``include_base_expert``) and in errors
BASE_NAME = "base"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpertSpec(_Strict):
    """A dense domain expert continued from the base."""

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    #: texts of the expert's domain, for the hidden_state and task_vector router rules
    prompts: list[str] = []


class NonFfnMergeSpec(_Strict):
    """How attention, norms, embeddings and head are merged: a harc-hpc merge method by name
    (harc_hpc.merge), with the base as the task-vector base and the experts as the sources."""

    method: str = "linear"
    preset: Optional[str] = None
    parameters: dict[str, Any] = {}
    #: compute dtype of merges (default: the inputs' promoted dtype, as merge-experts)
    dtype: Optional[str] = None
    #: stored dtype of every floating tensor (default: dtype, else the inputs' promoted dtype)
    out_dtype: Optional[str] = None


class RouterSpec(_Strict):
    init: RouterInit = "random"
    #: the base expert's prompts (include_base_expert with the hidden_state rule)
    base_prompts: list[str] = []


class MoEBuildSpec(_Strict):
    base: str = Field(min_length=1)
    experts: list[ExpertSpec] = Field(min_length=1)
    output: Path
    #: experts per token (MergeME: 2)
    top_k: int = Field(2, ge=1)
    #: the base's FFN is one more routed expert (the last one)
    include_base_expert: bool = False
    #: Qwen2-MoE only: ``base`` (default) makes the base's FFN the shared expert, ``none`` writes a
    #: zero-width shared expert (an exact BTX MoE; some runtimes refuse zero-size tensors)
    shared_expert: Optional[Literal["base", "none"]] = None
    merge: NonFfnMergeSpec = NonFfnMergeSpec()
    router: RouterSpec = RouterSpec()
    #: seeds the random router and DARE's masks
    seed: int = 0
    max_shard_size: Union[int, str] = "5GB"
    #: replace an existing output directory (otherwise an existing one is an error)
    overwrite: bool = False
    allow_pickle: bool = False
    revision: Optional[str] = None

    @field_validator("experts")
    @classmethod
    def _unique_names(cls, experts):
        names = [e.name for e in unique_expert_names(experts)]
        if BASE_NAME in names:
            raise ValueError(f"{BASE_NAME!r} is the base model's name; give the expert another one")
        return experts

    @model_validator(mode="after")
    def _prompts_for_data_rules(self):
        if self.router.init == "hidden_state":
            missing = [e.name for e in self.experts if not e.prompts]
            if self.include_base_expert and not self.router.base_prompts:
                missing.append(f"{BASE_NAME} (router.base_prompts)")
            if missing:
                raise ValueError(f"router.init hidden_state needs prompts for every expert; "
                                 f"none for {missing}")
        if self.router.init == "task_vector" and not any(e.prompts for e in self.experts):
            raise ValueError("router.init task_vector needs prompts (experts[].prompts)")
        return self

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]


def unique_expert_names(experts: list) -> list:
    """``experts`` (anything with a ``name``), checked to have unique names; for a spec's validator."""
    names = [e.name for e in experts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"expert names must be unique; repeated: {dup}")
    return experts


def validation_message(exc: ValidationError, title: str) -> str:
    lines = [title]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {loc}: {err['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def validate_spec(spec_class: type[BaseModel], data: dict, where: str):
    """``data`` as a ``spec_class``; a bad setting is a ``MergeConfigError`` naming every bad key."""
    try:
        return spec_class.model_validate(data)
    except ValidationError as exc:
        raise MergeConfigError(validation_message(exc, f"{where} is invalid:")) from None


def read_spec_yaml(path: Path, what: str, keys: str) -> dict:
    """The mapping in the YAML file ``path`` (a ``what``, whose top-level ``keys`` an error names)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise MergeConfigError(f"cannot read the {what}: {exc}", where=str(path)) from None
    if not isinstance(data, dict):
        raise MergeConfigError(f"a {what} is a mapping ({keys})", where=str(path))
    return data


def path_from(here: Path, p: str) -> Path:
    """``p`` (``$VARS`` and ``~`` expanded) as an absolute path, relative to ``here`` unless absolute."""
    q = Path(os.path.expandvars(p)).expanduser()
    return q if q.is_absolute() else (here / q).resolve()


def model_path_from(here: Path, p: Any) -> Any:
    """A model reference in a spec file: the pipeline config's rule, a path that exists relative to the
    file (``here``) or that can only be a path is local (made absolute); anything else may be a hub
    id and stays as written."""
    if not isinstance(p, str):
        return p
    candidate = path_from(here, p)
    return str(candidate) if candidate.exists() or p.startswith((".", "/", "~", "$")) else p


def resolve_expert_and_output_paths(data: dict, here: Path) -> None:
    """In a spec file's mapping (from the file in ``here``), in place: ``experts[].path`` by the
    model rule (``model_path_from``), ``output`` made absolute."""
    for e in data.get("experts") or []:
        if isinstance(e, dict) and "path" in e:
            e["path"] = model_path_from(here, e["path"])
    if isinstance(data.get("output"), str):
        data["output"] = str(path_from(here, data["output"]))


def parse_spec(data: dict, where: str = "build spec") -> MoEBuildSpec:
    return validate_spec(MoEBuildSpec, data, where)


def load_spec(path: Union[str, Path]) -> MoEBuildSpec:
    """A YAML build spec; ``base``, ``experts[].path`` and ``output`` relative to its directory."""
    path = Path(path)
    data = read_spec_yaml(path, "build spec", "base, experts, output, ...")
    here = path.resolve().parent
    if "base" in data:
        data["base"] = model_path_from(here, data["base"])
    resolve_expert_and_output_paths(data, here)
    return parse_spec(data, where=str(path))
