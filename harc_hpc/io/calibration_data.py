"""Calibration text: read task data files and tokenise them into sequences.

Formats: JSONL with chat records (``{"messages": [{"role", "content"}, ...]}``, also ShareGPT-style
``conversations`` with ``from``/``value``), JSONL with ``{"text": ...}`` records, or plain text files
where blank-line separated paragraphs are samples.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Iterable, Optional

from harc_hpc.errors import InputDataError
from harc_hpc.config import CalibrationData, CalibrationSection


class CalibrationDataError(InputDataError):
    pass


_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def _normalise_messages(record: dict, where: str) -> list[dict]:
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
            fmt = "plain" if path.suffix in (".txt", ".md") else "jsonl"
        if fmt == "plain":
            paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
            out.extend({"text": p} for p in paragraphs if p)
            continue
        with path.open(encoding="utf-8") as fh:
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
                if "messages" in rec or "conversations" in rec:
                    if fmt == "text":
                        raise CalibrationDataError(f"{where}: chat record in a file declared format 'text'")
                    out.append({"messages": _normalise_messages(rec, where)})
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


def select_samples(samples: list[dict], num_samples: Optional[int], seed: int) -> list[dict]:
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    if num_samples is not None:
        order = order[:num_samples]
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


def effective_settings(data: CalibrationData, defaults: CalibrationSection) -> dict:
    """Per-task settings: explicitly set fields of the task win over the calibration section."""
    explicit = data.model_fields_set
    pick = lambda name: getattr(data, name) if name in explicit else getattr(defaults, name)  # noqa: E731
    return {
        "num_samples": pick("num_samples"),
        "max_length": pick("max_length"),
        "seed": pick("seed"),
        "prompts_only": pick("prompts_only"),
        "use_chat_template": data.use_chat_template,
    }


def tokenize_task(data: CalibrationData, defaults: CalibrationSection, tokenizer) -> list[list[int]]:
    """Token id sequences of one task, deterministic for a given config and files."""
    s = effective_settings(data, defaults)
    samples = select_samples(read_samples(data), s["num_samples"], s["seed"])
    seqs = []
    for sample in samples:
        text = render_sample(sample, tokenizer, s["prompts_only"], s["use_chat_template"])
        ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=s["max_length"])["input_ids"]
        if len(ids) > 0:
            seqs.append(list(ids))
    if not seqs:
        raise CalibrationDataError(f"{', '.join(map(str, data.files))}: every sample tokenised to nothing")
    return seqs


def data_digest(data: CalibrationData, defaults: CalibrationSection) -> str:
    """Digest of the settings and the bytes of the files: what the tokenised cache depends on."""
    h = hashlib.sha256()
    h.update(json.dumps(effective_settings(data, defaults), sort_keys=True).encode())
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
