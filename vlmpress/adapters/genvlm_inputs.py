"""Per-image model inputs of generative VLMs: image canvases, prefixes of their own length, pairs.

A dynamic-resolution model (Qwen2-VL's grid, LLaVA-NeXT's any-resolution tiles, Idefics3's
splits) turns each image into its own number of image tokens, so the image cannot be reduced to a
fixed pixel tensor before the model's processor sees it. Data loaders still need tensors of one
shape, so an image travels as a **canvas**: a ``(4, S, S)`` uint8 tensor holding the RGB image
(downscaled only when a side exceeds ``S``, aspect ratio kept) in its top-left corner and, in the
fourth plane, 255 where the image is. :func:`canvas_images` recovers the images exactly as pasted;
the model's own processor then builds the real inputs.

:class:`PrefixBatch` holds what the processor made of ``prefix text + image`` for each image: the
prefix token ids (each image its own length), per-token inputs (``mm_token_type_ids``,
``token_type_ids``) and the image inputs (``pixel_values``, ``image_grid_thw``, ``image_sizes``,
``pixel_attention_mask``...). :func:`pair_inputs` appends a caption to each prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image


class CanvasTransform:
    """PIL image -> ``(4, size, size)`` uint8 canvas (RGB + a plane marking the image's pixels)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __repr__(self) -> str:
        return f"CanvasTransform(size={self.size})"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image if image.mode == "RGB" else image.convert("RGB")
        w, h = image.size
        scale = min(1.0, self.size / max(w, h))
        if scale < 1.0:
            w, h = max(1, round(w * scale)), max(1, round(h * scale))
            image = image.resize((w, h), Image.BICUBIC)
        canvas = torch.zeros((4, self.size, self.size), dtype=torch.uint8)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3)
        canvas[:3, :h, :w] = pixels.permute(2, 0, 1)
        canvas[3, :h, :w] = 255
        return canvas


def canvas_images(canvases: torch.Tensor) -> list[Image.Image]:
    """The images pasted into a ``(n, 4, S, S)`` canvas batch, each at its own size."""
    if canvases.dim() != 4 or canvases.shape[1] != 4 or canvases.dtype != torch.uint8:
        raise ValueError(f"expected (n, 4, S, S) uint8 image canvases, got {tuple(canvases.shape)} {canvases.dtype}")
    images = []
    for canvas in canvases.cpu():
        valid = canvas[3] > 0
        h = int(valid.any(dim=1).sum())
        w = int(valid.any(dim=0).sum())
        if h == 0 or w == 0:
            raise ValueError("an image canvas holds no image")
        rgb = canvas[:3, :h, :w].permute(1, 2, 0).contiguous().numpy()
        images.append(Image.fromarray(rgb, "RGB"))
    return images


@dataclass
class PrefixBatch:
    """Prefix ids per image, per-token inputs per image, and the image inputs of all images together."""

    ids: list[list[int]]
    #: per-token inputs, each image's ``(P_i, ...)`` tensor (``mm_token_type_ids``, Mllama's ``cross_attention_mask``)
    per_token: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    image_inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def split_processor_output(encoded) -> PrefixBatch:
    """A processor's padded batch -> per-image prefixes (padding dropped by the attention mask)."""
    ids = encoded["input_ids"]
    mask = encoded.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    per_token: dict[str, list[torch.Tensor]] = {}
    image_inputs: dict[str, torch.Tensor] = {}
    for key, value in encoded.items():
        if key in ("input_ids", "attention_mask") or not isinstance(value, torch.Tensor):
            continue
        if value.dim() >= 2 and value.shape[:2] == ids.shape and not value.is_floating_point():
            per_token[key] = [row[m] for row, m in zip(value, mask)]
        else:
            image_inputs[key] = value
    return PrefixBatch([row[m].tolist() for row, m in zip(ids, mask)], per_token, image_inputs)


def repeat_image_inputs(image_inputs: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The inputs of one image for ``k`` rows (flattened patch tensors, e.g. Qwen's, repeat as k images)."""
    return {key: value.repeat(k, *([1] * (value.dim() - 1))) if value.dim() else value for key, value in image_inputs.items()}


def pair_inputs(
    prefixes: PrefixBatch,
    captions: Sequence[Sequence[int]],
    *,
    pad_id: int,
    caption_values: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Row ``i`` = prefix ``i`` + caption ``i``, right padded; ``caption_mask`` marks the caption tokens.

    Per-token inputs continue over the caption with ``caption_values[key]`` (0 by default: text);
    those with more dimensions per token (Mllama's ``cross_attention_mask``: which image tiles a
    token sees) continue with the prefix's last token's value, so the caption sees what the prompt sees.
    """
    if len(prefixes) != len(captions):
        raise ValueError(f"{len(prefixes)} image prefixes but {len(captions)} captions")
    caption_values = caption_values or {}
    lengths = [len(p) + len(c) for p, c in zip(prefixes.ids, captions)]
    n, length = len(captions), max(lengths)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    caption_mask = torch.zeros((n, length), dtype=torch.bool)
    extra = {
        key: torch.zeros((n, length, *rows[0].shape[1:]), dtype=rows[0].dtype) for key, rows in prefixes.per_token.items()
    }
    for i, (prefix, cap) in enumerate(zip(prefixes.ids, captions)):
        ids[i, : lengths[i]] = torch.tensor(list(prefix) + list(cap), dtype=torch.long)
        attention[i, : lengths[i]] = 1
        caption_mask[i, len(prefix) : lengths[i]] = True
        for key, rows in prefixes.per_token.items():
            extra[key][i, : len(prefix)] = rows[i]
            if rows[i].dim() == 1:
                extra[key][i, len(prefix) : lengths[i]] = caption_values.get(key, 0)
            else:
                extra[key][i, len(prefix) : lengths[i]] = rows[i][-1]
    return {"input_ids": ids, "attention_mask": attention, "caption_mask": caption_mask, **extra, **prefixes.image_inputs}


__all__ = ["CanvasTransform", "PrefixBatch", "canvas_images", "pair_inputs", "repeat_image_inputs", "split_processor_output"]
