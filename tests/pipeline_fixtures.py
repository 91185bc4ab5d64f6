"""Tiny MoE sources, calibration data and configs for pipeline tests (importable by SLURM jobs too)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch
import yaml


def char_tokenizer():
    """A byte-level (ASCII) tokenizer that AutoTokenizer can load offline after save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=chr(0)))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=chr(0))


# model type -> builder(layers, hidden, experts, top_k, common) of a tiny config: where the coverage
# tests register the model types they add (tests/test_model_coverage*.py)
EXTRA_TINY_CONFIGS: dict = {}


def tiny_config(family: str = "olmoe", layers: int = 3, hidden: int = 32, experts: int = 4, top_k: int = 2):
    common = dict(vocab_size=128, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=None, bos_token_id=None,
                  eos_token_id=None, max_position_embeddings=256)
    if family in EXTRA_TINY_CONFIGS:
        return EXTRA_TINY_CONFIGS[family](layers=layers, hidden=hidden, experts=experts, top_k=top_k, common=common)
    if family == "olmoe":
        from transformers import OlmoeConfig

        return OlmoeConfig(num_experts=experts, num_experts_per_tok=top_k, **common)
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=hidden,
                              head_dim=hidden // 4, mlp_only_layers=[1] if layers > 2 else [], **common)
    if family == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(num_local_experts=experts, num_experts_per_tok=top_k, **common)
    if family == "qwen2_moe":
        from transformers import Qwen2MoeConfig

        return Qwen2MoeConfig(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=hidden,
                              shared_expert_intermediate_size=hidden, **common)
    if family == "deepseek_v3":
        from transformers import DeepseekV3Config

        # 8 experts in 2 groups (the grouped, biased selection), MLA attention, a dense first layer
        common = {**common, "num_key_value_heads": 4}
        return DeepseekV3Config(n_routed_experts=max(experts, 8), num_experts_per_tok=top_k, n_group=2, topk_group=1,
                                n_shared_experts=1, first_k_dense_replace=1 if layers > 2 else 0,
                                moe_intermediate_size=hidden, q_lora_rank=None, kv_lora_rank=16,
                                qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **common)
    if family == "glm4_moe":
        from transformers import Glm4MoeConfig

        return Glm4MoeConfig(n_routed_experts=max(experts, 8), num_experts_per_tok=top_k, n_group=2, topk_group=1,
                             n_shared_experts=1, first_k_dense_replace=1 if layers > 2 else 0,
                             moe_intermediate_size=hidden, head_dim=hidden // 4, **common)
    if family == "gpt_oss":
        from transformers import GptOssConfig

        return GptOssConfig(num_local_experts=experts, num_experts_per_tok=top_k, head_dim=hidden // 4,
                            layer_types=(["sliding_attention", "full_attention"] * layers)[:layers],
                            sliding_window=16, **common)
    if family == "llama4_text":
        from transformers import Llama4TextConfig

        return Llama4TextConfig(num_local_experts=experts, num_experts_per_tok=1,
                                intermediate_size_mlp=hidden, head_dim=hidden // 4, interleave_moe_layer_step=1,
                                attention_chunk_size=16, **common)
    if family == "qwen3_next":
        from transformers import Qwen3NextConfig

        # linear attention and full attention alternating (layer_types), a shared expert with its gate
        return Qwen3NextConfig(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=hidden,
                               shared_expert_intermediate_size=hidden, head_dim=hidden // 4, full_attention_interval=2,
                               linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
                               linear_value_head_dim=8, **common)
    raise ValueError(family)


def _texts(task: str, n: int, seed: int) -> list[str]:
    rng = random.Random(f"{task}-{seed}")
    out = []
    for _ in range(n):
        if task == "math":
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            out.append(f"{a}+{b}={a + b}. {a}*{b}={a * b}. Solve x+{a}={a + b}: x={b}.")
        else:
            v = rng.choice("xyzabc")
            out.append(f"def f({v}):\n    for i in range({rng.randint(2, 9)}):\n        {v} = {v} * i\n    return {v}\n")
    return out


def build_tiny_sources(root: Path, family: str = "olmoe", seed: int = 0, layers: int = 3,
                       router_noise: float = 1.0, tasks=("math", "code")) -> dict:
    """A base model and one fine-tune-like source per task (base + noise, routers moved a lot)."""
    from transformers import AutoModelForCausalLM

    root = Path(root)
    tok = char_tokenizer()
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(tiny_config(family, layers=layers))
    paths = {"base": root / "base", "data": root / "data"}
    base.save_pretrained(paths["base"])
    tok.save_pretrained(paths["base"])
    for t_i, task in enumerate(tasks):
        g = torch.Generator().manual_seed(seed * 100 + t_i + 1)
        src = AutoModelForCausalLM.from_config(tiny_config(family, layers=layers))
        src.load_state_dict(base.state_dict())
        with torch.no_grad():
            for name, p in src.named_parameters():
                is_router = name.endswith(("gate.weight", "router.weight")) and p.dim() == 2 and p.shape[0] < 16
                scale = router_noise if is_router else 0.02
                p.add_(scale * torch.randn(p.shape, generator=g) * (p.std() if p.numel() > 1 else 1.0))
        paths[task] = root / task
        src.save_pretrained(paths[task])
        tok.save_pretrained(paths[task])
        data = root / "data"
        data.mkdir(parents=True, exist_ok=True)
        for split, n, s in (("calib", 12, seed), ("heldout", 6, seed + 1000)):
            with open(data / f"{task}-{split}.jsonl", "w") as fh:
                for text in _texts(task, n, s):
                    fh.write(json.dumps({"text": text}) + "\n")
    return paths


def write_config(root: Path, sources: dict, *, name="run", method="linear", block_size=1, executor="local",
                 tasks=("math", "code"), harc=None, extra=None) -> Path:
    root = Path(root)
    cfg = {
        "run": {"name": name, "output_dir": str(root / "runs"), "seed": 0},
        "models": {
            "base": str(sources["base"]),
            "sources": [
                {"name": t, "path": str(sources[t]),
                 "calibration": {"files": [str(Path(sources["data"]) / f"{t}-calib.jsonl")]},
                 "heldout": {"files": [str(Path(sources["data"]) / f"{t}-heldout.jsonl")]}}
                for t in tasks
            ],
        },
        "merge": {"method": method},
        "calibration": {"max_length": 64, "batch_size": 4, "chunk_tokens": 128},
        "harc": {"block_size": block_size, "solver": "pcg", "tol": 1e-8, **(harc or {})},
        "executor": {"kind": executor},
        "report": {"enabled": False},
    }
    for dotted, value in (extra or {}).items():
        node = cfg
        *head, last = dotted.split(".")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_pipeline(cfg, run_dir):
    """Every stage body in dependency order, in-process: the merge statistics of a data-driven method,
    merge, then per block capture, statistics and solves, then assembly (what the launcher runs,
    without its machinery)."""
    from harc_hpc.stages import assemble_model, capture_activations, compute_statistics, layout, merge_experts
    from harc_hpc.stages import merge_statistics
    from harc_hpc.stages import solve_router as solve_router_stage

    if merge_statistics.needed(cfg):
        merge_statistics.run(cfg, run_dir)
    merge_experts.run(cfg, run_dir)
    for b, blk in enumerate(layout.blocks(cfg)):
        capture_activations.run(cfg, run_dir, block=b)
        for l in blk:
            for t in cfg.task_names:
                compute_statistics.run(cfg, run_dir, layer=l, task=t)
            solve_router_stage.run(cfg, run_dir, layer=l)
    assemble_model.run(cfg, run_dir)


def final_bytes(run_dir: Path) -> dict:
    """sha256 of every safetensors file of a run's final model and routers (byte-identity checks)."""
    return {p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for sub in ("model", "routers") for p in sorted((Path(run_dir) / sub).glob("*.safetensors"))}


def submit_debug(config: Path, lines=None):
    """Submit a config in this process (debug executor); its output lines go to ``lines``."""
    from harc_hpc.config import load_config
    from harc_hpc.pipeline.api import submit_run

    plan, outcome = submit_run(load_config(config), executor="debug", echo=(lines if lines is not None else []).append)
    assert outcome.ok, (outcome.failed, outcome.skipped)
    return plan
