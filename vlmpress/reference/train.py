"""Contrastive (CLIP) training of the small reference models, and their zero-shot evaluation.

Plain CLIP recipe scaled down: symmetric InfoNCE with a learnable logit scale (clamped at 100),
AdamW without decay on gains/biases/logit scale, linear warm-up then cosine decay, gradient
clipping. Each image is paired with its class name in a randomly drawn prompt template.
Reproducible: weights are initialised from ``torch.manual_seed(seed)`` and data order,
augmentation and template draws come from one seeded generator, so the same recipe gives
bit-identical weights on the same machine (same thread count).
"""

from __future__ import annotations

import logging
import math
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vlmpress.errors import ConfigError
from vlmpress.reference.config import FORMAT, ReferenceConfig, model_config, register_model_configs
from vlmpress.reference.data import TensorSplit, data_id, dataset_text, load_tensor_split

logger = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class TrainResult:
    """A trained open_clip model plus the facts recorded in the checkpoint's JSON sidecar."""

    model: torch.nn.Module
    config: ReferenceConfig
    classnames: list[str]
    templates: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)


def _image_size(model_name: str) -> int:
    size = model_config(model_name)["vision_cfg"]["image_size"]
    if not isinstance(size, int):
        raise ConfigError(f"{model_name}: reference models use square inputs (an int image_size), got {size}")
    return size


def _tokenize(tokenizer, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Tokens of every (class, template) caption, ``[C * T, L]``, row ``c * T + t``; warns on truncation."""
    captions = [t.format(c) for c in classnames for t in templates]
    context = tokenizer.context_length
    too_long = [c for c in captions if len(tokenizer.encode(c)) + 2 > context]
    if too_long:
        logger.warning("%d captions exceed the %d-token context and are truncated, e.g. %r", len(too_long), context, too_long[0])
    return tokenizer(captions)


def _normalise(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (pixels - mean) / std


def augment(images: torch.Tensor, config: ReferenceConfig, size: int, gen: torch.Generator) -> torch.Tensor:
    """Random pad/crop/rescale/flip of uint8 images -> float pixels in [0, 1] at ``size`` px."""
    x = images.float().div_(255.0)
    if config.pad:
        x = F.pad(x, (config.pad,) * 4, value=0.0)
    side = x.shape[-1]
    n = x.shape[0]
    crops = torch.randint(config.crop_min, config.crop_max + 1, (n,), generator=gen)
    offsets = torch.rand((n, 2), generator=gen)
    flips = torch.rand((n,), generator=gen) < 0.5
    out = torch.empty((n, 3, size, size))
    for i in range(n):
        s = int(crops[i])
        oy, ox = (offsets[i] * (side - s + 1)).long().clamp_(max=side - s).tolist()
        crop = x[i, :, oy : oy + s, ox : ox + s]
        if s != size:
            crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        if config.flip and flips[i]:
            crop = crop.flip(-1)
        out[i] = crop
    return out


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching (image, caption) pairs, as in CLIP."""
    logits = logit_scale.exp() * image_features @ text_features.T
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _lr_at(step: int, total: int, config: ReferenceConfig) -> float:
    warmup = min(config.warmup_steps, max(total - 1, 1))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's convention: no weight decay on gains, biases, norms and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _adamw(model: torch.nn.Module, config: ReferenceConfig) -> torch.optim.AdamW:
    """AdamW, fused where the build supports it (4-8x faster steps on CPU; same update rule)."""
    groups = _param_groups(model, config.weight_decay)
    kwargs = dict(lr=config.lr, betas=tuple(config.betas), eps=config.adam_eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # pragma: no cover - older torch without fused CPU AdamW
        return torch.optim.AdamW(groups, **kwargs)


def _bf16_ok(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - older builds
        return False


@torch.no_grad()
def zero_shot_classifier(
    model: torch.nn.Module, tokens: torch.Tensor, n_classes: int, n_templates: int, batch_size: int = 512
) -> torch.Tensor:
    """``[D, C]`` class embeddings: each class's template captions encoded, normalised, averaged."""
    model.eval()
    feats = torch.cat([model.encode_text(tokens[i : i + batch_size], normalize=True) for i in range(0, len(tokens), batch_size)])
    feats = feats.float().reshape(n_classes, n_templates, -1).mean(dim=1)
    return F.normalize(feats, dim=-1).T


@torch.no_grad()
def zero_shot_top1(
    model: torch.nn.Module,
    split: TensorSplit,
    classifier: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    batch_size: int = 256,
) -> float:
    """Top-1 of the template-ensemble zero-shot classifier on an (un-augmented) split."""
    model.eval()
    correct = 0
    for i in range(0, len(split), batch_size):
        x = _normalise(split.images[i : i + batch_size].float() / 255.0, mean, std)
        pred = (model.encode_image(x, normalize=True).float() @ classifier).argmax(dim=-1)
        correct += int((pred == split.labels[i : i + batch_size]).sum())
    return correct / max(len(split), 1)


@torch.no_grad()
def _fixed_batch_loss(model, split: TensorSplit, tokens, n_templates, size, mean, std, n: int = 256) -> float:
    """CLIP loss on the first ``n`` training images, centre view, first template: a stable progress probe."""
    model.eval()
    imgs = split.images[:n].float() / 255.0
    if imgs.shape[-1] != size:
        imgs = F.interpolate(imgs, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    labels = split.labels[:n]
    txt = model.encode_text(tokens[labels * n_templates], normalize=True)
    img = model.encode_image(_normalise(imgs, mean, std), normalize=True)
    return float(clip_loss(img.float(), txt.float(), model.logit_scale))


def create_untrained(config: ReferenceConfig) -> torch.nn.Module:
    """The randomly initialised model training starts from (``torch.manual_seed(config.seed)``)."""
    import open_clip

    register_model_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return open_clip.create_model(config.model_name)


def train_reference(
    config: ReferenceConfig,
    *,
    progress: bool = True,
    threads: int | None = None,
    device: str = "cpu",
    data_root: str | None = None,
) -> TrainResult:
    """Train one reference model from scratch and score it zero-shot on the held-out split.

    ``threads`` sets ``torch.set_num_threads`` for the duration of training only (restored after).
    """
    import open_clip

    config.validate()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(config, progress=progress, device=torch.device(device), data_root=data_root, open_clip=open_clip)
    finally:
        torch.set_num_threads(old_threads)


def _train(config: ReferenceConfig, *, progress: bool, device: torch.device, data_root, open_clip) -> TrainResult:
    t0, cpu0 = time.perf_counter(), time.process_time()
    register_model_configs()
    size = _image_size(config.model_name)
    classnames, templates = dataset_text(config.dataset, data_root)
    if config.templates:
        templates = list(config.templates)
    train = load_tensor_split(config.dataset, "train", config.cache_size, limit=config.max_train_images, data_root=data_root, progress=progress)
    test = load_tensor_split(config.dataset, "test", size, limit=config.max_test_images, data_root=data_root, progress=progress)
    t_data = time.perf_counter() - t0

    model = create_untrained(config).to(device)
    tokenizer = open_clip.get_tokenizer(config.model_name)
    tokens = _tokenize(tokenizer, classnames, templates).to(device)
    n_t = len(templates)
    mean = torch.tensor(model.visual.preprocess_cfg["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"], device=device).view(1, 3, 1, 1)
    use_bf16 = config.bf16 and _bf16_ok(device)

    gen = torch.Generator().manual_seed(config.seed)
    n = len(train)
    batch = min(config.batch_size, n)
    steps_per_epoch = max(n // batch, 1)
    total = steps_per_epoch * config.epochs
    optimizer = _adamw(model, config)
    probe_before = _fixed_batch_loss(model, train, tokens, n_t, size, mean, std)
    logger.info(
        "training %s (%s): %d train / %d test images, %d classes x %d templates, %d epochs x %d steps, batch %d%s",
        config.name, config.model_name, n, len(test), len(classnames), n_t, config.epochs, steps_per_epoch, batch,
        ", bf16 autocast" if use_bf16 else "",
    )

    epoch_losses: list[float] = []
    step = 0
    bar = tqdm(total=total, desc=f"train {config.name}", unit="step", disable=not progress)
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        running = 0.0
        t_epoch = time.perf_counter()
        for b in range(steps_per_epoch):
            idx = order[b * batch : (b + 1) * batch]
            pixels = augment(train.images[idx], config, size, gen)
            labels = train.labels[idx]
            caption = labels * n_t + torch.randint(n_t, (len(idx),), generator=gen)
            unique, inverse = torch.unique(caption, return_inverse=True)  # encode each distinct caption once
            lr = _lr_at(step, total, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                img = model.encode_image(_normalise(pixels.to(device), mean, std), normalize=True)
                txt = model.encode_text(tokens[unique.to(device)], normalize=True)
            loss = clip_loss(img.float(), txt.float()[inverse.to(device)], model.logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            value = loss.item()
            if not math.isfinite(value):
                raise RuntimeError(f"training {config.name} diverged at step {step} (loss {value}); lower lr")
            running += value
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{value:.3f}", lr=f"{lr:.1e}")
        epoch_losses.append(running / steps_per_epoch)
        logger.info(
            "epoch %d/%d: mean train loss %.4f, logit scale %.1f, %.1f s",
            epoch + 1, config.epochs, epoch_losses[-1], model.logit_scale.exp().item(), time.perf_counter() - t_epoch,
        )
    bar.close()
    t_train = time.perf_counter() - t0 - t_data

    classifier = zero_shot_classifier(model, tokens, len(classnames), n_t)
    top1 = zero_shot_top1(model, test, classifier, mean, std)
    probe_after = _fixed_batch_loss(model, train, tokens, n_t, size, mean, std)
    model.eval()
    wall = time.perf_counter() - t0
    logger.info("%s: final train loss %.4f, held-out zero-shot top-1 %.2f%% (%d images), %.0f s", config.name, epoch_losses[-1], 100 * top1, len(test), wall)

    metadata = {
        "format": FORMAT,
        "name": config.name,
        "model_name": config.model_name,
        "model_config": model_config(config.model_name),
        "dataset": config.dataset,
        "data_id": data_id(config.dataset, data_root),
        "classnames": classnames,
        "templates": templates,
        "seed": config.seed,
        "epochs": config.epochs,
        "steps": total,
        "batch_size": batch,
        "n_train": n,
        "n_test": len(test),
        "final_train_loss": epoch_losses[-1],
        "train_loss_per_epoch": epoch_losses,
        "probe_loss_before": probe_before,
        "probe_loss_after": probe_after,
        "heldout_top1": top1,
        "heldout_split": "test",
        "logit_scale": model.logit_scale.exp().item(),
        "wall_time_s": round(wall, 2),
        "data_time_s": round(t_data, 2),
        "train_time_s": round(t_train, 2),
        "cpu_time_s": round(time.process_time() - cpu0, 2),  # all threads; less sensitive to shared cores
        "threads": torch.get_num_threads(),
        "bf16": use_bf16,
        "device": str(device),
        "torch_version": torch.__version__,
        "open_clip_version": open_clip.__version__,
        "platform": platform.platform(),
        "config": config.to_dict(),
        "config_hash": config.fingerprint(classnames, templates, data_id(config.dataset, data_root)),
    }
    return TrainResult(model=model.cpu(), config=config, classnames=classnames, templates=templates, metadata=metadata)
