"""MoE of heterogeneous dense experts (MergeME §3.2, issue 15 part 4): projector shapes, the forward
against a hand-written composition, the one-expert identity, the router formula, greedy generation,
the fine-tune (loss goes down, kill-and-resume gives the same bytes), save/load, and bad input.

The experts are tiny random Llama / Qwen3 models of different widths and depths built from their
transformers config classes; references are written out with plain tensor operations and the
experts' own transformers modules loaded separately from disk.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from harc_hpc.errors import InputDataError, RunStateError
from harc_hpc.merge import MergeConfigError, MergeInputError
from harc_hpc.mergeme import HeteroMoE, HeteroMoESpec, build_hetero_moe, parse_hetero_spec
from harc_hpc.mergeme.hetero_build import batch_indices, collate, lm_loss
from harc_hpc.mergeme.heterogeneous import HETERO_RECORD, HETERO_WEIGHTS, ProjectorLayout
from pipeline_fixtures import char_tokenizer

TEXTS = ["12+30=42 and 7*8=56.", "def f(x):\n    return x + 1", "The cat sat on the mat today.",
         "for i in range(3): total += i", "9*9=81, 6*7=42, 5+5=10", "Paris is the capital of France.",
         "x = [a * 2 for a in xs]", "17-4=13; 100/4=25"]


def config(kind: str, **kw):
    import transformers

    common = dict(vocab_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  pad_token_id=None, bos_token_id=None, eos_token_id=None)
    common.update(kw)
    if kind == "small":  # narrow and shallow Llama
        return transformers.LlamaConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=1, **common)
    if kind == "wide":  # wide, deeper Qwen3 with a tied head
        return transformers.Qwen3Config(hidden_size=48, intermediate_size=64, num_hidden_layers=3, head_dim=8,
                                        tie_word_embeddings=True, **common)
    if kind == "mid":
        return transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, **common)
    if kind == "gpt2":  # a dense family whose head / embedding layout is not supported here
        return transformers.GPT2Config(vocab_size=128, n_embd=24, n_layer=1, n_head=4, n_positions=64)
    if kind == "mixtral":
        return transformers.MixtralConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                                          num_local_experts=2, num_experts_per_tok=1, **common)
    raise ValueError(kind)


def shuffled_char_tokenizer():
    """128 tokens like char_tokenizer, but a different token -> id mapping."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): (i * 7) % 128 for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=chr(0)))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=chr(0))


def save_model(path: Path, cfg, seed: int, tokenizer=None) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger weights than the default init: outputs that differ visibly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    (tokenizer or char_tokenizer()).save_pretrained(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster than several (and than several fighting for 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hetero")
    paths = {
        "small": save_model(root / "small", config("small"), 1),
        "wide": save_model(root / "wide", config("wide"), 2),
        "mid": save_model(root / "mid", config("mid"), 3),
        "vocab130": save_model(root / "vocab130", config("small", vocab_size=130), 4),
        "othertok": save_model(root / "othertok", config("small"), 5, tokenizer=shuffled_char_tokenizer()),
        "moe": save_model(root / "moe", config("mixtral"), 6),
        "gpt2": save_model(root / "gpt2", config("gpt2"), 7),
    }
    data = root / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    paths["data"] = data
    return paths


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def three_expert_moe(models, top_k=2, **kw) -> HeteroMoE:
    kw.setdefault("projector_layout", ProjectorLayout(layers=2, hidden_size=20))
    return HeteroMoE.from_experts(["small", "wide", "mid"], [models["small"], models["wide"], models["mid"]],
                                  top_k=top_k, **kw).eval()


def spread_router(model: HeteroMoE, seed=0):
    """A router large enough that sequences of a batch pick different experts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.router.weight.copy_(torch.randn(model.router.weight.shape, generator=g) * 30)


def padded_batch():
    tok = char_tokenizer()
    seqs = [tok(t)["input_ids"] for t in ("12+30=42", "def f(x): return x", "The cat sat.", "x=1")]
    return collate(seqs), seqs


def spec(models, out: Path, **kw) -> HeteroMoESpec:
    train = {"data": {"files": [str(models["data"])], "max_length": 40}, "steps": 6, "batch_size": 3,
             "lr": 3e-3, "checkpoint_every": 2, **kw.pop("train", {})}
    return HeteroMoESpec(experts=[{"name": "small", "path": str(models["small"])},
                                  {"name": "wide", "path": str(models["wide"])}],
                         output=out, top_k=kw.pop("top_k", 2), train=train, **kw)


# ---------------------------------------------------------------------------------------------
# shapes, initialisation, forward
# ---------------------------------------------------------------------------------------------

def test_projector_shapes_and_padded_average_init(models):
    model = three_expert_moe(models)
    d = {"small": 24, "wide": 48, "mid": 32}
    assert model.layout.hidden_size == 48 and model.layout.vocab_size == 128
    sd = model.wrapper_state_dict()
    for name, di in d.items():
        assert sd[f"proj_in.{name}.0.weight"].shape == (20, 48)
        assert sd[f"proj_in.{name}.2.weight"].shape == (di, 20)
        assert sd[f"proj_out.{name}.0.weight"].shape == (20, di)
        assert sd[f"proj_out.{name}.2.weight"].shape == (48, 20)
        assert sd[f"proj_out.{name}.2.bias"].shape == (48,)
    assert sd["router.weight"].shape == (3, 48)
    assert not any(k.startswith("experts.") for k in sd)
    # shared embedding / head: the mean of the zero-padded matrices (the Qwen3 head is its embedding)
    hf = {n: load_hf(models[n]) for n in d}
    emb = torch.zeros(128, 48, dtype=torch.float64)
    head = torch.zeros(128, 48, dtype=torch.float64)
    for n, m in hf.items():
        emb[:, : d[n]] += m.model.embed_tokens.weight.double() / 3
        head[:, : d[n]] += m.lm_head.weight.double() / 3
    assert torch.allclose(sd["embed.weight"].double(), emb, atol=1e-7)
    assert torch.allclose(sd["head.weight"].double(), head, atol=1e-7)
    assert torch.equal(hf["wide"].lm_head.weight, hf["wide"].model.embed_tokens.weight)
    # projectors and router come from seeded draws: a rebuild with the same seed is identical
    again = three_expert_moe(models)
    assert all(torch.equal(v, again.wrapper_state_dict()[k]) for k, v in sd.items())
    other = three_expert_moe(models, seed=1)
    assert not torch.equal(other.wrapper_state_dict()["proj_in.small.0.weight"], sd["proj_in.small.0.weight"])


def reference_logits(model: HeteroMoE, ids: list[int], hf: dict) -> torch.Tensor:
    """MergeME §3.2 written out for one unpadded sequence, with the experts' own transformers
    modules (loaded separately) and the projector MLPs as explicit matrix products."""
    sd = model.wrapper_state_dict()
    names = model.layout.names
    e = sd["embed.weight"][torch.tensor(ids)]  # (t, d_m)
    mean = e.sum(0) / len(ids)
    scores = [float(sd["router.weight"][i] @ mean) for i in range(len(names))]
    chosen = sorted(range(len(names)), key=lambda i: -scores[i])[: model.layout.top_k]
    z = [math.exp(scores[i] - scores[chosen[0]]) for i in chosen]
    alpha = [v / sum(z) for v in z]
    gelu = torch.nn.functional.gelu
    mixed = torch.zeros_like(e)
    for a, i in zip(alpha, chosen):
        n = names[i]
        h = gelu(e @ sd[f"proj_in.{n}.0.weight"].T + sd[f"proj_in.{n}.0.bias"])
        h = h @ sd[f"proj_in.{n}.2.weight"].T + sd[f"proj_in.{n}.2.bias"]
        out = hf[n].model(inputs_embeds=h[None]).last_hidden_state[0]
        r = gelu(out @ sd[f"proj_out.{n}.0.weight"].T + sd[f"proj_out.{n}.0.bias"])
        r = r @ sd[f"proj_out.{n}.2.weight"].T + sd[f"proj_out.{n}.2.bias"]
        mixed = mixed + a * r
    return mixed @ sd["head.weight"].T


@torch.no_grad()
def test_forward_matches_reference_composition(models):
    model = three_expert_moe(models, top_k=2)
    spread_router(model)
    hf = {n: load_hf(models[n]) for n in model.layout.names}
    (ids, mask), seqs = padded_batch()
    _, idx, _ = model.route(ids, mask)
    assert len({tuple(sorted(r)) for r in idx.tolist()}) > 1  # the batch really splits between experts
    logits = model(ids, mask)
    assert logits.shape == (4, ids.shape[1], 128)
    worst = 0.0
    for b, s in enumerate(seqs):
        ref = reference_logits(model, s, hf)
        worst = max(worst, float((logits[b, : len(s)] - ref).abs().max()))
    assert worst <= 1e-5, worst
    # a sequence alone gives the same logits as in the padded batch
    alone = model(ids[1:2, : len(seqs[1])])
    assert torch.allclose(alone[0], logits[1, : len(seqs[1])], atol=1e-5)


@torch.no_grad()
def test_router_weights_follow_the_formula(models):
    model = three_expert_moe(models, top_k=2)
    spread_router(model, seed=3)
    (ids, mask), seqs = padded_batch()
    logits, idx, alpha = model.route(ids, mask)
    weights = model.routing_weights(ids, mask)
    W, E = model.router.weight, model.embed.weight
    for b, s in enumerate(seqs):
        mean = E[torch.tensor(s)].mean(0)  # the padded positions do not count
        want_logits = W @ mean
        assert torch.allclose(logits[b], want_logits, atol=1e-5)
        top = torch.topk(want_logits, 2)
        want = torch.zeros(3)
        want[top.indices] = torch.exp(top.values) / torch.exp(top.values).sum()
        assert torch.allclose(weights[b], want, atol=1e-6)
        assert set(idx[b].tolist()) == set(top.indices.tolist())
        assert float(weights[b].sum()) == pytest.approx(1.0, abs=1e-6)
        assert int((weights[b] == 0).sum()) == 1  # top-2 of 3: one expert gets nothing


@torch.no_grad()
def test_one_expert_with_identity_projectors_is_the_expert(models):
    for name in ("wide", "small"):
        model = HeteroMoE.from_experts([name], [models[name]], top_k=1,
                                       projector_layout=ProjectorLayout(layers=1), projector_init="identity").eval()
        hf = load_hf(models[name])
        (ids, mask), seqs = padded_batch()
        want = hf(input_ids=ids, attention_mask=mask).logits
        got = model(ids, mask)
        for b, s in enumerate(seqs):
            assert torch.allclose(got[b, : len(s)], want[b, : len(s)], atol=1e-6), name
        prompt = ids[:1, : len(seqs[0])]
        hf_ids = hf.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(prompt, max_new_tokens=6), hf_ids)


@torch.no_grad()
def test_generate_is_greedy_decoding_of_forward(models):
    model = three_expert_moe(models, top_k=2)
    spread_router(model, seed=1)
    tok = char_tokenizer()
    prompts = [tok("7*8=")["input_ids"], tok("def g(y):")["input_ids"]]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])  # left-padded
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, mask, max_new_tokens=7)
    assert out.shape == (2, T + 7)
    for b, p in enumerate(prompts):
        seq = list(p)
        for _ in range(7):  # the obvious loop: whole-sequence forward, argmax of the last position
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert out[b, T - len(p):].tolist() == seq
    # EOS: a sequence stops, is padded, and generation ends when all have stopped
    first = int(out[0, T])
    stopped = model.generate(ids[:1], mask[:1], max_new_tokens=7, eos_token_id=first, pad_token_id=5)
    assert stopped.shape == (1, T + 1) and int(stopped[0, -1]) == first


# ---------------------------------------------------------------------------------------------
# fine-tune, checkpoints, save / load
# ---------------------------------------------------------------------------------------------

def _mean_data_loss(model: HeteroMoE, models) -> float:
    tok = char_tokenizer()
    seqs = [tok(t)["input_ids"][:40] for t in TEXTS]
    with torch.no_grad():
        return float(lm_loss(model, *collate(seqs)))


def test_batches_are_a_function_of_seed_and_step():
    seen = [i for s in range(1, 5) for i in batch_indices(8, s, 4, seed=0)]
    assert sorted(seen[:8]) == list(range(8)) and sorted(seen[8:]) == list(range(8))  # 2 epochs
    assert seen[:8] != seen[8:]  # each epoch its own permutation
    assert batch_indices(8, 3, 4, seed=0) == seen[8:12]
    assert batch_indices(8, 1, 4, seed=1) != seen[:4]


def test_finetune_lowers_the_loss_and_freezes_the_experts(models, tmp_path):
    s = spec(models, tmp_path / "moe", train={"steps": 8})
    before = HeteroMoE.from_experts(["small", "wide"], [models["small"], models["wide"]], top_k=2).eval()
    summary = build_hetero_moe(s)
    after = HeteroMoE.from_pretrained(tmp_path / "moe")
    loss0, loss1 = _mean_data_loss(before, models), _mean_data_loss(after, models)
    assert loss1 < loss0 - 0.05, (loss0, loss1)
    record = json.loads((tmp_path / "moe" / HETERO_RECORD).read_text())
    losses = record["build"]["train"]["losses"]
    assert len(losses) == 8 and summary["last_loss"] == losses[-1]
    # trained: projectors and router; not trained: embedding, head, experts
    b, a = before.wrapper_state_dict(), after.wrapper_state_dict()
    assert torch.equal(b["embed.weight"], a["embed.weight"]) and torch.equal(b["head.weight"], a["head.weight"])
    assert not torch.equal(b["router.weight"], a["router.weight"])
    assert not torch.equal(b["proj_out.wide.2.weight"], a["proj_out.wide.2.weight"])
    hf = load_hf(models["small"])
    assert not any("embed_tokens" in k for k in after.experts["small"].state_dict())  # not kept
    assert all(torch.equal(p, hf.model.state_dict()[k]) for k, p in after.experts["small"].state_dict().items())
    assert not (tmp_path / "moe.train").exists()  # the checkpoint directory is gone
    assert (tmp_path / "moe" / "tokenizer.json").is_file()


def test_trainable_selects_what_moves(models, tmp_path):
    s = spec(models, tmp_path / "moe", train={"steps": 2, "trainable": ["embedding", "head"]})
    before = HeteroMoE.from_experts(["small", "wide"], [models["small"], models["wide"]], top_k=2).wrapper_state_dict()
    build_hetero_moe(s)
    after = HeteroMoE.from_pretrained(tmp_path / "moe").wrapper_state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"embed.weight", "head.weight"}


class Killed(Exception):
    pass


def test_kill_and_resume_gives_the_same_bytes(models, tmp_path):
    full = build_hetero_moe(spec(models, tmp_path / "a"))
    assert full["resumed_from_step"] == 0

    def kill_after_3(step):
        if step == 3:
            raise Killed()

    s = spec(models, tmp_path / "b")
    with pytest.raises(Killed):
        build_hetero_moe(s, after_step=kill_after_3)
    assert not (tmp_path / "b").exists()
    assert [p.name for p in (tmp_path / "b.train").iterdir()] == ["step-00000002"]  # every 2 steps
    resumed = build_hetero_moe(s)
    assert resumed["resumed_from_step"] == 2
    for f in (HETERO_WEIGHTS, HETERO_RECORD):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert not (tmp_path / "b.train").exists()
    # killed after the last step's checkpoint, before the output: the rerun only writes it
    s_last = spec(models, tmp_path / "b2")
    with pytest.raises(Killed):
        build_hetero_moe(s_last, after_step=lambda step: (_ for _ in ()).throw(Killed()) if step == 6 else None)
    assert build_hetero_moe(s_last)["resumed_from_step"] == 6
    assert (tmp_path / "b2" / HETERO_WEIGHTS).read_bytes() == (tmp_path / "a" / HETERO_WEIGHTS).read_bytes()
    # a leftover checkpoint of other settings is refused, before anything is written
    with pytest.raises(Killed):
        build_hetero_moe(spec(models, tmp_path / "c"), after_step=kill_after_3)
    with pytest.raises(RunStateError, match="another spec"):
        build_hetero_moe(spec(models, tmp_path / "c", train={"lr": 1e-3}))
    assert not (tmp_path / "c").exists()


def test_save_load_round_trip_is_bit_exact(models, tmp_path):
    model = three_expert_moe(models, top_k=2)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # every wrapper tensor moved: nothing round-trips by accident of init
        for p in model.wrapper_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    for storage in ("reference", "copy"):
        d = tmp_path / storage
        d.mkdir()
        model.save_pretrained(d, experts_storage=storage, tokenizer_from=models["small"])
        loaded = HeteroMoE.from_pretrained(d)
        a, b = model.wrapper_state_dict(), loaded.wrapper_state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        (ids, mask), _ = padded_batch()
        with torch.no_grad():
            assert torch.equal(model(ids, mask), loaded(ids, mask))
        again = tmp_path / f"{storage}-again"
        again.mkdir()
        loaded.save_pretrained(again, experts_storage=storage, tokenizer_from=models["small"])
        assert (again / HETERO_WEIGHTS).read_bytes() == (d / HETERO_WEIGHTS).read_bytes()
        record = json.loads((d / HETERO_RECORD).read_text())
        paths = [e["path"] for e in record["layout"]["experts"]]
        if storage == "copy":
            assert paths == ["experts/small", "experts/wide", "experts/mid"]
            assert (d / "experts" / "wide" / "model.safetensors").is_file()
        else:
            assert paths == [str(models[n].resolve()) for n in ("small", "wide", "mid")]
    # an expert whose weights changed since the save is refused
    weights = tmp_path / "copy" / "experts" / "mid" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    with pytest.raises(MergeInputError, match="'mid'.*changed"):
        HeteroMoE.from_pretrained(tmp_path / "copy")


# ---------------------------------------------------------------------------------------------
# bad input, settings, command line
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    ("vocab130", "'small' and 'bad' have different vocabularies: vocab_size 128 vs 130"),
    ("othertok", "'small' and 'bad' have different tokenizers"),
    ("moe", "expert 'bad' is already a Mixture-of-Experts model"),
    ("gpt2", "expert 'bad': model_type 'gpt2' is not supported as a heterogeneous expert"),
])
def test_bad_experts_are_refused_before_anything_is_written(models, tmp_path, bad, message):
    s = HeteroMoESpec(experts=[{"name": "small", "path": str(models["small"])},
                               {"name": "bad", "path": str(models[bad])}],
                      output=tmp_path / "out", top_k=1,
                      train={"data": {"files": [str(models["data"])]}, "steps": 2})
    with pytest.raises(MergeInputError, match=message) as exc:
        build_hetero_moe(s)
    assert str(models[bad]) in str(exc.value)  # names the source's directory
    assert list(tmp_path.iterdir()) == []


def test_missing_expert_directory_is_named(models, tmp_path):
    s = spec(models, tmp_path / "out")
    s = s.model_copy(update={"experts": [*s.experts[:1], s.experts[1].model_copy(update={"path": str(tmp_path / "gone")})]})
    with pytest.raises(MergeInputError, match="expert 'wide': model directory not found"):
        build_hetero_moe(s)
    assert list(tmp_path.iterdir()) == []


def test_missing_calibration_data(models, tmp_path):
    with pytest.raises(MergeConfigError, match="train: .*data.files is empty"):
        parse_hetero_spec({"experts": [{"name": "a", "path": "x"}, {"name": "b", "path": "y"}],
                           "output": "o", "train": {"steps": 3}})
    s = spec(models, tmp_path / "out", train={"data": {"files": [str(tmp_path / "nope.jsonl")]}})
    with pytest.raises(InputDataError, match="train.data: .*nope.jsonl: calibration file not found"):
        build_hetero_moe(s)
    assert list(tmp_path.iterdir()) == []
    # steps: 0 builds the initial model without data
    build_hetero_moe(spec(models, tmp_path / "init", train={"steps": 0, "data": {}}))
    assert json.loads((tmp_path / "init" / HETERO_RECORD).read_text())["build"]["train"]["losses"] == []


@pytest.mark.parametrize("patch, key", [
    ({"projector": {"layers": 2, "init": "identity"}}, "projector: init identity needs layers: 1"),
    ({"top_k": 3}, "top_k 3 is more than the 2 experts"),
    ({"tokenizer": "nobody"}, "tokenizer 'nobody' is not an expert name"),
    ({"experts": [{"name": "a.b", "path": "x"}, {"name": "c", "path": "y"}]}, "experts.0.name"),
    ({"train": {"steps": 0, "trainable": []}}, "train.trainable"),
    ({"routr": {}}, "routr"),
])
def test_bad_settings_name_the_key(patch, key):
    data = {"experts": [{"name": "a", "path": "x"}, {"name": "b", "path": "y"}], "output": "o",
            "train": {"steps": 0}, **patch}
    with pytest.raises(MergeConfigError, match=key.replace("(", r"\(")):
        parse_hetero_spec(data)


def test_command_line(models, tmp_path):
    from click.testing import CliRunner

    from harc_hpc.cli import main

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "experts": [{"name": "small", "path": str(models["small"])}, {"name": "mid", "path": str(models["mid"])}],
        "output": "./moe", "top_k": 1, "experts_storage": "copy",
        "train": {"data": {"files": [str(models["data"])], "max_length": 24}, "steps": 2, "batch_size": 2},
    }))
    result = CliRunner().invoke(main, ["build-hetero-moe", str(tmp_path / "spec.yaml")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["expert_hidden_sizes"] == [24, 32] and summary["steps"] == 2
    assert (tmp_path / "moe" / "experts" / "mid" / "config.json").is_file()
    again = CliRunner().invoke(main, ["build-hetero-moe", str(tmp_path / "spec.yaml")])
    assert again.exit_code == 2 and "output directory exists" in again.output
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({
        "experts": [{"name": "small", "path": str(models["small"])}, {"name": "m", "path": str(models["moe"])}],
        "output": "./moe2", "top_k": 1, "train": {"steps": 0}}))
    bad = CliRunner().invoke(main, ["build-hetero-moe", str(tmp_path / "bad.yaml")])
    assert bad.exit_code == 3 and "already a Mixture-of-Experts" in bad.output
