"""lm-evaluation-harness task scores of the run's models, when ``report.lm_eval_tasks`` asks for them.

Every model of ``report.lm_eval_models`` is scored on every task with lm-eval's HF model class
(``lm_eval.models.huggingface.HFLM``) and ``lm_eval.simple_evaluate``:

- ``base``, ``sources`` (each source checkpoint), ``merged`` (merged/), ``calibrated`` (model/):
  the checkpoint directories, loaded by lm-eval with ``report.lm_eval_model_args`` passed through;
- ``oracle``: the merged model with, for each task, the routers of the source whose domain the task
  measures (``report.lm_eval_task_sources``; harc-hpc's own tasks know theirs), loaded whole in
  memory with the routers copied in. A task with no source named has no oracle score.

The tasks are lm-eval's own (gsm8k, minerva_math500, humaneval_plus, mbpp_plus, ... fetched by lm-eval
where the machine can reach the hub) and harc-hpc's local ones (harc_hpc/eval_tasks: YAML + JSONL in
the package, no download). ``report.lm_eval_options`` passes lm-eval's own evaluation options
through (limit, num_fewshot, batch_size, gen_kwargs, ...).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from harc_hpc.config import PipelineConfig
from harc_hpc.report.metrics import ReportError

log = logging.getLogger(__name__)

#: the models ``report.lm_eval_models`` may name, in the order they are reported
MODEL_KINDS = ("base", "sources", "merged", "calibrated", "oracle", "training")



def check_lm_eval(cfg: PipelineConfig) -> None:
    """Fail before any work when the config asks for lm-eval and it cannot run."""
    if not cfg.report.lm_eval_tasks:
        return
    if importlib.util.find_spec("lm_eval") is None:
        raise ReportError(
            f"report.lm_eval_tasks is set ({', '.join(cfg.report.lm_eval_tasks)}) but lm-evaluation-harness "
            "is not installed: `pip install -e '.[eval]'` (or `pip install lm-eval accelerate`), or remove "
            "report.lm_eval_tasks from the config")
    if "base" in cfg.report.lm_eval_models and not cfg.models.base:
        raise ReportError("report.lm_eval_models names 'base' but models.base is not set")
    names = {s.name for s in cfg.models.sources}
    for task, src in task_sources(cfg).items():
        if src not in names:
            raise ReportError(f"report.lm_eval_task_sources.{task}: {src!r} is not a source name "
                              f"({', '.join(sorted(names))})")


def task_sources(cfg: PipelineConfig) -> dict[str, str]:
    """lm-eval task -> the source whose routers the oracle uses on it: the config's mapping, and for
    harc-hpc's own tasks their domain when a source of that name exists."""
    from harc_hpc.eval_tasks import LOCAL_TASKS

    names = {s.name for s in cfg.models.sources}
    out = {t: d for t, d in LOCAL_TASKS.items() if t in cfg.report.lm_eval_tasks and d in names}
    out.update({t: s for t, s in cfg.report.lm_eval_task_sources.items() if t in cfg.report.lm_eval_tasks})
    return out


def lm_eval_model_args(cfg: PipelineConfig, model_dir: Path) -> str:
    """lm-eval's HF model arguments: the model directory, and ``report.lm_eval_model_args`` as given
    (lm-eval loads the whole model through transformers; these choose how it is placed)."""
    args = f"pretrained={model_dir},trust_remote_code={cfg.models.trust_remote_code}"
    extra = cfg.report.lm_eval_model_args.strip().strip(",")
    return f"{args},{extra}" if extra else args


def _tokenizer(path: Path, trust: bool):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust)
    if tok.eos_token is None:
        # lm-eval stops generations and pads with the end-of-text token; a tokenizer without one (the
        # demo's byte tokenizer) gets its unknown token, which no evaluated text contains.
        tok.eos_token = tok.unk_token if tok.unk_token is not None else tok.convert_ids_to_tokens(0)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _oracle_model(cfg: PipelineConfig, merged_dir: Path, source_path: Path, device: torch.device,
                  parallelize: bool = False):
    """The merged model, loaded whole, with ``source_path``'s routers (and router biases) copied in.
    Its weights are read straight onto ``device`` (no whole-model host copy first); with
    ``parallelize`` (lm_eval_model_args' ``parallelize=True``, for a model larger than one GPU) they
    are spread over the node's GPUs by accelerate's ``device_map="auto"``, as lm-eval does for the
    other models."""
    from transformers import AutoModelForCausalLM

    from harc_hpc.io.checkpoint import Checkpoint
    from harc_hpc.models.families import family_for_config

    conf = json.loads((merged_dir / "config.json").read_text())
    fam = family_for_config(conf)
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype="auto",
                                                 device_map="auto" if parallelize else {"": str(device)},
                                                 trust_remote_code=cfg.models.trust_remote_code).eval()
    src = Checkpoint(source_path)
    keys = list(src.keys())
    with torch.no_grad():
        for layer in fam.moe_layers(conf):
            module = fam.router_module(model, layer)
            weight = src.get_tensor(fam.find_router_disk_key(layer, keys))
            target = getattr(module, fam.router_memory_param.rsplit(".", 1)[-1]) if fam.router_memory_param else module.weight
            target.copy_(weight.reshape(target.shape).to(device=target.device, dtype=target.dtype))
            bias_key = fam.router_intercept_key(layer)
            if bias_key is not None:
                module.bias.copy_(src.get_tensor(bias_key).to(device=module.bias.device, dtype=module.bias.dtype))
    return model


def _scores(results: Optional[dict]) -> dict:
    # Keep the scores only; the full result holds samples and non-JSON objects.
    return json.loads(json.dumps((results or {}).get("results", {}), default=str))


def _evaluate(cfg: PipelineConfig, pretrained, tokenizer, tasks: list[str], device: torch.device,
              model_args: dict, samples: Optional[dict] = None) -> dict:
    """Scores of one model on ``tasks``; with ``samples`` given, each task's (prompt, response) pairs
    are stored into it, in lm-eval's document order."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from harc_hpc.eval_tasks import TASK_DIR

    options = dict(cfg.report.lm_eval_options)
    batch_size = options.pop("batch_size", cfg.calibration.batch_size)
    max_batch_size = options.pop("max_batch_size", 64)
    lm = HFLM(pretrained=pretrained, tokenizer=tokenizer, device=str(device), batch_size=batch_size,
              max_batch_size=max_batch_size, **model_args)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(TASK_DIR)),
                                      log_samples=samples is not None, **options)
    if samples is not None:
        for task, docs in (results or {}).get("samples", {}).items():
            samples[task] = [(d["arguments"][0][0], d["resps"][0][0]) for d in docs]
    return _scores(results)


def run_lm_eval(cfg: PipelineConfig, run_dir: Path, keep_samples: bool = False) -> dict:
    """{"models": {model: {task: {metric: value}}}, "tasks": [...], ...} for the configured models;
    ``keep_samples``: also {"samples": {model: {task: [(prompt, response), ...]}}}."""
    check_lm_eval(cfg)
    from lm_eval.utils import simple_parse_args_string

    from harc_hpc.io.checkpoint import resolve_model_path
    from harc_hpc.models.modeling import pick_device
    from harc_hpc.stages import layout

    run_dir = Path(run_dir)
    device = pick_device(cfg.harc.device)
    tasks = list(cfg.report.lm_eval_tasks)
    trust = cfg.models.trust_remote_code
    extra_args = simple_parse_args_string(cfg.report.lm_eval_model_args.strip().strip(",") or None)
    extra_args.setdefault("trust_remote_code", trust)
    merged_dir = layout.merged_dir(run_dir)
    tokenizer = _tokenizer(merged_dir, trust)

    checkpoints: list[tuple[str, Path]] = []
    wanted = cfg.report.lm_eval_models
    if "base" in wanted:
        checkpoints.append(("base", resolve_model_path(cfg.models.base, revision=cfg.models.revision)))
    if "sources" in wanted:
        checkpoints += [(f"source:{s.name}", resolve_model_path(s.path, revision=cfg.models.revision))
                        for s in cfg.models.sources]
    if "merged" in wanted:
        checkpoints.append(("merged", merged_dir))
    if "calibrated" in wanted:
        checkpoints.append(("calibrated", layout.model_dir(run_dir)))
    if "training" in wanted:  # the training baselines' models the config enables (docs/training.md)
        from harc_hpc.report.training import training_models

        checkpoints += training_models(cfg, run_dir)

    out: dict = {"tasks": tasks, "models": {}, "options": dict(cfg.report.lm_eval_options)}
    if keep_samples:
        out["samples"] = {}

    def kept(name: str) -> Optional[dict]:
        return out["samples"].setdefault(name, {}) if keep_samples else None

    for name, path in checkpoints:
        t0 = time.perf_counter()
        out["models"][name] = _evaluate(cfg, str(path), tokenizer, tasks, device, extra_args,
                                            kept(name))
        log.info("report: lm-eval on %s (%.1fs)", name, time.perf_counter() - t0)
    if "oracle" in wanted:
        # One in-memory model per source that some task maps to; each scores only its own tasks.
        by_source: dict[str, list[str]] = {}
        for task, src in task_sources(cfg).items():
            by_source.setdefault(src, []).append(task)
        out["models"]["oracle"] = {}
        out["oracle_sources"] = task_sources(cfg)
        paths = {s.name: s.path for s in cfg.models.sources}
        for src, src_tasks in sorted(by_source.items()):
            t0 = time.perf_counter()
            parallelize = str(extra_args.get("parallelize", False)).lower() in ("true", "1", "yes")
            model = _oracle_model(cfg, merged_dir, resolve_model_path(paths[src], revision=cfg.models.revision),
                                  device, parallelize=parallelize)
            # an instantiated model is placed already: lm-eval refuses these for one
            args = {k: v for k, v in extra_args.items() if k not in ("trust_remote_code", "parallelize")}
            out["models"]["oracle"].update(_evaluate(cfg, model, tokenizer, src_tasks, device, args,
                                                     kept("oracle")))
            del model
            log.info("report: lm-eval on the oracle with %s's routers (%.1fs)", src, time.perf_counter() - t0)
    return out
