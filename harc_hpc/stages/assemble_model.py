"""assemble-model: the merged checkpoint with every calibrated router written into it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from harc_hpc.io.atomic import write_json_atomic
from harc_hpc.config import PipelineConfig
from harc_hpc.stages import layout
from harc_hpc.stages.routers import load_router, load_router_bias, load_shared_expert_gate


def run(cfg: PipelineConfig, run_dir: Path) -> dict:
    from harc_hpc.io.checkpoint import Checkpoint
    from harc_hpc.io.checkpoint_writer import patch_tensors

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    fam = layout.family(cfg)
    merged = Checkpoint(layout.merged_dir(run_dir))
    layers = layout.moe_layers(cfg)
    replacements = {}
    reports = []
    for l in layers:
        key = fam.find_router_disk_key(l, merged.keys())
        replacements[key] = load_router(run_dir, l).to(merged.tensor_dtype(key))
        bias_key = fam.router_intercept_key(l)
        if bias_key is not None:  # a router with a bias (GPT-OSS): fitted with its weight
            replacements[bias_key] = load_router_bias(run_dir, l).to(merged.tensor_dtype(bias_key))
        gate = load_shared_expert_gate(run_dir, l)  # present when harc.shared_expert_gate calibrated it
        if gate is not None:
            gkey = fam.shared_expert_gate_key(l)
            replacements[gkey] = gate.to(merged.tensor_dtype(gkey))
        rep = layout.router_report(run_dir, l)
        reports.append(json.loads(rep.read_text()) if rep.is_file() else {"layer": l})
    patch_tensors(layout.merged_dir(run_dir), layout.model_dir(run_dir), replacements,
                  max_shard_size=cfg.merge.max_shard_size)
    summary = {
        "run": cfg.run.name,
        "layers": layers,
        "block_size": cfg.harc.block_size,
        "harc": cfg.harc.model_dump(mode="json"),
        "solves": reports,
    }
    write_json_atomic(run_dir / "summary.json", summary)
    return {"layers": len(layers), "seconds": round(time.perf_counter() - t0, 3)}
