"""SolverSettings: one object, one source of defaults (the config's harc section), refused when built."""

from __future__ import annotations

import pytest
import torch

from harc_hpc.config import HarcSection
from harc_hpc.errors import UsageError
from harc_hpc.math import SolverSettings, solve_router
from harc_hpc.math.targets import fit_router_to_targets


def test_the_shared_defaults_are_the_configs():
    s, h = SolverSettings(), HarcSection()
    for name in ("alpha", "hessian", "solver", "preconditioner", "expert_block_tokens", "objective", "tol", "max_iter"):
        assert getattr(s, name) == getattr(h, name), name
    assert s.preconditioner == "expert-block"


def test_auto_preconditioner_is_chosen_by_the_routers_size():
    from harc_hpc.math.settings import EXPERT_BLOCK_MIN_SIZE, resolve_preconditioner
    from harc_hpc.math.solver import choose_solver

    assert resolve_preconditioner("auto", 64, 2048) == "expert-block"  # OLMoE's router
    assert resolve_preconditioner("auto", 8, 128) == "jacobi"  # the demo's
    assert resolve_preconditioner("auto", 1, EXPERT_BLOCK_MIN_SIZE) == "expert-block"
    assert resolve_preconditioner("kronecker", 8, 128) == "kronecker"
    assert choose_solver("pcg", "auto", 8, 128, 0) == ("pcg", "jacobi")
    assert choose_solver("pcg", "auto", 8, 128, 0, expert_block_min_size=1024) == ("pcg", "expert-block")
    assert choose_solver("cg", "auto", 64, 2048, 0) == ("cg", "none")


def test_the_solves_report_names_the_preconditioner_used():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(64, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    ws = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    init = (ws[0] + ws[1]) / 2
    small = solve_router(xs, ws, init, solver="pcg", preconditioner="auto", tol=1e-10)
    big = solve_router(xs, ws, init, solver="pcg", preconditioner="auto", tol=1e-10, expert_block_min_size=24)
    assert (small.preconditioner, big.preconditioner) == ("jacobi", "expert-block")
    assert torch.allclose(small.weight, big.weight, rtol=1e-6, atol=1e-8)


def test_from_config_takes_the_section_and_the_stage_fields():
    h = HarcSection(alpha=0.5, preconditioner="jacobi", dtype="float32", objective="kl", tol=1e-8)
    s = SolverSettings.from_config(h, inner_dtype="bfloat16", link="softmax", chunk_tokens=64)
    assert (s.alpha, s.preconditioner, s.objective, s.tol) == (0.5, "jacobi", "kl", 1e-8)
    assert s.compute_dtype is torch.float32 and s.inner_dtype is torch.bfloat16 and s.chunk_tokens == 64
    assert s.replace(alpha=0.9).alpha == 0.9 and s.alpha == 0.5


@pytest.mark.parametrize("fields,match", [
    (dict(alpha=1.5), r"solver settings: alpha must be in \(0, 1\]"),
    (dict(solver="lu"), "solver must be one of"),
    (dict(link="sigmoid", objective="kl"), "not implemented for sigmoid"),
    (dict(inner_dtype=torch.int8), "inner_dtype"),
    (dict(inner_tol=2.0), "inner_tol"),
])
def test_invalid_settings_are_refused_where_they_are_built(fields, match):
    with pytest.raises(UsageError, match=match):
        SolverSettings(**fields)


def test_settings_object_and_keyword_fields_give_the_same_solve():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    ws = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    init = (ws[0] + ws[1]) / 2
    a = solve_router(xs, ws, init, SolverSettings(solver="direct", alpha=0.8))
    b = solve_router(xs, ws, init, solver="direct", alpha=0.8)
    assert torch.equal(a.weight, b.weight) and a.solver == "direct"
    with pytest.raises(UsageError, match="kronecker"):
        fit_router_to_targets(xs, [torch.tensor([1.0, 0, 0])] * 2, init, preconditioner="kronecker")
