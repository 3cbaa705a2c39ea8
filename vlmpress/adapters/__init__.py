"""Model families: what vlmpress knows about each architecture, and nothing about compression.

Owns the adapter interface (:mod:`~vlmpress.adapters.base`), structural layer discovery
(:mod:`~vlmpress.adapters.discovery`), the registry that maps a model spec to an adapter class
(:mod:`~vlmpress.adapters.registry`: built-ins, ``@register_adapter`` and entry-point plugins) and one
module per family (open_clip, HF dual encoders, HF causal LMs, HF generative VLMs: the structure-driven
base :mod:`~vlmpress.adapters.hf_generative` with :mod:`~vlmpress.adapters.genvlm_structure` and
:mod:`~vlmpress.adapters.genvlm_inputs`, LLaVA / PaliGemma in :mod:`~vlmpress.adapters.hf_llava`).

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


def __getattr__(name: str):
    # the public dual-encoder base, imported on first use (it needs torch/transformers helpers only)
    if name == "HFDualEncoderAdapter":
        from vlmpress.adapters.hf_dual_encoder import HFDualEncoderAdapter

        return HFDualEncoderAdapter
    raise AttributeError(name)


__all__ = [
    "ENTRY_POINT_GROUP",
    "HFDualEncoderAdapter",
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
