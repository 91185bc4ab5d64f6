"""Build (or reuse) the demo sources: a pretrained tiny OLMoE and one fine-tune per domain.

Layout of a build, ``<cache>/demo/<digest>/``::

    base/  math/  code/          HF model directories (safetensors + config + tokenizer)
    data/<domain>-calib.jsonl    calibration text, ``{"text": ...}`` records of ``seq_len`` chars
    data/<domain>-heldout.jsonl  held-out text for the report (other seeds)
    recipe.json                  the recipe the digest was taken of
    build.json                   what happened: timings, training losses, per-domain CE (not hashed)

The digest covers the recipe, a format version of this code and the torch/transformers versions,
because all of them decide the bytes. A build goes into a temporary sibling directory that is
renamed into place at the end, so a killed build leaves no half cache behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from harc_hpc.io.atomic import atomic_dir, sweep_stale_temporaries
from harc_hpc.demo import corpus, training
from harc_hpc.demo.tokenizer import byte_tokenizer

log = logging.getLogger(__name__)

# Bump when a change of this package changes the bytes a recipe produces.
DEMO_FORMAT = 1
MODEL_DIRS = ("base", "math", "code")


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that decides the demo sources. Defaults: the shipped demo (see README)."""

    seed: int = 0
    domains: tuple[str, ...] = ("math", "code")
    # model: OLMoE, 4 layers x 8 experts, top-2, ~1.9 M parameters
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    expert_intermediate_size: int = 128
    aux_loss_coef: float = 0.01
    # training
    seq_len: int = 128
    batch_size: int = 16
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    pretrain_mix: tuple[tuple[str, float], ...] = (("code", 0.2), ("math", 0.2), ("text", 0.6))
    finetune_steps: int = 250
    finetune_lr: float = 1e-3
    # Fine-tuning moves the routers this many times faster than the rest: the routing breakdown
    # after averaging is only clearly visible when the routers of the sources drift apart.
    router_lr_mult: float = 10.0
    # What a domain fine-tune may change. "own_experts": its own share of the experts (the domains
    # split them in order: math 0..3, code 4..7 of 8) and the routers; attention, norms, embeddings and
    # the other experts stay the base's. Real domain fine-tunes of an MoE concentrate their change in
    # the experts the domain uses; making that exact means a task-arithmetic merge keeps every
    # source's experts unchanged and the routers are what conflicts (the paper's routing breakdown:
    # docs/demo.md has the measured figures). "all": every parameter (the first demo).
    finetune_scope: str = "own_experts"
    warmup_frac: float = 0.05
    threads: int = 1
    # shipped data
    calib_samples: int = 128
    heldout_samples: int = 128

    def to_json(self) -> dict:
        return recipe_json(self)

    def digest(self) -> str:
        return recipe_digest(self.to_json(), DEMO_FORMAT)


def recipe_json(recipe) -> dict:
    """A demo recipe (any kind, a dataclass) as JSON: its fields, tuples as lists and the pretraining
    mix as a mapping."""
    d = dataclasses.asdict(recipe)
    d["domains"] = list(recipe.domains)
    d["pretrain_mix"] = {k: v for k, v in recipe.pretrain_mix}
    return d


def recipe_digest(recipe_json: dict, fmt: int) -> str:
    """The cache key of a demo recipe (any kind): its JSON, the format version of the code that builds
    it and the torch/transformers versions, because all of them decide the bytes."""
    import transformers

    payload = {"recipe": recipe_json, "format": fmt,
               "torch": torch.__version__, "transformers": transformers.__version__}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


#: A recipe small enough for unit tests (seconds); not a useful demo.
QUICK_RECIPE = DemoRecipe(hidden_size=32, num_layers=2, num_heads=2, num_experts=4, expert_intermediate_size=32,
                          seq_len=32, batch_size=4, pretrain_steps=6, finetune_steps=4,
                          calib_samples=8, heldout_samples=4)


def cache_root(cache_dir: Optional[os.PathLike] = None) -> Path:
    """``cache_dir``, else ``$HARC_HPC_CACHE``, else ``~/.cache/harc-hpc``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("HARC_HPC_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "harc-hpc"


def demo_dir(recipe: DemoRecipe, cache_dir: Optional[os.PathLike] = None) -> Path:
    return cache_root(cache_dir) / "demo" / recipe.digest()


def is_complete(root: Path, recipe: DemoRecipe) -> bool:
    try:
        stored = json.loads((root / "recipe.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if stored.get("recipe") != recipe.to_json():
        return False
    needed = [root / d / "model.safetensors" for d in ("base", *recipe.domains)]
    needed += [root / "data" / f"{d}-{s}.jsonl" for d in recipe.domains for s in ("calib", "heldout")]
    return all(p.is_file() for p in needed)


def ensure_demo(recipe: DemoRecipe = DemoRecipe(), cache_dir: Optional[os.PathLike] = None,
                progress: Optional[Callable[[str], None]] = None) -> Path:
    """The build directory of ``recipe``, building it first when the cache has none."""
    final = demo_dir(recipe, cache_dir)
    if is_complete(final, recipe):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    if progress is None:
        # Minutes of silence would look like a hang: say what is happening even without -v.
        sys.stderr.write(f"harc-hpc demo: building the demo sources into {final} "
                         f"(a few minutes on 2 CPU cores; cached for later runs)\n")
    # Temporaries of builds killed on this host (a SIGKILL gives no chance to clean up); builds of
    # live processes and of other hosts are kept.
    sweep_stale_temporaries(final.parent)
    try:
        with atomic_dir(final) as tmp:
            if hasattr(recipe, "build_into"):  # another kind of demo (harc_hpc.demo.dense's dense models)
                recipe.build_into(tmp, progress=progress)
            else:
                build_into(tmp, recipe, progress=progress)
            if is_complete(final, recipe):
                # A concurrent build finished first: keep theirs (same recipe, same bytes).
                raise _BuiltElsewhere
    except _BuiltElsewhere:
        pass
    except BaseException:
        if is_complete(final, recipe):  # lost a race to a concurrent build: theirs is as good
            return final
        raise
    return final


class _BuiltElsewhere(BaseException):
    """Raised inside the atomic build to drop ours when another process published first: a
    control-flow signal, not an error (a BaseException, outside HarcHpcError, the one error base, so
    that no ``except Exception`` can take it for a failure)."""


def _write_jsonl(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}, ensure_ascii=True) + "\n")


def _save(model, tokenizer, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build_into(out: Path, recipe: DemoRecipe, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Train and write everything of one build into ``out`` (an empty directory)."""

    def finetune(model, domain: str, batches: list[torch.Tensor], say: Callable[[str], None]) -> dict:
        trainable = training.restrict_finetune(model, recipe, domain)
        record = dataclasses.asdict(training.train(
            model, batches, recipe.finetune_lr, recipe.router_lr_mult, recipe.warmup_frac,
            progress=say, label=f"finetune {domain}"))
        record["trainable"] = trainable
        training.release_restrictions(model)
        return record

    return build_sources_into(Path(out), recipe, fmt=DEMO_FORMAT, new_model=lambda seed: training.new_model(recipe, seed),
                              finetune=finetune, progress=progress)


def build_sources_into(out: Path, recipe, *, fmt: int, new_model: Callable[[int], Any],
                       finetune: Callable[[Any, str, list[torch.Tensor], Callable[[str], None]], dict],
                       progress: Optional[Callable[[str], None]] = None, name: str = "demo",
                       model_desc: str = "") -> dict:
    """Train and write one demo build into ``out`` (an empty directory): each domain's calibration and
    held-out text, a base pretrained on ``recipe.pretrain_mix``, one fine-tune of the base per domain,
    ``build.json`` and (last) ``recipe.json``. Shared by every kind of demo (this MoE one and
    harc_hpc.demo.dense's dense one); what differs is ``new_model(seed)`` (a fresh, seeded model) and
    ``finetune(model, domain, batches, say)``, which trains a copy of the base on its domain and returns
    that fine-tune's ``build.json`` record. ``name`` and ``model_desc`` only word the progress lines.
    Deterministic for a fixed recipe and thread count (harc_hpc.demo.training)."""
    from transformers.utils import logging as hf_logging

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
        s = recipe.seed
        L, B = recipe.seq_len, recipe.batch_size

        t0 = time.perf_counter()
        data = out / "data"
        data.mkdir(parents=True)
        heldout = {}
        for d in recipe.domains:
            _write_jsonl(data / f"{d}-calib.jsonl", corpus.packed_windows(d, recipe.calib_samples, L, f"{s}/calib/{d}"))
            heldout[d] = corpus.packed_windows(d, recipe.heldout_samples, L, f"{s}/heldout/{d}")
            _write_jsonl(data / f"{d}-heldout.jsonl", heldout[d])
        pre_windows = corpus.mixed_windows(dict(recipe.pretrain_mix), recipe.pretrain_steps * B, L, f"{s}/pretrain")
        info["data_seconds"] = round(time.perf_counter() - t0, 2)

        base = new_model(s)
        say(f"{name}: pretraining {model_desc}{sum(p.numel() for p in base.parameters()) / 1e6:.2f} M parameters, "
            f"{recipe.pretrain_steps} steps x {B} x {L} tokens")
        info["pretrain"] = dataclasses.asdict(training.train(
            base, training.windows_to_batches(pre_windows, B), recipe.pretrain_lr, 1.0, recipe.warmup_frac,
            progress=say, label="pretrain"))
        del pre_windows
        _save(base, tok, out / "base")
        base_state = {k: v.clone() for k, v in base.state_dict().items()}
        info["heldout_ce"] = {"base": {d: round(training.mean_ce(base, heldout[d]), 4) for d in recipe.domains}}
        del base

        info["finetune"] = {}
        for d in recipe.domains:
            model = new_model(s)
            model.load_state_dict(base_state)
            windows = corpus.packed_windows(d, recipe.finetune_steps * B, L, f"{s}/finetune/{d}")
            info["finetune"][d] = finetune(model, d, training.windows_to_batches(windows, B), say)
            _save(model, tok, out / d)
            info["heldout_ce"][d] = {e: round(training.mean_ce(model, heldout[e]), 4) for e in recipe.domains}
            del model

        info["seconds"] = round(time.perf_counter() - t_start, 1)
        (out / "build.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        # Written last: its presence (plus the files it lists) marks a complete build.
        (out / "recipe.json").write_text(json.dumps({"recipe": recipe.to_json(), "digest": recipe.digest(),
                                                     "format": fmt}, indent=2, sort_keys=True) + "\n")
        say(f"{name}: built in {info['seconds']:.0f}s -> {out}")
        return info
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)
        if bars:
            hf_logging.enable_progress_bar()
