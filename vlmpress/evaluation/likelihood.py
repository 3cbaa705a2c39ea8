"""Zero-shot classification for generative VLMs by caption log-likelihood given the image.

For every test image and every class ``c`` the model scores the captions ``t(c)`` of the prompt
templates as the answer to the image prompt (:meth:`prefix_text` of the adapter):

    score(image, c) = mean over templates t of  log p(t(c) | image, prompt)

where ``log p`` is the *sum* of the caption tokens' log-probabilities (default) or, with
``length_normalize=True``, their *mean* per token. Averaging log-likelihoods over templates is the
log of their geometric mean -- the likelihood analogue of CLIP's prompt ensemble. Ranks of these
scores give top-1 / top-5 / mean per-class recall as for CLIP (:mod:`vlmpress.evaluation.metrics`).

**Prefix reuse.** The image and the prompt (hundreds of positions in real LLaVA models) are
encoded once per image with a KV cache; the class captions are then run from copies of that
cache, a chunk of captions at a time. :func:`full_sequence_log_likelihoods` computes the same
scores by re-running image + prompt + caption for every caption (the reference the tests compare
against and ``scripts/bench_eval.py`` times).

**Caption perplexity** given the image is reported as a second metric: ``exp`` of the mean negative
log-likelihood per token of the true class's captions (all templates), pooled over images.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vlmpress.data.datasets import format_prompt
from vlmpress.errors import ConfigError, DatasetError
from vlmpress.evaluation.metrics import MetricAccumulator
from vlmpress.evaluation.zeroshot import ZeroShotResult, _batches, autocast_context, resolve_device

logger = logging.getLogger(__name__)

#: sequences (images x captions) run together from the cached prefix
DEFAULT_MAX_SEQUENCES = 256


def supports_likelihood(adapter) -> bool:
    """True for adapters of generative VLMs (image prefix + caption continuation)."""
    return all(hasattr(adapter, a) for a in ("caption_ids", "preprocess", "model")) and (
        hasattr(adapter, "encode_prefixes") or hasattr(adapter, "prefix_ids")
    )


def _padded_captions(adapter, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = adapter.caption_ids(captions)
    pad = adapter.tokenizer.pad_token_id if adapter.tokenizer.pad_token_id is not None else 0
    out = torch.full((len(ids), max(len(x) for x in ids)), pad, dtype=torch.long)
    mask = torch.zeros_like(out, dtype=torch.bool)
    for i, x in enumerate(ids):
        out[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = True
    return out, mask


def _token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position without materialising a second vocab-sized tensor."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _model_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


@torch.inference_mode()
def caption_log_likelihoods(
    adapter, pixels: torch.Tensor, captions: Sequence[str], *, max_sequences: int = DEFAULT_MAX_SEQUENCES
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images x captions) summed caption-token log-probabilities given each image, and (captions,) token counts.

    The image + prompt prefix is run once per image batch (KV cache); every caption continues from it.
    Models whose prefix differs per image (``fixed_prefix`` False) encode each image's own prefix
    (:func:`per_image_prefix_log_likelihoods`).
    """
    if not captions:
        raise ConfigError("no captions to score")
    if not getattr(adapter, "fixed_prefix", True):
        return per_image_prefix_log_likelihoods(adapter, pixels, captions, max_sequences=max_sequences)
    dev = adapter.input_device
    cap_ids, cap_mask = _padded_captions(adapter, captions)
    cap_ids, cap_mask = cap_ids.to(dev), cap_mask.to(dev)
    prefix = adapter.prefix_ids().to(dev)
    n_img, n_cap = pixels.shape[0], cap_ids.shape[0]
    prefix_ids = prefix.expand(n_img, -1)
    extra = {k: v.to(dev) for k, v in adapter.extra_inputs(prefix_ids, None).items()}  # e.g. PaliGemma's prefix types
    out = adapter.model(input_ids=prefix_ids, pixel_values=adapter._pixels(pixels), use_cache=True, **extra)
    cache = _model_cache(out)
    if cache is None:
        raise ConfigError(f"{type(adapter.model).__name__} returned no KV cache; prefix reuse needs use_cache support")
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts the first caption token
    scores = first[:, cap_ids[:, 0]].clone()  # (n_img, n_cap)
    chunk = max(1, max_sequences // n_img)
    ones = torch.ones((1, prefix.numel()), dtype=torch.long, device=dev)
    for start in range(0, n_cap, chunk):
        ids, mask = cap_ids[start : start + chunk], cap_mask[start : start + chunk]
        k = ids.shape[0]
        if ids.shape[1] < 2:
            continue
        trial = copy.deepcopy(cache)
        trial.batch_repeat_interleave(k)  # image b's prefix for each of the k captions, image-major
        inp = ids.repeat(n_img, 1)
        attn = torch.cat([ones.expand(n_img * k, -1), mask.repeat(n_img, 1).long()], dim=1)
        logits = adapter.model(input_ids=inp, attention_mask=attn, cache=trial, use_cache=True).logits
        lp = _token_log_probs(logits[:, :-1], inp[:, 1:]) * mask[:, 1:].repeat(n_img, 1)
        scores[:, start : start + k] += lp.sum(-1).view(n_img, k)
        del trial
    return scores, cap_mask.sum(-1).cpu()


@torch.inference_mode()
def per_image_prefix_log_likelihoods(
    adapter, pixels: torch.Tensor, captions: Sequence[str], *, max_sequences: int = DEFAULT_MAX_SEQUENCES
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`caption_log_likelihoods` for prefixes of their own length per image.

    Each image's prefix (its own image tokens, M-RoPE positions, tiles) is encoded once by the
    model's processor and prefilled with a KV cache; the captions continue from copies of that cache.
    The continuation gets no attention mask: the prefix has no padding and the captions are right
    padded, so every scored position sees exactly its prefix and its caption's earlier tokens, and
    models that place positions themselves (Qwen2-VL's ``rope_deltas``) continue from the prefix.
    """
    dev = adapter.input_device
    cap_ids, cap_mask = _padded_captions(adapter, captions)
    cap_ids, cap_mask = cap_ids.to(dev), cap_mask.to(dev)
    n_img, n_cap = pixels.shape[0], cap_ids.shape[0]
    scores = torch.empty((n_img, n_cap), dtype=torch.float32, device=dev)
    chunk = max(1, max_sequences)
    for b in range(n_img):
        out = adapter.model(**adapter.prefix_inputs(adapter.encode_prefixes(pixels[b : b + 1])), use_cache=True)
        cache = _model_cache(out)
        if cache is None:
            raise ConfigError(f"{type(adapter.model).__name__} returned no KV cache; prefix reuse needs use_cache support")
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # predicts the first caption token
        scores[b] = first[cap_ids[:, 0]]
        if cap_ids.shape[1] < 2:
            continue
        for start in range(0, n_cap, chunk):
            ids, mask = cap_ids[start : start + chunk], cap_mask[start : start + chunk]
            trial = copy.deepcopy(cache)
            trial.batch_repeat_interleave(ids.shape[0])
            logits = adapter.model(input_ids=ids, cache=trial, use_cache=True).logits
            lp = _token_log_probs(logits[:, :-1], ids[:, 1:]) * mask[:, 1:]
            scores[b, start : start + ids.shape[0]] += lp.sum(-1)
            del trial
    return scores, cap_mask.sum(-1).cpu()


@torch.inference_mode()
def full_sequence_log_likelihoods(
    adapter, pixels: torch.Tensor, captions: Sequence[str], *, max_sequences: int = DEFAULT_MAX_SEQUENCES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as :func:`caption_log_likelihoods`, re-running image + prompt + caption for every caption."""
    n_img = pixels.shape[0]
    chunk = max(1, max_sequences // n_img)
    scores = []
    counts = []
    for start in range(0, len(captions), chunk):
        part = list(captions[start : start + chunk])
        k = len(part)
        batch = adapter.pair_batch(pixels.repeat_interleave(k, dim=0), part * n_img)
        logits = adapter.forward_tokens(batch).logits
        ids = batch["input_ids"].to(logits.device)
        target = batch["caption_mask"][:, 1:].to(logits.device)
        lp = _token_log_probs(logits[:, :-1], ids[:, 1:]) * target
        scores.append(lp.sum(-1).view(n_img, k))
        counts.append(batch["caption_mask"][:k].sum(-1))
    return torch.cat(scores, dim=1), torch.cat(counts).cpu()


def class_scores(
    log_likelihoods: torch.Tensor, token_counts: torch.Tensor, n_classes: int, n_templates: int, length_normalize: bool
) -> torch.Tensor:
    """(images, classes): mean over templates of each caption's (optionally per-token) log-likelihood."""
    ll = log_likelihoods.float()
    if length_normalize:
        ll = ll / token_counts.to(ll.device, torch.float32)
    return ll.view(ll.shape[0], n_classes, n_templates).mean(-1)


@dataclass
class LikelihoodResult(ZeroShotResult):
    """A :class:`ZeroShotResult` plus caption perplexity and the scoring rule used."""

    caption_perplexity: float = float("nan")
    length_normalize: bool = False


@torch.inference_mode()
def evaluate_likelihood(
    adapter,
    data,
    *,
    templates: Sequence[str] | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    length_normalize: bool = False,
    max_sequences: int = DEFAULT_MAX_SEQUENCES,
    use_cache: bool = True,
    show_progress: bool = True,
    top_k_predictions: int = 0,
) -> LikelihoodResult:
    """Zero-shot top-1 / top-5 / mean per-class recall + caption perplexity of a generative VLM on ``data``."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    name = getattr(data, "dataset", None) if not hasattr(data, "name") else data.name
    if len(data) == 0:
        raise DatasetError(f"{name}: no images to evaluate")
    dev = resolve_device(device)
    autocast_context(dev, precision)
    adapter.to(dev)
    adapter.eval()
    templates = list(templates) if templates is not None else list(data.templates)
    if not templates:
        raise ConfigError("likelihood zero-shot needs at least one caption template")
    captions = [format_prompt(t, c) for c in data.classnames for t in templates]
    n_classes = len(data.classnames)
    score = caption_log_likelihoods if use_cache else full_sequence_log_likelihoods
    acc = MetricAccumulator(n_classes)
    kept_scores: list[torch.Tensor] = []  # per-image class scores, only for top_k_predictions
    kept_labels: list[torch.Tensor] = []
    nll, tokens = 0.0, 0
    t0 = time.perf_counter()
    with tqdm(total=len(data), desc=f"eval {name}", unit="img", disable=not show_progress, leave=False) as bar:
        for pixels, labels in _batches(data, adapter, batch_size, num_workers, dev):
            labels = torch.as_tensor(labels).view(-1)
            with autocast_context(dev, precision):
                ll, counts = score(adapter, pixels, captions, max_sequences=max_sequences)
            per_image = class_scores(ll, counts, n_classes, len(templates), length_normalize).cpu()
            acc.update(per_image, labels)
            if top_k_predictions > 0:
                kept_scores.append(per_image.float())
                kept_labels.append(labels)
            per_class = ll.float().cpu().view(len(labels), n_classes, len(templates))
            count = counts.view(n_classes, len(templates))
            for i, y in enumerate(labels.tolist()):
                nll -= float(per_class[i, y].sum())
                tokens += int(count[y].sum())
            bar.update(len(labels))
    seconds = time.perf_counter() - t0
    metrics = acc.compute()
    if metrics.n_nonfinite:
        logger.warning("%s: %d images got non-finite scores (counted as wrong)", name, metrics.n_nonfinite)
    predictions = None
    if top_k_predictions > 0:
        top = torch.cat(kept_scores).topk(min(top_k_predictions, n_classes), dim=-1)
        predictions = {"labels": torch.cat(kept_labels), "indices": top.indices, "scores": top.values}
    return LikelihoodResult(
        predictions=predictions,
        metrics=metrics,
        dataset=name,
        split_id=data.split_id,
        n_images=metrics.n_images,
        n_classes=n_classes,
        n_templates=len(templates),
        seconds=seconds,
        seconds_text=0.0,
        seconds_images=seconds,
        device=str(dev),
        precision=precision,
        split_detail=dict(data.split_detail),
        caption_perplexity=math.exp(nll / tokens) if tokens else float("nan"),
        length_normalize=length_normalize,
    )


__all__ = [
    "LikelihoodResult",
    "caption_log_likelihoods",
    "class_scores",
    "evaluate_likelihood",
    "full_sequence_log_likelihoods",
    "per_image_prefix_log_likelihoods",
    "supports_likelihood",
]
