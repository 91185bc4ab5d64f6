"""MergeME router fit (issue 15 item 2): the target-distribution math against dense autograd
references, the pipeline fit on tiny models, and bad input."""

from __future__ import annotations

import pytest
import torch

from harc_hpc.math.targets import domain_targets, fit_router_to_targets, target_kl, target_share
from harc_hpc.math.inputs import TokenChunks


def _tasks(k=3, d=5, n=(40, 30, 50), seed=0, sep=1.5):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(n), d, generator=g, dtype=torch.float64) * sep
    xs = [centres[i] + torch.randn(m, d, generator=g, dtype=torch.float64) for i, m in enumerate(n)]
    return xs


def _loss(w, xs, qs):
    """sum_i mean_x KL(q_i || softmax(w x)), written out per token."""
    total = 0.0
    for x, q in zip(xs, qs):
        logp = torch.log_softmax(x @ w.T, dim=1)
        total = total + (torch.special.xlogy(q, q).sum() - (logp * q).sum(dim=1)).mean()
    return total


def _dense_quadratic(xs, qs, w0, alpha):
    """W0 + Sigma_reg^-1 (-g) with gradient and Hessian of the loss by autograd (flattened W)."""
    k, d = w0.shape
    f = lambda v: _loss(v.reshape(k, d), xs, qs)  # noqa: E731
    v0 = w0.reshape(-1).clone().requires_grad_(True)
    g = torch.autograd.grad(f(v0), v0)[0]
    h = torch.autograd.functional.hessian(f, w0.reshape(-1))
    a = alpha * h + (1 - alpha) * torch.diag(torch.diagonal(h))
    step = torch.linalg.pinv(a, hermitian=True) @ (-g)
    return (w0.reshape(-1) + step).reshape(k, d)


@pytest.mark.parametrize("solver", ["direct", "pcg", "cg"])
@pytest.mark.parametrize("alpha", [0.9, 1.0])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_quadratic_step_equals_dense_autograd_newton_step(solver, alpha, smoothing):
    xs = _tasks()
    qs = domain_targets(3, [0, 1, 2], smoothing)
    g = torch.Generator().manual_seed(1)
    for w0 in (torch.zeros(3, 5, dtype=torch.float64), 0.3 * torch.randn(3, 5, generator=g, dtype=torch.float64)):
        sol = fit_router_to_targets(xs, qs, w0, alpha=alpha, solver=solver, tol=1e-12, max_iter=500)
        ref = _dense_quadratic(xs, qs, w0, alpha)
        assert sol.converged
        # alpha = 1: the shift null space; both are the minimum-change solution from w0
        torch.testing.assert_close(sol.weight, ref, atol=1e-7, rtol=1e-7)
        assert sol.kl_before == pytest.approx([float(_loss(w0, [x], [q])) for x, q in zip(xs, qs)], rel=1e-10)
        assert sol.kl_after == pytest.approx([float(_loss(sol.weight, [x], [q])) for x, q in zip(xs, qs)], rel=1e-10)


def test_uniform_step_is_least_squares_regression_of_centred_targets():
    """At W0 = 0 and alpha = 1 the Newton step is the regression of K (q_i - 1/K) on x."""
    xs = _tasks()
    qs = domain_targets(3, [2, 0, 1], 0.0)
    sol = fit_router_to_targets(xs, qs, torch.zeros(3, 5, dtype=torch.float64), alpha=1.0, solver="direct")
    # normal equations with tasks weighted equally (means per task)
    c = sum(x.T @ x / len(x) for x in xs)
    rhs = sum(3 * (q - 1 / 3)[:, None] * x.mean(0)[None, :] for x, q in zip(xs, qs))
    torch.testing.assert_close(sol.weight, rhs @ torch.linalg.inv(c), atol=1e-9, rtol=1e-9)


def test_exact_kl_fit_reaches_the_autograd_minimum():
    xs = _tasks(sep=0.8)
    qs = domain_targets(3, [0, 1, 2], 0.2)
    w0 = torch.zeros(3, 5, dtype=torch.float64)
    sol = fit_router_to_targets(xs, qs, w0, alpha=0.9, objective="kl", solver="pcg", tol=1e-10, max_iter=500)
    assert sol.converged and sol.newton_steps >= 1
    w = sol.weight.clone().requires_grad_(True)
    grad = torch.autograd.grad(_loss(w, xs, qs), w)[0]
    assert float(grad.norm()) < 1e-8
    # slow reference: plain Newton with the dense autograd Hessian (pseudo-inverse for the shift)
    v = torch.zeros(15, dtype=torch.float64)
    f = lambda u: _loss(u.reshape(3, 5), xs, qs)  # noqa: E731
    for _ in range(40):
        vv = v.clone().requires_grad_(True)
        g = torch.autograd.grad(f(vv), vv)[0]
        if float(g.norm()) < 1e-13:
            break
        v = v - torch.linalg.pinv(torch.autograd.functional.hessian(f, v), hermitian=True) @ g
    assert float(g.norm()) < 1e-13
    assert float(_loss(sol.weight, xs, qs)) == pytest.approx(float(f(v)), abs=1e-12)
    # same routing distribution on every token (the weights agree up to the shift null space)
    for x in xs:
        torch.testing.assert_close(torch.softmax(x @ sol.weight.T, 1), torch.softmax(x @ v.reshape(3, 5).T, 1),
                                   atol=1e-7, rtol=1e-7)
    # and the exact fit is lower than the one quadratic step
    quad = fit_router_to_targets(xs, qs, w0, alpha=0.9, solver="direct")
    assert sum(sol.kl_after) < sum(quad.kl_after)


def test_fit_routes_each_domain_to_its_expert_and_chunking_does_not_matter():
    xs = [x.float() for x in _tasks(k=4, d=8, n=(200, 150, 180), sep=2.0)]
    qs = domain_targets(4, [1, 3, 0], 0.1)  # expert 2 belongs to no domain
    w0 = torch.zeros(4, 8)
    sol = fit_router_to_targets(xs, qs, w0, alpha=0.95, tol=1e-10)
    chunked = fit_router_to_targets([TokenChunks(x, chunk_tokens=64) for x in xs], qs, w0, alpha=0.95, tol=1e-10)
    torch.testing.assert_close(sol.weight, chunked.weight, atol=1e-5, rtol=1e-5)
    for x, e in zip(xs, [1, 3, 0]):
        assert target_share(TokenChunks(x), e, sol.weight, 1) > 0.9
    assert all(a < b for a, b in zip(sol.kl_after, sol.kl_before))


def test_statistics_at_the_built_router_give_the_same_fit():
    from harc_hpc.math import compute_task_statistics

    xs = _tasks()
    qs = domain_targets(3, [0, 1, 2], 0.1)
    w0 = 0.2 * torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    stats = [compute_task_statistics(x, w0, w0) for x in xs]
    a = fit_router_to_targets(xs, qs, w0, alpha=0.9, solver="direct", statistics=stats)
    b = fit_router_to_targets(xs, qs, w0, alpha=0.9, solver="direct")
    torch.testing.assert_close(a.weight, b.weight, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="another source router"):
        fit_router_to_targets(xs, qs, torch.zeros(3, 5, dtype=torch.float64), statistics=stats)
    with pytest.raises(ValueError, match="counted 40 tokens"):
        fit_router_to_targets([xs[0][:20], xs[1], xs[2]], qs, w0, statistics=stats)


def test_target_kl_matches_per_token_loop():
    x = _tasks()[0]
    q = domain_targets(3, [1], 0.0)[0]
    w = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    loop = sum(sum(float(qk) * (float(torch.log(qk)) - float(lp)) for qk, lp in zip(q, torch.log_softmax(w @ xi, 0))
                   if qk > 0) for xi in x) / len(x)
    assert target_kl(TokenChunks(x, chunk_tokens=7), q, w) == pytest.approx(loop, rel=1e-12)


def test_bad_targets_are_refused():
    xs = _tasks()
    w0 = torch.zeros(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="expert 3 is not one of the 3"):
        domain_targets(3, [0, 3], 0.1)
    with pytest.raises(ValueError, match="smoothing"):
        domain_targets(3, [0, 1], 1.0)
    with pytest.raises(ValueError, match="target 1 has shape"):
        fit_router_to_targets(xs[:2], [torch.tensor([1.0, 0, 0]), torch.tensor([1.0, 0])], w0)
    with pytest.raises(ValueError, match="not a probability"):
        fit_router_to_targets(xs[:1], [torch.tensor([0.5, 0.6, -0.1])], w0)
    with pytest.raises(ValueError, match="one input set per target"):
        fit_router_to_targets(xs, domain_targets(3, [0, 1], 0.1), w0)
    with pytest.raises(ValueError, match="needs every target probability > 0"):
        fit_router_to_targets(xs, domain_targets(3, [0, 1, 2], 0.0), w0, objective="kl")


# -- the pipeline: build-moe as merge-experts, fit, assemble, report ---------------------------------

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

DOMAINS = ("math", "code", "text")


@pytest.fixture(scope="module")
def dense_demo(tmp_path_factory):
    """The MergeME demo's dense base and experts at the quick recipe (seconds)."""
    from harc_hpc.demo.dense import QUICK_DENSE_RECIPE

    root = tmp_path_factory.mktemp("dense-demo") / "build"
    root.mkdir()
    QUICK_DENSE_RECIPE.build_into(root)
    return root


def _mergeme_config(root: Path, demo: Path, *, name="fit", mergeme=None, harc=None, report=False) -> Path:
    cfg = {
        "run": {"name": name, "output_dir": str(root / "runs"), "seed": 0},
        "models": {"base": str(demo / "base"), "sources": [
            {"name": d, "path": str(demo / d), "calibration": {"files": [str(demo / "data" / f"{d}-calib.jsonl")]},
             "heldout": {"files": [str(demo / "data" / f"{d}-heldout.jsonl")]}} for d in DOMAINS]},
        "merge": {"method": "linear"},
        "mergeme": {"top_k": 2, "router_init": "uniform", "smoothing": 0.1, **(mergeme or {})},
        "calibration": {"max_length": 32, "batch_size": 4, "chunk_tokens": 128},
        "harc": {"solver": "pcg", "tol": 1e-8, "alpha": 0.9, "dtype": "float64", "device": "cpu", **(harc or {})},
        "executor": {"kind": "debug"},
        "report": {"enabled": report},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_pipeline_fit_routes_each_domain_to_its_expert(dense_demo, tmp_path):
    from harc_hpc.config import load_config
    from harc_hpc.stages import layout
    from harc_hpc.stages import report as report_stage
    from pipeline_fixtures import run_pipeline

    cfg = load_config(_mergeme_config(tmp_path, dense_demo, mergeme={"compare": ["random"]}, report=True))
    assert layout.reference_config(cfg)["model_type"] == "mixtral"
    assert layout.moe_layers(cfg) == [0, 1]
    run_dir = tmp_path / "runs" / "fit"
    run_pipeline(cfg, run_dir)
    assert json.loads((run_dir / "merged" / "harc_mergeme.json").read_text())["router_init"] == "uniform"
    for layer in (0, 1):
        rep = json.loads(layout.router_report(run_dir, layer).read_text())
        assert rep["converged"] and rep["target"] == "domain"
        for d in DOMAINS:
            assert rep["kl_after"][d] < rep["kl_before"][d]
            # chance (a uniform router, whose logits all tie): 1/3 as top-1, 2/3 within the top-2
            assert rep["expert_share"]["fitted"][d]["top2"] > 0.75
        assert sum(rep["expert_share"]["fitted"][d]["top1"] for d in DOMAINS) / 3 > 0.45
    # the assembled model holds the fitted routers and loads in transformers
    from transformers import AutoModelForCausalLM
    from harc_hpc.stages.routers import load_router

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    torch.testing.assert_close(model.model.layers[1].mlp.gate.weight, load_router(run_dir, 1).to(torch.float32))
    report_stage.run(cfg, run_dir)
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert set(metrics["options"]) == {"built (uniform)", "random", "fitted"}
    # held-out data of the quick recipe: 4 windows of 32 tokens per domain, so per-domain shares are
    # noisy; over the domains the fitted router still routes better than the random one
    opts = metrics["options"]
    assert (sum(opts["fitted"][d]["expert_share_top1"] for d in DOMAINS)
            > sum(opts["random"][d]["expert_share_top1"] for d in DOMAINS))
    for d in DOMAINS:
        fitted = opts["fitted"][d]
        assert fitted["tokens"] == 4 * 31 and fitted["expert"] == DOMAINS.index(d)
        assert sum(fitted["top1_distribution"]) == pytest.approx(1.0)
    # the sequence routers' rows (values: test_report_sequence_routing_shares_...): the report scores
    # every option on the tokens after their routing prefix too
    seq = metrics["sequence_routing"]
    assert seq["prefix_tokens"] == 16 and set(seq["routers"]) == {"ppl", "task_vector"}
    for d in DOMAINS:
        assert opts["fitted"][d]["loss_after_prefix"] > 0 and "ppl_share_top1_at_least_0.9" in metrics["targets"][d]
        assert set(metrics["dense_references_after_prefix"]["base"]) == set(DOMAINS)
    md = (run_dir / "report" / "report.md").read_text()
    assert "| PPL routing, separate attention |" in md and "after the first 16 of each sequence" in md
    assert "| PPL routing (sequences, first 16 tokens) |" in md
    assert (run_dir / "report" / "sequence_routing.png").read_bytes()[:4] == b"\x89PNG"
    assert any(line.startswith("PPL routing [math]: ") for line in report_stage.headline(run_dir))


def test_report_sequence_routing_shares_are_a_per_sequence_loop_over_route(dense_demo, tmp_path):
    """report_metrics (the report's PPL / task-vector rows) against routing each held-out sequence's
    prefix by hand with SequenceRoutedLM.route, on the MoE merge-experts builds (no fit needed)."""
    from transformers import AutoTokenizer

    from harc_hpc.config import load_config
    from harc_hpc.io.calibration_data import tokenize_task
    from harc_hpc.mergeme.pipeline import build_merged
    from harc_hpc.mergeme.routing_analysis import heldout_loss
    from harc_hpc.mergeme.sequence_routing import SequenceRoutedLM
    from harc_hpc.report.mergeme import sequence_routing_metrics as report_metrics

    cfg = load_config(_mergeme_config(tmp_path, dense_demo, name="seq"))
    run_dir = tmp_path / "runs" / "seq"
    build_merged(cfg, run_dir / "merged")
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "merged"))
    heldout = {s.name: tokenize_task(s.heldout, cfg.calibration, tokenizer) for s in cfg.models.sources}
    got = report_metrics(cfg, run_dir, heldout)
    P = got["prefix_tokens"]
    assert P == 16 and all(len(x) == 32 for d in DOMAINS for x in heldout[d])  # half the 32-token windows
    assert got["top_k"] == 2 and set(got["routers"]) == {"ppl", "task_vector"}
    json.dumps(got)
    for router in ("ppl", "task_vector"):
        w = SequenceRoutedLM.from_build(run_dir / "merged", router=router, attention="separate")
        for d in DOMAINS:
            e = w.expert_index(d)  # the record's expert of source d
            routes = [w.route(x[:P]) for x in heldout[d]]
            row = got["routers"][router][d]
            assert row["expert"] == d and row["sequences"] == len(heldout[d]) == 4
            assert row["share_top1"] == pytest.approx(sum(r.experts[0] == e for r in routes) / 4, abs=1e-12)
            assert row["share_topk"] == pytest.approx(sum(e in r.experts for r in routes) / 4, abs=1e-12)
            if router == "ppl":  # (the cheap rule: one forward per expert and sequence)
                assert row["share_top1_whole_sequence"] == pytest.approx(
                    sum(w.route(x).experts[0] == e for x in heldout[d]) / 4, abs=1e-12)
            assert row["tokens"] == 4 * (32 - P)
        if router == "ppl":  # separate attention's loss: the wrapper routed on the same prefixes
            ref = heldout_loss(w, {d: heldout[d] for d in DOMAINS}, prompt_tokens=P)
            for d in DOMAINS:
                assert got["routers"][router][d]["loss"]["separate"] == pytest.approx(ref[d]["loss"], rel=1e-9)
        assert got["tables"][router]["level"] == "sequence"
        assert got["tables"][router]["sets"]["math"]["sequences"] == 4
    # the report's dense references after the prefix score the same tokens as heldout_loss
    from transformers import AutoModelForCausalLM

    from harc_hpc.report.mergeme import dense_loss

    model = AutoModelForCausalLM.from_pretrained(str(dense_demo / "code")).eval()
    ref = heldout_loss(model, {"code": heldout["code"]}, prompt_tokens=P)["code"]["loss"]
    assert dense_loss(str(dense_demo / "code"), heldout["code"], 3, torch.device("cpu"), first=P) == \
        pytest.approx(ref, rel=1e-5)


def test_digests_of_configs_without_mergeme_are_unchanged(tmp_path):
    """The optional ``mergeme?`` entry of the stage specs adds nothing to a HARC run's digests."""
    from harc_hpc.config import load_config
    from harc_hpc.pipeline.planner import build_plan, load_specs
    from pipeline_fixtures import build_tiny_sources, write_config

    sources = build_tiny_sources(tmp_path / "src", layers=2)
    cfg = load_config(write_config(tmp_path, sources))
    specs = load_specs()
    stripped = {n: s.model_copy(update={"config_sections": [c for c in s.config_sections if c != "mergeme?"]})
                for n, s in specs.items()}
    assert any("mergeme?" in s.config_sections for s in specs.values())
    a = build_plan(cfg, specs=specs, layers=[0, 1])
    b = build_plan(cfg, specs=stripped, layers=[0, 1])
    assert {t: x.digest for t, x in a.tasks.items()} == {t: x.digest for t, x in b.tasks.items()}


def test_bad_mergeme_configs_are_refused_before_work(dense_demo, tmp_path):
    from harc_hpc.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="mergeme.smoothing > 0"):
        load_config(_mergeme_config(tmp_path, dense_demo, mergeme={"smoothing": 0.0}, harc={"objective": "kl"}))
    with pytest.raises(ConfigError, match=r"mergeme.prompts: \['maths'\] are not source names"):
        load_config(_mergeme_config(tmp_path, dense_demo, mergeme={"prompts": {"maths": ["1+1"]}}))
    with pytest.raises(ConfigError, match="kronecker"):
        load_config(_mergeme_config(tmp_path, dense_demo, harc={"preconditioner": "kronecker"}))
    data = yaml.safe_load(_mergeme_config(tmp_path, dense_demo).read_text())
    del data["models"]["base"]
    (tmp_path / "nobase.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="models.base must be the dense base"):
        load_config(tmp_path / "nobase.yaml")


# -- the demo's dense models --------------------------------------------------------------------

def test_dense_demo_build_is_deterministic_and_loads(dense_demo, tmp_path):
    from transformers import AutoModelForCausalLM

    from harc_hpc.demo.dense import QUICK_DENSE_RECIPE

    again = tmp_path / "again"
    again.mkdir()
    QUICK_DENSE_RECIPE.build_into(again)
    for name in ("base", *DOMAINS):
        assert (again / name / "model.safetensors").read_bytes() == (dense_demo / name / "model.safetensors").read_bytes()
        assert json.loads((dense_demo / name / "config.json").read_text())["model_type"] == "llama"
    for d in DOMAINS:
        for split in ("calib", "heldout"):
            assert (again / "data" / f"{d}-{split}.jsonl").read_bytes() == \
                (dense_demo / "data" / f"{d}-{split}.jsonl").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(str(dense_demo / "code"), local_files_only=True)
    assert model.config.hidden_size == QUICK_DENSE_RECIPE.hidden_size
    # continued pretraining specialises: each expert is better than the base on its own domain
    ce = json.loads((dense_demo / "build.json").read_text())["heldout_ce"]
    assert sum(ce[d][d] < ce["base"][d] for d in DOMAINS) >= 2


def test_mergeme_tiny_config_resolves_to_the_dense_demo(tmp_path, monkeypatch):
    from harc_hpc.config import load_config
    from harc_hpc.demo import build as demo_build
    from harc_hpc.demo.placeholders import has_placeholders, prepare_config, recipe_for_config
    from harc_hpc.demo.dense import QUICK_DENSE_RECIPE, DenseDemoRecipe

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "mergeme-tiny.yaml",
                      overrides={"demo.cache_dir": str(tmp_path)})
    assert cfg.mergeme is not None and cfg.demo.kind == "dense"
    assert recipe_for_config(cfg) == DenseDemoRecipe(seed=0)
    assert cfg.mergeme.compare == ["random", "hidden_state", "task_vector"]
    out = prepare_config(cfg, recipe=QUICK_DENSE_RECIPE)
    assert not has_placeholders(out)
    assert Path(out.models.base).name == "base"
    assert [Path(s.path).name for s in out.models.sources] == list(DOMAINS)
    assert demo_build.is_complete(demo_build.demo_dir(QUICK_DENSE_RECIPE, tmp_path), QUICK_DENSE_RECIPE)


# -- data-parallel fit (process_group): gloo processes give the one-process answer --------------------

def _dist_problem():
    xs = _tasks(k=3, d=5, n=(90, 7, 60), seed=9, sep=1.0)
    return xs, domain_targets(3, [0, 1, 2], 0.1), 0.1 * torch.randn(3, 5, dtype=torch.float64,
                                                                      generator=torch.Generator().manual_seed(2))


_DIST_CASES = {"quadratic": dict(objective="quadratic"), "kl": dict(objective="kl", kl_tol=1e-10),
               "direct": dict(solver="direct")}


def _dist_run(xs, qs, w0, group=None):
    from harc_hpc.math import compute_task_statistics

    out = {}
    for name, kw in _DIST_CASES.items():
        stats = [compute_task_statistics(x, w0, w0, chunk_tokens=16, process_group=group) for x in xs]
        sol = fit_router_to_targets(xs, qs, w0, alpha=0.9, tol=1e-11, chunk_tokens=16, statistics=stats,
                                    process_group=group, **kw)
        out[name] = (sol.weight, sol.kl_before, sol.kl_after)
    return out


def _dist_worker(rank, world, init_file, out_dir):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        xs, qs, w0 = _dist_problem()
        # uneven shards; rank 2 holds none of task 1 (7 tokens: 0-6 on ranks 0 and 1)
        cuts = {0: [(0, 20), (0, 4), (0, 30)], 1: [(20, 50), (4, 7), (30, 31)], 2: [(50, 90), (7, 7), (31, 60)]}[rank]
        res = _dist_run([x[a:b] for x, (a, b) in zip(xs, cuts)], qs, w0, dist.group.WORLD)
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_three_processes_fit_like_one(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(3, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=3, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(3)]
    want = _dist_run(*_dist_problem())
    for name in _DIST_CASES:
        w, kb, ka = ranks[0][name]
        for other in ranks[1:]:
            assert torch.equal(other[name][0], w), f"{name}: ranks disagree"
        centred = lambda m: m - m.mean(dim=0, keepdim=True)  # noqa: E731 (the shift changes no softmax)
        torch.testing.assert_close(centred(w), centred(want[name][0]), atol=1e-8, rtol=1e-8)
        assert kb == pytest.approx(want[name][1], rel=1e-10)
        assert ka == pytest.approx(want[name][2], rel=1e-7)
