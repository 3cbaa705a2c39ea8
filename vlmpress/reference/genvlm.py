"""A small generative VLM (LLaVA layout) built on the Caltech-101 reference CLIP, trained here.

Recipe (:class:`GenVLMConfig`, embedded and seeded; the cache key hashes it with the CLIP
reference's own key, so a changed recipe or a retrained CLIP trains a new VLM):

1. **Vision tower**: the reference CLIP's open_clip ViT converted to a transformers
   ``CLIPVisionModel`` (:func:`openclip_visual_to_hf`, exact up to float rounding) and *frozen*,
   as in LLaVA's first stage. The LM reads the last block's tokens, class token included
   (``vision_feature_layer=-1``, strategy ``full``).
2. **Projector**: LLaVA's two-layer GELU MLP, vision width -> LM width, trained.
3. **Decoder**: a small Llama trained from scratch, with a byte-level BPE tokenizer trained on the
   captions and prompt only.
4. **Data**: the Caltech-101 ``train.txt`` images (never ``test.txt``), each epoch paired with its
   class name in a randomly drawn prompt template (the data set's own ensemble); the loss is the
   caption tokens' cross-entropy given image + prompt (chat template), exactly the sequence that
   :mod:`vlmpress.evaluation.likelihood` scores.

The frozen tower's features are computed once, so training costs only projector + LM steps.
Output: a stock ``LlavaForConditionalGeneration`` directory (``save_pretrained`` + its
``LlavaProcessor``), loadable as ``hf:<dir>``, plus ``reference.json`` with the recipe, losses
and timings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vlmpress.errors import CheckpointError
from vlmpress.io import atomic_write
from vlmpress.io.resources import cache_dir

logger = logging.getLogger(__name__)

FORMAT = "vlmpress-genvlm-reference/1"
SIDECAR = "reference.json"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class GenVLMConfig:
    """Everything that decides the trained weights of the generative reference VLM."""

    name: str = "caltech101-llava"
    clip_reference: str = "caltech101"
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 384
    vocab_size: int = 1024
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 60
    grad_clip: float = 1.0
    seed: int = 0
    max_train_images: int | None = None  # quick mode (tests)
    #: templates added to the data set's own ensemble for training (the single evaluation template)
    extra_templates: tuple[str, ...] = ("a photo of a {}.",)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "GenVLMConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


CALTECH101_LLAVA = GenVLMConfig()
# the same recipe on the digits reference CLIP (32 px, 4 blocks): minutes on 2 CPU cores
DIGITS_LLAVA = GenVLMConfig(name="digits-llava", clip_reference="digits", epochs=12, batch_size=32, warmup_steps=40)
GENVLM_REFERENCES = {c.name: c for c in (CALTECH101_LLAVA, DIGITS_LLAVA)}
QUICK = dict(epochs=2, batch_size=8, max_train_images=24, text_hidden=32, text_intermediate=64, vocab_size=400)


# ----------------------------------------------------------------------------------------- conversion
def hf_vision_config(visual: torch.nn.Module):
    """``CLIPVisionConfig`` matching an open_clip ``VisionTransformer`` (GELU, LayerNorm eps 1e-5)."""
    from transformers import CLIPVisionConfig

    width = visual.conv1.out_channels
    block = visual.transformer.resblocks[0]
    act = type(block.mlp.gelu).__name__ if hasattr(block.mlp, "gelu") else "GELU"
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=block.mlp.c_fc.out_features,
        num_hidden_layers=len(visual.transformer.resblocks),
        num_attention_heads=block.attn.num_heads,
        image_size=visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size,
        patch_size=visual.conv1.kernel_size[0],
        hidden_act="quick_gelu" if act == "QuickGELU" else "gelu",
        layer_norm_eps=visual.ln_pre.eps,
        projection_dim=visual.proj.shape[1] if visual.proj is not None else width,
    )


def openclip_visual_to_hf(visual: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict of a transformers ``CLIPVisionModel`` computing the open_clip ViT's token outputs."""
    sd = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    out = {
        "embeddings.class_embedding": sd["class_embedding"],
        "embeddings.patch_embedding.weight": sd["conv1.weight"],
        "embeddings.position_embedding.weight": sd["positional_embedding"],
        "pre_layrnorm.weight": sd["ln_pre.weight"],
        "pre_layrnorm.bias": sd["ln_pre.bias"],
        "post_layernorm.weight": sd["ln_post.weight"],
        "post_layernorm.bias": sd["ln_post.bias"],
    }
    for i in range(len(visual.transformer.resblocks)):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        q, k, v = sd[src + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = sd[src + "attn.in_proj_bias"].chunk(3)
        for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            out[f"{dst}self_attn.{name}.weight"], out[f"{dst}self_attn.{name}.bias"] = w.clone(), b.clone()
        pairs = {
            "attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
            "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
        }
        for a, b in pairs.items():
            out[f"{dst}{b}.weight"], out[f"{dst}{b}.bias"] = sd[f"{src}{a}.weight"], sd[f"{src}{a}.bias"]
    return out


# ----------------------------------------------------------------------------------------- building
def _tokenizer(captions: list[str], prompt: str, vocab_size: int):
    from vlmpress.reference.lm import train_tokenizer
    from vlmpress.adapters.hf_llava import LLAVA15_CHAT_TEMPLATE as CHAT_TEMPLATE

    corpus = "\n".join(captions) + f"\nUSER: {prompt} ASSISTANT:\n" + CHAT_TEMPLATE
    tokenizer = train_tokenizer(corpus, vocab_size=vocab_size, model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def build_llava(visual: torch.nn.Module, captions: list[str], cfg: GenVLMConfig):
    """(LlavaForConditionalGeneration with the converted tower, LlavaProcessor), LM randomly initialised."""
    from transformers import CLIPImageProcessor, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from vlmpress.adapters.hf_llava import DEFAULT_PROMPT
    from vlmpress.adapters.hf_llava import LLAVA15_CHAT_TEMPLATE as CHAT_TEMPLATE

    vision = hf_vision_config(visual)
    tokenizer = _tokenizer(captions, DEFAULT_PROMPT, cfg.vocab_size)
    n_tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_kv_heads,
        max_position_embeddings=256 if n_tokens < 200 else 1024, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    missing = model.model.vision_tower.load_state_dict(openclip_visual_to_hf(visual), strict=True)
    del missing
    size = vision.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=list(OPENAI_MEAN),
        image_std=list(OPENAI_STD), resample=3,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
        vision_feature_select_strategy="full", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    return model.eval(), processor


# ----------------------------------------------------------------------------------------- training
@torch.no_grad()
def _vision_features(model, pixels_uint8: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Frozen tower outputs (N, tokens, width) as float16, from un-normalised uint8 pixels."""
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    tower = model.model.vision_tower
    feats = []
    for s in tqdm(range(0, len(pixels_uint8), batch), desc="vision features", unit="batch", leave=False):
        x = (pixels_uint8[s : s + batch].float() / 255.0 - mean) / std
        feats.append(tower(pixel_values=x, output_hidden_states=True).hidden_states[-1].half())
    return torch.cat(feats)


def _lr_at(step: int, total: int, cfg: GenVLMConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train_genvlm(cfg: GenVLMConfig, *, quick_clip: bool = False, data_root: str | None = None, progress: bool = True) -> tuple[Any, Any, dict]:
    """Build and train the VLM; returns (model, processor, metadata)."""
    from vlmpress.adapters.hf_llava import HFLlavaAdapter
    from vlmpress.reference import get_reference
    from vlmpress.reference.config import get_config
    from vlmpress.reference.data import dataset_text, load_tensor_split

    t_start = time.perf_counter()
    clip_ref = get_reference(cfg.clip_reference, quick=quick_clip, progress=progress, data_root=data_root)
    clip_model, _, _ = clip_ref.load()
    dataset = get_config(cfg.clip_reference).dataset
    classnames, templates = dataset_text(dataset, data_root)
    templates = list(dict.fromkeys([*templates, *cfg.extra_templates]))
    captions = [t.format(c) for c in classnames for t in templates]
    model, processor = build_llava(clip_model.visual, captions, cfg)
    size = model.config.vision_config.image_size
    train = load_tensor_split(dataset, "train", size, limit=cfg.max_train_images, data_root=data_root, progress=progress)
    t0 = time.perf_counter()
    feats = _vision_features(model, train.images)
    t_features = time.perf_counter() - t0

    adapter = HFLlavaAdapter(model, "hf:(training)", name=cfg.name, processor=processor)
    prefix = adapter.prefix_ids()
    image_slots = prefix == model.config.image_token_id
    if int(image_slots.sum()) != feats.shape[1]:
        raise CheckpointError(f"processor expands {int(image_slots.sum())} image tokens but the tower gives {feats.shape[1]}")
    caption_ids = adapter.caption_ids(captions)  # row c * T + t
    n_templates = len(templates)

    lm, projector, embed, head = model.model.language_model, model.model.multi_modal_projector, model.get_input_embeddings(), model.lm_head
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    pad = processor.tokenizer.pad_token_id
    losses: list[float] = []
    model.train()
    model.model.vision_tower.eval()
    t0 = time.perf_counter()
    step = 0
    with tqdm(total=total, desc="train genvlm", unit="step", disable=not progress, leave=False) as bar:
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=gen)
            for s in range(0, n, cfg.batch_size):
                idx = order[s : s + cfg.batch_size]
                labels = train.labels[idx]
                tpl = torch.randint(0, n_templates, (len(idx),), generator=gen)
                caps = [caption_ids[int(c) * n_templates + int(t)] for c, t in zip(labels, tpl)]
                length = prefix.numel() + max(len(c) for c in caps)
                ids = torch.full((len(idx), length), pad, dtype=torch.long)
                attn = torch.zeros_like(ids)
                target = torch.full_like(ids, -100)
                for i, c in enumerate(caps):
                    seq = prefix.tolist() + c
                    ids[i, : len(seq)] = torch.tensor(seq)
                    attn[i, : len(seq)] = 1
                    target[i, prefix.numel() : len(seq)] = torch.tensor(c)
                embeds = embed(ids)
                image = projector(feats[idx].float())
                slots = torch.zeros(length, dtype=torch.bool)
                slots[: prefix.numel()] = image_slots
                embeds = embeds.masked_scatter(slots.view(1, -1, 1).expand_as(embeds), image.to(embeds.dtype))
                hidden = lm(inputs_embeds=embeds, attention_mask=attn, use_cache=False).last_hidden_state
                logits = head(hidden[:, :-1])
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target[:, 1:].reshape(-1), ignore_index=-100)
                for group in opt.param_groups:
                    group["lr"] = _lr_at(step, total, cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                losses.append(float(loss.detach()))
                step += 1
                bar.update()
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    t_train = time.perf_counter() - t0
    epoch_loss = [sum(losses[e * steps_per_epoch : (e + 1) * steps_per_epoch]) / steps_per_epoch for e in range(cfg.epochs)]
    metadata = {
        "format": FORMAT,
        "name": cfg.name,
        "config": cfg.to_dict(),
        "clip_reference": {"name": clip_ref.name, "checkpoint": str(clip_ref.checkpoint), "config_hash": clip_ref.metadata.get("config_hash")},
        "dataset": dataset,
        "templates": templates,
        "train_images": n,
        "n_templates": n_templates,
        "epoch_loss": [round(x, 4) for x in epoch_loss],
        "seconds": {"features": round(t_features, 1), "train": round(t_train, 1), "total": round(time.perf_counter() - t_start, 1)},
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    return model, processor, metadata


def _key(cfg: GenVLMConfig, clip_hash: str | None) -> str:
    blob = json.dumps({"format": FORMAT, "config": cfg.to_dict(), "clip": clip_hash}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def get_genvlm_reference(
    cfg: GenVLMConfig = CALTECH101_LLAVA, *, retrain: bool = False, quick: bool = False, data_root: str | None = None,
    progress: bool = True, out: str | Path | None = None,
) -> Path:
    """Directory of the trained reference VLM (``hf:<dir>`` loads it): cached, else trained and saved."""
    from vlmpress.reference import get_reference

    if quick:
        cfg = cfg.replace(**QUICK)
    clip_ref = get_reference(cfg.clip_reference, quick=quick, progress=progress, data_root=data_root)
    key = _key(cfg, clip_ref.metadata.get("config_hash"))
    directory = Path(out) if out is not None else cache_dir() / "reference" / cfg.name / key[:16]
    sidecar = directory / SIDECAR
    if not retrain and sidecar.is_file():
        meta = json.loads(sidecar.read_text())
        if meta.get("config_hash") == key:
            logger.info("using cached generative reference %s", directory)
            return directory
    model, processor, meta = train_genvlm(cfg, quick_clip=quick, data_root=data_root, progress=progress)
    meta["config_hash"] = key
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    processor.save_pretrained(str(directory))
    # the sidecar is written last: its presence marks a complete checkpoint
    atomic_write(sidecar, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    logger.info("saved generative reference to %s", directory)
    return directory


__all__ = ["CALTECH101_LLAVA", "DIGITS_LLAVA", "GENVLM_REFERENCES", "GenVLMConfig", "build_llava", "get_genvlm_reference", "hf_vision_config", "openclip_visual_to_hf", "train_genvlm"]
