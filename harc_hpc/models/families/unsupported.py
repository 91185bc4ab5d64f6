"""The MoE model types harc-hpc does not run, each with its reason: the error every command gives for
them (``family_for_config``) and the table of docs/models.md (harc_hpc.models.coverage). Data only,
so that the family registry and the coverage table can both read it."""

from __future__ import annotations

from typing import Optional

DOCS_PAGE = "docs/models.md"

_STATE = ("its decoder layers hand state to the next layer (hyper-connection streams), and the layer-wise forward runs one layer at a time with what the backbone gives it")
_BY_DESIGN = ("its routing is out of reach of a per-layer fit of a linear router: ")
_WRAPPER = "a multimodal wrapper around {text}, which is not run yet (its row says why)"
_TODO = "not adapted yet: {what}"

#: model type -> why harc-hpc does not run it (the error users get names this and docs/models.md)
UNSUPPORTED: dict[str, str] = {
    # routers a per-layer fit cannot express (by design)
    "deepseek_v4": _BY_DESIGN + "hash routing in its first layers, and no SDPA attention",
    "longcat_flash": _BY_DESIGN + "zero-computation experts chosen by the same router",
    "zaya": _BY_DESIGN + "a router carrying state across layers",
    "doge": _BY_DESIGN + "product-key expert retrieval",
    # state across layers
    "hy_v4": _STATE,
    # router kinds without a fitted objective yet
    "jetmoe": "two routers per layer (attention experts and MLP experts): only one router per layer is "
              "calibrated",
    "inkling_text": "its router scores the shared experts in the same matrix as the routed ones",
    "ergo": _TODO.format(what="custom tensor names without the model. prefix and residual gates"),
    # layouts the merge and statistics stages do not read yet
    "param2moe": _TODO.format(what="a fused query_key_value split into three on load"),
    "sarvam_moe": _TODO.format(what="a fused query_key_value split into three on load"),
    "sarvam_mla": _TODO.format(what="MLA attention with a fused projection"),
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
    # multimodal wrappers around a text model not run yet (the wrappers around one that is run are
    # families: harc_hpc.models.families.wrappers)
    "dots3_note": _WRAPPER.format(text="dots3_note_text"),
    "qwen4_exp": _WRAPPER.format(text="qwen4_exp_text"),
    "inkling": _WRAPPER.format(text="inkling_text"),
}


def refusal(model_type: Optional[str]) -> Optional[str]:
    """The reason harc-hpc does not run ``model_type`` (None when it does, or does not know it)."""
    return UNSUPPORTED.get(model_type) or None
