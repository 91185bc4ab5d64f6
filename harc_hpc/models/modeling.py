"""Shared pieces for running transformers decoder-only MoE models: device choice, whole-model
loading (the tests' and benchmarks' references), padding, router-input hooks. The layer-at-a-time
path that calibration and the report use is harc_hpc.models.onload; the decoder layers of OLMoE,
Qwen2/3-MoE and Mixtral share one calling convention in transformers 5 (``layer(hidden,
attention_mask=, position_ids=, position_embeddings=)``), which is all it relies on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional

import torch


def pick_device(name: str = "auto", key: str = "harc.device") -> torch.device:
    """The device ``name`` stands for here, CUDA with its index; a device that does not exist is a
    UsageError naming ``key`` (harc_hpc.devices.resolve_device)."""
    from harc_hpc.devices import resolve_device

    return resolve_device(name, key)


def free_memory_bytes(device: torch.device) -> int:
    """Memory free on ``device`` now: CUDA's free bytes, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def load_causal_lm(path: Path | str, device: torch.device, dtype: Optional[torch.dtype] = None,
                   trust_remote_code: bool = False):
    """Load a checkpoint for calibration: eval mode, SDPA attention (causal without a mask tensor).

    On CPU the default compute dtype is float32 (bf16 matmuls on CPU are slow and not reproducible
    across thread counts); on GPU the checkpoint's own dtype.
    """
    import json

    from transformers import AutoModelForCausalLM

    from harc_hpc.models.families import UnsupportedModelError, family_for_config

    if dtype is None and device.type == "cpu":
        dtype = torch.float32
    attention = "sdpa"
    config_file = Path(str(path)) / "config.json"
    if config_file.is_file():  # a family may need another attention (GPT-OSS's sinks: eager)
        try:
            attention = family_for_config(json.loads(config_file.read_text())).attn_implementation
        except UnsupportedModelError:  # a dense model (MergeME's experts): SDPA
            pass
    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=dtype if dtype is not None else "auto",
        attn_implementation=attention,
        trust_remote_code=trust_remote_code,
        local_files_only=Path(str(path)).exists(),
    )
    model.to(device)
    model.eval()
    return model


def decoder(model):
    """The backbone (``model.model``) holding embed_tokens, rotary_emb, layers and norm."""
    inner = getattr(model, "model", model)
    for attr in ("embed_tokens", "layers", "rotary_emb"):
        if not hasattr(inner, attr):
            raise TypeError(f"{type(model).__name__}: backbone has no '{attr}'; not a supported decoder layout")
    return inner


def pad_batch(seqs: list[torch.Tensor], pad_value=0) -> tuple[torch.Tensor, list[int]]:
    """Right-pad a list of (T_i, ...) tensors. Right padding keeps real tokens exact under a causal
    mask: they never attend to the pads that come after them."""
    lengths = [int(s.shape[0]) for s in seqs]
    T = max(lengths)
    out = seqs[0].new_full((len(seqs), T, *seqs[0].shape[1:]), pad_value)
    for i, s in enumerate(seqs):
        out[i, : lengths[i]] = s
    return out, lengths


def unpad(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(B, T, d) -> (sum lengths, d) keeping only real tokens, in sequence order."""
    return torch.cat([x[i, :n] for i, n in enumerate(lengths)], dim=0)


class RouterInputRecorder:
    """Forward hooks on router modules that keep their inputs (the router input x of each token)."""

    def __init__(self, modules: dict[int, torch.nn.Module]):
        self.records: dict[int, list[torch.Tensor]] = {l: [] for l in modules}
        self._handles = [m.register_forward_hook(self._hook(l)) for l, m in modules.items()]

    def _hook(self, layer: int) -> Callable:
        def hook(module, inputs, output):
            self.records[layer].append(inputs[0].detach())

        return hook

    def pop(self, layer: int) -> torch.Tensor:
        """All inputs recorded for ``layer`` since the last pop, as one (N, d) tensor."""
        parts = self.records[layer]
        self.records[layer] = []
        return torch.cat([p.reshape(-1, p.shape[-1]) for p in parts], dim=0)

    def close(self):
        for h in self._handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def batches(n: int, size: int) -> Iterable[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))
