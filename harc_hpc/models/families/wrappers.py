"""Multimodal wrappers: a checkpoint whose ``config.json`` nests the MoE text model in ``text_config``
(Llama 4's ``llama4``, Qwen3.5-MoE's ``qwen3_5_moe``, Gemma 4's ``gemma4``) beside a vision tower and
a projector.

A wrapper's family is its text model's family with two differences: the text model's tensors lie on
disk under the wrapper's prefix (``language_model.model.layers`` for Llama 4,
``model.language_model.layers`` for Qwen3.5-MoE and Gemma 4: where ``save_pretrained`` of the
wrapper class writes them), which is what ``MoEFamily.disk_layers_prefix`` names, and the config's
text keys are read from ``text_config`` (every family method that takes the config is handed the
text config). Merging reads every tensor (the vision tower and projector are merged like any other
tensor, or taken from the base: ``merge.vision``); the layer-wise engine builds the text causal LM
from ``text_config`` and reads its tensors from under the prefix (``text_renamings``); the assembled
checkpoint keeps the wrapper's names, files and ``architectures``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
from dataclasses import dataclass
from typing import Iterable, Optional

from harc_hpc.errors import InputDataError, UnsupportedModelError
from harc_hpc.models.families.base import MoEFamily


@dataclass(frozen=True)
class TextModelPlace:
    """Where a wrapper's text causal LM lies on disk: its backbone (``<backbone>.layers.<i>.``,
    ``<backbone>.embed_tokens``, ``<backbone>.norm``) and its LM head (``<head>.weight``)."""

    backbone: str
    head: str


#: wrapper model type -> its text model type and where save_pretrained of the wrapper class puts
#: the text model (tests/test_multimodal_wrappers.py saves a tiny wrapper of each and checks)
WRAPPERS: dict[str, tuple[str, TextModelPlace]] = {
    "llama4": ("llama4_text", TextModelPlace("language_model.model", "language_model.lm_head")),
    "qwen3_5_moe": ("qwen3_5_moe_text", TextModelPlace("model.language_model", "lm_head")),
    "gemma4": ("gemma4_text", TextModelPlace("model.language_model", "lm_head")),
}
#: transformers 5's layout of a vision-language model (``XForConditionalGeneration.model.language_model``):
#: where the text model of a wrapper not listed above is looked for
DEFAULT_PLACE = TextModelPlace("model.language_model", "lm_head")


class WrapperTextModelError(InputDataError):
    """A multimodal wrapper whose text model cannot be found (in its config or in its tensors)."""


def text_config(cfg):
    """The text model's config of a wrapper's config (a dict: its ``text_config``; a transformers
    config: ``get_text_config()``); any other config as it is."""
    if isinstance(cfg, dict):
        inner = cfg.get("text_config")
        return inner if isinstance(inner, dict) else cfg
    get = getattr(cfg, "get_text_config", None)
    return get(decoder=True) if callable(get) else cfg


def _takes_config(fn) -> bool:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return len(params) >= 2 and params[1] == "cfg"


def _on_text_config(method):
    @functools.wraps(method)
    def call(self, cfg, *args, **kwargs):
        return method(self, text_config(cfg), *args, **kwargs)
    return call


class WrapperFamily:
    """Mixed in before a text family's class (``wrapper_family``): the wrapper's prefix, its text
    config, what its text model is on disk."""

    is_wrapper = True
    text_family: MoEFamily
    text_model_type: str
    place: TextModelPlace

    def text_prefixes(self) -> tuple[str, str]:
        """The on-disk prefixes (with their dot) of the text model's tensors."""
        return f"{self.place.backbone}.", f"{self.place.head}."

    def is_text_key(self, key: str) -> bool:
        """Whether on-disk tensor ``key`` belongs to the text model (else: the vision tower, the
        projector, an audio tower)."""
        return key.startswith(self.text_prefixes())

    def non_text_pattern(self) -> str:
        """A regex that finds every on-disk key outside the text model (``merge.vision: base``)."""
        return "^(?!" + "|".join(re.escape(p) for p in self.text_prefixes()) + ")"

    def text_renamings(self) -> list[tuple[str, str]]:
        """(regex, replacement) from on-disk keys to the text causal LM's in-memory names, applied
        before transformers' own conversion mapping of the text model type; keys no regex matches
        are not the text model's."""
        return [(rf"^{re.escape(self.place.backbone)}\.", "model."), (rf"^{re.escape(self.place.head)}\.", "lm_head.")]

    def check_text_model(self, keys: Iterable[str], config: dict, where: str) -> None:
        """Refuse (WrapperTextModelError, naming ``where`` and what was looked for) a checkpoint whose
        tensors hold no text model under the wrapper's prefix."""
        keys = list(keys)
        layers = self.moe_layers(config)
        looked = [self.router_disk_key(layers[0]), self.router_disk_key(layers[0], "fused")] if layers else []
        found = any(k.startswith(f"{self.disk_layers_prefix}.") for k in keys)
        if found and layers:
            try:
                self.find_router_disk_key(layers[0], keys)
            except KeyError:
                found = False
        if not found:
            shown = sorted({".".join(k.split(".")[:3]) for k in keys})[:6]
            raise WrapperTextModelError(
                f"model_type {self.name!r} is a multimodal wrapper around {self.text_model_type!r}, and its "
                f"text model is not in the checkpoint: looked for its decoder layers under "
                f"'{self.disk_layers_prefix}.' (router {' or '.join(repr(k) for k in dict.fromkeys(looked))}); "
                f"the tensors start with {', '.join(shown) or 'nothing'}", where=where,
                hint="a wrapper is read where save_pretrained of its class writes the text model; a checkpoint "
                     "laid out otherwise needs its text model's tensors renamed, or models.*.path pointed at the "
                     "text model saved on its own")


def wrapper_family(text: MoEFamily, model_type: str, text_model_type: str, place: TextModelPlace) -> MoEFamily:
    """The family of wrapper ``model_type``: a copy of the text family ``text`` whose class also
    derives from WrapperFamily, with the wrapper's on-disk prefix and every config method reading the
    text config."""
    cls = type(text)
    attrs = {name: _on_text_config(fn) for name, fn in inspect.getmembers(cls, inspect.isfunction)
             if _takes_config(fn)}
    attrs["__doc__"] = f"The multimodal wrapper {model_type!r} around {text.name!r} (harc_hpc.models.families.wrappers)."
    sub = type(f"{cls.__name__}In{''.join(p.title() for p in model_type.split('_'))}", (WrapperFamily, cls), attrs)
    fam = copy.copy(text)
    fam.__class__ = sub
    for name, value in (("name", model_type), ("model_types", (model_type,)),
                        ("disk_layers_prefix", f"{place.backbone}.layers"), ("text_family", text),
                        ("text_model_type", text_model_type), ("place", place),
                        ("router_kind", f"{text.router_kind} (its text model, {text_model_type})")):
        object.__setattr__(fam, name, value)
    return fam


def is_wrapper(fam) -> bool:
    return bool(getattr(fam, "is_wrapper", False))


def check_wrapper_config(config: dict) -> None:
    """Refuse (WrapperTextModelError) the config of a registered wrapper whose text model is not the
    one it wraps (no ``text_config``, or another model type in it)."""
    model_type = config.get("model_type")
    if model_type not in WRAPPERS:
        return
    want = WRAPPERS[model_type][0]
    inner = config.get("text_config")
    if not isinstance(inner, dict):
        raise WrapperTextModelError(
            f"model_type {model_type!r} is a multimodal wrapper, and its config.json has no text_config "
            f"(looked for text_config with model_type {want!r})",
            hint="point models.*.path at a complete checkpoint of the wrapper")
    if inner.get("model_type") != want:
        raise WrapperTextModelError(
            f"model_type {model_type!r} is a multimodal wrapper around {want!r}, but its config.json's "
            f"text_config has model_type {inner.get('model_type')!r}",
            hint="point models.*.path at a complete checkpoint of the wrapper")


_GENERIC: dict = {}


def wrapper_for_config(config: dict, by_model_type: dict, refusal) -> Optional[MoEFamily]:
    """The family of a wrapper ``config`` that is not registered in WRAPPERS (its ``text_config``
    names a text model type with a family), read from transformers 5's layout (DEFAULT_PLACE) and
    checked against the tensors where they are read (``check_text_model``); None when ``config`` is
    no wrapper. A wrapper around a text model harc-hpc does not run is refused with that model's
    reason."""
    inner = config.get("text_config")
    if not isinstance(inner, dict):
        return None
    model_type, text_type = config.get("model_type"), inner.get("model_type")
    text = by_model_type.get(text_type)
    if text is None:
        why = refusal(text_type)
        if why:
            from harc_hpc.models.families.unsupported import DOCS_PAGE

            raise UnsupportedModelError(f"model_type {model_type!r} is a multimodal wrapper around {text_type!r}, "
                                        f"which is not supported: {why}",
                                        hint=f"{DOCS_PAGE} lists every MoE model type and why")
        return None
    key = (model_type, text_type)
    if key not in _GENERIC:
        _GENERIC[key] = wrapper_family(text, model_type, text_type, DEFAULT_PLACE)
    return _GENERIC[key]
