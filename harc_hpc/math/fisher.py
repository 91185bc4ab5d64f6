"""The diagonal empirical Fisher of a causal LM on calibration sequences (Matena & Raffel, "Merging
Models with Fisher-Weighted Averaging", 2022), the statistic the ``fisher`` merge method weighs
parameters by. Tensors in, tensors out: no files (harc_hpc.stages.fisher_statistics writes them).

Definition. The paper's empirical Fisher is the mean over examples of the squared gradient of the
log-likelihood of the observed label. Here an example is one calibration *sequence* and its
observed label is its own continuation, so

    F = (1 / M) sum_m g_m ** 2,    g_m = d/dtheta sum_{t in mask_m} log p(x_{m,t} | x_{m,<t}),

elementwise, over the M sequences that have at least one masked-in label token. ``loss_mask``
marks which *label* tokens count (True at position t: token t is predicted from tokens < t and its
log-probability is part of the sequence's log-likelihood; position 0 never counts, it has no
context). Per sequence, not per token: the log-likelihood of a sequence is the *sum* of its token
log-probabilities, and the square is taken of that sequence's whole gradient, as the paper squares
one example's gradient. A per-token Fisher would need one backward pass per token (T times the
cost); squaring the gradient of a batch (one backward for many sequences) is cheaper still but is
not a Fisher at all (it keeps the cross terms between sequences). The cost is therefore one
forward and one backward pass per sequence (batch size 1, so no padding and no attention mask),
plus one square-and-add per parameter.

Scale: F is a mean over sequences, so sources with different numbers of samples have comparable
Fishers; a source with longer sequences has larger ones (its log-likelihood sums more tokens).

Memory. Every parameter's gradient is squared into its float32 accumulator by a
post-accumulate-grad hook as soon as backward has produced it, and the gradient is freed at once:
the model never holds a whole gradient, only the gradients of the parameters backward is working
on. Peak: the model in its compute dtype + the accumulators (4 bytes per parameter, 2x a bfloat16
model; on the host with ``accumulate_on="cpu"``, at the price of one device-to-host copy of every
gradient per sequence) + the activations of one sequence (with ``gradient_checkpointing``, the
input of each decoder layer plus one layer's internals) + the float32 logits (T x vocabulary).

Data parallel: with ``process_group`` (a torch.distributed group or a harc_hpc.math.distributed
Reducer) each rank takes a contiguous share of the sequences (every rank passes the same list) and
the sums and the counts are all-reduced (SUM) before the division, so every rank returns the same
Fisher as one process would (up to float32 summation order).

Tied parameters (an LM head tied to the embeddings) are one parameter: their gradient is the sum
of both uses and the result lists it under every name. Buffers have no gradient and no Fisher.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence, Union

import torch

from harc_hpc.math.distributed import ProcessGroupLike, as_reducer, shard_rows

log = logging.getLogger(__name__)

TokenSequence = Union[torch.Tensor, Sequence[int]]


@dataclass
class FisherResult:
    """``fisher``: parameter name (every name, tied aliases included) -> float32 diagonal Fisher of
    the parameter's shape, on the accumulation device. ``samples``: sequences that counted (all
    ranks); ``tokens``: masked-in label tokens (all ranks)."""

    fisher: dict[str, torch.Tensor]
    samples: int
    tokens: int
    accumulator_bytes: int
    normalization: str = "mean over sequences of the squared gradient of the sequence log-likelihood"


def _as_ids(seq: TokenSequence) -> torch.Tensor:
    t = seq if isinstance(seq, torch.Tensor) else torch.tensor(list(seq), dtype=torch.long)
    if t.dim() != 1:
        raise ValueError(f"a token sequence must be 1-D, got shape {tuple(t.shape)}")
    return t.long()


def sequence_log_likelihood(model, ids: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum over masked-in label positions of log p(x_t | x_<t), number of those positions) for one
    1-D sequence on the model's device. ``mask`` (1-D bool like ``ids``): which label tokens count
    (default: all but the first)."""
    logits = model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0, :-1]  # position t predicts token t + 1
    labels = ids[1:]
    keep = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask[1:].to(labels.device)
    logp = torch.log_softmax(logits[keep].float(), dim=-1)
    return logp.gather(1, labels[keep].unsqueeze(1)).sum(), int(keep.sum())


@contextlib.contextmanager
def _gradient_checkpointing(model, enabled: bool):
    """Checkpoint every decoder layer (recompute its activations in backward) while the model stays
    in eval mode. transformers checkpoints a layer only when that layer's ``training`` flag is set,
    so the flag is set on the decoder-layer modules alone: their submodules stay in eval mode (no
    dropout, no router jitter), which is what a Fisher of the deployed model needs."""
    if not enabled:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model, "supports_gradient_checkpointing", False):
        log.warning("%s does not support gradient checkpointing; the Fisher pass keeps every "
                    "activation of a sequence", type(model).__name__)
        yield
        return
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    flags = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m, flag in zip(layers, flags):
            m.training = flag
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
        if hasattr(model, "disable_input_require_grads"):
            with contextlib.suppress(AttributeError):  # no hook was registered
                model.disable_input_require_grads()


def diagonal_fisher(model, sequences: Sequence[TokenSequence],
                    loss_masks: Optional[Sequence[Optional[TokenSequence]]] = None, *,
                    accumulate_on: Literal["device", "cpu"] = "device",
                    gradient_checkpointing: bool = False,
                    process_group: ProcessGroupLike = None,
                    progress: Optional[Callable[[int, int], None]] = None) -> FisherResult:
    """The diagonal empirical Fisher (module docstring) of ``model`` on ``sequences``.

    ``sequences``: the *global* list of 1-D token id sequences (every rank passes the same list and
    takes its share). ``loss_masks``: per sequence, None or a 1-D bool mask of its label tokens.
    ``accumulate_on``: "device" (the model's) or "cpu" (host memory). ``progress(done, total)`` is
    called after each of this rank's sequences.
    """
    reducer = as_reducer(process_group)
    if loss_masks is not None and len(loss_masks) != len(sequences):
        raise ValueError(f"{len(loss_masks)} loss masks for {len(sequences)} sequences")
    if accumulate_on not in ("device", "cpu"):
        raise ValueError(f"accumulate_on must be 'device' or 'cpu', got {accumulate_on!r}")
    named = list(model.named_parameters(remove_duplicate=False))
    if not named:
        raise ValueError(f"{type(model).__name__} has no parameters")
    device = named[0][1].device
    acc_device = torch.device("cpu") if accumulate_on == "cpu" else device
    unique: dict[int, torch.nn.Parameter] = {}
    for _, p in named:
        unique.setdefault(id(p), p)
    acc = {pid: torch.zeros(p.shape, dtype=torch.float32, device=acc_device) for pid, p in unique.items()}

    def square_into(pid: int):
        def hook(p: torch.Tensor) -> None:
            g = p.grad.detach()
            if g.device != acc_device:
                g = g.to(acc_device)  # in its own dtype: the fewest bytes to move
            # one pass; an in-place op on the float32 accumulator computes in float32, so a bfloat16
            # gradient's square neither underflows nor rounds to bfloat16
            acc[pid].addcmul_(g, g)
            p.grad = None  # never hold a whole gradient

        return hook

    flags = {pid: p.requires_grad for pid, p in unique.items()}
    handles = []
    start, stop = shard_rows(len(sequences), reducer.rank, reducer.world_size)
    samples = tokens = 0
    try:
        for pid, p in unique.items():
            p.requires_grad_(True)
            p.grad = None
            handles.append(p.register_post_accumulate_grad_hook(square_into(pid)))
        with _gradient_checkpointing(model, gradient_checkpointing), torch.enable_grad():
            for done, m in enumerate(range(start, stop), 1):
                ids = _as_ids(sequences[m]).to(device)
                mask = None
                if loss_masks is not None and loss_masks[m] is not None:
                    mask = _as_ids(loss_masks[m]).bool()
                    if mask.shape != ids.shape:
                        raise ValueError(f"sequence {m}: loss mask shape {tuple(mask.shape)} != "
                                         f"token shape {tuple(ids.shape)}")
                if ids.numel() >= 2 and (mask is None or bool(mask[1:].any())):
                    ll, n = sequence_log_likelihood(model, ids, mask)
                    ll.backward()
                    samples += 1
                    tokens += n
                if progress is not None:
                    progress(done, stop - start)
    finally:
        for h in handles:
            h.remove()
        for pid, p in unique.items():
            p.grad = None
            p.requires_grad_(flags[pid])
    samples = reducer.sum_int(samples)
    tokens = reducer.sum_int(tokens)
    if samples == 0:
        raise ValueError(f"no sequence of the {len(sequences)} given has a label token to score "
                         "(each needs at least 2 tokens and a masked-in position after the first)")
    for pid in acc:
        acc[pid] = reducer.sum(acc[pid]).div_(samples)
    nbytes = sum(a.numel() * a.element_size() for a in acc.values())
    return FisherResult({name: acc[id(p)] for name, p in named}, samples, tokens, nbytes)
