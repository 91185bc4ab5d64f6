"""The merge-method interface: a method merges one unit (a tensor, an expert matrix, or a layer's
fused expert tensor) of every input into one tensor. Methods know nothing of files."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Optional, Sequence, Union

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from harc_hpc.errors import UsageError, InputDataError

Granularity = Literal["per_expert", "fused"]

#: What a unit is, from its tensor name and shape.
Role = Literal["embedding", "lm_head", "norm", "bias", "router", "shared_expert_gate", "expert",
               "experts_fused", "linear", "vector", "other"]


class MergeConfigError(UsageError):
    """Bad merge settings (unknown method or preset, invalid parameters, missing base)."""


class MergeInputError(InputDataError):
    """Inputs that cannot be merged; the message names the model, file and tensor."""


@dataclass(frozen=True)
class Piece:
    """A contiguous run of elements of one stored tensor: elements [start, start + numel) of the
    flattened tensor ``key``, viewed with ``shape``. The output uses the same key and offsets."""

    key: str
    start: int
    numel: int
    shape: tuple[int, ...]
    whole: bool = True


@dataclass(frozen=True)
class MergeUnit:
    """What a method merges at once: the concatenation of its pieces, reshaped to ``shape``."""

    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    role: str
    layer: Optional[int] = None
    # an (in, out) matrix of a linear map (GPT-OSS experts): methods that reason about the map (WUDI)
    # work on its transpose
    transposed: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class GramStatistic:
    """Source i's Gram X^T X (in, in) of the inputs of one linear unit over its calibration tokens
    (for an expert: only the tokens that source's router sent to it), and the number of tokens."""

    gram: torch.Tensor
    tokens: int


@dataclass
class MergeContext:
    """Run-wide settings a method may use: the seed (for DARE's masks), the compute device, and the
    per-source statistics of data-driven methods (``MergeMethod.statistics``)."""

    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: the caller keeps no other reference to the ``sources`` list it passes: a method may set its
    #: entries to None once used, to free memory early
    consume_inputs: bool = False
    #: ``gram(unit, i)``: source i's GramStatistic for ``unit`` (float64 on ``device``), or None when
    #: no Gram was recorded for it (not the weight of a linear map the statistics pass saw). Read on
    #: demand, so a method can hold one source's Gram at a time.
    gram: Optional[Callable[[MergeUnit, int], Optional[GramStatistic]]] = None
    #: ``fisher(unit, i)``: source i's diagonal Fisher for exactly ``unit`` (the concatenation of its
    #: pieces, reshaped to ``unit.shape``, float32)
    fisher: Optional[Callable[[MergeUnit, int], torch.Tensor]] = None
    #: what a method did to a unit beyond its plain rule (a fallback, a ridge), by kind -> unit names;
    #: written to the merge record
    notes: dict[str, list[str]] = field(default_factory=dict)

    def note(self, kind: str, unit_name: str) -> None:
        self.notes.setdefault(kind, []).append(unit_name)

    def generator(self, unit_name: str, model_index: int) -> torch.Generator:
        """A CPU generator seeded from (seed, unit name, model index): a rerun, a resumed run or a
        run that merges units in another order draws the same masks."""
        digest = hashlib.sha256(f"{self.seed}\0{unit_name}\0{model_index}".encode()).digest()
        g = torch.Generator(device="cpu")
        g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return g


PerModel = Union[float, list[float], dict[str, float]]


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    def per_model(self, name: str, sources: Sequence[str]) -> list[float]:
        """Resolve a scalar, list (in source order) or {source name: value} field to a list."""
        value = getattr(self, name)
        n = len(sources)
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(sources))
            missing = [s for s in sources if s not in value]
            if unknown or missing:
                raise MergeConfigError(f"merge.parameters.{name}: keys must be the source names "
                                       f"{list(sources)} (unknown {unknown}, missing {missing})")
            return [float(value[s]) for s in sources]
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise MergeConfigError(f"merge.parameters.{name}: {len(value)} values for {n} "
                                       f"source models {list(sources)}")
            return [float(v) for v in value]
        return [float(value)] * n


class MergeMethod:
    """Subclasses set ``name``, ``Params``, ``needs_base`` and implement ``merge``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_base: ClassVar[bool] = True
    #: the result at each element depends only on the inputs at that element, so large tensors can
    #: be merged in slices (bounded memory); methods that rank or normalise a whole tensor cannot
    elementwise: ClassVar[bool] = False
    #: the per-source statistics the method merges with, produced by the merge-statistics stage
    #: from each source's calibration data: None (data-free), "gram" (RegMean) or "fisher"
    statistics: ClassVar[Optional[str]] = None
    Params: ClassVar[type[MethodParams]] = MethodParams

    def base_needed(self, params: MethodParams) -> bool:
        """Whether these settings need models.base (a method may need it only for some options)."""
        return self.needs_base

    def parse_params(self, parameters: dict[str, Any], sources: Sequence[str]) -> MethodParams:
        try:
            params = self.Params.model_validate(dict(parameters))
        except ValidationError as exc:
            lines = [f"merge.parameters for method {self.name!r} are invalid:"]
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                lines.append(f"  {loc}: {msg}")
            raise MergeConfigError("\n".join(lines)) from None
        self.check(params, sources)
        return params

    def check(self, params: MethodParams, sources: Sequence[str]) -> None:
        """Cross-field checks that need the source names (e.g. list lengths)."""
        for fname in ("weights", "density"):
            if fname in type(params).model_fields:
                params.per_model(fname, sources)

    def granularity(self, params: MethodParams) -> Granularity:
        return getattr(params, "granularity", "per_expert")

    def passthrough(self, unit: MergeUnit, params: MethodParams) -> Optional[str]:
        """What a unit takes when the method's own rule does not apply to it (a short description
        for the merge record), or None when the method merges it."""
        return None

    def merge(self, base: Optional[torch.Tensor], sources: list[torch.Tensor], unit: MergeUnit,
              params: MethodParams, source_names: Sequence[str], ctx: MergeContext) -> torch.Tensor:
        raise NotImplementedError
