"""dare_linear: DARE random drop of each task vector (keep probability ``density``), rescale the
survivors, then task arithmetic: base + lambda * sum_i w_i tau~_i.

``rescale``: ``l1`` (default, mergekit's convention: survivors scaled so the L1 norm of the task
vector is unchanged), ``inverse_density`` (the DARE paper: survivors scaled by 1/density) or
``none``; ``true``/``false`` mean ``l1``/``none`` as in mergekit configs. Masks are drawn from a
generator seeded by (run seed, unit name, model index): reruns give identical bytes.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field, field_validator

from harc_hpc.merge._task_vectors import task_vector_merge
from harc_hpc.merge.base import Granularity, MergeMethod, MethodParams, PerModel
from harc_hpc.merge.ties import check_density


def _rescale_mode(v):
    if v is True:
        return "l1"
    if v is False:
        return "none"
    return v


class DareParams(MethodParams):
    weights: PerModel = 1.0
    density: PerModel = 1.0
    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool = False
    rescale: Union[bool, Literal["l1", "inverse_density", "none"]] = "l1"
    granularity: Granularity = "per_expert"

    @field_validator("density")
    @classmethod
    def _valid_density(cls, v):
        return check_density(v)

    @field_validator("rescale")
    @classmethod
    def _valid_rescale(cls, v):
        return _rescale_mode(v)


class DareLinearMerge(MergeMethod):
    name = "dare_linear"
    description = "DARE drop + rescale, then task arithmetic"
    Params = DareParams
    consensus = False

    def merge(self, base, sources, unit, params, source_names, ctx):
        gens = [ctx.generator(unit.name, i) for i in range(len(sources))]
        return task_vector_merge(
            base, sources, params.per_model("weights", source_names),
            densities=params.per_model("density", source_names), sparsify="random",
            rescale=params.rescale, consensus=self.consensus, normalize=params.normalize,
            lam=params.lambda_, generators=gens,
            consume=ctx.consume_inputs)
