"""harc_hpc.io.checkpoint: reading, sharded writing, safety checks, atomic directories."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from harc_hpc.io.atomic import atomic_dir
from harc_hpc.io.checkpoint import Checkpoint, CheckpointError, parse_size, resolve_model_path
from harc_hpc.io.checkpoint_writer import CheckpointWriter, copy_model_files, patch_tensors


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 4, generator=g),
        "b.weight": torch.randn(16, dtype=torch.float32, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(3, generator=g).to(torch.float16),
        "d.idx": torch.arange(5, dtype=torch.int64),
    }


def _model_dir(tmp_path, tensors, name="m"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "olmoe"}))
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("lots")


def test_read_single_file(tmp_path):
    t = _tensors()
    ck = Checkpoint(_model_dir(tmp_path, t))
    assert sorted(ck.keys()) == sorted(t)
    for k, v in t.items():
        assert ck.tensor_shape(k) == tuple(v.shape)
        assert ck.tensor_dtype(k) == v.dtype
        assert torch.equal(ck.get_tensor(k), v)
    # a contiguous part of the flattened tensor
    assert torch.equal(ck.read_part("a.weight", 4, 8), t["a.weight"].reshape(-1)[4:12])
    assert ck.config == {"model_type": "olmoe"}


def test_writer_shards_and_index(tmp_path):
    t = _tensors()
    out = tmp_path / "out"
    w = CheckpointWriter(out, max_shard_bytes=100)
    w.declare([(k, v.dtype, v.shape) for k, v in t.items()])
    # parts may arrive in any order
    w.add_part("a.weight", 16, t["a.weight"].reshape(-1)[16:])
    w.add_part("a.weight", 0, t["a.weight"].reshape(-1)[:16])
    for k in ("b.weight", "c.bias", "d.idx"):
        w.add(k, t[k])
    files = w.finalize()
    assert len(files) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(t)
    loaded = {}
    for f in files:
        loaded.update(load_file(str(f)))  # the reference reader accepts our files
    for k, v in t.items():
        assert torch.equal(loaded[k], v)
    (out / "config.json").write_text("{}")
    ck = Checkpoint(out)
    assert torch.equal(ck.get_tensor("a.weight"), t["a.weight"])


def test_writer_single_shard_has_no_index(tmp_path):
    w = CheckpointWriter(tmp_path / "o", "1GB")
    w.declare([("x", torch.float32, (2, 2))])
    w.add("x", torch.ones(2, 2))
    w.finalize()
    assert (tmp_path / "o" / "model.safetensors").is_file()
    assert not (tmp_path / "o" / "model.safetensors.index.json").exists()
    assert torch.equal(load_file(str(tmp_path / "o" / "model.safetensors"))["x"], torch.ones(2, 2))


def test_writer_incomplete_is_an_error(tmp_path):
    w = CheckpointWriter(tmp_path / "o")
    w.declare([("x", torch.float32, (4,)), ("y", torch.float32, (2,))])
    w.add("x", torch.ones(4))
    with pytest.raises(RuntimeError, match="not .*written"):
        w.finalize()


def test_sharded_read_and_missing_shard(tmp_path):
    t = _tensors()
    out = tmp_path / "out"
    w = CheckpointWriter(out, max_shard_bytes=100)
    w.declare([(k, v.dtype, v.shape) for k, v in t.items()])
    for k, v in t.items():
        w.add(k, v)
    files = w.finalize()
    (out / "config.json").write_text("{}")
    assert torch.equal(Checkpoint(out).get_tensor("c.bias"), t["c.bias"])
    os.remove(files[-1])
    with pytest.raises(CheckpointError, match=files[-1].name):
        Checkpoint(out)


def test_truncated_shard_names_file_and_tensor(tmp_path):
    d = _model_dir(tmp_path, {"w": torch.ones(64, 64)})
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated.*tensor w"):
        Checkpoint(d)


def test_pickle_refused_unless_allowed(tmp_path):
    d = tmp_path / "pk"
    d.mkdir()
    (d / "config.json").write_text("{}")
    torch.save({"w": torch.arange(4.0)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle.*allow_pickle"):
        Checkpoint(d)
    ck = Checkpoint(d, allow_pickle=True)
    assert torch.equal(ck.get_tensor("w"), torch.arange(4.0))
    assert torch.equal(ck.read_part("w", 1, 2), torch.tensor([1.0, 2.0]))


def test_pickle_with_code_is_rejected_even_when_allowed(tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_text("{}")

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": Payload()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        Checkpoint(d, allow_pickle=True)


def test_no_weights_and_no_config(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        Checkpoint(d)
    (d / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights"):
        Checkpoint(d)


def test_digest_is_stable_and_content_sensitive(tmp_path):
    t = _tensors()
    a = Checkpoint(_model_dir(tmp_path, t, "a")).digest()
    b = Checkpoint(_model_dir(tmp_path, t, "b")).digest()
    assert a == b and a.startswith("sha256:")
    t["a.weight"][0, 0] += 1
    assert Checkpoint(_model_dir(tmp_path, t, "c")).digest() != a


def test_atomic_dir(tmp_path):
    final = tmp_path / "merged"
    with pytest.raises(ZeroDivisionError):
        with atomic_dir(final) as tmp:
            (tmp / "half").write_text("x")
            1 / 0
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "one").write_text("1")
    with atomic_dir(final) as tmp:  # replaces an existing directory
        (tmp / "two").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["two"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_copy_model_files_and_resolve(tmp_path):
    src = _model_dir(tmp_path, {"w": torch.ones(1)})
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text("{}")
    (src / "modeling_evil.py").write_text("")
    copied = copy_model_files(src, tmp_path / "dst")
    assert sorted(copied) == ["config.json", "generation_config.json", "tokenizer.json"]
    assert resolve_model_path(str(src)) == src.resolve()
    with pytest.raises(CheckpointError, match="not found"):
        resolve_model_path(str(tmp_path / "nope"))


def test_patch_tensors_round_trip(moe_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from harc_hpc.models.families import family_for_config

    models = moe_models("olmoe")
    src = Checkpoint(models["base"])
    fam = family_for_config(src.config)
    key = fam.router_disk_key(1)
    new = torch.zeros(src.tensor_shape(key))
    patch_tensors(models["base"], tmp_path / "patched", {key: new}, max_shard_size="10KB")
    out = Checkpoint(tmp_path / "patched")
    assert torch.equal(out.get_tensor(key), new)
    other = fam.expert_key(0, 1, "down")
    assert torch.equal(out.get_tensor(other), src.get_tensor(other))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "patched")
    assert torch.equal(fam.router_module(model, 1).weight.detach(), new)
    with pytest.raises(CheckpointError, match="shape"):
        patch_tensors(models["base"], tmp_path / "bad", {key: torch.zeros(2, 2)})
    assert not (tmp_path / "bad").exists()
