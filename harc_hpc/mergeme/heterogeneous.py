"""An MoE of heterogeneous dense experts (MergeME §3.2): different widths and depths, one tokenizer.

Experts whose hidden sizes or layer counts differ cannot share merged attention or FFN layers, so
MergeME joins whole experts:

* a **shared embedding** M_e: vocabulary -> R^{d_m}, d_m the largest expert hidden size, and a
  **shared head** M_h: R^{d_m} -> vocabulary, both initialised as the average over the experts of
  their embedding / head matrices, each zero-padded to d_m columns first;
* per expert i a **Proj-in** MLP R^{d_m} -> R^{d_i} feeding the expert's decoder (its layers and
  final norm, given the projected embeddings as ``inputs_embeds``) and a **Proj-out** MLP
  R^{d_i} -> R^{d_m} mapping its last hidden states back;
* a **sequence-level router**: attention layers are not merged, so every token of a sequence goes
  to the same experts. With e_1..e_t the shared embeddings of the sequence's tokens,
  alpha = softmax(top-K(theta_r avg(e_1..e_t))), theta_r an (E, d_m) matrix;
* the output is M_h(sum over the K selected experts of alpha_i r_i), r_i the Proj-out output.

The experts' own embeddings and heads are not used and not kept (each expert is its frozen
backbone module: decoder layers, rotary embedding, final norm). Because the routing weights
depend on the whole sequence, the logits at position j depend on the tokens after j as well (the
paper's design); ``generate`` decodes greedily with exactly these semantics: the next token is the
argmax of ``forward`` on the sequence so far. Expert outputs themselves are causal, so
``generate`` keeps a KV cache per expert and runs every expert on each new token (the selected set
may change as the sequence grows).

On disk (``save_pretrained``): ``hetero_moe.json`` (layout, expert sources with their sha256
digests, projector settings, training record), ``model.safetensors`` (embedding, head, router,
projectors: everything except the experts), the tokenizer files of the chosen expert, and, with
``experts_storage: copy``, each expert's directory under ``experts/<name>/``. With ``reference``
(default) the record holds the expert's absolute path and ``from_pretrained`` refuses an expert
whose weights no longer match the recorded digest.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from harc_hpc.dtypes import torch_dtype
from harc_hpc.merge.base import MergeContext, MergeInputError
from harc_hpc.mergeme.routers import random_router

#: the record beside the wrapper's weights
HETERO_RECORD = "hetero_moe.json"
HETERO_WEIGHTS = "model.safetensors"
HETERO_FORMAT = 1

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


@dataclass(frozen=True)
class ProjectorLayout:
    """Shape of every Proj-in / Proj-out MLP: ``layers`` linear layers (1: one affine map; 2:
    Linear, activation, Linear with ``hidden_size`` units, default max(d_in, d_out))."""

    layers: int = 2
    hidden_size: Optional[int] = None
    activation: str = "gelu"

    def widths(self, d_in: int, d_out: int) -> list[int]:
        if self.layers == 1:
            return [d_in, d_out]
        return [d_in, self.hidden_size or max(d_in, d_out), d_out]


@dataclass(frozen=True)
class ExpertSource:
    """Where an expert comes from and its architecture, as recorded and checked on load."""

    name: str
    path: str  # absolute path, or relative to the saved directory when copied
    digest: str
    model_type: str
    hidden_size: int
    num_hidden_layers: int


@dataclass
class HeteroLayout:
    """Everything that fixes the wrapper's parameter shapes."""

    experts: list[ExpertSource]
    hidden_size: int  # d_m
    vocab_size: int
    top_k: int
    projector: ProjectorLayout = field(default_factory=ProjectorLayout)
    dtype: str = "float32"

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def to_json(self) -> dict:
        return {"experts": [asdict(e) for e in self.experts], "hidden_size": self.hidden_size,
                "vocab_size": self.vocab_size, "top_k": self.top_k,
                "projector": asdict(self.projector), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: dict) -> "HeteroLayout":
        return cls(experts=[ExpertSource(**e) for e in data["experts"]],
                   hidden_size=int(data["hidden_size"]), vocab_size=int(data["vocab_size"]),
                   top_k=int(data["top_k"]), projector=ProjectorLayout(**data["projector"]),
                   dtype=data["dtype"])


def projector(d_in: int, d_out: int, layout: ProjectorLayout) -> nn.Sequential:
    widths = layout.widths(d_in, d_out)
    mods: list[nn.Module] = []
    for j in range(len(widths) - 1):
        if j:
            mods.append(_ACTIVATIONS[layout.activation]())
        mods.append(nn.Linear(widths[j], widths[j + 1], bias=True))
    return nn.Sequential(*mods)


def linear_layers(proj: nn.Sequential) -> list[nn.Linear]:
    return [m for m in proj if isinstance(m, nn.Linear)]


class HeteroMoE(nn.Module):
    """Shared embedding and head, per-expert projectors, a sequence-level top-K router and the
    frozen expert backbones (``experts[name]``: the transformers decoder module, e.g. LlamaModel).

    Parameter names (``wrapper_state_dict``): ``embed.weight`` (V, d_m), ``head.weight`` (V, d_m),
    ``router.weight`` (E, d_m), ``proj_in.<name>.<j>.{weight,bias}``, ``proj_out.<name>...``.
    """

    def __init__(self, layout: HeteroLayout, experts: dict[str, nn.Module]):
        super().__init__()
        if list(experts) != layout.names:
            raise ValueError(f"experts {list(experts)} do not match the layout's {layout.names}")
        if not 1 <= layout.top_k <= len(layout.experts):
            raise ValueError(f"top_k {layout.top_k} for {len(layout.experts)} experts")
        self.layout = layout
        d_m, V = layout.hidden_size, layout.vocab_size
        dtype = torch_dtype(layout.dtype)
        self.embed = nn.Embedding(V, d_m, dtype=dtype)
        self.head = nn.Linear(d_m, V, bias=False, dtype=dtype)
        self.router = nn.Linear(d_m, len(layout.experts), bias=False, dtype=dtype)
        self.proj_in = nn.ModuleDict({e.name: projector(d_m, e.hidden_size, layout.projector).to(dtype)
                                      for e in layout.experts})
        self.proj_out = nn.ModuleDict({e.name: projector(e.hidden_size, d_m, layout.projector).to(dtype)
                                       for e in layout.experts})
        self.experts = nn.ModuleDict(experts)
        for p in self.experts.parameters():
            p.requires_grad_(False)
        self.experts.eval()

    # -- parameters ---------------------------------------------------------------------------

    def wrapper_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter except the experts', by name, in a fixed order."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("experts.")}

    def wrapper_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().contiguous() for n, p in self.wrapper_parameters().items()}

    def load_wrapper_state(self, state: dict[str, torch.Tensor], where: str = "") -> None:
        own = self.wrapper_parameters()
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise MergeInputError(f"wrapper tensors do not match the layout: missing {missing[:5]}, "
                                  f"unexpected {extra[:5]}", where=where or None)
        with torch.no_grad():
            for n, p in own.items():
                t = state[n]
                if tuple(t.shape) != tuple(p.shape):
                    raise MergeInputError(f"tensor {n} has shape {tuple(t.shape)}, the layout needs "
                                          f"{tuple(p.shape)}", where=where or None)
                p.copy_(t)

    def train(self, mode: bool = True):
        super().train(mode)
        self.experts.eval()  # frozen: never in training mode (no dropout)
        return self

    # -- routing and forward ------------------------------------------------------------------

    def route(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        """(router logits (B, E), selected experts (B, K), their weights alpha (B, K)):
        alpha = softmax(top-K(theta_r avg(e_1..e_t))), the average over the unmasked tokens."""
        emb = self.embed(input_ids)
        return self._route(emb, _mask(input_ids, attention_mask))

    def _route(self, emb: torch.Tensor, mask: torch.Tensor):
        m = mask.to(emb.dtype).unsqueeze(-1)
        mean = (emb * m).sum(1) / m.sum(1).clamp(min=1)
        logits = self.router(mean)
        top, idx = torch.topk(logits, self.layout.top_k, dim=-1)
        return logits, idx, torch.softmax(top, dim=-1)

    def routing_weights(self, input_ids: torch.Tensor,
                        attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, E): alpha at the selected experts, 0 elsewhere."""
        _, idx, alpha = self.route(input_ids, attention_mask)
        return torch.zeros(alpha.shape[0], len(self.layout.experts), dtype=alpha.dtype).scatter(1, idx, alpha)

    def expert_output(self, name: str, emb: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                      cache=None) -> torch.Tensor:
        """r_i = Proj-out_i(expert_i(Proj-in_i(e))) for the rows given, (b, T, d_m)."""
        h = self.proj_in[name](emb)
        out = self.experts[name](inputs_embeds=h, attention_mask=mask, position_ids=positions,
                                 cache=cache, use_cache=cache is not None)
        return self.proj_out[name](out.last_hidden_state)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, T, V). Each sequence runs through its K selected experts only."""
        mask = _mask(input_ids, attention_mask)
        emb = self.embed(input_ids)
        _, idx, alpha = self._route(emb, mask)
        positions = _positions(mask)
        mixed = torch.zeros_like(emb)
        for e, name in enumerate(self.layout.names):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            r = self.expert_output(name, emb[rows], mask[rows], positions[rows])
            r = torch.where(mask[rows].bool().unsqueeze(-1), r, torch.zeros((), dtype=r.dtype))
            mixed = mixed.index_add(0, rows, alpha[rows, slot].unsqueeze(-1).unsqueeze(-1) * r)
        return self.head(mixed)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 32, eos_token_id: Optional[Union[int, Sequence[int]]] = None,
                 pad_token_id: Optional[int] = None) -> torch.Tensor:
        """Greedy decoding: (B, T + n) ids, the prompt (left-padded if batched with a mask) and up to
        ``max_new_tokens`` new tokens; a finished sequence (EOS) is continued with ``pad_token_id``
        (default: the first EOS id). The next token is argmax of ``forward`` on the sequence so far,
        computed incrementally: per-expert KV caches, routing from the running embedding sum."""
        from transformers import DynamicCache

        self.eval()
        mask = _mask(input_ids, attention_mask).clone()
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        names = self.layout.names
        caches = {n: DynamicCache(config=self.experts[n].config) for n in names}
        ids = input_ids.clone()
        emb = self.embed(ids)
        emb_sum = (emb * mask.unsqueeze(-1).to(emb.dtype)).sum(1)
        count = mask.sum(1, keepdim=True).to(emb.dtype)
        positions = _positions(mask)
        step_emb, step_pos = emb, positions
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        for _ in range(max_new_tokens):
            outs = {n: self.expert_output(n, step_emb, mask, step_pos, cache=caches[n])[:, -1] for n in names}
            logits = self.router(emb_sum / count.clamp(min=1))
            top, idx = torch.topk(logits, self.layout.top_k, dim=-1)
            alpha = torch.softmax(top, dim=-1)
            stacked = torch.stack([outs[n] for n in names], 1)  # (B, E, d_m)
            chosen = stacked.gather(1, idx.unsqueeze(-1).expand(-1, -1, stacked.shape[-1]))
            mixed = (alpha.unsqueeze(-1) * chosen).sum(1)
            nxt = self.head(mixed).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            ids = torch.cat([ids, nxt.unsqueeze(1)], 1)
            if eos:
                done = done | torch.isin(nxt, torch.tensor(eos))
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            step_emb = self.embed(nxt.unsqueeze(1))
            step_pos = step_pos[:, -1:] + 1
            emb_sum = emb_sum + step_emb[:, 0]
            count = count + 1
            if eos and bool(done.all()):
                break
        return ids

    # -- construction, saving, loading --------------------------------------------------------

    @classmethod
    def from_experts(cls, names: Sequence[str], paths: Sequence[Union[str, Path]], *, top_k: int,
                     projector_layout: ProjectorLayout = ProjectorLayout(), projector_init: str = "random",
                     router_init: str = "random", router_std: float = 0.02, seed: int = 0,
                     dtype: str = "float32", digests: Optional[Sequence[str]] = None) -> "HeteroMoE":
        """Load the experts with transformers and build the initial wrapper (MergeME §3.2):
        averaged zero-padded embeddings and heads, projectors (``random``: uniform in
        +-1/sqrt(fan_in), zero biases; ``identity``: a one-layer projector that copies the
        first min(d_in, d_out) coordinates and zero-pads / drops the rest), router (``random``:
        N(0, router_std^2); ``zeros``). Every random draw comes from a generator seeded by (seed,
        parameter name)."""
        from harc_hpc.io.checkpoint import Checkpoint

        tdtype = torch_dtype(dtype)
        models = [_load_expert(p, tdtype) for p in paths]
        sources = []
        for i, (name, path, m) in enumerate(zip(names, paths, models)):
            digest = digests[i] if digests is not None else Checkpoint(path, name=name).digest()
            sources.append(ExpertSource(name, str(Path(path).resolve()), digest, m.config.model_type,
                                        int(m.config.hidden_size), int(m.config.num_hidden_layers)))
        vocab = {int(m.get_input_embeddings().weight.shape[0]) for m in models}
        if len(vocab) != 1:
            raise MergeInputError(f"experts {list(names)} have embedding tables of different sizes {sorted(vocab)}")
        d_m = max(s.hidden_size for s in sources)
        layout = HeteroLayout(sources, d_m, vocab.pop(), top_k, projector_layout, dtype)
        model = cls(layout, {n: m.get_decoder() for n, m in zip(names, models)})
        model.initialise([m.get_input_embeddings().weight for m in models],
                         [m.get_output_embeddings().weight for m in models],
                         projector_init=projector_init, router_init=router_init,
                         router_std=router_std, seed=seed)
        for body in model.experts.values():
            _drop_embedding(body)
        return model

    @torch.no_grad()
    def initialise(self, embeddings: Sequence[torch.Tensor], heads: Sequence[torch.Tensor], *,
                   projector_init: str, router_init: str, router_std: float, seed: int) -> None:
        d_m = self.layout.hidden_size
        self.embed.weight.copy_(padded_average(embeddings, d_m))
        self.head.weight.copy_(padded_average(heads, d_m))
        ctx = MergeContext(seed=seed)
        for kind, projs in (("proj_in", self.proj_in), ("proj_out", self.proj_out)):
            for name, proj in projs.items():
                for j, lin in enumerate(linear_layers(proj)):
                    pname = f"{kind}.{name}.{j}"
                    if projector_init == "identity":
                        if len(linear_layers(proj)) != 1:
                            raise ValueError("identity projectors have one layer")
                        lin.weight.copy_(torch.eye(*lin.weight.shape))
                    elif projector_init == "random":
                        bound = 1.0 / lin.in_features ** 0.5
                        g = ctx.generator(pname + ".weight", 0)
                        u = torch.rand(lin.weight.shape, generator=g, dtype=torch.float32)
                        lin.weight.copy_((2 * u - 1) * bound)
                    else:
                        raise ValueError(f"unknown projector init {projector_init!r}")
                    lin.bias.zero_()
        E = len(self.layout.experts)
        if router_init == "random":
            self.router.weight.copy_(random_router(E, d_m, seed, "router.weight", router_std))
        elif router_init == "zeros":
            self.router.weight.zero_()
        else:
            raise ValueError(f"unknown router init {router_init!r}")

    def save_pretrained(self, directory: Union[str, Path], *, experts_storage: str = "reference",
                        extra_record: Optional[dict] = None, tokenizer_from: Optional[Union[str, Path]] = None) -> None:
        """Write the wrapper into ``directory`` (which must exist and be empty, e.g. an
        ``atomic_dir`` temporary): weights, record, tokenizer files of ``tokenizer_from`` and,
        with ``experts_storage="copy"``, the experts' directories."""
        from safetensors.torch import save_file

        from harc_hpc.io.atomic import json_text
        from harc_hpc.io.checkpoint import MODEL_FILES
        from harc_hpc.io.checkpoint_writer import copy_model_files

        directory = Path(directory)
        experts = []
        for src in self.layout.experts:
            if experts_storage == "copy":
                rel = f"experts/{src.name}"
                shutil.copytree(src.path, directory / rel, ignore=shutil.ignore_patterns(".*"))
                experts.append({**asdict(src), "path": rel})
            elif experts_storage == "reference":
                experts.append(asdict(src))
            else:
                raise ValueError(f"unknown experts_storage {experts_storage!r}")
        save_file(self.wrapper_state_dict(), str(directory / HETERO_WEIGHTS), metadata={"format": "pt"})
        tokenizer_files = []
        if tokenizer_from is not None:
            names = [n for n in MODEL_FILES if n not in ("config.json", "generation_config.json")]
            tokenizer_files = copy_model_files(tokenizer_from, directory, names)
        layout = {**self.layout.to_json(), "experts": experts}
        record = {"format": HETERO_FORMAT, "kind": "mergeme-heterogeneous-moe", "experts_storage": experts_storage,
                  "layout": layout, "tokenizer_files": tokenizer_files, **(extra_record or {})}
        (directory / HETERO_RECORD).write_text(json_text(record))

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], verify_digests: bool = True) -> "HeteroMoE":
        """Load a saved wrapper: the experts from their recorded (or copied) directories, checked
        against their recorded digests, then the wrapper's tensors, bit for bit."""
        from safetensors.torch import load_file

        from harc_hpc.io.checkpoint import Checkpoint

        directory = Path(directory)
        rec_path = directory / HETERO_RECORD
        try:
            record = json.loads(rec_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MergeInputError(f"not a heterogeneous MoE directory ({exc})", where=str(rec_path)) from None
        if record.get("format") != HETERO_FORMAT:
            raise MergeInputError(f"format {record.get('format')!r} is not {HETERO_FORMAT}", where=str(rec_path))
        layout = HeteroLayout.from_json(record["layout"])
        paths = []
        for src in layout.experts:
            p = Path(src.path)
            p = p if p.is_absolute() else directory / p
            if not (p / "config.json").is_file():
                raise MergeInputError(f"expert {src.name!r}: no model at {p}", where=str(rec_path))
            if verify_digests:
                found = Checkpoint(p, name=src.name).digest()
                if found != src.digest:
                    raise MergeInputError(f"expert {src.name!r} at {p} has changed since the MoE was built "
                                          f"(digest {found}, recorded {src.digest})", where=str(rec_path))
            paths.append(p.resolve())
        # absolute from here on: a re-save (copy or reference) finds the experts wherever they are
        layout.experts = [ExpertSource(**{**asdict(s), "path": str(p)}) for s, p in zip(layout.experts, paths)]
        tdtype = torch_dtype(layout.dtype)
        experts = {s.name: _drop_embedding(_load_expert(p, tdtype).get_decoder())
                   for s, p in zip(layout.experts, paths)}
        model = cls(layout, experts)
        model.load_wrapper_state(load_file(str(directory / HETERO_WEIGHTS)), where=str(directory / HETERO_WEIGHTS))
        model.record = record
        return model.eval()


def padded_average(mats: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Mean of (V, d_i) matrices, each zero-padded on the right to (V, width) (MergeME §3.2)."""
    acc = torch.zeros(mats[0].shape[0], width, dtype=torch.float64)
    for m in mats:
        acc[:, : m.shape[1]] += m.detach().double()
    return (acc / len(mats)).to(mats[0].dtype)


def _mask(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids)
    return attention_mask.to(input_ids.dtype)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens (left padding keeps the first token at 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _drop_embedding(body: nn.Module) -> nn.Module:
    """The expert's own embedding table is never used (the shared embedding and Proj-in feed it
    ``inputs_embeds``); at scale it is V x d_i parameters per expert, so it is not kept."""
    if getattr(body, "embed_tokens", None) is None:
        raise MergeInputError(f"{type(body).__name__}: the expert's backbone has no embed_tokens; not a "
                              f"supported decoder layout")
    body.embed_tokens = None
    return body


def _load_expert(path: Union[str, Path], dtype: torch.dtype):
    from harc_hpc.models.modeling import load_causal_lm

    return load_causal_lm(path, torch.device("cpu"), dtype=dtype)
