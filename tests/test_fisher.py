"""Fisher merging: the diagonal empirical Fisher against a per-example autograd reference, its
distributed accumulation, the checkpoint that compute_source_fisher writes, and the merge rule."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harc_hpc.config import ConfigError, load_config
from harc_hpc.errors import InputDataError
from harc_hpc.io.checkpoint import Checkpoint
from harc_hpc.math.fisher import diagonal_fisher
from harc_hpc.merge import MergeConfigError, MergeContext, MergeInputError, MergeUnit, Piece, resolve_settings
from harc_hpc.merge.base import MergeMethod
from harc_hpc.merge.engine import plan_units, split_unit
from harc_hpc.models.families import family_for_config
from harc_hpc.stages.fisher_statistics import compute_source_fisher, to_checkpoint_layout

from pipeline_fixtures import build_tiny_sources, tiny_config, write_config


def tiny_model(family="qwen3_moe", tied=False, seed=0, layers=2):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, layers=layers)
    cfg.tie_word_embeddings = tied
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def calibration(seed=1):
    """Sequences with a mask, a one-token sequence (no label) and an all-masked-out one."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 128, (n,), generator=g) for n in (6, 11, 1, 7, 9)]
    masks = [None, torch.tensor([0, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1], dtype=torch.bool), None,
             torch.zeros(7, dtype=torch.bool), None]
    return seqs, masks


def brute_force_fisher(model, seqs, masks):
    """Per example: the gradient of its masked token log-likelihood by torch.autograd.grad, squared,
    summed over examples, divided by their number."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    count = tokens = 0
    for ids, mask in zip(seqs, masks):
        keep = torch.ones(len(ids) - 1, dtype=torch.bool) if mask is None else mask[1:]
        if len(ids) < 2 or not keep.any():
            continue
        logits = model(input_ids=ids[None]).logits[0, :-1]
        logp = torch.log_softmax(logits, dim=-1).gather(1, ids[1:, None])[:, 0]
        grads = torch.autograd.grad(logp[keep].sum(), params, allow_unused=True)
        for acc, g in zip(total, grads):
            if g is not None:
                acc += g.double() ** 2
        count += 1
        tokens += int(keep.sum())
    return {n: t / count for n, t in zip(names, total)}, count, tokens


@pytest.mark.parametrize("family,tied", [("qwen3_moe", True), ("olmoe", False)])
def test_fisher_equals_brute_force_per_example_reference(family, tied):
    model = tiny_model(family, tied=tied)
    seqs, masks = calibration()
    want, count, tokens = brute_force_fisher(model, seqs, masks)
    got = diagonal_fisher(model, seqs, masks)
    assert (got.samples, got.tokens) == (count, tokens) == (3, 5 + 6 + 8)
    assert got.accumulator_bytes == 4 * sum(p.numel() for p in model.parameters())
    for name, w in want.items():
        g = got.fisher[name]
        assert g.dtype == torch.float32 and g.shape == w.shape
        assert torch.allclose(g.double(), w, rtol=1e-5, atol=1e-12 * float(w.max())), name
        assert float(w.max()) > 0, f"{name}: the reference is all zero, the test would be vacuous"
    if tied:  # one parameter: its Fisher (of both uses) is listed under both names
        assert got.fisher["lm_head.weight"] is got.fisher["model.embed_tokens.weight"]


def test_a_bfloat16_model_accumulates_float32_squares():
    model = tiny_model("olmoe", layers=1).to(torch.bfloat16)
    seqs, _ = calibration(3)
    got = diagonal_fisher(model, seqs[:2])
    params = dict(model.named_parameters())
    want = {n: torch.zeros(p.shape) for n, p in params.items()}
    for ids in seqs[:2]:
        logits = model(input_ids=ids[None]).logits[0, :-1].float()
        ll = torch.log_softmax(logits, dim=-1).gather(1, ids[1:, None]).sum()
        for n, g in zip(params, torch.autograd.grad(ll, list(params.values()))):
            want[n] += g.float() ** 2  # squared in float32, not bfloat16
    for n, w in want.items():
        assert got.fisher[n].dtype == torch.float32
        assert torch.allclose(got.fisher[n], w / 2, rtol=1e-6, atol=0), n


def test_checkpointing_and_host_accumulators_change_nothing_and_the_model_is_left_as_it_was():
    model = tiny_model("olmoe")
    seqs, masks = calibration(2)
    plain = diagonal_fisher(model, seqs, masks)
    model.model.layers[0].mlp.gate.weight.requires_grad_(False)
    other = diagonal_fisher(model, seqs, masks, gradient_checkpointing=True, accumulate_on="cpu")
    for name, t in plain.fisher.items():
        assert torch.equal(t, other.fisher[name]), name
    assert not model.model.layers[0].mlp.gate.weight.requires_grad  # flags restored
    assert all(p.grad is None for p in model.parameters())
    assert not any(m.training for m in model.modules())
    assert not model.is_activation_checkpointing
    again = diagonal_fisher(model, seqs, masks)  # no hook left behind squares twice
    assert all(torch.equal(t, again.fisher[n]) for n, t in plain.fisher.items())


def test_fisher_bad_input():
    model = tiny_model("olmoe", layers=1)
    with pytest.raises(ValueError, match="no sequence"):
        diagonal_fisher(model, [torch.tensor([3])])
    with pytest.raises(ValueError, match="loss mask shape"):
        diagonal_fisher(model, [torch.tensor([3, 4, 5])], [torch.tensor([1, 1], dtype=torch.bool)])


# -- data-parallel ----------------------------------------------------------------------------------

class TinyLM(torch.nn.Module):
    """A causal LM in plain torch (embedding, a causal mixing of the previous token, tied head): the
    spawned ranks need no transformers import, which keeps this test fast. The accumulation and the
    all-reduce do not depend on the model."""

    def __init__(self, vocab=128, d=16):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, d)
        self.mix = torch.nn.Linear(2 * d, d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        prev = torch.nn.functional.pad(h, (0, 0, 1, 0))[:, :-1]
        return SimpleNamespace(logits=self.head(torch.tanh(self.mix(torch.cat([h, prev], dim=-1)))))


def _fisher_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        seqs, masks = calibration()
        res = diagonal_fisher(TinyLM(), seqs, masks, process_group=dist.group.WORLD, accumulate_on="cpu")
        torch.save({"fisher": res.fisher, "samples": res.samples, "tokens": res.tokens},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_accumulation_equals_one_process(tmp_path):
    """2 gloo ranks over 5 sequences (3 + 2, one without a label on each side of the split)."""
    world = 2
    mp.spawn(_fisher_worker, args=(world, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]  # ours
    seqs, masks = calibration()
    model = TinyLM()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same kernels, so only the summation order differs
    try:
        want = diagonal_fisher(model, seqs, masks)
    finally:
        torch.set_num_threads(threads)
    reference, count, tokens = brute_force_fisher(model, seqs, masks)
    assert (want.samples, want.tokens) == (count, tokens) == (3, 19)
    for r in ranks:
        assert (r["samples"], r["tokens"]) == (want.samples, want.tokens)
        assert set(r["fisher"]) == set(want.fisher) == {"embed.weight", "mix.weight", "mix.bias", "head.weight"}
        for name, t in want.fisher.items():
            assert torch.equal(r["fisher"][name], ranks[0]["fisher"][name]), f"{name}: ranks disagree"
            assert torch.allclose(r["fisher"][name], t, rtol=1e-5, atol=1e-7 * float(t.max())), name
    for name, ref in reference.items():
        t = want.fisher[name]
        assert torch.allclose(t.double(), ref, rtol=1e-5, atol=1e-7 * float(t.max())), name


# -- the merge rule ---------------------------------------------------------------------------------

SRC = ["a", "b", "c"]


def whole(name, shape):
    n = 1
    for s in shape:
        n *= s
    return MergeUnit(name, tuple(shape), (Piece(name, 0, n, tuple(shape)),), "linear")


def fisher_of(full: dict[str, list[torch.Tensor]]):
    """ctx.fisher as the engine gives it: the unit's pieces cut from each source's whole Fisher."""
    def get(unit, i):
        return torch.cat([full[p.key][i].reshape(-1)[p.start:p.start + p.numel] for p in unit.pieces]
                         ).reshape(unit.shape)
    return get


def test_fisher_merge_registered_with_its_statistics():
    m, p = resolve_settings("fisher", None, {}, SRC)
    assert isinstance(m, MergeMethod) and m.statistics == "fisher" and m.elementwise and not m.needs_base
    assert m.check(p, SRC) is None and MergeMethod.statistics is None
    for bad in ({"weights": [1, -1, 1]}, {"weights": 0}, {"epsilon": 0}, {"weights": [1, 2]}, {"floor": 1}):
        with pytest.raises(MergeConfigError, match="merge.parameters"):
            resolve_settings("fisher", None, bad, SRC)


def test_fisher_merge_equals_the_formula_and_reduces_to_weighted_averaging():
    g = torch.Generator().manual_seed(0)
    shape = (5, 7)
    xs = [torch.randn(shape, generator=g) for _ in SRC]
    fs = [torch.rand(shape, generator=g) ** 3 for _ in SRC]
    fs[1][0, :3] = 0.0  # source b's data never moved these
    for f in fs:
        f[4, 4] = 0.0  # nobody's did
    weights, eps = [0.5, 0.2, 0.3], 1e-4
    m, p = resolve_settings("fisher", None, {"weights": weights, "epsilon": eps}, SRC)
    unit = whole("w", shape)
    got = m.merge(None, [x.clone() for x in xs], unit, p, SRC, MergeContext(fisher=fisher_of({"w": fs})))
    want = torch.empty(shape, dtype=torch.float64)
    for r in range(shape[0]):  # element by element, float64, the stated rule
        for c in range(shape[1]):
            lam = [w * max(float(f[r, c]), eps) for w, f in zip(weights, fs)]
            want[r, c] = sum(l * float(x[r, c]) for l, x in zip(lam, xs)) / sum(lam)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-7)
    average = sum(w * x.double() for w, x in zip(weights, xs)) / sum(weights)
    assert torch.allclose(got[4, 4].double(), average[4, 4], rtol=1e-6)  # all below the floor
    # equal Fishers (whatever they are): the weighted average
    same = [fs[0]] * 3
    eq = m.merge(None, list(xs), unit, p, SRC, MergeContext(fisher=fisher_of({"w": same})))
    assert torch.allclose(eq.double(), average, rtol=1e-6, atol=1e-7)
    # default weights are equal (the paper's 0.5 / 0.5 for two models)
    m2, p2 = resolve_settings("fisher", None, {}, SRC[:2])
    two = m2.merge(None, xs[:2], unit, p2, SRC[:2], MergeContext(fisher=fisher_of({"w": [fs[2], fs[2]]})))
    assert torch.allclose(two, (xs[0] + xs[1]) / 2, rtol=1e-6, atol=1e-7)
    # bf16 sources come back bf16
    bf = m.merge(None, [x.bfloat16() for x in xs], unit, p, SRC, MergeContext(fisher=fisher_of({"w": fs})))
    assert bf.dtype == torch.bfloat16


def test_fisher_merge_in_slices_equals_whole_and_checks_its_fishers():
    g = torch.Generator().manual_seed(1)
    shape = (6, 10)
    xs = [torch.randn(shape, generator=g) for _ in SRC]
    fs = {"w": [torch.rand(shape, generator=g) for _ in SRC]}
    m, p = resolve_settings("fisher", None, {"weights": [1, 2, 3]}, SRC)
    ctx = MergeContext(fisher=fisher_of(fs))
    unit = whole("w", shape)
    full = m.merge(None, list(xs), unit, p, SRC, ctx).reshape(-1)
    parts = split_unit(unit, 7)
    assert len(parts) > 1
    for part in parts:
        pc = part.pieces[0]
        got = m.merge(None, [x.reshape(-1)[pc.start:pc.start + pc.numel] for x in xs], part, p, SRC, ctx)
        assert torch.equal(got, full[pc.start:pc.start + pc.numel]), part.name
    with pytest.raises(MergeConfigError, match="needs each source's Fisher"):
        m.merge(None, list(xs), unit, p, SRC, MergeContext())
    with pytest.raises(MergeInputError, match="source 'b'.*shape"):
        m.merge(None, list(xs), unit, p, SRC, MergeContext(fisher=lambda u, i: torch.ones(3) if i == 1 else fs["w"][i]))
    bad = [f.clone() for f in fs["w"]]
    bad[2][0, 0] = float("nan")
    with pytest.raises(MergeInputError, match="source 'c'.*non-finite"):
        m.merge(None, list(xs), unit, p, SRC, MergeContext(fisher=fisher_of({"w": bad})))


# -- the statistics written per source --------------------------------------------------------------

@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_checkpoint_layout_maps_the_model_back_to_its_own_checkpoint(family, tmp_path):
    """The name mapping applied to the model's own parameters and buffers gives back every tensor of
    its saved checkpoint exactly (per-expert, renamed MoE modules, fused on disk, buffers)."""
    model = tiny_model(family, layers=3)
    model.save_pretrained(tmp_path)
    ckpt = Checkpoint(tmp_path)
    fam = family_for_config(ckpt.config)
    tensors = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    mapped, unmapped = to_checkpoint_layout(tensors, ckpt.keys(), fam)
    assert set(mapped) == set(ckpt.keys())
    assert all("rotary_emb" in n for n in unmapped), unmapped  # non-persistent buffers only
    for key in ckpt.keys():
        assert torch.equal(mapped[key].to(ckpt.tensor_dtype(key)), ckpt.get_tensor(key)), key


def test_buffers_in_the_checkpoint_get_a_zero_fisher(tmp_path):
    """DeepSeek-V3's e_score_correction_bias is a buffer (no gradient): zero, and listed."""
    from harc_hpc.stages.fisher_statistics import fisher_checkpoint

    model = tiny_model("deepseek_v3", layers=2)
    model.save_pretrained(tmp_path)
    ckpt = Checkpoint(tmp_path)
    res = diagonal_fisher(model, calibration()[0][:1])
    fam = family_for_config(ckpt.config)
    tensors, zero = fisher_checkpoint(model, res.fisher, ckpt, fam)
    assert set(tensors) == set(ckpt.keys())
    assert zero == [f"model.layers.{l}.mlp.gate.e_score_correction_bias" for l in (0, 1)]
    assert all(not tensors[k].any() for k in zero)
    assert tensors["model.layers.1.mlp.gate.weight"].any()
    with pytest.raises(InputDataError, match=r"parameters \['model.extra.weight'\].*no tensor in the checkpoint"):
        fisher_checkpoint(model, {**res.fisher, "model.extra.weight": torch.zeros(2)}, ckpt, fam)
    fewer = {n: t for n, t in res.fisher.items() if n != "model.norm.weight"}
    with pytest.raises(InputDataError, match=r"tensors \['model.norm.weight'\] are neither parameters"):
        fisher_checkpoint(model, fewer, ckpt, fam)
    wrong = {**res.fisher, "model.norm.weight": torch.zeros(3)}
    with pytest.raises(InputDataError, match="model.norm.weight: the model's parameter has shape"):
        fisher_checkpoint(model, wrong, ckpt, fam)


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("fisher")
    sources = build_tiny_sources(root, family="olmoe", layers=2)
    return root, sources


def test_compute_source_fisher_writes_the_sources_keys(tiny_sources, tmp_path):
    root, sources = tiny_sources
    cfg = load_config(write_config(root, sources, method="fisher", extra={"calibration.num_samples": 3}))
    meta = compute_source_fisher(cfg, "math", tmp_path / "a", device="cpu")
    out = tmp_path / "a" / "fisher"
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["samples"] == meta["sequences"] == 3 and meta["tokens"] > 0
    assert meta["zero_fisher_buffers"] == [] and meta["calibration_digest"]
    src, fisher = Checkpoint(sources["math"]), Checkpoint(out)
    assert sorted(fisher.keys()) == sorted(src.keys())
    for key in src.keys():
        assert fisher.tensor_shape(key) == src.tensor_shape(key) and fisher.tensor_dtype(key) == torch.float32
    # the values are diagonal_fisher's, split back into the per-expert matrices
    from harc_hpc.io.calibration_data import tokenize_task
    from harc_hpc.models.modeling import load_causal_lm
    from transformers import AutoTokenizer

    model = load_causal_lm(sources["math"], torch.device("cpu"))
    seqs = tokenize_task(cfg.calibration_for("math"), cfg.calibration, AutoTokenizer.from_pretrained(str(sources["math"])))
    direct = diagonal_fisher(model, seqs).fisher
    fused = direct["model.layers.1.mlp.experts.gate_up_proj"]
    half = fused.shape[1] // 2
    assert torch.equal(fisher.get_tensor("model.layers.1.mlp.experts.2.gate_proj.weight"), fused[2, :half])
    assert torch.equal(fisher.get_tensor("model.layers.1.mlp.experts.2.up_proj.weight"), fused[2, half:])
    assert torch.equal(fisher.get_tensor("model.layers.1.mlp.experts.3.down_proj.weight"),
                       direct["model.layers.1.mlp.experts.down_proj"][3])
    assert torch.equal(fisher.get_tensor("lm_head.weight"), direct["lm_head.weight"])
    # read by a merge unit's pieces (the contract's ctx.fisher), a fused unit built from the per-expert
    # keys is the model's own fused Fisher
    units = {u.name: u for u in plan_units(src, family_for_config(src.config), "fused")}
    gate_up = units["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(read_unit(fisher, gate_up), fused)
    # deterministic on CPU: the same bytes again
    compute_source_fisher(cfg, "math", tmp_path / "b", device="cpu", gradient_checkpointing=False)
    for f in sorted(p.name for p in out.iterdir()):
        assert (out / f).read_bytes() == (tmp_path / "b" / "fisher" / f).read_bytes() or f == "meta.json", f
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["fisher"]  # no temporaries left


def read_unit(ckpt: Checkpoint, unit: MergeUnit) -> torch.Tensor:
    return torch.cat([ckpt.read_part(p.key, p.start, p.numel) for p in unit.pieces]).reshape(unit.shape)


def test_fisher_merge_of_two_written_fishers_unit_by_unit(tiny_sources, tmp_path):
    """Both sources' Fishers from compute_source_fisher, read per merge unit (in slices, as the engine
    plans them) and merged by the method, equal the formula applied to whole tensors."""
    root, sources = tiny_sources
    cfg = load_config(write_config(root, sources, method="fisher", extra={"calibration.num_samples": 2}))
    names = ["math", "code"]
    for name, shard in zip(names, ("5GB", 50_000)):  # the second sharded, read through its index
        compute_source_fisher(cfg, name, tmp_path / name, device="cpu", max_shard_size=shard)
    assert len(list((tmp_path / "code" / "fisher").glob("model-*-of-*.safetensors"))) > 2
    models = [Checkpoint(sources[n]) for n in names]
    fishers = [Checkpoint(tmp_path / n / "fisher") for n in names]
    method, params = resolve_settings("fisher", None, {"weights": [0.3, 0.7]}, names)
    ctx = MergeContext(fisher=lambda unit, i: read_unit(fishers[i], unit))
    merged = {k: torch.empty(models[0].tensor_shape(k)).reshape(-1) for k in models[0].keys()}
    for whole_unit in plan_units(models[0], family_for_config(models[0].config), "per_expert"):
        for unit in split_unit(whole_unit, 1000):
            out = method.merge(None, [read_unit(m, unit) for m in models], unit, params, names, ctx).reshape(-1)
            pos = 0
            for p in unit.pieces:
                merged[p.key][p.start:p.start + p.numel] = out[pos:pos + p.numel]
                pos += p.numel
    moved = 0
    for key, got in merged.items():
        f = [fi.get_tensor(key).clamp_min(1e-10) * w for fi, w in zip(fishers, (0.3, 0.7))]
        x = [m.get_tensor(key).float() for m in models]
        want = (f[0] * x[0] + f[1] * x[1]) / (f[0] + f[1])
        assert torch.allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-7), key
        average = 0.3 * x[0] + 0.7 * x[1]
        moved += int(not torch.allclose(want, average, rtol=1e-3, atol=1e-5))
    assert moved > len(merged) // 2  # the Fishers differ, so the result is not the plain average


def test_compute_source_fisher_without_calibration_data_names_the_key(tiny_sources, tmp_path):
    root, sources = tiny_sources
    cfg = load_config(write_config(root, sources, method="fisher"))
    cfg.models.sources[1].calibration = None
    cfg.models.sources[1].path = str(tmp_path / "does-not-exist")  # the data are checked first
    with pytest.raises(ConfigError, match=r"models\.sources\[code\]\.calibration"):
        compute_source_fisher(cfg, "code", tmp_path, device="cpu")
    with pytest.raises(ConfigError, match="no source named 'chat'"):
        compute_source_fisher(cfg, "chat", tmp_path, device="cpu")
    assert not any(tmp_path.iterdir())


# -- the pipeline: merge-statistics computes each source's Fisher, merge-experts merges with it -----

def test_end_to_end_fisher_pipeline(tmp_path):
    """merge.method fisher through the real stages: the merged tensors equal the formula on the
    Fishers the merge-statistics stage stored, the models load, and a harc.* change reruns neither
    the Fisher pass nor the merge."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from harc_hpc.config import load_config
    from harc_hpc.io import merge_statistics as ms
    from harc_hpc.io.checkpoint import Checkpoint
    from harc_hpc.pipeline.api import submit_run
    from pipeline_fixtures import build_tiny_sources, write_config

    sources = build_tiny_sources(tmp_path, family="olmoe", layers=2)
    path = write_config(tmp_path, sources, name="fisher", extra={"merge.method": "fisher",
                                                                "merge.parameters": {"weights": [0.3, 0.7]}})
    cfg = load_config(path, overrides={"harc.block_size": 2})
    plan, first = submit_run(cfg, executor="debug", echo=lambda m: None)
    assert first.ok and {"merge-statistics/all", "merge-experts/all"} <= set(first.completed)
    assert ms.read_meta(ms.source_dir(cfg.run_dir, "code") / "fisher")["digest"] == plan.tasks["merge-statistics/all"].digest
    for folder in ("merged", "model"):
        model = AutoModelForCausalLM.from_pretrained(cfg.run_dir / folder).eval()
        with torch.no_grad():
            assert torch.isfinite(model(torch.randint(0, 128, (2, 9))).logits).all()
    rec = json.loads((cfg.run_dir / "merged" / "harc_merge.json").read_text())
    assert rec["method"] == "fisher" and rec["statistics"]["kind"] == "fisher"
    key = "model.layers.1.self_attn.o_proj.weight"
    num = den = 0
    for w, s in zip((0.3, 0.7), ("math", "code")):
        folder = ms.source_dir(cfg.run_dir, s) / "fisher"
        assert json.loads((folder / "meta.json").read_text())["tokens"] > 0
        f = Checkpoint(folder).get_tensor(key).double().clamp_min(1e-10)
        x = Checkpoint(sources[s]).get_tensor(key).double()
        num, den = num + w * f * x, den + w * f
    got = Checkpoint(cfg.run_dir / "merged").get_tensor(key).double()
    torch.testing.assert_close(got, num / den, rtol=1e-5, atol=1e-7)

    again = load_config(path, overrides={"harc.block_size": 2, "harc.alpha": 0.5})
    _, second = submit_run(again, executor="debug", echo=lambda m: None)
    assert second.ok and second.completed
    assert not {"merge-statistics/all", "merge-experts/all"} & set(second.completed)
    assert {"merge-statistics/all", "merge-experts/all"} <= set(second.already_complete)


def _stage_worker(rank, world, init_file, cfg_path, run_dir):
    from harc_hpc.config import load_config
    from harc_hpc.stages import merge_statistics

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        merge_statistics.run(load_config(cfg_path), Path(run_dir), task_digest="d", process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_merge_statistics_fisher_as_two_ranks_equals_one_process(tmp_path):
    """The stage as a distributed task (executor.stages.merge-statistics.tasks_per_node): two gloo
    ranks share every source's sequences, rank 0 writes what one process writes."""
    from harc_hpc.config import load_config
    from harc_hpc.io import merge_statistics as ms
    from harc_hpc.io.checkpoint import Checkpoint
    from harc_hpc.stages import merge_statistics
    from pipeline_fixtures import build_tiny_sources, write_config

    sources = build_tiny_sources(tmp_path, family="olmoe", layers=2)
    path = write_config(tmp_path, sources, name="dp", extra={"merge.method": "fisher"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        merge_statistics.run(load_config(path), tmp_path / "one", task_digest="d")
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_stage_worker, args=(2, str(tmp_path / "rendezvous"), str(path), str(tmp_path / "two")), nprocs=2,
             join=True)
    for s in ("math", "code"):
        one = Checkpoint(ms.source_dir(tmp_path / "one", s) / "fisher")
        two = Checkpoint(ms.source_dir(tmp_path / "two", s) / "fisher")
        assert sorted(one.keys()) == sorted(two.keys())
        for key in one.keys():
            torch.testing.assert_close(two.get_tensor(key), one.get_tensor(key), rtol=1e-5, atol=1e-12)
        a = json.loads((ms.source_dir(tmp_path / "one", s) / "fisher" / "meta.json").read_text())
        b = json.loads((ms.source_dir(tmp_path / "two", s) / "fisher" / "meta.json").read_text())
        assert a["tokens"] == b["tokens"] and a["digest"] == b["digest"] == "d"
