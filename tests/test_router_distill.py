"""router-distill (docs/training.md): the router-level KL and its closed-form gradient against
autograd and finite differences, the loss against HARC's own KL metric, training against an exact
minimiser (dense Newton) and HARC's closed form, early stopping, the stage in a pipeline (model
directories, same bytes twice, what its digest covers) and the plan without it unchanged."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from harc_hpc.config import ConfigError, load_config
from harc_hpc.errors import InputDataError
from harc_hpc.pipeline import build_plan, load_specs
from harc_hpc.stages import router_distill as rd

ROOT = Path(__file__).resolve().parent.parent


def naive_kl(w, x, w_ref, link):
    """Mean KL of the reference gate to w's, written out term by term (the obviously-correct form)."""
    if link == "softmax":
        p, q = torch.softmax(x @ w_ref.T, -1), torch.softmax(x @ w.T, -1)
        return (p * (p.log() - q.log())).sum(-1).mean()
    p, q = torch.sigmoid(x @ w_ref.T), torch.sigmoid(x @ w.T)
    return (p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())).sum(-1).mean()


def problem(seed=0, n=300, d=6, k=4, tasks=2, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=g, dtype=torch.float64) + shift * (i + 1) for i in range(tasks)]
    srcs = [torch.randn(k, d, generator=g, dtype=torch.float64) for _ in range(tasks)]
    return xs, srcs


@pytest.mark.parametrize("link", ["softmax", "sigmoid"])
def test_gradient_equals_autograd_and_finite_differences(link):
    (x, _), (w_ref, w) = problem(1)
    loss, grad = rd.router_kl_and_grad(w, x, x @ w_ref.T, link)
    wa = w.clone().requires_grad_(True)
    ref = naive_kl(wa, x, w_ref, link)
    ref.backward()
    assert torch.allclose(loss, ref.detach(), rtol=1e-12, atol=1e-14)
    assert torch.allclose(grad, wa.grad, rtol=1e-10, atol=1e-13)
    h = 1e-6
    for i, j in [(0, 0), (1, 3), (3, 5)]:
        e = torch.zeros_like(w)
        e[i, j] = h
        fd = (naive_kl(w + e, x, w_ref, link) - naive_kl(w - e, x, w_ref, link)) / (2 * h)
        assert abs(float(fd) - float(grad[i, j])) < 1e-7 * max(1.0, abs(float(fd)))


def test_the_loss_is_harcs_router_kl():
    """The loss is the router-level KL that HARC's solver reports (harc_hpc.math.metrics.router_kl)."""
    from harc_hpc.math.metrics import router_kl

    (x, _), (w_ref, w) = problem(2)
    assert rd.mean_router_kl(w, x, x @ w_ref.T, chunk=7) == pytest.approx(router_kl(x, w_ref, w), rel=1e-12)
    # a router a softmax cannot tell apart (the same vector added to every expert) has the same loss
    shifted = w + torch.randn(1, w.shape[1], dtype=w.dtype)
    assert rd.mean_router_kl(shifted, x, x @ w_ref.T) == pytest.approx(rd.mean_router_kl(w, x, x @ w_ref.T), rel=1e-10)


def _newton_minimum(xs, srcs, init, steps=20):
    """The exact minimiser of sum_i mean KL by Newton steps on the dense autograd Hessian of the
    written-out loss, with a small ridge for the shift direction the softmax cannot see."""
    def total(v):
        v = v.reshape(init.shape)
        return sum(naive_kl(v, x, s, "softmax") for x, s in zip(xs, srcs))

    w = init.reshape(-1).clone()
    for _ in range(steps):
        g = torch.func.grad(total)(w)
        if float(g.norm()) < 1e-13:
            break
        hmat = torch.func.hessian(total)(w) + 1e-10 * torch.eye(w.numel(), dtype=w.dtype)
        w = w - torch.linalg.solve(hmat, g)
    assert float(g.norm()) < 1e-12
    return w.reshape(init.shape), float(total(w))


def test_training_reaches_the_exact_minimum_and_beats_the_quadratic_closed_form():
    from harc_hpc.math import solve_router

    xs, srcs = problem(3, n=200)
    merged = (srcs[0] + srcs[1]) / 2
    data = [rd.TaskData(x, x @ s.T, x[:0], (x @ s.T)[:0]) for x, s in zip(xs, srcs)]
    _, exact = _newton_minimum(xs, srcs, merged)
    harc = solve_router(xs, srcs, merged, alpha=0.99, solver="direct", objective="quadratic").weight
    harc_kl = rd.train_kl(harc, data, "softmax")
    before = rd.train_kl(merged, data, "softmax")
    res = rd.distill_router(data, merged, lr=0.1, max_steps=500, batch_tokens=10_000, eval_every=25,
                            patience=100, min_improvement=0.0, seed=0)
    trained = rd.train_kl(res.weight, data, "softmax")
    assert exact < harc_kl < before
    assert trained <= harc_kl  # gradient steps on the exact loss end below its quadratic model's minimiser
    assert trained - exact < 1e-4 * before, (trained, exact, before)
    # from HARC's router it gets there too, and at step 0 it already is at HARC's KL
    res_h = rd.distill_router(data, harc, lr=0.1, max_steps=300, batch_tokens=10_000, eval_every=25, patience=100,
                              min_improvement=0.0, seed=0)
    assert res_h.curve[0][1] == pytest.approx(harc_kl, rel=1e-12)
    assert rd.train_kl(res_h.weight, data, "softmax") - exact < 1e-4 * before
    assert rd.steps_to_reach(res.curve, harc_kl) is not None and rd.steps_to_reach(res.curve, harc_kl) > 0
    assert rd.steps_to_reach(res_h.curve, harc_kl) == 0


def test_early_stopping_keeps_the_best_measured_router():
    """Held-out tokens of another distribution: the held-out KL turns up while the training loss
    falls; training stops after `patience` measurements without improvement and returns the best."""
    xs, srcs = problem(4, n=200)
    xv = torch.randn(200, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * 3 + 2
    other = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    data = [rd.TaskData(xs[0], xs[0] @ srcs[0].T, xv, xv @ other.T)]
    res = rd.distill_router(data, srcs[1], lr=0.05, max_steps=2000, batch_tokens=64, eval_every=10, patience=3,
                            seed=1)
    assert res.stopped == "early" and res.steps < 2000
    vals = [v for _, v in res.curve]
    best = min(vals)
    assert res.best_step == res.curve[vals.index(best)][0]
    assert rd.heldout_kl(res.weight, data, "softmax") == pytest.approx(best, rel=1e-12)
    assert res.steps == res.best_step + 3 * 10  # three measurements without improvement after the best
    # the same inputs and seed: the same bits
    again = rd.distill_router(data, srcs[1], lr=0.05, max_steps=2000, batch_tokens=64, eval_every=10, patience=3,
                              seed=1)
    assert torch.equal(again.weight, res.weight) and again.curve == res.curve


def test_a_nan_loss_names_the_step():
    """A training batch that holds a NaN (a corrupted input row) stops training at that step."""
    xs, srcs = problem(5, n=50)
    x = xs[0].clone()
    x[7, 2] = float("nan")
    val = xs[1]
    data = [rd.TaskData(x, x @ srcs[0].T, val, val @ srcs[0].T)]
    with pytest.raises(InputDataError, match=r"at step 1 .*router_distill.lr"):
        rd.distill_router(data, srcs[1], lr=0.01, max_steps=5, eval_every=1, patience=5)


def test_heldout_split_is_by_sequence_and_seeded():
    import numpy as np

    held = rd.heldout_sequences(10, 0.2, [0, 1, 2])
    assert len(held) == 2 and np.array_equal(held, rd.heldout_sequences(10, 0.2, [0, 1, 2]))
    offsets = np.array([0, 3, 5, 9])
    # rows 0..8 belong to sequences 0,0,0,1,1,2,2,2,2; a subsample keeps rows 1, 4, 8
    assert rd.split_rows(offsets, np.array([1, 4, 8]), np.array([1])).tolist() == [False, True, False]
    assert rd.split_rows(offsets, None, np.array([0, 2])).tolist() == [True] * 3 + [False] * 2 + [True] * 4


def test_config_errors_name_the_key(tmp_path):
    from conftest import write_toy_config

    path = write_toy_config(tmp_path)
    for key, value, text in (("router_distill.lr", 0, "router_distill.lr"),
                             ("router_distill.max_steps", -3, "router_distill.max_steps"),
                             ("router_distill.starts", ["harc", "harc"], "router_distill.starts"),
                             ("router_distill.starts", [], "router_distill.starts"),
                             ("router_distill.validation_fraction", 1.0, "router_distill.validation_fraction")):
        with pytest.raises(ConfigError, match=text.replace(".", r"\.")):
            load_config(path, overrides={key: value})


# -- the plan -------------------------------------------------------------------------------------------

def _specs_without_training(tmp_path) -> Path:
    """The stage specs as they were before the training stages: theirs removed, the report's
    optional need on them dropped."""
    out = tmp_path / "specs-before"
    shutil.copytree(ROOT / "stages", out)
    for p in out.glob("*.yaml"):
        spec = yaml.safe_load(p.read_text())
        if spec.get("enabled_if", "").startswith(("harc_hpc.stages.router_distill", "harc_hpc.stages.finetune")):
            p.unlink()
        elif spec.get("needs"):
            spec["needs"] = [n for n in spec["needs"] if not (isinstance(n, dict) and "distill" in n["stage"]
                                                               or isinstance(n, dict) and n["stage"] == "finetune")]
            p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def test_the_plan_without_training_is_unchanged(tmp_path):
    from conftest import write_toy_config

    cfg = load_config(write_toy_config(tmp_path))
    assert "router_distill" not in cfg.model_dump(mode="json")  # no key in the run's config snapshot
    now = build_plan(cfg, layers=[0, 1, 2])
    before = build_plan(cfg, specs_dir=_specs_without_training(tmp_path), layers=[0, 1, 2])
    assert {t: x.digest for t, x in now.tasks.items()} == {t: x.digest for t, x in before.tasks.items()}
    on = build_plan(load_config(write_toy_config(tmp_path), overrides={"router_distill.enabled": True}),
                    layers=[0, 1, 2])
    assert sorted(t for t in now.tasks if now.tasks[t].digest != on.tasks[t].digest) == ["report/all"]
    new = sorted(set(on.tasks) - set(now.tasks))
    assert new == ["router-distill-model/all"] + [f"router-distill/layer-00{l}" for l in range(3)]
    assert on.tasks["router-distill/layer-001"].needs == ["capture-activations/block-001", "solve-router/layer-001"]
    assert "router-distill-model/all" in on.tasks["report/all"].needs
    # a change of a training setting reruns the training and what reads it, nothing of HARC
    lr = build_plan(load_config(write_toy_config(tmp_path), overrides={"router_distill.enabled": True,
                                                                       "router_distill.lr": 0.5}), layers=[0, 1, 2])
    assert sorted(t for t in on.tasks if on.tasks[t].digest != lr.tasks[t].digest) == \
        ["report/all", "router-distill-model/all"] + [f"router-distill/layer-00{l}" for l in range(3)]


# -- the stage in a pipeline ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory):
    """A 2-layer tiny pipeline with router-distill on, submitted with the debug executor, and what
    the stage read of the config (recorded by the stage-spec tests' proxy)."""
    from pipeline_fixtures import build_tiny_sources, submit_debug, write_config

    root = tmp_path_factory.mktemp("distill")
    sources = build_tiny_sources(root / "src", layers=2)
    config = write_config(root, sources, name="run", executor="debug",
                          extra={"router_distill.enabled": True, "router_distill.max_steps": 80,
                                 "run.retention": "keep"})
    submit_debug(config)
    return root, config, root / "runs" / "run"


def test_the_stage_writes_routers_reports_and_model_directories(distilled_run):
    from transformers import AutoModelForCausalLM
    from safetensors.torch import load_file

    from harc_hpc.stages.routers import load_router, merged_router

    root, config, run_dir = distilled_run
    cfg = load_config(config)
    for layer in (0, 1):
        rep = json.loads(rd.distilled_report(run_dir, layer).read_text())
        closed, trained = rep["closed_form"], rep["trained"]
        assert set(trained) == {"merged", "harc"}
        assert all(v["heldout"] >= 1 and v["train"] > v["heldout"] for v in rep["tokens"].values())
        # the trained routers beat the merged one on held-out calibration tokens; from HARC they never
        # end worse than HARC (step 0 is measured and the best is kept)
        assert trained["merged"]["heldout_kl"] < 0.7 * closed["merged"]["heldout_kl"]
        assert trained["harc"]["heldout_kl"] <= closed["harc"]["heldout_kl"]
        assert trained["harc"]["curve"][0] == [0, pytest.approx(closed["harc"]["heldout_kl"], rel=1e-6)]
        assert trained["merged"]["curve"][0][1] == pytest.approx(closed["merged"]["heldout_kl"], rel=1e-6)
        tensors = load_file(str(rd.distilled_file(run_dir, layer)))
        assert set(tensors) == {"merged.weight", "harc.weight"}
        assert not torch.equal(tensors["merged.weight"], merged_router(cfg, run_dir, layer).float())
        assert not torch.equal(tensors["harc.weight"], load_router(run_dir, layer))
    # each start is a normal model directory with the trained routers in it
    for start in ("merged", "harc"):
        model = AutoModelForCausalLM.from_pretrained(rd.models_dir(run_dir) / start)
        for layer in (0, 1):
            w = load_file(str(rd.distilled_file(run_dir, layer)))[f"{start}.weight"]
            assert torch.equal(model.model.layers[layer].mlp.gate.weight.detach(), w.to(model.dtype))
    # HARC's own model is untouched
    harc_model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert torch.equal(harc_model.model.layers[0].mlp.gate.weight.detach(), load_router(run_dir, 0))


def test_the_same_config_gives_the_same_bytes_and_a_resubmit_skips(distilled_run):
    from pipeline_fixtures import submit_debug

    from harc_hpc.pipeline import records

    root, config, run_dir = distilled_run
    first = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted((run_dir / "router-distill").glob("layer-*.safetensors"))}
    shutil.rmtree(run_dir / "router-distill")  # artifacts gone: the resubmit reruns them
    lines: list = []
    submit_debug(config, lines)
    again = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted((run_dir / "router-distill").glob("layer-*.safetensors"))}
    assert again == first
    plan = build_plan(load_config(config))
    assert all(plan.is_complete(t) for t in plan.tasks.values())
    assert records.read_completion(run_dir, "router-distill", "layer-000")["digest"] == \
        plan.tasks["router-distill/layer-000"].digest


def test_every_key_the_stage_reads_is_in_its_digest(distilled_run):
    """As tests/test_stage_specs.py checks the other stages: what router-distill and its assembly
    read of the config is in their digests or upstream of them, and what their specs list is read."""
    from test_stage_specs import NOT_RESULT_KEYS, _covers, _ModelProxy, _norm, _Reads, _upstream

    root, config, run_dir = distilled_run
    cfg = load_config(config)
    specs = load_specs()
    tasks = set(cfg.task_names)
    for stage, call in (("router-distill", lambda c: rd.run(c, run_dir, layer=1)),
                        ("router-distill-model", lambda c: rd.assemble(c, run_dir))):
        reads = _Reads()
        call(_ModelProxy(cfg, "", reads))
        keys = {_norm(k, tasks) for k in reads.keys}
        own = [_norm(s, tasks) for s in specs[stage].config_sections]
        inherited = [_norm(s, tasks) for up in _upstream(specs, stage) for s in specs[up].config_sections]
        missing = sorted(k for k in keys if not any(_covers(s, k) for s in own + inherited)
                         and not any(_covers(x, k) for x in NOT_RESULT_KEYS))
        assert not missing, f"{stage} reads {missing}, which no digest covers"
        unread = [s for s in own if not any(_covers(s, k) or _covers(k, s) for k in keys)]
        assert not unread, f"{stage} lists {unread} but never reads them"


def test_too_little_data_is_an_error_and_writes_nothing(distilled_run, tmp_path):
    root, config, run_dir = distilled_run
    cfg = load_config(config, overrides={"router_distill.validation_fraction": 0.99})
    before = rd.distilled_file(run_dir, 0).read_bytes()
    with pytest.raises(InputDataError, match="validation_fraction"):
        rd.run(cfg, run_dir, layer=0)
    assert rd.distilled_file(run_dir, 0).read_bytes() == before
    assert not [p for p in (run_dir / "router-distill").iterdir() if p.name.startswith(".")]


def test_the_report_compares_the_closed_form_with_training(distilled_run):
    from harc_hpc.stages import report

    root, config, run_dir = distilled_run
    cfg = load_config(config, overrides={"report.enabled": True, "report.router_swap": False})
    report.run(cfg, run_dir)
    m = json.loads((run_dir / "report" / "metrics.json").read_text())
    names = ("merged", "calibrated", "router-distill", "harc+router-distill")
    for t in m["tasks"]:
        assert all(isinstance(m["loss"][t][n], float) for n in names)
    rl = m["summary"]["router_level"]
    assert all(n in rl for n in names)
    # trained on the exact KL from HARC's router: no worse than HARC on held-out text, by a margin
    assert rl["harc+router-distill"]["kl_mean"] <= 1.05 * rl["calibrated"]["kl_mean"]
    assert rl["router-distill"]["kl_mean"] < rl["merged"]["kl_mean"]
    tr = m["training"]
    assert set(tr["router_distill"]) == {"merged", "harc"}
    assert [row["layer"] for row in tr["layers"]] == [0, 1]
    assert tr["router_distill"]["harc"]["seconds"] >= tr["harc"]["seconds"] > 0
    assert tr["router_distill"]["merged"]["steps"] == sum(row["merged"]["steps"] for row in tr["layers"])
    md = (run_dir / "report" / "report.md").read_text()
    assert "## Closed form vs training" in md and "router-distill: Adam (lr" in md and "| merged + HARC + router-distill |" in md


def test_lm_eval_scores_the_training_models(distilled_run, monkeypatch):
    """report.lm_eval_models: [training] hands lm-eval every training baseline's model directory."""
    from harc_hpc.report import lm_eval

    root, config, run_dir = distilled_run
    cfg = load_config(config, overrides={"report.lm_eval_tasks": ["harc_demo_code"],
                                         "report.lm_eval_models": ["calibrated", "training"]})
    seen = []
    monkeypatch.setattr(lm_eval, "_evaluate", lambda cfg, path, *a, **k: seen.append(path) or {"harc_demo_code": {}})
    out = lm_eval.run_lm_eval(cfg, run_dir)
    assert list(out["models"]) == ["calibrated", "router-distill", "harc+router-distill"]
    assert seen == [str(run_dir / "model"), str(rd.models_dir(run_dir) / "merged"), str(rd.models_dir(run_dir) / "harc")]
