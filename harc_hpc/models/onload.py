"""A checkpoint run one decoder layer at a time: the model's skeleton with its parameters on the meta
device, each layer's weights read straight from the safetensors shards onto the compute device when
it runs, and freed after.

Peak memory is one decoder layer, the embeddings (or the final norm and LM head) while they are
used, and the activations, whatever the number of layers (the sequential onloading of
llm-compressor, Model-Optimizer's layerwise calibration and REAP's layerwise observer). Each layer
is loaded once and every batch is pushed through it before the next one is loaded.

**The model runs itself.** The skeleton is built by transformers (``from_config``) with its
parameters on the meta device and its buffers real: what a module computes at construction (rotary
frequencies, embedding scales) is the library's own. What a decoder layer is called with (its
attention mask for its layer type, sliding / chunked / linear-attention masks, the rotary tuple of
its layer type, position ids) is recorded from the backbone's own forward, once per batch shape: each
decoder layer's ``forward`` is replaced for one pass by a stand-in that records its arguments and
returns its input (the "catcher" of GPTQ and AutoRound; llm-compressor's sequential pipeline gets
the same from traced subgraphs). Each real layer is then called with exactly those arguments, so no
mask or rotary code is re-derived here, and the hidden state entering layer 0 is the one the
model's own embedding path computes.

On disk a layer's experts are usually one matrix per expert under the family's legacy names;
transformers 5 fuses them in memory (``mlp.experts.gate_up_proj`` (E, 2I, d), gate rows before up
rows; ``mlp.experts.down_proj`` (E, d, I)). ``layer_state_dict`` does that fusion for one layer,
from either on-disk layout, in the same order and dtype conversion as ``from_pretrained``, so a layer
loaded here computes exactly what the whole-model path computes (bit for bit on CPU; tested).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from harc_hpc.io.checkpoint import Checkpoint, CheckpointError
from harc_hpc.models.conversion import ModuleReader
from harc_hpc.models.families import family_for_config, is_wrapper
from harc_hpc.models.modeling import attention_implementation, check_remote_code, decoder


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


def text_renamings(fam) -> list:
    """How a multimodal wrapper's on-disk keys become its text causal LM's (none for a text model)."""
    return fam.text_renamings() if is_wrapper(fam) else []


def wrapped_text_config(config, head_on_disk: bool):
    """The text model's config of a multimodal wrapper's, with what the wrapper decides for it: the
    dtype, and whether the LM head is tied to the embeddings (tied when the checkpoint has no head)."""
    text = config.get_text_config(decoder=True)
    if getattr(config, "dtype", None) is not None:
        text.dtype = config.dtype
    text.tie_word_embeddings = not head_on_disk
    return text


def layer_state_dict(ckpt: Checkpoint, fam, layer: int, names: list[str], dtype: torch.dtype,
                     device: Optional[torch.device] = None, model_type: Optional[str] = None,
                     reader: Optional[ModuleReader] = None) -> dict:
    """The in-memory parameters ``names`` of decoder layer ``layer`` (names relative to the layer),
    read from the checkpoint in either expert layout and converted to ``dtype``. With a CUDA
    ``device`` every tensor is copied there as read, and the experts are fused and converted there
    (the host does reads only); the values are the same either way."""
    prefix = f"model.layers.{layer}."
    keys = ckpt.keys()
    key_set = set(keys)
    # transformers' own renames and fusions of this model type (harc_hpc.models.conversion)
    # without a reader mapped once for the whole checkpoint: this layer's keys only (a rename keeps
    # the layer index), not every key of the checkpoint renamed once per layer
    converted = reader or ModuleReader([k for k in keys if f"layers.{layer}." in k], prefix, model_type,
                                       lambda k: _read(ckpt, k, device), outer_renamings=text_renamings(fam))
    out = {}
    experts = None
    for name in names:
        disk = prefix + name
        if disk not in key_set and converted.has(disk):
            out[name] = converted.get(disk).to(dtype)
            continue
        if disk not in key_set and name.startswith("mlp."):
            alt = fam.disk_key(layer, f"{fam.moe_disk_module}.{name[4:]}")
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


@contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no initialisation
    work) and keep their buffers real, computed on the CPU by their own constructors."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def computed_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The non-persistent buffers of ``module`` (by name relative to it): computed at construction,
    never in a checkpoint."""
    out = {}
    for prefix, sub in module.named_modules():
        for name in sub._non_persistent_buffers_set:
            buf = sub._buffers.get(name)
            if buf is not None:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


class _Caught(BaseException):
    """Raised by the last stand-in decoder layer: the rest of the backbone's forward is not run. A
    control-flow signal, not an error: a BaseException, so that no ``except Exception`` in the
    model's own code can swallow it."""


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
        raw_config = json.loads((self.path / "config.json").read_text())
        # a checkpoint that brings its own modeling code: refused naming models.trust_remote_code
        check_remote_code(raw_config, trust_remote_code, where=str(self.path / "config.json"))
        config = AutoConfig.from_pretrained(str(self.path), trust_remote_code=trust_remote_code)
        self.family = family_for_config(raw_config)
        self.dtype = dtype or compute_dtype_for(self.device, _config_dtype(config))
        if is_wrapper(self.family):  # a multimodal wrapper: its text causal LM, read from under its prefix
            self.family.check_text_model(self.ckpt.keys(), raw_config, where=str(self.path))
            config = wrapped_text_config(config, f"{self.family.place.head}.weight" in self.ckpt)
        with torch.device("cpu"), parameters_on_meta():
            self.model = AutoModelForCausalLM.from_config(
                config, dtype=self.dtype, attn_implementation=attention_implementation(config, self.family.attn_implementation),
                trust_remote_code=trust_remote_code)
        self.model.eval()
        self.config = self.model.config
        self.backbone = decoder(self.model)
        self.embeddings = self.model.get_input_embeddings()
        self._module_reader: Optional[ModuleReader] = None
        self.num_layers = min(len(self.backbone.layers),
                              int(getattr(self.config, "num_hidden_layers", None) or len(self.backbone.layers)))
        # What the layers compute at construction, kept to restore after each onload; the parts of
        # the backbone without parameters (rotary embeddings) go to the device now, whole.
        self._computed = {i: {n: b.clone() for n, b in computed_buffers(self.layer(i)).items()}
                          for i in range(self.num_layers)}
        for name, child in self.backbone.named_children():
            if name != "layers" and not any(True for _ in child.parameters()):
                child.to(self.device)
        self._embed_onloaded = False
        self._head_onloaded = False
        # (batch, tokens, dtype, device) -> per layer (args, kwargs); the last few shapes only: a mask
        # of a sliding-window layer is B x T x T, and the loops go batch by batch
        self._calls: OrderedDict = OrderedDict()
        self._module_buffers: dict[str, dict[str, torch.Tensor]] = {}

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
        computed = self._computed.get(index, {})
        names = [prefix + n for prefix, target in zip(prefixes, targets)
                 for n, _ in [*target.named_parameters(), *target.named_buffers()]
                 if prefix + n not in computed]
        state = layer_state_dict(self.ckpt, self.family, index, names, self.dtype, self.device,
                                 reader=self._reader())
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
            with torch.no_grad():
                for n, value in computed.items():
                    if n.startswith(prefix):
                        target.get_buffer(n[len(prefix):]).copy_(value)
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
    def _reader(self) -> ModuleReader:
        """Every tensor of the checkpoint under its in-memory name (transformers' conversion mapping),
        mapped once."""
        if self._module_reader is None:
            self._module_reader = ModuleReader(self.ckpt.keys(), "", getattr(self.config, "model_type", None),
                                               lambda k: _read(self.ckpt, k, self.device), model=self.model,
                                               outer_renamings=text_renamings(self.family))
        return self._module_reader

    def _onload_module(self, module: torch.nn.Module, what: str,
                       replace: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Materialise a module outside the decoder layers (the embeddings, the final norm, the LM
        head) on the device, its tensors read under the names transformers' conversion mapping gives
        them (``replace``: {name in the module: tensor} used instead of the checkpoint's), keeping
        what its constructor computed."""
        prefix = next(n for n, m in self.model.named_modules() if m is module) + "."
        tied = self.model.get_expanded_tied_weights_keys()  # {"lm_head.weight": "model.embed_tokens.weight"}
        keys = set(self.ckpt.keys())
        # kept from construction: the module goes back to the meta device when released
        computed = self._module_buffers.setdefault(prefix, {n: b.clone() for n, b in computed_buffers(module).items()})
        state = {}
        for name in [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]:
            if name in computed:
                continue
            if replace is not None and name in replace:
                state[name] = replace[name].to(self.dtype)
                continue
            key = tied.get(prefix + name, prefix + name)
            if key in keys:
                state[name] = self.ckpt.get_tensor(key).to(self.dtype)
            elif self._reader().has(key):
                state[name] = self._reader().get(key).to(self.dtype)
            else:
                raise CheckpointError(f"{self.ckpt.name}: tensor {key!r} of the model's {what} is missing")
        module.to_empty(device=self.device)
        module.load_state_dict(state, strict=True)
        with torch.no_grad():
            for name, value in computed.items():
                module.get_buffer(name).copy_(value)

    def _record_layer_calls(self, **inputs) -> tuple[torch.Tensor, list]:
        """One pass of the backbone's own forward with every decoder layer stood in for: the hidden
        state entering layer 0 and, per layer, the (args, kwargs) it is called with."""
        layers = [self.layer(i) for i in range(self.num_layers)]
        calls: list = [None] * self.num_layers
        first: list = []

        def stand_in(i: int):
            def forward(hidden_states, *args, **kwargs):
                if i == 0:
                    first.append(hidden_states)
                calls[i] = (args, kwargs)
                if i == len(layers) - 1:
                    raise _Caught
                return self._as_layer_output(hidden_states)
            return forward

        for i, layer in enumerate(layers):
            layer.forward = stand_in(i)
        try:
            with torch.no_grad():
                self.backbone(**inputs, use_cache=False)
            raise RuntimeError(f"{type(self.backbone).__name__}: its forward did not call decoder layer "
                               f"{len(layers) - 1}; the layer-wise forward cannot run it")
        except _Caught:
            pass
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)
        return first[0], calls

    def _as_layer_output(self, hidden: torch.Tensor):
        """What a stand-in decoder layer returns: the hidden state, and ``None`` for each further value
        the family's layers return (the backbone unpacks them; ``layer_output_extras``)."""
        extras = self.family.layer_output_extras
        return (hidden, *([None] * extras)) if extras else hidden

    def layer_call(self, index: int, hidden: torch.Tensor) -> tuple[tuple, dict]:
        """(args, kwargs) the backbone's forward calls decoder layer ``index`` with, besides the
        hidden state, for a right-padded (B, T, d) batch like ``hidden`` (recorded once per shape)."""
        key = (tuple(hidden.shape[:2]), hidden.dtype, hidden.device)
        if key not in self._calls:
            probe = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
            self._remember(key, self._record_layer_calls(inputs_embeds=probe)[1])
        self._calls.move_to_end(key)
        return self._calls[key][index]

    def _remember(self, key, calls: list, keep: int = 2) -> None:
        self._calls[key] = calls
        self._calls.move_to_end(key)
        while len(self._calls) > keep:
            self._calls.popitem(last=False)

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The hidden state entering decoder layer 0 for token ids (B, T), as the backbone's own
        forward computes it (its embedding module, any scaling it applies)."""
        if not self._embed_onloaded:
            self._onload_module(self.embeddings, "embeddings")
            self._embed_onloaded = True
        hidden, calls = self._record_layer_calls(input_ids=ids.to(self.device))
        self._remember((tuple(hidden.shape[:2]), hidden.dtype, hidden.device), calls)
        return hidden

    def embedding_disk_keys(self) -> dict[str, str]:
        """{parameter of the embeddings module: the checkpoint key it is read from}."""
        prefix = next(n for n, m in self.model.named_modules() if m is self.embeddings) + "."
        keys = set(self.ckpt.keys())
        out = {}
        for name, _ in self.embeddings.named_parameters():
            memory = prefix + name
            out[name] = memory if memory in keys else self._reader().direct.get(memory, memory)
        return out

    def onload_embeddings(self, tensors: dict[str, torch.Tensor]) -> None:
        """The embeddings module on the device with ``tensors`` ({parameter name: value}, e.g. merged
        embeddings) instead of the checkpoint's; ``embed`` then runs the model's own forward on them."""
        self._onload_module(self.embeddings, "embeddings", replace=tensors)
        self._embed_onloaded = True

    def release_embeddings(self) -> None:
        if self._embed_onloaded:
            self.embeddings.to("meta")
            self._embed_onloaded = False
            _return_freed_memory()

    def head_modules(self) -> list[torch.nn.Module]:
        """The modules with weights that run after the last decoder layer: every child of the backbone
        but its layers and its embeddings (the final norm, whatever it is called), and of the causal
        LM but its backbone (the LM head)."""
        def weighted(m):
            return any(True for _ in m.parameters())

        return ([m for n, m in self.backbone.named_children() if n != "layers" and m is not self.embeddings and weighted(m)]
                + [m for m in self.model.children() if m is not self.backbone and weighted(m)])

    def _onload_head(self) -> None:
        """The modules after the last decoder layer on the device. A tied head (``tie_word_embeddings``;
        its ``lm_head.weight`` is then usually not on disk) reads the embedding matrix, as
        transformers' own tying does."""
        for module in self.head_modules():
            self._onload_module(module, "head")
        self._head_onloaded = True

    @torch.no_grad()
    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of a batch leaving the last decoder layer, computed by the model's own
        forward from there on: the backbone's final norm (whatever it is called) and the causal LM's
        head with whatever it does to the logits (Granite's ``logits_scaling``, soft-capping). The
        decoder layers are stood in for: the first one hands on ``hidden``, the others pass it
        through. The modules it runs are onloaded on first use and kept until ``release_head``."""
        if not self._head_onloaded:
            self._onload_head()
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        layers = [self.layer(i) for i in range(self.num_layers)]
        for i, layer in enumerate(layers):
            layer.forward = ((lambda h, *a, **k: self._as_layer_output(hidden)) if i == 0
                             else (lambda h, *a, **k: self._as_layer_output(h)))
        try:
            probe = torch.zeros(hidden.shape, dtype=self.dtype, device=self.device)
            return self.model(inputs_embeds=probe, use_cache=False).logits
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)

    def release_head(self) -> None:
        for module in self.head_modules():
            module.to("meta")
        self._head_onloaded = False
        _return_freed_memory()

    @torch.no_grad()
    def run_layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Push a (B, T, d) batch through the (onloaded) decoder layer ``index``, called as the
        backbone's own forward calls it."""
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        args, kwargs = self.layer_call(index, hidden)
        out = self.layer(index)(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def run_attention_half(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """The residual stream entering the feed-forward half of the (onloaded) decoder layer
        ``index`` for a right-padded (B, T, d) batch (the family's ``attention_half``, given what the
        backbone's forward gives the layer)."""
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        args, kwargs = self.layer_call(index, hidden)
        if args:
            raise TypeError(f"decoder layer {index} is called with positional arguments; the family's "
                            "attention_half takes keyword arguments only")
        return self.family.attention_half(self.layer(index), hidden, **kwargs)

    @torch.no_grad()
    def run_moe_half(self, index: int, residual: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``index``'s output from the residual entering its feed-forward half."""
        return self.family.moe_half(self.layer(index), residual.to(device=self.device, dtype=self.dtype))

    def close(self) -> None:
        self.ckpt.close()
