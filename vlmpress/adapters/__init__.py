"""Model families: what vlmpress knows about each architecture, and nothing about compression.

Owns the adapter interface (:mod:`~vlmpress.adapters.base`), structural layer discovery
(:mod:`~vlmpress.adapters.discovery`), the registry that maps a model spec to an adapter class
(:mod:`~vlmpress.adapters.registry`: built-ins, ``@register_adapter`` and entry-point plugins), one
module per family (open_clip, HF dual encoders, HF causal LMs, HF generative VLMs: the structure-driven
base :mod:`~vlmpress.adapters.hf_generative` with :mod:`~vlmpress.adapters.genvlm_structure` and
:mod:`~vlmpress.adapters.genvlm_inputs`, LLaVA / PaliGemma in :mod:`~vlmpress.adapters.hf_llava`), and the
per-expert form of fused MoE experts (:mod:`~vlmpress.adapters.routed_experts`).

May import :mod:`vlmpress.core`, :mod:`vlmpress.data`, :mod:`vlmpress.io` and :mod:`vlmpress.errors`;
never the pipeline, evaluation or commands (loading a *compressed* checkpoint lives in
:mod:`vlmpress.pipeline.loading`).
"""

from vlmpress.adapters.base import (
    ModelAdapter,
    TargetLayer,
    VisionLanguageAdapter,
    replace_module,
    select_targets,
    weight_matrix,
)
from vlmpress.adapters.registry import (
    ENTRY_POINT_GROUP,
    adapter_for_spec,
    adapter_origin,
    get_adapter_class,
    known_adapters,
    plugin_entry_points,
    register_adapter,
    use_adapter,
)


#: the public transformers bases, imported on first use (they need torch/transformers helpers only)
_LAZY_BASES = {
    "HFDualEncoderAdapter": "vlmpress.adapters.hf_dual_encoder",
    "HFCausalLMAdapter": "vlmpress.adapters.hf_causal_lm",
    "HFGenerativeVLMAdapter": "vlmpress.adapters.hf_llava",
}


def __getattr__(name: str):
    if name in _LAZY_BASES:
        import importlib

        return getattr(importlib.import_module(_LAZY_BASES[name]), name)
    raise AttributeError(name)


__all__ = [
    "ENTRY_POINT_GROUP",
    "HFCausalLMAdapter",
    "HFDualEncoderAdapter",
    "HFGenerativeVLMAdapter",
    "ModelAdapter",
    "TargetLayer",
    "VisionLanguageAdapter",
    "adapter_for_spec",
    "adapter_origin",
    "get_adapter_class",
    "known_adapters",
    "plugin_entry_points",
    "register_adapter",
    "use_adapter",
    "replace_module",
    "select_targets",
    "weight_matrix",
]
