"""The MergeME demo's dense models: a tiny Llama-style base and one continued-pretrained expert per
domain (math-like, code-like, text-like), trained by harc-hpc on the CPU and cached like the MoE
demo (harc_hpc.demo: same corpus, training loop, cache and ``demo:`` placeholders).

Layout of a build, ``<cache>/demo/<digest>/``: ``base/``, ``math/``, ``code/``, ``text/`` (HF Llama
directories with the byte tokenizer), ``data/<domain>-{calib,heldout}.jsonl``, ``recipe.json`` and
``build.json`` (timings, training losses, held-out CE of every model on every domain).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

# Bump when a change of this module changes the bytes a recipe produces.
DENSE_DEMO_FORMAT = 1


@dataclass(frozen=True)
class DenseDemoRecipe:
    """Everything that decides the dense demo models (defaults: configs/mergeme-tiny.yaml's)."""

    seed: int = 0
    domains: tuple[str, ...] = ("math", "code", "text")
    # model: Llama, 2 layers, d 64, FFN 256, ~0.14 M parameters
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    # training
    seq_len: int = 128
    batch_size: int = 16
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    pretrain_mix: tuple[tuple[str, float], ...] = (("code", 0.34), ("math", 0.33), ("text", 0.33))
    finetune_steps: int = 200
    finetune_lr: float = 2e-3
    warmup_frac: float = 0.05
    threads: int = 1
    calib_samples: int = 128
    heldout_samples: int = 128

    def to_json(self) -> dict:
        from harc_hpc.demo.build import recipe_json

        return {**recipe_json(self), "kind": "dense"}

    def digest(self) -> str:
        from harc_hpc.demo.build import recipe_digest

        return recipe_digest(self.to_json(), DENSE_DEMO_FORMAT)

    def build_into(self, out: Path, progress: Optional[Callable[[str], None]] = None) -> dict:
        return build_dense_into(Path(out), self, progress)


#: Small enough for unit tests (seconds); its experts are barely specialised.
QUICK_DENSE_RECIPE = DenseDemoRecipe(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seq_len=32,
                                     batch_size=4, pretrain_steps=8, finetune_steps=12, finetune_lr=5e-3,
                                     calib_samples=8, heldout_samples=4)


def llama_config(recipe: DenseDemoRecipe):
    from transformers import LlamaConfig

    from harc_hpc.demo.tokenizer import VOCAB_SIZE

    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads, max_position_embeddings=max(256, recipe.seq_len),
        tie_word_embeddings=False, pad_token_id=None, bos_token_id=None, eos_token_id=None)


def new_dense_model(recipe: DenseDemoRecipe, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(recipe))


def build_dense_into(out: Path, recipe: DenseDemoRecipe, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Train and write the base and one expert per domain into ``out`` (an empty directory).
    Deterministic for a fixed recipe and thread count (harc_hpc.demo.training)."""
    from harc_hpc.demo import training
    from harc_hpc.demo.build import build_sources_into

    def continued_pretraining(model, domain: str, batches: list[torch.Tensor], say: Callable[[str], None]) -> dict:
        return dataclasses.asdict(training.train(model, batches, recipe.finetune_lr, 1.0, recipe.warmup_frac,
                                                 progress=say, label=f"continued pretraining {domain}"))

    return build_sources_into(Path(out), recipe, fmt=DENSE_DEMO_FORMAT, new_model=lambda seed: new_dense_model(recipe, seed),
                              finetune=continued_pretraining, progress=progress, name="mergeme demo",
                              model_desc="a dense Llama of ")
