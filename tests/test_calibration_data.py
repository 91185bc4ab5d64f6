import json

import numpy as np
import pytest
import torch

from harc_hpc.io.activations import ActivationArray, ActivationWriter, TokenStore, write_token_store
from harc_hpc.io.atomic import atomic_path
from harc_hpc.io.calibration_data import CalibrationDataError, data_digest, read_samples, render_sample, tokenize_task
from harc_hpc.config import CalibrationData, CalibrationSection
from pipeline_fixtures import char_tokenizer


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_chat_text_and_sharegpt_records(tmp_path):
    f = jsonl(tmp_path / "a.jsonl", [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"text": "plain"},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    ])
    samples = read_samples(CalibrationData(files=[f]))
    assert samples[1] == {"text": "plain"}
    assert samples[2]["messages"][1] == {"role": "assistant", "content": "yo"}
    tok = char_tokenizer()  # no chat template: messages are joined by newlines
    assert render_sample(samples[0], tok, prompts_only=False, use_chat_template=True) == "2+2?\n4"
    assert render_sample(samples[0], tok, prompts_only=True, use_chat_template=True) == "2+2?"


def test_plain_text_paragraphs(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first para\nline two\n\n\nsecond\n")
    assert read_samples(CalibrationData(files=[f])) == [{"text": "first para\nline two"}, {"text": "second"}]


@pytest.mark.parametrize("line, msg", [
    ("{not json", "a.jsonl:2: not valid JSON"),
    ('{"foo": 1}', "a.jsonl:2: record has neither"),
    ('[1, 2]', "a.jsonl:2: a record must be a JSON object"),
])
def test_bad_records_name_file_and_line(tmp_path, line, msg):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(CalibrationDataError, match=msg.replace("[", r"\[")):
        read_samples(CalibrationData(files=[f]))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CalibrationDataError, match="nope.jsonl: calibration file not found"):
        read_samples(CalibrationData(files=[tmp_path / "nope.jsonl"]))


def test_tokenize_samples_truncates_and_is_seeded(tmp_path):
    f = jsonl(tmp_path / "a.jsonl", [{"text": f"sample number {i} " * 5} for i in range(20)])
    data = CalibrationData(files=[f], num_samples=5, max_length=16, seed=3)
    tok = char_tokenizer()
    a = tokenize_task(data, CalibrationSection(), tok)
    assert len(a) == 5 and all(len(s) == 16 for s in a)
    assert a == tokenize_task(data, CalibrationSection(), tok)
    other = tokenize_task(data.model_copy(update={"seed": 4}), CalibrationSection(), tok)
    assert a != other
    d1 = data_digest(data, CalibrationSection())
    f.write_text(f.read_text() + '{"text": "new"}\n')
    assert data_digest(data, CalibrationSection()) != d1


def test_token_and_activation_stores_round_trip(tmp_path):
    write_token_store(tmp_path / "t.zarr", [[1, 2, 3], [4], [5, 6]], digest="abc")
    store = TokenStore(tmp_path / "t.zarr")
    assert store.digest == "abc" and store.num_sequences == 3 and store.num_tokens == 6
    assert store.sequence(2).tolist() == [5, 6]
    x = torch.randn(50, 8)
    for dtype, tol in (("float32", 0), ("float16", 1e-2), ("bfloat16", 1e-1)):
        with atomic_path(tmp_path / f"{dtype}.zarr") as tmp:
            w = ActivationWriter(tmp, chunk_tokens=16, dtype=dtype)
            w.create("layer-000/math", 50, 8, np.array([0, 20, 50]))
            w.write("layer-000/math", 0, x[:30])
            w.write("layer-000/math", 30, x[30:])
        arr = ActivationArray(tmp_path / f"{dtype}.zarr", "layer-000/math")
        chunks = list(arr)
        assert [c.shape[0] for c in chunks] == [16, 16, 16, 2]
        assert list(arr)[0].shape == (16, 8)  # re-iterable
        assert torch.allclose(torch.cat(chunks), x, atol=tol, rtol=tol)
        assert arr.offsets.tolist() == [0, 20, 50]


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.zarr"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "partial").write_text("x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_buffered_activation_writes_equal_direct_writes_chunk_for_chunk(tmp_path):
    """Slices buffered to whole chunks give the same chunk files, byte for byte, as writing every
    slice at once; an out-of-order slice is written straight through."""
    x = torch.randn(100, 6)
    stores = {}
    for buffered in (True, False):
        root = tmp_path / f"{buffered}.zarr"
        w = ActivationWriter(root, chunk_tokens=16, dtype="bfloat16", buffer_chunks=buffered)
        w.create("a", 100, 6, np.array([0, 100]))
        for start in range(0, 90, 9):  # 9-row slices across 16-row chunks
            w.write("a", start, x[start:start + 9])
        w.write("a", 90, x[90:])
        w.create("b", 40, 6, np.array([0, 40]))
        w.write("b", 20, x[20:40])  # out of order
        w.write("b", 0, x[:20])
        w.close()
        stores[buffered] = {p.relative_to(root).as_posix(): p.read_bytes()
                            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "zarr.json"}
        arr = ActivationArray(root, "a", out_dtype=torch.float32)
        assert torch.equal(arr.load(), x.to(torch.bfloat16).float())
        assert torch.equal(ActivationArray(root, "b").load(), x[:40].to(torch.bfloat16).float())
    assert stores[True] == stores[False] and len(stores[True]) == 7 + 3


def test_token_subsample_is_exact_stratified_and_seeded():
    from harc_hpc.io.activations import token_subsample

    offsets = np.array([0, 100, 130, 131, 400, 1000])
    rows = token_subsample(offsets, 250, seed=[0, 1, 2])
    assert rows.shape == (250,) and np.all(np.diff(rows) > 0) and rows[0] >= 0 and rows[-1] < 1000
    per_seq = np.histogram(rows, bins=offsets)[0]
    share = np.diff(offsets) * 250 / 1000
    assert np.all(np.abs(per_seq - share) < 1.0), (per_seq, share)
    assert np.array_equal(rows, token_subsample(offsets, 250, seed=[0, 1, 2]))
    assert not np.array_equal(rows, token_subsample(offsets, 250, seed=[1, 1, 2]))
    assert token_subsample(offsets, 1000, seed=0) is None and token_subsample(offsets, 5000, seed=0) is None


def test_subsampled_array_iterates_only_the_kept_rows(tmp_path):
    x = torch.randn(50, 4)
    root = tmp_path / "s.zarr"
    w = ActivationWriter(root, chunk_tokens=16, dtype="float32")
    w.create("a", 50, 4, np.array([0, 50]))
    w.write("a", 0, x)
    rows = np.array([0, 3, 15, 16, 40, 49])
    arr = ActivationArray(root, "a", rows=rows)
    assert len(arr) == 6 and arr.shape == (6, 4) and arr.num_stored == 50
    assert torch.equal(torch.cat(list(arr)), x[torch.from_numpy(rows)])
    assert torch.equal(torch.cat(list(arr)), torch.cat(list(arr)))  # re-iterable, same chunks
