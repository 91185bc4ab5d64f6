"""Shared pytest fixtures. Each block belongs to one part of the toolkit; keep blocks separate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# =============================================================================================
# Block: devices. Tests run on the CPU, also on a GPU node: a test sees no GPU (harc_hpc.devices
# counts none, so "auto" is the CPU, and the processes it starts inherit CUDA_VISIBLE_DEVICES="")
# unless it is marked ``gpu``; a ``gpu`` test is skipped, with the reason, where there is no GPU.
# =============================================================================================


@pytest.fixture(autouse=True)
def _cpu_unless_marked_gpu(request, monkeypatch):
    if request.node.get_closest_marker("gpu") is not None:
        if not torch.cuda.is_available():
            pytest.skip("marked gpu: this machine has no CUDA device")
        return
    import harc_hpc.devices

    monkeypatch.setattr(harc_hpc.devices, "cuda_device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")

# ============================ end of block: devices ==========================================


# =============================================================================================
# Block: checkpoints / families / merge (harc_hpc.io.checkpoint, harc_hpc.models.families, harc_hpc.merge)
# Tiny random MoE checkpoints written with save_pretrained: a base and two fine-tune-like sources
# (base + small noise) per family. Session-scoped; tests must not modify the directories.
# =============================================================================================

MOE_FAMILIES = ("olmoe", "qwen3_moe", "mixtral", "qwen2_moe")


def tiny_moe_config(family: str, *, vocab: int = 64, hidden: int = 32, layers: int = 2,
                    experts: int = 4, intermediate: int = 16, **overrides):
    """A transformers config of ``family`` small enough for unit tests."""
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
                  max_position_embeddings=64)
    if family == "olmoe":
        from transformers import OlmoeConfig

        cfg = OlmoeConfig(**common, intermediate_size=intermediate, num_experts=experts,
                          pad_token_id=None, bos_token_id=None, eos_token_id=None)
    elif family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        cfg = Qwen3MoeConfig(**common, intermediate_size=2 * intermediate, head_dim=8,
                             moe_intermediate_size=intermediate, num_experts=experts)
    elif family == "mixtral":
        from transformers import MixtralConfig

        cfg = MixtralConfig(**common, intermediate_size=intermediate, num_local_experts=experts)
    elif family == "qwen2_moe":
        from transformers import Qwen2MoeConfig

        cfg = Qwen2MoeConfig(**common, intermediate_size=2 * intermediate,
                             moe_intermediate_size=intermediate,
                             shared_expert_intermediate_size=intermediate, num_experts=experts)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def save_tiny_moe(path: Path, config, seed: int, base_state: dict | None = None,
                  noise: float = 0.02) -> dict:
    """Write a model (random, or ``base_state`` + noise) with save_pretrained; returns its state."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if base_state is not None:
        model.load_state_dict(base_state)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    model.save_pretrained(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def moe_models(tmp_path_factory):
    """``moe_models(family)`` -> {"base": dir, "a": dir, "b": dir} (built once per family)."""
    cache: dict[str, dict[str, Path]] = {}

    def build(family: str) -> dict[str, Path]:
        if family not in cache:
            root = tmp_path_factory.mktemp(f"moe-{family}")
            cfg = tiny_moe_config(family)
            state = save_tiny_moe(root / "base", cfg, seed=0)
            save_tiny_moe(root / "a", cfg, seed=1, base_state=state)
            save_tiny_moe(root / "b", cfg, seed=2, base_state=state)
            cache[family] = {"base": root / "base", "a": root / "a", "b": root / "b"}
        return cache[family]

    return build


def write_merge_config(path: Path, models: dict, run_dir: Path, merge: dict, seed: int = 0,
                       base: bool = True) -> Path:
    """A pipeline YAML with the two sources ``a``/``b`` of ``models`` and the given merge section."""
    import yaml

    data = {
        "run": {"name": run_dir.name, "output_dir": str(run_dir.parent), "seed": seed},
        "models": {"sources": [{"name": "a", "path": str(models["a"])},
                               {"name": "b", "path": str(models["b"])}]},
        "merge": merge,
    }
    if base:
        data["models"]["base"] = str(models["base"])
    path.write_text(yaml.safe_dump(data))
    return path

# ============================ end of block: checkpoints / families / merge ===================


# =============================================================================================
# Block: launcher (harc_hpc.pipeline, tests/test_planner.py, tests/test_launcher_slurm.py)
# SLURM jobs (and local-executor subprocesses) import the toy stage functions of
# tests/harc_toy_stages.py by name, so tests/ must be on PYTHONPATH in the environment they
# inherit (sbatch's default --export=ALL passes it on); sys.path alone only helps this process.
# =============================================================================================

import os as _launcher_os
import sys as _launcher_sys

LAUNCHER_TESTS_DIR = Path(__file__).resolve().parent
REAL_STAGES_DIR = LAUNCHER_TESTS_DIR.parent / "stages"
# What a toy stage (tests/harc_toy_stages.py) does instead of the real one: its function and the one
# small file it writes. Everything else (split, needs, config keys, file inputs, version) is the real
# spec's, so the launcher tests plan the real DAG with the real digests.
TOY_STAGES = {
    "merge-statistics": ("merge_statistics", ["merge-statistics/stats.json"]),
    "merge-experts": ("merge", ["merged/model.json"]),
    "capture-activations": ("capture", ["activations/block-{block:03d}.json"]),
    "compute-statistics": ("statistics", ["statistics/layer-{layer:03d}/{task}.json"]),
    "solve-router": ("solve", ["routers/layer-{layer:03d}.json"]),
    "assemble-model": ("assemble", ["model/model.json"]),
    "report": ("report", ["report/metrics.json"]),
    "router-distill": ("router_distill", ["router-distill/layer-{layer:03d}.json"]),
    "router-distill-model": ("router_distill_model", ["router-distill/models/summary.json"]),
    "finetune": ("finetune", ["finetune/models/summary.json"]),
}


def _build_toy_stages() -> Path:
    import atexit
    import shutil
    import tempfile

    import yaml

    out = Path(tempfile.mkdtemp(prefix="harc-toy-stages-"))
    atexit.register(shutil.rmtree, out, True)
    for path in sorted(REAL_STAGES_DIR.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        if spec.get("kind") == "pipeline":
            continue  # hooks: a folder without pipeline.yaml uses the installed pipeline's
        function, writes = TOY_STAGES[spec["name"]]  # a new real stage needs a toy here
        spec.update(function=f"harc_toy_stages:{function}", writes=writes, reads=[],
                    resources={"cpus": 1, "mem_gb": 0.25, "gpus": 0, "time_min": 5})
        if ":" not in spec.get("enabled_if", ":"):
            spec.pop("enabled_if")  # toy runs always report; conditions on the method stay
        (out / path.name).write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


TOY_STAGES_DIR = _build_toy_stages()
_launcher_os.environ["PYTHONPATH"] = _launcher_os.pathsep.join(
    [str(LAUNCHER_TESTS_DIR)] + [p for p in _launcher_os.environ.get("PYTHONPATH", "").split(_launcher_os.pathsep)
                                 if p and p != str(LAUNCHER_TESTS_DIR)]
)
if str(LAUNCHER_TESTS_DIR) not in _launcher_sys.path:
    _launcher_sys.path.insert(0, str(LAUNCHER_TESTS_DIR))


def write_toy_config(tmp_path: Path, name: str = "toy", **harc) -> Path:
    """A pipeline config with two tasks (a, b) whose calibration files exist; source paths are
    placeholders (toy stages never open them), local-looking so that submit does not pin them as hub ids."""
    import yaml

    data_dir = tmp_path / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    sources = []
    for task in ("a", "b"):
        f = data_dir / f"{task}.jsonl"
        if not f.exists():
            f.write_text(f'{{"text": "calibration text of {task}"}}\n')
        sources.append({"name": task, "path": f"./toy/source-{task}", "calibration": {"files": [str(f)]}})
    cfg = {
        "run": {"name": name, "output_dir": str(tmp_path / "runs")},
        "models": {"sources": sources},
        "harc": {"block_size": 1, **harc},
        "executor": {"kind": "slurm", "partition": _launcher_os.environ.get("SLURM_LOCAL_PARTITION", "debug")},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def toy_config(tmp_path):
    return lambda name="toy", **harc: write_toy_config(tmp_path, name, **harc)

# ============================ end of block: launcher ==========================================
