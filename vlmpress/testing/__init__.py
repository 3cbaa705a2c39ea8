"""Public test kit for vlmpress and for adapter authors.

* :mod:`~vlmpress.testing.factories` -- tiny, offline, randomly initialised models of every built-in
  family, loaded through the same spec strings users pass (``open_clip:...``, ``hf:DIR``);
* :mod:`~vlmpress.testing.genvlm` -- tiny generative VLMs (LLaVA, PaliGemma) and image folders;
* :mod:`~vlmpress.testing.genvlm_families` -- tiny dynamic-resolution VLMs (Qwen2-VL, LLaVA-NeXT) with
  their own processors;
* :mod:`~vlmpress.testing.genvlm_census` -- every image-text-to-text family built tiny from its default
  config and processor classes, and its round trip (the census of ``scripts/zoo_table.py``);
* :mod:`~vlmpress.testing.conformance` -- :func:`check_adapter`, the six checks an adapter must pass
  (dispatching generative VLMs to :mod:`~vlmpress.testing.conformance_genvlm`);
* :mod:`~vlmpress.testing.zoo` -- the zoo round trip (shrunk copies of every open_clip config and
  transformers dual encoder through compress -> save -> load -> export).

The top of the import graph next to :mod:`vlmpress.commands`: it may import every other package,
and nothing in the library imports it.
"""

from vlmpress.testing.conformance import check_adapter
from vlmpress.testing.factories import (
    TINY_OPEN_CLIP_SPEC,
    lowrank_by_svd,
    random_images,
    save_tiny_hf_clip,
    save_tiny_hf_dual_encoder,
    save_tiny_hf_siglip,
    tiny_clip_tokenizer,
    tiny_hf_clip,
    tiny_hf_dual_encoder,
    tiny_hf_siglip,
    tiny_open_clip,
    tiny_open_clip_coca,
    tiny_open_clip_from_cfg,
    tiny_open_clip_hf_text,
    tiny_open_clip_resnet,
    tiny_open_clip_timm,
)

__all__ = [
    "TINY_OPEN_CLIP_SPEC",
    "check_adapter",
    "lowrank_by_svd",
    "random_images",
    "save_tiny_hf_clip",
    "save_tiny_hf_dual_encoder",
    "save_tiny_hf_siglip",
    "tiny_clip_tokenizer",
    "tiny_hf_clip",
    "tiny_hf_dual_encoder",
    "tiny_hf_siglip",
    "tiny_open_clip",
    "tiny_open_clip_coca",
    "tiny_open_clip_from_cfg",
    "tiny_open_clip_hf_text",
    "tiny_open_clip_resnet",
    "tiny_open_clip_timm",
]
