"""wudi: WUDI-Merging (Cheng et al., ICML 2025), data-free, per linear weight matrix.

For every 2-D linear weight, and for every expert's gate, up and down matrix separately (a fused
expert tensor is never treated as one matrix), with tau_i = W_i - W_base:

    minimise  L(tau_m) = sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2

with Adam (lr 1e-5, 300 steps, no weight decay) from tau_m = sum_i tau_i, and W = W_base + tau_m.
The gradient 2 sum_i (tau_m - tau_i) tau_i^T tau_i / ||tau_i||^2 is evaluated in closed form in
whichever association is cheaper: through the (in x in) matrix sum_i tau_i^T tau_i/||tau_i||^2
(out*in^2 per step) or directly (2n*out^2*in per step). Models whose task vector is zero for a
matrix drop out of its loss. Computation is float32 on ``merge.device``.

Not WUDI-merged (WUDI's objective is about linear maps of hidden states): 1-D tensors (norms,
biases) and 2-D tensors whose name matches ``skip`` (default: ``embed_tokens``, ``lm_head``). They
take ``nonlinear``: ``base`` (default, as the official code and HARC: the base model's value),
``mean`` (base + mean_i tau_i, as FusionBench) or ``sum`` (base + sum_i tau_i). The router
(``gate.weight``, (K, d)) and Qwen2-MoE's ``shared_expert_gate`` are linear maps and are
WUDI-merged, as in HARC's stage 1.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field

from harc_hpc.merge.base import MergeMethod, MethodParams


class WudiParams(MethodParams):
    lr: float = Field(1e-5, gt=0)
    steps: int = Field(300, ge=0)
    nonlinear: Literal["base", "mean", "sum"] = "base"
    skip: list[str] = Field(default_factory=lambda: [r"embed_tokens", r"lm_head"])


def wudi_solve(taus: torch.Tensor, lr: float = 1e-5, steps: int = 300) -> torch.Tensor:
    """tau_m for a stack of task vectors ``taus`` (n, out, in), float32, on ``taus.device``."""
    taus = taus.float()
    norms2 = taus.pow(2).sum(dim=(1, 2))
    live = norms2 > 0
    tau_m = taus.sum(dim=0).clone()
    if steps == 0 or not bool(live.any()):
        return tau_m
    taus, norms2 = taus[live], norms2[live]
    n, out, inp = taus.shape
    via_gram = out * inp * inp <= 2 * n * out * out * inp
    if via_gram:
        scaled = taus / norms2.view(-1, 1, 1)
        gram = torch.einsum("noi,noj->ij", scaled, taus)  # sum_i tau_i^T tau_i / ||tau_i||^2
        target = torch.zeros_like(tau_m)
        for t, s in zip(taus, scaled):  # tau_i tau_i^T tau_i / ||tau_i||^2, cheaper side first
            target += (t @ s.T) @ t if out <= inp else t @ (s.T @ t)
        del scaled

        def grad(m):
            return 2 * (m @ gram - target)
    else:
        def grad(m):
            g = torch.zeros_like(m)
            for t, nn in zip(taus, norms2):
                g += ((m - t) @ t.T) @ t / nn
            return 2 * g

    tau_m.requires_grad_(False)
    param = torch.nn.Parameter(tau_m)
    opt = torch.optim.Adam([param], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        with torch.no_grad():
            param.grad = grad(param.data)
        opt.step()
    return param.data


class WudiMerge(MergeMethod):
    name = "wudi"
    description = "WUDI: per linear matrix, Adam on sum_i ||(tau_m - tau_i) tau_i^T||^2/||tau_i||^2"
    Params = WudiParams

    def granularity(self, params) -> str:
        return "per_expert"  # one 2-D matrix per expert projection, never a fused 3-D tensor

    def is_linear(self, unit, params) -> bool:
        if len(unit.shape) != 2 or unit.name.endswith("_bias"):  # GPT-OSS's (E, out) expert biases
            return False
        return not any(re.search(p, unit.name) for p in params.skip)

    NONLINEAR = {"base": "the base's value", "mean": "base + mean task vector", "sum": "base + sum of task vectors"}

    def passthrough(self, unit, params):
        if self.is_linear(unit, params):
            return None
        return f"not WUDI-merged: {self.NONLINEAR[params.nonlinear]} (nonlinear={params.nonlinear})"

    def merge(self, base, sources, unit, params, source_names, ctx):
        if not self.is_linear(unit, params):
            if params.nonlinear == "base":
                return base.clone()
            taus = [x.float() - base.float() for x in sources]
            tau = torch.stack(taus).sum(0)
            if params.nonlinear == "mean":
                tau = tau / len(taus)
            return (base.float() + tau).to(base.dtype)
        dev = ctx.device
        b = base.to(dev, torch.float32)
        taus = torch.stack([x.to(dev, torch.float32) - b for x in sources])
        if unit.transposed:  # stored (in, out): WUDI's objective is about the map's input space
            tau_m = wudi_solve(taus.transpose(1, 2), params.lr, params.steps).T
        else:
            tau_m = wudi_solve(taus, params.lr, params.steps)
        return (b + tau_m).to("cpu", base.dtype)
