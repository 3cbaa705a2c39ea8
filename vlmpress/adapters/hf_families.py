"""More transformers dual encoders on :class:`~vlmpress.adapters.hf_dual_encoder.HFDualEncoderAdapter`.

* SigLIP2 (``siglip2``): the NaFlex vision tower takes flattened patches plus a patch mask and the
  patch grid; vlmpress feeds it fixed-size square images (the processor's ``max_num_patches`` grid),
  patchified exactly as ``Siglip2ImageProcessor`` does. Text as SigLIP: max-length padding, no mask.
* AltCLIP (``altclip``): XLM-R text tower (bidirectional, attention mask marks padding).
* Chinese-CLIP (``chinese_clip``): BERT text tower, CLIP vision tower.
* BLIP image-text retrieval (``blip``, ``BlipForImageTextRetrieval``): the contrastive path uses
  ``vision_proj``/``text_proj`` on the [CLS] states; the text encoder's cross-attention layers and the
  ITM head serve only image-text matching, so they are not targets (listed as untargeted).
"""

from __future__ import annotations

import math

import torch

from vlmpress.adapters.registry import register_adapter
from vlmpress.adapters.hf_dual_encoder import HFDualEncoderAdapter, loader_options


@register_adapter
class HFSiglip2Adapter(HFDualEncoderAdapter):
    family = "hf_siglip2"
    model_type = "siglip2"
    model_class_name = "Siglip2Model"
    config_class_name = "Siglip2Config"
    uses_attention_mask = False
    padding = "max_length"

    @classmethod
    def _load_preprocessing(cls, source, local_only: bool = False):
        from transformers import AutoTokenizer, Siglip2ImageProcessor

        opts = loader_options(local_only)
        # a concrete class: no remote code to switch off, only the file source
        processor = Siglip2ImageProcessor.from_pretrained(str(source), **{k: v for k, v in opts.items() if k != "trust_remote_code"})
        return AutoTokenizer.from_pretrained(str(source), **opts), _FixedGridSiglip2Processor(processor)

    def image_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = pixels.to(self.device)
        p = self.model.config.vision_config.patch_size
        n, c, h, w = pixels.shape
        patches = pixels.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), -1)
        mask = torch.ones(patches.shape[:2], dtype=torch.long, device=pixels.device)
        shapes = torch.tensor([[h // p, w // p]] * n, dtype=torch.long, device=pixels.device)
        return {"pixel_values": patches, "pixel_attention_mask": mask, "spatial_shapes": shapes}


class _FixedGridSiglip2Processor:
    """Siglip2ImageProcessor resizing every image to the square grid of ``max_num_patches``."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, images, return_tensors="pt"):
        side = int(math.isqrt(self.processor.max_num_patches)) * self.processor.patch_size
        image = images.convert("RGB").resize((side, side))
        mean = torch.tensor(self.processor.image_mean).view(3, 1, 1)
        std = torch.tensor(self.processor.image_std).view(3, 1, 1)
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(side, side, 3).permute(2, 0, 1)
        x = (x.float() * self.processor.rescale_factor - mean) / std
        return {"pixel_values": x.unsqueeze(0)}

    def save_pretrained(self, out_dir):
        self.processor.save_pretrained(out_dir)


@register_adapter
class HFAltClipAdapter(HFDualEncoderAdapter):
    family = "hf_altclip"
    model_type = "altclip"
    model_class_name = "AltCLIPModel"
    config_class_name = "AltCLIPConfig"

    def tokenizer_kwargs(self) -> dict:
        # XLM-R position ids start after the padding index: max_position_embeddings - pad_token_id - 1 tokens fit
        text = self._text_config()
        return {"padding": True, "max_length": text.max_position_embeddings - (text.pad_token_id or 0) - 1}


@register_adapter
class HFChineseClipAdapter(HFDualEncoderAdapter):
    family = "hf_chinese_clip"
    model_type = "chinese_clip"
    model_class_name = "ChineseCLIPModel"
    config_class_name = "ChineseCLIPConfig"


@register_adapter
class HFBlipRetrievalAdapter(HFDualEncoderAdapter):
    family = "hf_blip_itr"
    model_type = "blip"
    model_class_name = "BlipForImageTextRetrieval"
    config_class_name = "BlipConfig"
    towers = {"vision": ("vision_model.", "vision_proj"), "text": ("text_encoder.", "text_proj")}
    exclude_patterns = (r"\.crossattention\.",)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        states = self.model.vision_model(pixel_values=pixels.to(self.device)).last_hidden_state
        return self.model.vision_proj(states[:, 0, :])

    def encode_text(self, tokens) -> torch.Tensor:
        inputs = self.text_inputs(tokens)
        states = self.model.text_encoder(
            input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), return_dict=True
        ).last_hidden_state
        return self.model.text_proj(states[:, 0, :])

    def logit_scale(self) -> float:
        return 1.0 / float(self.model.config.__dict__.get("logit_scale_init_value", 1.0) or 1.0)
