"""The report's layer-wise evaluation (metrics.evaluate_checkpoint) against the whole model.

The reference is the report as it was before onloading: the checkpoint loaded whole with
from_pretrained (routers copied in for the oracle), one forward per padded batch, forward hooks on
the routers for the router logits of real tokens, and the next-token NLL of each sequence from the
logits. On CPU in float32 the layer-wise pass must give the same numbers bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harc_hpc.config import load_config
from harc_hpc.models.families import family_for_config
from harc_hpc.models.onload import OnloadedModel
from harc_hpc.report import metrics
from pipeline_fixtures import build_tiny_sources, char_tokenizer, tiny_config
from test_report import TASKS, make_run_dir

FAMILIES = ("olmoe", "qwen3_moe", "mixtral", "qwen2_moe")
CPU = torch.device("cpu")


def whole_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()


@torch.no_grad()
def whole_model_eval(model, fam, layers, seqs, batch_size, ref_routers=None, keep_routing=True, routers=None):
    """Held-out loss and router logits of real tokens from full forwards of a whole model."""
    from harc_hpc.models.modeling import pad_batch

    if routers is not None:
        for l, w in routers.items():
            fam.router_module(model, l).weight.copy_(w)
    result = metrics.TaskEval()
    parts = {l: [] for l in layers}
    ref_parts = {l: [] for l in layers}
    keep = {}

    def hook_for(layer, weight):
        def hook(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])[keep["mask"]].float()
            parts[layer].append(torch.nn.functional.linear(x, weight.float()))
            if ref_routers is not None:
                ref_parts[layer].append(torch.nn.functional.linear(x, ref_routers[layer].float()))

        return hook

    handles = []
    if keep_routing:
        for l in layers:
            module = fam.router_module(model, l)
            handles.append(module.register_forward_hook(hook_for(l, module.weight)))
    try:
        for start in range(0, len(seqs), batch_size):
            ids, lengths = pad_batch([torch.tensor(s) for s in seqs[start : start + batch_size]], pad_value=0)
            mask = torch.zeros(ids.shape, dtype=torch.bool)
            for i, n in enumerate(lengths):
                mask[i, :n] = True
            keep["mask"] = mask.reshape(-1)
            logits = model(input_ids=ids).logits
            for i, n in enumerate(lengths):
                if n >= 2:
                    result.nll += float(torch.nn.functional.cross_entropy(logits[i, : n - 1].float(), ids[i, 1:n],
                                                                          reduction="sum"))
                    result.tokens += n - 1
    finally:
        for h in handles:
            h.remove()
    for l in layers:
        if parts[l]:
            result.own_logits[l] = torch.cat(parts[l])
        if ref_parts[l]:
            result.ref_logits[l] = torch.cat(ref_parts[l])
    return result


def heldout_sequences(sources, task: str) -> list[list[int]]:
    """The fixture's held-out texts as byte ids, of different lengths (so batches carry pads), plus
    a one-token sequence (no next-token loss)."""
    tok = char_tokenizer()
    lines = (sources["data"] / f"{task}-heldout.jsonl").read_text().splitlines()
    seqs = [tok(json.loads(line)["text"])["input_ids"][: 20 + 7 * i] for i, line in enumerate(lines)]
    return seqs + [seqs[0][:1]]


def routers_of(model, fam, layers):
    return {l: fam.router_module(model, l).weight.detach().clone() for l in layers}


def assert_same(ev: metrics.TaskEval, ref: metrics.TaskEval, what: str):
    assert ev.tokens == ref.tokens > 0, what
    assert ev.loss == pytest.approx(ref.loss, rel=1e-6, abs=0), what
    assert sorted(ev.own_logits) == sorted(ref.own_logits) and sorted(ev.ref_logits) == sorted(ref.ref_logits), what
    for l in ref.own_logits:
        torch.testing.assert_close(ev.own_logits[l], ref.own_logits[l], rtol=1e-5, atol=1e-6, msg=f"{what} layer {l}")
    for l in ref.ref_logits:
        torch.testing.assert_close(ev.ref_logits[l], ref.ref_logits[l], rtol=1e-5, atol=1e-6, msg=f"{what} layer {l}")


def bit_for_bit(ev: metrics.TaskEval, ref: metrics.TaskEval) -> bool:
    return (ev.nll == ref.nll and all(torch.equal(ev.own_logits[l], ref.own_logits[l]) for l in ref.own_logits)
            and all(torch.equal(ev.ref_logits[l], ref.ref_logits[l]) for l in ref.ref_logits))


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_evaluation_equals_the_whole_model(tmp_path, family):
    src = build_tiny_sources(tmp_path / "src", family=family, layers=3)
    conf = json.loads((src["math"] / "config.json").read_text())
    fam = family_for_config(conf)
    layers = fam.moe_layers(conf)
    seqs = {t: heldout_sequences(src, t) for t in TASKS}
    code = whole_model(src["code"])
    code_routers = routers_of(code, fam, layers)
    del code
    evaluations = [
        metrics.Evaluation(seqs["math"], keep_routing=True, ref_routers=code_routers),  # merged/calibrated rows
        metrics.Evaluation(seqs["code"]),  # a loss only (base, sources on other tasks)
        metrics.Evaluation(seqs["math"], routers=code_routers),  # the oracle: another source's routers
        metrics.Evaluation(seqs["code"], keep_routing=True),  # a source on its own task
    ]
    got = metrics.evaluate_checkpoint(src["math"], layers, evaluations, batch_size=4, device=CPU)

    model = whole_model(src["math"])
    own_routers = routers_of(model, fam, layers)
    assert sorted(got.routers) == list(layers)
    for l in layers:
        assert torch.equal(got.routers[l], own_routers[l]), f"the checkpoint's router of layer {l}"
    refs = [whole_model_eval(model, fam, layers, seqs["math"], 4, ref_routers=code_routers),
            whole_model_eval(model, fam, layers, seqs["code"], 4, keep_routing=False),
            whole_model_eval(model, fam, layers, seqs["math"], 4, keep_routing=False, routers=code_routers),
            whole_model_eval(whole_model(src["math"]), fam, layers, seqs["code"], 4)]
    for i, (ev, ref) in enumerate(zip(got.results.values(), refs)):
        assert_same(ev, ref, f"{family} evaluation {i}")
        assert bit_for_bit(ev, ref), f"{family} evaluation {i} is close but not bit for bit"
    # The swapped routers do change the loss (the random tiny models are near uniform: not by much);
    # evaluation 3, run after the swap at every layer, shows that the checkpoint's own routers were
    # put back.
    assert got.results[2].nll != whole_model_eval(whole_model(src["math"]), fam, layers, seqs["math"], 4,
                                                  keep_routing=False).nll


def test_tied_lm_head_reads_the_embeddings(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    config = tiny_config("olmoe", layers=2)
    config.tie_word_embeddings = True
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "tied")
    with safe_open(str(tmp_path / "tied" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    fam = family_for_config(json.loads((tmp_path / "tied" / "config.json").read_text()))
    seqs = [[(7 * i + j) % 128 for j in range(9 + 5 * i)] for i in range(5)]
    got = metrics.evaluate_checkpoint(tmp_path / "tied", [0, 1], [metrics.Evaluation(seqs)], 2, CPU)
    ref = whole_model_eval(whole_model(tmp_path / "tied"), fam, [0, 1], seqs, 2, keep_routing=False)
    assert_same(got.results[0], ref, "tied")
    assert got.results[0].nll == ref.nll


def test_a_missing_lm_head_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    src = build_tiny_sources(tmp_path / "src", family="olmoe", layers=2)
    state = load_file(str(src["base"] / "model.safetensors"))
    del state["lm_head.weight"]
    d = tmp_path / "headless"
    d.mkdir()
    save_file(state, str(d / "model.safetensors"))
    (d / "config.json").write_text((src["base"] / "config.json").read_text())
    from harc_hpc.io.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"lm_head\.weight.*head is missing"):
        metrics.evaluate_checkpoint(d, [0, 1], [metrics.Evaluation([[1, 2, 3]])], 2, CPU)


def test_report_metrics_without_a_whole_model(tmp_path, monkeypatch):
    """model_metrics onloads each decoder layer of each checkpoint once, loads no model whole, and
    its numbers are the whole models' (loss rows, oracle, router-level and end-to-end routing)."""
    from transformers import AutoModelForCausalLM

    cfg_path, run_dir = make_run_dir(tmp_path, family="olmoe", layers=2)
    cfg = load_config(cfg_path)
    onloads = []
    real_onload = OnloadedModel.onload

    def counting_onload(self, index, overrides=None):
        onloads.append((self.path, index))
        return real_onload(self, index, overrides)

    def refuse(*a, **k):
        raise AssertionError("the report loaded a whole model")

    monkeypatch.setattr(OnloadedModel, "onload", counting_onload)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    m = metrics.model_metrics(cfg, run_dir)
    monkeypatch.undo()
    checkpoints = [cfg.models.sources[0].path, cfg.models.sources[1].path, cfg.models.base,
                   run_dir / "merged", run_dir / "model"]
    assert sorted((p.resolve(), j) for p, j in onloads) == sorted((Path(c).resolve(), j) for c in checkpoints
                                                                  for j in range(2))

    from transformers import AutoTokenizer

    from harc_hpc.io.calibration_data import tokenize_task

    tok = AutoTokenizer.from_pretrained(str(run_dir / "merged"))
    fam, layers, bs = family_for_config(json.loads((run_dir / "merged" / "config.json").read_text())), m["layers"], 4
    seqs = {s.name: tokenize_task(s.heldout, cfg.calibration, tok) for s in cfg.models.sources}
    models = {f"source:{s.name}": whole_model(s.path) for s in cfg.models.sources}
    models.update(base=whole_model(cfg.models.base), merged=whole_model(run_dir / "merged"),
                  calibrated=whole_model(run_dir / "model"))
    source_routers = {t: routers_of(models[f"source:{t}"], fam, layers) for t in TASKS}
    for t in TASKS:
        for name, model in models.items():
            assert m["loss"][t][name] == whole_model_eval(model, fam, layers, seqs[t], bs, keep_routing=False).loss
        oracle = whole_model(run_dir / "merged")
        assert m["loss"][t]["oracle"] == whole_model_eval(oracle, fam, layers, seqs[t], bs, keep_routing=False,
                                                          routers=source_routers[t]).loss
        own = whole_model_eval(models[f"source:{t}"], fam, layers, seqs[t], bs)
        for name in ("merged", "calibrated"):
            ev = whole_model_eval(models[name], fam, layers, seqs[t], bs, ref_routers=source_routers[t])
            rl = [metrics.routing_divergence(ev.ref_logits[l], ev.own_logits[l], m["top_k"]) for l in layers]
            assert m["routing"]["router_level"][name][t] == {"kl": [r[0] for r in rl],
                                                             "topk_mismatch": [r[1] for r in rl]}
            ee = [metrics.routing_divergence(own.own_logits[l], ev.own_logits[l], m["top_k"]) for l in layers]
            assert m["routing"]["end_to_end"][name][t]["kl"] == [r[0] for r in ee]


def test_spilled_hidden_states_give_the_same_numbers(tmp_path, monkeypatch):
    """Hidden states memory-mapped on node-local disk (too big for host memory): same bytes, and
    the scratch files are removed."""
    import tempfile

    from harc_hpc.stages import capture_activations

    src = build_tiny_sources(tmp_path / "src", family="qwen2_moe", layers=2)
    fam = family_for_config(json.loads((src["math"] / "config.json").read_text()))
    layers = fam.moe_layers(json.loads((src["math"] / "config.json").read_text()))
    seqs = heldout_sequences(src, "math")
    monkeypatch.setattr(capture_activations, "placement_for", lambda *a: "disk")
    (tmp_path / "local").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "local"))
    monkeypatch.setattr(tempfile, "tempdir", None)
    got = metrics.evaluate_checkpoint(src["math"], layers, [metrics.Evaluation(seqs, keep_routing=True)], 4, CPU)
    assert list((tmp_path / "local").iterdir()) == [], "the spilled hidden states were not removed"
    ref = whole_model_eval(whole_model(src["math"]), fam, layers, seqs, 4)
    assert_same(got.results[0], ref, "spilled")
    assert bit_for_bit(got.results[0], ref)
