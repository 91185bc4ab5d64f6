"""On-disk checkpoint names and layouts as transformers itself converts them, one piece at a time.

transformers 5 describes, per model type, how a checkpoint's tensors become the model's parameters
(``conversion_mapping.get_checkpoint_conversion_mapping``): ``WeightRenaming`` (a regex rename, e.g.
Mixtral's ``.block_sparse_moe.`` -> ``.mlp.``, PhiMoE's router ``gate`` -> ``router``) and
``WeightConverter`` (several tensors -> one: the per-expert matrices stacked by ``MergeModulelist``,
gate and up rows joined by ``Concatenate``, ``Transpose``). ``from_pretrained`` applies them to the
whole checkpoint; the layer-wise forward needs one decoder layer (or one module) at a time, so
``ModuleReader`` maps the disk keys under a prefix with transformers' own ``rename_source_key`` and
runs the converters' own operations on just those tensors (as mergekit's
``architecture/conversion.py`` wraps the same API). The mapping objects are stateful inside
transformers' loader; here only their patterns and their operations' ``convert`` are used.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

import torch

from harc_hpc.io.checkpoint import CheckpointError


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def conversion_mapping(model_type: Optional[str]) -> tuple[list, list]:
    """(renamings, converters) transformers applies when loading ``model_type`` (empty lists when it
    has none, or when this transformers has no conversion mapping)."""
    if not model_type:
        return [], []
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # transformers < 5
        return [], []
    mapping = get_checkpoint_conversion_mapping(model_type) or []
    return ([w for w in mapping if isinstance(w, WeightRenaming)],
            [w for w in mapping if isinstance(w, WeightConverter)])


class ModuleReader:
    """The in-memory tensors of the module under ``prefix`` (``model.layers.3.``), read from disk keys
    through the model type's conversion mapping. ``read(key)`` returns a disk tensor on the target
    device (the caller's reader: pinned copies, dequantisation)."""

    def __init__(self, disk_keys, prefix: str, model_type: Optional[str], read: Callable[[str], torch.Tensor],
                 model=None, outer_renamings: Sequence[tuple[str, str]] = ()):
        """``outer_renamings``: (regex, replacement) applied to every disk key before the model type's
        own mapping, the first that matches; a key none matches is left out (a multimodal wrapper's
        text model: harc_hpc.models.families.wrappers, ``text_renamings``)."""
        self.prefix = prefix
        self.read = read
        self.model = model  # the (meta) model, for operations that read shapes from it (Split)
        renamings, converters = conversion_mapping(model_type)
        self.direct: dict[str, str] = {}  # in-memory full key -> disk key
        # in-memory full key -> (converter, {source pattern: [disk keys, natural order]})
        self.converted: dict[str, tuple] = {}
        if renamings or converters:
            from transformers.core_model_loading import rename_source_key
        outer = [(re.compile(pattern), repl) for pattern, repl in outer_renamings]
        for disk in disk_keys:
            source = disk
            if outer:
                source = next((rx.sub(repl, disk, count=1) for rx, repl in outer if rx.match(disk)), None)
                if source is None:
                    continue
            if not (renamings or converters):
                if source.startswith(prefix):
                    self.direct[source] = disk
                continue
            memory, pattern = rename_source_key(source, renamings, converters)
            if not memory.startswith(prefix):  # filtered after renaming: a rename may change the prefix
                continue
            if pattern is None:
                self.direct.setdefault(memory, disk)
                continue
            conv = next(c for c in converters if pattern in c.source_patterns)
            _, sources = self.converted.setdefault(memory, (conv, {}))
            sources.setdefault(pattern, []).append(disk)

    def has(self, key: str) -> bool:
        return key in self.direct or key in self.converted

    def get(self, key: str) -> torch.Tensor:
        """In-memory tensor ``key`` (a full name under the prefix)."""
        if key in self.direct:
            return self.read(self.direct[key])
        if key not in self.converted:
            raise KeyError(key)
        conv, sources = self.converted[key]
        data = {p: [self.read(k) for k in sorted(sources[p], key=_natural)]
                for p in conv.source_patterns if p in sources}
        missing = [p for p in conv.source_patterns if p not in sources]
        if missing:
            raise CheckpointError(f"{key} is made from {conv.source_patterns}, but the checkpoint has no "
                                  f"tensor matching {missing} under {self.prefix!r}")
        for op in conv.operations:
            data = op.convert(data, source_patterns=list(conv.source_patterns),
                              target_patterns=list(conv.target_patterns), full_layer_name=key, model=self.model)
        if len(data) > 1:  # one tensor split into several (a fused qkv): the one this key names
            mine = [t for pattern, t in data.items() if re.search(pattern, key)]
            data = {key: mine[0]} if len(mine) == 1 else data
        if len(data) != 1:
            raise CheckpointError(f"{key}: transformers' conversion {type(conv).__name__}"
                                  f"({conv.source_patterns} -> {conv.target_patterns}) gave {len(data)} tensors")
        out = next(iter(data.values()))
        return out[0] if isinstance(out, list) else out
