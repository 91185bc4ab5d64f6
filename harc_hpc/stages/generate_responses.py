"""generate-responses: on-policy calibration data (the paper's SrcCrt and SrcAll, Fig. 3c).

Each prompt is answered by the source model itself (greedy decoding, so the same model and prompts
give the same answers), and every answer is checked against the prompt record's reference:

* ``--verify math``: the record's ``answer`` against the answer's final value: the content of its
  last ``\\boxed{...}``, else its last number. Both are normalised (spaces, ``$``, thousands commas
  and a trailing period dropped); numbers are equal when they agree to 1e-6 relative, anything else
  (``\\frac{1}{2}``, ``x=3``) when the normalised texts are equal.
* ``--verify code``: the record's ``tests`` (Python, e.g. asserts) run after the answer's code (its
  first fenced code block, else the whole answer) in a fresh ``python -I`` process in an empty
  temporary directory, with a time limit and a memory limit; it passes when the process exits 0.
  That is isolation from this process, not a sandbox: run it where executing model-written code is
  acceptable.
* ``--verify none``: every answer is kept (SrcAll only).

Input: JSONL chat records whose messages end with the prompt (``{"messages": [{"role": "user",
"content": ...}], "answer": "42"}``; ShareGPT ``conversations`` too; an assistant turn at the end is
the reference and is dropped before generating). Output: the same conversations with the generated
assistant turn appended, ``correct`` set, in input order; ``--out`` gets the verified ones (SrcCrt),
``--all-out`` every one (SrcAll). Point ``models.sources[*].calibration.files`` at them: their bytes
are in the capture's digest, so new answers recapture.

This is a data-preparation command run once per source (it loads the source whole, with
``device_map=auto`` over the node's GPUs when asked), not a task of the pipeline's DAG.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import click

from harc_hpc.errors import InputDataError, UsageError

log = logging.getLogger(__name__)

VERIFIERS = ("math", "code", "none")


class GenerationInputError(InputDataError):
    """A prompts file or record generate-responses cannot use (the message names the file and line)."""


# -- verification ---------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def final_answer(text: str) -> Optional[str]:
    """A math answer's final value: its last ``\\boxed{}``, else its last number (None: neither)."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _normalise(value: str) -> str:
    value = value.strip().strip("$").strip().rstrip(".").replace(" ", "")
    return value.replace(",", "") if re.fullmatch(r"-?[\d,]+(\.\d+)?", value) else value


def math_correct(response: str, reference) -> bool:
    """Whether the response's final value equals the reference (numbers to 1e-6 relative)."""
    got = final_answer(response)
    if got is None:
        return False
    got, want = _normalise(got), _normalise(str(reference))
    try:
        a, b = float(got), float(want)
    except ValueError:
        return got == want
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


_FENCE = re.compile(r"```[ \t]*[\w+-]*[ \t]*\n(.*?)```", re.S)


def extract_code(response: str) -> str:
    """The first fenced code block of the response, else the whole response."""
    m = _FENCE.search(response)
    return m.group(1) if m else response


def _limit_resources(memory_bytes: int, seconds: int):
    def apply():  # runs in the child before exec
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds))
        os.setsid()

    return apply


def code_correct(response: str, tests: str, timeout_s: float = 10.0, memory_bytes: int = 2 << 30) -> bool:
    """Whether the response's code passes ``tests``: both run in a fresh ``python -I`` in an empty
    temporary directory, under a wall-clock and CPU time limit and an address-space limit."""
    program = extract_code(response) + "\n\n" + tests + "\n"
    with tempfile.TemporaryDirectory(prefix="harc-verify-") as tmp:
        script = Path(tmp) / "check.py"
        script.write_text(program)
        try:
            res = subprocess.run([sys.executable, "-I", str(script)], cwd=tmp, capture_output=True, timeout=timeout_s,
                                 stdin=subprocess.DEVNULL, env={"PATH": os.environ.get("PATH", "")},
                                 preexec_fn=_limit_resources(memory_bytes, int(math.ceil(timeout_s))))
        except subprocess.TimeoutExpired:
            return False
    return res.returncode == 0


# -- prompts and generation -----------------------------------------------------------------------

def read_prompts(path: Path, verify: str) -> list[dict]:
    """Prompt records: ``messages`` ending with the prompt (a trailing assistant turn, the reference,
    is dropped) and what ``verify`` needs (``answer`` for math, ``tests`` for code)."""
    from harc_hpc.io.calibration_data import CalibrationDataError, chat_messages, jsonl_records

    need = {"math": "answer", "code": "tests"}.get(verify)
    records = []
    try:
        for where, rec in jsonl_records(Path(path)):
            if "messages" not in rec and "conversations" not in rec:
                raise GenerationInputError(f"{where}: a prompt record needs 'messages' (or 'conversations')")
            msgs = list(chat_messages(rec, where))
            while msgs and msgs[-1].get("role") == "assistant":
                msgs.pop()
            if not msgs:
                raise GenerationInputError(f"{where}: no prompt (the record holds only assistant turns)")
            if need is not None and need not in rec:
                raise GenerationInputError(f"{where}: --verify {verify} needs a {need!r} field in every record")
            records.append({"messages": msgs, **({need: rec[need]} if need else {})})
    except CalibrationDataError as exc:
        raise GenerationInputError(str(exc)) from None
    if not records:
        raise GenerationInputError(f"{path}: no prompt records")
    return records


def generate_answers(model_path: str, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int,
                     device: str = "auto", use_chat_template: bool = True, trust_remote_code: bool = False,
                     device_map: Optional[str] = None) -> list[str]:
    """Greedy answers of the model at ``model_path`` to each prompt conversation, in order.

    Prompts are rendered with the chat template and its generation prompt (without one: the
    contents joined by newlines, and a newline), left-padded in batches of ``batch_size``; an answer
    ends at the tokenizer's end-of-sequence token or after ``max_new_tokens``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harc_hpc.models.modeling import load_causal_lm, pick_device

    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    if device_map:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto", device_map=device_map,
                                                     trust_remote_code=trust_remote_code).eval()
        first = next(model.parameters()).device
    else:
        first = pick_device(device, "--device")
        model = load_causal_lm(model_path, first, trust_remote_code=trust_remote_code)
    templated = use_chat_template and getattr(tok, "chat_template", None)
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if templated
             else "\n".join(str(m["content"]) for m in p) + "\n" for p in prompts]
    answers = []
    for start in range(0, len(texts), batch_size):
        # Left padding by hand: many LLM tokenizers have no pad token to pad with.
        rows = [tok(t, add_special_tokens=not templated)["input_ids"] for t in texts[start : start + batch_size]]
        width = max(map(len, rows))
        ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], device=first)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=first)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad_id)
        for row in out[:, width:]:
            generated = row.tolist()
            if tok.eos_token_id is not None and tok.eos_token_id in generated:
                generated = generated[: generated.index(tok.eos_token_id)]
            answers.append(tok.decode(generated, skip_special_tokens=True))
        log.info("generate-responses: %d/%d prompts answered", len(answers), len(texts))
    return answers


def write_jsonl(path: Path, records: list[dict]) -> None:
    from harc_hpc.io.atomic import atomic_path

    with atomic_path(Path(path)) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def run(prompts_file: Path, verify: str, out: Optional[Path], all_out: Optional[Path],
        answer: Callable[[list[list[dict]]], list[str]], timeout_s: float = 10.0) -> dict:
    """Answer every prompt with ``answer`` (a model's ``generate_answers``), check each answer with
    ``verify`` and write the verified ones to ``out`` and all of them to ``all_out``."""
    if verify not in VERIFIERS:
        raise UsageError(f"--verify: one of {', '.join(VERIFIERS)}, got {verify!r}")
    if out is None and all_out is None:
        raise UsageError("give --out (verified answers, SrcCrt) and/or --all-out (every answer, SrcAll)")
    if out is not None and verify == "none":
        raise UsageError("--out keeps verified answers: it needs --verify math or code (every answer: --all-out)")
    records = read_prompts(Path(prompts_file), verify)
    answers = answer([r["messages"] for r in records])
    if len(answers) != len(records):
        raise RuntimeError(f"generate-responses: {len(answers)} answers for {len(records)} prompts")
    results = []
    for rec, text in zip(records, answers):
        if verify == "math":
            ok = math_correct(text, rec["answer"])
        elif verify == "code":
            ok = code_correct(text, rec["tests"], timeout_s=timeout_s)
        else:
            ok = None
        results.append({"messages": rec["messages"] + [{"role": "assistant", "content": text}], "correct": ok})
    kept = [r for r in results if r["correct"]]
    if out is not None:
        write_jsonl(out, kept)
    if all_out is not None:
        write_jsonl(all_out, results)
    return {"prompts": len(records), "correct": len(kept) if verify != "none" else None}


@click.command("generate-responses")
@click.argument("model")
@click.argument("prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--verify", type=click.Choice(VERIFIERS), required=True,
              help="math: compare the final value with the record's 'answer'; code: run the record's 'tests' "
                   "after the answer's code; none: keep every answer")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSONL of the verified answers (SrcCrt)")
@click.option("--all-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSONL of every answer, with 'correct' (SrcAll)")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto")
@click.option("--device-map", default=None, help="e.g. auto: spread a model larger than one GPU over the node's")
@click.option("--no-chat-template", is_flag=True, help="join the prompt's contents by newlines instead")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="seconds one code check may run")
@click.option("--trust-remote-code", is_flag=True)
def generate_responses_command(model, prompts, verify, out, all_out, max_new_tokens, batch_size, device, device_map,
                               no_chat_template, timeout_s, trust_remote_code) -> None:
    """Answer PROMPTS (JSONL chat records) with MODEL, greedily; keep the verified answers
    (on-policy calibration data, the paper's SrcCrt; every answer with --all-out: SrcAll)."""
    from harc_hpc.io.checkpoint import resolve_model_path

    path = str(resolve_model_path(model))

    def answer(convs):
        return generate_answers(path, convs, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device,
                                use_chat_template=not no_chat_template, trust_remote_code=trust_remote_code,
                                device_map=device_map)

    result = run(prompts, verify, out, all_out, answer, timeout_s=timeout_s)
    kept = "" if result["correct"] is None else f", {result['correct']} verified correct"
    click.echo(f"{result['prompts']} prompts answered{kept}")
