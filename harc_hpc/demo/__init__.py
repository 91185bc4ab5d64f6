"""Tiny specialised MoE sources made by harc-hpc itself, so the whole method runs without downloads.

A config with ``demo.enabled: true`` names models and data with ``demo:`` placeholders
(``path: demo:math``, ``files: [demo:math-calib.jsonl]``); ``prepare_config`` builds the sources
once per recipe (cached) and puts the real paths in.
"""

from __future__ import annotations

from harc_hpc.demo.build import QUICK_RECIPE, DemoRecipe, cache_root, demo_dir, ensure_demo
from harc_hpc.demo.placeholders import (PLACEHOLDER, has_placeholders, prepare_config, recipe_for_config,
                                        resolve_placeholders)

__all__ = ["DemoRecipe", "QUICK_RECIPE", "PLACEHOLDER", "cache_root", "demo_dir", "ensure_demo",
           "has_placeholders", "prepare_config", "recipe_for_config", "resolve_placeholders"]
