"""merge-experts: merge the source checkpoints into ``run_dir/merged``.

Data-free methods read the checkpoints only; a method with ``statistics`` (RegMean's Grams, Fisher)
also reads what the merge-statistics stage wrote for every source (``merge-statistics/<source>/``).

The output directory appears only when complete (written to a temporary directory beside it and
renamed), and holds the merged shards, the base's (or first source's) config and tokenizer files,
and ``harc_merge.json``: method, parameters, input checkpoint digests and package versions. The
record holds no timings, so the same config and seed give the same bytes in every file.
"""

from __future__ import annotations

import json
import platform
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import click

from harc_hpc.io.atomic import atomic_dir
from harc_hpc.io.checkpoint import Checkpoint, resolve_model_path
from harc_hpc.io.checkpoint_writer import copy_model_files
from harc_hpc.config import PipelineConfig, load_config
from harc_hpc.errors import HarcHpcError
from harc_hpc.merge import MergeConfigError, resolve_settings
from harc_hpc.merge.engine import MergeInput, merge_checkpoints
from harc_hpc.models.modeling import pick_device
from harc_hpc.progress import Progress

MERGED_DIR = "merged"
RECORD = "harc_merge.json"

#: errors that mean "bad input or config" (reported without a traceback by the CLI)
USER_ERRORS = (HarcHpcError,)


def _versions() -> dict:
    from harc_hpc import package_versions

    return {"python": platform.python_version(),
            **package_versions(("harc-hpc", "torch", "transformers", "safetensors"))}


def _open(name: str, path: str, cfg: PipelineConfig) -> MergeInput:
    local = resolve_model_path(path, revision=cfg.models.revision)
    return MergeInput(name, Checkpoint(local, allow_pickle=cfg.models.allow_pickle, name=name))


def check_config(cfg: PipelineConfig):
    """The merge settings of a config, validated (the pipeline's ``validate`` hook, so a sweep
    refuses a bad cell before any job runs): (method, parameters)."""
    m = cfg.merge
    names = [s.name for s in cfg.models.sources]
    method, params = resolve_settings(m.method, m.preset, m.parameters, names,
                                      method_explicit="method" in m.model_fields_set)
    if method.base_needed(params) and cfg.models.base is None:
        raise MergeConfigError(f"merge method {method.name!r} works on task vectors and needs a base "
                               f"model: set models.base")
    return method, params


def run(cfg: PipelineConfig, run_dir: Path, **index) -> dict:
    run_dir = Path(run_dir)
    if cfg.mergeme is not None:  # dense experts: build-moe makes the MoE (docs/mergeme.md)
        from harc_hpc.mergeme.pipeline import build_merged

        return build_merged(cfg, run_dir / MERGED_DIR)
    m = cfg.merge
    names = [s.name for s in cfg.models.sources]
    method, params = check_config(cfg)
    base = _open("base", cfg.models.base, cfg) if cfg.models.base is not None else None
    sources = [_open(s.name, s.path, cfg) for s in cfg.models.sources]
    inputs = ([base] if base else []) + sources
    out_dir = run_dir / MERGED_DIR
    wrapper = _wrapper(inputs, m.vision)  # a multimodal wrapper: its text model checked in every input
    exclude = list(m.exclude) + ([wrapper["non_text"]] if wrapper and m.vision == "base" else [])
    readers, stat_kw, stat_record = _statistics(method, params, cfg, run_dir, names, pick_device(m.device, "merge.device"))

    # Digests read every weight file once more; doing it beside the merge hides most of that time.
    with ThreadPoolExecutor(max_workers=1) as pool:
        digests = {i.name: pool.submit(i.ckpt.digest) for i in inputs}
        # What the merge will write (refused up front when not free): a quantized input is written
        # dequantized, so its size as read, not as stored.
        needed = output_bytes(sources[0].ckpt, m.out_dtype or m.dtype, cfg.output.quantize)
        with atomic_dir(out_dir, needed_bytes=needed) as tmp:
            bar = None

            def progress(done, total, unit):
                nonlocal bar
                if bar is None:
                    bar = Progress(total, f"merge-experts {method.name} (tensor units)")
                bar.update(done - bar.done, unit.name)

            try:
                stats = merge_checkpoints(
                    tmp, sources, base, method, params, exclude=exclude, dtype=m.dtype,
                    out_dtype=m.out_dtype, max_shard_size=m.max_shard_size, seed=cfg.run.seed,
                    device=pick_device(m.device, "merge.device"), progress=progress,
                    quantize=cfg.output.quantize, **stat_kw)
            finally:
                if bar is not None:
                    bar.close()
            model_src = (base or sources[0]).ckpt.path
            copy_model_files(model_src, tmp)
            _set_config_dtype(tmp / "config.json", m.out_dtype or m.dtype)
            by_kind: dict = {}
            for i in inputs:
                for kind, keys in i.ckpt.dequantized_by_kind().items():
                    by_kind.setdefault(kind, set()).update(keys)
            by_kind = {k: sorted(v) for k, v in sorted(by_kind.items())}
            if by_kind and not cfg.output.quantize:  # read dequantized: a plain checkpoint of the model's dtype
                _drop_quantization(tmp / "config.json")
            record = {
                "format": 1,
                "dequantized_from_mxfp4": by_kind.get("mxfp4", []),
                "dequantized": by_kind,  # quantized input tensors read dequantized, by format
                "dropped_activation_scales": sorted({k for i in inputs for k in i.ckpt.dropped}),
                "quantize": cfg.output.quantize,
                "requantized": stats["requantized"],  # written as FP8 blocks again (output.quantize)
                "method": method.name,
                "preset": m.preset,
                "parameters": params.model_dump(mode="json", by_alias=True),
                "exclude": list(m.exclude),
                # a multimodal wrapper: its text model, and what became of the rest (merge.vision)
                **({"wrapper": wrapper} if wrapper else {}),
                "dtype": m.dtype,
                "out_dtype": m.out_dtype,
                "seed": cfg.run.seed,
                "family": stats["family"],
                "layout": stats["layout"],
                "granularity": stats["granularity"],
                "tensors": stats["tensors"],
                "merged_by_role": stats["merged_by_role"],
                "not_merged_by_method": stats["not_merged_by_method"],
                "method_notes": stats["method_notes"],
                "statistics": stat_record,
                "excluded_tensors": stats["excluded_tensors"],
                "model_files_from": str(model_src),
                "base": _describe(base, digests) if base else None,
                "sources": [_describe(s, digests) for s in sources],
                "versions": _versions(),
            }
            (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    for i in inputs:
        i.ckpt.close()
    for r in readers:
        getattr(r, "close", lambda: None)()
    if method.statistics == "gram_sequential":
        from harc_hpc.io.atomic import remove_path

        remove_path(sequential_scratch(run_dir))
    return {"method": method.name, "output": str(out_dir), "tensors": stats["tensors"],
            "units": stats["units"], "merged_tensors": stats["merged_tensors"],
            "copied_tensors": stats["copied_tensors"], "seconds": stats["seconds"]}


def _statistics(method, params, cfg, run_dir: Path, names: list[str], device) -> tuple[list, dict, Optional[dict]]:
    """The readers of every source's merge statistics, the merge's keyword arguments that hand them
    to the method, and what the record says of them (None for a data-free method). RegMean++'s Grams
    depend on the merge: they are computed here, into a scratch folder removed after the merge."""
    from harc_hpc.io import merge_statistics as ms
    from harc_hpc.io.atomic import remove_path
    from harc_hpc.merge import GramStatistic

    if method.statistics is None:
        return [], {}, None
    folders = [ms.source_dir(run_dir, n) for n in names]
    if method.statistics == "gram_sequential":
        from harc_hpc.stages.regmean_sequential import sequential_grams

        for f, n in zip(folders, names):  # merge-statistics checked the data (and carries its digest)
            _check_meta(f, n, "gram_sequential")
        scratch = sequential_scratch(run_dir)
        remove_path(scratch)
        sequential_grams(cfg, scratch, method, params)
        folders = [scratch / n for n in names]
    if method.statistics in ("gram", "gram_sequential"):
        readers = [ms.GramReader(f, n) for f, n in zip(folders, names)]

        def gram(unit, i):
            hit = readers[i].gram(unit.name, device)
            return None if hit is None else GramStatistic(*hit)

        kw = {"gram": gram}
    elif method.statistics == "fisher":
        readers = [ms.FisherReader(f, n) for f, n in zip(folders, names)]
        kw = {"fisher": lambda unit, i: readers[i].fisher(unit)}
    else:
        raise MergeConfigError(f"merge method {method.name!r} asks for {method.statistics!r} statistics, "
                               f"which no stage produces")
    record = {"kind": method.statistics,
              "sources": {n: ms.read_meta(f / "fisher" if method.statistics == "fisher" else f)
                          for n, f in zip(names, folders)}}
    return readers, kw, record


def _wrapper(inputs: list[MergeInput], vision: str) -> Optional[dict]:
    """For a multimodal wrapper (harc_hpc.models.families.wrappers): what the merge record says of it,
    after checking that every input holds its text model (before anything is written). None for a
    text model."""
    from harc_hpc.models.families import family_for_config, is_wrapper

    fam = family_for_config(inputs[0].ckpt.config)
    if not is_wrapper(fam):
        return None
    for i in inputs:
        fam.check_text_model(i.ckpt.keys(), i.ckpt.config, where=str(i.ckpt.path))
    keys = inputs[0].ckpt.keys()
    return {"model_type": fam.name, "text_model_type": fam.text_model_type,
            "text_prefixes": list(fam.text_prefixes()), "vision": vision,
            "non_text": fam.non_text_pattern(),
            "non_text_tensors": sum(not fam.is_text_key(k) for k in keys)}


def sequential_scratch(run_dir: Path) -> Path:
    return Path(run_dir) / "partial" / "regmean-sequential"


def _check_meta(folder: Path, source: str, kind: str) -> None:
    from harc_hpc.errors import RunStateError
    from harc_hpc.io import merge_statistics as ms

    meta = ms.read_meta(folder)
    if meta is None or meta.get("kind") != kind:
        raise RunStateError(f"no {kind} merge statistics for source {source!r}", where=str(folder),
                            hint="run the merge-statistics stage first (harc-hpc submit runs it)")


def _describe(inp: MergeInput, digests: dict) -> dict:
    return {"name": inp.name, "path": str(inp.ckpt.path), "digest": digests[inp.name].result()}


def output_bytes(ckpt: Checkpoint, dtype: Optional[str], quantize: Optional[str]) -> int:
    """Bytes of the merged checkpoint's weights when ``ckpt`` is merged (as its tensors are read,
    in ``dtype`` when set; ``quantize``: see harc_hpc.io.quantized.output_size_bytes)."""
    from harc_hpc.dtypes import torch_dtype
    from harc_hpc.io.quantized import output_size_bytes

    out = torch_dtype(dtype, MergeConfigError) if dtype else None
    shapes = {}
    for k in ckpt.keys():
        dt = ckpt.tensor_dtype(k)
        shapes[k] = (ckpt.tensor_shape(k), (out if out is not None and dt.is_floating_point else dt).itemsize)
    return output_size_bytes(shapes, ckpt.fp8_blocks(), quantize)


def _drop_quantization(path: Path) -> None:
    cfg = json.loads(path.read_text())
    if cfg.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _set_config_dtype(path: Path, dtype: Optional[str]) -> None:
    if dtype is None or not path.is_file():
        return
    cfg = json.loads(path.read_text())
    cfg["dtype"] = dtype
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


@click.command("merge-experts")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory (default: run.output_dir/run.name from the config).")
def merge_experts_command(config: Path, run_dir: Optional[Path]) -> None:
    """Merge the source models of CONFIG into RUN_DIR/merged (RegMean: after merge-statistics)."""
    try:
        cfg = load_config(config)
        stats = run(cfg, run_dir if run_dir is not None else cfg.run_dir)
    except USER_ERRORS as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    click.echo(json.dumps(stats, indent=2))
