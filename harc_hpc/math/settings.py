"""SolverSettings: how a router is fitted, one object for solve_router, fit_router_to_targets and the
data-parallel solve (the same settings with a ``process_group``).

The defaults of the settings a config can set (alpha, hessian, solver, preconditioner,
expert_block_tokens, objective, tol, max_iter) are the config's ``harc`` section's
(harc_hpc.config.HarcSection), read from it: a library call and a pipeline run start from the same
values. The others are the library's own and defined here only. A pipeline stage builds its
settings with ``SolverSettings.from_config(cfg.harc, ...)``.

Invalid values and combinations are refused when the settings are built, as a ``UsageError``
("solver settings: <what>"), the way the config refuses its own.

Settings and what they switch:

* ``alpha``: Sigma_reg,i = alpha Sigma_i + (1 - alpha) diag(Sigma_i), in (0, 1].
* ``hessian``: ``full`` (the exact softmax Hessian), ``diag`` or ``identity`` (harc_hpc.math.operator).
* ``solver``: ``cg``, ``pcg``, ``direct`` (dense, up to DIRECT_MAX_BYTES) or ``auto`` (``direct`` up to
  ``direct_max_size`` unknowns K d, else ``pcg``).
* ``preconditioner`` (``pcg`` only): ``expert-block`` (``expert_block_tokens`` of each task's heaviest
  tokens per expert form its block), ``jacobi``, ``kronecker`` (E[x x^T] estimated from at most
  ``kronecker_tokens`` tokens per task; None: all), ``none`` or ``auto`` (``expert-block`` for routers of
  at least ``expert_block_min_size`` unknowns K d, ``jacobi`` below; resolve_preconditioner).
* ``objective``: ``quadratic`` (HARC's system) or ``kl`` (Levenberg-Marquardt Newton steps on the exact
  KL from there, at most ``kl_max_steps``, to a relative gradient of ``kl_tol``; None: ``tol``).
* ``tol``, ``max_iter``: the CG stopping rule (relative residual) and its iteration cap.
* ``inner_dtype`` (torch.bfloat16 / torch.float16 / torch.float32): mixed-precision iterative
  refinement, corrections by PCG with 16-bit GEMMs to ``inner_tol``, residuals with the exact
  operator; plain PCG finishes where refinement stalls. None: no refinement.
* ``link``: ``softmax`` (a router) or ``sigmoid`` (independent sigmoid gates, Bernoulli KL; the exact
  KL objective is not offered for them).
* ``intercept``: the routers carry a bias in their last column, (K, d + 1) = [W | b], and the inputs
  get a column of ones.
* How the inputs are held (harc_hpc.math.inputs.TokenChunks): GEMMs in ``compute_dtype`` (None: the
  inputs' dtype, float32 for half types), ``chunk_tokens`` rows per pass step, up to ``cache_bytes``
  kept resident; ``keep_input_dtype`` keeps narrower inputs in their own dtype, widened one chunk at
  a time (the same answer bit for bit).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch

from harc_hpc.config import HarcSection
from harc_hpc.dtypes import torch_dtype
from harc_hpc.errors import UsageError
from harc_hpc.math.cg import PRECONDITIONERS
from harc_hpc.math.inputs import DEFAULT_CHUNK_TOKENS
from harc_hpc.math.operator import HESSIANS, LINKS

SOLVERS = ("cg", "pcg", "direct", "auto")
PRECONDITIONER_CHOICES = PRECONDITIONERS + ("auto",)
# preconditioner="auto": expert-block from this many unknowns K d up, jacobi below. Measured with
# benchmarks/bench_solver.py (2 CPU cores): on the demo's trained layer (K d = 8 x 128 = 1024) Jacobi
# PCG is faster (per-call overheads of the batched block solves dominate tiny blocks), on the
# OLMoE-shaped layer (K d = 64 x 2048 = 131072) expert-block is (3.5x fewer iterations, ~0.05-0.45 of a
# matvec per application). The threshold lies between the two measured sizes; sizes in between were
# not measured.
EXPERT_BLOCK_MIN_SIZE = 16384
OBJECTIVES = ("quadratic", "kl")
INNER_DTYPES = (None, torch.bfloat16, torch.float16, torch.float32)


def _config_default(name: str):
    """The default of ``harc.<name>``: the one place the shared defaults are written."""
    return HarcSection.model_fields[name].default


DtypeLike = Optional[Union[str, torch.dtype]]


@dataclass(frozen=True)
class SolverSettings:
    """How one router is fitted (module docstring). Frozen: ``replace(**fields)`` gives a changed copy."""

    # what a config's harc section sets too (its defaults)
    alpha: float = _config_default("alpha")
    hessian: str = _config_default("hessian")
    solver: str = _config_default("solver")
    preconditioner: str = _config_default("preconditioner")
    expert_block_tokens: int = _config_default("expert_block_tokens")
    objective: str = _config_default("objective")
    tol: float = _config_default("tol")
    max_iter: int = _config_default("max_iter")
    # the library's own
    kronecker_tokens: Optional[int] = 8192
    expert_block_min_size: int = EXPERT_BLOCK_MIN_SIZE
    direct_max_size: int = 4096
    kl_max_steps: int = 30
    kl_tol: Optional[float] = None
    inner_dtype: DtypeLike = None
    inner_tol: float = 1e-2
    link: str = "softmax"
    intercept: bool = False
    # how the inputs are held
    compute_dtype: DtypeLike = None
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    cache_bytes: int = 4 << 30
    keep_input_dtype: bool = False

    def __post_init__(self):
        # dtype names as configs write them ("bfloat16") become torch dtypes
        for name in ("inner_dtype", "compute_dtype"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, torch_dtype(value, error=_settings_error))
        object.__setattr__(self, "alpha", float(self.alpha))
        problems = self.problems()
        if problems:
            raise _settings_error("; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with these settings, one line each (empty: nothing)."""
        out = []
        if not 0.0 < self.alpha <= 1.0:
            out.append(f"alpha must be in (0, 1], got {self.alpha}")
        for name, allowed in (("hessian", HESSIANS), ("solver", SOLVERS), ("objective", OBJECTIVES),
                              ("preconditioner", PRECONDITIONER_CHOICES), ("link", LINKS)):
            if getattr(self, name) not in allowed:
                out.append(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.link == "sigmoid" and self.objective == "kl":
            out.append("objective='kl' is not implemented for sigmoid gates (link='sigmoid'): use 'quadratic'")
        if self.inner_dtype not in INNER_DTYPES:
            out.append(f"inner_dtype must be None, torch.bfloat16, torch.float16 or torch.float32, "
                       f"got {self.inner_dtype}")
        if not 0.0 < self.inner_tol < 1.0:
            out.append(f"inner_tol must be in (0, 1), got {self.inner_tol}")
        return out

    def replace(self, **fields) -> "SolverSettings":
        """A copy with ``fields`` changed (checked again)."""
        return dataclasses.replace(self, **fields) if fields else self

    @classmethod
    def from_config(cls, harc: HarcSection, **fields) -> "SolverSettings":
        """The settings of a config's ``harc`` section (its ``dtype`` as the compute dtype), with
        ``fields`` (what the stage decides: inner_dtype for the device, link, residency) on top.
        ``harc.inner_dtype`` is not taken: ``auto`` depends on the device, the stage resolves it."""
        shared = {f.name: getattr(harc, f.name) for f in dataclasses.fields(cls) if f.name in HarcSection.model_fields
                  and f.name != "inner_dtype"}
        return cls(**{**shared, "compute_dtype": harc.dtype, **fields})

    @property
    def kl_gradient_tol(self) -> float:
        """The relative gradient at which the exact-KL steps stop."""
        return self.tol if self.kl_tol is None else self.kl_tol


def resolve_preconditioner(preconditioner: str, k: int, d: int, min_size: int = EXPERT_BLOCK_MIN_SIZE) -> str:
    """The preconditioner used for a (k, d) router: ``auto`` is ``expert-block`` from ``min_size``
    unknowns k d up and ``jacobi`` below (EXPERT_BLOCK_MIN_SIZE); any other value is itself."""
    if preconditioner != "auto":
        return preconditioner
    return "expert-block" if k * d >= min_size else "jacobi"


def _settings_error(what: str) -> UsageError:
    return UsageError(what, where="solver settings")


def settings_of(settings: Optional[SolverSettings], fields: dict) -> SolverSettings:
    """``settings`` (default: SolverSettings()) with keyword ``fields`` on top: what solve_router and
    fit_router_to_targets accept."""
    if settings is not None and not isinstance(settings, SolverSettings):
        raise TypeError(f"settings must be a SolverSettings, got {type(settings).__name__}")
    return (settings or SolverSettings()).replace(**fields)
