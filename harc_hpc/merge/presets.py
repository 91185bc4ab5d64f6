"""Named parameter sets. ``*-paper`` are the HARC paper's Table 2 baseline settings (weights are
in the order of ``models.sources``); explicit ``merge.parameters`` override a preset's values."""

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
    "wudi-paper": {
        "method": "wudi",
        "parameters": {"lr": 1e-5, "steps": 300},
        "about": "WUDI, Adam lr 1e-5, 300 steps (HARC Table 2)",
    },
}
