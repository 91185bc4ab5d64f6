"""RegMean++'s Grams: taken layer by layer on the partially merged model's own activations.

RegMean takes each source's Grams on that source's own model. RegMean++ (the sequential variant)
feeds every source's calibration data through the *merged* decoder layers 0..l-1 and takes the Grams
of layer l inside each source's own layer l from there; then layer l is merged (RegMean with those
Grams) and every source's hidden states go through the merged layer l to the next. The embeddings
entering layer 0 are the merged embeddings (the fallback method's).

Because the Grams depend on the merge (alpha, the fallback), this runs inside merge-experts (whose
digest covers ``merge.*``; calibration data enter through merge-statistics' digest), writing the same
per-layer Gram files as merge-statistics into a scratch folder that the merge then reads like
RegMean's, so the final merge applies exactly the rule of ``regmean`` to these Grams. The
sequential pass holds every source's in-flight hidden states (as capture does), one decoder layer
(a source's, then the merged one) and one unit of every source at a time.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from harc_hpc.config import PipelineConfig
from harc_hpc.errors import UsageError
from harc_hpc.io import merge_statistics as ms
from harc_hpc.io.atomic import write_json_atomic
from harc_hpc.models.modeling import pad_batch, pick_device

log = logging.getLogger(__name__)


class _LayerTensors:
    """A layer's merged tensors behind the two methods ``layer_state_dict`` reads a checkpoint with."""

    def __init__(self, keys, tensors: dict):
        self._keys = list(keys)
        self._tensors = tensors

    def keys(self):
        return self._keys

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._tensors[key]


def sequential_grams(cfg: PipelineConfig, out_root: Path, method, params) -> dict:
    """Write RegMean++'s per-layer Grams of every source under ``out_root/<source>/``."""
    from harc_hpc.io.checkpoint import Checkpoint, resolve_model_path
    from harc_hpc.merge.base import GramStatistic, MergeContext
    from harc_hpc.merge.engine import MergeInput, _promote, _read_unit, plan_units
    from harc_hpc.dtypes import torch_dtype
    from harc_hpc.models.layerwise import embed_batches, run_layers
    from harc_hpc.models.onload import OnloadedModel, layer_state_dict
    from harc_hpc.stages.capture_activations import BatchStates, placement_for
    from harc_hpc.stages.merge_statistics import layer_pass, require_gram_support, source_batches, write_layer

    names = [s.name for s in cfg.models.sources]
    device = pick_device(cfg.harc.device)
    local = {s.name: resolve_model_path(s.path, revision=cfg.models.revision) for s in cfg.models.sources}
    models = {n: OnloadedModel(local[n], device, trust_remote_code=cfg.models.trust_remote_code) for n in names}
    ref = models[names[0]]
    fam = ref.family
    require_gram_support(fam, method.name, names[0])
    conf = ref.ckpt.config
    layout_name = fam.detect_layout(ref.ckpt.keys())
    moe_layers = set(fam.moe_layers(conf))
    base = (MergeInput("base", Checkpoint(resolve_model_path(cfg.models.base, revision=cfg.models.revision),
                                          name="base")) if cfg.models.base is not None else None)
    inputs = [MergeInput(n, models[n].ckpt) for n in names]
    units = plan_units(ref.ckpt, fam, "per_expert")
    for n in names:
        (out_root / n).mkdir(parents=True, exist_ok=True)
    readers = [ms.GramReader(out_root / n, n, require_meta=False) for n in names]
    merge_device = pick_device(cfg.merge.device, "merge.device")

    def gram(unit, i):
        hit = readers[i].gram(unit.name, merge_device)
        return None if hit is None else GramStatistic(*hit)

    ctx = MergeContext(seed=cfg.run.seed, device=merge_device, gram=gram)
    compute = torch_dtype(cfg.merge.dtype, UsageError)

    def merged_tensors(selected) -> dict[str, torch.Tensor]:
        """The merge of ``selected`` units, exactly as merge-experts computes it, by tensor key."""
        flat: dict[str, torch.Tensor] = {}
        for unit in selected:
            srcs = [_read_unit(i, unit, True) for i in inputs]
            if not srcs[0].is_floating_point():
                result = srcs[0]
            else:
                c = compute or _promote([s.dtype for s in srcs])
                b = _read_unit(base, unit, True).to(c) if base is not None else None
                result = method.merge(b, [s.to(c) for s in srcs], unit, params, names, ctx)
            r = result.reshape(-1)
            pos = 0
            for p in unit.pieces:
                if p.key not in flat:
                    numel = 1
                    for s in ref.ckpt.tensor_shape(p.key):
                        numel *= s
                    flat[p.key] = torch.empty(numel, dtype=r.dtype)
                flat[p.key][p.start:p.start + p.numel] = r[pos:pos + p.numel]
                pos += p.numel
        return {k: v.reshape(ref.ckpt.tensor_shape(k)) for k, v in flat.items()}

    batches_of, states, tokens = {}, {}, {}
    # the merged embeddings, run by the model's own embedding forward (any scaling it applies)
    embedding_keys = ref.embedding_disk_keys()
    merged = merged_tensors([u for u in units if u.name in set(embedding_keys.values())])
    ref.onload_embeddings({name: merged[key] for name, key in embedding_keys.items()})
    del merged
    d = ref.config.hidden_size
    try:
        for n in names:
            seqs, plan, shapes, valid = source_batches(cfg, n, local[n], device)
            batches_of[n] = valid
            tokens[n] = sum(len(s) for s in seqs)
            nbytes = sum(b * t for b, t in shapes) * d * ref.dtype.itemsize
            states[n] = BatchStates(shapes, d, ref.dtype, device, placement_for(nbytes, device, ref.layer_bytes(0)),
                                    scratch_dir=cfg.run.node_local_dir)
            embed_batches(ref, states[n], [pad_batch([torch.tensor(seqs[j]) for j in idx])[0] for idx in plan])
        ref.release_embeddings()
        for j in range(ref.num_layers):
            for n, reader in zip(names, readers):
                grams = layer_pass(models[n], j, states[n], batches_of[n], layout_name, moe_layers,
                                   f"regmean++ {n}", update_states=False)
                write_layer(out_root / n, j, grams, tokens[n], f"regmean++, source {n}, decoder layer {j}")
                reader.refresh()
            merged = merged_tensors([u for u in units if u.layer == j])
            module = ref.layer(j)
            wanted = [p for p, _ in module.named_parameters()] + [b for b, _ in module.named_buffers()]
            state = layer_state_dict(_LayerTensors(ref.ckpt.keys(), merged), fam, j, wanted, ref.dtype)
            del merged
            # every source's data through the merged layer j
            run_layers(ref, states, [j], overrides={j: state}, label="regmean++ merged")
        for n in names:
            write_json_atomic(out_root / n / ms.META, {
                "kind": "gram", "source": n, "sequential": True, "tokens": tokens[n], "layers": ref.num_layers,
                "layout": layout_name, "stored_dtype": "float32"})
    finally:
        for st in states.values():
            st.close()
        for m in models.values():
            m.close()
        if base is not None:
            base.ckpt.close()
    return {"tokens": tokens, "layers": ref.num_layers}
