"""regmean: RegMean (Jin et al. 2023) for every linear map of the model, from each source's Grams.

For a linear unit with weights W_i (out, in) and source i's Gram G_i = X_i^T X_i of that layer's
inputs on its calibration data (merge-statistics):

    W = (sum_i G~_i)^-1 sum_i G~_i W_i   (in the (in, out) orientation),  G~ = a G + (1 - a) diag(G)

solved by Cholesky in float64 (harc_hpc.math.regmean.GramSum). Sources are added one at a time:
besides the weights the engine already holds, the method keeps sum_i G~_i and sum_i G~_i W_i^T, so
memory does not grow with the number of sources.

Rules:

* attention, shared experts, dense MLPs, the router and the shared-expert gate take the Gram of
  their own input; an expert's gate/up the Gram of the tokens its source's router sent to it, its
  down projection the Gram of its intermediate activations on those tokens;
* parameters that are not the weight of a linear map whose input was observed (embeddings, the LM
  head, norms, biases) take the ``fallback`` data-free method (``fallback_parameters``);
* an expert that no source routed any token to has no data at all: it takes the fallback merge;
* directions no source's inputs reach (an expert routed to in one source only, ``alpha: 1``, a dead
  channel) leave sum G~ singular: there the solve adds the smallest ridge that factorises it, pulled
  toward the fallback merge of the same unit (harc_hpc.math.regmean); the units concerned are listed
  in the merge record under ``method_notes``.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Any, Optional

import torch
from pydantic import Field

from harc_hpc.math.regmean import GramSum
from harc_hpc.merge.base import MergeConfigError, MergeMethod, MethodParams

#: unit roles that are the weight of a linear map the statistics pass observes
LINEAR_ROLES = ("linear", "expert", "router", "shared_expert_gate")


class RegMeanParams(MethodParams):
    alpha: float = Field(0.9, ge=0.0, le=1.0)  # off-diagonal scale of each Gram (the paper's 0.9)
    fallback: str = "linear"  # data-free method for what has no Gram
    fallback_parameters: dict[str, Any] = Field(default_factory=dict)


@lru_cache(maxsize=32)
def _fallback(name: str, parameters_json: str, sources: tuple[str, ...]):
    import json

    from harc_hpc.merge import get_method

    method = get_method(name)
    if method.statistics is not None:
        raise MergeConfigError(f"merge.parameters.fallback: {name!r} needs statistics itself; the fallback "
                               f"must be a data-free method")
    try:
        params = method.parse_params(json.loads(parameters_json), sources)
    except MergeConfigError as exc:
        raise MergeConfigError(f"merge.parameters.fallback_parameters (for {name!r}): {exc}") from None
    return method, params


class RegMeanMerge(MergeMethod):
    name = "regmean"
    description = "RegMean: per linear map, the weight that best reproduces every source's outputs on its data"
    needs_base = False
    statistics = "gram"
    Params = RegMeanParams

    def fallback_of(self, params: RegMeanParams, sources):
        import json

        return _fallback(params.fallback, json.dumps(params.fallback_parameters, sort_keys=True), tuple(sources))

    def check(self, params: RegMeanParams, sources) -> None:
        self.fallback_of(params, sources)

    def base_needed(self, params: RegMeanParams) -> bool:
        from harc_hpc.merge import get_method

        return get_method(params.fallback).needs_base

    def passthrough(self, unit, params) -> Optional[str]:
        if unit.role in LINEAR_ROLES and len(unit.shape) == 2:
            return None
        return f"fallback {params.fallback} (no Gram: {unit.role})"

    def merge(self, base, sources, unit, params, source_names, ctx):
        fb_method, fb_params = self.fallback_of(params, source_names)
        if fb_method.needs_base and base is None:
            raise MergeConfigError(f"merge.parameters.fallback: {params.fallback!r} needs a base model: set models.base")
        if self.passthrough(unit, params) is not None:
            return fb_method.merge(base, sources, unit, fb_params, source_names, ctx)
        if ctx.gram is None:
            raise MergeConfigError("merge method 'regmean' needs each source's Grams (the merge-statistics stage)")
        dtype = sources[0].dtype
        # the data-free merge: what has no data, and the target of the ridge where data are missing
        # (on a copy of the list, not consuming it: the sources are needed below)
        fb = fb_method.merge(base, list(sources), unit, fb_params, source_names,
                             dataclasses.replace(ctx, consume_inputs=False))
        acc = GramSum(params.alpha)
        tokens = 0
        missing = []
        for i in range(len(sources)):
            stat = ctx.gram(unit, i)
            if stat is None:
                missing.append(source_names[i])
                continue
            w = sources[i].T if unit.transposed else sources[i]
            acc.add(stat.gram, w.to(device=ctx.device))
            tokens += stat.tokens
            del stat
        if len(missing) == len(sources):
            ctx.note(f"fallback {params.fallback}: no Gram recorded", unit.name)
            return fb
        if missing:
            raise MergeConfigError(f"regmean: unit {unit.name} has a Gram in some sources but not in {missing}: "
                                   f"the merge statistics do not match (rerun merge-statistics)")
        if tokens == 0:
            ctx.note(f"fallback {params.fallback}: expert never routed to in any source", unit.name)
            return fb
        target = fb.T if unit.transposed else fb
        sol = acc.solve(fallback=target.to(device=ctx.device))
        if sol.method != "cholesky":
            ctx.note(f"singular Gram sum: {sol.method} toward the {params.fallback} merge", unit.name)
        w = sol.weight.T if unit.transposed else sol.weight
        return w.to(device=sources[0].device, dtype=dtype).contiguous()


class RegMeanPlusPlusMerge(RegMeanMerge):
    """RegMean++: the same rule, with each layer's Grams taken on the partially merged model's own
    activations (harc_hpc.stages.regmean_sequential). A method of its own rather than an option of
    ``regmean``: its statistics depend on the merge, so they are computed by merge-experts, while
    RegMean's are reused across changes of the merge parameters."""

    name = "regmean_plusplus"
    description = "RegMean++: RegMean with Grams taken layer by layer through the partially merged model"
    statistics = "gram_sequential"
