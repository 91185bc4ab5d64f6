"""RegMean as a merge method of the pipeline: the method against a dense closed form, the
merge-statistics stage's Grams against per-token loops over the source's own routing, the stage's
per-layer resume, the end-to-end pipeline, and what its digests rerun."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import TOY_STAGES_DIR, write_toy_config
from harc_hpc.config import ConfigError, load_config
from harc_hpc.io import merge_statistics as ms
from harc_hpc.merge import GramStatistic, MergeContext, MergeUnit, Piece, get_method, resolve_settings
from harc_hpc.merge.base import MergeConfigError
from harc_hpc.pipeline import build_plan
from harc_hpc.pipeline.api import submit_run
from harc_hpc.stages import merge_statistics
from pipeline_fixtures import build_tiny_sources, run_pipeline, write_config

REGMEAN = get_method("regmean")


# -- the method on one unit ----------------------------------------------------------------------

def _unit(shape, role="linear", name="model.layers.0.self_attn.q_proj.weight", transposed=False):
    n = shape[0] * shape[1]
    return MergeUnit(name, tuple(shape), (Piece(name, 0, n, tuple(shape)),), role, 0, transposed)


def _ctx(grams, tokens=None):
    tokens = tokens or [10] * len(grams)
    return MergeContext(gram=lambda unit, i: None if grams[i] is None else GramStatistic(grams[i], tokens[i]))


def _closed_form(xs, ws, alpha):
    """argmin_W sum_i ||X_i W^T - X_i W_i^T||^2 with G~_i, from per-token outer products, each output
    row's normal equations solved densely on their own."""
    d_out, d_in = ws[0].shape
    lhs = torch.zeros(d_in, d_in, dtype=torch.float64)
    rhs = torch.zeros(d_in, d_out, dtype=torch.float64)
    for x, w in zip(xs, ws):
        g = torch.zeros(d_in, d_in, dtype=torch.float64)
        for row in x:
            g += torch.outer(row, row)
        g = alpha * g + (1 - alpha) * torch.diag(torch.diag(g))
        lhs += g
        rhs += g @ w.T
    return torch.stack([torch.linalg.solve(lhs, rhs[:, o]) for o in range(d_out)])


def _merge(sources, unit, grams, params=None, names=None, tokens=None, ctx=None):
    names = names or [f"s{i}" for i in range(len(sources))]
    params = REGMEAN.parse_params(params or {}, names)
    ctx = ctx or _ctx(grams, tokens)
    return REGMEAN.merge(None, list(sources), unit, params, names, ctx), ctx


@pytest.mark.parametrize("alpha", [0.9, 0.5, 1.0])
@pytest.mark.parametrize("transposed", [False, True])
def test_a_linear_unit_equals_the_dense_closed_form(alpha, transposed):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 7, generator=g, dtype=torch.float64) for n in (30, 12, 50)]
    ws = [torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in xs]
    grams = [x.T @ x for x in xs]
    sources = [w.T.contiguous() for w in ws] if transposed else ws
    unit = _unit(tuple(sources[0].shape), "expert", transposed=transposed)
    out, ctx = _merge(sources, unit, grams, {"alpha": alpha})
    expected = _closed_form(xs, ws, alpha)
    torch.testing.assert_close(out.T if transposed else out, expected, rtol=0, atol=1e-6)
    assert ctx.notes == {}


def test_equal_grams_give_the_average_and_float32_stays_float32():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    ws = [torch.randn(3, 6, generator=g) for _ in range(3)]
    out, _ = _merge(ws, _unit((3, 6)), [x.T @ x] * 3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sum(ws) / 3, rtol=0, atol=1e-6)


def test_non_linear_units_and_units_without_a_gram_take_the_fallback():
    ws = [torch.full((4,), float(i)) for i in range(1, 4)]
    norm = MergeUnit("model.norm.weight", (4,), (Piece("model.norm.weight", 0, 4, (4,)),), "norm")
    params = REGMEAN.parse_params({}, ["a", "b", "c"])
    assert REGMEAN.passthrough(norm, params) == "fallback linear (no Gram: norm)"
    out = REGMEAN.merge(None, list(ws), norm, params, ["a", "b", "c"], MergeContext())
    torch.testing.assert_close(out, torch.full((4,), 2.0))
    # a linear unit the statistics pass never saw: the fallback, and a note in the record
    mats = [torch.randn(3, 4) for _ in range(3)]
    out, ctx = _merge(mats, _unit((3, 4)), [None] * 3)
    torch.testing.assert_close(out, sum(mats) / 3)
    assert ctx.notes == {"fallback linear: no Gram recorded": ["model.layers.0.self_attn.q_proj.weight"]}
    with pytest.raises(MergeConfigError, match="not in \\['s1'\\]"):
        _merge(mats, _unit((3, 4)), [torch.eye(4, dtype=torch.float64), None, torch.eye(4, dtype=torch.float64)])


def test_never_routed_experts():
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    zero = torch.zeros(5, 5, dtype=torch.float64)
    unit = _unit((3, 5), "expert", "model.layers.0.mlp.experts.2.up_proj.weight")
    # routed to in no source: the fallback (linear: the average), recorded
    out, ctx = _merge(ws, unit, [zero, zero], tokens=[0, 0])
    torch.testing.assert_close(out, (ws[0] + ws[1]) / 2, rtol=0, atol=1e-12)
    assert list(ctx.notes) == ["fallback linear: expert never routed to in any source"]
    # routed to in one source only: that source's data decide, i.e. its own weight
    x = torch.randn(20, 5, generator=g, dtype=torch.float64)
    out, ctx = _merge(ws, unit, [zero, x.T @ x], tokens=[0, 20])
    torch.testing.assert_close(out, ws[1], rtol=0, atol=1e-9)
    assert ctx.notes == {}


def test_a_singular_gram_sum_takes_the_stated_ridge_toward_the_fallback():
    g = torch.Generator().manual_seed(4)
    basis = torch.randn(2, 6, generator=g, dtype=torch.float64)  # every input lies in a 2-D subspace
    zs = [torch.randn(30, 2, generator=g, dtype=torch.float64) for _ in range(2)]
    xs = [z @ basis for z in zs]
    ws = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    out, ctx = _merge(ws, _unit((4, 6)), [x.T @ x for x in xs], {"alpha": 1.0})
    (kind, units), = ctx.notes.items()
    assert kind.startswith("singular Gram sum: cholesky+ridge") and kind.endswith("toward the linear merge")
    # on the observed subspace it is RegMean's fit (in the subspace's coordinates z, x = z B: the map
    # W B^T); off it, the fallback (the average)
    fit = _closed_form(zs, [w @ basis.T for w in ws], 1.0)
    torch.testing.assert_close(out @ basis.T, fit, rtol=0, atol=1e-5)
    null = torch.linalg.svd(basis, full_matrices=True).Vh[2:].T
    torch.testing.assert_close(out @ null, (ws[0] + ws[1]) / 2 @ null, rtol=0, atol=1e-5)


def test_options_are_validated_with_their_key():
    with pytest.raises(MergeConfigError, match="alpha"):
        resolve_settings("regmean", None, {"alpha": 1.5}, ["a", "b"])
    with pytest.raises(MergeConfigError, match="unknown merge method 'nope'"):
        resolve_settings("regmean", None, {"fallback": "nope"}, ["a", "b"])
    with pytest.raises(MergeConfigError, match="fallback_parameters.*weights"):
        resolve_settings("regmean", None, {"fallback_parameters": {"weights": [1, 2, 3]}}, ["a", "b"])
    m, p = resolve_settings("regmean", None, {"fallback": "task_arithmetic"}, ["a", "b"])
    assert m.base_needed(p) and not m.base_needed(resolve_settings("regmean", None, {}, ["a", "b"])[1])


# -- the statistics stage ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    made = {}

    def get(family, layers=2):
        if (family, layers) not in made:
            made[family, layers] = build_tiny_sources(tmp_path_factory.mktemp(family), family=family, layers=layers)
        return made[family, layers]

    return get


def _regmean_cfg(root, sources, num_samples=3, **extra):
    Path(root).mkdir(parents=True, exist_ok=True)
    path = write_config(root, sources, method="regmean", extra=extra)
    data = yaml.safe_load(path.read_text())
    for s in data["models"]["sources"]:
        s["calibration"]["num_samples"] = num_samples
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(path)


def _reference_grams(cfg, source):
    """Every Gram of ``source`` from the whole model (transformers' own forward, one sequence at a
    time, no padding): inputs by forward hooks, the routing by the family's selection rule on the
    router logits, each expert's intermediate activation and every outer product token by token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harc_hpc.io.calibration_data import tokenize_task
    from harc_hpc.models.families import family_for_config

    path = Path(next(s.path for s in cfg.models.sources if s.name == source))
    conf = json.loads((path / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seqs = tokenize_task(cfg.calibration_for(source), cfg.calibration, AutoTokenizer.from_pretrained(path))
    return _model_grams(model, conf, family_for_config(conf), seqs), len(sum(seqs, []))


def _model_grams(model, conf, fam, seqs):
    inputs: dict[str, list] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) or (name.endswith("mlp.gate") and hasattr(mod, "weight")):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, name=name: inputs.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        for s in seqs:
            model(torch.tensor([s]))
    for h in hooks:
        h.remove()
    state = model.state_dict()
    out = {}
    for name, xs in inputs.items():
        x = torch.cat(xs).double()
        g = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        for row in x:
            g += torch.outer(row, row)
        out[name] = g
    for layer in fam.moe_layers(conf):
        prefix = f"model.layers.{layer}.mlp"
        x = torch.cat(inputs[f"{prefix}.gate"])  # the router input: every token entering the experts
        bias = state.get(f"{prefix}.gate.e_score_correction_bias")
        mask = fam.selection_mask(conf, torch.nn.functional.linear(x, state[f"{prefix}.gate.weight"]), bias)
        gate_up, down = state[f"{prefix}.experts.gate_up_proj"], state[f"{prefix}.experts.down_proj"]
        act = model.model.layers[layer].mlp.experts.act_fn
        inter = down.shape[2]
        for e in range(gate_up.shape[0]):
            g_in = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
            g_mid = torch.zeros(inter, inter, dtype=torch.float64)
            count = 0
            for t in range(x.shape[0]):
                if not mask[t, e]:
                    continue
                count += 1
                g_in += torch.outer(x[t].double(), x[t].double())
                mid = act(gate_up[e, :inter] @ x[t]) * (gate_up[e, inter:] @ x[t])
                g_mid += torch.outer(mid.double(), mid.double())
            out[f"{prefix}.experts.{e}.in"], out[f"{prefix}.experts.{e}.mid"] = g_in, g_mid
            out[f"{prefix}.experts.{e}.count"] = count
    return out


def _stored(folder: Path) -> dict[int, tuple[dict, dict]]:
    """layer -> (its json, {Gram name: Gram})."""
    out = {}
    for info_path in sorted(folder.glob("layer-*.json")):
        info = json.loads(info_path.read_text())
        with safe_open(str(info_path.with_suffix(".safetensors")), framework="pt") as f:
            out[info["layer"]] = (info, {n: f.get_tensor(n).double() for n in f.keys()})
    return out


@pytest.mark.parametrize("family,layers", [("olmoe", 2), ("qwen3_moe", 3), ("qwen2_moe", 2), ("deepseek_v3", 3)])
def test_grams_equal_per_token_loops_over_the_sources_own_routing(tmp_path, tiny, family, layers):
    sources = tiny(family, layers)
    cfg = _regmean_cfg(tmp_path, sources, num_samples=3, **{"calibration.batch_size": 2})
    merge_statistics.run(cfg, cfg.run_dir)
    for source in ("math", "code"):
        ref, n_tokens = _reference_grams(cfg, source)
        folder = ms.source_dir(cfg.run_dir, source)
        stored = _stored(folder)
        meta = ms.read_meta(folder)
        assert meta["kind"] == "gram" and meta["tokens"] == n_tokens and meta["stored_dtype"] == "float32"
        assert sorted(stored) == list(range(layers))
        checked = 0
        for layer, (info, grams) in stored.items():
            assert info["tokens"] == n_tokens
            for unit, gname in info["weights"].items():
                module = unit.removesuffix(".weight")
                # each map against the Gram of its own input (so a shared Gram is shared rightly)
                expected = ref[module] if module in ref else ref[f"model.layers.{layer}.mlp.{gname}"]
                scale = float(expected.abs().max()) or 1.0
                torch.testing.assert_close(grams[gname], expected, rtol=1e-5, atol=1e-6 * scale,
                                           msg=f"{source} {unit}")
                assert info["grams"][gname] == (n_tokens if module in ref else
                                                ref[f"model.layers.{layer}.mlp.experts.{gname.split('.')[1]}.count"])
                checked += 1
            if info["expert_tokens"] is not None:
                counts = [ref[f"model.layers.{layer}.mlp.experts.{e}.count"] for e in range(len(info["expert_tokens"]))]
                assert info["expert_tokens"] == counts and sum(counts) == n_tokens * cfg_top_k(sources)
        infos = {l: info for l, (info, _) in stored.items()}
        assert checked > 0
        # q, k and v read one input: one Gram; o_proj its own (MLA: q and the compressed kv read one input)
        first = {k.removeprefix("model.layers.0.self_attn.").removesuffix("_proj.weight"): v
                 for k, v in infos[0]["weights"].items()}
        qkv = ("q", "kv_a_proj_with_mqa.weight") if family == "deepseek_v3" else ("q", "k", "v")
        assert all(p in first for p in qkv), sorted(first)
        assert len({first[p] for p in qkv}) == 1 and first["q"] != first["o"]
    if family == "deepseek_v3":  # layer 0 is dense; the MoE layers' routing is the grouped, biased top-k
        assert infos[0]["expert_tokens"] is None and infos[1]["expert_tokens"] is not None
    if family == "qwen3_moe":  # layer 1 is a dense MLP: its projections have Grams, there are no experts
        assert infos[1]["expert_tokens"] is None and "model.layers.1.mlp.down_proj.weight" in infos[1]["weights"]
    if family == "qwen2_moe":  # the shared expert and its gate read the router's input
        w = infos[0]["weights"]
        assert w["model.layers.0.mlp.shared_expert.up_proj.weight"] == w["model.layers.0.mlp.shared_expert_gate.weight"]


def cfg_top_k(sources):
    return json.loads((Path(sources["math"]) / "config.json").read_text())["num_experts_per_tok"]


def test_the_stage_resumes_after_its_last_finished_layer(tmp_path, tiny, monkeypatch):
    from harc_hpc.models.onload import OnloadedModel

    sources = tiny("olmoe", 2)
    cfg = _regmean_cfg(tmp_path, sources)
    clean = _regmean_cfg(tmp_path / "clean", sources)
    merge_statistics.run(clean, clean.run_dir)
    onloaded = []
    real = OnloadedModel.onload

    def dying(self, index, overrides=None):
        onloaded.append(index)
        if index == 1 and len(onloaded) == 2:
            raise RuntimeError("killed at its time limit")
        return real(self, index, overrides)

    monkeypatch.setattr(OnloadedModel, "onload", dying)
    with pytest.raises(RuntimeError, match="time limit"):
        merge_statistics.run(cfg, cfg.run_dir, task_digest="d1")
    assert onloaded == [0, 1]
    onloaded.clear()
    merge_statistics.run(cfg, cfg.run_dir, task_digest="d1")
    assert onloaded == [1, 0, 1]  # math resumed at layer 1, then code from the start
    onloaded.clear()
    merge_statistics.run(cfg, cfg.run_dir, task_digest="d1")
    assert onloaded == []  # both sources complete under this digest
    for source in ("math", "code"):
        for f in sorted(ms.source_dir(clean.run_dir, source).glob("layer-*")):
            assert (ms.source_dir(cfg.run_dir, source) / f.name).read_bytes() == f.read_bytes(), f.name
    assert not (cfg.run_dir / "partial" / "merge-statistics" / "math").exists()


def test_end_to_end_regmean_pipeline(tmp_path, tiny):
    from transformers import AutoModelForCausalLM

    sources = tiny("olmoe", 2)
    cfg = _regmean_cfg(tmp_path, sources, **{"merge.parameters": {"alpha": 0.8}})
    run_pipeline(cfg, cfg.run_dir)
    for folder in ("merged", "model"):
        model = AutoModelForCausalLM.from_pretrained(cfg.run_dir / folder).eval()
        with torch.no_grad():
            assert torch.isfinite(model(torch.randint(0, 128, (2, 9))).logits).all()
    rec = json.loads((cfg.run_dir / "merged" / "harc_merge.json").read_text())
    assert rec["method"] == "regmean" and rec["parameters"]["alpha"] == 0.8
    assert rec["statistics"]["kind"] == "gram" and set(rec["statistics"]["sources"]) == {"math", "code"}
    assert rec["merged_by_role"] == {"expert": 24, "linear": 8, "router": 2}
    # the merged o_proj of layer 1 is the closed form from the stored Grams and the source weights
    from harc_hpc.io.checkpoint import Checkpoint

    key = "model.layers.1.self_attn.o_proj.weight"
    lhs = rhs = 0
    for s in ("math", "code"):
        with safe_open(str(ms.source_dir(cfg.run_dir, s) / "layer-001.safetensors"), framework="pt") as f:
            g = f.get_tensor("self_attn.o_proj").double()
        g = 0.8 * g + 0.2 * torch.diag(torch.diag(g))
        w = Checkpoint(sources[s]).get_tensor(key).double()
        lhs, rhs = lhs + g, rhs + g @ w.T
    expected = torch.linalg.solve(lhs, rhs).T
    got = Checkpoint(cfg.run_dir / "merged").get_tensor(key).double()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# -- planning: digests, what reruns, bad input ---------------------------------------------------

LAYERS = [0, 1]


def _toy(tmp_path, overrides=None):
    return load_config(write_toy_config(tmp_path), overrides=overrides)


def _old_specs(tmp_path) -> Path:
    """The stage specs as they were before merge-statistics existed."""
    from harc_hpc.pipeline.planner import default_specs_dir

    old = tmp_path / "old-stages"
    shutil.copytree(default_specs_dir(), old)
    (old / "merge-statistics.yaml").unlink()
    spec = yaml.safe_load((old / "merge-experts.yaml").read_text())
    spec["needs"], spec["reads"] = [], []
    (old / "merge-experts.yaml").write_text(yaml.safe_dump(spec))
    return old


@pytest.mark.parametrize("method", ["linear", "ties", "wudi"])
def test_data_free_merges_keep_every_digest(tmp_path, method):
    cfg = _toy(tmp_path, {"merge.method": method})
    new = build_plan(cfg, layers=LAYERS)
    old = build_plan(cfg, layers=LAYERS, specs_dir=_old_specs(tmp_path))
    assert "merge-statistics/all" not in new.tasks
    assert {t: x.digest for t, x in new.tasks.items()} == {t: x.digest for t, x in old.tasks.items()}


def test_regmean_digests(tmp_path):
    base = {"merge.method": "regmean"}
    plan = build_plan(_toy(tmp_path, base), layers=LAYERS)
    assert plan.tasks["merge-experts/all"].needs == ["merge-statistics/all"]

    def changed(overrides):
        other = build_plan(_toy(tmp_path, {**base, **overrides}), layers=LAYERS)
        return {t for t in plan.tasks if plan.tasks[t].digest != other.tasks[t].digest}

    harc = changed({"harc.alpha": 0.5, "harc.hessian": "diag"})
    assert "merge-statistics/all" not in harc and "merge-experts/all" not in harc and harc
    merge_alpha = changed({"merge.parameters": {"alpha": 0.5}})
    assert "merge-statistics/all" not in merge_alpha and "merge-experts/all" in merge_alpha
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "other calibration text"}\n')
    assert {"merge-statistics/all", "merge-experts/all"} <= changed({})


def test_harc_changes_rerun_neither_statistics_nor_merge(tmp_path):
    cfg = _toy(tmp_path, {"merge.method": "regmean"})
    plan, first = submit_run(cfg, executor="debug", specs_dir=TOY_STAGES_DIR, layers=LAYERS, echo=lambda m: None)
    assert first.ok and {"merge-statistics/all", "merge-experts/all"} <= set(first.completed)
    _, again = submit_run(_toy(tmp_path, {"merge.method": "regmean", "harc.alpha": 0.5}), executor="debug",
                          specs_dir=TOY_STAGES_DIR, layers=LAYERS, echo=lambda m: None)
    assert again.ok and again.completed
    assert not {"merge-statistics/all", "merge-experts/all", "capture-activations/block-000"} & set(again.completed)
    _, merge_only = submit_run(_toy(tmp_path, {"merge.method": "regmean", "harc.alpha": 0.5,
                                               "merge.parameters": {"alpha": 0.7}}),
                               executor="debug", specs_dir=TOY_STAGES_DIR, layers=LAYERS, echo=lambda m: None)
    assert "merge-experts/all" in merge_only.completed and "merge-statistics/all" not in merge_only.completed


def test_regmean_without_calibration_data_is_a_config_error_before_any_job(tmp_path):
    path = write_toy_config(tmp_path)
    data = yaml.safe_load(path.read_text())
    del data["models"]["sources"][1]["calibration"]
    data["merge"] = {"method": "regmean"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"models\.sources\[b\]\.calibration: merge method 'regmean'"):
        submit_run(load_config(path), executor="debug", specs_dir=TOY_STAGES_DIR, layers=LAYERS,
                   echo=lambda m: None)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.json"))
    data["merge"] = {"method": "linear"}  # a data-free merge needs none
    path.write_text(yaml.safe_dump(data))
    assert "merge-statistics/all" not in build_plan(load_config(path), layers=LAYERS).tasks


def test_a_callable_enabled_if_that_cannot_be_loaded_is_a_plan_error(tmp_path):
    from harc_hpc.pipeline.planner import PlanError, StageSpec, is_enabled

    spec = StageSpec(name="x", function="a.b:c", enabled_if="harc_hpc.stages.merge_statistics:nope")
    with pytest.raises(PlanError, match="enabled_if"):
        is_enabled(spec, _toy(tmp_path))


# -- the Fisher reader of CONTRACT.md ------------------------------------------------------------

def test_fisher_reader_returns_a_units_pieces(tmp_path):
    folder = tmp_path / "merge-statistics" / "a"
    (folder / "fisher").mkdir(parents=True)
    fused = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    save_file({"model.layers.0.mlp.experts.gate_up_proj": fused, "w": torch.ones(2, 2)},
              str(folder / "fisher" / "model.safetensors"))
    (folder / "fisher" / "meta.json").write_text('{"tokens": 5, "samples": 1}')
    (folder / "fisher" / "config.json").write_text("{}")  # compute_source_fisher copies the source's
    key = "model.layers.0.mlp.experts.gate_up_proj"
    unit = MergeUnit(f"{key}[1].up", (3, 3), (Piece(key, 18 + 9, 9, (3, 3), False),), "expert", 0)
    reader = ms.FisherReader(folder, "a")
    torch.testing.assert_close(reader.fisher(unit), fused[1, 3:])
    with pytest.raises(Exception, match="no Fisher for tensor nope"):
        reader.fisher(MergeUnit("nope", (1,), (Piece("nope", 0, 1, (1,)),), "vector"))
    with pytest.raises(Exception, match="run the merge-statistics stage first"):
        ms.FisherReader(tmp_path / "missing", "b")


def test_plan_estimates_the_gram_accumulators(tmp_path):
    """harc-hpc plan: merge-statistics holds 12 bytes per Gram entry of the largest layer (OLMoE-1B-7B:
    64 experts, d 2048, I 1024: 64 (d^2 + I^2) + 4 d^2 entries)."""
    from transformers import OlmoeConfig

    from harc_hpc.pipeline.api import plan_estimates

    conf = {**OlmoeConfig(intermediate_size=1024, num_hidden_layers=2).to_dict(), "architectures": ["OlmoeForCausalLM"]}
    cfg = _toy(tmp_path, {"merge.method": "regmean"})
    est = plan_estimates(cfg, model_config=conf)[2]
    (stats,) = [s for s in est["stages"] if s["stage"] == "merge-statistics"]
    entries = 64 * (2048 ** 2 + 1024 ** 2) + 4 * 2048 ** 2
    assert stats["host_bytes"] > 12 * entries  # on CPU (the spec's default: no GPU)
    assert stats["scratch_bytes"] == 4 * entries * 2 * 2  # float32 files, 2 layers, 2 sources
    assert "Gram accumulators 3.9 GiB" in stats["notes"][0]


def test_the_engine_hands_each_unit_its_grams_and_records_what_was_done(tmp_path, tiny):
    """merge_checkpoints with a gram reader: a singular Gram sum and a unit without a Gram are merged
    by the stated rules and listed in the stats that go into harc_merge.json."""
    from harc_hpc.io.checkpoint import Checkpoint
    from harc_hpc.merge.engine import MergeInput, merge_checkpoints

    sources = tiny("olmoe", 2)
    inputs = [MergeInput(n, Checkpoint(sources[n], name=n)) for n in ("math", "code")]
    singular = "model.layers.0.self_attn.o_proj.weight"
    skipped = "model.layers.1.self_attn.q_proj.weight"
    asked = []

    def gram(unit, i):
        asked.append((unit.name, i))
        d = unit.shape[0 if unit.transposed else 1]
        if unit.name == skipped:
            return None
        if unit.name == singular:
            v = torch.ones(d, 1, dtype=torch.float64)
            return GramStatistic(v @ v.T, 5)
        return GramStatistic(torch.eye(d, dtype=torch.float64) * (i + 1), 5)

    method, params = resolve_settings("regmean", None, {"alpha": 1.0}, ["math", "code"])
    with pytest.raises(MergeConfigError, match="statistics, and none were given"):
        merge_checkpoints(tmp_path / "none", inputs, None, method, params)
    stats = merge_checkpoints(tmp_path / "out", inputs, None, method, params, gram=gram)
    again = merge_checkpoints(tmp_path / "again", inputs, None, method, params, gram=gram)
    assert again["method_notes"] == stats["method_notes"]
    for f in sorted((tmp_path / "out").glob("*.safetensors")):  # same inputs, same bytes
        assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes()
    notes = stats["method_notes"]
    assert notes["fallback linear: no Gram recorded"] == [skipped]
    (kind,) = [k for k in notes if k.startswith("singular")]
    assert notes[kind] == [singular]
    assert {u for u, _ in asked} >= {singular, skipped, "model.layers.0.mlp.gate.weight"}
    assert not any("norm" in u or "embed" in u for u, _ in asked)  # non-linear units: no Gram asked
    # identity Grams scaled 1 and 2: the weighted average 1/3, 2/3
    shutil.copy(Path(sources["math"]) / "config.json", tmp_path / "out" / "config.json")
    out = Checkpoint(tmp_path / "out")
    key = "model.layers.0.mlp.experts.1.down_proj.weight"
    expected = (inputs[0].ckpt.get_tensor(key).double() + 2 * inputs[1].ckpt.get_tensor(key).double()) / 3
    torch.testing.assert_close(out.get_tensor(key).double(), expected, rtol=0, atol=1e-6)


def test_merge_experts_without_statistics_says_to_run_merge_statistics(tmp_path, tiny):
    from harc_hpc.errors import RunStateError
    from harc_hpc.stages import merge_experts

    cfg = _regmean_cfg(tmp_path, tiny("olmoe", 2))
    with pytest.raises(RunStateError, match="no merge statistics for source 'math'.*run the merge-statistics stage"):
        merge_experts.run(cfg, cfg.run_dir)
    assert not (cfg.run_dir / "merged").exists()


def _plusplus_reference(cfg, alpha):
    """RegMean++ the slow, obvious way, with whole transformers models: everything starts as the
    average (what has no Gram keeps it); for each layer l and source n, a copy of the merged model
    with source n's layer l put in runs n's data (so layer l sees the merged layers < l), the Grams
    of its layer l come from per-token loops, and layer l's linear weights are set to the dense
    closed form over the sources."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harc_hpc.io.calibration_data import tokenize_task
    from harc_hpc.models.families import family_for_config

    names = [s.name for s in cfg.models.sources]
    paths = {s.name: Path(s.path) for s in cfg.models.sources}
    conf = json.loads((paths[names[0]] / "config.json").read_text())
    fam = family_for_config(conf)
    models = {n: AutoModelForCausalLM.from_pretrained(paths[n], dtype=torch.float32).eval() for n in names}
    seqs = {n: tokenize_task(cfg.calibration_for(n), cfg.calibration, AutoTokenizer.from_pretrained(paths[n]))
            for n in names}
    merged = copy.deepcopy(models[names[0]])
    states = {n: m.state_dict() for n, m in models.items()}
    with torch.no_grad():
        for k, v in merged.state_dict().items():
            v.copy_(sum(states[n][k] for n in names) / len(names))

    def solve(grams, weights):
        lhs = sum(alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams)
        rhs = sum((alpha * g + (1 - alpha) * torch.diag(torch.diag(g))) @ w.double().T for g, w in zip(grams, weights))
        return torch.linalg.solve(lhs, rhs).T

    for layer in range(conf["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        grams = []
        for n in names:
            hybrid = copy.deepcopy(merged)
            hybrid.model.layers[layer].load_state_dict(models[n].model.layers[layer].state_dict())
            grams.append(_model_grams(hybrid, conf, fam, seqs[n]))
        new = {}
        for key in states[names[0]]:
            if not key.startswith(prefix + ".") or not key.endswith(".weight"):
                continue
            module = key.removesuffix(".weight")
            if module in grams[0]:
                new[key] = solve([g[module] for g in grams], [states[n][key] for n in names])
        gu, dn = f"{prefix}.mlp.experts.gate_up_proj", f"{prefix}.mlp.experts.down_proj"
        if gu in states[names[0]]:
            gate_up, down = states[names[0]][gu].clone(), states[names[0]][dn].clone()
            for e in range(gate_up.shape[0]):
                if sum(g[f"{prefix}.mlp.experts.{e}.count"] for g in grams) == 0:
                    gate_up[e] = sum(states[n][gu][e] for n in names) / len(names)
                    down[e] = sum(states[n][dn][e] for n in names) / len(names)
                    continue
                gate_up[e] = solve([g[f"{prefix}.mlp.experts.{e}.in"] for g in grams], [states[n][gu][e] for n in names])
                down[e] = solve([g[f"{prefix}.mlp.experts.{e}.mid"] for g in grams], [states[n][dn][e] for n in names])
            new[gu], new[dn] = gate_up, down
        with torch.no_grad():
            sd = merged.state_dict()
            for k, v in new.items():
                sd[k].copy_(v.to(sd[k].dtype))
    return merged


def test_regmean_plusplus_equals_the_layer_by_layer_reference(tmp_path, tiny):
    from transformers import AutoModelForCausalLM

    sources = tiny("olmoe", 2)
    cfg = _regmean_cfg(tmp_path, sources, num_samples=2,
                       **{"merge.method": "regmean_plusplus", "merge.parameters": {"alpha": 0.8}})
    assert merge_statistics.needed(cfg)
    merge_statistics.run(cfg, cfg.run_dir)
    assert ms.read_meta(ms.source_dir(cfg.run_dir, "math"))["kind"] == "gram_sequential"
    from harc_hpc.stages import merge_experts

    merge_experts.run(cfg, cfg.run_dir)
    assert not (cfg.run_dir / "partial" / "regmean-sequential").exists()  # its scratch Grams are gone
    rec = json.loads((cfg.run_dir / "merged" / "harc_merge.json").read_text())
    assert rec["method"] == "regmean_plusplus" and rec["statistics"]["sources"]["code"]["sequential"] is True
    got = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "merged", dtype=torch.float32).state_dict()
    expected = _plusplus_reference(cfg, 0.8).state_dict()
    assert set(got) == set(expected)
    for k in sorted(expected):
        scale = float(expected[k].abs().max()) or 1.0
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=2e-5 * scale, msg=k)
    # and it is not plain RegMean: layer 1's Grams were taken through the merged layer 0
    plain = _regmean_cfg(tmp_path / "plain", sources, num_samples=2, **{"merge.parameters": {"alpha": 0.8}})
    merge_statistics.run(plain, plain.run_dir)
    merge_experts.run(plain, plain.run_dir)
    other = AutoModelForCausalLM.from_pretrained(plain.run_dir / "merged", dtype=torch.float32).state_dict()
    key = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.allclose(other[key], got[key], atol=1e-6)


@pytest.mark.slow
def test_real_stages_regmean_run_and_a_harc_change_rerun(tmp_path, tiny):
    """The launcher with the real stages (debug executor, in-process): a RegMean run completes with its
    merge-statistics task; after a change of harc.alpha neither it nor merge-experts runs again."""
    sources = tiny("olmoe", 2)
    cfg = _regmean_cfg(tmp_path, sources, **{"harc.block_size": 2})
    plan, first = submit_run(cfg, executor="debug", echo=lambda m: None)
    assert first.ok and "merge-statistics/all" in first.completed and "merge-experts/all" in first.completed
    assert (cfg.run_dir / "merge-statistics" / "math" / "layer-001.safetensors").is_file()
    assert ms.read_meta(ms.source_dir(cfg.run_dir, "code"))["digest"] == plan.tasks["merge-statistics/all"].digest
    again = _regmean_cfg(tmp_path, sources, **{"harc.block_size": 2, "harc.alpha": 0.5})
    _, second = submit_run(again, executor="debug", echo=lambda m: None)
    assert second.ok and second.completed
    assert not {"merge-statistics/all", "merge-experts/all"} & set(second.completed)
    assert {"merge-statistics/all", "merge-experts/all"} <= set(second.already_complete)
