"""ties: trim each task vector to its top ``density`` fraction by magnitude, elect each element's
sign by the sum of the weighted trimmed deltas, average the agreeing ones (weights-normalised by
default), scale by lambda, add to the base.

``granularity`` says where the magnitude ranking happens for expert weights: ``per_expert`` ranks
each expert's gate, up and down matrix on its own; ``fused`` ranks a layer's fused gate_up tensor
(E, 2I, d; gate rows then up rows per expert) and its fused down tensor (E, d, I), which is what
mergekit 0.1.5 does on transformers-5 models and reproduces its tensors exactly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from harc_hpc.merge._task_vectors import task_vector_merge
from harc_hpc.merge.base import Granularity, MergeMethod, MethodParams, PerModel


def check_density(v):
    """Validator of a density (a value, or one per model): each in (0, 1]."""
    values = v.values() if isinstance(v, dict) else (v if isinstance(v, list) else [v])
    for x in values:
        if not (0.0 < float(x) <= 1.0):
            raise ValueError(f"density must be in (0, 1], got {x}")
    return v


class TiesParams(MethodParams):
    weights: PerModel = 1.0
    density: PerModel = 1.0
    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool = True
    rescale: bool = False  # mergekit's option: rescale kept values to the task vector's L1 norm
    granularity: Granularity = "per_expert"
    #: how the top-k of |tau| is chosen. ``mergekit``: its descending argsort (bit-exact ties; an int64
    #: index per element and a sort, the peak memory on large tensors) except on per-expert matrices,
    #: which mergekit never ranks alone. ``threshold``: the same k by an exact chunked radix select,
    #: ties at the threshold kept in index order (no sort, no index array). ``auto``: mergekit with
    #: granularity fused (the mode that reproduces mergekit's tensors), threshold with per_expert.
    ranking: Literal["auto", "mergekit", "threshold"] = "auto"

    @field_validator("density")
    @classmethod
    def _valid_density(cls, v):
        return check_density(v)


class TiesMerge(MergeMethod):
    name = "ties"
    description = "TIES: trim by magnitude, elect sign by sum, disjoint mean, lambda"
    Params = TiesParams

    def merge(self, base, sources, unit, params, source_names, ctx):
        return task_vector_merge(
            base, sources, params.per_model("weights", source_names),
            densities=params.per_model("density", source_names), sparsify="magnitude",
            rescale="l1" if params.rescale else "none", consensus=True,
            normalize=params.normalize, lam=params.lambda_, consume=ctx.consume_inputs,
            ranking=self._ranking(unit, params))

    @staticmethod
    def _ranking(unit, params) -> str:
        mode = params.ranking
        if mode == "auto":
            mode = "mergekit" if params.granularity == "fused" else "threshold"
        # per-expert matrices have no mergekit counterpart: the exact selection is used there
        return "argsort" if mode == "mergekit" and unit.role != "expert" else "threshold"
