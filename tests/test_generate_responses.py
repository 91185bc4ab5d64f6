"""generate-responses: on-policy calibration data (SrcCrt / SrcAll) and how answers are verified."""

from __future__ import annotations

import json

import pytest
import torch

from harc_hpc.config import CalibrationData, CalibrationSection
from harc_hpc.errors import UsageError
from harc_hpc.io.calibration_data import read_samples, tokenize_task_masked
from harc_hpc.stages import generate_responses as gen
from pipeline_fixtures import char_tokenizer, tiny_config


@pytest.mark.parametrize("response, reference, ok", [
    ("so the answer is \\boxed{42}.", "42", True),
    ("\\boxed{41} no wait \\boxed{42}", 42, True),  # the last boxed value
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", False),  # not a number: compared as text
    ("\\boxed{a{b}}", "a{b}", True),  # braces balanced
    ("the total is 1,234.0 dollars.", 1234, True),
    ("x = $-3$", "-3", True),
    ("first 7, then 8", "7", False),  # the last number counts
    ("0.3333333333", "0.33333333", True),  # 1e-6 relative
    ("0.334", "0.333", False),
    ("no number at all", "1", False),
])
def test_math_verification(response, reference, ok):
    assert gen.math_correct(response, reference) is ok


def test_code_verification():
    square = "Here:\n```python\ndef sq(x):\n    return x * x\n```\nDone."
    assert gen.extract_code(square) == "def sq(x):\n    return x * x\n"
    assert gen.extract_code("def sq(x): return x*x") == "def sq(x): return x*x"
    assert gen.code_correct(square, "assert sq(3) == 9")
    assert not gen.code_correct(square, "assert sq(3) == 10")
    assert not gen.code_correct("```\nwhile True:\n    pass\n```", "pass", timeout_s=1.0)  # the time limit
    assert not gen.code_correct("import sys; sys.exit(3)", "")
    # a fresh interpreter in an empty directory, without this process's environment
    assert gen.code_correct("import os", "assert os.listdir('.') == ['check.py'] and 'HOME' not in os.environ")


def prompts_file(tmp_path, records):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_run_keeps_the_verified_answers(tmp_path):
    f = prompts_file(tmp_path, [
        {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2 (reference)"}],
         "answer": "2"},
        {"conversations": [{"from": "human", "value": "2+2?"}], "answer": 4},
        {"messages": [{"role": "user", "content": "3+3?"}], "answer": "6"},
    ])
    seen = []

    def answer(convs):  # a stand-in model: right, wrong, right
        seen.extend(convs)
        return ["it is \\boxed{2}", "5", "6"]

    result = gen.run(f, "math", tmp_path / "crt.jsonl", tmp_path / "all.jsonl", answer)
    assert result == {"prompts": 3, "correct": 2}
    # the reference turn is dropped before generating; ShareGPT records are read too
    assert seen == [[{"role": "user", "content": "1+1?"}], [{"role": "user", "content": "2+2?"}],
                    [{"role": "user", "content": "3+3?"}]]
    every = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in every] == [True, False, True]
    kept = [json.loads(line) for line in (tmp_path / "crt.jsonl").read_text().splitlines()]
    assert kept == [every[0], every[2]]
    assert kept[1]["messages"] == [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    # the output is calibration data: in mode response the generated answers are what is selected
    seqs, masks = tokenize_task_masked(CalibrationData(files=[tmp_path / "crt.jsonl"], mode="response", seed=0),
                                       CalibrationSection(), char_tokenizer())
    picked = sorted("".join(chr(t) for t, m in zip(s, mk) if m) for s, mk in zip(seqs, masks))
    assert picked == ["6", "it is \\boxed{2}"]
    assert len(read_samples(CalibrationData(files=[tmp_path / "all.jsonl"]))) == 3


def test_bad_input_is_named(tmp_path):
    f = prompts_file(tmp_path, [{"messages": [{"role": "user", "content": "q"}], "answer": "1"},
                                {"messages": [{"role": "user", "content": "q2"}]}])
    with pytest.raises(gen.GenerationInputError, match=r"prompts.jsonl:2: --verify math needs a 'answer' field"):
        gen.run(f, "math", tmp_path / "o.jsonl", None, lambda c: ["1"] * len(c))
    with pytest.raises(gen.GenerationInputError, match=r"prompts.jsonl:1: --verify code needs a 'tests' field"):
        gen.run(f, "code", tmp_path / "o.jsonl", None, lambda c: ["1"] * len(c))
    with pytest.raises(UsageError, match="--out keeps verified answers: it needs --verify math or code"):
        gen.run(f, "none", tmp_path / "o.jsonl", None, lambda c: ["1"] * len(c))
    t = prompts_file(tmp_path, [{"text": "not a prompt"}])
    with pytest.raises(gen.GenerationInputError, match=r"prompts.jsonl:1: a prompt record needs 'messages'"):
        gen.run(t, "none", None, tmp_path / "a.jsonl", lambda c: ["1"] * len(c))
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "a.jsonl").exists()


def test_greedy_answers_of_a_tiny_model(tmp_path):
    """generate_answers equals greedy decoding by hand (a full forward per new token, argmax)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("olmoe", layers=2)).eval()
    model.save_pretrained(tmp_path / "m")
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok.save_pretrained(tmp_path / "m")
    prompts = [[{"role": "user", "content": "abc"}], [{"role": "user", "content": "xyz"}],
               [{"role": "user", "content": "hello"}]]
    new = 6
    got = gen.generate_answers(str(tmp_path / "m"), prompts, max_new_tokens=new, batch_size=1, device="cpu")
    for conv, text in zip(prompts, got):
        ids = [ord(c) for c in tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)]
        out = []
        with torch.no_grad():
            for _ in range(new):
                logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
                out.append(int(logits.argmax()))
        assert text == tok.decode(out, skip_special_tokens=True)
    # batches of prompts of one length (no padding) give the same answers
    same = gen.generate_answers(str(tmp_path / "m"), prompts[:2], max_new_tokens=new, batch_size=2, device="cpu")
    assert same == got[:2]
    # prompts of different lengths are left-padded in a batch
    padded = gen.generate_answers(str(tmp_path / "m"), prompts, max_new_tokens=new, batch_size=3, device="cpu")
    assert len(padded) == 3 and all(isinstance(a, str) for a in padded)

    # the command: every answer of the model, in input order
    from click.testing import CliRunner

    from harc_hpc.cli import main

    f = prompts_file(tmp_path, [{"messages": c} for c in prompts])
    res = CliRunner().invoke(main, ["generate-responses", str(tmp_path / "m"), str(f), "--verify", "none",
                                    "--all-out", str(tmp_path / "all.jsonl"), "--max-new-tokens", str(new),
                                    "--batch-size", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "3 prompts answered" in res.output
    every = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert [r["messages"][-1]["content"] for r in every] == got and all(r["correct"] is None for r in every)
