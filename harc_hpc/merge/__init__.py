"""Merge methods, registered by name (data-free ones; RegMean and Fisher, which read merge
statistics), and the streaming merge of checkpoints."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from harc_hpc.merge.base import (Granularity, GramStatistic, MergeConfigError, MergeContext, MergeInputError,
                                 MergeMethod, MergeUnit, MethodParams, Piece)
from harc_hpc.merge.dare_linear import DareLinearMerge
from harc_hpc.merge.dare_ties import DareTiesMerge
from harc_hpc.merge.fisher import FisherMerge
from harc_hpc.merge.linear import LinearMerge
from harc_hpc.merge.presets import PRESETS
from harc_hpc.merge.regmean import RegMeanMerge, RegMeanPlusPlusMerge
from harc_hpc.merge.task_arithmetic import TaskArithmeticMerge
from harc_hpc.merge.ties import TiesMerge
from harc_hpc.merge.wudi import WudiMerge

METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


for _m in (LinearMerge(), TaskArithmeticMerge(), TiesMerge(), DareLinearMerge(), DareTiesMerge(),
           WudiMerge(), RegMeanMerge(), RegMeanPlusPlusMerge(), FisherMerge()):
    register(_m)


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise MergeConfigError(f"unknown merge method {name!r}; available: "
                               f"{', '.join(sorted(METHODS))}") from None


def resolve_settings(method: Optional[str], preset: Optional[str], parameters: dict[str, Any],
                     sources: Sequence[str], method_explicit: bool = True
                     ) -> tuple[MergeMethod, MethodParams]:
    """(method, validated parameters) from a method name, an optional preset and explicit
    parameters (which override the preset's). A preset decides the method unless one is given
    explicitly, in which case the two must agree."""
    params: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise MergeConfigError(f"unknown merge preset {preset!r}; available: "
                                   f"{', '.join(sorted(PRESETS))}")
        p = PRESETS[preset]
        if method_explicit and method is not None and method != p["method"]:
            raise MergeConfigError(f"merge.preset {preset!r} is for method {p['method']!r} but "
                                   f"merge.method is {method!r}")
        method = p["method"]
        params.update(p["parameters"])
    params.update(parameters or {})
    m = get_method(method or "linear")
    return m, m.parse_params(params, sources)


__all__ = ["METHODS", "PRESETS", "Granularity", "GramStatistic", "MergeConfigError", "MergeContext",
           "MergeInputError", "MergeMethod", "MergeUnit", "MethodParams", "Piece", "get_method",
           "register", "resolve_settings"]
