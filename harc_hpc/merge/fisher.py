"""fisher: Fisher-weighted averaging (Matena & Raffel, "Merging Models with Fisher-Weighted
Averaging", 2022), element by element

    theta = sum_i w_i F~_i theta_i / sum_i w_i F~_i,    F~_i = max(F_i, epsilon),

with F_i source i's diagonal empirical Fisher on its own calibration data
(harc_hpc.math.fisher; written per source by the merge-statistics stage and handed to the method as
``ctx.fisher(unit, i)``) and w_i the model weights (the paper's lambda_i; equal by default, which
for two models is its 0.5 / 0.5: only their ratios matter).

The floor. ``epsilon`` (absolute, default 1e-10) floors every Fisher before weighting, so an
element that no source's data moves (all F_i below epsilon: an expert no calibration token was
routed to, a buffer) gets the plain weighted average sum_i w_i theta_i / sum_i w_i instead of 0/0,
and an element whose Fishers are all far above epsilon is unchanged by it. Fisher magnitudes scale
with the model and the sequence length (an element's squared gradient is often 1e-8 or less on a
large LM), so the default is small; raise it to pull more of the weights toward plain averaging.

No base model is used. Computation is float32 (float64 for float64 inputs), the result is cast to
the sources' dtype; being element-wise, large tensors are merged in slices (the Fisher of a slice
is the same slice of the Fisher). Checkpoint tensors that are buffers, not parameters (they have no
gradient), have a Fisher of zero and so are averaged with the weights.
"""

from __future__ import annotations

import torch
from pydantic import Field

from harc_hpc.merge.base import MergeConfigError, MergeInputError, MergeMethod, MethodParams, PerModel


class FisherParams(MethodParams):
    weights: PerModel = 1.0
    epsilon: float = Field(1e-10, gt=0.0)


class FisherMerge(MergeMethod):
    name = "fisher"
    description = "Fisher-weighted average sum_i w_i F_i x_i / sum_i w_i F_i (per-source diagonal Fisher)"
    needs_base = False
    elementwise = True
    statistics = "fisher"
    Params = FisherParams

    def check(self, params, sources):
        super().check(params, sources)
        weights = params.per_model("weights", sources)
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise MergeConfigError(f"merge.parameters.weights: Fisher merging needs non-negative weights "
                                   f"with at least one positive, got {weights}")

    def merge(self, base, sources, unit, params, source_names, ctx):
        if ctx.fisher is None:
            raise MergeConfigError("merge method 'fisher' needs each source's Fisher (computed by the "
                                   "merge-statistics stage); none was given to the merge")
        weights = params.per_model("weights", source_names)
        dtype, device = sources[0].dtype, sources[0].device
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        num = torch.zeros(unit.shape, dtype=acc, device=device)
        den = torch.zeros(unit.shape, dtype=acc, device=device)
        for i, (name, w) in enumerate(zip(source_names, weights)):
            x = sources[i]
            f = ctx.fisher(unit, i)
            if tuple(f.shape) != tuple(unit.shape):
                raise MergeInputError(f"source {name!r}: the Fisher of {unit.name} has shape "
                                      f"{tuple(f.shape)}, the tensor {tuple(unit.shape)}")
            f = f.to(device=device, dtype=acc)
            if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
                raise MergeInputError(f"source {name!r}: the Fisher of {unit.name} has negative or "
                                      f"non-finite entries (recompute the merge statistics)")
            f = f.clamp_min_(params.epsilon).mul_(w)
            num.addcmul_(f, x.reshape(unit.shape).to(acc))
            den.add_(f)
            del x
            if ctx.consume_inputs:
                sources[i] = None
        return num.div_(den).to(dtype)
