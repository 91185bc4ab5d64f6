"""merge-statistics: what a data-driven merge method needs from each source's own calibration data.

Planned only when the configured merge method has ``statistics`` (``needed``). For RegMean
("gram"), each source model runs over its calibration data (``models.sources.*.calibration``,
tokenised with that source's tokenizer) one decoder layer at a time (harc_hpc.models.onload: a
layer is read onto the device, every batch goes through it, it is freed), and forward hooks
accumulate the Gram X^T X of the input of every linear map of the layer, over real tokens only
(padding excluded):

* every ``nn.Linear`` of the layer (attention, shared experts, shared-expert gate, dense MLPs): its
  input; maps that take the same input tensor (q, k, v; a shared expert's gate and up) share one Gram;
* the router: its input (all tokens);
* every routed expert: the tokens that source's own router sends to it (the ``top_k_index`` the
  model hands its experts module, i.e. the family's own selection rule) for gate/up, and the
  intermediate activations act(x W_gate^T) * (x W_up^T) of those tokens for down. For this the
  experts module runs the gated-MLP loop of transformers' eager experts here (``_experts_forward``),
  which takes both Grams on the way instead of computing the experts twice.

Precision: each batch's X^T X is a float32 product on the device (of float32-cast inputs) added in
place into a float32 partial sum, which is added into a float64 total every ``FLUSH_ROWS`` rows; the
files store float32. Per layer that is E (d^2 + I^2) + (a few) d^2 Gram entries on the device, 12
bytes each (float64 total + float32 partial; OLMoE: ~4 GB, Qwen3-30B-A3B: ~7 GB), whatever the
number of sources (one source at a time) or tokens.

Each finished layer is written at once (``layer-NNN.safetensors`` + ``.json``, atomically) under
``partial/merge-statistics/<source>/`` together with the in-flight hidden states and a manifest that
carries the task digest, so a task killed at its time limit resumes after the last finished layer;
the folder is published as ``merge-statistics/<source>/`` with its ``meta.json`` when complete.

For Fisher ("fisher") it calls ``harc_hpc.stages.fisher_statistics:compute_source_fisher``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch

from harc_hpc.config import ConfigError, PipelineConfig
from harc_hpc.errors import UsageError, require_finite
from harc_hpc.io import merge_statistics as ms
from harc_hpc.io.atomic import atomic_path, publish, remove_path, write_json_atomic
from harc_hpc.io.calibration_data import tokenize_task
from harc_hpc.models.modeling import batches, pad_batch, pick_device
from harc_hpc.models.layerwise import LayerObserver, run_layers

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: a Gram's float32 partial sum is added into its float64 total after this many rows
FLUSH_ROWS = 16384
MANIFEST_FORMAT = "harc-merge-statistics-partial/1"
#: families whose experts the Gram pass does not model yet (their experts compute differently:
#: GPT-OSS (E, in, out) with biases and a clamped SwiGLU; Llama 4 scores the inputs before the experts)
UNSUPPORTED_FAMILIES = ("gpt_oss", "llama4_text")


# -- planning ------------------------------------------------------------------------------------

def statistics_kind(cfg: PipelineConfig) -> Optional[str]:
    """What the configured merge method needs ("gram", "fisher") or None (a data-free method). A
    preset decides the method, as in merge-experts."""
    from harc_hpc.merge import PRESETS, get_method

    name = cfg.merge.method
    if cfg.merge.preset is not None and cfg.merge.preset in PRESETS:
        name = PRESETS[cfg.merge.preset]["method"]
    return get_method(name).statistics


def needed(cfg: PipelineConfig) -> bool:
    """The stage's ``enabled_if``: the merge method has statistics. Then every source must have
    calibration data, checked here, at planning, before any job runs."""
    kind = statistics_kind(cfg)
    if kind is None:
        return False
    for src in cfg.models.sources:
        if src.calibration is None or not src.calibration.files:
            raise ConfigError(f"models.sources[{src.name}].calibration: merge method {cfg.merge.method!r} merges "
                              f"with {kind} statistics of each source's own calibration data, and source "
                              f"{src.name!r} has none (give it calibration.files)")
    return True


# -- the Gram pass of one decoder layer ----------------------------------------------------------

def _experts_module(layer_module: torch.nn.Module):
    """(qualified name, module) of the routed experts of a decoder layer (fused 3-D gate_up_proj and
    down_proj), or (None, None) for a dense layer."""
    for name, mod in layer_module.named_modules():
        p = getattr(mod, "gate_up_proj", None)
        if isinstance(p, torch.Tensor) and p.dim() == 3 and isinstance(getattr(mod, "down_proj", None), torch.Tensor):
            return name, mod
    return None, None


class LayerGrams:
    """Forward hooks on one onloaded decoder layer that accumulate its Grams.

    ``begin(valid)`` before each batch (``valid``: (B*T,) bool, the real tokens), ``end()`` after it;
    ``finish()`` at the end (the float64 sums). ``disk_key(param name)`` maps a parameter of the layer to its on-disk key
    (None when the checkpoint has none)."""

    def __init__(self, layer_module: torch.nn.Module, router_module: Optional[torch.nn.Module], disk_key,
                 expert_names, num_experts: int):
        self.layer = layer_module
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.weights: dict[str, str] = {}  # unit name -> Gram name
        self.expert_tokens = [0] * num_experts
        self.num_experts = num_experts
        self._partial: dict[str, torch.Tensor] = {}
        self._unflushed: dict[str, int] = {}
        self._valid: Optional[torch.Tensor] = None
        self._all_valid = False
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}  # id(input) -> (input, Gram name), one batch
        self._share: dict[str, str] = {}  # module name -> Gram name (fixed by the first batch)
        self._handles = []
        self.experts = None
        modules = dict(layer_module.named_modules())
        if router_module is not None and not any(m is router_module for m in modules.values()):
            raise ValueError("the router of this layer is not one of its modules")
        _, experts = _experts_module(layer_module)
        for name, mod in modules.items():
            # the router is a plain module with a weight in most families: hooked like a linear map
            if isinstance(mod, torch.nn.Linear) or mod is router_module:
                key = disk_key(f"{name}.weight")
                if key is None:
                    log.warning("merge-statistics: %s.weight is not in the checkpoint; no Gram kept", name)
                    continue
                self._handles.append(mod.register_forward_pre_hook(self._linear_hook(name, key)))
        if experts is not None:
            self.experts = experts
            self.expert_names = expert_names  # expert -> {"gate", "up", "down"} -> unit name
            if not hasattr(experts, "act_fn"):
                raise UsageError(f"the experts module {type(experts).__name__} has no act_fn: its forward is not "
                                 f"the gated-MLP loop the Gram pass reproduces")
            # an instance attribute shadows the class's forward (and a transformers experts
            # implementation chosen by config) for this layer only; close() removes it
            experts.forward = self._experts_forward

    # -- accumulation ------------------------------------------------------------------------------
    def _add(self, name: str, x: torch.Tensor) -> None:
        """Add X^T X of (n, in) rows: float32 products summed in place into a float32 partial sum,
        flushed into the float64 total every FLUSH_ROWS rows (and at the end)."""
        x = x.to(torch.float32)
        part = self._partial.get(name)
        if part is None:
            part = self._partial[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self.sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            self.tokens[name] = 0
            self._unflushed[name] = 0
        part.addmm_(x.T, x)
        self.tokens[name] += int(x.shape[0])
        self._unflushed[name] += int(x.shape[0])
        if self._unflushed[name] >= FLUSH_ROWS:
            self._flush(name)

    def _flush(self, name: str) -> None:
        if self._unflushed.get(name):
            self.sums[name].add_(self._partial[name].to(torch.float64))
            self._partial[name].zero_()
            self._unflushed[name] = 0

    def nbytes(self) -> int:
        """Device bytes held by the accumulators (totals and partial sums)."""
        return sum(t.numel() * t.element_size() for d in (self.sums, self._partial) for t in d.values())

    def finish(self) -> dict[str, torch.Tensor]:
        """The float64 Gram sums, every partial sum flushed (the float32 ones are freed)."""
        for name in list(self._partial):
            self._flush(name)
        self._partial.clear()
        return self.sums

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] != self._valid.shape[0]:
            raise RuntimeError(f"a linear input has {flat.shape[0]} rows for a batch of {self._valid.shape[0]} "
                               f"token positions")
        return flat if self._all_valid else flat[self._valid]

    def _linear_hook(self, module_name: str, unit: str):
        def hook(module, args):
            x = args[0]
            seen = self._seen.get(id(x))
            if module_name not in self._share:  # first batch: share a Gram between maps of one input
                gname = seen[1] if seen is not None else module_name
                self._share[module_name] = gname
                self.weights[unit] = gname
                if seen is None:
                    self._seen[id(x)] = (x, gname)
                    self._add(gname, self._rows(x))
                return
            gname = self._share[module_name]
            if gname != module_name:  # shares the Gram of an earlier map: same input tensor again?
                if seen is None or seen[1] != gname:
                    raise RuntimeError(f"{module_name}: its input was shared with {gname} in the first batch "
                                       f"but not in a later one")
                return
            self._seen[id(x)] = (x, gname)
            self._add(gname, self._rows(x))

        return hook

    def _experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
        """The routed experts' forward (transformers' eager loop: per expert, act(x W_gate^T) *
        (x W_up^T) W_down^T, weighted by the routing weight, summed per token) taking the Grams of
        each expert's inputs and intermediate activations on the way, so that nothing is computed
        twice. Same math as the model's own experts; rounding may differ from a grouped GEMM."""
        module = self.experts
        inter = module.gate_up_proj.shape[1] // 2
        n_tok, d = hidden_states.shape
        k = top_k_index.shape[1]
        # the (token, slot) pairs grouped by expert once; each expert's outputs are written to its
        # run of a pair-ordered buffer, un-permuted by one gather and summed over the k slots (a
        # scatter-add per expert is many times slower on CPU)
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = torch.div(order, k, rounding_mode="floor")
        counts = torch.bincount(flat, minlength=self.num_experts + 1)[:self.num_experts].tolist()
        weights = top_k_weights.reshape(-1)[order].unsqueeze(1)
        by_expert = hidden_states.new_zeros(flat.shape[0], d)
        start = 0
        for e in range(self.num_experts):
            n = counts[e]
            self._expert_grams(e, d, module.down_proj.shape[2], hidden_states.device)
            if n == 0:
                continue
            tok = token_of[start:start + n]
            xe = hidden_states[tok]
            gate_up = torch.nn.functional.linear(xe, module.gate_up_proj[e])
            mid = module.act_fn(gate_up[:, :inter]) * gate_up[:, inter:]
            y = torch.nn.functional.linear(mid, module.down_proj[e])
            torch.mul(y, weights[start:start + n].to(y.dtype), out=by_expert[start:start + n])
            start += n
            if self._all_valid:
                n_real = n
            else:  # padding is routed too, but is no calibration data
                real = self._valid[tok]
                n_real = int(real.sum())
                xe, mid = xe[real], mid[real]
            if n_real:
                self._add(f"experts.{e}.in", xe)
                self._add(f"experts.{e}.mid", mid)
                self.expert_tokens[e] += n_real
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return by_expert[inverse].view(n_tok, k, d).sum(dim=1).to(hidden_states.dtype)

    def _expert_grams(self, e: int, d: int, inter: int, device) -> None:
        """Every expert has its Grams, zero when never routed to."""
        gin, gmid = f"experts.{e}.in", f"experts.{e}.mid"
        if gin in self.sums:
            return
        names_e = self.expert_names(e)
        for g, dim in ((gin, d), (gmid, inter)):
            self.sums[g] = torch.zeros(dim, dim, dtype=torch.float64, device=device)
            self._partial[g] = torch.zeros(dim, dim, dtype=torch.float32, device=device)
            self.tokens[g] = self._unflushed[g] = 0
        self.weights.update({names_e["gate"]: gin, names_e["up"]: gin, names_e["down"]: gmid})

    # -- per batch ---------------------------------------------------------------------------------
    def begin(self, valid: torch.Tensor) -> None:
        self._valid = valid
        self._all_valid = bool(valid.all())
        self._seen.clear()

    def end(self) -> None:
        self._seen.clear()  # drop the references to this batch's inputs
        self._valid = None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.experts is not None and "forward" in vars(self.experts):
            del self.experts.forward


# -- one source ----------------------------------------------------------------------------------

def _disk_key_fn(ckpt, fam, layer: int):
    keys = set(ckpt.keys())
    prefix = fam.disk_key(layer, "")

    def disk_key(name: str) -> Optional[str]:
        # as harc_hpc.models.onload.layer_state_dict maps in-memory names to on-disk ones
        k = prefix + name
        if k in keys:
            return k
        if name.startswith("mlp."):
            alt = f"{prefix}{fam.moe_disk_module}.{name[4:]}"
            if alt in keys:
                return alt
        return None

    return disk_key


class GramObserver(LayerObserver):
    """The Grams of decoder layer ``j`` (``LayerGrams``) while every batch passes it: hooks put on the
    onloaded layer, each batch's valid-token mask set before it runs, the hooks removed after."""

    def __init__(self, model, valid: list, layout_name: str, moe_layers):
        self.model, self.valid, self.layout_name, self.moe_layers = model, valid, layout_name, moe_layers
        self.grams: Optional[LayerGrams] = None

    def layer_start(self, j: int) -> None:
        fam = self.model.family
        self.grams = LayerGrams(self.model.layer(j), fam.router_module(self.model.model, j) if j in self.moe_layers else None,
                                _disk_key_fn(self.model.ckpt, fam, j),
                                lambda e: ms.expert_unit_names(fam, j, e, self.layout_name),
                                fam.num_experts(self.model.ckpt.config))

    def batch_start(self, j: int, group, i: int) -> None:
        self.grams.begin(self.valid[i])

    def batch_end(self, j: int, group, i: int, hidden) -> None:
        self.grams.end()

    def group_end(self, j: int, group) -> None:
        self.grams.close()


def layer_pass(model, j: int, states, valid: list, layout_name: str, moe_layers, label: str,
               update_states: bool) -> LayerGrams:
    """Decoder layer ``j``'s Grams over every batch of ``states`` (the layer-wise engine's loop with a
    GramObserver); the layer's outputs replace ``states`` when ``update_states``."""
    observer = GramObserver(model, valid, layout_name, moe_layers)
    try:
        run_layers(model, {label: states}, [j], observer=observer, update=update_states, label=label)
    finally:
        if observer.grams is not None:
            observer.grams.close()
    return observer.grams


def require_gram_support(fam, method: str, source: str) -> None:
    """Refuse (naming the merge ``method`` and ``source``) a family whose experts the Gram pass
    does not model (UNSUPPORTED_FAMILIES)."""
    name = getattr(fam, "text_family", fam).name  # a multimodal wrapper: its text model's experts
    if name in UNSUPPORTED_FAMILIES:
        raise UsageError(f"merge method {method!r}: the {name} family's experts are not supported by "
                         f"the Gram pass yet", where=f"models.sources[{source}].path")


def write_layer(folder: Path, j: int, grams: LayerGrams, n_tokens: int, where: str) -> None:
    """Layer ``j``'s Grams (float32) and their json, each written atomically."""
    from safetensors.torch import save_file

    for name, g in grams.finish().items():
        require_finite(g, f"the Gram {name}", where, hint="the source model overflows on its calibration data")
    tensors = {n: g.to(device="cpu", dtype=torch.float32).contiguous() for n, g in sorted(grams.sums.items())}
    grams.sums = {}
    with atomic_path(ms.layer_file(folder, j, "safetensors")) as tmp:
        save_file(tensors, str(tmp))
    write_json_atomic(ms.layer_file(folder, j, "json"), {
        "layer": j, "tokens": n_tokens, "weights": dict(sorted(grams.weights.items())),
        "grams": {n: grams.tokens[n] for n in sorted(grams.tokens)},
        "expert_tokens": grams.expert_tokens if grams.experts is not None else None})


def _read_manifest(partial: Path, task_digest: Optional[str]) -> Optional[dict]:
    """The partial work a killed run of this very task left, or None (none, or another task's)."""
    from harc_hpc.stages.capture_activations import task_manifest

    manifest = task_manifest(partial, task_digest, MANIFEST_FORMAT)
    if manifest is None:
        return None
    done = all(ms.layer_file(partial, l, s).is_file() for l in range(manifest["next_layer"])
               for s in ("safetensors", "json"))
    return manifest if done and (partial / "states.bin").is_file() else None


def source_batches(cfg: PipelineConfig, source: str, local: Path, device) -> tuple[list, list, list, list]:
    """(token id sequences, batches of sequence indices, (B, T) of each batch, each batch's (B*T,)
    mask of real tokens) of a source's calibration data, tokenised with its own tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(local), trust_remote_code=cfg.models.trust_remote_code)
    seqs = tokenize_task(cfg.calibration_for(source), cfg.calibration, tokenizer)
    plan = list(batches(len(seqs), cfg.calibration.batch_size))
    shapes = [(len(idx), max(len(seqs[j]) for j in idx)) for idx in plan]
    valid = []
    for idx, (b, t) in zip(plan, shapes):
        m = torch.zeros(b, t, dtype=torch.bool)
        for r, j in enumerate(idx):
            m[r, :len(seqs[j])] = True
        valid.append(m.reshape(-1).to(device))
    return seqs, plan, shapes, valid


def compute_source_grams(cfg: PipelineConfig, source: str, out_dir: Path, partial: Path,
                         task_digest: Optional[str] = None, device: Optional[torch.device] = None) -> dict:
    """The Grams of every decoder layer of source ``source`` on its calibration data, published as
    ``out_dir`` (a folder of per-layer files, meta.json last)."""
    from harc_hpc.io.checkpoint import resolve_model_path
    from harc_hpc.models.onload import OnloadedModel
    from harc_hpc.stages.capture_activations import BatchStates, placement_for

    src = next(s for s in cfg.models.sources if s.name == source)
    local = resolve_model_path(src.path, revision=cfg.models.revision)
    device = device or pick_device(cfg.harc.device)
    model = OnloadedModel(local, device, trust_remote_code=cfg.models.trust_remote_code)
    fam = model.family
    require_gram_support(fam, cfg.merge.method, source)
    conf = model.ckpt.config
    layout_name = fam.detect_layout(model.ckpt.keys())
    num_experts = fam.num_experts(conf)
    moe_layers = set(fam.moe_layers(conf))
    seqs, plan, shapes, valid = source_batches(cfg, source, local, device)
    n_tokens = sum(len(s) for s in seqs)
    d = model.config.hidden_size

    manifest = _read_manifest(partial, task_digest)
    if manifest is None:
        remove_path(partial)
        partial.mkdir(parents=True)
    next_layer = int(manifest["next_layer"]) if manifest else 0
    nbytes = sum(b * t for b, t in shapes) * d * model.dtype.itemsize
    states = BatchStates(shapes, d, model.dtype, device, placement_for(nbytes, device, model.layer_bytes(0)),
                         scratch_dir=cfg.run.node_local_dir)
    t0 = time.perf_counter()
    peak_layer_bytes = 0
    try:
        if manifest:
            log.info("merge-statistics %s: resuming after decoder layer %d", source, next_layer - 1)
            states.load(partial / "states.bin")
        else:
            for i, idx in enumerate(plan):
                ids, _ = pad_batch([torch.tensor(seqs[j]) for j in idx])
                states.set(i, model.embed(ids))
        model.release_embeddings()
        for j in range(next_layer, model.num_layers):
            grams = layer_pass(model, j, states, valid, layout_name, moe_layers, f"merge-statistics {source}",
                               update_states=True)
            peak_layer_bytes = max(peak_layer_bytes, grams.nbytes())
            write_layer(partial, j, grams, n_tokens, f"merge-statistics, source {source}, decoder layer {j}")
            if task_digest and cfg.calibration.layer_checkpoints and j + 1 < model.num_layers:
                with atomic_path(partial / "states.bin", needed_bytes=states.nbytes) as tmp:
                    states.save(tmp)
                write_json_atomic(partial / MANIFEST, {"format": MANIFEST_FORMAT, "digest": task_digest,
                                                       "next_layer": j + 1})
        meta = {"kind": "gram", "source": source, "digest": task_digest, "tokens": n_tokens, "sequences": len(seqs),
                "layers": model.num_layers, "layout": layout_name, "stored_dtype": "float32",
                "accumulated_in": f"float32 partial sums added into float64 every {FLUSH_ROWS} rows"}
        remove_path(partial / MANIFEST)
        remove_path(partial / "states.bin")
        write_json_atomic(partial / ms.META, meta)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        publish(partial, out_dir)
    finally:
        states.close()
        model.close()
    return {"tokens": n_tokens, "layers": model.num_layers, "peak_gram_bytes_per_layer": peak_layer_bytes,
            "seconds": round(time.perf_counter() - t0, 3)}


# -- the stage -----------------------------------------------------------------------------------

def run(cfg: PipelineConfig, run_dir: Path, task_digest: Optional[str] = None, process_group=None) -> dict:
    """``process_group`` (a distributed task: executor.stages.merge-statistics.{nodes, tasks_per_node}):
    the Fisher pass is data-parallel, each rank taking its share of every source's sequences and the
    sums all-reduced, rank 0 writing; the Gram passes run on rank 0 alone (the other ranks return)."""
    run_dir = Path(run_dir)
    kind = statistics_kind(cfg)
    if kind is None:
        return {"kind": None, "sources": {}}
    needed(cfg)
    rank = 0
    if process_group is not None:
        import torch.distributed as dist

        rank = dist.get_rank(process_group)
        if kind != "fisher" and rank != 0:
            return {}
    out: dict = {"kind": kind, "sources": {}}
    for src in cfg.models.sources:
        final = ms.source_dir(run_dir, src.name)
        if kind == "gram":
            done = ms.read_meta(final)
            if task_digest and done is not None and done.get("digest") == task_digest:
                out["sources"][src.name] = {"tokens": done["tokens"], "reused": True}  # a resumed task
                continue
            partial = run_dir / "partial" / "merge-statistics" / src.name
            out["sources"][src.name] = compute_source_grams(cfg, src.name, final, partial, task_digest)
        elif kind == "gram_sequential":
            # RegMean++'s Grams depend on the merge and are taken by merge-experts; here the data are
            # checked (tokenised with each source's tokenizer) and the stage's digest carries them
            from harc_hpc.io.checkpoint import resolve_model_path

            seqs = source_batches(cfg, src.name, resolve_model_path(src.path, revision=cfg.models.revision),
                                  torch.device("cpu"))[0]
            info = {"kind": kind, "source": src.name, "tokens": sum(len(s) for s in seqs), "sequences": len(seqs)}
            with atomic_path(final, make_dir=True) as tmp:
                write_json_atomic(tmp / ms.META, info)
            out["sources"][src.name] = info
        elif kind == "fisher":
            from harc_hpc.stages.fisher_statistics import compute_source_fisher

            done = ms.read_meta(final / "fisher")
            if task_digest and done is not None and done.get("digest") == task_digest:
                out["sources"][src.name] = {"tokens": done.get("tokens"), "reused": True}  # a resumed task
                continue
            device = pick_device(cfg.harc.device)
            if rank != 0:  # its share of the sequences into the all-reduce; rank 0 writes
                import tempfile

                with tempfile.TemporaryDirectory() as unused:
                    compute_source_fisher(cfg, src.name, unused, device=device, process_group=process_group)
                continue
            with atomic_path(final, make_dir=True) as tmp:
                meta = compute_source_fisher(cfg, src.name, tmp, device=device, process_group=process_group)
                # the digest the Fisher was computed under: a resumed task reuses only a matching one
                meta["digest"] = task_digest
                write_json_atomic(tmp / "fisher" / ms.META, meta)
            out["sources"][src.name] = {k: meta[k] for k in ("tokens", "samples") if k in meta}
        else:
            raise UsageError(f"merge.method {cfg.merge.method!r} asks for {kind!r} statistics, which no stage produces")
    return out
