"""Adapter registry: model spec string -> adapter class.

Specs:
* ``open_clip:NAME`` (random init), ``open_clip:NAME/TAG`` (e.g. ``open_clip:ViT-B-16/openai``) or
  ``open_clip:NAME/PATH`` (a local checkpoint file);
* ``hf:NAME_OR_DIR`` -- transformers models; the adapter is picked from the config's model_type;
* a directory written by ``save_compressed`` (holds ``vlmpress_config.json``).

Adding a family: write ``vlmpress/adapters/<family>.py`` with a :class:`ModelAdapter` subclass and
add its import path to ``_BUILTIN`` below.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from vlmpress.adapters.base import (
    ModelAdapter,
    TargetLayer,
    VisionLanguageAdapter,
    replace_module,
    select_targets,
    weight_matrix,
)
from vlmpress.errors import UnknownModelSpecError

# family -> "module:ClassName"; imported lazily so a missing optional dependency only affects its family
_BUILTIN: dict[str, str] = {
    "open_clip": "vlmpress.adapters.open_clip:OpenClipAdapter",
    "hf_clip": "vlmpress.adapters.hf_clip:HFClipAdapter",
    "hf_siglip": "vlmpress.adapters.hf_clip:HFSiglipAdapter",
    "hf_causal_lm": "vlmpress.adapters.hf_causal_lm:HFCausalLMAdapter",
    "hf_llava": "vlmpress.adapters.hf_llava:HFLlavaAdapter",
    "hf_paligemma": "vlmpress.adapters.hf_llava:HFPaliGemmaAdapter",
}

_REGISTRY: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make an adapter discoverable by :func:`adapter_for_spec`."""
    _REGISTRY[cls.family] = cls
    return cls


def _load_builtin(family: str) -> type[ModelAdapter] | None:
    if family in _REGISTRY:
        return _REGISTRY[family]
    target = _BUILTIN.get(family)
    if target is None:
        return None
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("vlmpress"):
            return None  # family not implemented in this build
        raise
    cls = getattr(module, cls_name)
    _REGISTRY.setdefault(family, cls)
    return cls


def known_adapters() -> list[str]:
    names = set(_REGISTRY)
    for family in _BUILTIN:
        if _load_builtin(family) is not None:
            names.add(family)
    return sorted(names)


def get_adapter_class(family: str) -> type[ModelAdapter]:
    cls = _load_builtin(family)
    if cls is None:
        raise UnknownModelSpecError(f"unknown adapter family '{family}'; known adapters: {', '.join(known_adapters())}")
    return cls


def adapter_for_spec(spec: str) -> type[ModelAdapter]:
    """The adapter class that accepts ``spec``; a clear error listing known adapters otherwise."""
    for family in known_adapters():
        cls = get_adapter_class(family)
        if cls.accepts(spec):
            return cls
    if spec.startswith("hf:"):
        raise UnknownModelSpecError(f"cannot use model spec '{spec}': {_hf_problem(spec[3:])}")
    raise UnknownModelSpecError(
        f"no adapter accepts model spec '{spec}'. Known adapters: {', '.join(known_adapters())}. "
        "Use 'open_clip:NAME[/PRETRAINED]', 'hf:NAME_OR_DIR' or a directory written by 'vlmpress compress'."
    )


def _hf_problem(name: str) -> str:
    """Why no adapter took an ``hf:`` spec: unreadable config (offline, typo) or unsupported type."""
    try:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(name).model_type
    except Exception as err:  # noqa: BLE001 - any loading failure is reported to the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return (
            f"its transformers config could not be read ({first}). Pass a local directory with config.json, "
            "or a hub name that is cached (downloading needs internet)."
        )
    return f"model_type '{model_type}' is not supported by any adapter (known: {', '.join(known_adapters())})"


def is_compressed_dir(spec: str) -> bool:
    return Path(spec).is_dir() and (Path(spec) / "vlmpress_config.json").is_file()


def load_model(spec: str, *, device="cpu", **kwargs) -> ModelAdapter:
    """Load any model vlmpress knows: a spec string or a compressed checkpoint directory."""
    if is_compressed_dir(spec):
        from vlmpress.checkpoint import load_compressed

        return load_compressed(spec, device=device)
    return adapter_for_spec(spec).load(spec, device=device, **kwargs)


__all__ = [
    "ModelAdapter",
    "TargetLayer",
    "VisionLanguageAdapter",
    "adapter_for_spec",
    "get_adapter_class",
    "is_compressed_dir",
    "known_adapters",
    "load_model",
    "register_adapter",
    "replace_module",
    "select_targets",
    "weight_matrix",
]
