"""Router initialisation of an MoE built from dense experts: one (E, d) matrix per MoE layer.

* ``uniform``: zeros. Every expert gets the same logit; with top-k weights that sum to one, a MoE
  whose experts are identical computes exactly the dense model (the equivalence test).
* ``random``: the MergeME "Random Routing" baseline. Normal entries with the standard deviation a
  fresh transformers router gets (``initializer_range`` of the config, 0.02 by default), drawn from a
  generator seeded by (seed, router tensor name): a rerun gives the same router.
* ``hidden_state``: mergekit-moe's prompt rule. Row e of layer l is the mean, over expert e's
  prompts, of the per-prompt mean over tokens of the base model's hidden state entering decoder
  layer l (``output_hidden_states[l]``), scaled to unit L2 norm.
* ``task_vector``: MergeME App. C scores an input x by the cosine similarity between the base's
  gradient on x, g = grad_theta_b L(x), and each expert's task vector tau_e = theta_b - theta_e
  (all parameters; the paper's §3.1.2 definition, base minus expert: fine-tuning moves the weights
  against the gradient, so this is the sign for which "the task vector represents the cumulative
  gradient on the expert's data" and in-domain inputs score high), and routes by
  softmax(top-k(similarities)). That rule is per sequence and needs
  a backward pass at inference; a token-level linear router cannot compute it. Here it becomes a
  router by fitting: for every prompt p (all experts' prompts pooled; no labels are needed),
  s_p[e] = cos(g_p, tau_e) is computed exactly as App. C says, and layer l's router R is the
  minimum-norm least-squares solution of R mu_p = s_p, with mu_p the prompt's mean hidden state
  entering layer l (as for hidden_state). With at most d linearly independent prompts the router
  reproduces App. C's scores, hence its top-k routing and weights, exactly at every prompt's mean
  hidden state. The base as an expert has no task vector: its score is 0.

The data rules run the whole base model with transformers (fine for small models; the closed-form
router fit through the HARC pipeline, which captures router inputs layer by layer at scale, is a
later step of issue 15).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from harc_hpc.merge.base import MergeContext, MergeInputError


def uniform_router(num_experts: int, hidden: int) -> torch.Tensor:
    return torch.zeros(num_experts, hidden, dtype=torch.float32)


def random_router(num_experts: int, hidden: int, seed: int, router_disk_key: str,
                  std: float = 0.02) -> torch.Tensor:
    g = MergeContext(seed=seed).generator(router_disk_key, 0)
    return torch.randn(num_experts, hidden, generator=g, dtype=torch.float32) * std


def tokenize(tokenizer, prompt: str, what: str, min_tokens: int = 1) -> torch.Tensor:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[-1] < min_tokens:
        raise MergeInputError(f"{what}: prompt {prompt[:40]!r} has {ids.shape[-1]} tokens; at least "
                              f"{min_tokens} are needed")
    return ids


@torch.no_grad()
def prompt_mean_hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    """(L, d) float64: the mean over tokens of the hidden state entering each decoder layer."""
    out = model(input_ids=ids.to(model.device), output_hidden_states=True, use_cache=False)
    layers = len(model.model.layers)
    return torch.stack([h[0].double().mean(0).cpu() for h in out.hidden_states[:layers]])


def hidden_state_routers(model, tokenizer, prompts_by_expert: Sequence[Sequence[str]],
                         expert_names: Sequence[str]) -> torch.Tensor:
    """(L, E, d) float32: mergekit-moe's hidden-state rule (module docstring)."""
    rows = []
    for name, prompts in zip(expert_names, prompts_by_expert):
        per_prompt = [prompt_mean_hidden_states(model, tokenize(tokenizer, p, f"expert {name!r}"))
                      for p in prompts]
        mean = torch.stack(per_prompt).mean(0)  # (L, d)
        rows.append(mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-8))
    return torch.stack(rows, dim=1).float()


def task_vector_scores(model, ids: torch.Tensor,
                       expert_tensor: Callable[[int, str], Optional[torch.Tensor]],
                       num_experts: int, tau_sq_norms: Optional[list[float]] = None
                       ) -> tuple[torch.Tensor, list[float]]:
    """(E,) float64: cos(grad_theta_b L(ids), tau_e) over all base parameters, App. C's similarity,
    with tau_e = theta_b - theta_e (module docstring: the sign that scores in-domain inputs high).

    ``expert_tensor(e, name)`` reads expert e's tensor ``name`` (None for the base as an expert,
    whose task vector is zero). Task vectors are formed tensor by tensor, never as a whole."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        loss = model(input_ids=ids.to(model.device), labels=ids.to(model.device), use_cache=False).loss
        loss.backward()
    dots = [0.0] * num_experts
    g_sq = 0.0
    compute_norms = tau_sq_norms is None
    norms = [0.0] * num_experts if compute_norms else tau_sq_norms
    for name, p in model.named_parameters():
        g = p.grad.double().cpu() if p.grad is not None else torch.zeros(p.shape, dtype=torch.float64)
        g_sq += float((g * g).sum())
        base = p.detach().double().cpu()
        for e in range(num_experts):
            t = expert_tensor(e, name)
            if t is None:
                continue
            tau = base - t.double()
            dots[e] += float((g * tau).sum())
            if compute_norms:
                norms[e] += float((tau * tau).sum())
    model.zero_grad(set_to_none=True)
    scores = torch.zeros(num_experts, dtype=torch.float64)
    for e in range(num_experts):
        denom = (g_sq * norms[e]) ** 0.5
        scores[e] = dots[e] / denom if denom > 0 else 0.0
    return scores, norms


def task_vector_routers(model, tokenizer, prompts: Sequence[tuple[str, str]],
                        expert_tensor: Callable[[int, str], Optional[torch.Tensor]],
                        num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, E, d) float32 routers fitted to App. C's scores (module docstring), and the (P, E)
    score table of the prompts (``prompts``: (expert name, text) pairs)."""
    means, scores = [], []
    norms = None
    for owner, text in prompts:
        ids = tokenize(tokenizer, text, f"expert {owner!r}", min_tokens=2)
        means.append(prompt_mean_hidden_states(model, ids))
        s, norms = task_vector_scores(model, ids, expert_tensor, num_experts, norms)
        scores.append(s)
    S = torch.stack(scores)  # (P, E)
    M = torch.stack(means, dim=1)  # (L, P, d)
    # R mu_p = s_p for every p: R M^T = S^T, minimum-norm least squares R = S^T (M^+)^T
    routers = torch.stack([S.T @ torch.linalg.pinv(M[l]).T for l in range(M.shape[0])])
    return routers.float(), S
