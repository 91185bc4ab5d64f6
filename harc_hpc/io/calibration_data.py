"""Calibration text: read task data files and tokenise them into sequences.

Formats: JSONL with chat records (``{"messages": [{"role", "content"}, ...]}``, also ShareGPT-style
``conversations`` with ``from``/``value``), JSONL with ``{"text": ...}`` records (generic text such
as C4; other fields of a record are ignored), or plain text files where blank-line separated
paragraphs are samples. A file whose name ends in ``.gz`` is read through gzip (C4's
``c4-train.00000-of-01024.json.gz`` as it is distributed).

Every token of a tokenised sample is fed to the model; the calibration mode says which of them are
*selected*, i.e. enter the statistics (router inputs) and the held-out loss (``tokenize_task_masked``):

* ``full``: the whole sample is fed, every token is selected.
* ``prompt``: only the non-assistant messages are fed (the assistant turns are dropped before
  rendering), every token is selected. Text records are fed whole.
* ``response``: the whole conversation is fed, only the tokens of the assistant turns are selected
  (with a chat template: the characters the template renders for the turn after the generation
  prompt, i.e. the content and the end-of-turn marker; without one: the content). A token is
  selected when its character span overlaps an assistant turn's. Text records have no response and
  are an error in this mode.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import random
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from harc_hpc.errors import InputDataError
from harc_hpc.config import CalibrationData, CalibrationSection


class CalibrationDataError(InputDataError):
    pass


_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def chat_messages(record: dict, where: str) -> list[dict]:
    """A chat record's messages as ``[{"role", "content"}, ...]`` (ShareGPT ``conversations`` mapped)."""
    if "messages" in record:
        msgs = record["messages"]
    else:
        msgs = [
            {"role": _ROLE_ALIASES.get(m.get("from", ""), m.get("from", "user")), "content": m.get("value", "")}
            for m in record["conversations"]
        ]
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and "content" in m for m in msgs):
        raise CalibrationDataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    return msgs


def _open_text(path: Path):
    """A data file opened for reading text (through gzip when its name ends in ``.gz``)."""
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    """``("file:line", record)`` for every non-empty line of a JSONL file (gzip'd or not)."""
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationDataError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise CalibrationDataError(f"{where}: a record must be a JSON object")
            yield where, rec


def read_samples(data: CalibrationData) -> list[dict]:
    """All records of a task's files, in file order, as ``{"text": ...}`` or ``{"messages": [...]}``."""
    if not data.files:
        raise CalibrationDataError("calibration: no files given")
    out: list[dict] = []
    for path in data.files:
        path = Path(path)
        if not path.is_file():
            raise CalibrationDataError(f"{path}: calibration file not found")
        fmt = data.format
        if fmt == "auto":
            suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
            fmt = "plain" if suffix in (".txt", ".md") else "jsonl"
        if fmt == "plain":
            with _open_text(path) as fh:
                paragraphs = [p.strip() for p in fh.read().split("\n\n")]
            out.extend({"text": p} for p in paragraphs if p)
            continue
        for where, rec in jsonl_records(path):
            if "messages" in rec or "conversations" in rec:
                if fmt == "text":
                    raise CalibrationDataError(f"{where}: chat record in a file declared format 'text'")
                out.append({"messages": chat_messages(rec, where)})
            elif "text" in rec:
                if fmt == "chat":
                    raise CalibrationDataError(f"{where}: text record in a file declared format 'chat'")
                if not isinstance(rec["text"], str):
                    raise CalibrationDataError(f"{where}: 'text' must be a string")
                out.append({"text": rec["text"]})
            else:
                raise CalibrationDataError(f"{where}: record has neither 'messages' nor 'text'")
    if not out:
        raise CalibrationDataError(f"{', '.join(map(str, data.files))}: no samples found")
    return out


def sample_count(num_samples: Union[int, float, None], available: int) -> int:
    """How many samples ``num_samples`` keeps of ``available``: an integer is a count (capped at what
    there is), a float in (0, 1] a share, rounded to the nearest count (halves up) and at least 1."""
    if num_samples is None:
        return available
    if isinstance(num_samples, float):
        return min(available, max(1, math.floor(num_samples * available + 0.5)))
    return min(available, int(num_samples))


def select_samples(samples: list[dict], num_samples: Union[int, float, None], seed: int) -> list[dict]:
    """The first ``num_samples`` (a count or a share, ``sample_count``) of the samples shuffled with
    ``seed``: for one seed a smaller share is a subset of a larger one."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    order = order[:sample_count(num_samples, len(samples))]
    return [samples[i] for i in order]


def render_sample(sample: dict, tokenizer, prompts_only: bool, use_chat_template: bool) -> str:
    if "text" in sample:
        return sample["text"]
    msgs = sample["messages"]
    if prompts_only:
        msgs = [m for m in msgs if m.get("role") != "assistant"]
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    return "\n".join(str(m["content"]) for m in msgs)


def render_with_responses(messages: list[dict], tokenizer,
                          use_chat_template: bool) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation as ``render_sample`` renders it, and the character spans [start, end)
    of its assistant turns.

    With a chat template, turn k's span runs from the end of the conversation up to k rendered with
    the generation prompt to the end of the conversation up to and including k: what a model
    generating turn k would emit (content and end-of-turn marker). A template whose renderings are
    not prefixes of each other (one that rewrites earlier turns, e.g. drops their reasoning) gets the
    turn's content found in the text instead, searching forward from the previous turn.
    """
    if not (use_chat_template and getattr(tokenizer, "chat_template", None)):
        spans, pos = [], 0
        for i, m in enumerate(messages):
            content = str(m["content"])
            if i:
                pos += 1  # the joining newline
            if m.get("role") == "assistant":
                spans.append((pos, pos + len(content)))
            pos += len(content)
        return "\n".join(str(m["content"]) for m in messages), spans

    def render(msgs, generation_prompt):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages, False)
    spans, cursor = [], 0
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        span = None
        try:
            before, through = render(messages[:k], True) if k else "", render(messages[: k + 1], False)
            if k and through.startswith(before) and full.startswith(through) and len(before) >= cursor:
                span = (len(before), len(through))
        except Exception:  # noqa: BLE001 - a template that cannot render a prefix: search instead
            span = None
        if span is None:
            content = str(m["content"]).strip()
            if not content:  # an empty turn: nothing of it to find or select
                continue
            at = full.find(content, cursor)
            if at < 0:
                raise CalibrationDataError(
                    f"an assistant turn ({content[:40]!r}...) is not found in the chat template's rendering "
                    "of its conversation, so its tokens cannot be selected (calibration mode 'response')")
            span = (at, at + len(content))
        spans.append(span)
        cursor = span[1]
    return full, spans


def tokenize_sample(sample: dict, tokenizer, mode: str, use_chat_template: bool,
                    max_length: int) -> tuple[list[int], list[bool]]:
    """One sample's token ids (truncated to ``max_length``) and which of them are selected."""
    if mode != "response":
        text = render_sample(sample, tokenizer, mode == "prompt", use_chat_template)
        ids = list(tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"])
        return ids, [True] * len(ids)
    if "text" in sample:
        raise CalibrationDataError(
            "a text record has no response to select (calibration mode 'response' needs chat records with "
            "assistant turns; generic text is calibrated with mode 'full')")
    text, spans = render_with_responses(sample["messages"], tokenizer, use_chat_template)
    if not getattr(tokenizer, "is_fast", False):
        raise CalibrationDataError(
            f"calibration mode 'response' needs a fast tokenizer (character offsets of tokens); "
            f"{type(tokenizer).__name__} is not one")
    enc = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length,
                    return_offsets_mapping=True)
    mask = [any(a < end and start < b for start, end in spans) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def _stated_mode(data) -> Optional[str]:
    """The mode a calibration entry states: ``mode``, else the deprecated ``prompts_only`` if set."""
    if data.mode is not None:
        return data.mode
    if "prompts_only" in data.model_fields_set:
        return "prompt" if data.prompts_only else "full"
    return None


def effective_settings(data: CalibrationData, defaults: CalibrationSection, heldout: bool = False) -> dict:
    """Per-task settings: explicitly set fields of the task win over the calibration section.

    The mode: the task's own, else the section's (its ``mode``, or ``prompts_only`` from older
    configs), else ``full``. Held-out data (``heldout``) does not inherit the section's ``mode``, so
    that runs calibrated in different modes are scored on the same tokens; it does inherit the
    deprecated ``prompts_only``, as it always has.
    """
    explicit = data.model_fields_set
    pick = lambda name: getattr(data, name) if name in explicit else getattr(defaults, name)  # noqa: E731
    mode = _stated_mode(data)
    if mode is None:
        mode = "prompt" if defaults.prompts_only else ("full" if heldout else defaults.mode or "full")
    return {
        "num_samples": pick("num_samples"),
        "max_length": pick("max_length"),
        "seed": pick("seed"),
        "prompts_only": mode == "prompt",
        "mode": mode,
        "use_chat_template": data.use_chat_template,
    }


def tokenize_task_masked(data: CalibrationData, defaults: CalibrationSection, tokenizer,
                         heldout: bool = False) -> tuple[list[list[int]], list[list[bool]]]:
    """Token id sequences of one task and, per token, whether the calibration mode selects it
    (module docstring); deterministic for a given config and files. Every token is context for the
    ones after it; only selected tokens' router inputs, Grams, gradients or losses should count.
    A sample left with no selected token (no assistant turn, or truncated before it) is dropped.
    ``heldout``: ``data`` is held-out data (``effective_settings``)."""
    s = effective_settings(data, defaults, heldout)
    samples = select_samples(read_samples(data), s["num_samples"], s["seed"])
    where = ", ".join(map(str, data.files))
    seqs, masks = [], []
    for sample in samples:
        try:
            ids, mask = tokenize_sample(sample, tokenizer, s["mode"], s["use_chat_template"], s["max_length"])
        except CalibrationDataError as exc:
            raise CalibrationDataError(f"{where}: {exc}") from None
        if any(mask):
            seqs.append(ids)
            masks.append(mask)
    if not seqs:
        if s["mode"] == "response":
            raise CalibrationDataError(f"{where}: no sample has a response token within max_length "
                                       f"{s['max_length']} (calibration mode 'response' selects assistant turns)")
        raise CalibrationDataError(f"{where}: every sample tokenised to nothing")
    return seqs, masks


def tokenize_task(data: CalibrationData, defaults: CalibrationSection, tokenizer,
                  heldout: bool = False) -> list[list[int]]:
    """Token id sequences of one task, deterministic for a given config and files (which tokens the
    mode selects: ``tokenize_task_masked``)."""
    return tokenize_task_masked(data, defaults, tokenizer, heldout)[0]


def data_digest(data: CalibrationData, defaults: CalibrationSection) -> str:
    """Digest of the settings and the bytes of the files: what the tokenised cache depends on."""
    settings = effective_settings(data, defaults)
    if settings["mode"] != "response":  # full and prompt are told apart by prompts_only, as before modes
        del settings["mode"]
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(data.format.encode())
    for path in data.files:
        h.update(str(Path(path).name).encode())
        if not Path(path).is_file():
            raise CalibrationDataError(f"{path}: calibration file not found")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def pack_offsets(seqs: Iterable[list[int]]) -> list[int]:
    offsets = [0]
    for s in seqs:
        offsets.append(offsets[-1] + len(s))
    return offsets
