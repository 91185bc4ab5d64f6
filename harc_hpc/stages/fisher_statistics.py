"""One source's diagonal Fisher on its own calibration data, written as a checkpoint directory for the
``fisher`` merge method (the merge-statistics stage calls ``compute_source_fisher`` per source).

Output, ``OUT_DIR/fisher/`` (atomic: a temporary sibling renamed when complete): safetensors shards
laid out like a model (5 GB shards by default) whose tensor keys and shapes are exactly the
source checkpoint's, all float32, plus ``meta.json`` (samples, tokens, normalisation, ...) and the
source's ``config.json`` (so harc_hpc.io.checkpoint.Checkpoint opens it like a model). The math
is harc_hpc.math.fisher: the mean over calibration sequences of the squared gradient of each
sequence's log-likelihood.

In-memory parameter names are mapped back to the checkpoint's keys the inverse way of
harc_hpc.models.onload.layer_state_dict (how a layer is read): a name on disk as it is in memory;
a MoE module under its on-disk name (Mixtral's ``block_sparse_moe``); transformers 5's fused
expert tensors (``mlp.experts.gate_up_proj`` (E, 2I, d), gate rows first, and ``down_proj``) split
back into the per-expert matrices when that is how the checkpoint stores them. A tied LM head is
one parameter with the embeddings: its Fisher (from the gradient of both uses) is written under
every checkpoint key that holds it. Checkpoint tensors that are buffers of the model (no gradient)
get a Fisher of zero, listed in ``meta.json``; anything else that cannot be mapped is an error
naming the tensor, before anything is written.

Memory: the whole model is loaded with gradients (in its checkpoint dtype on a GPU, float32 on the
CPU). Peak = the model + the float32 accumulators (4 bytes per parameter: 2x a bfloat16 model, on
the host instead with ``accumulate_on="cpu"``; "auto" picks the host when they would not fit
beside the model with a 20 % margin) + one sequence's activations (decoder layers checkpointed by
default: each layer's input, plus one layer's internals and the T x vocabulary float32 logits) +
the gradients backward is producing (each is squared and freed at once). For OLMoE-1B-7B (6.9 B
parameters, bf16): 13.8 GB model + 27.6 GB Fisher; Qwen3-30B-A3B (30.5 B): 61 GB + 122 GB, so
the accumulators go to the host. Data-parallel ranks (``process_group``) each hold a whole model
and a share of the sequences; rank 0 writes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Literal, Mapping, Union

import torch

from harc_hpc.config import ConfigError, PipelineConfig
from harc_hpc.errors import InputDataError
from harc_hpc.io.atomic import atomic_dir, json_text
from harc_hpc.io.calibration_data import data_digest, tokenize_task
from harc_hpc.io.checkpoint import Checkpoint, resolve_model_path
from harc_hpc.io.checkpoint_writer import CheckpointWriter
from harc_hpc.math.distributed import ProcessGroupLike, as_reducer, shard_rows
from harc_hpc.math.fisher import FisherResult, diagonal_fisher
from harc_hpc.merge.engine import natural_key
from harc_hpc.models.families import MoEFamily, family_for_config
from harc_hpc.progress import Progress

FISHER_DIR = "fisher"
META_FILE = "meta.json"

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def to_checkpoint_layout(tensors: Mapping[str, torch.Tensor], keys: Iterable[str],
                         fam: MoEFamily) -> tuple[dict[str, torch.Tensor], list[str]]:
    """({checkpoint key: tensor (a view)}, in-memory names that map to no checkpoint key) for
    tensors named and shaped as in the transformers model (module docstring)."""
    keys = list(keys)
    key_set = set(keys)
    experts_of: dict[int, list[int]] = {}
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for name, t in tensors.items():
        if name in key_set:
            out[name] = t
            continue
        m = _LAYER.match(name)
        if m:
            layer, rest = int(m.group(1)), m.group(2)
            if rest.startswith("mlp."):
                alt = fam.disk_key(layer, f"{fam.moe_disk_module}.{rest[4:]}")
                if alt in key_set:
                    out[alt] = t
                    continue
            if rest in _FUSED:
                if layer not in experts_of:
                    experts_of[layer] = sorted({e.expert for e in map(fam.parse_expert_key, keys)
                                                if e is not None and e.layer == layer and e.expert is not None})
                experts = experts_of[layer]
                projs = ("gate", "up") if rest.endswith("gate_up_proj") else ("down",)
                wanted = {(e, p): fam.expert_key(layer, e, p) for e in experts for p in projs}
                if experts and len(experts) == t.shape[0] and all(k in key_set for k in wanted.values()):
                    for j, e in enumerate(experts):
                        if projs == ("down",):
                            out[wanted[e, "down"]] = t[j]
                        else:  # gate rows before up rows, as transformers fuses them
                            half = t.shape[1] // 2
                            out[wanted[e, "gate"]] = t[j, :half]
                            out[wanted[e, "up"]] = t[j, half:]
                    continue
        unmapped.append(name)
    return out, unmapped


def fisher_checkpoint(model, fisher: Mapping[str, torch.Tensor], ckpt: Checkpoint,
                      fam: MoEFamily) -> tuple[dict[str, torch.Tensor], list[str]]:
    """({checkpoint key: float32 Fisher} covering exactly the checkpoint's keys and shapes,
    checkpoint keys that are model buffers and got zeros). Raises InputDataError naming what does
    not map."""
    mapped, unmapped = to_checkpoint_layout(fisher, ckpt.keys(), fam)
    # a tied alias (lm_head.weight holding the embeddings) absent from the checkpoint is no loss:
    # the same tensor went out under the other name
    written = {id(fisher[n]) for n in fisher if n not in set(unmapped)}
    unmapped = [n for n in unmapped if id(fisher[n]) not in written]
    if unmapped:
        raise InputDataError(f"{ckpt.name}: parameters {unmapped[:5]} of the model have no tensor in the "
                             "checkpoint to hold their Fisher")
    missing = [k for k in ckpt.keys() if k not in mapped]
    zero_buffers: list[str] = []
    if missing:
        buffers = {n: torch.zeros(b.shape, dtype=torch.float32) for n, b in model.named_buffers()}
        from_buffers, _ = to_checkpoint_layout(buffers, missing, fam)
        zero_buffers = sorted(from_buffers, key=natural_key)
        mapped.update(from_buffers)
        missing = [k for k in missing if k not in mapped]
    if missing:
        raise InputDataError(f"{ckpt.name}: checkpoint tensors {missing[:5]} are neither parameters nor "
                             "buffers of the model as transformers builds it; no Fisher can be given for them")
    for key in ckpt.keys():
        if tuple(mapped[key].shape) != ckpt.tensor_shape(key):
            raise InputDataError(f"{ckpt.name}: tensor {key}: the model's parameter has shape "
                                 f"{tuple(mapped[key].shape)}, the checkpoint's {ckpt.tensor_shape(key)}")
    return mapped, zero_buffers


def _source(cfg: PipelineConfig, source_name: str):
    for src in cfg.models.sources:
        if src.name == source_name:
            return src
    raise ConfigError(f"models.sources: no source named {source_name!r} (sources: {cfg.task_names})")


def compute_source_fisher(cfg: PipelineConfig, source_name: str, out_dir: Union[str, Path],
                          device: Union[None, str, torch.device] = None, *,
                          accumulate_on: Literal["auto", "device", "cpu"] = "auto",
                          gradient_checkpointing: bool = True,
                          process_group: ProcessGroupLike = None,
                          max_shard_size: Union[int, str] = "5GB") -> dict:
    """Write ``out_dir/fisher/`` for source ``source_name`` (module docstring) and return its
    ``meta.json`` content. ``device``: where the model runs (default "auto": CUDA when present).
    With ``process_group`` every rank calls this; rank 0 writes.

    Config keys read (what a digest of the result must cover): ``models.sources.<name>.path`` and
    ``.calibration``, ``models.revision``, ``models.allow_pickle``, ``models.trust_remote_code`` and
    the calibration defaults ``calibration.{num_samples, max_length, seed, prompts_only}``; not
    ``calibration.batch_size`` (one sequence per pass by definition) and nothing of ``merge`` (the
    merge weights and epsilon apply later, so changing them reuses the Fishers)."""
    from transformers import AutoTokenizer

    from harc_hpc.models.modeling import free_memory_bytes, load_causal_lm, pick_device

    src = _source(cfg, source_name)
    data = cfg.calibration_for(source_name)  # ConfigError naming models.sources[<name>].calibration
    if accumulate_on not in ("auto", "device", "cpu"):
        raise ConfigError(f"accumulate_on must be 'auto', 'device' or 'cpu', got {accumulate_on!r}")
    reducer = as_reducer(process_group)
    device = pick_device(str(device) if device is not None else "auto")
    local = resolve_model_path(src.path, revision=cfg.models.revision)
    ckpt = Checkpoint(local, allow_pickle=cfg.models.allow_pickle, name=source_name)
    try:
        fam = family_for_config(ckpt.config)
        tokenizer = AutoTokenizer.from_pretrained(str(local), trust_remote_code=cfg.models.trust_remote_code)
        sequences = tokenize_task(data, cfg.calibration, tokenizer)
        model = load_causal_lm(local, device, trust_remote_code=cfg.models.trust_remote_code)
        compute_dtype = next(model.parameters()).dtype
        # every parameter must have a checkpoint tensor to hold its Fisher: checked before the work
        fisher_checkpoint(model, dict(model.named_parameters(remove_duplicate=False)), ckpt, fam)
        if accumulate_on == "auto":
            acc_bytes = 4 * sum(p.numel() for p in model.parameters())
            accumulate_on = ("device" if device.type == "cpu" or acc_bytes <= 0.8 * free_memory_bytes(device)
                             else "cpu")
        start, stop = shard_rows(len(sequences), reducer.rank, reducer.world_size)
        with Progress(stop - start, f"fisher {source_name} rank {reducer.rank} (sequences)") as bar:
            result: FisherResult = diagonal_fisher(model, sequences, accumulate_on=accumulate_on,
                                                   gradient_checkpointing=gradient_checkpointing,
                                                   process_group=reducer,
                                                   progress=lambda done, total: bar.update(1))
        # written tensor by tensor straight from where the accumulators are (device or host)
        tensors, zero_buffers = fisher_checkpoint(model, result.fisher, ckpt, fam)
        del model
        meta = {
            "source": source_name,
            "model": str(src.path),
            "samples": result.samples,
            "tokens": result.tokens,
            "sequences": len(sequences),
            "normalization": result.normalization,
            "dtype": "float32",
            "compute_dtype": str(compute_dtype).removeprefix("torch."),
            "world_size": reducer.world_size,
            "gradient_checkpointing": gradient_checkpointing,
            "calibration_digest": data_digest(data, cfg.calibration),
            "zero_fisher_buffers": zero_buffers,
            "tensors": len(tensors),
        }
        if reducer.rank == 0:
            _write(Path(out_dir) / FISHER_DIR, ckpt, tensors, meta, max_shard_size, ckpt.config)
        return meta
    finally:
        ckpt.close()


def _write(final: Path, ckpt: Checkpoint, tensors: Mapping[str, torch.Tensor], meta: dict,
           max_shard_size: Union[int, str], config: dict) -> None:
    keys = sorted(ckpt.keys(), key=natural_key)
    nbytes = sum(4 * tensors[k].numel() for k in keys)
    with atomic_dir(final, needed_bytes=nbytes) as tmp:
        writer = CheckpointWriter(tmp, max_shard_size)
        try:
            writer.declare([(k, torch.float32, ckpt.tensor_shape(k)) for k in keys])
            for k in keys:
                writer.add(k, tensors[k].to(torch.float32).contiguous())
            writer.finalize()
        except BaseException:
            writer.abort()
            raise
        (tmp / META_FILE).write_text(json_text(meta))
        # the source's config.json (without a quantization it no longer has) makes the directory
        # readable with harc_hpc.io.checkpoint.Checkpoint like any model
        config = {k: v for k, v in config.items() if k != "quantization_config"}
        (tmp / "config.json").write_text(json_text(config))
