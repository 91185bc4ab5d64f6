"""The MergeME build inside the HARC pipeline (a config with a ``mergeme:`` section).

merge-experts builds the MoE with build-moe from ``models.base`` and the dense ``models.sources``
(source i is expert i, in order; the base is the last expert with ``include_base_expert``), every
non-FFN tensor merged by the config's ``merge`` settings. capture-activations, compute-statistics
and assemble-model then run unchanged on that MoE, and solve-router fits each layer's router to
the sources' domains (harc_hpc.math.targets): the tokens of source i's calibration data get the
target q_i = (1 - smoothing) onehot(i) + smoothing / K.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from harc_hpc.config import PipelineConfig
from harc_hpc.mergeme.spec import MoEBuildSpec, parse_spec


def is_mergeme(cfg: PipelineConfig) -> bool:
    return cfg.mergeme is not None


def source_prompts(cfg: PipelineConfig, task: str) -> list[str]:
    """mergeme.prompts[task], else the first mergeme.prompt_samples text records of its calibration data."""
    from harc_hpc.io.calibration_data import read_samples

    m = cfg.mergeme
    if m.prompts.get(task):
        return list(m.prompts[task])
    texts = [s["text"] if "text" in s else "\n".join(t["content"] for t in s["messages"])
             for s in read_samples(cfg.calibration_for(task))]
    return texts[: m.prompt_samples]


def build_spec(cfg: PipelineConfig, output: Path, router_init: Optional[str] = None) -> MoEBuildSpec:
    """The build-moe spec of a ``mergeme`` config (``router_init``: another rule than the config's)."""
    m = cfg.mergeme
    rule = router_init or m.router_init
    data_rule = rule in ("hidden_state", "task_vector")
    mm = cfg.merge
    merge = {"method": mm.method, "parameters": dict(mm.parameters), "dtype": mm.dtype, "out_dtype": mm.out_dtype}
    if mm.preset is not None:
        merge["preset"] = mm.preset
        if "method" not in mm.model_fields_set:
            merge.pop("method")
    return parse_spec({
        "base": cfg.models.base,
        "experts": [{"name": s.name, "path": s.path,
                     "prompts": source_prompts(cfg, s.name) if data_rule else []} for s in cfg.models.sources],
        "output": str(output),
        "top_k": m.top_k,
        "include_base_expert": m.include_base_expert,
        "shared_expert": m.shared_expert,
        "merge": merge,
        "router": {"init": rule},
        "seed": cfg.run.seed,
        "max_shard_size": mm.max_shard_size,
        "overwrite": True,
        "allow_pickle": cfg.models.allow_pickle,
        "revision": cfg.models.revision,
    }, where="the mergeme section (with models and merge)")


_CONFIGS: dict[str, dict] = {}


def moe_config(cfg: PipelineConfig) -> dict:
    """config.json of the MoE the config builds, from the inputs alone (planning needs the layers
    before merge-experts has run); every input is checked on the way (build-moe's plan)."""
    from harc_hpc.mergeme.build import plan_build

    spec = build_spec(cfg, Path(cfg.run_dir) / "merged")
    key = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    if key not in _CONFIGS:
        plan = plan_build(spec)
        for i in plan.inputs:
            i.ckpt.close()
        _CONFIGS[key] = plan.config.to_dict()
    return _CONFIGS[key]


def expert_of_task(cfg: PipelineConfig) -> dict[str, int]:
    """Source (task) name -> its expert's index in the built MoE."""
    return {s.name: i for i, s in enumerate(cfg.models.sources)}


def build_merged(cfg: PipelineConfig, out_dir: Path) -> dict:
    """merge-experts for a ``mergeme`` config: build-moe into ``out_dir`` (atomically)."""
    from harc_hpc.mergeme.build import build_moe

    summary = build_moe(build_spec(cfg, out_dir))
    return {"method": summary["method"], "output": summary["output"], "tensors": summary["tensors"],
            "experts": summary["experts"], "router_init": summary["router_init"], "seconds": summary["seconds"]}
