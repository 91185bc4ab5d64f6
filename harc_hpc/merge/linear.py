"""linear: weighted average of the models, sum_i w_i x_i / sum_i w_i (``normalize``, default) or the
plain weighted sum. Accumulates in float32 (float64 for float64 inputs) and casts back, like
mergekit 0.1.5. The base model, if configured, is not one of the averaged models."""

from __future__ import annotations

import torch

from harc_hpc.merge.base import MergeMethod, MethodParams, PerModel


class LinearParams(MethodParams):
    weights: PerModel = 1.0
    normalize: bool = True


class LinearMerge(MergeMethod):
    name = "linear"
    description = "weighted average of all models (no base needed)"
    needs_base = False
    elementwise = True
    Params = LinearParams

    def merge(self, base, sources, unit, params, source_names, ctx):
        weights = params.per_model("weights", source_names)
        first = sources[0]
        acc = torch.float64 if first.dtype == torch.float64 else torch.float32
        w = torch.tensor(weights, dtype=acc)
        result = torch.zeros_like(first, dtype=acc)
        for x, c in zip(sources, w.unbind(0)):
            result.addcmul_(x, c)
        if params.normalize:
            result.div_(w.sum())
        return result.to(first.dtype)
