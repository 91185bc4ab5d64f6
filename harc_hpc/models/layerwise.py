"""The layer loop every stage that runs a model shares: embed every batch, then per decoder layer
onload it, push every batch of every group through it, offload it (llm-compressor's sequential
pipeline, on harc_hpc.models.onload's OnloadedModel).

What a stage collects while the batches pass (router inputs, Grams, router logits, hidden states
entering a block) is a ``LayerObserver``: hooks at the start and end of a layer, of a group of
batches (one dataset, one evaluation) and of a batch. Overrides are the engine's too: per layer
(tensors that replace the checkpoint's when the layer is onloaded, e.g. calibrated routers) and per
group (tensors swapped in while one group's batches run and put back after, e.g. another model's
routers in an evaluation), so no stage swaps weights by hand.

The hidden states of a group are any store with ``get(i)`` / ``set(i, h)`` and ``shapes`` (the
stages' ``BatchStates``: device, host memory or node-local disk); each batch stays padded exactly as
the whole-model forward pads it, which is what makes the loop equal to that forward bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Mapping, Optional, Protocol

import torch

from harc_hpc.progress import Progress


class BatchStore(Protocol):
    shapes: list

    def get(self, i: int) -> torch.Tensor: ...

    def set(self, i: int, value: torch.Tensor) -> None: ...


class LayerObserver:
    """What a stage does while batches pass decoder layer ``j``; every hook is optional.

    Order per layer: ``layer_start`` (the layer is onloaded), then per group ``group_start``, per
    batch ``batch_start`` / ``batch_end`` (with the layer's output), ``group_end``; then the layer is
    offloaded and ``layer_end`` runs."""

    def layer_start(self, j: int) -> None:
        pass

    def group_start(self, j: int, group) -> None:
        pass

    def batch_start(self, j: int, group, i: int) -> None:
        pass

    def batch_end(self, j: int, group, i: int, hidden: torch.Tensor) -> None:
        pass

    def group_end(self, j: int, group) -> None:
        pass

    def layer_end(self, j: int) -> None:
        pass


def embed_batches(model, store: BatchStore, id_batches: Iterable[torch.Tensor]) -> None:
    """Batch ``i`` of ``store`` := the hidden state entering decoder layer 0 for token ids
    ``id_batches[i]`` (B, T), as the model's own forward computes it."""
    for i, ids in enumerate(id_batches):
        store.set(i, model.embed(ids))


@contextmanager
def swapped(model, j: int, tensors: Optional[Mapping[str, torch.Tensor]]):
    """``tensors`` ({parameter name in decoder layer ``j``: value}) in place of the onloaded layer's
    while the block runs, the layer's own put back after (also on an error)."""
    held = []
    try:
        for name, value in (tensors or {}).items():
            held.append((name, model.swap(j, name, value)))
        yield
    finally:
        for name, value in reversed(held):
            model.swap(j, name, value)


def run_layers(model, groups: Mapping[object, BatchStore], layers: Iterable[int], *,
               observer: Optional[LayerObserver] = None, overrides: Optional[Mapping[int, dict]] = None,
               group_overrides: Optional[Mapping[object, Mapping[int, dict]]] = None, update: bool = True,
               label: str = "layer-wise pass") -> None:
    """Push every batch of every group through decoder layers ``layers`` of ``model``, one layer on
    the device at a time. ``overrides[j]``: tensors replacing the checkpoint's when layer j is
    onloaded; ``group_overrides[g][j]``: tensors swapped into layer j while group g's batches run;
    ``update``: each batch's state becomes the layer's output (False: the states stay, as a pass
    that only observes)."""
    observer = observer or LayerObserver()
    overrides = overrides or {}
    group_overrides = group_overrides or {}
    for j in layers:
        model.onload(j, overrides.get(j))
        try:
            observer.layer_start(j)
            for group, store in groups.items():
                n = len(store.shapes)
                observer.group_start(j, group)
                bar = Progress(n, f"{label} layer {j} {group} (batches)")
                try:
                    with swapped(model, j, group_overrides.get(group, {}).get(j)):
                        for i in range(n):
                            observer.batch_start(j, group, i)
                            hidden = model.run_layer(j, store.get(i))
                            observer.batch_end(j, group, i, hidden)
                            if update:
                                store.set(i, hidden)
                            bar.update(1)
                finally:
                    bar.close()
                observer.group_end(j, group)
        finally:
            model.offload(j)
        observer.layer_end(j)
