"""Pre-training and fine-tuning of the tiny demo MoE on CPU, reproducibly.

Reproducibility: the model is initialised from a seeded global RNG, batches are fixed lists of
windows made by seeded generators, and the caller pins the number of intra-op threads (CPU
reductions are deterministic for a fixed thread count, not across thread counts). Nothing in the
loop draws random numbers (no dropout, no router jitter), so two builds of one recipe produce the
same bytes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from harc_hpc.demo.tokenizer import VOCAB_SIZE, encode


def olmoe_config(recipe):
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.expert_intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        num_experts=recipe.num_experts,
        num_experts_per_tok=recipe.top_k,
        norm_topk_prob=False,
        router_aux_loss_coef=recipe.aux_loss_coef,
        max_position_embeddings=max(256, recipe.seq_len),
        tie_word_embeddings=False,
        # The default ids (50279, ...) lie outside a 128-token vocabulary.
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )


def new_model(recipe, seed: int):
    from transformers import OlmoeForCausalLM

    torch.manual_seed(seed)
    model = OlmoeForCausalLM(olmoe_config(recipe))
    return model


def is_router_param(name: str) -> bool:
    return name.endswith("mlp.gate.weight")


def expert_share(recipe, domain: str) -> list[int]:
    """The experts a domain's fine-tune owns under ``finetune_scope: own_experts``: the domains split
    the experts into equal consecutive blocks, in the recipe's domain order."""
    n = len(recipe.domains)
    i = list(recipe.domains).index(domain)
    per = recipe.num_experts // n
    if per < 1:
        raise ValueError(f"{recipe.num_experts} experts cannot be shared among {n} domains")
    return list(range(i * per, (i + 1) * per))


def restrict_finetune(model, recipe, domain: str) -> dict:
    """Freeze what a domain fine-tune must not change (``recipe.finetune_scope``); returns what stays
    trainable. Expert tensors are fused (E, ...) in transformers 5, so the other experts' slices are
    held by zeroing their gradient rows: with AdamW and no weight decay a slice whose gradient is
    always zero never moves (its moments stay zero)."""
    if recipe.finetune_scope == "all":
        return {"scope": "all"}
    if recipe.finetune_scope != "own_experts":
        raise ValueError(f"unknown finetune_scope {recipe.finetune_scope!r} (all, own_experts)")
    own = expert_share(recipe, domain)
    keep = torch.zeros(recipe.num_experts, dtype=torch.bool)
    keep[own] = True
    handles = []
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            if p.shape[0] != recipe.num_experts:
                raise ValueError(f"{name}: expected the experts on dim 0, shape {tuple(p.shape)}")
            mask = keep.view(-1, *([1] * (p.dim() - 1)))
            handles.append(p.register_hook(lambda g, m=mask: g * m.to(g.dtype)))
        elif not is_router_param(name):
            p.requires_grad_(False)
    model._finetune_hooks = handles
    return {"scope": "own_experts", "experts": own}


def release_restrictions(model) -> None:
    for h in getattr(model, "_finetune_hooks", []):
        h.remove()
    model._finetune_hooks = []
    for p in model.parameters():
        p.requires_grad_(True)


def windows_to_batches(windows: list[str], batch_size: int) -> list[torch.Tensor]:
    ids = torch.tensor([encode(w) for w in windows], dtype=torch.long)
    return [ids[i : i + batch_size] for i in range(0, len(ids) - batch_size + 1, batch_size)]


def lr_factor(step: int, total: int, warmup_frac: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    warmup = max(1, int(round(total * warmup_frac)))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainLog:
    steps: int
    seconds: float
    first_loss: float
    last_loss: float  # mean CE (without the aux term) of the last 10% of steps
    last_aux: float


def train(model, batches: list[torch.Tensor], lr: float, router_lr_mult: float, warmup_frac: float,
          progress: Optional[Callable[[str], None]] = None, label: str = "") -> TrainLog:
    """AdamW (0.9, 0.95), no weight decay, grad clip 1.0, CE + aux load-balancing loss."""
    model.train()
    # a dense model (the MergeME demo's experts) has no routers and no auxiliary loss
    moe = hasattr(model.config, "router_aux_loss_coef")
    if moe:
        model.config.output_router_logits = True
    routers = [p for n, p in model.named_parameters() if is_router_param(n) and p.requires_grad]
    others = [p for n, p in model.named_parameters() if not is_router_param(n) and p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": others, "lr": lr}, {"params": routers, "lr": lr * router_lr_mult}],
        lr=lr, betas=(0.9, 0.95), weight_decay=0.0, eps=1e-8, foreach=False,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, len(batches), warmup_frac))
    t0 = time.perf_counter()
    ce_hist, aux_hist = [], []
    for step, ids in enumerate(batches):
        out = model(input_ids=ids, labels=ids, **({"output_router_logits": True} if moe else {}))
        # out.loss already holds router_aux_loss_coef * aux_loss; keep the parts apart for the log.
        aux = float(out.aux_loss.detach()) if moe and out.aux_loss is not None else 0.0
        ce_hist.append(float(out.loss.detach()) - (model.config.router_aux_loss_coef * aux if moe else 0.0))
        aux_hist.append(aux)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if progress and (step + 1) % max(1, len(batches) // 5) == 0:
            progress(f"{label} step {step + 1}/{len(batches)} ce {ce_hist[-1]:.3f} aux {aux:.3f} "
                     f"({time.perf_counter() - t0:.0f}s)")
    model.eval()
    if moe:
        model.config.output_router_logits = False
    tail = max(1, len(ce_hist) // 10)
    return TrainLog(len(batches), round(time.perf_counter() - t0, 2), round(ce_hist[0], 4) if ce_hist else 0.0,
                    round(sum(ce_hist[-tail:]) / tail, 4) if ce_hist else 0.0,
                    round(sum(aux_hist[-tail:]) / tail, 4) if aux_hist else 0.0)


@torch.no_grad()
def mean_ce(model, windows: list[str], batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats/char) of the model on some windows."""
    total, count = 0.0, 0
    all_ids = torch.tensor([encode(w) for w in windows], dtype=torch.long)
    for ids in all_ids.split(batch_size):
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return total / max(1, count)
