"""Sequence-level routing (harc_hpc.mergeme.sequence_routing, issue 15 part 3) and routing tables
(harc_hpc.mergeme.routing_analysis, part 5).

Tiny random Llama models (the builders of test_mergeme.py); every reference is computed the slow,
obvious way: each dense model loaded on its own with transformers, losses from ``labels=``,
gradients with autograd over named parameters, mixtures written out with the models' modules,
routing counted token by token from the router's inputs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from harc_hpc.errors import InputDataError, UsageError
from harc_hpc.mergeme import MoEBuildSpec, build_moe
from harc_hpc.mergeme.routing_analysis import (heldout_loss, plot_routing, routing_markdown, routing_table,
                                               write_routing_report)
from harc_hpc.mergeme.sequence_routing import SequenceRoutedLM, SequenceRouting, lm_eval_model
from test_mergeme import dense_config, save_dense

NAMES = ("math", "code")


def load_dense(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Dense base, two experts (everything moved: 'ft') and two copies of the base ('same'), and
    MoEs built from them: 'ft' with the base as third expert, 'same' without."""
    root = tmp_path_factory.mktemp("seq")
    cfg = dense_config("llama")
    base = save_dense(root / "base", cfg, seed=0)
    out = {"root": root, "base": root / "base"}
    for kind, noise in (("ft", 0.05), ("same", 0.0)):
        for i, name in enumerate(NAMES):
            save_dense(root / f"{kind}-{name}", cfg, seed=11 + i, base_state=base, noise_ffn=noise,
                       noise_other=noise)
        spec = MoEBuildSpec(base=str(root / "base"), output=root / f"moe-{kind}",
                            experts=[{"name": n, "path": str(root / f"{kind}-{n}")} for n in NAMES],
                            include_base_expert=(kind == "ft"), top_k=2, router={"init": "random"})
        build_moe(spec)
        out[kind] = root / f"moe-{kind}"
    return out


def seqs(n=3, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (length,), generator=g) for _ in range(n)]


def dense_paths(built, kind):
    return [built["root"] / f"{kind}-{n}" for n in NAMES] + ([built["base"]] if kind == "ft" else [])


# ---------------------------------------------------------------------------------------------
# routing rules against their formulas
# ---------------------------------------------------------------------------------------------

def test_ppl_routing_is_the_lowest_perplexity_experts_with_softmax_of_inverse_ppl(built):
    wrapper = SequenceRoutedLM.from_build(built["ft"], router="ppl", attention="merged")
    assert wrapper.expert_names == ["math", "code", "base"] and wrapper.top_k == 2
    models = [load_dense(p) for p in dense_paths(built, "ft")]
    chosen_first = set()
    for ids in seqs(4):
        with torch.no_grad():
            ppl = [math.exp(float(m(input_ids=ids[None], labels=ids[None]).loss)) for m in models]
        order = sorted(range(3), key=lambda e: ppl[e])
        r = wrapper.route(ids)
        assert r.experts == tuple(order[:2]), (ppl, r)
        inv = torch.tensor([1 / ppl[e] for e in order[:2]], dtype=torch.float64)
        f64 = torch.float64
        assert torch.allclose(torch.tensor(r.weights, dtype=f64), torch.softmax(inv, 0), rtol=0, atol=1e-8)
        assert torch.allclose(torch.tensor(r.scores, dtype=f64), torch.tensor([1 / p for p in ppl], dtype=f64),
                              rtol=1e-5)
        chosen_first.add(r.experts[0])
    assert len(chosen_first) > 1  # the inputs are not all routed alike: the test can tell experts apart


def test_task_vector_routing_is_app_c_computed_by_hand(built):
    wrapper = SequenceRoutedLM.from_build(built["ft"], router="task_vector", attention="separate", top_k=2)
    base = load_dense(built["base"])
    experts = [dict(load_dense(p).named_parameters()) for p in dense_paths(built, "ft")[:2]]
    names = [n for n, _ in base.named_parameters()]
    # MergeME's task vector tau = theta_base - theta_expert (§3.1.2); the base expert's is zero
    taus = [torch.cat([(dict(base.named_parameters())[n] - e[n]).detach().double().flatten() for n in names])
            for e in experts]
    for ids in seqs(3, seed=1):
        base.zero_grad()
        base(input_ids=ids[None], labels=ids[None]).loss.backward()
        g = torch.cat([p.grad.double().flatten() for _, p in base.named_parameters()])
        sims = torch.tensor([float(g @ t / (g.norm() * t.norm())) for t in taus] + [0.0], dtype=torch.float64)
        r = wrapper.route(ids)
        assert torch.allclose(torch.tensor(r.scores, dtype=torch.float64), sims, atol=1e-6), (r.scores, sims)
        top = torch.sort(sims, descending=True, stable=True).indices[:2]
        assert r.experts == tuple(int(i) for i in top)
        assert torch.allclose(torch.tensor(r.weights, dtype=torch.float64), torch.softmax(sims[top], 0), atol=1e-9)


def test_task_vector_and_ppl_routing_send_inputs_to_the_expert_trained_on_their_domain():
    """Why tau = theta_base - theta_expert: experts fine-tuned on disjoint token ranges; App. C's
    score with this sign (and PPL routing) picks each input's own expert."""
    import copy

    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    base = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ranges = {"low": (0, 20), "high": (40, 64)}
    experts = []
    for name, (lo, hi) in ranges.items():
        m = copy.deepcopy(base)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(12):
            x = torch.randint(lo, hi, (4, 16), generator=g)
            loss = m(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        experts.append(m.eval())
    for router in ("task_vector", "ppl"):
        w = SequenceRoutedLM(experts, list(ranges), router=router, attention="separate", top_k=1, base=base)
        for e, (lo, hi) in enumerate(ranges.values()):
            for s in range(3):
                ids = torch.randint(lo, hi, (16,), generator=torch.Generator().manual_seed(100 + s))
                assert w.route(ids).experts == (e,), (router, e, w.route(ids))


# ---------------------------------------------------------------------------------------------
# the models the routing drives
# ---------------------------------------------------------------------------------------------

def test_identical_experts_give_the_base_logits_for_every_option(built):
    base = load_dense(built["base"])
    ids = torch.stack(seqs(2, seed=2))
    expected = base(input_ids=ids).logits
    for router in ("ppl", "task_vector"):
        for attention in ("merged", "separate"):
            w = SequenceRoutedLM.from_build(built["same"], router=router, attention=attention)
            got = w(ids)
            assert torch.allclose(got, expected, atol=1e-5), (router, attention, (got - expected).abs().max())


def test_separate_attention_top1_is_exactly_the_chosen_expert_model(built):
    w = SequenceRoutedLM.from_build(built["ft"], router="ppl", attention="separate", top_k=1)
    models = [load_dense(p) for p in dense_paths(built, "ft")]
    for ids in seqs(3, seed=3):
        r = w.route(ids)
        assert r.weights == (1.0,)
        assert torch.equal(w(ids), models[r.experts[0]](input_ids=ids[None]).logits[0])
    ids = seqs(1, seed=4)[0]
    for e, name in enumerate(w.expert_names):
        assert torch.equal(w(ids, routing=w.fixed_routing({name: 1.0})), models[e](input_ids=ids[None]).logits[0])


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_other_families_identical_experts_and_separate_top1(tmp_path, family):
    """Qwen3 (Qwen3-MoE) and Qwen2 with tied embeddings (Qwen2-MoE with the base as shared expert)."""
    cfg = dense_config(family, tie_word_embeddings=(family == "qwen2"))
    base = save_dense(tmp_path / "base", cfg, seed=0)
    save_dense(tmp_path / "ft", cfg, seed=11, base_state=base, noise_ffn=0.05, noise_other=0.05)
    for i in (1, 2):
        save_dense(tmp_path / f"same{i}", cfg, seed=11 + i, base_state=base)
    for out, experts in (("moe-same", ["same1", "same2"]), ("moe-ft", ["ft", "same1"])):
        build_moe(MoEBuildSpec(base=str(tmp_path / "base"), output=tmp_path / out, top_k=2,
                               experts=[{"name": n, "path": str(tmp_path / n)} for n in experts],
                               include_base_expert=True))
    ids = seqs(1, seed=10)[0]
    with torch.no_grad():
        ref = {n: load_dense(tmp_path / n)(input_ids=ids[None]).logits[0] for n in ("base", "ft")}
    for attention in ("merged", "separate"):
        w = SequenceRoutedLM.from_build(tmp_path / "moe-same", router="task_vector", attention=attention)
        assert w.route(ids).scores == (0.0, 0.0, 0.0)  # zero task vectors score 0
        assert torch.allclose(w(ids), ref["base"], atol=1e-5), (family, attention)
    w = SequenceRoutedLM.from_build(tmp_path / "moe-ft", attention="separate", top_k=1)
    assert torch.equal(w(ids, routing=w.fixed_routing({"ft": 1.0})), ref["ft"])


def causal_mask(t: int) -> torch.Tensor:
    return torch.full((t, t), float("-inf")).triu(1)[None, None]


def test_separate_attention_top2_mixes_every_sublayer_by_hand(built):
    w = SequenceRoutedLM.from_build(built["ft"], router="ppl", attention="separate")
    models = [load_dense(p) for p in dense_paths(built, "ft")]
    ids = seqs(1, seed=5)[0]
    routing = w.fixed_routing({"code": 0.7, "math": 0.3})
    mix = [(models[1], 0.7), (models[0], 0.3)]
    with torch.no_grad():
        pos = torch.arange(len(ids))[None]
        h = sum(wt * m.model.embed_tokens(ids[None]) for m, wt in mix)
        pe = models[0].model.rotary_emb(h, pos)
        for l in range(len(models[0].model.layers)):
            h = h + sum(wt * m.model.layers[l].self_attn(m.model.layers[l].input_layernorm(h), pe,
                                                           causal_mask(len(ids)))[0] for m, wt in mix)
            h = h + sum(wt * m.model.layers[l].mlp(m.model.layers[l].post_attention_layernorm(h)) for m, wt in mix)
        expected = sum(wt * m.lm_head(m.model.norm(h)) for m, wt in mix)[0]
    assert torch.allclose(w(ids, routing=routing), expected, atol=1e-5)


def test_merged_attention_is_the_moe_with_the_sequence_weights_on_every_token(built):
    """Reference: a dense Llama holding the MoE's merged non-FFN tensors, whose FFN in each layer is
    0.6 FFN_code + 0.4 FFN_base written out from the MoE's expert tensors."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaMLP

    w = SequenceRoutedLM.from_build(built["ft"], router="ppl", attention="merged")
    state = {}
    for f in sorted(built["ft"].glob("*.safetensors")):
        state.update(load_file(f))
    dense = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(built["base"]),
                                             attn_implementation="sdpa").eval()
    dense.load_state_dict({k: v for k, v in state.items() if "block_sparse_moe" not in k}, strict=False)

    class Mix(torch.nn.Module):
        def __init__(self, parts):
            super().__init__()
            self.parts = parts

        def forward(self, x):
            return sum(wt * mlp(x) for mlp, wt in self.parts)

    for l, layer in enumerate(dense.model.layers):
        parts = []
        for e, wt in ((1, 0.6), (2, 0.4)):
            mlp = LlamaMLP(dense.config)
            p = f"model.layers.{l}.block_sparse_moe.experts.{e}."
            mlp.gate_proj.weight.data = state[p + "w1.weight"]
            mlp.up_proj.weight.data = state[p + "w3.weight"]
            mlp.down_proj.weight.data = state[p + "w2.weight"]
            parts.append((mlp, wt))
        layer.mlp = Mix(parts)
    ids = seqs(1, seed=6)[0]
    with torch.no_grad():
        expected = dense(input_ids=ids[None]).logits[0]
    got = w(ids, routing=w.fixed_routing({"code": 0.6, "base": 0.4}))
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_generate_is_greedy_on_the_routed_model_with_the_prompts_routing(built):
    for attention in ("merged", "separate"):
        w = SequenceRoutedLM.from_build(built["ft"], router="ppl", attention=attention)
        prompt = seqs(1, seed=7)[0]
        r = w.route(prompt)
        new = w.generate(prompt, 4)
        seq = prompt.tolist()
        for _ in range(4):  # reference: full recompute with the prompt's routing, argmax
            seq.append(int(w(torch.tensor(seq), routing=r)[-1].argmax()))
        assert new == seq[len(prompt):], attention
        assert w.generate(prompt, 4, eos_token_id=new[1]) == new[:2]


# ---------------------------------------------------------------------------------------------
# lm-eval
# ---------------------------------------------------------------------------------------------

def test_lm_eval_runs_on_the_wrapper(built):
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from harc_hpc.eval_tasks import TASK_DIR
    from harc_hpc.report.lm_eval import _tokenizer

    w = SequenceRoutedLM.from_build(built["ft"], router="ppl", attention="merged")
    tok = _tokenizer(built["ft"], False)
    lm = lm_eval_model(w, tok)
    results = lm_eval.simple_evaluate(model=lm, tasks=["harc_demo_math"], limit=2, log_samples=True,
                                      task_manager=TaskManager(include_path=str(TASK_DIR)))
    assert "exact_match,none" in results["results"]["harc_demo_math"]
    samples = results["samples"]["harc_demo_math"]
    assert len(samples) == 2
    for s in samples:  # the response is the wrapper's greedy continuation cut at lm-eval's stops
        prompt, gen = s["arguments"][0]
        ids = tok.encode(prompt, add_special_tokens=False)
        text = tok.decode(w.generate(ids, gen["max_gen_toks"]))
        for u in gen["until"]:
            text = text.split(u)[0]
        assert s["resps"][0][0] == text
    # loglikelihood: routed on the context, the continuation's log-probabilities summed
    ctx, cont = "12+30=", "42"
    (ll, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)])
    c, x = tok.encode(ctx, add_special_tokens=False), tok.encode(cont, add_special_tokens=False)
    logits = w(torch.tensor(c + x), routing=w.route(c))
    logp = torch.log_softmax(logits.double(), -1)
    assert ll == pytest.approx(sum(float(logp[len(c) - 1 + i, t]) for i, t in enumerate(x)), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# routing tables
# ---------------------------------------------------------------------------------------------

def test_routing_table_of_the_built_moe_is_a_per_token_count(built, tmp_path):
    from transformers import AutoModelForCausalLM

    moe = AutoModelForCausalLM.from_pretrained(str(built["ft"]), dtype=torch.float32).eval()
    sets = {"a": seqs(2, seed=8), "b": seqs(3, length=9, seed=9)}
    table = routing_table(moe, sets)
    assert table["experts"] == ["math", "code", "base"] and table["level"] == "token"
    json.dumps(table)
    L, E = len(moe.model.layers), 3
    for name, ss in sets.items():
        counts = torch.zeros(L, E)
        weights = torch.zeros(L, E, dtype=torch.float64)
        for ids in ss:
            inputs = {}
            hooks = [layer.mlp.gate.register_forward_pre_hook(lambda m, a, l=l: inputs.__setitem__(l, a[0]))
                     for l, layer in enumerate(moe.model.layers)]
            moe(input_ids=ids[None])
            for h in hooks:
                h.remove()
            for l in range(L):
                W = moe.model.layers[l].mlp.gate.weight
                for x in inputs[l].reshape(-1, W.shape[1]):  # one token at a time
                    p = torch.softmax(W @ x, 0)
                    top = p.topk(2)
                    for e, v in zip(top.indices.tolist(), (top.values / top.values.sum()).tolist()):
                        counts[l, e] += 1
                        weights[l, e] += v
        n = sum(len(s) for s in ss)
        got = table["sets"][name]
        assert got["tokens"] == n
        for l in range(L):
            for e, en in enumerate(table["experts"]):
                assert got["per_layer"][l]["selection"][en] == pytest.approx(float(counts[l, e]) / (2 * n), abs=1e-12)
                assert got["per_layer"][l]["weight"][en] == pytest.approx(float(weights[l, e]) / n, abs=1e-6)
        for e, en in enumerate(table["experts"]):
            assert got["selection"][en] == pytest.approx(float(counts[:, e].sum()) / (2 * n * L), abs=1e-12)
        assert sum(got["selection"].values()) == pytest.approx(1.0)
    # sequence-level: PPL routing's choices counted per sequence
    w = SequenceRoutedLM.from_build(built["ft"], router="ppl", attention="merged")
    seq_table = routing_table(w, sets)
    for name, ss in sets.items():
        routes = [w.route(s) for s in ss]
        for e, en in enumerate(w.expert_names):
            assert seq_table["sets"][name]["selection"][en] == pytest.approx(
                sum(e in r.experts for r in routes) / (2 * len(ss)))
            assert seq_table["sets"][name]["top1"][en] == pytest.approx(
                sum(r.experts[0] == e for r in routes) / len(ss))
    tables = {"random router": table, "PPL": seq_table}
    md = routing_markdown(tables, ("selection", "weight"), per_layer=True)
    assert "| random router | token | a |" in md and "| PPL | sequence | b |" in md and "layer 1" in md
    paths = write_routing_report(tables, tmp_path / "out")
    assert Path(paths["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(Path(paths["json"]).read_text())["PPL"]["level"] == "sequence"
    first = Path(paths["png"]).read_bytes()
    plot_routing(tables, tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes() == first  # deterministic bytes


def test_heldout_loss_scores_the_tokens_after_the_prompt_routed_on_the_prompt(built):
    from transformers import AutoModelForCausalLM

    sets = {"a": seqs(2, seed=11), "b": seqs(2, length=9, seed=12)}
    P = 4

    def reference(model_for, ss):  # transformers' own loss with the prompt's labels masked
        total = n = 0
        for ids in ss:
            labels = ids.clone()
            labels[:P] = -100
            with torch.no_grad():
                total += float(model_for(ids)(input_ids=ids[None], labels=labels[None]).loss) * (len(ids) - P)
            n += len(ids) - P
        return total / n

    moe = AutoModelForCausalLM.from_pretrained(str(built["ft"]), dtype=torch.float32).eval()
    got = heldout_loss(moe, sets, prompt_tokens=P)
    for name, ss in sets.items():
        assert got[name]["tokens"] == sum(len(i) - P for i in ss)
        assert got[name]["loss"] == pytest.approx(reference(lambda ids: moe, ss), rel=1e-5)
    w = SequenceRoutedLM.from_build(built["ft"], router="ppl", attention="separate", top_k=1)
    models = [load_dense(p) for p in dense_paths(built, "ft")]
    got = heldout_loss(w, sets, prompt_tokens=P)
    for name, ss in sets.items():  # top-1 separate attention: the expert chosen on the prompt
        ref = reference(lambda ids: models[w.route(ids[:P]).experts[0]], ss)
        assert got[name]["loss"] == pytest.approx(ref, rel=1e-5)
    with pytest.raises(UsageError, match="prompt_tokens=0"):
        heldout_loss(w, sets)
    with pytest.raises(UsageError, match="sequence 0 has no token after the first 12"):
        heldout_loss(moe, sets, prompt_tokens=12)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

def test_bad_input_is_named(built, tmp_path):
    with pytest.raises(UsageError, match=r"unknown expert\(s\) \['physics'\].*\['math', 'code', 'base'\]"):
        SequenceRoutedLM.from_build(built["ft"], experts=["math", "physics"])
    with pytest.raises(UsageError, match="top_k 4 must be between 1 and the 3 experts"):
        SequenceRoutedLM.from_build(built["ft"], top_k=4)
    with pytest.raises(UsageError, match="top_k 2 must be between 1 and the 1 experts"):
        SequenceRoutedLM.from_build(built["ft"], experts=["code"])
    with pytest.raises(UsageError, match="router 'random' is not a sequence-level rule"):
        SequenceRoutedLM.from_build(built["ft"], router="random")
    with pytest.raises(UsageError, match="attention 'mixed'"):
        SequenceRoutedLM.from_build(built["ft"], attention="mixed")
    with pytest.raises(InputDataError, match="harc_mergeme.json"):
        SequenceRoutedLM.from_build(built["base"])
    w = SequenceRoutedLM.from_build(built["ft"], experts=["code", "base"], top_k=1, attention="separate")
    assert w.expert_names == ["code", "base"] and w.moe_experts == [1, 2]
    with pytest.raises(UsageError, match="unknown expert 'math'; the experts are \\['code', 'base'\\]"):
        w.fixed_routing({"math": 1.0})
    with pytest.raises(UsageError, match="sum to 1"):
        w.fixed_routing({"code": 0.5})
    with pytest.raises(UsageError, match="at least 2 tokens"):
        w.route([5])
    with pytest.raises(UsageError, match="invalid routing"):
        w(torch.tensor([1, 2, 3]), routing=SequenceRouting((7,), (1.0,)))
    with pytest.raises(UsageError, match="evaluation set 'x' is empty"):
        routing_table(w, {"x": []})
    from transformers import AutoModelForCausalLM

    deeper = AutoModelForCausalLM.from_config(dense_config("llama", num_hidden_layers=3))
    with pytest.raises(UsageError, match="expert 'b' has num_hidden_layers 3 but 'a' has 2"):
        SequenceRoutedLM([load_dense(built["base"]), deeper], ["a", "b"], attention="separate")
    with pytest.raises(UsageError, match="task_vector routing needs the base model"):
        SequenceRoutedLM([load_dense(built["base"])] * 2, ["a", "b"], router="task_vector", attention="separate")
