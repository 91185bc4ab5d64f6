"""The files of the merge-statistics stage, and their readers for merge-experts.

``merge-statistics/<source>/`` holds, for a Gram method (RegMean):

* ``layer-NNN.safetensors``: the Grams X^T X of decoder layer NNN's linear inputs, float32, one
  tensor per distinct input (q/k/v share one; every expert has ``experts.<e>.in`` for its gate/up
  and ``experts.<e>.mid`` for its down projection);
* ``layer-NNN.json``: ``{"layer", "tokens", "weights": {unit name: Gram name}, "grams": {Gram name:
  tokens}, "expert_tokens": [per expert]}``; a unit name is the on-disk weight key, or for fused
  on-disk experts the per-expert unit name the merge engine gives it (``<key>[<e>].gate``);
* ``meta.json``: written last: the kind, the source, the task digest, the token count.

and for a Fisher method ``fisher/`` (a safetensors checkpoint directory with the source's own keys)
with ``fisher/meta.json``. The directory is published whole when complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from harc_hpc.errors import InputDataError, RunStateError

STATISTICS_DIR = "merge-statistics"
META = "meta.json"


def statistics_dir(run_dir: Path) -> Path:
    return Path(run_dir) / STATISTICS_DIR


def source_dir(run_dir: Path, source: str) -> Path:
    return statistics_dir(run_dir) / source


def layer_file(folder: Path, layer: int, suffix: str) -> Path:
    return Path(folder) / f"layer-{layer:03d}.{suffix}"


def read_meta(folder: Path) -> Optional[dict]:
    try:
        return json.loads((Path(folder) / META).read_text())
    except (OSError, ValueError):
        return None


def expert_unit_names(fam, layer: int, expert: int, layout: str) -> dict[str, str]:
    """The merge units of one expert's projections ({"gate", "up", "down"} -> unit name) as
    ``harc_hpc.merge.engine.plan_units`` names them at per-expert granularity."""
    if layout == "per_expert":
        return {p: fam.expert_key(layer, expert, p) for p in ("gate", "up", "down")}
    gate_up, down = fam.fused_key(layer, "gate_up"), fam.fused_key(layer, "down")
    return {"gate": f"{gate_up}[{expert}].gate", "up": f"{gate_up}[{expert}].up", "down": f"{down}[{expert}]"}


def _require(folder: Path, source: str, kind: str) -> dict:
    meta = read_meta(folder)
    if meta is None:
        raise RunStateError(f"no merge statistics for source {source!r}", where=str(folder),
                            hint="run the merge-statistics stage first (harc-hpc submit runs it)")
    if meta.get("kind") != kind:
        raise RunStateError(f"the merge statistics of source {source!r} are {meta.get('kind')!r}, not {kind!r}",
                            where=str(folder / META), hint="rerun the merge-statistics stage")
    return meta


class GramReader:
    """One source's Grams, read a unit at a time (one per-layer file open at a time)."""

    def __init__(self, folder: Path, source: str, require_meta: bool = True):
        self.folder = Path(folder)
        self.source = source
        self.meta = _require(self.folder, source, "gram") if require_meta else None
        self.index: dict[str, tuple[int, str, int]] = {}  # unit name -> (layer, Gram name, tokens)
        self._open_layer: Optional[int] = None
        self._file = None
        self.refresh()

    def refresh(self) -> None:
        """Index the layer files present now (a sequential pass adds them one layer at a time)."""
        for path in sorted(self.folder.glob("layer-*.json")):
            info = json.loads(path.read_text())
            for unit, g in info["weights"].items():
                self.index[unit] = (int(info["layer"]), g, int(info["grams"][g]))
        self._open_layer, self._file = None, None

    def gram(self, unit_name: str, device: torch.device) -> Optional[tuple[torch.Tensor, int]]:
        hit = self.index.get(unit_name)
        if hit is None:
            return None
        layer, name, tokens = hit
        if self._open_layer != layer:
            from safetensors import safe_open

            path = layer_file(self.folder, layer, "safetensors")
            if not path.is_file():
                raise InputDataError(f"Gram file of layer {layer} is missing", where=str(path),
                                     hint="rerun the merge-statistics stage")
            self._file = safe_open(str(path), framework="pt")
            self._open_layer = layer
        try:
            g = self._file.get_tensor(name)
        except Exception as exc:
            raise InputDataError(f"tensor {name!r} (the Gram of {unit_name}) cannot be read: {exc}",
                                 where=str(layer_file(self.folder, layer, "safetensors"))) from None
        return g.to(device=device, dtype=torch.float64), tokens


class FisherReader:
    """One source's diagonal Fisher (``<folder>/fisher/``: a checkpoint directory of float32 shards
    keyed by the source's own tensor names), read by a unit's pieces with the checkpoint reader's
    positional reads (a slice of a fused tensor reads only that slice)."""

    def __init__(self, folder: Path, source: str):
        from harc_hpc.io.checkpoint import Checkpoint

        self.folder = Path(folder) / "fisher"
        self.source = source
        if read_meta(self.folder) is None:
            raise RunStateError(f"no Fisher statistics for source {source!r}", where=str(self.folder),
                                hint="run the merge-statistics stage first (harc-hpc submit runs it)")
        self.ckpt = Checkpoint(self.folder, name=f"Fisher of {source}")

    def fisher(self, unit) -> torch.Tensor:
        flat = torch.empty(unit.numel, dtype=torch.float32)
        pos = 0
        for p in unit.pieces:
            if p.key not in self.ckpt:
                raise InputDataError(f"no Fisher for tensor {p.key} of source {self.source!r}", where=str(self.folder),
                                     hint="rerun the merge-statistics stage")
            self.ckpt.read_part(p.key, p.start, p.numel, out=flat[pos:pos + p.numel])
            pos += p.numel
        return flat.reshape(unit.shape)

    def close(self) -> None:
        self.ckpt.close()
