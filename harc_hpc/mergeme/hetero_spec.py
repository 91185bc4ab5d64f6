"""What to build: one MoE of heterogeneous dense experts (MergeME §3.2) and its short fine-tune.

The model is the Python argument of ``build_hetero_moe`` and the YAML file of
``harc-hpc build-hetero-moe``; relative paths in a YAML file (expert paths, ``output``,
``train.data.files``, ``train.checkpoint_dir``) are resolved against the file's directory.
``parse_hetero_spec`` / ``load_hetero_spec`` report a bad setting as ``MergeConfigError`` (exit
code 2) naming every bad key; unknown keys are errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from harc_hpc.config import CalibrationData
from harc_hpc.mergeme.spec import (path_from, read_spec_yaml, resolve_expert_and_output_paths, unique_expert_names,
                                   validate_spec)

Trainable = Literal["projectors", "router", "embedding", "head"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HeteroExpertSpec(_Strict):
    """A dense expert: any width and depth, the same tokenizer as the others."""

    #: letters, digits, '-' and '_' (it names the expert's projectors)
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _identifier(cls, v: str) -> str:
        if not all(c.isalnum() or c in "-_" for c in v):
            raise ValueError("must contain only letters, digits, '-' and '_'")
        return v


class ProjectorSpec(_Strict):
    #: linear layers per projector: 1 (affine) or 2 (Linear, activation, Linear)
    layers: Literal[1, 2] = 2
    #: hidden units of a 2-layer projector (default max(d_in, d_out))
    hidden_size: Optional[int] = Field(None, ge=1)
    activation: Literal["gelu", "relu", "silu"] = "gelu"
    #: random (the paper's) or identity (1-layer only: copy / zero-pad / truncate coordinates)
    init: Literal["random", "identity"] = "random"

    @model_validator(mode="after")
    def _identity_is_one_layer(self):
        if self.init == "identity" and self.layers != 1:
            raise ValueError("init identity needs layers: 1 (a 2-layer MLP with an activation "
                             "cannot start as the identity)")
        return self


class HeteroRouterSpec(_Strict):
    #: random: N(0, std^2); zeros: every expert the same logit
    init: Literal["random", "zeros"] = "random"
    std: float = Field(0.02, gt=0)


class TrainSpec(_Strict):
    """The fine-tune of the projectors and router with the experts frozen (next-token
    cross-entropy on the calibration texts, AdamW, constant learning rate)."""

    #: calibration text (JSONL chat / text records, or plain text), as in the pipeline config
    data: CalibrationData = CalibrationData()
    #: optimizer steps (0: write the initial model, no data needed)
    steps: int = Field(100, ge=0)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    #: clip the gradient's global L2 norm (null: no clipping)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    #: what is trained; the experts are always frozen
    trainable: list[Trainable] = Field(default_factory=lambda: ["projectors", "router"], min_length=1)
    #: write a resumable checkpoint every N steps (and after the last)
    checkpoint_every: int = Field(50, ge=1)
    #: default: "<output>.train" beside the output; removed once the output is written
    checkpoint_dir: Optional[Path] = None

    @field_validator("trainable")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"repeated entries in {v}")
        return v

    @model_validator(mode="after")
    def _data_when_training(self):
        if self.steps > 0 and not self.data.files:
            raise ValueError(f"steps is {self.steps} but data.files is empty: the fine-tune needs "
                             f"calibration files (or set steps: 0)")
        return self


class HeteroMoESpec(_Strict):
    experts: list[HeteroExpertSpec] = Field(min_length=2)
    output: Path
    #: experts per sequence (MergeME: 2)
    top_k: int = Field(2, ge=1)
    #: the expert whose tokenizer the MoE uses (default: the first); all must agree anyway
    tokenizer: Optional[str] = None
    projector: ProjectorSpec = ProjectorSpec()
    router: HeteroRouterSpec = HeteroRouterSpec()
    #: the fine-tune (required: its data.files, or steps: 0)
    train: TrainSpec
    #: reference: the output records each expert's absolute path and digest; copy: the experts'
    #: directories are copied into the output (self-contained)
    experts_storage: Literal["reference", "copy"] = "reference"
    #: dtype of the experts and the wrapper (float32 for reproducible CPU training)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    #: seeds the projector / router initialisation and the data order
    seed: int = 0
    overwrite: bool = False
    revision: Optional[str] = None

    @field_validator("experts")
    @classmethod
    def _unique_names(cls, experts):
        return unique_expert_names(experts)

    @model_validator(mode="after")
    def _cross_checks(self):
        names = [e.name for e in self.experts]
        if self.top_k > len(names):
            raise ValueError(f"top_k {self.top_k} is more than the {len(names)} experts {names}")
        if self.tokenizer is not None and self.tokenizer not in names:
            raise ValueError(f"tokenizer {self.tokenizer!r} is not an expert name {names}")
        return self

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def tokenizer_expert(self) -> str:
        return self.tokenizer or self.experts[0].name

    @property
    def checkpoint_dir(self) -> Path:
        out = Path(self.output)
        return Path(self.train.checkpoint_dir) if self.train.checkpoint_dir else out.with_name(out.name + ".train")


def parse_hetero_spec(data: dict, where: str = "heterogeneous MoE spec") -> HeteroMoESpec:
    return validate_spec(HeteroMoESpec, data, where)


def load_hetero_spec(path: Union[str, Path]) -> HeteroMoESpec:
    path = Path(path)
    data = read_spec_yaml(path, "spec", "experts, output, train, ...")
    here = path.resolve().parent
    resolve_expert_and_output_paths(data, here)
    train = data.get("train")
    if isinstance(train, dict):
        if isinstance(train.get("checkpoint_dir"), str):
            train["checkpoint_dir"] = str(path_from(here, train["checkpoint_dir"]))
        d = train.get("data")
        if isinstance(d, dict) and isinstance(d.get("files"), list):
            d["files"] = [str(path_from(here, f)) if isinstance(f, str) else f for f in d["files"]]
    return parse_hetero_spec(data, where=str(path))
