"""Build an MoE of heterogeneous dense experts (MergeME §3.2) and fine-tune its projectors and router.

``build_hetero_moe(HeteroMoESpec(...))`` (``harc-hpc build-hetero-moe SPEC.yaml``):

1. **Checks, nothing written** (``plan_hetero``): every expert is a dense model of a supported
   family (an MoE is refused as such), all have the same vocabulary size and the same tokenizer
   vocabulary (token -> id), the calibration files exist and tokenize to at least one sequence of
   two tokens, and a training checkpoint left by an earlier run belongs to this spec and these
   inputs.
2. **Initial model** (``HeteroMoE.from_experts``): experts loaded with transformers and frozen,
   shared embedding / head from the zero-padded averages, projectors and router from seeded draws.
3. **Fine-tune** of the trainable parts (default: projectors and router) with next-token
   cross-entropy on the calibration sequences, AdamW, constant learning rate, optional gradient
   clipping. Batch ``s`` (1-based) holds the sequences at stream positions (s-1)B .. sB-1 of a
   stream made of seeded permutations of the data (one per epoch): a function of (seed, step)
   only. Every ``checkpoint_every`` steps and after the last, the trainable tensors, AdamW's state
   and the losses so far are written atomically (``<checkpoint_dir>/step-NNNNNNNN``); a rerun of a
   killed build resumes from the newest and ends with the same bytes as an uninterrupted run.
4. **Output**, written atomically: the wrapper (``HeteroMoE.save_pretrained``) with the training
   record; then the checkpoint directory is removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from harc_hpc.errors import RunStateError
from harc_hpc.io.atomic import atomic_dir, json_text, remove_path, sweep_stale_temporaries
from harc_hpc.io.checkpoint import Checkpoint, resolve_model_path
from harc_hpc.merge.base import MergeConfigError, MergeContext, MergeInputError
from harc_hpc.mergeme.dense import moe_evidence
from harc_hpc.mergeme.hetero_spec import HeteroMoESpec
from harc_hpc.mergeme.heterogeneous import HeteroMoE, ProjectorLayout

log = logging.getLogger(__name__)

#: dense families whose causal LM is backbone + plain linear head (no embedding scaling, logit
#: soft-capping or head bias), so the shared embedding / head can stand in for the experts' own
HETERO_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

TRAIN_STATE = "train_state.json"
TRAIN_TENSORS = "train_state.safetensors"

#: parameter-name prefixes of each trainable group
_GROUPS = {"projectors": ("proj_in.", "proj_out."), "router": ("router.",), "embedding": ("embed.",),
           "head": ("head.",)}


@dataclass
class HeteroPlan:
    spec: HeteroMoESpec
    paths: list[Path]
    configs: list[dict]
    digests: list[str]
    tokenizer_path: Path
    sequences: list[list[int]] = field(default_factory=list)
    data_digest: Optional[str] = None
    fingerprint: str = ""
    resume_step: int = 0


def _config(name: str, path: Path) -> dict:
    f = path / "config.json"
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MergeInputError(f"expert {name!r}: cannot read its config ({exc})", where=str(f)) from None


def check_expert_config(name: str, config: dict, where: str) -> None:
    """A clear error for an MoE, an unsupported family or a quantized checkpoint."""
    model_type = config.get("model_type")
    what = moe_evidence(config)
    if what is not None:
        raise MergeInputError(f"expert {name!r} is already a Mixture-of-Experts model (model_type "
                              f"{model_type!r}, {what}); heterogeneous experts are dense models "
                              f"({', '.join(HETERO_MODEL_TYPES)})", where=where)
    if model_type not in HETERO_MODEL_TYPES:
        raise MergeInputError(f"expert {name!r}: model_type {model_type!r} is not supported as a "
                              f"heterogeneous expert (supported: {', '.join(HETERO_MODEL_TYPES)})",
                              where=where)
    if config.get("quantization_config"):
        raise MergeInputError(f"expert {name!r} is quantized (quantization_config); use the "
                              f"unquantized weights", where=where)


def _tokenizer(name: str, path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types
        raise MergeInputError(f"expert {name!r}: its tokenizer cannot be loaded ({type(exc).__name__}: "
                              f"{exc}); every expert must ship the shared tokenizer", where=str(path)) from None


def _check_tokenizers(spec: HeteroMoESpec, paths: list[Path], configs: list[dict]):
    names = spec.expert_names
    ref = names.index(spec.tokenizer_expert)
    for name, path, cfg in zip(names, paths, configs):
        if cfg.get("vocab_size") != configs[ref].get("vocab_size"):
            raise MergeInputError(f"experts {names[ref]!r} and {name!r} have different vocabularies: "
                                  f"vocab_size {configs[ref].get('vocab_size')} vs {cfg.get('vocab_size')}; "
                                  f"heterogeneous experts must share one tokenizer", where=str(path / "config.json"))
    toks = [_tokenizer(n, p) for n, p in zip(names, paths)]
    ref_vocab = toks[ref].get_vocab()
    for name, path, tok in zip(names, paths, toks):
        vocab = tok.get_vocab()
        if vocab != ref_vocab:
            diff = sorted(set(vocab.items()) ^ set(ref_vocab.items()), key=repr)[:3]
            raise MergeInputError(f"experts {names[ref]!r} and {name!r} have different tokenizers "
                                  f"({len(ref_vocab)} vs {len(vocab)} tokens; differing entries e.g. "
                                  f"{diff}); heterogeneous experts must share one tokenizer",
                                  where=str(path))
    return toks[ref]


def _training_sequences(spec: HeteroMoESpec, tokenizer) -> list[list[int]]:
    from harc_hpc.config import CalibrationSection
    from harc_hpc.io.calibration_data import CalibrationDataError, tokenize_task

    try:
        seqs = tokenize_task(spec.train.data, CalibrationSection(), tokenizer)
    except CalibrationDataError as exc:
        raise type(exc)(f"train.data: {exc}") from None
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise MergeInputError("train.data: no sequence has two tokens or more; nothing to train on",
                              where=", ".join(map(str, spec.train.data.files)))
    return seqs


def _fingerprint(spec: HeteroMoESpec, digests: list[str], data_digest: Optional[str]) -> str:
    """What the training result depends on: settings (not where things are written), the experts'
    content and the tokenized data."""
    settings = _settings_record(spec)
    settings.pop("experts_storage", None)
    settings["train"].pop("checkpoint_every", None)
    payload = {"settings": settings, "experts": digests, "data": data_digest}
    return "sha256:" + hashlib.sha256(json_text(payload).encode()).hexdigest()


def _settings_record(spec: HeteroMoESpec) -> dict:
    return spec.model_dump(mode="json", exclude={"output": True, "overwrite": True,
                                                 "experts": {"__all__": {"path"}},
                                                 "train": {"checkpoint_dir"}})


def _latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    if not ckpt_dir.is_dir():
        return None
    steps = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir() and (p / TRAIN_STATE).is_file())
    return steps[-1] if steps else None


def plan_hetero(spec: HeteroMoESpec) -> HeteroPlan:
    """Every check of the inputs and settings; reads, writes nothing."""
    out = Path(spec.output)
    if out.exists() and not spec.overwrite:
        raise MergeConfigError("the output directory exists; remove it or set overwrite: true", where=str(out))
    paths, configs = [], []
    for e in spec.experts:
        try:
            path = resolve_model_path(e.path, revision=spec.revision)
        except Exception as exc:  # CheckpointError and hub errors: name the expert
            raise MergeInputError(f"expert {e.name!r}: {exc}", where=e.path) from None
        cfg = _config(e.name, path)
        check_expert_config(e.name, cfg, str(path / "config.json"))
        paths.append(path)
        configs.append(cfg)
    tokenizer = _check_tokenizers(spec, paths, configs)
    digests = [Checkpoint(p, name=n).digest() for n, p in zip(spec.expert_names, paths)]
    tok_path = paths[spec.expert_names.index(spec.tokenizer_expert)]
    plan = HeteroPlan(spec, paths, configs, digests, tok_path)
    if spec.train.steps > 0:
        plan.sequences = _training_sequences(spec, tokenizer)
        plan.data_digest = "sha256:" + hashlib.sha256(json.dumps(plan.sequences).encode()).hexdigest()
    plan.fingerprint = _fingerprint(spec, digests, plan.data_digest)
    latest = _latest_checkpoint(spec.checkpoint_dir)
    if latest is not None:
        state = json.loads((latest / TRAIN_STATE).read_text())
        if state.get("fingerprint") != plan.fingerprint:
            raise RunStateError("a training checkpoint of another spec or other inputs is there; remove "
                                "it to start over, or point train.checkpoint_dir elsewhere", where=str(latest))
        plan.resume_step = int(state["step"])
    return plan


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def trainable_names(model: HeteroMoE, groups) -> list[str]:
    prefixes = tuple(p for g in groups for p in _GROUPS[g])
    return [n for n in model.wrapper_parameters() if n.startswith(prefixes)]


def batch_indices(num_sequences: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Sequence indices of batch ``step`` (1-based): positions (step-1)B .. stepB-1 of the stream
    of per-epoch permutations, each drawn from a generator seeded by (seed, epoch)."""
    ctx = MergeContext(seed=seed)
    out, perms = [], {}
    for pos in range((step - 1) * batch_size, step * batch_size):
        epoch, i = divmod(pos, num_sequences)
        if epoch not in perms:
            perms[epoch] = torch.randperm(num_sequences, generator=ctx.generator(f"train-data-epoch-{epoch}", 0))
        out.append(int(perms[epoch][i]))
    return out


def collate(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask."""
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1
    return ids, mask


def lm_loss(model: HeteroMoE, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the real (unpadded) target tokens."""
    logits = model(ids, mask)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             targets.reshape(-1), ignore_index=-100)


def _optimizer(params: list[torch.nn.Parameter], spec: HeteroMoESpec) -> torch.optim.AdamW:
    t = spec.train
    return torch.optim.AdamW(params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay,
                             foreach=False)


def _save_train_state(ckpt_dir: Path, step: int, model: HeteroMoE, names: list[str],
                      opt: torch.optim.Optimizer, fingerprint: str, losses: list[float]) -> None:
    from safetensors.torch import save_file

    params = model.wrapper_parameters()
    tensors = {f"param.{n}": params[n].detach().contiguous() for n in names}
    state = opt.state_dict()["state"]
    for i, n in enumerate(names):
        for key, value in state.get(i, {}).items():
            tensors[f"adam.{n}.{key}"] = value.detach().contiguous()
    final = ckpt_dir / f"step-{step:08d}"
    with atomic_dir(final) as tmp:
        save_file(tensors, str(tmp / TRAIN_TENSORS))
        (tmp / TRAIN_STATE).write_text(json_text({"fingerprint": fingerprint, "step": step, "losses": losses}))
    for old in ckpt_dir.glob("step-*"):
        if old.name != final.name:
            remove_path(old)


def _load_train_state(path: Path, model: HeteroMoE, names: list[str], opt: torch.optim.Optimizer) -> list[float]:
    from safetensors.torch import load_file

    tensors = load_file(str(path / TRAIN_TENSORS))
    params = model.wrapper_parameters()
    with torch.no_grad():
        for n in names:
            params[n].copy_(tensors[f"param.{n}"])
    state = {}
    for i, n in enumerate(names):
        prefix = f"adam.{n}."
        entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if entry:
            state[i] = entry
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return list(json.loads((path / TRAIN_STATE).read_text())["losses"])


def train_hetero(model: HeteroMoE, plan: HeteroPlan,
                 after_step: Optional[Callable[[int], None]] = None) -> list[float]:
    """Fine-tune ``model``'s trainable parts (spec.train); returns the loss of every step.
    ``after_step(step)`` runs after each step and its checkpoint (a test hook: raising there
    simulates a kill)."""
    spec = plan.spec
    t = spec.train
    names = trainable_names(model, t.trainable)
    if spec.top_k == 1 and "router" in t.trainable:
        # alpha = softmax of a single logit = 1 whatever the router: cross-entropy gives it no gradient
        log.warning("top_k 1: the router receives no gradient (the softmax of one logit is 1); it keeps "
                    "its initialisation and only selects the expert")
    for n, p in model.wrapper_parameters().items():
        p.requires_grad_(n in names)
    params = model.wrapper_parameters()
    opt = _optimizer([params[n] for n in names], spec)
    ckpt_dir = spec.checkpoint_dir
    sweep_stale_temporaries(ckpt_dir)
    losses: list[float] = []
    if plan.resume_step:
        latest = _latest_checkpoint(ckpt_dir)
        losses = _load_train_state(latest, model, names, opt)
        log.info("resuming the fine-tune at step %d of %d from %s", plan.resume_step + 1, t.steps, latest)
    model.train()
    for step in range(plan.resume_step + 1, t.steps + 1):
        idx = batch_indices(len(plan.sequences), step, t.batch_size, spec.seed)
        ids, mask = collate([plan.sequences[i] for i in idx])
        loss = lm_loss(model, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([params[n] for n in names], t.max_grad_norm, foreach=False)
        opt.step()
        losses.append(float(loss.detach()))
        if step % t.checkpoint_every == 0 or step == t.steps:
            _save_train_state(ckpt_dir, step, model, names, opt, plan.fingerprint, losses)
            log.info("fine-tune step %d/%d: loss %.4f (checkpoint written)", step, t.steps, losses[-1])
        if after_step is not None:
            after_step(step)
    model.eval()
    for p in model.wrapper_parameters().values():
        p.requires_grad_(True)
    return losses


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------

def initial_model(plan: HeteroPlan) -> HeteroMoE:
    spec = plan.spec
    p = spec.projector
    return HeteroMoE.from_experts(spec.expert_names, plan.paths, top_k=spec.top_k,
                                  projector_layout=ProjectorLayout(p.layers, p.hidden_size, p.activation),
                                  projector_init=p.init, router_init=spec.router.init,
                                  router_std=spec.router.std, seed=spec.seed, dtype=spec.dtype,
                                  digests=plan.digests)


def build_hetero_moe(spec: HeteroMoESpec, after_step: Optional[Callable[[int], None]] = None) -> dict:
    """Check, build, fine-tune and write the heterogeneous MoE of ``spec``; returns a summary.
    ``after_step``: test hook, see ``train_hetero``."""
    from harc_hpc import package_versions

    t0 = time.perf_counter()
    plan = plan_hetero(spec)
    resumed_from = plan.resume_step
    model = initial_model(plan)
    losses = train_hetero(model, plan, after_step) if spec.train.steps > 0 else []
    record = {
        "build": {
            "settings": _settings_record(spec),
            "fingerprint": plan.fingerprint,
            "tokenizer_expert": spec.tokenizer_expert,
            "train": {"steps": spec.train.steps, "losses": losses, "data_digest": plan.data_digest,
                      "sequences": len(plan.sequences), "tokens": sum(len(s) for s in plan.sequences),
                      "trainable": trainable_names(model, spec.train.trainable)},
            "versions": {"python": platform.python_version(),
                         **package_versions(("harc-hpc", "torch", "transformers", "safetensors"))},
        },
    }
    out = Path(spec.output)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, experts_storage=spec.experts_storage, extra_record=record,
                              tokenizer_from=plan.tokenizer_path)
    remove_path(spec.checkpoint_dir)
    summary = {"output": str(out), "experts": spec.expert_names,
               "expert_hidden_sizes": [e.hidden_size for e in model.layout.experts],
               "hidden_size": model.layout.hidden_size, "top_k": spec.top_k, "steps": spec.train.steps,
               "resumed_from_step": resumed_from, "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None, "experts_storage": spec.experts_storage,
               "seconds": round(time.perf_counter() - t0, 3)}
    log.info("built a heterogeneous MoE of %s in %.1f s", spec.expert_names, summary["seconds"])
    return summary
