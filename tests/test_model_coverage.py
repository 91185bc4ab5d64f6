"""MoE model types beyond the first eight, run by the model's own code (harc_hpc.models.onload): for
each, the layer-wise forward against the whole model (router inputs and logits bit for bit on CPU),
then the whole pipeline (merge, capture, statistics, solve, assemble) on tiny random sources: the
assembled model loads with AutoModelForCausalLM, gives finite logits, and its calibrated routers are
closer to the sources than the merged ones."""

from __future__ import annotations

import json

import pytest
import torch

from harc_hpc.config import load_config
from harc_hpc.models.families import family_for_config
from harc_hpc.models.modeling import RouterInputRecorder, load_causal_lm
from harc_hpc.models.onload import OnloadedModel
from harc_hpc.stages import layout
from pipeline_fixtures import build_tiny_sources, run_pipeline, tiny_config, write_config

# model type -> what makes it new to the layer-wise forward
NEW_TYPES = {
    "qwen3_next": "gated linear attention beside full attention (layer_types); shared expert",
}


@pytest.mark.parametrize("model_type", sorted(NEW_TYPES))
def test_the_layerwise_forward_is_the_whole_models_bit_for_bit(tmp_path, model_type):
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    conf = tiny_config(model_type, layers=4)
    AutoModelForCausalLM.from_config(conf).save_pretrained(tmp_path / "m")
    fam = family_for_config(json.loads((tmp_path / "m" / "config.json").read_text()))
    whole = load_causal_lm(tmp_path / "m", torch.device("cpu"))
    ids = torch.randint(0, conf.vocab_size, (3, 11))
    layers = fam.moe_layers(conf.to_dict())
    with RouterInputRecorder({l: fam.router_module(whole, l) for l in layers}) as rec:
        with torch.no_grad():
            ref_logits = whole(input_ids=ids).logits
        ref = {l: rec.pop(l) for l in layers}
    om = OnloadedModel(tmp_path / "m", torch.device("cpu"))
    h = om.embed(ids)
    for l in range(om.num_layers):
        om.onload(l)
        full = om.run_layer(l, h)
        if l in layers:
            r = om.run_attention_half(l, h)
            x = fam.router_input_norm(om.layer(l))(r)
            assert torch.equal(x.reshape(ref[l].shape), ref[l]), f"layer {l}: router inputs"
            assert torch.equal(om.run_moe_half(l, r), full), f"layer {l}: the two halves != the layer"
        h = full
        om.offload(l)
    assert torch.equal(om.head_logits(h), ref_logits)
    om.close()


@pytest.mark.parametrize("model_type", sorted(NEW_TYPES))
def test_the_whole_pipeline_runs_and_calibrates(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    src = build_tiny_sources(tmp_path / "src", family=model_type, layers=2)
    cfg = load_config(write_config(tmp_path, src, harc={"dtype": "float64"}))
    run = cfg.run_dir
    run_pipeline(cfg, run)
    model = AutoModelForCausalLM.from_pretrained(str(layout.model_dir(run))).eval()
    for l in layout.moe_layers(cfg):
        rep = json.loads(layout.router_report(run, l).read_text())
        assert rep["converged"], rep
        assert sum(rep["kl_after"].values()) < sum(rep["kl_before"].values()), rep
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 3, 7]])).logits
    assert torch.isfinite(logits).all()
