"""The report stage on a small hand-made run directory, and `harc-hpc compare`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from harc_hpc.config import dump_config, load_config
from harc_hpc.models.families import family_for_config
from harc_hpc.cli.report import compare_command, report_command
from harc_hpc.report import lm_eval, metrics, provenance
from harc_hpc.stages import report
from pipeline_fixtures import build_tiny_sources, write_config

TASKS = ("math", "code")


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()


def _save(model, src_dir: Path, out: Path):
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src_dir / name, out / name)


def make_run_dir(root: Path, family: str = "olmoe", layers: int = 2) -> tuple[Path, Path]:
    """merged = plain average of the sources; "calibrated" = merged with math's routers written in,
    so some metrics have exact expected values."""
    sources = build_tiny_sources(root, family=family, layers=layers)
    cfg_path = write_config(root, sources, name="r1", extra={"report.enabled": True})
    cfg = load_config(cfg_path)
    run_dir = cfg.run_dir
    models = {t: _load(sources[t]) for t in TASKS}
    merged = _load(sources["math"])
    state = {k: sum(models[t].state_dict()[k] for t in TASKS) / len(TASKS) for k in merged.state_dict()}
    merged.load_state_dict(state)
    _save(merged, sources["math"], run_dir / "merged")
    fam = family_for_config(json.loads((sources["math"] / "config.json").read_text()))
    conf = json.loads((sources["math"] / "config.json").read_text())
    (run_dir / "routers").mkdir(parents=True)
    for l in fam.moe_layers(conf):
        w = fam.router_module(models["math"], l).weight.detach().clone()
        with torch.no_grad():
            fam.router_module(merged, l).weight.copy_(w)
        save_file({"weight": w.contiguous()}, str(run_dir / "routers" / f"layer-{l:03d}.safetensors"))
        (run_dir / "routers" / f"layer-{l:03d}.json").write_text(json.dumps(
            {"layer": l, "iterations": 10 + l, "relative_residual": 1e-7, "converged": True, "seconds": 0.5,
             "unrouted_experts": {"math": [], "code": [l]}}))
    _save(merged, sources["math"], run_dir / "model")
    (run_dir / "completions" / "solve-router").mkdir(parents=True)
    (run_dir / "completions" / "solve-router" / "layer-000.json").write_text(json.dumps(
        {"stage": "solve-router", "wall_s": 2.5, "peak_rss_mb": 300.0, "device": "cpu"}))
    (run_dir / "completions" / "solve-router" / "layer-001.json").write_text(json.dumps(
        {"stage": "solve-router", "peak_gpu_mb": 1234.5, "device": "cuda:0 (NVIDIA H100)"}))  # a task that ran on a GPU
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return cfg_path, run_dir


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    cfg_path, run_dir = make_run_dir(root)
    cfg = load_config(cfg_path)
    result = report.run(cfg, run_dir)
    return cfg, run_dir, result


def test_report_files(reported_run):
    _, run_dir, result = reported_run
    out = run_dir / "report"
    for name in ("metrics.json", "report.md", "routing.png", "loss.png", "solve.png"):
        assert (out / name).is_file(), name
    assert (out / "routing.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "## Routing, router-level" in md and "## Held-out loss" in md and "![routing.png](routing.png)" in md
    assert set(result) >= {"kl_merged", "kl_calibrated", "loss_mean"}
    # every solved layer says which experts no calibration token reached, per source
    m = json.loads((out / "metrics.json").read_text())
    assert all(r["unrouted_experts"] == {"math": [], "code": [int(l)]} for l, r in m["solve"].items())
    assert "experts no calibration token reached" in md and "| code: 1 |" in md


def test_router_swap_usage_and_gap_shares(reported_run):
    """Fig. 1's matrix, expert usage and the story's shares, on the run whose "calibrated" model is
    the merged one with math's routers: on every task, math's routers in the merged model are it."""
    _, run_dir, _ = reported_run
    m = json.loads((run_dir / "report" / "metrics.json").read_text())
    swap, loss = m["router_swap"], m["loss"]
    assert set(swap) == set(TASKS) and all(set(swap[t]) == {"merged", *TASKS} for t in TASKS)
    for t in TASKS:
        assert swap[t]["merged"] == loss[t]["merged"] and swap[t][t] == loss[t]["oracle"]
        assert swap[t]["math"] == pytest.approx(loss[t]["calibrated"], rel=1e-6)
    usage = m["expert_usage"]
    assert set(usage) == {"source:math", "source:code", "merged", "calibrated"}
    assert set(usage["source:math"]) == {"math"} and set(usage["merged"]) == set(TASKS)
    for per in usage.values():
        for layers in per.values():
            assert len(layers) == 2 and all(sum(u) == pytest.approx(1.0) and len(u) == 4 for u in layers)
    s = m["summary"]
    want = metrics.gap_shares(loss["code"], "code")
    assert s["gap_shares"]["code"] == pytest.approx(want)
    assert want["oracle_recovers"] == pytest.approx(
        (loss["code"]["merged"] - loss["code"]["oracle"]) / (loss["code"]["merged"] - loss["code"]["source:code"]))
    assert s["expert_usage_overlap"] == pytest.approx(
        [metrics.usage_overlap(a, b) for a, b in zip(usage["source:math"]["math"], usage["source:code"]["code"])])
    md = (run_dir / "report" / "report.md").read_text()
    assert md.index("## The story") < md.index("## Summary") and "## Router swap" in md
    assert "| router-swap oracle |" in md and (run_dir / "report" / "usage.png").is_file()


def test_expert_usage_and_shares_against_loops():
    torch.manual_seed(0)
    logits = torch.randn(50, 6)
    counts = [0] * 6
    for row in logits:
        for e in row.topk(2).indices.tolist():
            counts[e] += 1
    assert metrics.expert_usage(logits, 2) == pytest.approx([c / 100 for c in counts])
    first = lambda z: torch.nn.functional.one_hot(z.argmax(-1), 6).bool()  # noqa: E731
    assert metrics.expert_usage(logits, 1, select=first) == pytest.approx(
        [float((logits.argmax(-1) == e).double().mean()) for e in range(6)])
    assert metrics.usage_overlap([0.5, 0.5, 0.0], [0.0, 0.5, 0.5]) == pytest.approx(0.5)
    shares = metrics.gap_shares({"base": 1.0, "source:a": 0.8, "merged": 1.1, "oracle": 0.85,
                                 "calibrated": 0.9}, "a")
    assert shares == pytest.approx({"merge_keeps_gain": -0.5, "oracle_recovers": 0.25 / 0.3,
                                    "harc_recovers_of_oracle": 0.2 / 0.25, "harc_recovers": 0.2 / 0.3})
    assert metrics.gap_shares({"merged": 1.0, "calibrated": 0.9}, "a") == {}


def test_unrouted_experts_are_named_per_source():
    from harc_hpc.report.render import unrouted_text

    assert unrouted_text({"math": [], "code": [3, 17]}) == "code: 3, 17"
    assert unrouted_text({"math": [], "code": []}) == "none" and unrouted_text(None) == "-"


def test_report_metrics_values(reported_run):
    _, run_dir, _ = reported_run
    m = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert m["tasks"] == list(TASKS) and m["layers"] == [0, 1] and m["top_k"] == 2
    for view in ("router_level", "end_to_end"):
        for model in ("merged", "calibrated"):
            for t in TASKS:
                vals = m["routing"][view][model][t]
                assert len(vals["kl"]) == 2 and all(v >= -1e-12 for v in vals["kl"])
                assert all(0.0 <= v <= 1.0 for v in vals["topk_mismatch"])
    # The "calibrated" model carries math's routers: router-level it routes exactly like math.
    ee = m["summary"]["end_to_end"]["merged"]
    assert 0.0 <= ee["tokens_with_deviation"] <= 1.0 and 0.0 <= ee["deviating_layers_per_token"] <= 2.0
    rl = m["routing"]["router_level"]
    assert rl["calibrated"]["math"]["kl"] == pytest.approx([0.0, 0.0], abs=1e-9)
    assert rl["calibrated"]["math"]["topk_mismatch"] == [0.0, 0.0]
    assert max(rl["merged"]["math"]["kl"]) > 1e-3  # the noisy routers do differ after averaging
    loss = m["loss"]
    for t in TASKS:
        assert set(loss[t]) == {"source:math", "source:code", "base", "merged", "calibrated", "oracle"}
        assert all(0 < v < 10 for v in loss[t].values())
    # ... and on math the oracle (merged + math's routers) is that same model.
    assert loss["math"]["oracle"] == pytest.approx(loss["math"]["calibrated"], rel=1e-6)
    assert m["heldout_tokens"]["math"] > 0
    assert m["solve"]["1"]["iterations"] == 11 and m["solve"]["0"]["converged"] is True
    st = m["stages"]["solve-router"]
    assert st["tasks"] == 2 and st["wall_s_total"] == 2.5 and st["peak_rss_mb_max"] == 300.0
    assert st["peak_gpu_mb_max"] == 1234.5 and "peak_gpu_mb_max" not in m["stages"].get("assemble-model", {})
    assert st["devices"] == ["cpu", "cuda:0 (NVIDIA H100)"]  # the stage's report says what ran it
    man = m["manifest"]
    assert {"routers/layer-000.safetensors", "model/model.safetensors", "merged/model.safetensors"} <= set(man["artifacts"])
    assert man["packages"]["torch"] == torch.__version__
    assert len(man["config_digest"]) == 64


@pytest.mark.parametrize("family", ["qwen3_moe", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_report_on_other_families(tmp_path, family):
    # Qwen3-MoE fixture: layer 1 is dense (mlp_only_layers) and has no router.
    cfg_path, run_dir = make_run_dir(tmp_path, family=family, layers=3)
    report.run(load_config(cfg_path), run_dir)
    m = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert m["layers"] == ([0, 2] if family == "qwen3_moe" else [0, 1, 2])
    rl = m["routing"]["router_level"]["calibrated"]["math"]
    assert rl["kl"] == pytest.approx([0.0] * len(m["layers"]), abs=1e-9)
    assert max(m["routing"]["end_to_end"]["merged"]["code"]["topk_mismatch"]) > 0


def test_token_deviation_counts_layers():
    a = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 4)
    b = torch.tensor([[3.0, 2.0, 1.0, 0.0], [2.0, 3.0, 1.0, 0.0], [0.0, 2.0, 3.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
    # top-2 of a = {0, 1}; rows of b: {0,1} same, {0,1} same (order does not matter), {1,2}, {2,3}
    assert metrics.selection_differs(a, b, 2).tolist() == [False, False, True, True]
    dev = metrics.token_deviation({0: a, 1: a}, {0: b, 1: a}, [0, 1], 2)
    assert dev == {"tokens_with_deviation": 0.5, "deviating_layers_per_token": 0.5}


def test_routing_divergence_basics():
    logits = torch.randn(50, 6, dtype=torch.float64)
    assert metrics.routing_divergence(logits, logits, 2) == (0.0, 0.0)
    flipped = -logits
    kl, miss = metrics.routing_divergence(logits, flipped, 2)
    assert kl > 0 and miss == 1.0  # the top-2 of -z are the bottom-2 of z


def test_lm_eval_model_args_pass_through(reported_run):
    cfg, run_dir, _ = reported_run
    plain = lm_eval.lm_eval_model_args(cfg, run_dir / "model")
    assert plain == f"pretrained={run_dir / 'model'},trust_remote_code=False"
    cfg2 = cfg.model_copy(update={"report": cfg.report.model_copy(update={"lm_eval_model_args": "parallelize=True,"})})
    assert lm_eval.lm_eval_model_args(cfg2, run_dir / "model") == plain + ",parallelize=True"


def test_missing_lm_eval_is_a_clear_error(reported_run, monkeypatch):
    cfg, run_dir, _ = reported_run
    cfg = cfg.model_copy(deep=True)
    cfg.report.lm_eval_tasks = ["gsm8k"]
    real = lm_eval.importlib.util.find_spec
    monkeypatch.setattr(lm_eval.importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(metrics.ReportError, match="lm-evaluation-harness is not installed.*pip install lm-eval"):
        report.run(cfg, run_dir)


def test_missing_checkpoint_names_the_stage(tmp_path):
    sources = build_tiny_sources(tmp_path, layers=2)
    cfg = load_config(write_config(tmp_path, sources, name="empty"))
    cfg.run_dir.mkdir(parents=True)
    with pytest.raises(metrics.ReportError, match="run merge-experts first"):
        report.run(cfg, cfg.run_dir)


# -- compare ------------------------------------------------------------------------------------

def _copy_run(run_dir: Path, dst: Path) -> Path:
    shutil.copytree(run_dir / "report", dst / "report")
    return dst


def _edit_metrics(run: Path, fn):
    path = run / "report" / "metrics.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def test_compare_identical_runs(reported_run, tmp_path):
    _, run_dir, _ = reported_run
    b = _copy_run(run_dir, tmp_path / "b")
    res = CliRunner().invoke(compare_command, [str(run_dir), str(b)])
    assert res.exit_code == 0, res.output
    assert "RESULT: same within tolerance" in res.output


def test_compare_flags_a_moved_metric(reported_run, tmp_path):
    _, run_dir, _ = reported_run
    b = _copy_run(run_dir, tmp_path / "b")
    _edit_metrics(b, lambda m: m["loss"]["code"].__setitem__("calibrated", m["loss"]["code"]["calibrated"] * 1.01))
    res = CliRunner().invoke(compare_command, [str(run_dir), str(b)])
    assert res.exit_code == 1
    assert "loss.code.calibrated" in res.output and "moved" in res.output
    # ... which a looser tolerance accepts
    res = CliRunner().invoke(compare_command, [str(run_dir), str(b), "--rtol", "0.05"])
    assert res.exit_code == 0, res.output


def test_compare_flags_a_missing_metric(reported_run, tmp_path):
    _, run_dir, _ = reported_run
    b = _copy_run(run_dir, tmp_path / "b")
    _edit_metrics(b, lambda m: m["loss"]["math"].pop("oracle"))
    res = CliRunner().invoke(compare_command, [str(run_dir), str(b)])
    assert res.exit_code == 1 and "missing" in res.output


def test_compare_accepts_metrics_new_in_b(reported_run, tmp_path):
    _, run_dir, _ = reported_run
    a = _copy_run(run_dir, tmp_path / "a")
    _edit_metrics(a, lambda m: m["loss"]["math"].pop("oracle"))
    res = CliRunner().invoke(compare_command, [str(a), str(run_dir)])
    assert res.exit_code == 0, res.output
    assert "loss.math.oracle" in res.output and "new" in res.output


def test_compare_digests_must_match_only_for_the_same_config(reported_run, tmp_path):
    _, run_dir, _ = reported_run
    b = _copy_run(run_dir, tmp_path / "b")
    _edit_metrics(b, lambda m: m["manifest"]["artifacts"].__setitem__("routers/layer-001.safetensors", "0" * 64))
    res = CliRunner().invoke(compare_command, [str(run_dir), str(b)])
    assert res.exit_code == 1
    assert "routers/layer-001.safetensors" in res.output and "must be identical" in res.output
    _edit_metrics(b, lambda m: m["manifest"].__setitem__("torch_threads", m["manifest"]["torch_threads"] + 1))
    res = CliRunner().invoke(compare_command, [str(run_dir), str(b)])
    assert res.exit_code == 0, res.output
    assert "torch_threads differ" in res.output
    _edit_metrics(b, lambda m: m["manifest"].__setitem__("torch_threads", m["manifest"]["torch_threads"] - 1))
    _edit_metrics(b, lambda m: m["manifest"].__setitem__("results_config_digest", "other"))
    res = CliRunner().invoke(compare_command, [str(run_dir), str(b)])
    assert res.exit_code == 0, res.output
    assert "differences expected" in res.output


def test_compare_without_report_exits_2(reported_run, tmp_path):
    _, run_dir, _ = reported_run
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(compare_command, [str(run_dir), str(tmp_path / "empty")])
    assert res.exit_code == 2
    assert "no report metrics" in res.output


def test_results_config_digest_ignores_name_and_executor(reported_run):
    cfg, _, _ = reported_run
    other = cfg.model_copy(deep=True)
    other.run.name = "nightly-2026-11-22"
    other.executor.kind = "slurm"
    assert provenance.results_config_digest(other) == provenance.results_config_digest(cfg)
    other.harc.alpha = 0.5
    assert provenance.results_config_digest(other) != provenance.results_config_digest(cfg)


def test_report_command(reported_run, monkeypatch):
    # The stage itself is tested above; here: the command loads RUN_DIR/config.yaml and reports.
    _, run_dir, result = reported_run
    seen = {}

    def fake_run(cfg, rd):
        seen["cfg"], seen["run_dir"] = cfg, rd
        return result

    monkeypatch.setattr(report, "run", fake_run)
    res = CliRunner().invoke(report_command, [str(run_dir)])
    assert res.exit_code == 0, res.output
    assert "router-level KL: merged" in res.output and "mean held-out loss calibrated" in res.output
    assert seen["run_dir"] == run_dir and seen["cfg"].task_names == list(TASKS)


def test_report_command_errors_cleanly(tmp_path):
    (tmp_path / "config.yaml").write_text("models: {sources: [{name: a, path: /nonexistent}]}\n")
    res = CliRunner().invoke(report_command, [str(tmp_path)])
    assert res.exit_code == 4  # RunStateError: the run has no merged model yet
    assert "error:" in res.output and "merge-experts" in res.output and "Traceback" not in res.output


def test_thread_count_comes_from_the_launcher_records(tmp_path):
    assert provenance._stage_threads(tmp_path) == torch.get_num_threads()
    rec = tmp_path / "completions" / "capture-activations" / "block-000.json"
    rec.parent.mkdir(parents=True)
    rec.write_text(json.dumps({"stage": "capture-activations", "job": {"host": "n1", "torch_threads": 7}}))
    assert provenance._stage_threads(tmp_path) == 7
