"""capture-activations: router inputs of one block of layers, from the partially calibrated model.

For block b the merged model gets the calibrated routers of every earlier block. Two captures:

* ``harc.block_size`` 1 (``run_streamed``, the paper's Algorithm 1): the block's one store holds the
  residual stream entering layer l_b's feed-forward half; its router inputs are that residual's
  post-attention norm, derived on read (compute_statistics.layer_inputs). Capture b streams block
  b-1's residual batch by batch through layer l_{b-1}'s feed-forward half (calibrated router), the
  layers between, and layer l_b's attention half, consuming (deleting) the store it reads as its
  own output becomes durable, so a run's scratch stays about one block's store.
* larger blocks (``run_layerwise``): the hidden states entering block b-1 (cached by the previous
  capture) are pushed through block b-1's decoder layers, now with its calibrated routers, and
  cached as the hidden states entering block b; they are then pushed through block b's layers while
  hooks record each calibrated layer's router inputs.

Either way every decoder layer is run at most twice over a whole run (O(L), not O(L^2)).

The model is never loaded whole (harc_hpc.models.onload): its skeleton lives on the meta device and
decoder layers are read from the shards onto the device when they run, and freed. Peak memory is
one decoder layer (streamed: the layers from one calibrated layer to the next) plus the in-flight
hidden states (layer-wise: the block's, on the device when they fit, else host memory, else
node-local disk; streamed: one batch), whatever the size of the model.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch

from harc_hpc.io.activations import (
    RESIDUAL_KIND,
    ActivationArray,
    ActivationWriter,
    TokenStore,
    layer_name,
    stored_kind,
    token_store_digest,
    write_token_store,
)
from harc_hpc.io.atomic import atomic_path, free_bytes, fsync_one, fsync_tree, publish, remove_path, write_json_atomic
from harc_hpc.io.calibration_data import data_digest, tokenize_task_masked
from harc_hpc.config import PipelineConfig
from harc_hpc.dtypes import itemsize
from harc_hpc.errors import CorruptArtifactError, DiskFullError, require_finite
from harc_hpc.models.modeling import (RouterInputRecorder, batches, free_memory_bytes, host_free_bytes, pad_batch,
                                      pick_device, unpad)
from harc_hpc.models.layerwise import LayerObserver, run_layers
from harc_hpc.models.onload import OnloadedModel
from harc_hpc.progress import Progress
from harc_hpc.stages import layout
from harc_hpc.stages.routers import load_router, load_router_bias, load_shared_expert_gate

log = logging.getLogger(__name__)

def ensure_tokens(cfg: PipelineConfig, run_dir: Path, tokenizer_dir: Path) -> dict[str, TokenStore]:
    """Tokenise each task's calibration data once; a store is redone only when its inputs changed.
    The stores keep which tokens the calibration mode selects (``TokenStore.selected``)."""
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
            seqs, masks = tokenize_task_masked(data, cfg.calibration, tokenizer)
            write_token_store(path, seqs, digest, masks=masks)
        stores[task] = TokenStore(path)
    return stores


class BatchStates:
    """The hidden states of every calibration batch of one task between two decoder layers, as
    right-padded (B, T, d) tensors in the model's compute dtype.

    Keeping each batch padded exactly as the whole-model forward pads it is what makes a layer-wise
    pass equal to it bit for bit: the pads are routed to experts too, and an expert's GEMM over a
    different number of rows may round differently. They live on the compute device when they fit,
    else in host memory, else memory-mapped on node-local disk (``run.node_local_dir``, default
    ``$TMPDIR``; a shared filesystem would stall every layer).

    Host memory is not pinned: torch's caching host allocator rounds a pinned block up to a power of
    two (70 GB would take 128 GB), past what the placement check and the job's cgroup allow. The only
    pinned memory is the bounded staging buffer (STAGING_BYTES) through which device-held states are
    checkpointed and restored.
    """

    def __init__(self, shapes: list[tuple[int, int]], dim: int, dtype: torch.dtype, device: torch.device,
                 placement: str, scratch_dir: Path | None = None):
        self.shapes = shapes
        self.dim = dim
        self.device = device
        self.placement = placement
        sizes = [b * t * dim for b, t in shapes]
        self.offsets = [0]
        for n in sizes:
            self.offsets.append(self.offsets[-1] + n)
        total = self.offsets[-1]
        self.nbytes = total * dtype.itemsize
        self._file = None
        if placement == "device":
            self.flat = torch.empty(total, dtype=dtype, device=device)
        elif placement == "host":
            self.flat = torch.empty(total, dtype=dtype)
        else:
            fd, name = tempfile.mkstemp(prefix="harc-hidden-", suffix=".bin", dir=scratch_dir)
            os.close(fd)
            self._file = name
            self.flat = torch.from_file(name, shared=True, size=max(1, total), dtype=dtype)

    def get(self, i: int) -> torch.Tensor:
        b, t = self.shapes[i]
        return self.flat[self.offsets[i]: self.offsets[i + 1]].view(b, t, self.dim).to(self.device)

    def set(self, i: int, value: torch.Tensor) -> None:
        self.flat[self.offsets[i]: self.offsets[i + 1]].view_as(value).copy_(value)

    def save(self, path: Path) -> None:
        """The raw bytes of every batch's states, padding included (a resume continues bit for bit).
        Device-held states go through one bounded host buffer, not a full host copy."""
        write_tensor_bytes(self.flat, path)

    def load(self, path: Path) -> None:
        read_tensor_bytes(self.flat, path)

    def close(self) -> None:
        self.flat = None
        if self._file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._file)
            self._file = None


STAGING_BYTES = 256 * 2**20  # the host buffer device-held states are checkpointed through


def _staging_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """A host byte buffer of ``nbytes`` for copies to and from ``device`` (pinned for a GPU: bounded,
    so the caching host allocator's power-of-two rounding costs at most STAGING_BYTES)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")


def write_tensor_bytes(t: torch.Tensor, path: Path, chunk_bytes: int = STAGING_BYTES) -> None:
    """Write the raw bytes of contiguous ``t`` to ``path``: a host tensor directly, a device tensor
    in pieces of at most ``chunk_bytes`` copied through one reusable host buffer (the bytes written
    are the same either way)."""
    raw = t.view(torch.uint8)
    if raw.device.type == "cpu":
        raw.numpy().tofile(str(path))
    else:
        _write_chunked(raw, path, chunk_bytes)


def read_tensor_bytes(t: torch.Tensor, path: Path, chunk_bytes: int = STAGING_BYTES) -> None:
    """Fill contiguous ``t`` with the raw bytes of ``path`` (write_tensor_bytes' inverse): a device
    tensor in pieces of at most ``chunk_bytes`` through one reusable host buffer."""
    raw = t.view(torch.uint8)
    if raw.device.type == "cpu":
        raw.copy_(torch.from_file(str(path), shared=False, size=raw.numel(), dtype=torch.uint8))
    else:
        _read_chunked(raw, path, chunk_bytes)


def _write_chunked(raw: torch.Tensor, path: Path, chunk_bytes: int) -> None:
    n = raw.numel()
    buf = _staging_buffer(max(1, min(chunk_bytes, n)), raw.device)
    with open(path, "wb") as f:
        for lo in range(0, n, chunk_bytes):
            piece = buf[: min(n, lo + chunk_bytes) - lo]
            piece.copy_(raw[lo: lo + len(piece)])  # device to host: returns once the bytes are there
            f.write(memoryview(piece.numpy()))


def _read_chunked(raw: torch.Tensor, path: Path, chunk_bytes: int) -> None:
    n = raw.numel()
    buf = _staging_buffer(max(1, min(chunk_bytes, n)), raw.device)
    with open(path, "rb") as f:
        for lo in range(0, n, chunk_bytes):
            piece = buf[: min(n, lo + chunk_bytes) - lo]
            if f.readinto(memoryview(piece.numpy())) != len(piece):
                raise CorruptArtifactError(path, f"shorter than the {n} bytes of the checkpointed states")
            raw[lo: lo + len(piece)].copy_(piece)  # synchronous: the buffer is reused next


def placement_for(nbytes: int, device: torch.device, layer_bytes: int) -> str:
    """Where a block's in-flight hidden states go: the device if they fit beside two decoder layers
    with a 20 % margin (its free memory counting torch's cache), else host memory if it has them
    with the same margin (the least of MemAvailable, the cgroup's limit and SLURM's grant:
    modeling.host_free_bytes, the figure ``plan`` applies to the executor's mem_gb), else
    node-local disk. The rule is the estimate's (estimates.capture_activations.states_placement),
    so ``plan`` and the run cannot disagree."""
    from harc_hpc.stages.estimates.capture_activations import states_placement

    device_free = free_memory_bytes(device) if device.type != "cpu" else None
    return states_placement(nbytes, layer_bytes, device_free, host_free_bytes())


def peak_memory(device: torch.device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:  # VmHWM is this process's own peak; ru_maxrss survives execve from a parent
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    out = {"peak_rss_bytes": rss}
    if device.type == "cuda":
        out["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


def task_manifest(partial: Path, task_digest: Optional[str], manifest_format: str) -> Optional[dict]:
    """The manifest in ``partial`` if a killed run of this very task (``task_digest``, a stage's
    ``manifest_format``) wrote it, else None (no digest, none, unreadable, or another task's); the
    caller still checks the files it lists."""
    if not task_digest:
        return None
    try:
        manifest = json.loads((partial / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != manifest_format or manifest.get("digest") != task_digest:
        return None
    return manifest


def _read_manifest(partial: Path, task_digest: Optional[str]) -> Optional[dict]:
    """The partial work a killed run of this very task left, or None (none, or another task's)."""
    manifest = task_manifest(partial, task_digest, MANIFEST_FORMAT)
    if manifest is None:
        return None
    needed = [partial / "activations.zarr"] + [partial / "states" / f"{t}.bin" for t in manifest.get("tasks", [])]
    if manifest.get("hidden_complete"):
        needed.append(partial / "hidden.zarr")
    return manifest if all(p.exists() for p in needed) else None


def _checkpoint(partial: Path, task_digest: str, next_layer: int, hidden_complete: bool,
                states: dict[str, "BatchStates"]) -> None:
    """After a finished decoder layer: the in-flight states (as computed, padding included, so a
    resumed run continues bit for bit), then the stores made durable, then the manifest that makes
    all of it count."""
    for task, st in states.items():
        with atomic_path(partial / "states" / f"{task}.bin", needed_bytes=st.nbytes) as tmp:
            st.save(tmp)
    fsync_tree(partial / "activations.zarr")
    if hidden_complete:
        fsync_tree(partial / "hidden.zarr")
    write_json_atomic(partial / MANIFEST, {"format": MANIFEST_FORMAT, "digest": task_digest,
                                           "next_layer": next_layer, "hidden_complete": hidden_complete,
                                           "tasks": sorted(states)})


MANIFEST = "manifest.json"
MANIFEST_FORMAT = "harc-capture-partial/1"


def _publish_stores(partial: Path, stores: list[tuple[Path, Path]]) -> None:
    """Make each built store durable and move it to its final path, then drop the partial folder."""
    for built, final in stores:
        fsync_tree(built)
        final.parent.mkdir(parents=True, exist_ok=True)
        publish(built, final)
    remove_path(partial)


def _raise_disk_full(exc: OSError, partial: Path, needed: int):
    """A full disk becomes a DiskFullError naming the folder and the bytes the task needs."""
    if exc.errno == errno.ENOSPC:
        raise DiskFullError(partial, needed, free_bytes(partial)) from exc
    raise exc


def calibrated_overrides(run_dir: Path, fam, block_list: list[list[int]], block: int) -> dict:
    """The routers of every block before ``block``, replaced by their calibrated solutions (with
    their calibrated biases and shared-expert gates): ``{layer: {parameter: tensor}}``."""
    earlier = [l for blk in block_list[:block] for l in blk]
    overrides = {l: {fam.router_memory_param: load_router(run_dir, l)} for l in earlier}
    for l in earlier:
        if fam.router_intercept_param is not None:
            overrides[l][fam.router_intercept_param] = load_router_bias(run_dir, l)
        gate = load_shared_expert_gate(run_dir, l)
        if gate is not None:
            overrides[l]["mlp.shared_expert_gate.weight"] = gate
    return overrides


def streamed(cfg: PipelineConfig) -> bool:
    """Whether capture stores one residual per calibrated layer and streams batch by batch
    (``run_streamed``): the paper's Algorithm 1 (``harc.block_size`` 1) on a family whose decoder
    layer is the standard pre-norm pair; else the layer-wise capture of router inputs and hidden
    states."""
    if cfg.harc.block_size != 1:
        return False
    from harc_hpc.models.families import UnsupportedModelError

    try:
        return layout.family(cfg).residual_capture
    except UnsupportedModelError:
        raise
    except (OSError, ValueError, KeyError):
        # No readable config.json here (a plan made before the weights are on disk, with its
        # layers given): the streamed capture, what most families do (a family that captures
        # layer-wise changes the plan once its config is readable; nothing has run by then).
        return True


def template_values(cfg: PipelineConfig) -> dict:
    """The pipeline's ``template_values`` hook: which of capture's paths (stages/capture-activations.yaml)
    this config's capture reads and writes. A path naming a value absent here is dropped."""
    return {"if_streamed": ""} if streamed(cfg) else {"if_layerwise": ""}


def check_block(cfg: PipelineConfig, block: int) -> list[list[int]]:
    """The run's blocks of layers, once ``block`` is known to be one of them."""
    block_list = layout.blocks(cfg)
    if not 0 <= block < len(block_list):
        raise ValueError(f"capture-activations: block {block} does not exist (blocks: 0..{len(block_list) - 1})")
    return block_list


def run(cfg: PipelineConfig, run_dir: Path, block: int, task_digest: Optional[str] = None,
        claim_input: Optional[Callable[[str, Path], bool]] = None) -> dict:
    """Capture block ``block``: streamed (``streamed(cfg)``: run_streamed) or layer-wise.

    ``claim_input`` (passed by the runner under run.retention delete-intermediate): a streamed
    capture deletes the residual store it reads last as it consumes it once this claims it."""
    check_block(cfg, block)
    if streamed(cfg):
        return run_streamed(cfg, run_dir, block, task_digest=task_digest, claim_input=claim_input)
    return run_layerwise(cfg, run_dir, block, task_digest=task_digest)


def run_layerwise(cfg: PipelineConfig, run_dir: Path, block: int, task_digest: Optional[str] = None) -> dict:
    """Capture block ``block``: one decoder layer on the device at a time, every batch through it.

    ``task_digest`` (passed by the runner): after every decoder layer but the last the task's state
    is checkpointed under ``partial/capture-block-NNN`` with a manifest carrying this digest, and a
    rerun of the same task (killed at its time limit, preempted) resumes after the last finished
    layer; without it every run starts from the embeddings or the previous block's cache."""
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.run.seed)
    block_list = check_block(cfg, block)
    merged = layout.merged_dir(run_dir)
    tokens = ensure_tokens(cfg, run_dir, merged)

    device = pick_device(cfg.harc.device)
    model = OnloadedModel(merged, device, trust_remote_code=cfg.models.trust_remote_code)
    fam = model.family
    overrides = calibrated_overrides(run_dir, fam, block_list, block)

    start, stop = layout.block_decoder_span(block_list, block)
    prev_start = layout.block_decoder_span(block_list, block - 1)[0] if block > 0 else 0
    layers = block_list[block]
    d = model.config.hidden_size
    bs = cfg.calibration.batch_size
    dtype = cfg.calibration.dtype
    n_tokens = sum(s.num_tokens for s in tokens.values())
    # Every token is pushed through the layers (context); only the tokens the calibration mode selects
    # (all of them in modes full and prompt) have their router inputs stored.
    n_selected = sum(s.num_selected for s in tokens.values())
    item = itemsize(dtype)
    recorder = RouterInputRecorder({l: fam.router_module(model.model, l) for l in layers})
    states: dict[str, BatchStates] = {}
    placement = None
    partial = layout.capture_partial(run_dir, block)
    manifest = _read_manifest(partial, task_digest)
    if manifest is None:
        remove_path(partial)
        partial.mkdir(parents=True)
    next_layer = int(manifest["next_layer"]) if manifest else prev_start
    hidden_complete = bool(manifest and manifest["hidden_complete"])
    if manifest:
        log.info("capture-activations block %d: resuming after decoder layer %d (checkpoint in %s)",
                 block, next_layer - 1, partial)
    hidden_dir, acts_dir = partial / "hidden.zarr", partial / "activations.zarr"
    needed = d * item * ((0 if hidden_complete else n_tokens)
                         + n_selected * len([l for l in layers if l >= next_layer]))
    free = free_bytes(partial)
    if free is not None and free < needed:
        raise DiskFullError(partial, needed, free)
    try:
        # The cached hidden states are stored in the calibration dtype, like the router inputs.
        hidden_out = None if hidden_complete else ActivationWriter(
            hidden_dir, cfg.calibration.chunk_tokens, dtype, compression=cfg.calibration.compression)
        acts = ActivationWriter(acts_dir, cfg.calibration.chunk_tokens, dtype,
                                compression=cfg.calibration.compression, append=manifest is not None)
        plan = {t: list(batches(s.num_sequences, bs)) for t, s in tokens.items()}
        shapes = {t: [(len(idx), int(max(s.offsets[i + 1] - s.offsets[i] for i in idx))) for idx in plan[t]]
                  for t, s in tokens.items()}
        nbytes = sum(b * t for sh in shapes.values() for b, t in sh) * d * model.dtype.itemsize
        placement = placement_for(nbytes, device, model.layer_bytes(start if start < stop else 0))
        for task, store in tokens.items():
            states[task] = BatchStates(shapes[task], d, model.dtype, device, placement,
                                       scratch_dir=cfg.run.node_local_dir)
            if hidden_out is not None:
                hidden_out.create(task, store.num_tokens, d, store.offsets)
            for l in layers:
                if l >= next_layer:
                    acts.create(f"{layer_name(l)}/{task}", store.num_selected, d, store.selected_offsets)
            if manifest:
                states[task].load(partial / "states" / f"{task}.bin")
                continue
            # The states entering decoder layer prev_start: embeddings, or the previous cache.
            prev = ActivationArray(layout.hidden_store(run_dir, block - 1), task,
                                   out_dtype=model.dtype) if block > 0 else None
            offsets = store.offsets
            for i, idx in enumerate(plan[task]):
                if prev is None:
                    ids, _ = pad_batch([torch.from_numpy(store.sequence(j)) for j in idx])
                    h = model.embed(ids)
                else:
                    lo, hi = int(offsets[idx.start]), int(offsets[idx.stop])
                    flat = prev.read(lo, hi)
                    h, _ = pad_batch([flat[int(offsets[j]) - lo: int(offsets[j + 1]) - lo] for j in idx])
                states[task].set(i, h)
        model.release_embeddings()

        def where(task, idx):
            o = tokens[task].offsets
            return (f"capture-activations block {block}, task {task}, sequences {idx.start}-{idx.stop - 1} "
                    f"(tokens {int(o[idx.start])}:{int(o[idx.stop])})")

        def lengths_of(task, idx):
            o = tokens[task].offsets
            return [int(o[j + 1] - o[j]) for j in idx]

        class Observer(LayerObserver):
            """The hidden states entering the block (the next block's capture starts from them) and
            each calibrated layer's router inputs, batch by batch; a checkpoint after each layer."""

            def layer_start(self, j):
                nonlocal hidden_complete
                if j != start or hidden_out is None:
                    return
                for task, store in tokens.items():
                    for i, idx in enumerate(plan[task]):
                        flat_h = unpad(states[task].get(i), lengths_of(task, idx))
                        require_finite(flat_h, f"the hidden states entering decoder layer {start}",
                                       where(task, idx),
                                       hint="check the merged model and the calibrated routers of earlier blocks")
                        hidden_out.write(task, int(store.offsets[idx.start]), flat_h)
                hidden_out.close()
                hidden_complete = True

            def batch_end(self, j, task, i, h):
                if j not in layers:
                    return
                store, idx = tokens[task], plan[task][i]
                B, T = h.shape[:2]
                x = unpad(recorder.pop(j).reshape(B, T, d), lengths_of(task, idx))
                require_finite(x, f"the router inputs of layer {j}", where(task, idx),
                               hint="the model overflows or holds NaN weights; try calibration.dtype float32")
                if store.selected is not None:
                    rows = store.selected[int(store.offsets[idx.start]): int(store.offsets[idx.stop])]
                    x = x[torch.from_numpy(rows).to(x.device)]
                acts.write(f"{layer_name(j)}/{task}", int(store.selected_offsets[idx.start]), x)

            def layer_end(self, j):
                if j in layers:
                    for task in tokens:
                        acts.finish(f"{layer_name(j)}/{task}")
                if task_digest and cfg.calibration.layer_checkpoints and j + 1 < stop:
                    _checkpoint(partial, task_digest, j + 1, hidden_complete, states)

        run_layers(model, states, range(next_layer, stop), observer=Observer(), overrides=overrides,
                   label=f"capture block {block}")
        acts.close()
        if hidden_out is not None and not hidden_complete:  # an empty block span: nothing ran
            hidden_out.close()
        _publish_stores(partial, [(hidden_dir, layout.hidden_store(run_dir, block)),
                                  (acts_dir, layout.activation_store(run_dir, block))])
    except OSError as exc:
        _raise_disk_full(exc, partial, needed)
    finally:
        recorder.close()
        for s in states.values():
            s.close()
        model.close()
    return {
        "block": block,
        "layers": layers,
        "tokens": {t: s.num_tokens for t, s in tokens.items()},
        "selected_tokens": {t: s.num_selected for t, s in tokens.items()},
        "decoder_layers_run": [prev_start, stop],
        "hidden_states_in": placement,
        **peak_memory(device),
        "seconds": round(time.perf_counter() - t0, 3),
    }


# -- streamed capture (harc.block_size 1) ----------------------------------------------------------

STREAM_MANIFEST_FORMAT = "harc-capture-stream/1"


def _stream_manifest(partial: Path, task_digest: Optional[str]) -> Optional[dict]:
    """The progress a killed streamed capture of this very task left (with its store), or None."""
    manifest = task_manifest(partial, task_digest, STREAM_MANIFEST_FORMAT)
    if manifest is None or not (partial / "activations.zarr").is_dir():
        return None
    return manifest


def _resume_batch(plan: list[range], offsets, done: int) -> int:
    """The batch a resume restarts at when rows [0, done) are durable: the last one starting at or
    before row ``done`` (the same batches as an uninterrupted run: padding changes bits)."""
    return max(i for i, idx in enumerate(plan) if int(offsets[idx.start]) <= done)


def _chunk_file(array_dir: Path, index: int) -> Path:
    # Zarr v3's default chunk key for a (rows, d) array chunked (chunk_tokens, d): c/<row chunk>/0
    return array_dir / "c" / str(index) / "0"


def _fsync_chunks(array_dir: Path, first: int, stop: int) -> None:
    """Flush the chunks [first, stop) of one array and the folders listing them to stable storage:
    not the whole store, whose earlier chunks are durable already."""
    for i in range(first, stop):
        f = _chunk_file(array_dir, i)
        if f.exists():
            fsync_one(f)
            fsync_one(f.parent)
    if (array_dir / "c").is_dir():
        fsync_one(array_dir / "c")


def run_streamed(cfg: PipelineConfig, run_dir: Path, block: int, task_digest: Optional[str] = None,
                 claim_input: Optional[Callable[[str, Path], bool]] = None) -> dict:
    """Capture calibrated layer l_b (block ``block`` of one layer) batch by batch.

    What is stored for layer l is ``r_l``, the residual stream entering its feed-forward half (the
    input of its post-attention norm), for every token, in the calibration dtype: the router inputs
    are ``post_attention_layernorm(r_l)`` and are derived on read (compute_statistics.layer_inputs).
    Capture b reads ``r_{l_{b-1}}`` one batch of sequences at a time, runs layer l_{b-1}'s
    feed-forward half with its calibrated router, the decoder layers between the two in full, and
    layer l_b's attention half, and writes ``r_{l_b}``; block 0 starts from the embeddings. The span
    stays onloaded, and of its end layers only the half that runs: about one decoder layer when
    every MoE layer is calibrated.

    Under ``run.retention: delete-intermediate`` this task, the last reader of the store it reads,
    deletes that store's chunks as it goes: once its own output up to a row is durable (fsync) and a
    manifest in ``partial/`` says so, the input chunks lying wholly below the first row a resume
    would read again are deleted, so the scratch of a run stays about one residual store (plus a
    batch and a chunk per task). Before the first deletion the producer's record retires the store
    as consumed by this task, so no submit trusts the half-deleted store, and a resubmit resumes
    this task from its manifest instead of rerunning the producer. A resumed run writes the same
    bytes as an uninterrupted one: batches are the same, and rows already written are skipped.
    """
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.run.seed)
    block_list = check_block(cfg, block)
    layer = block_list[block][0]
    prev_layer = block_list[block - 1][0] if block > 0 else None
    merged = layout.merged_dir(run_dir)
    tokens = ensure_tokens(cfg, run_dir, merged)
    device = pick_device(cfg.harc.device)
    model = OnloadedModel(merged, device, trust_remote_code=cfg.models.trust_remote_code)
    fam = model.family
    overrides = calibrated_overrides(run_dir, fam, block_list, block)
    between = list(range(0 if prev_layer is None else prev_layer + 1, layer))
    d = model.config.hidden_size
    bs = cfg.calibration.batch_size
    dtype = cfg.calibration.dtype
    chunk = cfg.calibration.chunk_tokens
    in_store = layout.activation_store(run_dir, block - 1) if block > 0 else None
    partial = layout.capture_partial(run_dir, block)
    manifest = _stream_manifest(partial, task_digest)
    if manifest is None:
        remove_path(partial)
        partial.mkdir(parents=True)
    else:
        log.info("capture-activations block %d: resuming the streamed capture (rows written: %s)", block,
                 manifest["flushed"])
    out_dir = partial / "activations.zarr"
    item = itemsize(dtype)
    needed = d * item * sum(s.num_tokens - (manifest["flushed"].get(t, 0) if manifest else 0)
                            for t, s in tokens.items())
    free = free_bytes(partial)
    if free is not None and free < needed:
        raise DiskFullError(partial, needed, free)
    # The store this task consumes, if it may: claimed (retired in its producer's record, by the
    # runner's claim_input) right before the first deletion, once this task's manifest is there to
    # resume from.
    consume = in_store is not None and task_digest is not None and claim_input is not None
    claimed: Optional[bool] = None
    flushed = dict(manifest["flushed"]) if manifest else {t: 0 for t in tokens}
    deleted_below = {t: 0 for t in tokens}  # input chunks of each task known to be deleted
    try:
        # Of the layers at the span's ends only the half that runs: about one decoder layer in all.
        if prev_layer is not None:
            model.onload(prev_layer, overrides.get(prev_layer), parts=fam.half_modules("moe", model.layer(prev_layer)))
        for j in between:
            model.onload(j, overrides.get(j))
        model.onload(layer, overrides.get(layer), parts=fam.half_modules("attention", model.layer(layer)))
        writer = ActivationWriter(out_dir, chunk, dtype, compression=cfg.calibration.compression,
                                  append=manifest is not None)
        name_of = {t: f"{layer_name(layer)}/{t}" for t in tokens}
        if manifest is None:
            for task, store in tokens.items():
                arr = writer.create(name_of[task], store.num_tokens, d, store.offsets)
                # How a reader turns the stored residual into this layer's router inputs.
                arr.attrs.update({"kind": RESIDUAL_KIND, "layer": layer, "compute_dtype": str(model.dtype)[6:]})
            write_json_atomic(partial / MANIFEST, {"format": STREAM_MANIFEST_FORMAT, "digest": task_digest,
                                                   "flushed": flushed})
        for task, store in tokens.items():
            offsets = store.offsets
            plan = list(batches(store.num_sequences, bs))
            done = int(flushed.get(task, 0))
            if done >= store.num_tokens:
                continue
            # Resume at the batch holding the first row not yet durable, skipping the rows before it.
            first = _resume_batch(plan, offsets, done)
            prev = None
            if in_store is not None:
                prev_name = f"{layer_name(prev_layer)}/{task}"
                if stored_kind(in_store, prev_name) != RESIDUAL_KIND:
                    raise CorruptArtifactError(in_store, f"array {prev_name} holds router inputs, not the residual "
                                                         f"a streamed capture continues from (an older capture?)")
                prev = ActivationArray(in_store, prev_name, out_dtype=model.dtype,
                                       consumed_rows=int(offsets[plan[first].start]))
            bar = Progress(len(plan) - first, f"capture block {block} layer {layer} task {task} (batches)")

            def read(i: int):
                """Batch ``i``'s input, padded: token ids, or the stored residual of the layer before."""
                idx = plan[i]
                if prev is None:
                    return pad_batch([torch.from_numpy(store.sequence(j)) for j in idx])[0]
                lo, hi = int(offsets[idx.start]), int(offsets[idx.stop])
                flat = prev.read(lo, hi)
                return pad_batch([flat[int(offsets[j]) - lo: int(offsets[j + 1]) - lo] for j in idx])[0]

            def store_batch(i: int, out: torch.Tensor) -> None:
                """Write batch ``i``'s rows not yet durable, make whole chunks durable, then the
                manifest that says so, then delete the consumed input chunks below a resume point."""
                nonlocal done, claimed
                idx = plan[i]
                lo, hi = int(offsets[idx.start]), int(offsets[idx.stop])
                if hi > done:
                    start = max(lo, done)
                    writer.write(name_of[task], start, out[start - lo:])
                if i + 1 == len(plan):
                    writer.finish(name_of[task])
                now = writer.flushed_rows(name_of[task])
                step = writer.chunk_rows(name_of[task])
                if now // step > done // step or now == store.num_tokens:
                    # New whole chunks are written: make them durable, then the progress that says so.
                    _fsync_chunks(out_dir / name_of[task], done // step, -(-now // step))
                    done = flushed[task] = now
                    write_json_atomic(partial / MANIFEST, {"format": STREAM_MANIFEST_FORMAT,
                                                           "digest": task_digest, "flushed": flushed})
                    if consume and claimed is None:
                        claimed = claim_input(in_store.relative_to(run_dir).as_posix(), partial)
                    if claimed:
                        # A resume restarts at the batch holding row `done`: keep every chunk from it
                        # (the batch being read ahead starts there or later).
                        keep = store.num_tokens if done >= store.num_tokens else \
                            int(offsets[plan[_resume_batch(plan, offsets, done)].start])
                        deleted_below[task] = _delete_chunks(in_store / prev.name, deleted_below[task],
                                                             keep // prev.stored_chunk_rows)

            # I/O beside the forward: the next batch is read, and the last one written, while this
            # one computes. One reader and one writer thread, in batch order, one batch ahead or
            # behind at most, so the bytes and the resume points are those of the sequential loop.
            with ThreadPoolExecutor(1, "capture-read") as reader, ThreadPoolExecutor(1, "capture-write") as wpool:
                ahead = reader.submit(read, first)
                written = None
                for i in range(first, len(plan)):
                    idx = plan[i]
                    lo = int(offsets[idx.start])
                    lengths = [int(offsets[j + 1] - offsets[j]) for j in idx]
                    batch_in = ahead.result()
                    ahead = reader.submit(read, i + 1) if i + 1 < len(plan) else None
                    h = model.embed(batch_in) if prev is None else model.run_moe_half(prev_layer, batch_in)
                    for j in between:
                        h = model.run_layer(j, h)
                    out = unpad(model.run_attention_half(layer, h), lengths)
                    require_finite(out, f"the router inputs of layer {layer} (the residual they derive from)",
                                   f"capture-activations block {block}, task {task}, sequences {idx.start}-"
                                   f"{idx.stop - 1} (tokens {lo}:{int(offsets[idx.stop])})",
                                   hint="the model overflows or holds NaN weights; try calibration.dtype float32")
                    if written is not None:
                        written.result()  # the writer's error, if any, surfaces here
                    written = wpool.submit(store_batch, i, out.to("cpu"))
                    bar.update(1)
                if written is not None:
                    written.result()
            bar.close()
        model.release_embeddings()
        writer.close()
        _publish_stores(partial, [(out_dir, layout.activation_store(run_dir, block))])
    except OSError as exc:
        _raise_disk_full(exc, partial, needed)
    finally:
        model.close()
    return {
        "block": block,
        "layers": [layer],
        "stored": "residual",
        "tokens": {t: s.num_tokens for t, s in tokens.items()},
        "selected_tokens": {t: s.num_selected for t, s in tokens.items()},
        "decoder_layers_run": [prev_layer if prev_layer is not None else 0, layer + 1],
        "input_consumed": bool(claimed),
        **peak_memory(device),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _delete_chunks(array_dir: Path, first: int, stop: int) -> int:
    """Delete chunks [first, stop) of a consumed input array; returns ``stop`` (now all deleted below)."""
    for i in range(first, stop):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_chunk_file(array_dir, i))
    return max(first, stop)
