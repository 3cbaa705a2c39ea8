"""Tiny, offline dynamic-resolution generative VLMs with their processors, for tests and the zoo.

* :func:`save_tiny_qwen2_vl` -- Qwen2-VL: a 2-block vision transformer with a patch merger over a
  dynamic grid (each image its own number of tokens) and M-RoPE position ids in the LM;
* :func:`save_tiny_llava_next` -- LLaVA-NeXT: any-resolution tiling (a base tile plus one tile per
  grid cell of the best pinpoint for the image's aspect ratio) and an image newline token.

Both are written with ``save_pretrained`` (model + the family's own processor: its image processor
class at small sizes, a byte-level BPE trained in memory holding the family's special tokens, a
chat template) and loaded back through ``hf:<dir>``, the path users take. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vlmpress.testing.genvlm import save_seeded

#: a generic one-turn template: the processor's image placeholder(s), the prompt, then "answer:"
def chat_template(image_text: str) -> str:
    return (
        "{% for m in messages %}{% for p in m['content'] %}{% if p['type'] == 'image' %}" + image_text
        + "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} answer:{% endif %}"
    )


def tiny_tokenizer(special_tokens: Sequence[str], model_max_length: int = 1024, named: dict[str, str] | None = None):
    """The tiny test BPE (:func:`vlmpress.testing.genvlm.tiny_vlm_tokenizer`) plus the family's special tokens.

    ``named`` maps attribute names to tokens (``{"image_token": "<image>"}``): transformers 5
    processors read ``tokenizer.image_token`` / ``tokenizer.image_token_id``; they are saved with it.
    """
    from vlmpress.testing.genvlm import tiny_vlm_tokenizer

    tokenizer = tiny_vlm_tokenizer(model_max_length=model_max_length)
    named = dict(named or {})
    extra = [t for t in dict.fromkeys([*special_tokens, *named.values()]) if t not in tokenizer.get_vocab()]
    if extra:
        tokenizer.add_tokens(extra, special_tokens=True)
    if named:
        tokenizer._set_model_specific_special_tokens(special_tokens=named)
    return tokenizer


def save_tiny_qwen2_vl(directory: str | Path, seed: int = 0, *, hidden: int = 64, patch_size: int = 8) -> Path:
    """A tiny random ``Qwen2VLForConditionalGeneration`` + ``Qwen2VLProcessor`` (images 16-64 px a side)."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = tiny_tokenizer(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    grid = dict(patch_size=patch_size, merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=(2 * patch_size) ** 2, max_pixels=(8 * patch_size) ** 2, **grid),
        video_processor=Qwen2VLVideoProcessor(**grid),
        tokenizer=tokenizer,
        chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"),
    )
    heads = 4
    head_dim = hidden // heads
    half = head_dim // 2  # M-RoPE sections (temporal, height, width) sum to head_dim / 2
    temporal = half // 4
    height = (half - temporal) // 2
    config = Qwen2VLConfig(
        vision_config=dict(
            depth=2, embed_dim=hidden // 2, hidden_size=hidden, num_heads=2, mlp_ratio=2,
            patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2,
        ),
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [temporal, height, half - temporal - height]},
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    return save_seeded(Qwen2VLForConditionalGeneration, config, processor, Path(directory), seed)


def save_tiny_llava_next(directory: str | Path, seed: int = 0, *, hidden: int = 32, tile: int = 32, patch_size: int = 8) -> Path:
    """A tiny random ``LlavaNextForConditionalGeneration`` + ``LlavaNextProcessor`` (tiles of ``tile`` px)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = tiny_tokenizer(["<image>"])
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints,
        ),
        tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=chat_template("<image>\n"),
    )
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3, num_attention_heads=2,
            image_size=tile, patch_size=patch_size,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default", vision_feature_layer=-2, tie_word_embeddings=False,
    )
    return save_seeded(LlavaNextForConditionalGeneration, config, processor, Path(directory), seed)


def tiny_generative(kind: str, tmp_dir: str | Path, seed: int = 0):
    """``"qwen2_vl"`` or ``"llava_next"``: saved under ``tmp_dir`` and loaded through ``hf:<dir>``."""
    from vlmpress.pipeline.loading import load_model

    save = {"qwen2_vl": save_tiny_qwen2_vl, "llava_next": save_tiny_llava_next}[kind]
    directory = save(Path(tmp_dir) / f"tiny-{kind}-{seed}", seed=seed)
    return load_model(f"hf:{directory}").eval()


__all__ = ["chat_template", "save_tiny_llava_next", "save_tiny_qwen2_vl", "tiny_generative", "tiny_tokenizer"]
