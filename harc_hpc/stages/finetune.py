"""finetune: post-merge SFT (docs/training.md) of the merged model and/or HARC's calibrated model on
the calibration data of every task, the paper's Table 7 setting; or, with ``finetune.objective:
output_kl``, distillation of each source's next-token distribution on its own task's sequences
(with ``params: routers``: router-only distillation end to end, router-distill's end-to-end variant).

Next-token cross-entropy over the tokens the calibration mode selects (mean over a step's tokens),
AdamW on the parameters ``finetune.params`` selects (all, the routers, the experts, or all but the
experts), a linear warm-up of ``warmup_steps`` then a constant or linearly decaying learning rate,
gradient clipping. The batches are a seeded shuffle of every task's sequences, epoch after epoch,
a function of the step number alone, so a resumed run sees the batches an uninterrupted one sees.

Every ``checkpoint_every`` steps the trained parameters and AdamW's state are written (safetensors)
to ``partial/finetune-<start>/`` with a manifest naming the task's digest and the step; a killed task
rerun with the same digest resumes after that step and ends with the same bytes (CPU, same threads:
tested), one with another digest starts over and says why. A loss that is not finite stops the task
naming the step; the last good checkpoint stays.

Data-parallel: run with a ``process_group`` (``executor.stages.finetune.tasks_per_node``, a
distributed task), each rank takes its share of each step's sequences, the gradients are summed
over the ranks (each rank's loss is its tokens' NLL over the step's token count on all ranks), so
every rank takes the same step as one process would (to float rounding: tested with two gloo ranks);
rank 0 writes. ``finetune.sharding``: ``ddp`` (default) keeps the whole model on every rank and
all-reduces the gradients by hand (DDP's algorithm, every trained parameter reduced even when a
rank's share did not reach it); ``fsdp`` shards the parameters, gradients and AdamW's state over the
ranks with torch's FSDP2 (``fully_shard`` per decoder layer and on the root; float32 master weights,
``finetune.dtype`` as the compute dtype), checkpoints and the written model gathered to rank 0.
Both are tested with two gloo ranks on CPU against one process; FSDP on GPUs (NCCL, bfloat16) is not
tested here.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from harc_hpc.config import PipelineConfig
from harc_hpc.errors import InputDataError, UsageError
from harc_hpc.progress import Progress
from harc_hpc.stages import layout

log = logging.getLogger(__name__)

#: the display names of the fine-tuned models, by start (objective sft)
MODEL_NAMES = {"merged": "sft", "harc": "harc+sft"}


def model_name(start: str, objective: str = "sft") -> str:
    """The report's name of a fine-tuned model: sft / harc+sft, or output-kl / harc+output-kl."""
    return MODEL_NAMES[start] if objective == "sft" else MODEL_NAMES[start].replace("sft", "output-kl")


def enabled(cfg: PipelineConfig) -> bool:
    """The stage spec's ``enabled_if``: planned only when ``finetune.enabled``."""
    return bool(cfg.finetune.enabled)


def models_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "finetune" / "models"


def partial_dir(run_dir: Path, start: str) -> Path:
    return Path(run_dir) / "partial" / f"finetune-{start}"


def start_dir(run_dir: Path, start: str) -> Path:
    return layout.merged_dir(run_dir) if start == "merged" else layout.model_dir(run_dir)


# -- what trains --------------------------------------------------------------------------------------

def trainable_names(model, fam, layers: list[int], params: str) -> list[str]:
    """The names of the parameters ``finetune.params`` selects, in the model's order."""
    named = list(model.named_parameters())
    if params == "all":
        return [n for n, _ in named]
    experts = {n for n, _ in named if ".experts." in n or n.endswith(".experts")}
    if params == "experts":
        return [n for n, _ in named if n in experts]
    if params == "non-expert":
        return [n for n, _ in named if n not in experts]
    routers = set()
    for l in layers:
        module = fam.router_module(model, l)
        routers |= {id(p) for p in module.parameters(recurse=False)}
    return [n for n, p in named if id(p) in routers]


# -- data ---------------------------------------------------------------------------------------------

@dataclass
class Sequences:
    ids: list[list[int]]
    masks: list[list[bool]]  # per token: whether the calibration mode selects it
    tasks: Optional[list[str]] = None  # the task (source) of each sequence (objective output_kl)


def load_sequences(cfg: PipelineConfig, tokenizer) -> Sequences:
    """Every task's calibration sequences (tokenised as the capture tokenises them), cut to
    ``finetune.seq_length``; sequences with nothing to predict are dropped."""
    from harc_hpc.io.calibration_data import tokenize_task_masked

    ids, masks, tasks = [], [], []
    for task in cfg.task_names:
        seqs, m = tokenize_task_masked(cfg.calibration_for(task), cfg.calibration, tokenizer)
        for s, k in zip(seqs, m):
            s, k = s[: cfg.finetune.seq_length], k[: cfg.finetune.seq_length]
            if len(s) >= 2 and any(k[1:]):
                ids.append(list(s))
                masks.append(list(k))
                tasks.append(task)
    return Sequences(ids, masks, tasks)


def batch_indices(num_sequences: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The sequences of step ``step`` (1-based): consecutive slices of seeded permutations, one per
    epoch, an epoch's remainder dropped; a function of the step alone (resumable)."""
    per_epoch = num_sequences // batch_size
    epoch, slot = divmod(step - 1, per_epoch)
    perm = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[slot * batch_size: (slot + 1) * batch_size].tolist()


def lr_at(step: int, fc) -> float:
    """The learning rate of step ``step`` (1-based): linear warm-up to ``lr`` over ``warmup_steps``,
    then ``lr`` (constant) or a linear decay from ``lr`` to ``lr / n`` at the last of the n steps after it."""
    if step <= fc.warmup_steps:
        return fc.lr * step / fc.warmup_steps
    if fc.schedule == "constant":
        return fc.lr
    return fc.lr * (fc.steps - step + 1) / (fc.steps - fc.warmup_steps)


def _pad(seqs: list[list[int]], masks: list[list[bool]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and the mask of the targets that count (B, T - 1)."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    att = torch.zeros(len(seqs), width, dtype=torch.long)
    tgt = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
        tgt[i, : len(s)] = torch.tensor(m)
    return ids.to(device), att.to(device), tgt[:, 1:].to(device)


def step_loss(model, seqs: list[list[int]], masks: list[list[bool]], total_tokens: int, device) -> tuple[torch.Tensor, int]:
    """Sum of the next-token NLL of the selected targets over ``total_tokens`` (the step's count on
    every rank), and this share's target count."""
    ids, att, tgt = _pad(seqs, masks, device)
    logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                            reduction="none").reshape(tgt.shape)
    return (nll * tgt).sum() / total_tokens, int(tgt.sum())


def step_output_kl(model, teacher, seqs: list[list[int]], masks: list[list[bool]], total_tokens: int,
                   device) -> torch.Tensor:
    """Sum over the selected targets of KL(teacher's next-token distribution || the model's), over
    ``total_tokens``: the end-to-end output KL to the source model (objective ``output_kl``)."""
    ids, att, tgt = _pad(seqs, masks, device)
    with torch.no_grad():
        ref = torch.log_softmax(teacher(input_ids=ids, attention_mask=att, use_cache=False).logits[:, :-1].float(), -1)
    log_q = torch.log_softmax(model(input_ids=ids, attention_mask=att, use_cache=False).logits[:, :-1].float(), -1)
    kl = (ref.exp() * (ref - log_q)).sum(-1)
    return (kl * tgt).sum() / total_tokens


# -- checkpoints --------------------------------------------------------------------------------------

def _full(t: torch.Tensor) -> torch.Tensor:
    """A tensor whole on this process's CPU: a sharded (DTensor) one gathered from every rank
    (a collective: every rank calls it)."""
    t = torch.as_tensor(t).detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.cpu().contiguous()


def state_tensors(model, names: list[str], opt) -> dict[str, torch.Tensor]:
    """The trained parameters and AdamW's state, whole (gathered when sharded: every rank calls it),
    under the checkpoint's names."""
    params = dict(model.named_parameters())
    tensors = {f"param.{n}": _full(params[n]) for n in names}
    for n in names:
        for key, value in opt.state.get(params[n], {}).items():
            tensors[f"opt.{key}.{n}"] = _full(value)
    return tensors


def _save_checkpoint(path: Path, digest: Optional[str], step: int, model, names: list[str], opt,
                     losses: list, tensors: Optional[dict] = None) -> None:
    """The trained parameters and AdamW's state after ``step`` (``state-<step>.safetensors``), then
    the manifest naming that file, the task digest and the losses so far; a kill at any point leaves
    the previous manifest and the file it names."""
    from safetensors.torch import save_file

    from harc_hpc.io.atomic import atomic_path, write_json_atomic

    if tensors is None:
        tensors = state_tensors(model, names, opt)
    path.mkdir(parents=True, exist_ok=True)
    state = path / f"state-{step:07d}.safetensors"
    with atomic_path(state) as tmp:
        save_file(tensors, str(tmp))
    write_json_atomic(path / "manifest.json", {"digest": digest, "step": step, "state": state.name, "losses": losses})
    for old in path.glob("state-*.safetensors"):  # only the newest is ever resumed from
        if old.name != state.name:
            old.unlink(missing_ok=True)


def _load_checkpoint(path: Path, digest: Optional[str], model, names: list[str], opt
                     ) -> tuple[int, list, Optional[str], Optional[Path]]:
    """(the step to resume after, the losses so far, why a checkpoint there was not used, the state
    file loaded); (0, [], None, None) when there is none."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return 0, [], None, None
    try:
        m = json.loads(manifest.read_text())
    except ValueError:
        return 0, [], f"{manifest} is unreadable", None
    if digest is None or m.get("digest") != digest:
        return 0, [], (f"it was written by a task of digest {str(m.get('digest'))[:12]}, this task's is "
                       f"{str(digest)[:12]} (the config or an upstream result changed)"), None
    state_file = path / str(m.get("state"))
    if not state_file.is_file():
        return 0, [], f"{state_file} is missing", None
    why = _load_state(state_file, model, names, opt)
    if why:
        return 0, [], why, None
    return int(m["step"]), list(m.get("losses", [])), None, state_file


def _load_state(state_file: Path, model, names: list[str], opt) -> Optional[str]:
    """Put a checkpoint's parameters and AdamW state in place; why not, when it does not fit."""
    from safetensors.torch import load_file

    t = load_file(str(state_file))
    params = dict(model.named_parameters())
    if {k[len("param."):] for k in t if k.startswith("param.")} != set(names):
        return "it holds other parameters than finetune.params selects"
    with torch.no_grad():
        for n in names:
            params[n].copy_(_like(t[f"param.{n}"], params[n]))
    for n in names:
        st = {key: t[f"opt.{key}.{n}"] for key in ("step", "exp_avg", "exp_avg_sq") if f"opt.{key}.{n}" in t}
        if st:
            opt.state[params[n]] = {k: (v.clone() if k == "step" else _like(v, params[n]).clone()) for k, v in st.items()}
    return None


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor placed as ``param`` is: on its device, and sharded as it is when it is a DTensor
    (this rank's shard cut locally, no communication)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.device_mesh.device_type), param.device_mesh, param.placements,
                                 src_data_rank=None)
    return full.to(param.device)


# -- sharding (finetune.sharding: fsdp) -------------------------------------------------------------------

def shard(model, process_group, device: torch.device, dtype: torch.dtype) -> None:
    """FSDP2 over ``process_group``: ``fully_shard`` on every decoder layer (the model's
    ``_no_split_modules`` classes) and on the root; the parameters stay in their dtype (float32 master
    weights) and compute in ``dtype`` when it is narrower, gradients reduced in float32."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = DeviceMesh.from_group(process_group, device.type)
    master = next(model.parameters()).dtype
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != master \
        else MixedPrecisionPolicy()
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict whole on this process's CPU, gathered when sharded (a collective
    then: every rank calls it)."""
    return {k: _full(v) for k, v in model.state_dict().items()}


# -- training -----------------------------------------------------------------------------------------

def train(cfg: PipelineConfig, model, names: list[str], data: Sequences, device, *, where: str,
          checkpoint: Optional[Path] = None, digest: Optional[str] = None, process_group=None,
          teachers: Optional[dict] = None) -> dict:
    """``finetune.steps`` AdamW steps on ``names`` (resuming from ``checkpoint`` when it holds this
    digest's state); returns the losses and what was resumed."""
    fc = cfg.finetune
    rank, world = 0, 1
    if process_group is not None:
        import torch.distributed as dist

        rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    sharded = process_group is not None and fc.sharding == "fsdp"
    for n, p in model.named_parameters():
        p.requires_grad_(n in set(names))
    if sharded:
        shard(model, process_group, device, compute_dtype(fc.dtype, device))
    params = dict(model.named_parameters())
    trained = [params[n] for n in names]
    opt = torch.optim.AdamW(trained, lr=fc.lr, betas=tuple(fc.betas), eps=fc.eps, weight_decay=fc.weight_decay,
                            foreach=False)
    first, losses, discarded, state = 0, [], None, None
    if checkpoint is not None and rank == 0:  # rank 0 decides (only it is given the task's digest) ...
        first, losses, discarded, state = _load_checkpoint(checkpoint, digest, model, names, opt)
    if world > 1:  # ... and the other ranks resume from the state it resumed from
        import torch.distributed as dist

        box = [first, losses, None if state is None else str(state)]
        dist.broadcast_object_list(box, src=dist.get_global_rank(process_group, 0), group=process_group)
        first, losses = box[0], box[1]
        if rank != 0 and first:
            why = _load_state(Path(box[2]), model, names, opt)
            if why:
                raise InputDataError(f"rank {rank} cannot resume from {box[2]}: {why}", where=where)
    if checkpoint is not None and rank == 0:
        if discarded:
            log.warning("%s: the checkpoint in %s is not resumed: %s; training starts over", where, checkpoint, discarded)
        elif first:
            log.info("%s: resuming after step %d (checkpoint in %s)", where, first, checkpoint)
    if fc.gradient_checkpointing:
        _checkpointing(model, True)
    model.train()
    with Progress(fc.steps - first, f"{where} (steps)") as bar:
        for step in range(first + 1, fc.steps + 1):
            torch.manual_seed(fc.seed * 1_000_003 + step)  # dropout, if a model has any: a function of the step
            idx = batch_indices(len(data.ids), fc.batch_size, step, fc.seed)
            total = sum(sum(data.masks[i][1:]) for i in idx)
            mine = idx[rank::world]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, fc)
            opt.zero_grad(set_to_none=True)
            # FSDP averages the ranks' gradients where these losses want them summed; and every rank
            # runs the same forwards and backwards (its collectives), an empty share as a zero loss
            scale = float(world) if sharded else 1.0
            if fc.objective == "output_kl":
                # each source teaches its own task's sequences: one forward and backward per task
                loss = torch.zeros((), device=device)
                for task in dict.fromkeys(data.tasks[i] for i in (idx if sharded else mine)):
                    part = [i for i in mine if data.tasks[i] == task]
                    if not part and not sharded:
                        continue
                    seqs, masks = ([data.ids[i] for i in part], [data.masks[i] for i in part]) if part else _EMPTY
                    kl = step_output_kl(model, teachers[task], seqs, masks, total, device)
                    (kl * scale).backward()
                    loss = loss + kl.detach()
            elif mine or sharded:
                seqs, masks = ([data.ids[i] for i in mine], [data.masks[i] for i in mine]) if mine else _EMPTY
                loss, _ = step_loss(model, seqs, masks, total, device)
                (loss * scale).backward()
            else:
                loss = torch.zeros((), device=device)
            for p in trained:  # a parameter this share did not reach still takes part in the reduction
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            bad = not all(bool(torch.isfinite(_local(p.grad)).all()) for p in trained)
            if world > 1:
                import torch.distributed as dist

                if not sharded:
                    for p in trained:
                        dist.all_reduce(p.grad, group=process_group)
                summed = torch.stack([loss.detach().float().reshape(()), torch.tensor(float(bad), device=device)])
                dist.all_reduce(summed, group=process_group)
                value, bad = float(summed[0]), bool(summed[1] > 0)
            else:
                value = float(loss.detach())
            if not math.isfinite(value) or bad:
                kept = f"; the last good checkpoint (step {_checkpoint_step(checkpoint)}) stays in {checkpoint}" \
                    if checkpoint is not None and _checkpoint_step(checkpoint) else ""
                raise InputDataError(f"the training loss is {value} at step {step}{kept}", where=where,
                                     hint="lower finetune.lr, or set finetune.grad_clip")
            if fc.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(trained, fc.grad_clip, foreach=False)
            opt.step()
            losses.append([step, value])
            bar.update(1, f"loss {value:.4f}")
            if checkpoint is not None and (step % fc.checkpoint_every == 0 or step == fc.steps):
                # the last step too: a task killed while training a later start does not redo this one
                tensors = state_tensors(model, names, opt) if sharded else None  # gathered by every rank
                if rank == 0:
                    _save_checkpoint(checkpoint, digest, step, model, names, opt, losses, tensors=tensors)
    model.eval()
    if fc.gradient_checkpointing:
        _checkpointing(model, False)
    return {"losses": losses, "resumed_after_step": first, "discarded_checkpoint": discarded}


#: an empty share of a step under FSDP: one token pair that counts for nothing
_EMPTY = ([[0, 0]], [[False, False]])


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (a DTensor's local shard, else the tensor)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _checkpointing(model, on: bool) -> None:
    """Activation (gradient) checkpointing on or off: transformers' own, under its v5 name when it has it."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _checkpoint_step(path: Optional[Path]) -> int:
    try:
        return int(json.loads((Path(path) / "manifest.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)


def run(cfg: PipelineConfig, run_dir: Path, task_digest: Optional[str] = None, process_group=None) -> dict:
    """Fine-tune every start of ``finetune.starts`` and write ``finetune/models/<start>/`` (a normal
    model directory) and ``finetune/models/summary.json``."""
    from transformers import AutoTokenizer

    from harc_hpc.io.atomic import atomic_dir, json_text, remove_path
    from harc_hpc.io.checkpoint_writer import copy_model_files
    from harc_hpc.models.modeling import load_causal_lm, pick_device

    run_dir = Path(run_dir)
    fc = cfg.finetune
    t0 = time.perf_counter()
    rank, world = 0, 1
    if process_group is not None:
        import torch.distributed as dist

        rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    device = pick_device(cfg.harc.device)
    dtype = compute_dtype(fc.dtype, device)
    sharded = process_group is not None and fc.sharding == "fsdp"
    fam = layout.family(cfg)
    layers = layout.moe_layers(cfg)
    summary = {"settings": fc.model_dump(mode="json", exclude={"enabled"}), "device": str(device),
               "dtype": str(dtype).replace("torch.", ""), "ranks": world, "starts": {}}
    trained_models = {}
    teachers = None
    for start in fc.starts:
        src = start_dir(run_dir, start)
        where = f"finetune start {start}"
        tokenizer = AutoTokenizer.from_pretrained(str(src), trust_remote_code=cfg.models.trust_remote_code)
        data = load_sequences(cfg, tokenizer)
        if len(data.ids) < fc.batch_size:
            raise InputDataError(f"{len(data.ids)} calibration sequences with a target, fewer than one batch",
                                 where="finetune.batch_size", hint="lower finetune.batch_size or add calibration data")
        # FSDP: float32 master weights loaded on the host, each rank's shard moved to its device by
        # fully_shard; finetune.dtype is the compute dtype there
        model = load_causal_lm(src, torch.device("cpu"), dtype=torch.float32,
                               trust_remote_code=cfg.models.trust_remote_code) if sharded else \
            load_causal_lm(src, device, dtype=dtype, trust_remote_code=cfg.models.trust_remote_code)
        if fc.objective == "output_kl" and teachers is None:  # the sources, loaded once for every start
            from harc_hpc.io.checkpoint import resolve_model_path

            teachers = {t: load_causal_lm(resolve_model_path(layout.source_path(cfg, t), revision=cfg.models.revision),
                                          device, dtype=dtype, trust_remote_code=cfg.models.trust_remote_code)
                        for t in cfg.task_names}
        names = trainable_names(model, fam, layers, fc.params)
        if not names:
            raise UsageError(f"selects no parameter of this {fam.name} model", where=f"finetune.params: {fc.params}",
                             hint="choose all, routers, experts or non-expert")
        n_params = sum(dict(model.named_parameters())[n].numel() for n in names)
        s0 = time.perf_counter()
        result = train(cfg, model, names, data, device, where=where, checkpoint=partial_dir(run_dir, start),
                       digest=task_digest, process_group=process_group, teachers=teachers)
        # sharded: the whole state gathered now, by every rank, written by rank 0 in the model's dtype
        trained_models[start] = (model, {k: v.to(dtype) if v.is_floating_point() else v
                                         for k, v in full_state_dict(model).items()} if sharded else None)
        summary["starts"][start] = {
            "model": model_name(start, fc.objective), "objective": fc.objective, "trainable_parameters": int(n_params), "sequences": len(data.ids),
            "tokens_per_epoch": int(sum(sum(m[1:]) for m in data.masks)),
            "seconds": round(time.perf_counter() - s0, 3), **result}
        if rank != 0:
            del trained_models[start]
    if rank == 0:
        with atomic_dir(models_dir(run_dir)) as tmp:
            for start, (model, state) in trained_models.items():
                save_model(model, tmp / start, cfg.merge.max_shard_size, state)
                # the tokenizer (and the config as the start has it) go with the weights
                copy_model_files(start_dir(run_dir, start), tmp / start,
                                 names=[n for n in _tokenizer_files(start_dir(run_dir, start))])
            summary["seconds"] = round(time.perf_counter() - t0, 3)
            (tmp / "summary.json").write_text(json_text(summary))
        for start in fc.starts:
            remove_path(partial_dir(run_dir, start))  # done: nothing left to resume
    return {"starts": list(fc.starts), "seconds": round(time.perf_counter() - t0, 3),
            **{f"final_loss_{s}": v["losses"][-1][1] if v["losses"] else None for s, v in summary["starts"].items()}}


def save_model(model, path: Path, max_shard_size, state: Optional[dict] = None) -> None:
    """transformers' ``save_pretrained`` of the trained model: its own weights, or ``state`` (a sharded
    model's gathered state dict)."""
    if state is None:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(path, max_shard_size=max_shard_size, state_dict=state)


def _tokenizer_files(src: Path) -> list[str]:
    return sorted(p.name for p in Path(src).iterdir()
                  if p.is_file() and (p.name.startswith("tokenizer") or p.name in ("special_tokens_map.json",
                                                                                  "vocab.json", "merges.txt")))
