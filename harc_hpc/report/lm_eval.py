"""lm-evaluation-harness on the assembled model, when ``report.lm_eval_tasks`` asks for it."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path


from harc_hpc.config import PipelineConfig

log = logging.getLogger(__name__)

from harc_hpc.report.metrics import ReportError


# -- lm-evaluation-harness --------------------------------------------------------------------------

def check_lm_eval(cfg: PipelineConfig) -> None:
    if cfg.report.lm_eval_tasks and importlib.util.find_spec("lm_eval") is None:
        raise ReportError(
            f"report.lm_eval_tasks is set ({', '.join(cfg.report.lm_eval_tasks)}) but lm-evaluation-harness "
            "is not installed: `pip install lm-eval`, or remove report.lm_eval_tasks from the config")


def lm_eval_model_args(cfg: PipelineConfig, model_dir: Path) -> str:
    """lm-eval's HF model arguments: the assembled model, and ``report.lm_eval_model_args`` as given
    (lm-eval loads the whole model through transformers; these choose how it is placed)."""
    args = f"pretrained={model_dir},trust_remote_code={cfg.models.trust_remote_code}"
    extra = cfg.report.lm_eval_model_args.strip().strip(",")
    return f"{args},{extra}" if extra else args


def run_lm_eval(cfg: PipelineConfig, model_dir: Path) -> dict:
    check_lm_eval(cfg)
    import lm_eval
    from harc_hpc.models.modeling import pick_device

    device = pick_device(cfg.harc.device)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=lm_eval_model_args(cfg, model_dir),
        tasks=list(cfg.report.lm_eval_tasks),
        batch_size=cfg.calibration.batch_size,
        device=str(device),
    )
    # Keep the scores only; the full result holds samples and non-JSON objects.
    return json.loads(json.dumps((results or {}).get("results", {}), default=str))
