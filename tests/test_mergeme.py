"""MoE built from dense experts (harc_hpc.mergeme, issue 15 part 1): BTX equivalence, the non-FFN
merge against plain references, loading in transformers, the router rules, and bad input.

The dense models are tiny random Llama / Mistral / Qwen3 / Qwen2 models built from their
transformers config classes; references are computed the slow, obvious way (loops, autograd on the
whole model, forward hooks), never with the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harc_hpc.errors import InputDataError, UsageError
from harc_hpc.merge import MergeConfigError, MergeContext, MergeInputError, MergeUnit, Piece, resolve_settings
from harc_hpc.merge.engine import classify
from harc_hpc.mergeme import RECORD, MoEBuildSpec, build_moe, parse_spec
from harc_hpc.models.families import FAMILIES
from pipeline_fixtures import char_tokenizer

FFN = (".mlp.gate_proj.", ".mlp.up_proj.", ".mlp.down_proj.")
PROMPTS = {"math": ["12+30=42.", "7*8=56, 9*9=81"], "code": ["def f(x):\n    return x", "for i in range(3): y += i"]}
BASE_PROMPTS = ["The cat sat on the mat."]


def dense_config(family: str, **overrides):
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  pad_token_id=None, bos_token_id=None, eos_token_id=None)
    common.update(overrides)
    import transformers

    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "llama3rope":  # Llama 3's scaled RoPE must reach the Mixtral config intact
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 4}
        return transformers.LlamaConfig(rope_parameters=rope, **common)
    if family == "mistral":
        return transformers.MistralConfig(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(head_dim=8, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "mixtral":  # an MoE, for the bad-input test
        return transformers.MixtralConfig(num_local_experts=2, num_experts_per_tok=1, **common)
    if family == "gpt2":  # a dense family without an MoE counterpart
        return transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    raise ValueError(family)


def is_ffn(key: str) -> bool:
    return any(p in key for p in FFN)


def save_dense(path: Path, config, *, seed: int, base_state=None, noise_ffn=0.0, noise_other=0.0):
    """A model (random, or ``base_state`` + noise on FFN / non-FFN tensors) with save_pretrained
    and the char tokenizer; returns its state dict."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if base_state is not None:
        model.load_state_dict(base_state)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = noise_ffn if is_ffn(name) else noise_other
            if scale:
                p.add_(scale * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """Lazily built tiny dense models: dense(family, variant) -> (path, state dict). Variants:
    ``base``; ``same-*`` (copies of the base); ``attn-*`` (the base's FFN, non-FFN moved); ``ft-*``
    (everything moved). Built once per module, never modified by tests."""
    root = tmp_path_factory.mktemp("dense")
    cache: dict = {}
    tied = {"qwen2": True}  # small Qwen2 models tie embeddings and head

    def get(family: str, variant: str = "base"):
        key = (family, variant)
        if key not in cache:
            cfg = dense_config(family, tie_word_embeddings=tied.get(family, False))
            if variant == "base":
                cache[key] = (root / family / "base", save_dense(root / family / "base", cfg, seed=0))
            else:
                _, base_state = get(family)
                kind, idx = variant.split("-")
                seed = 10 + int(idx)
                noise = {"same": (0.0, 0.0), "attn": (0.0, 0.05), "ft": (0.05, 0.05)}[kind]
                path = root / family / variant
                cache[key] = (path, save_dense(path, cfg, seed=seed, base_state=base_state,
                                               noise_ffn=noise[0], noise_other=noise[1]))
        return cache[key]

    return get


def spec_for(dense, family, variants, out: Path, **kw) -> MoEBuildSpec:
    names = list(PROMPTS)
    experts = [{"name": names[i], "path": str(dense(family, v)[0]), "prompts": PROMPTS[names[i]]}
               for i, v in enumerate(variants)]
    return MoEBuildSpec(base=str(dense(family)[0]), experts=experts, output=out, **kw)


def load(path, **kw):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, **kw)
    model.eval()
    return model, info


def model_from_state(config, state):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state)
    return model.eval()


def token_batch():
    return torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(5))


def no_temporaries(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------------------------------------
# (a, b) identical experts + uniform router = the dense model
# ---------------------------------------------------------------------------------------------

EQUIVALENCE = [
    # family, extra spec settings
    ("llama", {"top_k": 2}),
    ("llama", {"top_k": 1, "include_base_expert": True}),
    ("llama", {"top_k": 2, "include_base_expert": True, "merge": {"method": "ties", "preset": "mergeme-ties"}}),
    ("llama3rope", {"top_k": 2}),
    ("mistral", {"top_k": 2}),
    ("qwen3", {"top_k": 2}),
    ("qwen3", {"top_k": 2, "include_base_expert": True}),  # 2 of 3: needs the renormalisation
    ("qwen3", {"top_k": 3, "include_base_expert": True}),
    ("qwen2", {"top_k": 2, "shared_expert": "none"}),
    ("qwen2", {"top_k": 1, "shared_expert": "none", "include_base_expert": True}),
    ("qwen2", {"top_k": 2, "shared_expert": "base"}),
    ("qwen2", {"top_k": 1, "shared_expert": "base", "include_base_expert": True}),
]


@pytest.mark.parametrize("family,extra", EQUIVALENCE, ids=[f"{f}-{i}" for i, (f, _) in enumerate(EQUIVALENCE)])
def test_identical_experts_with_uniform_router_give_the_base_logits(dense, tmp_path, family, extra):
    spec = spec_for(dense, family, ["same-1", "same-2"], tmp_path / "moe",
                    router={"init": "uniform"}, **extra)
    build_moe(spec)
    moe, _ = load(tmp_path / "moe")
    base, _ = load(dense(family)[0])
    x = token_batch()
    with torch.no_grad():
        diff = (moe(x).logits - base(x).logits).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("family,extra", [("llama", {}), ("qwen3", {}), ("qwen2", {"shared_expert": "none"})])
def test_uniform_router_moe_is_the_dense_model_with_averaged_non_ffn(dense, tmp_path, family, extra):
    """Experts equal to the base's FFN, attention etc. moved: the BTX MoE computes the dense model
    whose non-FFN tensors are the experts' average (linear) and whose FFN is the base's."""
    spec = spec_for(dense, family, ["attn-1", "attn-2"], tmp_path / "moe", router={"init": "uniform"}, **extra)
    build_moe(spec)
    base_path, base_state = dense(family)
    a, b = dense(family, "attn-1")[1], dense(family, "attn-2")[1]
    reference = {}
    for k, v in base_state.items():
        reference[k] = v.clone() if is_ffn(k) else (a[k] + b[k]) / 2
    from transformers import AutoConfig

    ref_model = model_from_state(AutoConfig.from_pretrained(str(base_path)), reference)
    moe, _ = load(tmp_path / "moe")
    x = token_batch()
    with torch.no_grad():
        diff = (moe(x).logits - ref_model(x).logits).abs().max().item()
    assert diff <= 1e-5, diff


# ---------------------------------------------------------------------------------------------
# (c) the non-FFN merge: plain references of each method
# ---------------------------------------------------------------------------------------------

def reference_ties(base, sources, density, lam, normalize):
    """TIES as the paper / mergekit state it: keep the top-k |tau| (k = max(1, int(density n))),
    elect each element's sign by the sum, sum (or average) the agreeing ones, times lambda."""
    taus = []
    for x in sources:
        tau = (x - base).flatten()
        k = max(1, int(density * tau.numel()))
        order = sorted(range(tau.numel()), key=lambda i: -abs(float(tau[i])))
        kept = torch.zeros_like(tau)
        for i in order[:k]:
            kept[i] = tau[i]
        taus.append(kept)
    out = base.flatten().clone()
    for i in range(out.numel()):
        total = sum(float(t[i]) for t in taus)
        sign = 1.0 if total >= 0 else -1.0
        agree = [float(t[i]) for t in taus if t[i] != 0 and (t[i] > 0) == (sign > 0)]
        mixed = sum(agree)
        if normalize and agree:
            mixed /= len(agree)
        out[i] += lam * mixed
    return out.reshape(base.shape)


def reference_dare(base, sources, density, lam, key, seed, sign_election):
    """DARE with MergeME's rescale (1/p), masks from harc-hpc's documented seeding (run seed, tensor
    name, model index), summed, optionally TIES' sign election, times lambda."""
    taus = []
    for i, x in enumerate(sources):
        g = MergeContext(seed=seed).generator(key, i)
        keep = torch.rand(base.shape, generator=g, dtype=torch.float32) < density
        taus.append((x - base) * keep / density)
    stacked = torch.stack(taus)
    if sign_election:
        sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
        stacked = stacked * (torch.sign(stacked) == sign)
    return base + lam * stacked.sum(0)


METHODS = [
    ("linear", {"merge": {"method": "linear"}}),
    ("task_arithmetic", {"merge": {"method": "task_arithmetic", "parameters": {"lambda": 0.5}}}),
    ("mergeme-ties", {"merge": {"preset": "mergeme-ties"}}),
    ("ties-normalized", {"merge": {"method": "ties", "parameters": {"density": 0.5}}}),
    ("mergeme-dare", {"merge": {"preset": "mergeme-dare"}}),
    ("mergeme-dare-ties", {"merge": {"preset": "mergeme-dare-ties"}}),
]


@pytest.mark.parametrize("label,extra", METHODS, ids=[m for m, _ in METHODS])
def test_non_ffn_tensors_are_the_methods_merge_and_experts_are_the_ffns(dense, tmp_path, label, extra):
    seed = 3
    spec = spec_for(dense, "llama", ["ft-1", "ft-2"], tmp_path / "moe", seed=seed,
                    router={"init": "uniform"}, **extra)
    build_moe(spec)
    out = load_file(str(tmp_path / "moe" / "model.safetensors"))
    base = dense("llama")[1]
    srcs = [dense("llama", "ft-1")[1], dense("llama", "ft-2")[1]]
    fam = FAMILIES["mixtral"]
    merge = extra["merge"]
    method, params = resolve_settings(merge.get("method"), merge.get("preset"), merge.get("parameters", {}),
                                      ["math", "code"], method_explicit="method" in merge)
    checked = 0
    for k, b in base.items():
        if is_ffn(k):
            continue
        xs = [s[k] for s in srcs]
        if label == "linear":
            want = (xs[0] + xs[1]) / 2
        elif label == "task_arithmetic":
            want = b + 0.5 * ((xs[0] - b) + (xs[1] - b))
        elif label == "mergeme-ties":
            want = reference_ties(b, xs, 0.8, 1 / 3, normalize=False)
        elif label == "ties-normalized":
            want = reference_ties(b, xs, 0.5, 1.0, normalize=True)
        else:
            want = reference_dare(b, xs, 0.8, 1 / 3, k, seed, sign_election=label.endswith("ties"))
        assert torch.allclose(out[k], want, atol=1e-6, rtol=0), (label, k, (out[k] - want).abs().max())
        # bit for bit what harc-hpc's merge (merge-experts) makes of a whole tensor of that name
        unit = MergeUnit(k, tuple(b.shape), (Piece(k, 0, b.numel(), tuple(b.shape)),), classify(k, b.shape, fam))
        own = method.merge(b.clone(), [x.clone() for x in xs], unit, params, ["math", "code"], MergeContext(seed=seed))
        assert torch.equal(out[k], own), (label, k)
        checked += 1
    assert checked == 1 + 1 + 1 + 2 * 6  # embed, lm_head, final norm, 2 layers x (4 attn + 2 norms)
    for layer in range(2):
        for e, s in enumerate(srcs):
            for proj in ("gate", "up", "down"):
                assert torch.equal(out[fam.expert_key(layer, e, proj)], s[f"model.layers.{layer}.mlp.{proj}_proj.weight"])


# ---------------------------------------------------------------------------------------------
# (d) every output family loads in transformers, experts where they belong
# ---------------------------------------------------------------------------------------------

LOADS = [("llama", "MixtralForCausalLM", {}), ("mistral", "MixtralForCausalLM", {}),
         ("qwen3", "Qwen3MoeForCausalLM", {}), ("qwen2", "Qwen2MoeForCausalLM", {}),
         ("qwen2", "Qwen2MoeForCausalLM", {"shared_expert": "none"})]


@pytest.mark.parametrize("family,arch,extra", LOADS, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(LOADS)])
def test_built_moe_loads_with_no_missing_or_unexpected_keys(dense, tmp_path, family, arch, extra):
    spec = spec_for(dense, family, ["ft-1", "ft-2"], tmp_path / "moe", include_base_expert=True,
                    merge={"preset": "mergeme-ties"}, router={"init": "random"}, **extra)
    summary = build_moe(spec)
    assert summary["architecture"] == arch and summary["experts"] == ["math", "code", "base"]
    moe, info = load(tmp_path / "moe")
    assert type(moe).__name__ == arch
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert moe.config.num_experts_per_tok == 2
    with torch.no_grad():
        assert torch.isfinite(moe(token_batch()).logits).all()
    states = [dense(family, "ft-1")[1], dense(family, "ft-2")[1], dense(family)[1]]
    shared = extra.get("shared_expert", "base") if family == "qwen2" else None
    down_scale = 0.5 if shared == "base" else 1.0
    for layer, block in enumerate(moe.model.layers):
        experts = block.mlp.experts
        for e, s in enumerate(states):
            g, u, d = (s[f"model.layers.{layer}.mlp.{p}_proj.weight"] for p in ("gate", "up", "down"))
            assert torch.equal(experts.gate_up_proj[e], torch.cat([g, u], 0))
            assert torch.equal(experts.down_proj[e], d * down_scale)
        if shared == "base":
            b = states[2]
            assert torch.equal(block.mlp.shared_expert.down_proj.weight, b[f"model.layers.{layer}.mlp.down_proj.weight"])
            assert torch.equal(block.mlp.shared_expert_gate.weight, torch.zeros(1, 32))
    out = tmp_path / "moe"
    # the on-disk layout is the one save_pretrained of the family writes
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(out))).save_pretrained(tmp_path / "ref")
    ours, ref = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (dense(family)[0] / name).read_bytes()
    assert (out / "generation_config.json").is_file()
    record = json.loads((out / RECORD).read_text())
    assert [e["ffn_from"] for e in record["experts"]] == ["math", "code", "base"]
    assert record["non_ffn_merge"]["method"] == "ties" and record["router_init"] == "random"


# ---------------------------------------------------------------------------------------------
# (e) router rules
# ---------------------------------------------------------------------------------------------

def routers_of(out: Path, family: str) -> list[torch.Tensor]:
    tensors = load_file(str(out / "model.safetensors"))
    fam = FAMILIES[{"llama": "mixtral", "qwen3": "qwen3_moe", "qwen2": "qwen2_moe"}[family]]
    return [tensors[fam.router_disk_key(layer)] for layer in range(2)]


def test_random_router_is_seeded_normal_with_the_init_std(dense, tmp_path):
    def build(seed, name):
        build_moe(spec_for(dense, "llama", ["ft-1", "ft-2"], tmp_path / name, seed=seed,
                           router={"init": "random"}))
        return routers_of(tmp_path / name, "llama")

    a, again, other = build(0, "a"), build(0, "b"), build(1, "c")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    for layer in range(2):
        assert a[layer].shape == (2, 32)
        assert torch.equal(a[layer], again[layer]) and not torch.equal(a[layer], other[layer])
        key = FAMILIES["mixtral"].router_disk_key(layer)
        want = torch.randn(2, 32, generator=MergeContext(seed=0).generator(key, 0)) * 0.02
        assert torch.equal(a[layer], want)


def test_uniform_router_is_zero(dense, tmp_path):
    build_moe(spec_for(dense, "qwen3", ["ft-1", "ft-2"], tmp_path / "moe", router={"init": "uniform"}))
    for r in routers_of(tmp_path / "moe", "qwen3"):
        assert r.shape == (2, 32) and not r.any()


def layer_inputs(model, ids) -> list[torch.Tensor]:
    """The hidden state entering each decoder layer, (T, d) each, captured with forward hooks."""
    seen = []

    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        seen.append(h[0].detach().double())

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return seen


def tokens(model_dir: Path, text: str) -> torch.Tensor:
    """``text`` tokenized as the build does: with the tokenizer the base ships (AutoTokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))(text, return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hidden_state_router_rows_are_the_normalised_mean_hidden_states(dense, tmp_path, family):
    spec = spec_for(dense, family, ["ft-1", "ft-2"], tmp_path / "moe", include_base_expert=True,
                    router={"init": "hidden_state", "base_prompts": BASE_PROMPTS})
    build_moe(spec)
    routers = routers_of(tmp_path / "moe", family)
    base, _ = load(dense(family)[0], dtype=torch.float32)
    for e, prompts in enumerate([PROMPTS["math"], PROMPTS["code"], BASE_PROMPTS]):
        for layer in range(2):
            per_prompt = [layer_inputs(base, tokens(dense(family)[0], p))[layer].mean(0) for p in prompts]
            mean = sum(per_prompt) / len(per_prompt)
            want = mean / mean.norm()
            assert torch.allclose(routers[layer][e].double(), want, atol=1e-6), (e, layer)


def test_task_vector_router_reproduces_app_c_scores_at_each_prompt(dense, tmp_path):
    family = "llama"
    spec = spec_for(dense, family, ["ft-1", "ft-2"], tmp_path / "moe", include_base_expert=True,
                    router={"init": "task_vector"})
    build_moe(spec)
    routers = routers_of(tmp_path / "moe", family)
    base, _ = load(dense(family)[0], dtype=torch.float32)
    base_state = dense(family)[1]
    experts = [dense(family, "ft-1")[1], dense(family, "ft-2")[1], None]  # None: the base expert
    names = [n for n, _ in base.named_parameters()]
    # App. C with MergeME's task vector tau = theta_base - theta_expert (§3.1.2)
    taus = [None if s is None else torch.cat([(base_state[n] - s[n]).double().flatten() for n in names])
            for s in experts]
    prompts = PROMPTS["math"] + PROMPTS["code"]
    for text in prompts:
        ids = tokens(dense(family)[0], text)
        base.zero_grad()
        base(input_ids=ids, labels=ids).loss.backward()
        grad = torch.cat([p.grad.double().flatten() for _, p in base.named_parameters()])
        scores = torch.tensor([0.0 if t is None else float(grad @ t / (grad.norm() * t.norm())) for t in taus],
                              dtype=torch.float64)
        assert scores[:2].abs().min() > 0  # the experts' scores are informative, the base's is 0
        for layer, h in enumerate(layer_inputs(base, ids)):
            logits = routers[layer].double() @ h.mean(0)
            assert torch.allclose(logits, scores, atol=1e-5), (text, layer, logits, scores)
            # hence App. C's routing: softmax over the top-k similarities
            assert torch.equal(logits.topk(2).indices, scores.topk(2).indices)


# ---------------------------------------------------------------------------------------------
# (f) bad input: a clear error naming the source and the reason, nothing written
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def odd_models(tmp_path_factory, dense):
    root = tmp_path_factory.mktemp("odd")
    base_path, base_state = dense("llama")
    paths = {
        "qwen3": dense("qwen3", "ft-1")[0],
        "wide": root / "wide",
        "mixtral": root / "mixtral",
        "gpt2": root / "gpt2",
        "bias-base": root / "bias-base",
        "bias-ft": root / "bias-ft",
        "nan": root / "nan",
    }
    save_dense(paths["wide"], dense_config("llama", hidden_size=48), seed=1)
    save_dense(paths["mixtral"], dense_config("mixtral"), seed=1)
    save_dense(paths["gpt2"], dense_config("gpt2"), seed=1)
    bias_state = save_dense(paths["bias-base"], dense_config("llama", attention_bias=True), seed=1)
    save_dense(paths["bias-ft"], dense_config("llama", attention_bias=True), seed=2, base_state=bias_state,
               noise_other=0.01)
    nan_state = {k: v.clone() for k, v in base_state.items()}
    nan_state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_dense(paths["nan"], dense_config("llama"), seed=3, base_state=nan_state)
    return paths


BAD = [
    # expert model, base model (None: the llama base), error class, message parts
    ("qwen3", None, MergeInputError, ["'code'", "different architectures", "'llama'", "'qwen3'"]),
    ("wide", None, MergeInputError, ["'code'", "hidden_size", "32", "48"]),
    ("mixtral", None, MergeInputError, ["'code'", "already a Mixture-of-Experts", "mixtral"]),
    ("gpt2", None, MergeInputError, ["'code'", "'gpt2'", "no MoE counterpart"]),
    ("bias-ft", "bias-base", MergeInputError, ["'base'", "attention_bias=True", "MixtralForCausalLM"]),
    ("nan", None, InputDataError, ["'code'", "model.layers.1.mlp.up_proj.weight", "NaN"]),
]


@pytest.mark.parametrize("expert,base,error,parts", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_naming_the_source_and_write_nothing(dense, odd_models, tmp_path, expert, base, error, parts):
    out = tmp_path / "out" / "moe"
    out.parent.mkdir()
    base_path = odd_models[base] if base else dense("llama")[0]
    ok_expert = dense("llama", "ft-1")[0] if base is None else odd_models["bias-ft"]
    spec = MoEBuildSpec(base=str(base_path), output=out,
                        experts=[{"name": "math", "path": str(ok_expert)},
                                 {"name": "code", "path": str(odd_models[expert])}])
    with pytest.raises(error) as info:
        build_moe(spec)
    for part in parts:
        assert part in str(info.value), (part, str(info.value))
    assert not out.exists() and no_temporaries(out.parent)


def test_bad_settings_are_usage_errors(dense, tmp_path):
    base, a, b = (str(dense("llama", v)[0]) for v in ("base", "ft-1", "ft-2"))
    experts = [{"name": "math", "path": a}, {"name": "code", "path": b}]
    cases = [
        ({"top_k": 3}, "top_k 3 is more than the 2 experts"),
        ({"router": {"init": "hidden_state"}}, "needs prompts for every expert"),
        ({"shared_expert": "base"}, "shared_expert is for Qwen2-MoE"),
        ({"merge": {"method": "nope"}}, "unknown merge method 'nope'"),
        ({"merge": {"method": "ties", "parameters": {"density": 2}}}, "density must be in (0, 1]"),
        ({"experts": [{"name": "math", "path": a}]}, "at least 2 experts"),
        ({"experts": [{"name": "base", "path": a}, {"name": "code", "path": b}]}, "base model's name"),
    ]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
            build_moe(parse_spec({"base": base, "experts": experts, "output": str(out), **extra}))
        assert not out.exists() and no_temporaries(tmp_path)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(MergeConfigError, match="output directory exists"):
        build_moe(parse_spec({"base": base, "experts": experts, "output": str(existing)}))
    assert (existing / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def test_build_moe_command(dense, tmp_path):
    from click.testing import CliRunner

    from harc_hpc.cli import main

    base, a, b = (dense("qwen3", v)[0] for v in ("base", "ft-1", "ft-2"))
    spec = tmp_path / "build.yaml"
    spec.write_text(json.dumps({"base": str(base), "output": "moe", "top_k": 2,
                                "merge": {"preset": "mergeme-dare"}, "router": {"init": "random"},
                                "experts": [{"name": "math", "path": str(a)}, {"name": "code", "path": str(b)}]}))
    res = CliRunner().invoke(main, ["build-moe", str(spec)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["architecture"] == "Qwen3MoeForCausalLM"
    assert (tmp_path / "moe" / "model.safetensors").is_file()  # relative to the spec's directory
    res = CliRunner().invoke(main, ["build-moe", str(spec)])
    assert res.exit_code == 2 and "output directory exists" in res.output
    res = CliRunner().invoke(main, ["build-moe", str(spec), "--overwrite"])
    assert res.exit_code == 0, res.output
