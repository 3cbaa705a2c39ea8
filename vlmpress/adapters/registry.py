"""Adapter registry: model spec string -> adapter class.

Specs:
* ``open_clip:NAME`` (random init), ``open_clip:NAME/TAG`` (e.g. ``open_clip:ViT-B-16/openai``) or
  ``open_clip:NAME/PATH`` (a local checkpoint file);
* ``hf:NAME_OR_DIR`` -- transformers models; the adapter is picked from the config's model_type;
* a directory written by ``save_compressed`` (holds ``vlmpress_config.json``).

Where adapters come from:

* built-in families (:data:`_BUILTIN`, imported lazily: one line per family);
* classes decorated with :func:`register_adapter` (imported by the user);
* installed packages, through the entry-point group ``vlmpress.adapters``
  (``[project.entry-points."vlmpress.adapters"] myfamily = "mypkg.adapter:MyAdapter"``); the entry
  point's name is the family name saved in checkpoints.

Precedence when several adapters accept a spec: an explicit choice (``--adapter NAME``,
:func:`use_adapter`, ``adapter_for_spec(spec, adapter=NAME)``) wins; otherwise the highest declared
``priority`` class attribute (default 0); at equal priority plugins and user-registered adapters come
before built-ins, then alphabetical order.
"""

from __future__ import annotations

import importlib
import logging
from contextlib import contextmanager
from importlib import metadata

from vlmpress.adapters.base import ModelAdapter
from vlmpress.adapters.unsupported import ENTRY_POINT_GROUP, UnsupportedArchitectureError, unsupported_message
from vlmpress.errors import UnknownModelSpecError

logger = logging.getLogger(__name__)

# family -> "module:ClassName"; imported lazily so a missing optional dependency only affects its family
_BUILTIN: dict[str, str] = {
    "open_clip": "vlmpress.adapters.open_clip:OpenClipAdapter",
    "hf_clip": "vlmpress.adapters.hf_clip:HFClipAdapter",
    "hf_siglip": "vlmpress.adapters.hf_clip:HFSiglipAdapter",
    "hf_siglip2": "vlmpress.adapters.hf_families:HFSiglip2Adapter",
    "hf_altclip": "vlmpress.adapters.hf_families:HFAltClipAdapter",
    "hf_chinese_clip": "vlmpress.adapters.hf_families:HFChineseClipAdapter",
    "hf_blip_itr": "vlmpress.adapters.hf_families:HFBlipRetrievalAdapter",
    "hf_causal_lm": "vlmpress.adapters.hf_causal_lm:HFCausalLMAdapter",
    "hf_llava": "vlmpress.adapters.hf_llava:HFLlavaAdapter",
    "hf_paligemma": "vlmpress.adapters.hf_llava:HFPaliGemmaAdapter",
    "hf_generative": "vlmpress.adapters.hf_generative:HFGenerativeVLMAdapter",
}

_REGISTRY: dict[str, type[ModelAdapter]] = {}
_ORIGIN: dict[str, str] = {}  # family -> "builtin" | "registered" | "plugin:<distribution>"
_PLUGIN_ERRORS: dict[str, str] = {}
_preferred: list[str] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make an adapter discoverable by :func:`adapter_for_spec` (key: ``cls.family``)."""
    _REGISTRY[cls.family] = cls
    if cls.family not in _ORIGIN:
        target = _BUILTIN.get(cls.family, "")
        _ORIGIN[cls.family] = "builtin" if target.startswith(cls.__module__ + ":") else "registered"
    return cls


def _import_target(target: str):
    module_name, _, cls_name = target.partition(":")
    return getattr(importlib.import_module(module_name), cls_name)


def _load_builtin(family: str) -> type[ModelAdapter] | None:
    if family in _REGISTRY:
        return _REGISTRY[family]
    target = _BUILTIN.get(family)
    if target is None:
        return None
    try:
        cls = _import_target(target)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("vlmpress"):
            return None  # family not implemented in this build
        raise
    _REGISTRY.setdefault(family, cls)
    _ORIGIN.setdefault(family, "builtin")
    return cls


def plugin_entry_points() -> dict:
    """Installed ``vlmpress.adapters`` entry points by name (not imported)."""
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _load_plugin(family: str) -> type[ModelAdapter] | None:
    ep = plugin_entry_points().get(family)
    if ep is None:
        return None
    try:
        cls = ep.load()
    except Exception as err:  # noqa: BLE001 - a broken plugin must not break other families
        _PLUGIN_ERRORS[family] = f"{type(err).__name__}: {err}"
        logger.warning("adapter plugin '%s' (%s) failed to load: %s", family, ep.value, err)
        return None
    if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
        _PLUGIN_ERRORS[family] = f"{ep.value} is not a vlmpress ModelAdapter subclass"
        logger.warning("adapter plugin '%s': %s", family, _PLUGIN_ERRORS[family])
        return None
    if getattr(cls, "family", None) != family:
        cls.family = family  # the entry-point name is what checkpoints record
    dist = getattr(getattr(ep, "dist", None), "name", None)
    _REGISTRY[family] = cls
    _ORIGIN[family] = f"plugin:{dist}" if dist else "plugin"
    return cls


def _try_load(family: str) -> type[ModelAdapter] | None:
    if family in _REGISTRY:
        return _REGISTRY[family]
    return _load_plugin(family) or _load_builtin(family)


def known_adapters() -> list[str]:
    """Every family that can be loaded now (built-in, registered, installed plugins)."""
    names = set(_REGISTRY) | set(_BUILTIN) | set(plugin_entry_points())
    return sorted(family for family in names if _try_load(family) is not None)


def adapter_origin(family: str) -> str:
    """``builtin``, ``registered`` or ``plugin:<distribution>`` (recorded in checkpoints)."""
    _try_load(family)
    return _ORIGIN.get(family, "unknown")


def get_adapter_class(family: str) -> type[ModelAdapter]:
    """The adapter class of ``family``; a clear error naming what to install when it is missing.

    Only registered names are looked up: a module path is never imported from this argument.
    """
    cls = _try_load(family) if isinstance(family, str) else None
    if cls is None:
        why = f" (its entry point failed to load: {_PLUGIN_ERRORS[family]})" if family in _PLUGIN_ERRORS else ""
        raise UnknownModelSpecError(
            f"unknown adapter family '{family}'{why}; known adapters: {', '.join(known_adapters())}. "
            f"A family outside vlmpress is provided by an installed package declaring an entry point "
            f"'{family}' in the group '{ENTRY_POINT_GROUP}' (see docs/adapters.md)"
        )
    return cls


def _tier(family: str) -> int:
    return 1 if _ORIGIN.get(family, "builtin") == "builtin" else 0


@contextmanager
def use_adapter(family: str | None):
    """Within the block, specs resolve to ``family`` (the CLI's ``--adapter NAME``)."""
    if family is None:
        yield
        return
    get_adapter_class(family)  # fail fast on an unknown name
    _preferred.append(family)
    try:
        yield
    finally:
        _preferred.pop()


def adapter_for_spec(spec: str, adapter: str | None = None) -> type[ModelAdapter]:
    """The adapter class for ``spec`` by the documented precedence (module docstring)."""
    adapter = adapter or (_preferred[-1] if _preferred else None)
    if adapter is not None:
        cls = get_adapter_class(adapter)
        if not cls.accepts(spec):
            raise UnknownModelSpecError(f"adapter '{adapter}' does not accept model spec '{spec}'")
        return cls
    families = known_adapters()
    ordered = sorted(families, key=lambda f: (-getattr(_REGISTRY[f], "priority", 0), _tier(f), f))
    accepting = []
    for family in ordered:
        try:
            if _REGISTRY[family].accepts(spec):
                accepting.append(family)
        except Exception as err:  # noqa: BLE001 - one adapter failing to answer must not break others
            logger.debug("adapter %s could not answer for %s: %s", family, spec, err)
    if accepting:
        if len(accepting) > 1:
            logger.info("adapters %s all accept '%s'; using '%s' (pass --adapter to choose)", accepting, spec, accepting[0])
        return _REGISTRY[accepting[0]]
    if isinstance(spec, str) and spec.startswith("hf:"):
        raise _hf_unsupported(spec)
    raise UnknownModelSpecError(
        f"no adapter accepts model spec '{spec}'. Known adapters: {', '.join(families)}. "
        "Use 'open_clip:NAME[/PRETRAINED]', 'hf:NAME_OR_DIR' or a directory written by 'vlmpress compress'."
    )


def _supported_hf_types() -> str:
    types = []
    for family in known_adapters():
        cls = _REGISTRY[family]
        if isinstance(getattr(cls, "model_type", None), str):
            types.append(f"{cls.model_type} ({family})")
    return ", ".join(types)


def _hf_unsupported(spec: str) -> UnknownModelSpecError:
    """Why no adapter took an ``hf:`` spec: unreadable config (offline, typo) or unsupported type."""
    name = spec[3:]
    try:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(name).model_type
    except Exception as err:  # noqa: BLE001 - any loading failure is reported to the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return UnknownModelSpecError(
            f"cannot use model spec '{spec}': its transformers config could not be read ({first}). Pass a local "
            "directory with config.json, or a hub name that is cached (downloading needs internet)."
        )
    reason = (
        f"it is neither a dual encoder (built in: {_supported_hf_types()}), a generative vision-language model "
        "(an image-text-to-text type whose vision tower / connector / language model the generative base finds) "
        "nor a causal LM (a text-only family with an AutoModelForCausalLM class, configured as a decoder: "
        "masked-LM families need is_decoder=true)"
    )
    return UnsupportedArchitectureError(unsupported_message(spec, model_type, reason))


__all__ = [
    "ENTRY_POINT_GROUP",
    "adapter_for_spec",
    "adapter_origin",
    "get_adapter_class",
    "known_adapters",
    "plugin_entry_points",
    "register_adapter",
    "use_adapter",
]
