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


def tiny_lowrank_open_clip(seed: int = 0, rank: int = 6) -> "OpenClipAdapter":
    """:func:`tiny_open_clip` with every linear layer (attention split) replaced by a rank-``rank`` SVD."""
    adapter = tiny_open_clip(seed=seed)
    adapter.prepare_for_compression()
    names = [n for n, m in adapter.model.named_modules() if isinstance(m, torch.nn.Linear)]
    lowrank_by_svd(adapter.model, names, rank)
    return adapter


# ---------------------------------------------------------------------- more tiny families
_TINY_TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}  # open_clip BPE


def tiny_open_clip_from_cfg(name: str, model_cfg: dict, config_dir: str | Path, seed: int = 0) -> "OpenClipAdapter":
    """Register ``model_cfg`` as open_clip config ``name`` (a json in ``config_dir``) and load it at random init."""
    import json

    import open_clip

    from vlmpress.adapters.open_clip import OpenClipAdapter

    config_dir = Path(config_dir)
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / f"{name}.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(config_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return initialise_uninitialised(OpenClipAdapter.load(f"open_clip:{name}", pretrained_hf=False).eval())


def initialise_uninitialised(adapter):
    """Re-run open_clip's ``init_parameters`` on every module that has one (random-init models only).

    open_clip's CoCa never initialises its decoder's ``text_projection`` (``torch.empty``: zeros or
    NaN, whatever the memory held); pretrained weights overwrite it, a random test model must not keep it.
    """
    with torch.no_grad():
        for module in adapter.model.modules():
            init = getattr(module, "init_parameters", None)
            if not callable(init):
                continue
            try:
                init()
            except (AttributeError, NotImplementedError):  # CoCa's decoder init reads attributes it lacks
                projection = getattr(module, "text_projection", None)
                if isinstance(projection, torch.nn.Parameter):
                    torch.nn.init.normal_(projection, std=projection.shape[0] ** -0.5)
    return adapter


def tiny_open_clip_resnet(config_dir: str | Path, seed: int = 0) -> "OpenClipAdapter":
    """ModifiedResNet vision tower (attention pool) + open_clip text tower."""
    cfg = {"embed_dim": 16, "vision_cfg": {"layers": [1, 1, 1, 1], "width": 8, "head_width": 64, "image_size": 64},
           "text_cfg": _TINY_TEXT_CFG}
    return tiny_open_clip_from_cfg("vlmpress-test-rn", cfg, config_dir, seed)


def tiny_open_clip_timm(config_dir: str | Path, trunk: str = "test_vit", seed: int = 0) -> "OpenClipAdapter":
    """A timm trunk (``test_vit``: packed qkv; ``test_convnext``: convolutions + linear MLPs) + text tower."""
    cfg = {"embed_dim": 16, "vision_cfg": {"timm_model_name": trunk, "timm_model_pretrained": False,
                                           "timm_pool": "avg", "timm_proj": "linear", "image_size": 160},
           "text_cfg": _TINY_TEXT_CFG, "custom_text": True}
    return tiny_open_clip_from_cfg(f"vlmpress-test-{trunk.replace('_', '-')}", cfg, config_dir, seed)


def tiny_open_clip_coca(config_dir: str | Path, seed: int = 0) -> "OpenClipAdapter":
    """open_clip CoCa (contrastive towers + multimodal captioning decoder), shrunk from ``coca_ViT-B-32``."""
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16,
                          "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
           "text_cfg": dict(_TINY_TEXT_CFG, embed_cls=True, output_tokens=True),
           "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                              "attn_pooler_heads": 2},
           "custom_text": True}
    return tiny_open_clip_from_cfg("vlmpress-test-coca", cfg, config_dir, seed)


def tiny_open_clip_hf_text(directory: str | Path, seed: int = 0) -> "OpenClipAdapter":
    """open_clip CustomTextCLIP whose text tower is a transformers RoBERTa (``HFTextEncoder``), built offline."""
    from transformers import RobertaConfig

    directory = Path(directory)
    text_dir = directory / "tiny-roberta"
    tokenizer = tiny_clip_tokenizer(model_max_length=16)
    tokenizer.save_pretrained(directory / "tiny-tokenizer")  # apart from config.json: AutoTokenizer reads it as is
    RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=tokenizer.pad_token_id + 18, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ).save_pretrained(text_dir)
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"hf_model_name": str(text_dir), "hf_tokenizer_name": str(directory / "tiny-tokenizer"), "hf_model_pretrained": False,
                        "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler", "context_length": 16},
           "custom_text": True}
    return tiny_open_clip_from_cfg("vlmpress-test-hf-text", cfg, directory / "configs", seed)


def save_tiny_hf_dual_encoder(kind: str, directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random transformers dual encoder of ``kind`` (siglip2, altclip, chinese_clip, blip) + processors."""
    import transformers as T

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer()
    n = len(tokenizer)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text = dict(_tiny_text_kwargs(n), max_position_embeddings=16, **ids)
    vision = _tiny_vision_kwargs()
    if kind == "siglip2":
        vision = {k: v for k, v in vision.items() if k != "image_size"}
        config, model_cls = T.Siglip2Config(text_config=text, vision_config=dict(vision, num_patches=16)), T.Siglip2Model
        processor = T.Siglip2ImageProcessor(patch_size=8, max_num_patches=16)
    elif kind == "altclip":
        # RoBERTa-style positions start after the padding index, so they must fit pad id + sequence length
        alt_text = dict(text, max_position_embeddings=tokenizer.pad_token_id + 18, project_dim=16, type_vocab_size=1)
        config = T.AltCLIPConfig(text_config=alt_text, vision_config=vision, projection_dim=16)
        model_cls, processor = T.AltCLIPModel, T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    elif kind == "chinese_clip":
        config = T.ChineseCLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
        model_cls = T.ChineseCLIPModel
        processor = T.ChineseCLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    elif kind == "blip":
        blip_text = dict(text, encoder_hidden_size=vision["hidden_size"])
        config = T.BlipConfig(text_config=blip_text, vision_config=vision, image_text_hidden_size=16)
        model_cls, processor = T.BlipForImageTextRetrieval, T.BlipImageProcessor(size={"height": 32, "width": 32})
    else:
        raise ValueError(f"unknown tiny dual encoder kind '{kind}'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def tiny_hf_dual_encoder(kind: str, tmp_dir: str | Path, seed: int = 0):
    """:func:`save_tiny_hf_dual_encoder` loaded through the registry (``hf:<dir>``)."""
    from vlmpress.pipeline.loading import load_model

    directory = save_tiny_hf_dual_encoder(kind, Path(tmp_dir) / f"tiny-{kind}-{seed}", seed=seed)
    return load_model(f"hf:{directory}").eval()


def random_images(n: int, size: int = 48, seed: int = 0):
    """``n`` random RGB PIL images of ``size`` x ``size`` (seeded)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return [
        Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())
        for _ in range(n)
    ]
