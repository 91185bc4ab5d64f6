"""Which MoE model types of the installed transformers harc-hpc runs, and why not the others.

``moe_causal_lm_types()`` enumerates the causal-LM model types whose modeling file defines experts or a
router; every one of them is either supported (a family adapter, harc_hpc.models.families, checked
by the coverage tests) or in ``UNSUPPORTED`` with the reason, which is also the error a user gets
(``family_for_config``). ``coverage_rows`` is what docs/models.md shows (written by
``python -m harc_hpc.models.coverage --write docs/models.md``; tests/test_model_coverage.py checks the
page is current).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

DOCS_PAGE = "docs/models.md"

_STATE = ("its decoder layers hand state to the next layer (the indexer's top-k, or hyper-connection "
          "streams), and the layer-wise forward runs one layer at a time with what the backbone gives it")
_BY_DESIGN = ("its routing is out of reach of a per-layer fit of a linear router: ")
_WRAPPER = "a multimodal wrapper: merge and calibrate its text model ({text}); the wrapper itself is not read yet"
_TODO = "not adapted yet: {what}"

#: model type -> why harc-hpc does not run it (the error users get names this and docs/models.md)
UNSUPPORTED: dict[str, str] = {
    # routers a per-layer fit cannot express (by design)
    "deepseek_v4": _BY_DESIGN + "hash routing in its first layers, and no SDPA attention",
    "longcat_flash": _BY_DESIGN + "zero-computation experts chosen by the same router",
    "zaya": _BY_DESIGN + "a router carrying state across layers",
    "doge": _BY_DESIGN + "product-key expert retrieval",
    # state across layers
    "glm_moe_dsa": _STATE,
    "hy_v4": _STATE,
    # router kinds without a fitted objective yet
    "phimoe": "its router is a sparsemixer (masked softmax, top-1 then a second pick): no HARC objective "
              "for it yet",
    "jetmoe": "two routers per layer (attention experts and MLP experts): only one router per layer is "
              "calibrated",
    "inkling_text": "its router scores the shared experts in the same matrix as the routed ones",
    "laguna": "its router soft-caps the logits (tanh) before the sigmoid: not the sigmoid gates' objective",
    "ergo": _TODO.format(what="custom tensor names without the model. prefix and residual gates"),
    # layouts the merge and statistics stages do not read yet
    "nemotron_h": _TODO.format(what="the checkpoint's backbone. prefix in the merge and statistics stages "
                                    "(the layer-wise forward runs it)"),
    "param2moe": _TODO.format(what="a fused query_key_value split into three on load"),
    "sarvam_moe": _TODO.format(what="a fused query_key_value split into three on load"),
    "sarvam_mla": _TODO.format(what="MLA attention with a fused projection"),
    "kimi_linear": _TODO.format(what="its KDA linear attention and router"),
    "gemma4_text": _TODO.format(what="per-layer input embeddings computed outside the decoder layers"),
    "beam": _TODO.format(what="its attention layout"),
    "axk1": _TODO.format(what="its attention layout"),
    "axk2": _TODO.format(what="its attention layout"),
    "bailing_hybrid": _TODO.format(what="its linear-attention layers"),
    "lara_mini": _TODO.format(what="its split converters"),
    "kolibri1_1": _TODO.format(what="its config's architecture rules"),
    "dots3_note_text": _TODO.format(what="its config's architecture rules"),
    "qwen4_exp_text": _TODO.format(what="its attention layout"),
    "inkling2_text": _TODO.format(what="its vocabulary padding on load"),
    "inkling2_loop_text": _TODO.format(what="its looped layers"),
    "dbrx": _TODO.format(what="its nested attention config"),
    # multimodal wrappers: the text model is what is merged
    "llama4": _WRAPPER.format(text="llama4_text"),
    "qwen3_5_moe": _WRAPPER.format(text="qwen3_5_moe_text"),
    "gemma4": _WRAPPER.format(text="gemma4_text"),
    "dots3_note": _WRAPPER.format(text="dots3_note_text"),
    "qwen4_exp": _WRAPPER.format(text="qwen4_exp_text"),
    "inkling": _WRAPPER.format(text="inkling_text"),
}


def _modeling_source(model_type: str):
    from transformers import CONFIG_MAPPING

    try:
        module = CONFIG_MAPPING[model_type].__module__
    except KeyError:
        return None
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin)
    candidate = path.with_name(path.name.replace("configuration_", "modeling_"))
    return candidate if candidate.is_file() else None


_MOE_CLASS = re.compile(r"class \w*(Experts|SparseMoe|MoE|Moe|TopKRouter|TopkRouter|Router)\w*\(")


def moe_causal_lm_types() -> list[str]:
    """The causal-LM model types of the installed transformers whose modeling file defines experts or
    a router over experts (read as text, nothing imported)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        source = _modeling_source(model_type)
        if source is not None and _MOE_CLASS.search(source.read_text(errors="replace")):
            out.append(model_type)
    return out


def refusal(model_type: str):
    """The reason harc-hpc does not run ``model_type`` (None when it does, or does not know it)."""
    return UNSUPPORTED.get(model_type) or None


def coverage_rows() -> list[tuple[str, str, str, str]]:
    """(model type, router kind, supported, reason) for every MoE causal-LM type here."""
    from harc_hpc.models.families import supported_model_types, family_for_model_type

    supported = set(supported_model_types())
    rows = []
    for model_type in moe_causal_lm_types():
        if model_type in supported:
            rows.append((model_type, family_for_model_type(model_type).router_kind, "yes", ""))
        else:
            rows.append((model_type, "", "no", refusal(model_type) or "not adapted yet"))
    return rows


def render() -> str:
    rows = coverage_rows()
    n_yes = sum(r[2] == "yes" for r in rows)
    from transformers import __version__

    lines = ["# Model coverage", "",
             "<!-- generated by python -m harc_hpc.models.coverage --write docs/models.md; do not edit by hand -->",
             "", f"The MoE causal-LM model types of transformers {__version__} (a modeling file with experts or a "
             f"router): **{n_yes} of {len(rows)}** run end to end. A supported type is checked by "
             "tests/test_model_coverage*.py on a tiny random model built from its config class: the layer-wise "
             "forward equals the whole model's bit for bit on CPU, the whole pipeline runs, the assembled "
             "model loads with AutoModelForCausalLM with finite logits, its calibrated routers are closer to "
             "the sources than the merged ones, and the family's expert selection equals the model's own "
             "router's. An unsupported type is refused with the reason below, by every command (exit 2).", "",
             "| model type | router kind | supported | reason |", "|---|---|---|---|"]
    lines += [f"| {t} | {kind} | {yes} | {why} |" for t, kind, yes, why in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, default=None, help="write the table to this file")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        args.write.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
