"""The MergeME demo's dense models: a tiny Llama-style base and one continued-pretrained expert per
domain (math-like, code-like, text-like), trained by harc-hpc on the CPU and cached like the MoE
demo (harc_hpc.demo: same corpus, training loop, cache and ``demo:`` placeholders).

Layout of a build, ``<cache>/demo/<digest>/``: ``base/``, ``math/``, ``code/``, ``text/`` (HF Llama
directories with the byte tokenizer), ``data/<domain>-{calib,heldout}.jsonl``, ``recipe.json`` and
``build.json`` (timings, training losses, held-out CE of every model on every domain).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

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
        d = dataclasses.asdict(self)
        d["kind"] = "dense"
        d["domains"] = list(self.domains)
        d["pretrain_mix"] = {k: v for k, v in self.pretrain_mix}
        return d

    def digest(self) -> str:
        import transformers

        payload = {"recipe": self.to_json(), "format": DENSE_DEMO_FORMAT,
                   "torch": torch.__version__, "transformers": transformers.__version__}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

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
    from transformers.utils import logging as hf_logging

    from harc_hpc.demo import corpus, training
    from harc_hpc.demo.build import _save, _write_jsonl
    from harc_hpc.demo.tokenizer import byte_tokenizer

    say = progress or (lambda msg: log.info("%s", msg))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    t_start = time.perf_counter()
    info: dict = {"threads": recipe.threads, "host": platform.node(), "cpu_count": os.cpu_count()}
    try:
        tok = byte_tokenizer()
        s, L, B = recipe.seed, recipe.seq_len, recipe.batch_size
        data = out / "data"
        data.mkdir(parents=True)
        heldout = {}
        for d in recipe.domains:
            _write_jsonl(data / f"{d}-calib.jsonl", corpus.packed_windows(d, recipe.calib_samples, L, f"{s}/calib/{d}"))
            heldout[d] = corpus.packed_windows(d, recipe.heldout_samples, L, f"{s}/heldout/{d}")
            _write_jsonl(data / f"{d}-heldout.jsonl", heldout[d])
        pre = corpus.mixed_windows(dict(recipe.pretrain_mix), recipe.pretrain_steps * B, L, f"{s}/pretrain")
        base = new_dense_model(recipe, seed=s)
        say(f"mergeme demo: pretraining a dense Llama of {sum(p.numel() for p in base.parameters()) / 1e6:.2f} M "
            f"parameters, {recipe.pretrain_steps} steps x {B} x {L} tokens")
        info["pretrain"] = dataclasses.asdict(training.train(
            base, training.windows_to_batches(pre, B), recipe.pretrain_lr, 1.0, recipe.warmup_frac,
            progress=say, label="pretrain"))
        _save(base, tok, out / "base")
        base_state = {k: v.clone() for k, v in base.state_dict().items()}
        info["heldout_ce"] = {"base": {d: round(training.mean_ce(base, heldout[d]), 4) for d in recipe.domains}}
        del base
        info["finetune"] = {}
        for d in recipe.domains:
            model = new_dense_model(recipe, seed=s)
            model.load_state_dict(base_state)
            windows = corpus.packed_windows(d, recipe.finetune_steps * B, L, f"{s}/finetune/{d}")
            info["finetune"][d] = dataclasses.asdict(training.train(
                model, training.windows_to_batches(windows, B), recipe.finetune_lr, 1.0, recipe.warmup_frac,
                progress=say, label=f"continued pretraining {d}"))
            _save(model, tok, out / d)
            info["heldout_ce"][d] = {e: round(training.mean_ce(model, heldout[e]), 4) for e in recipe.domains}
            del model
        info["seconds"] = round(time.perf_counter() - t_start, 1)
        (out / "build.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        # Written last: its presence (plus the files it lists) marks a complete build.
        (out / "recipe.json").write_text(json.dumps({"recipe": recipe.to_json(), "digest": recipe.digest(),
                                                     "format": DENSE_DEMO_FORMAT}, indent=2, sort_keys=True) + "\n")
        say(f"mergeme demo: built in {info['seconds']:.0f}s -> {out}")
        return info
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)
        if bars:
            hf_logging.enable_progress_bar()
