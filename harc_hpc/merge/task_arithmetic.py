"""task_arithmetic: base + lambda * sum_i w_i tau_i, tau_i = x_i - base (optionally divided by
sum_i w_i with ``normalize``)."""

from __future__ import annotations

from pydantic import Field

from harc_hpc.merge._task_vectors import task_vector_merge
from harc_hpc.merge.base import MergeMethod, MethodParams, PerModel


class TaskArithmeticParams(MethodParams):
    weights: PerModel = 1.0
    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool = False


class TaskArithmeticMerge(MergeMethod):
    name = "task_arithmetic"
    description = "base + lambda * sum_i w_i (x_i - base)"
    Params = TaskArithmeticParams
    elementwise = True

    def merge(self, base, sources, unit, params, source_names, ctx):
        return task_vector_merge(base, sources, params.per_model("weights", source_names),
                                 normalize=params.normalize, lam=params.lambda_,
                                 consume=ctx.consume_inputs)
