"""transformers CLIP / SigLIP adapters (``hf:NAME_OR_DIR`` whose config ``model_type`` is clip/siglip).

Targets are every linear layer of ``vision_model``/``text_model`` and the two projections (see
:class:`~vlmpress.adapters.hf_dual_encoder.HFDualEncoderAdapter`). SigLIP's attention-pooling head
(``vision_model.head``, a packed ``nn.MultiheadAttention``) is split exactly into q/k/v/out linears
for compression and re-packed by ``export_dense``.

Text calibration masks:

* CLIP: the tokenizer's ``attention_mask`` (real tokens up to and including end-of-text); the model
  is causal and pools the end-of-text token, so padding never reaches the output.
* SigLIP: pads to ``max_length`` (64 for released models) and was trained without an attention mask,
  pooling the *last* position with bidirectional attention -- every position, padding included,
  influences the output, so all positions are valid (no mask).
"""

from __future__ import annotations

from vlmpress.adapters.registry import register_adapter
from vlmpress.adapters.hf_dual_encoder import (  # noqa: F401 - re-exported for existing imports
    PREFIX,
    HFDualEncoderAdapter,
    ImageProcessorTransform,
    _HFDualEncoderAdapter,
    _features,
    hf_model_type,
    hf_name,
)


@register_adapter
class HFClipAdapter(HFDualEncoderAdapter):
    """transformers ``CLIPModel`` (``hf:openai/clip-vit-base-patch16`` or a local directory)."""

    family = "hf_clip"
    model_type = "clip"
    model_class_name = "CLIPModel"
    config_class_name = "CLIPConfig"
    # pads to the longest caption (cheaper than 77); the attention mask marks padding


@register_adapter
class HFSiglipAdapter(HFDualEncoderAdapter):
    """transformers ``SiglipModel`` (``hf:google/siglip-base-patch16-224`` or a local directory)."""

    family = "hf_siglip"
    model_type = "siglip"
    model_class_name = "SiglipModel"
    config_class_name = "SiglipConfig"
    # SigLIP was trained on max_length-padded text without an attention mask; passing one changes outputs.
    uses_attention_mask = False
    padding = "max_length"
