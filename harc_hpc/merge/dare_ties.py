"""dare_ties: DARE random drop and rescale (see dare_linear), then TIES sign election by the sum
of the weighted deltas and the agreeing-model merge."""

from __future__ import annotations

from harc_hpc.merge.dare_linear import DareLinearMerge


class DareTiesMerge(DareLinearMerge):
    name = "dare_ties"
    description = "DARE drop + rescale, then TIES sign election"
    consensus = True
