"""lm-evaluation-harness run for real from the report: harc-hpc's local tasks on every model of a run,
checked against a plain greedy decoding loop, the oracle's router swap, and the config's errors."""

from __future__ import annotations

import json

import pytest
import torch

from harc_hpc.config import ConfigError, load_config
from harc_hpc.demo import eval_items
from harc_hpc.eval_tasks import LOCAL_TASKS, TASK_DIR
from harc_hpc.report.metrics import ReportError

pytest.importorskip("lm_eval", reason="the eval extra (pip install -e '.[eval]') is not installed")

from harc_hpc.report import lm_eval  # noqa: E402
from harc_hpc.stages import report  # noqa: E402
from test_report import _load, make_run_dir  # noqa: E402

LIMIT = 8
UNTIL = (" ", "\n", ".")


def test_shipped_items_are_what_the_generator_makes(tmp_path):
    for path in eval_items.write_items(tmp_path):
        assert path.read_bytes() == (TASK_DIR / path.name).read_bytes(), (
            f"{path.name}: regenerate with python -m harc_hpc.demo.eval_items")
    assert sorted(LOCAL_TASKS) == sorted(eval_items.GENERATORS)


def test_items_follow_their_domain_rules():
    for it in eval_items.items("harc_demo_math", 50):
        p, a = it["prompt"], it["answer"]
        if p.endswith("=") and "Solve" not in p:
            expr = p[:-1]
            assert str(eval(expr)) == a  # a+b=, a-b=, a*b= (digits and one operator only)
        elif p.startswith("Solve x+"):
            add, total = p[len("Solve x+"):-len(". x=")].split("=")
            assert int(a) == int(total) - int(add)
    assert all(it["answer"] and " " not in it["answer"] for t in LOCAL_TASKS for it in eval_items.items(t))


def _greedy(model, tokenizer, prompt: str, max_new: int = 8) -> str:
    """The reference: token-by-token argmax, cut at the first stop string (the tasks' rule)."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(max_new):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    text = tokenizer.decode(ids[0, start:])
    cut = min([text.index(s) for s in UNTIL if s in text], default=len(text))
    return text[:cut]


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval")
    cfg_path, run_dir = make_run_dir(root)
    cfg = load_config(cfg_path, overrides={
        "report.lm_eval_tasks": sorted(LOCAL_TASKS),
        "report.lm_eval_models": ["base", "sources", "merged", "calibrated", "oracle"],
        "report.lm_eval_options": {"limit": LIMIT, "batch_size": 4}})
    return cfg, run_dir, lm_eval.run_lm_eval(cfg, run_dir, keep_samples=True)


@pytest.mark.slow
def test_every_model_is_scored_on_every_task(scored_run):
    cfg, run_dir, out = scored_run
    assert list(out["models"]) == ["base", "source:math", "source:code", "merged", "calibrated", "oracle"]
    for name, per in out["models"].items():
        assert sorted(per) == sorted(LOCAL_TASKS), name
        for task, scores in per.items():
            assert 0.0 <= scores["exact_match,none"] <= 1.0
            assert scores["sample_len"] == LIMIT
    assert out["oracle_sources"] == {"harc_demo_math": "math", "harc_demo_code": "code"}


@pytest.mark.slow
def test_responses_equal_a_plain_greedy_loop(scored_run):
    cfg, run_dir, out = scored_run
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run_dir / "model"))
    model = _load(run_dir / "model")
    for task in LOCAL_TASKS:
        items = eval_items.items(task, LIMIT)
        got = out["samples"]["calibrated"][task]
        assert [p for p, _ in got] == [it["prompt"] for it in items]
        want = [_greedy(model, tok, it["prompt"]) for it in items]
        assert [r for _, r in got] == want, task
        exact = sum(w == it["answer"] for w, it in zip(want, items)) / LIMIT
        assert out["models"]["calibrated"][task]["exact_match,none"] == pytest.approx(exact)


@pytest.mark.slow
def test_oracle_uses_the_task_sources_routers(scored_run):
    # make_run_dir's "calibrated" model is the merged one with math's routers written in: the oracle
    # on the math task is that same model, and on the code task it is not.
    cfg, run_dir, out = scored_run
    s = out["samples"]
    assert s["oracle"]["harc_demo_math"] == s["calibrated"]["harc_demo_math"]
    merged, oracle = s["merged"]["harc_demo_math"], s["oracle"]["harc_demo_math"]
    assert [p for p, _ in merged] == [p for p, _ in oracle]


def test_report_stage_writes_the_score_table(tmp_path):
    cfg_path, run_dir = make_run_dir(tmp_path)
    cfg = load_config(cfg_path, overrides={"report.lm_eval_tasks": ["harc_demo_code"],
                                           "report.lm_eval_models": ["calibrated"],
                                           "report.lm_eval_options": {"limit": 2}})
    report.run(cfg, run_dir)
    m = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert list(m["lm_eval"]["models"]) == ["calibrated"]
    md = (run_dir / "report" / "report.md").read_text()
    assert "## Task scores (lm-evaluation-harness)" in md
    assert "| calibrated | " in md and "harc_demo_code exact_match,none" in md


def test_bad_lm_eval_settings_are_named(tmp_path):
    cfg_path, run_dir = make_run_dir(tmp_path)
    with pytest.raises(ConfigError, match="report.lm_eval_options.*unknown lm-eval option.*'limt'"):
        load_config(cfg_path, overrides={"report.lm_eval_options": {"limt": 3}})
    with pytest.raises(ConfigError, match="report.lm_eval_models"):
        load_config(cfg_path, overrides={"report.lm_eval_models": ["everything"]})
    cfg = load_config(cfg_path, overrides={"report.lm_eval_tasks": ["harc_demo_math"],
                                           "report.lm_eval_task_sources": {"harc_demo_math": "physics"}})
    with pytest.raises(ReportError, match="lm_eval_task_sources.harc_demo_math: 'physics' is not a source"):
        lm_eval.check_lm_eval(cfg)
