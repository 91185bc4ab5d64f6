"""``demo:<name>`` placeholders in a config, replaced by paths into a demo build."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from harc_hpc.config import ConfigError, PipelineConfig
from harc_hpc.demo.build import DemoRecipe, ensure_demo

PLACEHOLDER = "demo:"


def _placeholder_name(value) -> Optional[str]:
    """``math`` for ``demo:math``; also for a placeholder that config loading made absolute
    (``/configs/demo:math-calib.jsonl``), since relative file paths are resolved against the YAML."""
    text = str(value)
    if text.startswith(PLACEHOLDER):
        return text[len(PLACEHOLDER):]
    name = Path(text).name
    if name.startswith(PLACEHOLDER):
        return name[len(PLACEHOLDER):]
    return None


def recipe_for_config(cfg: PipelineConfig):
    if cfg.demo.kind == "dense":  # the MergeME demo's dense base and experts
        from harc_hpc.demo.dense import DenseDemoRecipe

        return DenseDemoRecipe(seed=cfg.demo.seed)
    return DemoRecipe(seed=cfg.demo.seed)


def resolve_placeholders(cfg: PipelineConfig, root: Path) -> PipelineConfig:
    """A copy of ``cfg`` with every ``demo:`` model and data reference pointing into ``root``."""
    root = Path(root)
    out = cfg.model_copy(deep=True)
    models = sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())
    data = sorted(p.name for p in (root / "data").glob("*.jsonl"))

    def model_path(value: str, where: str) -> str:
        name = _placeholder_name(value)
        if name is None:
            return value
        if name not in models:
            raise ConfigError(f"{where}: unknown demo model {value!r} (demo models: {', '.join(models)})")
        return str(root / name)

    def data_path(value: Path, where: str) -> Path:
        name = _placeholder_name(value)
        if name is None:
            return value
        if name not in data:
            raise ConfigError(f"{where}: unknown demo data file {PLACEHOLDER}{name} "
                              f"(demo data: {', '.join(PLACEHOLDER + d for d in data)})")
        return root / "data" / name

    if out.models.base is not None:
        out.models.base = model_path(out.models.base, "models.base")
    for i, src in enumerate(out.models.sources):
        src.path = model_path(src.path, f"models.sources[{i}].path")
        for kind in ("calibration", "heldout"):
            section = getattr(src, kind)
            if section is not None:
                section.files = [data_path(f, f"models.sources[{i}].{kind}.files[{j}]")
                                 for j, f in enumerate(section.files)]
    return out


def prepare_config(cfg: PipelineConfig, recipe: Optional[DemoRecipe] = None,
                   progress: Optional[Callable[[str], None]] = None) -> PipelineConfig:
    """Build or reuse the demo sources when ``demo.enabled`` and fill in the placeholders.

    A config without ``demo.enabled`` is returned unchanged (the same object).
    """
    if not cfg.demo.enabled:
        return cfg
    root = ensure_demo(recipe or recipe_for_config(cfg), cache_dir=cfg.demo.cache_dir, progress=progress)
    return resolve_placeholders(cfg, root)


def has_placeholders(cfg: PipelineConfig) -> bool:
    """Whether any model or data reference of ``cfg`` is still a ``demo:`` placeholder."""
    refs: list = [cfg.models.base] if cfg.models.base else []
    for src in cfg.models.sources:
        refs.append(src.path)
        for section in (src.calibration, src.heldout):
            if section is not None:
                refs.extend(section.files)
    return any(_placeholder_name(r) is not None for r in refs)
