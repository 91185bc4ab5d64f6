"""A checkpoint run one decoder layer at a time: the model's skeleton on the meta device, each layer's
weights read straight from the safetensors shards onto the compute device when it runs, and freed
after.

Peak memory is one decoder layer, the embeddings (or the final norm and LM head) while they are
used, and the activations, whatever the number of layers (the sequential onloading of
llm-compressor, Model-Optimizer's layerwise calibration and REAP's layerwise observer). Each layer
is loaded once and every batch is pushed through it before the next one is loaded.

The skeleton is built by transformers itself (``from_config`` under ``torch.device("meta")``), so
the layer code, the attention masks and the rotary embedding are the library's own; only the weights are
placed here. On disk a layer's experts are usually one matrix per expert under the family's legacy
names; transformers 5 fuses them in memory (``mlp.experts.gate_up_proj`` (E, 2I, d), gate rows before
up rows; ``mlp.experts.down_proj`` (E, d, I)). ``layer_state_dict`` does that fusion for one layer,
from either on-disk layout, in the same order and dtype conversion as ``from_pretrained``, so a layer
loaded here computes exactly what the whole-model path computes (bit for bit on CPU; tested).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from harc_hpc.io.checkpoint import Checkpoint, CheckpointError
from harc_hpc.models.families import family_for_config
from harc_hpc.models.modeling import decoder


def _return_freed_memory(first: bool = False) -> None:
    """Make freed layer weights go back to the OS. glibc raises its mmap threshold after large
    frees, so later layers' tensors come from the heap and their pages stay resident: measured, the
    RSS of a 24-layer onloaded pass grew with every layer to 1.7x the bf16 model. A fixed 1 MiB
    threshold (large tensors always mmapped, unmapped when freed) and a trim keep it flat."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if first:
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def compute_dtype_for(device: torch.device, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """float32 on CPU (bf16 matmuls there are slow and thread-count dependent), else the checkpoint's."""
    return torch.float32 if device.type == "cpu" else checkpoint_dtype


def _config_dtype(config) -> torch.dtype:
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else torch.float32


def _onto(t: torch.Tensor, device: Optional[torch.device]) -> torch.Tensor:
    """A tensor read from the shards, on ``device``: to a GPU through a pinned copy, asynchronously
    (the next read overlaps the transfer); on the CPU as it is."""
    if device is None or device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _read(ckpt: Checkpoint, key: str, device: Optional[torch.device]) -> torch.Tensor:
    """Tensor ``key`` on ``device``; a quantized one (MXFP4) travels packed and is dequantized there."""
    if device is not None and device.type == "cuda" and ckpt.is_dequantized(key):
        return ckpt.get_tensor(key, device=device)
    return _onto(ckpt.get_tensor(key), device)


def layer_state_dict(ckpt: Checkpoint, fam, layer: int, names: list[str], dtype: torch.dtype,
                     device: Optional[torch.device] = None) -> dict:
    """The in-memory parameters ``names`` of decoder layer ``layer`` (names relative to the layer),
    read from the checkpoint in either expert layout and converted to ``dtype``. With a CUDA
    ``device`` every tensor is copied there as read, and the experts are fused and converted there
    (the host does reads only); the values are the same either way."""
    prefix = f"model.layers.{layer}."
    keys = ckpt.keys()
    key_set = set(keys)
    out = {}
    experts = None
    for name in names:
        disk = prefix + name
        if disk not in key_set and name.startswith("mlp."):
            alt = f"{prefix}{fam.moe_module}.{name[4:]}"
            if alt in key_set:
                disk = alt
        if disk in key_set:
            out[name] = _read(ckpt, disk, device).to(dtype)
            continue
        if name in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            if experts is None:
                experts = sorted({e.expert for e in map(fam.parse_expert_key, keys)
                                  if e is not None and e.layer == layer and e.expert is not None})
            if not experts:
                raise CheckpointError(f"{ckpt.name}: layer {layer} has neither {disk!r} nor per-expert tensors")
            if name.endswith("gate_up_proj"):
                parts = [torch.cat([_read(ckpt, fam.expert_key(layer, e, "gate"), device),
                                    _read(ckpt, fam.expert_key(layer, e, "up"), device)], dim=0)
                         for e in experts]
            else:
                parts = [_read(ckpt, fam.expert_key(layer, e, "down"), device) for e in experts]
            out[name] = torch.stack(parts).to(dtype)
            continue
        raise CheckpointError(f"{ckpt.name}: tensor {disk!r} of decoder layer {layer} is missing")
    return out


class OnloadedModel:
    """A decoder-only model whose layers live on the meta device until ``onload``.

    ``overrides`` maps a layer to in-memory tensors that replace the checkpoint's (the calibrated
    routers: ``{layer: {"mlp.gate.weight": W}}``).
    """

    def __init__(self, path: Path | str, device: torch.device, dtype: Optional[torch.dtype] = None,
                 trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM

        _return_freed_memory(first=True)
        self.path = Path(path)
        self.device = torch.device(device)
        self.ckpt = Checkpoint(self.path)
        config = AutoConfig.from_pretrained(str(self.path), trust_remote_code=trust_remote_code)
        self.family = family_for_config(json.loads((self.path / "config.json").read_text()))
        self.dtype = dtype or compute_dtype_for(self.device, _config_dtype(config))
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(
                config, dtype=self.dtype, attn_implementation=self.family.attn_implementation,
                trust_remote_code=trust_remote_code)
        self.model.eval()
        self.config = self.model.config
        self.backbone = decoder(self.model)
        # The rotary embedding holds only computed buffers: build it for real on the device.
        rotary = self.backbone.rotary_emb
        with torch.device("cpu"):
            self.backbone.rotary_emb = type(rotary)(config=self.config).to(self.device)
        self.num_layers = len(self.backbone.layers)
        self._embed: Optional[torch.nn.Module] = None
        self._head_onloaded = False

    # -- weights -----------------------------------------------------------------------------------
    def layer(self, index: int) -> torch.nn.Module:
        return self.backbone.layers[index]

    def onload(self, index: int, overrides: Optional[dict] = None,
               parts: Optional[tuple[str, ...]] = None) -> torch.nn.Module:
        """Materialise decoder layer ``index`` on the device with its checkpoint weights; ``parts``:
        only these submodules (a half of the layer, ``MoEFamily.half_modules``), the rest stays on
        the meta device."""
        module = self.layer(index)
        prefixes = [""] if parts is None else [f"{p}." for p in parts]
        targets = [module] if parts is None else [module.get_submodule(p) for p in parts]
        names = [prefix + n for prefix, target in zip(prefixes, targets)
                 for n, _ in [*target.named_parameters(), *target.named_buffers()]]
        state = layer_state_dict(self.ckpt, self.family, index, names, self.dtype, self.device)
        for name, value in (overrides or {}).items():
            if name not in state:
                raise KeyError(f"decoder layer {index} has no parameter {name!r}"
                               + ("" if parts is None else f" in the parts onloaded ({', '.join(parts)})"))
            if tuple(value.shape) != tuple(state[name].shape):
                raise ValueError(f"layer {index}: {name} shape {tuple(value.shape)} != model's "
                                 f"{tuple(state[name].shape)}")
            state[name] = value.to(self.dtype)
        for prefix, target in zip(prefixes, targets):
            target.to_empty(device=self.device)
            target.load_state_dict({n[len(prefix):]: v for n, v in state.items() if n.startswith(prefix)},
                                   strict=True)
        return module

    def onload_module(self, index: int, name: str) -> torch.nn.Module:
        """Materialise only submodule ``name`` (e.g. ``post_attention_layernorm``) of decoder layer
        ``index``: what a reader of a stored residual needs."""
        self.onload(index, parts=(name,))
        return self.layer(index).get_submodule(name)

    @torch.no_grad()
    def swap(self, index: int, name: str, value: torch.Tensor) -> torch.Tensor:
        """Put ``value`` into parameter ``name`` of the onloaded decoder layer ``index`` in place (a
        router, say, so that one onload serves several router sets) and return the value it held, to
        put back. ``value`` is converted to the compute dtype exactly as an ``onload`` override is."""
        param = self.layer(index).get_parameter(name)
        if param.is_meta:
            raise RuntimeError(f"decoder layer {index} is not onloaded")
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"layer {index}: {name} shape {tuple(value.shape)} != model's {tuple(param.shape)}")
        held = param.detach().clone()
        param.copy_(value.to(self.dtype).to(param.device))
        return held

    def offload(self, index: int) -> None:
        """Free decoder layer ``index`` (back to the meta device)."""
        self.layer(index).to("meta")
        _return_freed_memory()

    def layer_bytes(self, index: int) -> int:
        """Bytes decoder layer ``index`` occupies on the device."""
        return sum(p.numel() for p in self.layer(index).parameters()) * self.dtype.itemsize

    # -- forward -----------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self._embed is None:
            weight = self.ckpt.get_tensor("model.embed_tokens.weight").to(self.dtype)
            self._embed = torch.nn.Embedding.from_pretrained(weight.to(self.device), freeze=True,
                                                             padding_idx=self.backbone.embed_tokens.padding_idx)
        return self._embed(ids.to(self.device))

    def release_embeddings(self) -> None:
        self._embed = None

    def _onload_head(self) -> None:
        """The final norm and the LM head on the device. A tied head (``tie_word_embeddings``; its
        ``lm_head.weight`` is then usually not on disk) reads the embedding matrix, as transformers'
        own tying does."""
        tied = self.model.get_expanded_tied_weights_keys()  # {"lm_head.weight": "model.embed_tokens.weight"}
        keys = set(self.ckpt.keys())
        for prefix, module in (("model.norm.", self.backbone.norm), ("lm_head.", self.model.get_output_embeddings())):
            state = {}
            for name in [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]:
                key = tied.get(prefix + name, prefix + name)
                if key not in keys:
                    raise CheckpointError(f"{self.ckpt.name}: tensor {key!r} of the model's head is missing")
                state[name] = self.ckpt.get_tensor(key).to(self.dtype)
            module.to_empty(device=self.device)
            module.load_state_dict(state, strict=True)
        self._head_onloaded = True

    @torch.no_grad()
    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of a batch leaving the last decoder layer: the final norm, then the LM
        head, both onloaded on first use and kept until ``release_head``."""
        if not self._head_onloaded:
            self._onload_head()
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        return self.model.get_output_embeddings()(self.backbone.norm(hidden))

    def release_head(self) -> None:
        self.backbone.norm.to("meta")
        self.model.get_output_embeddings().to("meta")
        self._head_onloaded = False
        _return_freed_memory()

    def attention_kind(self, index: Optional[int]) -> str:
        """The attention of decoder layer ``index`` as the whole-model forward masks it: the config's
        ``layer_types`` (GPT-OSS's and Qwen2-MoE's sliding windows, Llama 4's chunks), else a
        sliding window on every layer when the config sets one (Mixtral, Qwen3-MoE), else causal."""
        types = getattr(self.config, "layer_types", None)
        if types and index is not None:
            return types[index]
        return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"

    def context(self, hidden: torch.Tensor, index: Optional[int] = None):
        """(attention mask, position ids, rotary embeddings) for a right-padded (B, T, d) batch entering
        decoder layer ``index``: the mask the whole-model forward gives that layer."""
        from transformers import masking_utils

        makers = {"full_attention": masking_utils.create_causal_mask,
                  "sliding_attention": masking_utils.create_sliding_window_causal_mask,
                  "chunked_attention": masking_utils.create_chunked_causal_mask}
        kind = self.attention_kind(index)
        if kind not in makers:
            raise ValueError(f"decoder layer {index}: attention type {kind!r} is not one the layer-wise forward "
                             f"masks ({', '.join(makers)})")
        B, T = hidden.shape[:2]
        position_ids = torch.arange(T, device=hidden.device).unsqueeze(0).expand(B, -1)
        mask = makers[kind](config=self.config, inputs_embeds=hidden, attention_mask=None,
                            cache=None, position_ids=position_ids)
        return mask, position_ids, self.backbone.rotary_emb(hidden, position_ids)

    @torch.no_grad()
    def run_layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Push a (B, T, d) batch through the (onloaded) decoder layer ``index``."""
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        mask, position_ids, pos_emb = self.context(hidden, index)
        out = self.layer(index)(hidden, attention_mask=mask, position_ids=position_ids,
                                position_embeddings=pos_emb)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def run_attention_half(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """The residual stream entering the feed-forward half of the (onloaded) decoder layer
        ``index`` for a right-padded (B, T, d) batch (the family's ``attention_half``)."""
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        mask, position_ids, pos_emb = self.context(hidden, index)
        return self.family.attention_half(self.layer(index), hidden, attention_mask=mask,
                                          position_ids=position_ids, position_embeddings=pos_emb)

    @torch.no_grad()
    def run_moe_half(self, index: int, residual: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``index``'s output from the residual entering its feed-forward half."""
        return self.family.moe_half(self.layer(index), residual.to(device=self.device, dtype=self.dtype))

    def close(self) -> None:
        self.ckpt.close()
