"""Tiny, offline model factories for tests (random weights, seconds to build on CPU).

Every factory goes through the same loading path users get (``open_clip:NAME`` or ``hf:DIR``), so
tests exercise the real adapters rather than hand-built stand-ins.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # imported lazily: each factory only needs its own optional dependency
    from vlmpress.adapters.hf_clip import HFClipAdapter, HFSiglipAdapter
    from vlmpress.adapters.open_clip import OpenClipAdapter

#: open_clip config shipped in ``configs/models/vlmpress-tiny.json`` (32px ViT, 2+2 layers, width 64)
TINY_OPEN_CLIP_SPEC = "open_clip:vlmpress-tiny"


def tiny_open_clip(seed: int = 0) -> "OpenClipAdapter":
    """A randomly initialised tiny open_clip CLIP (``open_clip:vlmpress-tiny``), in eval mode."""
    from vlmpress.adapters.open_clip import OpenClipAdapter

    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream untouched
        torch.manual_seed(seed)
        return OpenClipAdapter.load(TINY_OPEN_CLIP_SPEC).eval()


def _tiny_text_kwargs(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )


def _tiny_vision_kwargs() -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-unicode table (the symbol alphabet of byte-level BPE)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_clip_tokenizer(model_max_length: int = 16):
    """A CLIP BPE tokenizer over the 256 byte symbols plus a few merges (built in memory, offline)."""
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("o", "t")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def save_tiny_hf_clip(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``CLIPModel`` with tokenizer and image processor to ``directory``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer()
    vocab_size = len(tokenizer)
    config = CLIPConfig(
        text_config=dict(
            _tiny_text_kwargs(vocab_size),
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=_tiny_vision_kwargs(),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def tiny_hf_clip(tmp_dir: str | Path, seed: int = 0) -> "HFClipAdapter":
    """A tiny random transformers ``CLIPModel`` saved to ``tmp_dir`` and loaded via ``hf:<dir>``."""
    from vlmpress.adapters.hf_clip import HFClipAdapter

    directory = save_tiny_hf_clip(Path(tmp_dir) / f"tiny-hf-clip-{seed}", seed=seed)
    return HFClipAdapter.load(f"hf:{directory}").eval()


def save_tiny_hf_siglip(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``SiglipModel`` with tokenizer and image processor to ``directory``."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # SigLIP's own tokenizer is sentencepiece-based; any tokenizer that pads to a fixed length
    # serves the adapter equally (it only reads input_ids), so the tiny BPE one is reused.
    tokenizer = tiny_clip_tokenizer()
    config = SiglipConfig(
        text_config=dict(
            _tiny_text_kwargs(len(tokenizer)),
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=_tiny_vision_kwargs(),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipModel(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def tiny_hf_siglip(tmp_dir: str | Path, seed: int = 0) -> "HFSiglipAdapter":
    """A tiny random transformers ``SiglipModel`` saved to ``tmp_dir`` and loaded via ``hf:<dir>``."""
    from vlmpress.adapters.hf_clip import HFSiglipAdapter

    directory = save_tiny_hf_siglip(Path(tmp_dir) / f"tiny-hf-siglip-{seed}", seed=seed)
    return HFSiglipAdapter.load(f"hf:{directory}").eval()


def lowrank_by_svd(model: torch.nn.Module, names: list[str], rank: int) -> None:
    """Replace the named ``nn.Linear`` layers by rank-``rank`` truncated-SVD ``LowRankLinear`` ones.

    Simulates a compressed model in tests (export, checkpointing) without running calibration.
    """
    from vlmpress.adapters.base import replace_module
    from vlmpress.core.lowrank import LowRankLinear

    for name in names:
        layer = model.get_submodule(name)
        u, s, vh = torch.linalg.svd(layer.weight.detach(), full_matrices=False)
        a = u[:, :rank] * s[:rank]
        b = vh[:rank]
        replace_module(model, name, LowRankLinear.from_factors(a, b, layer.bias))
