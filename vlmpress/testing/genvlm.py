"""Tiny, offline generative VLMs for tests: a random LLaVA (CLIP vision tower + Llama decoder) with
its processor (CLIP image processor + a byte-level BPE tokenizer trained in memory + a chat template).

Saved with ``save_pretrained`` and loaded back through ``hf:<dir>``, the path users take.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmpress.adapters.hf_llava import LLAVA15_CHAT_TEMPLATE as CHAT_TEMPLATE  # noqa: F401  (re-exported)

_CAPTION_TEXT = (
    "a photo of a cat. a photo of a dog. a bad photo of the bird. a close-up photo of a car. "
    "what is shown in this image? user assistant "
)


def tiny_vlm_tokenizer(corpus: str = "", vocab_size: int = 320, model_max_length: int = 256):
    """Byte-level BPE (trained offline on a small text) with ``<image>`` as an added special token."""
    from vlmpress.reference.lm import TINY_TEXT, train_tokenizer

    tokenizer = train_tokenizer(TINY_TEXT + _CAPTION_TEXT + corpus, vocab_size=vocab_size, model_max_length=model_max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def save_tiny_llava(
    directory: str | Path,
    seed: int = 0,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_layers: int = 3,
    text_layers: int = 2,
    hidden: int = 32,
    max_positions: int = 256,
    chat_template: bool = True,
) -> Path:
    """Write a tiny random ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` to ``directory``."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_vlm_tokenizer(model_max_length=max_positions)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token (dropped again by the 'default' strategy)
        chat_template=CHAT_TEMPLATE if chat_template else None,
    )
    vision = CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=vision_layers, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    return save_seeded(LlavaForConditionalGeneration, config, processor, directory, seed)


def save_seeded(model_cls, config, processor, directory: str | Path, seed: int) -> Path:
    """``model_cls(config)`` initialised under ``seed`` (the global RNG untouched), saved with ``processor``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    return directory


def tiny_llava(tmp_dir: str | Path, seed: int = 0, **kwargs):
    """A tiny random LLaVA saved under ``tmp_dir`` and loaded through ``hf:<dir>``."""
    from vlmpress.adapters.hf_llava import HFLlavaAdapter

    directory = save_tiny_llava(Path(tmp_dir) / f"tiny-llava-{seed}", seed=seed, **kwargs)
    return HFLlavaAdapter.load(f"hf:{directory}").eval()


def write_image_folder(root: str | Path, classes: tuple[str, ...] = ("cat", "dog", "bird"), per_class: int = 4, seed: int = 0) -> Path:
    """A tiny on-disk image folder (one sub-folder per class, random-colour JPEGs)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, size=(24 + 4 * c, 28, 3), dtype=np.uint8)
            pixels[..., c % 3] = 200  # a class-dependent tint
            Image.fromarray(pixels).save(root / name / f"{i}.jpg")
    return root


def plain_per_class_log_likelihoods(adapter, pixels: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """The reference for likelihood zero-shot: one ordinary forward (no cache) of image + prompt + caption
    per (image, caption), summing the caption tokens' log-probabilities (accumulated in float64)."""
    out = torch.zeros(len(pixels), len(captions))
    for i in range(len(pixels)):
        for j, caption in enumerate(captions):
            batch = adapter.pair_batch(pixels[i : i + 1], [caption])
            with torch.no_grad():
                logp = torch.log_softmax(adapter.forward_tokens(batch).logits[0].double(), -1)
            ids, mask = batch["input_ids"][0], batch["caption_mask"][0]
            out[i, j] = sum(float(logp[t - 1, ids[t]]) for t in range(len(ids)) if mask[t])
    return out


__all__ = ["CHAT_TEMPLATE", "plain_per_class_log_likelihoods", "save_seeded", "save_tiny_llava", "save_tiny_paligemma", "tiny_llava", "tiny_vlm_tokenizer", "write_image_folder"]


def save_tiny_paligemma(directory: str | Path, seed: int = 0, *, image_size: int = 32, patch_size: int = 8, hidden: int = 32) -> Path:
    """Write a tiny random ``PaliGemmaForConditionalGeneration`` + ``PaliGemmaProcessor`` to ``directory``."""
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from vlmpress.reference.lm import TINY_TEXT, train_tokenizer

    tokenizer = train_tokenizer(TINY_TEXT + _CAPTION_TEXT, vocab_size=320, model_max_length=256)
    n_tokens = (image_size // patch_size) ** 2
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = n_tokens
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds <image> + loc/seg tokens
    vision = SiglipVisionConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, vision_use_head=False,
    )
    text = GemmaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = PaliGemmaConfig(
        vision_config=vision, text_config=text, image_token_id=processor.image_token_id, projection_dim=hidden,
    )
    config.vision_config.projection_dim = hidden
    return save_seeded(PaliGemmaForConditionalGeneration, config, processor, directory, seed)
