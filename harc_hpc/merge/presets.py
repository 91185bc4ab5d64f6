"""Named parameter sets. ``*-paper`` are the HARC paper's Table 2 baseline settings (weights are
in the order of ``models.sources``); ``mergeme-*`` are MergeME's (§3.1.2 and App. A: lambda 1/3,
retain ratio p = 80 %, merged task vectors summed, not averaged). Explicit ``merge.parameters``
override a preset's values."""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "ties-paper": {
        "method": "ties",
        "parameters": {"density": 0.6, "weights": [0.4, 0.6], "normalize": True},
        "about": "TIES, density 0.6, weights 0.4/0.6 (HARC Table 2)",
    },
    # HARC's mergekit config for "DARE" runs merge_method dare_ties with normalize: true.
    "dare-paper": {
        "method": "dare_ties",
        "parameters": {"density": 0.4, "weights": [0.3, 0.7], "normalize": True},
        "about": "DARE (dare_ties), density 0.4, weights 0.3/0.7 (HARC Table 2)",
    },
    "dare-linear-paper": {
        "method": "dare_linear",
        "parameters": {"density": 0.4, "weights": [0.3, 0.7]},
        "about": "DARE + task arithmetic, density 0.4, weights 0.3/0.7",
    },
    # MergeME's TIES: trim to the top 80 %, elect signs, *sum* the agreeing task vectors, x 1/3
    "mergeme-ties": {
        "method": "ties",
        "parameters": {"density": 0.8, "lambda": 1 / 3, "normalize": False},
        "about": "TIES, density 0.8, summed, lambda 1/3 (MergeME)",
    },
    # MergeME's DARE as its text defines it: random drop, rescale by 1/p, sum, x 1/3 (no sign
    # election, i.e. dare_linear); mergeme-dare-ties adds TIES' sign election to the same settings
    "mergeme-dare": {
        "method": "dare_linear",
        "parameters": {"density": 0.8, "lambda": 1 / 3, "rescale": "inverse_density"},
        "about": "DARE, density 0.8, rescale 1/p, summed, lambda 1/3 (MergeME)",
    },
    "mergeme-dare-ties": {
        "method": "dare_ties",
        "parameters": {"density": 0.8, "lambda": 1 / 3, "rescale": "inverse_density",
                       "normalize": False},
        "about": "DARE + TIES sign election, density 0.8, rescale 1/p, summed, lambda 1/3",
    },
    "wudi-paper": {
        "method": "wudi",
        "parameters": {"lr": 1e-5, "steps": 300},
        "about": "WUDI, Adam lr 1e-5, 300 steps (HARC Table 2)",
    },
}
