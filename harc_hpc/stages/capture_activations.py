"""capture-activations: router inputs of one block of layers, from the partially calibrated model.

For block b the merged model gets the calibrated routers of every earlier block. The hidden states
entering block b-1 (cached by the previous capture) are pushed through block b-1's decoder layers,
now with its calibrated routers, and cached as the hidden states entering block b; they are then
pushed through block b's layers while hooks record each calibrated layer's router inputs. Every
decoder layer is therefore run at most twice over a whole run (O(L), not O(L^2)), and with
``block_size = 1`` layer l's inputs come from the model whose routers < l are calibrated, which is
the paper's Algorithm 1.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from harc_hpc.io.activations import (
    ActivationArray,
    ActivationWriter,
    TokenStore,
    layer_name,
    token_store_digest,
    write_token_store,
)
from harc_hpc.io.atomic import atomic_path
from harc_hpc.io.calibration_data import data_digest, tokenize_task
from harc_hpc.config import PipelineConfig
from harc_hpc.errors import require_finite
from harc_hpc.models.modeling import LayerwiseRunner, RouterInputRecorder, batches, load_causal_lm, pad_batch, pick_device, unpad
from harc_hpc.progress import Progress
from harc_hpc.stages import layout
from harc_hpc.stages.routers import load_router, set_router_weights


def ensure_tokens(cfg: PipelineConfig, run_dir: Path, tokenizer_dir: Path) -> dict[str, TokenStore]:
    """Tokenise each task's calibration data once; a store is redone only when its inputs changed."""
    stores = {}
    tokenizer = None
    for task in cfg.task_names:
        data = cfg.calibration_for(task)
        digest = data_digest(data, cfg.calibration)
        path = layout.token_store(run_dir, task)
        if token_store_digest(path) != digest:
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(
                    str(tokenizer_dir), trust_remote_code=cfg.models.trust_remote_code
                )
            write_token_store(path, tokenize_task(data, cfg.calibration, tokenizer), digest)
        stores[task] = TokenStore(path)
    return stores


def run(cfg: PipelineConfig, run_dir: Path, block: int) -> dict:
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.run.seed)
    block_list = layout.blocks(cfg)
    if not 0 <= block < len(block_list):
        raise ValueError(f"capture-activations: block {block} does not exist (blocks: 0..{len(block_list) - 1})")
    fam = layout.family(cfg)
    merged = layout.merged_dir(run_dir)
    tokens = ensure_tokens(cfg, run_dir, merged)

    device = pick_device(cfg.harc.device)
    model = load_causal_lm(merged, device, trust_remote_code=cfg.models.trust_remote_code)
    # Routers of every earlier block are replaced by their calibrated solutions.
    earlier = [l for blk in block_list[:block] for l in blk]
    set_router_weights(model, fam, {l: load_router(run_dir, l) for l in earlier})

    runner = LayerwiseRunner(model)
    start, stop = layout.block_decoder_span(block_list, block)
    prev_start = layout.block_decoder_span(block_list, block - 1)[0] if block > 0 else 0
    layers = block_list[block]
    d = model.config.hidden_size
    bs = cfg.calibration.batch_size
    counts = {}

    n_tokens = sum(s.num_tokens for s in tokens.values())
    item = {"float32": 4, "float64": 8}.get(cfg.calibration.dtype, 2)
    with atomic_path(layout.hidden_store(run_dir, block), needed_bytes=n_tokens * d * 4) as htmp, \
            atomic_path(layout.activation_store(run_dir, block), needed_bytes=n_tokens * d * item * len(layers)) as atmp:
        # Cached hidden states keep full float32 precision: they feed later blocks' forwards.
        hidden_out = ActivationWriter(htmp, cfg.calibration.chunk_tokens, "float32")
        acts = ActivationWriter(atmp, cfg.calibration.chunk_tokens, cfg.calibration.dtype)
        recorder = RouterInputRecorder({l: fam.router_module(model, l) for l in layers})
        try:
            for task, store in tokens.items():
                offsets = store.offsets
                hidden_out.create(task, store.num_tokens, d, offsets)
                for l in layers:
                    acts.create(f"{layer_name(l)}/{task}", store.num_tokens, d, offsets)
                prev = None
                if block > 0:
                    prev = ActivationArray(layout.hidden_store(run_dir, block - 1), task)
                bar = Progress(-(-store.num_sequences // bs), f"capture block {block} task {task} (batches)")
                for idx in batches(store.num_sequences, bs):
                    lo, hi = int(offsets[idx.start]), int(offsets[idx.stop])
                    if block == 0:
                        ids, lengths = pad_batch([torch.from_numpy(store.sequence(i)) for i in idx])
                        h = runner.embed(ids)
                    else:
                        flat = prev.read(lo, hi)
                        parts = [flat[int(offsets[i]) - lo: int(offsets[i + 1]) - lo] for i in idx]
                        h, lengths = pad_batch(parts)
                        h = runner.run_layers(h, prev_start, start)
                    where = (f"capture-activations block {block}, task {task}, sequences {idx.start}-"
                             f"{idx.stop - 1} (tokens {lo}:{hi})")
                    flat_h = unpad(h, lengths).float()
                    require_finite(flat_h, f"the hidden states entering decoder layer {start}", where,
                                   hint="check the merged model and the calibrated routers of earlier blocks")
                    hidden_out.write(task, lo, flat_h)
                    runner.run_layers(h, start, stop)
                    B, T = h.shape[:2]
                    for l in layers:
                        x = unpad(recorder.pop(l).reshape(B, T, d), lengths)
                        require_finite(x, f"the router inputs of layer {l}", where,
                                       hint="the model overflows or holds NaN weights; try calibration.dtype float32")
                        acts.write(f"{layer_name(l)}/{task}", lo, x)
                    bar.update(1)
                bar.close()
                counts[task] = store.num_tokens
            hidden_out.close()
            acts.close()
        finally:
            recorder.close()
    return {
        "block": block,
        "layers": layers,
        "tokens": counts,
        "seconds": round(time.perf_counter() - t0, 3),
    }
