"""Calibration data modes (full / prompt / response), generic text, num_samples as a fraction.

The token masks are checked against hand-built examples (prompt/response boundaries written out
by hand, with and without a chat template); the capture against a whole-model forward indexed by
the mask, bit for bit on CPU; the held-out loss against the same forward's per-token losses.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import torch

from harc_hpc.config import CalibrationData, CalibrationSection, ConfigError, dump_config, load_config, parse_config
from harc_hpc.io.calibration_data import (CalibrationDataError, data_digest, read_samples, sample_count,
                                          select_samples, tokenize_task, tokenize_task_masked)
from pipeline_fixtures import char_tokenizer

# user/assistant turns as a Jinja chat template renders them: <role>content</s>, and "<assistant>"
# as the generation prompt
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat(*turns):
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[i % 2], "content": c} for i, c in enumerate(turns)]}


def templated_tokenizer(template=TEMPLATE):
    tok = char_tokenizer()
    tok.chat_template = template
    return tok


def masked(records, tmp_path, mode, tok=None, **kw):
    f = jsonl(tmp_path / "d.jsonl", records)
    return tokenize_task_masked(CalibrationData(files=[f], mode=mode, **kw), CalibrationSection(),
                                tok or char_tokenizer())


def chars(ids):
    return "".join(map(chr, ids))


# -- masks against hand-built boundaries -----------------------------------------------------------

def test_response_mask_without_chat_template(tmp_path):
    # messages joined by newlines: "ab?\ncd" and "a\nbc\nd\ne" (two assistant turns)
    seqs, masks = masked([chat("ab?", "cd"), chat("a", "bc", "d", "e")], tmp_path, "response", seed=0,
                         num_samples=2)
    by_text = {chars(s): m for s, m in zip(seqs, masks)}
    assert by_text == {"ab?\ncd": [0, 0, 0, 0, 1, 1], "a\nbc\nd\ne": [0, 0, 1, 1, 0, 0, 0, 1]}


def test_response_mask_with_chat_template(tmp_path):
    seqs, masks = masked([chat("ab?", "cd")], tmp_path, "response", tok=templated_tokenizer())
    assert chars(seqs[0]) == "<user>ab?</s><assistant>cd</s>"
    # selected: what a model generating the turn emits after the generation prompt "<assistant>"
    assert masks[0] == [False] * len("<user>ab?</s><assistant>") + [True] * len("cd</s>")
    # multi-turn: both assistant turns, neither user turn
    seqs, masks = masked([chat("u", "xy", "v", "z")], tmp_path, "response", tok=templated_tokenizer())
    assert chars(seqs[0]) == "<user>u</s><assistant>xy</s><user>v</s><assistant>z</s>"
    picked = "".join(c for c, m in zip(chars(seqs[0]), masks[0]) if m)
    assert picked == "xy</s>z</s>"
    assert masks[0] == ([False] * len("<user>u</s><assistant>") + [True] * len("xy</s>")
                        + [False] * len("<user>v</s><assistant>") + [True] * len("z</s>"))


def test_response_mask_when_the_template_rewrites_earlier_turns(tmp_path):
    # The last message is rendered differently, so no rendering is a prefix of the next one: the
    # assistant contents are found in the text instead, searching forward.
    tok = templated_tokenizer("{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]"
                              "{% else %}{{ m['content'] }}|{% endif %}{% endfor %}")
    seqs, masks = masked([chat("x", "yy", "z", "yy")], tmp_path, "response", tok=tok)
    assert chars(seqs[0]) == "x|yy|z|[yy]"
    assert masks[0] == [0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0]


def test_special_tokens_and_truncation(tmp_path):
    from tokenizers import processors

    tok = char_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.convert_tokens_to_ids("<s>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    seqs, masks = masked([chat("ab", "cd")], tmp_path, "response", tok=tok)
    assert seqs[0][0] == bos and chars(seqs[0][1:]) == "ab\ncd"
    assert masks[0] == [False, False, False, False, True, True]  # the BOS is context, not response
    # truncated inside the response: the mask is cut with it; a sample cut before its response is
    # dropped (no token of it would count), and if every one is, the error says why
    seqs, masks = masked([chat("ab", "cdefghijkl"), chat("abcdefghij", "k")], tmp_path, "response", tok=tok,
                         max_length=8, seed=0)
    assert [chars(s[1:]) for s in seqs] == ["ab\ncdef"] and masks == [[0, 0, 0, 0, 1, 1, 1, 1]]
    with pytest.raises(CalibrationDataError, match="no sample has a response token within max_length 8"):
        masked([chat("abcdefghij", "k")], tmp_path, "response", tok=tok, max_length=8)


def test_full_and_prompt_select_every_token_and_equal_the_old_rendering(tmp_path):
    records = [chat("ab?", "cd"), {"text": "plain text"}]
    tok = templated_tokenizer()
    full, full_masks = masked(records, tmp_path, "full", tok=tok, seed=1)
    assert sorted(map(chars, full)) == ["<user>ab?</s><assistant>cd</s>", "plain text"]
    prompt, prompt_masks = masked(records, tmp_path, "prompt", tok=tok, seed=1)
    assert sorted(map(chars, prompt)) == ["<user>ab?</s>", "plain text"]
    assert all(all(m) for m in full_masks + prompt_masks)
    # mode prompt is the deprecated prompts_only: the same tokens
    f = tmp_path / "d.jsonl"
    assert prompt == tokenize_task(CalibrationData(files=[f], prompts_only=True, seed=1), CalibrationSection(), tok)
    assert full == tokenize_task(CalibrationData(files=[f], seed=1), CalibrationSection(), tok)


def test_text_records_in_response_mode_are_an_error(tmp_path):
    with pytest.raises(CalibrationDataError, match=r"d\.jsonl: a text record has no response to select"):
        masked([chat("a", "b"), {"text": "generic"}], tmp_path, "response")


# -- generic text (C4-style) -----------------------------------------------------------------------

def test_c4_style_jsonl_gz_is_generic_text(tmp_path):
    records = [{"text": f"document {i} body", "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{i}"}
               for i in range(5)]
    gz = tmp_path / "c4-train.00000-of-01024.json.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    for fmt in ("auto", "text"):
        samples = read_samples(CalibrationData(files=[gz], format=fmt))
        assert samples == [{"text": r["text"]} for r in records]
    plain = tmp_path / "notes.txt.gz"
    with gzip.open(plain, "wt", encoding="utf-8") as fh:
        fh.write("first\n\nsecond\n")
    assert read_samples(CalibrationData(files=[plain])) == [{"text": "first"}, {"text": "second"}]
    seqs, masks = tokenize_task_masked(CalibrationData(files=[gz], num_samples=0.4), CalibrationSection(),
                                       char_tokenizer())
    assert len(seqs) == 2 and all(chars(s).startswith("document ") for s in seqs) and all(map(all, masks))


# -- num_samples as a fraction ---------------------------------------------------------------------

@pytest.mark.parametrize("num_samples, available, kept", [
    (None, 10, 10), (3, 10, 3), (30, 10, 10), (1, 10, 1), (1.0, 10, 10), (0.5, 10, 5), (0.25, 10, 3),
    (0.24, 10, 2), (0.01, 10, 1), (0.1, 30, 3), (0.7, 10, 7),
])
def test_sample_count(num_samples, available, kept):
    assert sample_count(num_samples, available) == kept


def test_fractions_are_nested_subsets(tmp_path):
    samples = [{"text": str(i)} for i in range(40)]
    shares = [select_samples(samples, x, seed=7) for x in (0.1, 0.25, 0.5, 1.0)]
    assert [len(s) for s in shares] == [4, 10, 20, 40]
    for small, large in zip(shares, shares[1:]):
        assert large[: len(small)] == small
    assert select_samples(samples, 10, seed=7) == shares[1]  # a count and the same share agree


def base_config(tmp_path, calibration=None, source_calibration=None, heldout=None):
    f = jsonl(tmp_path / "c.jsonl", [chat("q", "a")])
    src = {"name": "math", "path": str(tmp_path), "calibration": {"files": [str(f)], **(source_calibration or {})}}
    if heldout is not None:
        src["heldout"] = {"files": [str(f)], **heldout}
    return {"models": {"sources": [src]}, "calibration": calibration or {}}


@pytest.mark.parametrize("where, value, message", [
    ("section", 0, "calibration.num_samples: a number of samples must be >= 1, got 0"),
    ("section", -3, "calibration.num_samples: a number of samples must be >= 1"),
    ("section", 1.5, r"calibration.num_samples: a fraction of the samples must be in \(0, 1\], got 1.5"),
    ("section", 0.0, r"calibration.num_samples: a fraction of the samples must be in \(0, 1\]"),
    ("section", "half", "calibration.num_samples: must be a number of samples"),
    ("section", True, "calibration.num_samples: must be a number of samples"),
    ("source", 2.0, r"models.sources\[0\].calibration.num_samples: a fraction of the samples must be in"),
    ("source", 0, r"models.sources\[0\].calibration.num_samples: a number of samples must be >= 1"),
])
def test_invalid_num_samples_names_the_key(tmp_path, where, value, message):
    kw = {"calibration": {"num_samples": value}} if where == "section" else {
        "source_calibration": {"num_samples": value}}
    with pytest.raises(ConfigError, match=message):
        parse_config(base_config(tmp_path, **kw))


def test_invalid_modes_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"calibration.mode: Input should be 'full', 'prompt' or 'response'"):
        parse_config(base_config(tmp_path, calibration={"mode": "responses"}))
    with pytest.raises(ConfigError, match=r"models.sources\[0\].calibration.mode: Input should be"):
        parse_config(base_config(tmp_path, source_calibration={"mode": "GT"}))
    with pytest.raises(ConfigError, match=r"calibration: prompts_only: true \(deprecated; it means mode: prompt\) "
                                          r"contradicts mode: response"):
        parse_config(base_config(tmp_path, calibration={"mode": "response", "prompts_only": True}))
    with pytest.raises(ConfigError, match=r"models.sources\[0\].calibration: prompts_only: true"):
        parse_config(base_config(tmp_path, source_calibration={"mode": "full", "prompts_only": True}))
    parse_config(base_config(tmp_path, calibration={"mode": "prompt", "prompts_only": True}))  # agree: fine


# -- inheritance, old configs, digests -------------------------------------------------------------

def modes(cfg):
    from harc_hpc.io.calibration_data import effective_settings

    src = cfg.models.sources[0]
    return (effective_settings(src.calibration, cfg.calibration)["mode"],
            effective_settings(src.heldout, cfg.calibration, heldout=True)["mode"])


@pytest.mark.parametrize("calibration, source, heldout, expected", [
    ({}, {}, {}, ("full", "full")),
    ({"mode": "response"}, {}, {}, ("response", "full")),  # held-out data keeps its own mode
    ({"mode": "response"}, {"mode": "prompt"}, {"mode": "response"}, ("prompt", "response")),
    ({"mode": "response"}, {"prompts_only": False}, {}, ("full", "full")),  # an explicit old key wins too
    ({"prompts_only": True}, {}, {}, ("prompt", "prompt")),  # old configs: as before
    ({"prompts_only": True}, {"prompts_only": False}, {}, ("full", "prompt")),
    ({}, {"prompts_only": True}, {"prompts_only": True}, ("prompt", "prompt")),
])
def test_mode_inheritance(tmp_path, calibration, source, heldout, expected):
    cfg = parse_config(base_config(tmp_path, calibration, source, heldout))
    assert modes(cfg) == expected
    # and the same after the run's config snapshot is written and read back
    reloaded = parse_config(__import__("yaml").safe_load(dump_config(cfg)))
    assert modes(reloaded) == expected


def test_configs_without_the_new_keys_keep_their_digests(tmp_path):
    """The planner's config dump and the token store's digest of a config that does not use mode
    are what they were before modes existed (the old dump had no mode key; the old token digest
    hashed these five settings)."""
    for old in ({}, {"prompts_only": True}, {"num_samples": 5}):
        cfg = parse_config(base_config(tmp_path, calibration=dict(old), heldout={}))
        dump = cfg.model_dump(mode="json")
        assert "mode" not in dump["calibration"] and "mode" not in dump["models"]["sources"][0]["calibration"]
        assert set(dump["calibration"]) >= {"num_samples", "max_length", "seed", "prompts_only"}
        data = cfg.models.sources[0].calibration
        h = hashlib.sha256()
        h.update(json.dumps({"num_samples": old.get("num_samples"), "max_length": 512, "seed": 42,
                             "prompts_only": old.get("prompts_only", False), "use_chat_template": True},
                            sort_keys=True).encode())
        h.update(b"auto")
        h.update(b"c.jsonl")
        h.update(Path(data.files[0]).read_bytes())
        assert data_digest(data, cfg.calibration) == h.hexdigest()
    # stating the default mode at the section changes nothing either; other modes change the digest
    plain = parse_config(base_config(tmp_path))
    stated = parse_config(base_config(tmp_path, calibration={"mode": "full"}))
    assert plain.model_dump(mode="json") == stated.model_dump(mode="json")
    response = parse_config(base_config(tmp_path, calibration={"mode": "response"}))
    assert response.model_dump(mode="json")["calibration"]["mode"] == "response"
    digests = {data_digest(c.models.sources[0].calibration, c.calibration) for c in (plain, response)}
    prompt = parse_config(base_config(tmp_path, calibration={"mode": "prompt"}))
    legacy = parse_config(base_config(tmp_path, calibration={"prompts_only": True}))
    assert len(digests) == 2
    assert (data_digest(prompt.models.sources[0].calibration, prompt.calibration)
            == data_digest(legacy.models.sources[0].calibration, legacy.calibration))


def test_shipped_configs_still_load():
    root = Path(__file__).resolve().parent.parent / "configs"
    for path in sorted(root.glob("*.yaml")):
        if path.name.startswith("sweep-"):
            continue  # sweep configs: tests/test_sweep.py
        cfg = load_config(path)
        assert "mode" not in cfg.model_dump(mode="json")["calibration"], path


# -- capture and held-out loss on selected tokens ----------------------------------------------------

TASKS = ("math", "code")


@pytest.fixture(scope="module")
def chat_sources(tmp_path_factory):
    """Tiny 2-layer OLMoE sources whose calibration and held-out data are chat records."""
    import random

    from pipeline_fixtures import build_tiny_sources

    src = build_tiny_sources(tmp_path_factory.mktemp("src"), layers=2, tasks=TASKS)
    for t_i, task in enumerate(TASKS):
        for split, n in (("calib", 10), ("heldout", 5)):
            rng = random.Random(f"{task}-{split}")
            records = []
            for _ in range(n):
                a, b = rng.randint(1, 99), rng.randint(1, 99)
                turns = [f"what is {a}+{b}?", f"{a}+{b}={a + b}"] if task == "math" else \
                    [f"square {a}", f"def f(x):\n    return x * x  # {a * a}"]
                if rng.random() < 0.4:
                    turns += ["and again?", turns[1][::-1]]
                records.append(chat(*turns))
            jsonl(Path(src["data"]) / f"{task}-{split}.jsonl", records)
    return src


def chat_config(root, sources, mode, block_size, source_modes=None):
    import yaml

    from pipeline_fixtures import write_config

    extra = {"calibration.max_length": 40}
    if mode is not None:
        extra["calibration.mode"] = mode
    path = write_config(root, sources, name=f"run-{mode}-{block_size}", block_size=block_size, tasks=TASKS,
                        extra=extra)
    raw = yaml.safe_load(path.read_text())
    for src in raw["models"]["sources"]:
        if src["name"] in (source_modes or {}):
            src["calibration"]["mode"] = source_modes[src["name"]]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(path)


def stored_inputs(cfg, layer, task):
    from harc_hpc.stages.compute_statistics import layer_inputs

    # the one reader of router inputs: with block size 1 derived from the stored residual
    return layer_inputs(cfg, cfg.run_dir, layer, task, stored_dtype=True)


def test_response_capture_is_the_full_capture_at_the_response_tokens(chat_sources, tmp_path):
    """One block of both layers, captured from the same merged model in mode full and in mode
    response: the response store is the full store's rows at the selected tokens, bit for bit. A
    source that states mode full in the response run is captured whole, as in the full run."""
    from harc_hpc.io.activations import TokenStore
    from harc_hpc.stages import capture_activations, layout, merge_experts

    cfgs = {None: chat_config(tmp_path, chat_sources, None, block_size=2),
            "response": chat_config(tmp_path, chat_sources, "response", block_size=2,
                                    source_modes={"code": "full"})}
    for cfg in cfgs.values():
        merge_experts.run(cfg, cfg.run_dir)
        capture_activations.run(cfg, cfg.run_dir, block=0)
    full, resp = cfgs[None], cfgs["response"]
    code = TokenStore(layout.token_store(resp.run_dir, "code"))
    assert code.selected is None
    for layer in layout.moe_layers(full):
        assert torch.equal(stored_inputs(resp, layer, "code").load(), stored_inputs(full, layer, "code").load())
    for task in ("math",):
        all_tokens, chosen = (TokenStore(layout.token_store(c.run_dir, task)) for c in (full, resp))
        assert all_tokens.selected is None and chosen.selected is not None
        # the same sequences are fed in both modes; fewer tokens are selected in mode response
        assert all_tokens.ids.tolist() == chosen.ids.tolist()
        assert 0 < chosen.num_selected < chosen.num_tokens
        mask = torch.from_numpy(chosen.selected)
        for layer in layout.moe_layers(full):
            x_full, x_resp = stored_inputs(full, layer, task), stored_inputs(resp, layer, task)
            assert x_resp.offsets.tolist() == chosen.selected_offsets.tolist()
            assert torch.equal(x_resp.load(), x_full.load()[mask]), (task, layer)


def test_response_mode_pipeline_uses_exactly_the_response_router_inputs(chat_sources, tmp_path):
    """The whole pipeline in mode response, one layer per block: each layer's stored router inputs
    equal a whole-model forward (routers of earlier layers calibrated) indexed by the mask, bit for
    bit; the statistics count exactly the selected tokens."""
    from harc_hpc.io.calibration_data import tokenize_task_masked
    from harc_hpc.io.statistics import load_statistics
    from harc_hpc.models.modeling import RouterInputRecorder, batches, load_causal_lm, pad_batch, unpad
    from harc_hpc.stages import layout
    from harc_hpc.stages.routers import load_router
    from pipeline_fixtures import run_pipeline
    from transformers import AutoTokenizer

    cfg = chat_config(tmp_path, chat_sources, "response", block_size=1)
    run_pipeline(cfg, cfg.run_dir)
    merged = layout.merged_dir(cfg.run_dir)
    tok = AutoTokenizer.from_pretrained(str(merged))
    model = load_causal_lm(merged, torch.device("cpu"))
    fam = layout.family(cfg)
    for layer in layout.moe_layers(cfg):
        for task in TASKS:
            seqs, masks = tokenize_task_masked(cfg.calibration_for(task), cfg.calibration, tok)
            parts = []
            with RouterInputRecorder({layer: fam.router_module(model, layer)}) as rec, torch.no_grad():
                for idx in batches(len(seqs), cfg.calibration.batch_size):
                    ids, lengths = pad_batch([torch.tensor(seqs[i]) for i in idx])
                    model(input_ids=ids)
                    parts.append(unpad(rec.pop(layer).reshape(ids.shape[0], ids.shape[1], -1), lengths))
            mask = torch.tensor([b for m in masks for b in m])
            expected = torch.cat(parts)[mask]
            assert torch.equal(stored_inputs(cfg, layer, task).load(), expected), (layer, task)
            stats = load_statistics(layout.statistics_file(cfg.run_dir, layer, task))
            assert stats.num_tokens == int(mask.sum())
        with torch.no_grad():  # the next layer's inputs come through this layer's calibrated router
            fam.router_module(model, layer).weight.copy_(load_router(cfg.run_dir, layer))

    # The report: held-out data keeps its own mode (full here, though calibration.mode is response)
    # unless it states one; then the loss counts the selected predictions only.
    from harc_hpc.report import metrics
    from harc_hpc.report.render import write_markdown

    math_src = next(s for s in cfg.models.sources if s.name == "math")
    math_src.heldout.mode = "response"
    cfg.models.base = None  # one checkpoint fewer to evaluate
    m = metrics.model_metrics(cfg, cfg.run_dir)
    assert m["heldout_mode"] == {"math": "response", "code": "full"}
    held = {t: tokenize_task_masked(s.heldout, cfg.calibration, tok, heldout=True) for t, s in
            ((s.name, s) for s in cfg.models.sources)}
    assert m["heldout_tokens"] == {"math": sum(sum(k[1:]) for k in held["math"][1]),
                                   "code": sum(len(q) - 1 for q in held["code"][0])}
    assert not all(map(all, held["math"][1])) and all(map(all, held["code"][1]))
    ev = metrics.evaluate_checkpoint(layout.model_dir(cfg.run_dir), list(layout.moe_layers(cfg)),
                                     [metrics.Evaluation(held["math"][0], masks=held["math"][1])], 4,
                                     torch.device("cpu"))
    assert m["loss"]["math"]["calibrated"] == ev.results[0].loss
    write_markdown(m, tmp_path / "report.md", [])
    assert f"| math | {m['heldout_tokens']['math']} (response) |" in (tmp_path / "report.md").read_text()


def test_heldout_loss_counts_the_selected_predictions(chat_sources):
    """evaluate_checkpoint with masks: the NLL of the predictions of selected tokens only, equal to
    a whole-model forward's per-token losses summed over the mask; routing rows of selected tokens."""
    from harc_hpc.models.families import family_for_config
    from harc_hpc.models.modeling import pad_batch
    from harc_hpc.report import metrics
    from transformers import AutoModelForCausalLM

    path = chat_sources["math"]
    data = CalibrationData(files=[Path(chat_sources["data"]) / "math-heldout.jsonl"], mode="response", max_length=40)
    seqs, masks = tokenize_task_masked(data, CalibrationSection(), char_tokenizer(), heldout=True)
    conf = json.loads((path / "config.json").read_text())
    fam = family_for_config(conf)
    layers = list(fam.moe_layers(conf))
    got = metrics.evaluate_checkpoint(path, layers, [metrics.Evaluation(seqs, masks=masks, keep_routing=True),
                                                     metrics.Evaluation(seqs)], 2, torch.device("cpu"))
    masked_eval, plain_eval = got.results.values()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    nll = torch.zeros((), dtype=torch.float64)
    all_nll, count, rows = 0.0, 0, {l: [] for l in layers}
    hooks = [fam.router_module(model, l).register_forward_hook(
        lambda m, i, o, l=l: rows[l].append(i[0].reshape(-1, i[0].shape[-1]))) for l in layers]
    with torch.no_grad():
        for start in range(0, len(seqs), 2):
            ids, lengths = pad_batch([torch.tensor(s) for s in seqs[start:start + 2]])
            logits = model(input_ids=ids).logits
            keep = torch.zeros(ids.shape, dtype=torch.bool)
            for b, n in enumerate(lengths):
                per_token = torch.nn.functional.cross_entropy(logits[b, : n - 1], ids[b, 1:n], reduction="none")
                m = torch.tensor(masks[start + b][1:n])
                nll += per_token[m].double().sum()
                count += int(m.sum())
                all_nll += float(per_token.sum())
                keep[b, :n] = torch.tensor(masks[start + b])
            for l in layers:
                rows[l][-1] = rows[l][-1][keep.reshape(-1)]
    for h in hooks:
        h.remove()
    assert masked_eval.tokens == count == sum(sum(m[1:]) for m in masks) > 0
    assert plain_eval.tokens == sum(len(s) - 1 for s in seqs) > count
    assert masked_eval.loss == pytest.approx(float(nll) / count, rel=1e-6)
    assert plain_eval.loss == pytest.approx(all_nll / plain_eval.tokens, rel=1e-6)
    assert masked_eval.loss != pytest.approx(plain_eval.loss, rel=1e-3)
    for l in layers:
        x = torch.cat(rows[l])
        assert torch.allclose(masked_eval.own_logits[l], metrics.affine_logits(x, got.routers[l]), atol=1e-6)


def test_plan_estimate_takes_fractions_and_gzip(tmp_path):
    from harc_hpc.stages.estimate import _samples_bound, tokens_per_task

    line = json.dumps({"text": "x" * 27}) + "\n"  # 40 bytes: 10 tokens at ~4 bytes a token
    assert len(line) == 40
    (tmp_path / "c.jsonl").write_text(line * 10)
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as fh:
        fh.write(line * 10)
    for name in ("c.jsonl", "c.jsonl.gz"):
        for num_samples, tokens in ((None, 100), (4, 40), (0.5, 50), (0.25, 30)):
            cfg = parse_config({"models": {"sources": [{"name": "a", "path": str(tmp_path), "calibration": {
                "files": [str(tmp_path / name)], "num_samples": num_samples}}]}})
            assert tokens_per_task(cfg, None) == {"a": (tokens, "file sizes")}, (name, num_samples)
    assert (_samples_bound(None), _samples_bound(7), _samples_bound(0.1), _samples_bound(1.0)) == (1000, 7, 100, 1000)


def test_plan_digests_follow_the_mode(tmp_path):
    """Changing the mode reruns the capture and everything after it, not the merge; stating the
    default changes no digest; a held-out mode reruns only the report."""
    from harc_hpc.pipeline.planner import build_plan

    def digests(**kw):
        cfg = parse_config(base_config(tmp_path, **{"heldout": {}, **kw}))
        cfg.report.enabled = True
        return {t.id: t.digest for t in build_plan(cfg, layers=[0, 1]).tasks.values()}

    plain, stated = digests(), digests(calibration={"mode": "full"})
    response, per_source = digests(calibration={"mode": "response"}), digests(source_calibration={"mode": "response"})
    scored = digests(heldout={"mode": "response"})
    assert plain == stated
    for other in (response, per_source):
        assert other["merge-experts/all"] == plain["merge-experts/all"]
        downstream = [t for t in plain if t.split("/")[0] in ("capture-activations", "compute-statistics",
                                                                  "solve-router", "assemble-model", "report")]
        assert len(downstream) == 2 + 2 + 2 + 1 + 1 and all(other[t] != plain[t] for t in downstream)
    assert [t for t in plain if scored[t] != plain[t]] == ["report/all"]
