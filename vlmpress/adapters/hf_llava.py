"""LLaVA and PaliGemma: fixed-geometry instances of the generative base.

Both resize every image to one resolution, so the image + prompt prefix has the same token ids
for every image: :attr:`~vlmpress.adapters.hf_generative.HFGenerativeVLMAdapter.fixed_prefix`
computes it once and images are preprocessed to pixel tensors. Structure (groups ``vision`` /
``projector`` / ``text``, kinds, ``vision_feature_layer``), calibration, the KV-cache likelihood and
export are the base's (:mod:`vlmpress.adapters.hf_generative`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmpress.adapters.hf_generative import (  # noqa: F401  (re-exported: the public names of this module)
    DEFAULT_PROMPT,
    LLAVA15_CHAT_TEMPLATE,
    HFGenerativeVLMAdapter,
    PairedCalibration,
    build_paired_calibration,
)


class HFLlavaAdapter(HFGenerativeVLMAdapter):
    """transformers ``LlavaForConditionalGeneration`` (``hf:llava-hf/llava-1.5-7b-hf`` or a local directory)."""

    family = "hf_llava"
    priority = 0
    fixed_prefix = True
    model_types = ("llava",)
    model_class_name = "LlavaForConditionalGeneration"
    config_class_name = "LlavaConfig"


class HFPaliGemmaAdapter(HFGenerativeVLMAdapter):
    """transformers ``PaliGemmaForConditionalGeneration`` (SigLIP tower + linear projector + Gemma).

    PaliGemma is a prefix-LM: image and prompt attend to each other bidirectionally, the answer
    causally (``token_type_ids`` 0 on the prefix, 1 on the answer). Its processor inserts the image
    tokens, BOS and the closing newline itself; the default prompt is PaliGemma's captioning task
    ``caption en``. The vision tower's last hidden state is read, so every block is a target.
    """

    family = "hf_paligemma"
    priority = 0
    fixed_prefix = True
    model_types = ("paligemma",)
    model_class_name = "PaliGemmaForConditionalGeneration"
    config_class_name = "PaliGemmaConfig"
    default_prompt = "caption en"

    def __init__(self, model: nn.Module, spec: str, *, name: str, processor: Any = None, prompt: str | None = None):
        super().__init__(model, spec, name=name, processor=processor, prompt=prompt or self.default_prompt)

    @classmethod
    def build_from_spec_config(cls, config: dict, **kwargs: Any) -> "HFPaliGemmaAdapter":
        return super().build_from_spec_config({**config, "prompt": config.get("prompt", cls.default_prompt)}, **kwargs)

    def prefix_text(self) -> str:
        processor = self._require_processor()
        return f"{getattr(processor, 'image_token', '<image>')}{self.prompt}"

    def caption_lead(self) -> str:
        return ""  # the processor ends the prefix with a newline

    def extra_inputs(self, input_ids: torch.Tensor, caption_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if caption_mask is None:  # a bare prefix: all bidirectional
            return {"token_type_ids": torch.zeros_like(input_ids)}
        prefix_len = int(caption_mask[0].nonzero()[0]) if caption_mask[0].any() else input_ids.shape[1]
        types = torch.ones_like(input_ids)
        types[:, :prefix_len] = 0
        return {"token_type_ids": types}

    def _fixed_image_features(self, base: nn.Module, pixels: torch.Tensor) -> Any:
        return base.get_image_features(pixel_values=self._pixels(pixels))


__all__ = ["DEFAULT_PROMPT", "HFGenerativeVLMAdapter", "HFLlavaAdapter", "HFPaliGemmaAdapter", "PairedCalibration", "build_paired_calibration"]
