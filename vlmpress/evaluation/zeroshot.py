"""Zero-shot classification through the :class:`~vlmpress.adapters.base.VisionLanguageAdapter` interface.

The classifier follows OpenAI CLIP's prompt-ensembling recipe: for each class, every template is
filled in and encoded, the embeddings are L2-normalised, averaged and renormalised. Image
embeddings are L2-normalised; ``logits = image_features @ classifier`` (the temperature does not
change rankings, so it is left out). Metrics follow :mod:`vlmpress.evaluation.metrics`.

Two image sources are accepted:

* a :class:`~vlmpress.data.datasets.ZeroShotDataset` -- decoded and preprocessed on the fly by a
  ``DataLoader`` (``num_workers`` processes);
* a :class:`PreprocessedImages` -- pixels preprocessed once (and optionally saved to disk), so a
  suite of compressed variants of one model is evaluated on identical tensors without decoding the
  JPEGs again. It remembers a fingerprint of the transform that made it and refuses a model whose
  preprocessing differs.
"""

from __future__ import annotations

import dataclasses

import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vlmpress.data.datasets import ZeroShotDataset, format_prompt
from vlmpress.errors import AdapterContractError, ConfigError, DatasetError
from vlmpress.evaluation.metrics import ClassificationMetrics, MetricAccumulator

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
_AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------- device / amp
def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when present, else CPU; anything else as given (validated)."""
    from vlmpress.pipeline.config import parse_device

    return parse_device(device)


def autocast_context(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """Mixed-precision context: fp16/bf16 autocast on CUDA (bf16 also on CPU); fp32 = no autocast."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type != "cuda" and precision == "fp16":
        raise ConfigError("fp16 autocast needs a CUDA device; use --precision fp32 (or bf16) on CPU")
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[precision])


def _model_dtype(adapter) -> torch.dtype:
    for p in adapter.model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if hasattr(batch, "to"):  # transformers BatchEncoding
        return batch.to(device)
    return batch


def preprocess_fingerprint(transform: Callable) -> str:
    """Identity of a preprocessing pipeline (stable across processes; no memory addresses)."""
    processor = getattr(transform, "image_processor", None)
    if processor is not None and hasattr(processor, "to_json_string"):
        text = f"{type(processor).__name__}:{processor.to_json_string()}"
    else:
        text = repr(transform)
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", text)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- text side
@torch.inference_mode()
def checked_embeddings(out: Any, n: int, adapter, what: str) -> torch.Tensor:
    """``out`` if it is a (n, dim) embedding tensor, else a one-line :class:`AdapterContractError`."""
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == n:
        return out
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    raise AdapterContractError(
        f"adapter '{getattr(adapter, 'family', type(adapter).__name__)}' {what} returned {shape} for a batch of {n}; "
        "it must return (batch, dim) embeddings (pool per-token outputs before returning them)"
    )


def build_text_classifier(
    adapter,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    show_progress: bool = False,
) -> torch.Tensor:
    """(embed_dim, n_classes) float32 zero-shot weights: per class, mean of normalised prompt embeddings."""
    if not classnames or not templates:
        raise ConfigError("a zero-shot classifier needs at least one class name and one template")
    dev = resolve_device(device) if device is not None else adapter.device
    prompts = [format_prompt(t, c) for c in classnames for t in templates]
    chunks = []
    with autocast_context(dev, precision):
        for start in tqdm(
            range(0, len(prompts), batch_size), desc="text prompts", unit="batch", disable=not show_progress, leave=False
        ):
            tokens = _to_device(adapter.tokenize(prompts[start : start + batch_size]), dev)
            n = min(batch_size, len(prompts) - start)
            chunks.append(checked_embeddings(adapter.encode_text(tokens), n, adapter, "encode_text").float())
    emb = torch.cat(chunks)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    return emb.T.contiguous()


# ---------------------------------------------------------------------------------------------- cached pixels
@dataclass
class PreprocessedImages:
    """Preprocessed pixels + labels of one dataset split, reusable across models with one preprocess.

    Stored as float32 by default, exactly what the model's preprocessing produced: a float16 cache
    rounds the normalised pixels, which flips a few borderline predictions (1 of 2,893 on
    Caltech-101), so cached and uncached evaluations would not agree.
    """

    pixels: torch.Tensor = field(repr=False)  # (n, C, H, W)
    labels: torch.Tensor = field(repr=False)  # (n,) int64
    preprocess_id: str
    dataset: str
    split_id: str
    classnames: list[str] = field(repr=False)
    templates: list[str] = field(repr=False)
    split_detail: dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def save(self, path: str | Path) -> Path:
        """Atomic ``torch.save`` (temp file + rename), so a killed run never leaves a half cache."""
        from vlmpress.io import atomic_write

        return atomic_write(path, lambda tmp: torch.save({"format": 1, **self.__dict__}, tmp))

    @classmethod
    def load(cls, path: str | Path, *, mmap: bool = True) -> "PreprocessedImages":
        """Load a saved cache; ``mmap`` maps the pixels from disk instead of reading them all."""
        try:
            data = torch.load(str(path), map_location="cpu", mmap=mmap, weights_only=True)
        except Exception as err:  # corrupt/truncated file: say which one
            raise DatasetError(f"preprocessed image cache {path} is unreadable ({str(err).splitlines()[0][:160] if str(err) else type(err).__name__}); delete it to rebuild") from None
        problem = _cache_problem(data)
        if problem:
            raise DatasetError(f"preprocessed image cache {path} is invalid ({problem}); delete it to rebuild")
        data.pop("format", None)
        return cls(**data)


def _cache_problem(data: Any) -> str | None:
    """Why a loaded cache dict is not a :class:`PreprocessedImages` (types, shapes, label range), or None."""
    names = {f.name for f in dataclasses.fields(PreprocessedImages)}
    if not isinstance(data, dict) or data.get("format") != 1 or set(data) - {"format"} != names:
        return "not a vlmpress image cache of format 1"
    pixels, labels = data["pixels"], data["labels"]
    if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point() or pixels.dim() < 2:
        return "pixels are not a float tensor with one preprocessed image per row"
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1 or len(labels) != len(pixels):
        return "labels are not one int64 label per image"
    if not all(isinstance(data[k], str) for k in ("preprocess_id", "dataset", "split_id")) or not isinstance(data["split_detail"], dict):
        return "its identity fields have the wrong types"
    if not all(isinstance(data[k], list) and all(isinstance(x, str) for x in data[k]) for k in ("classnames", "templates")):
        return "classnames/templates are not lists of strings"
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(data["classnames"])):
        return "labels outside the class list"
    return None


@torch.inference_mode()
def preprocess_images(
    dataset: ZeroShotDataset,
    transform: Callable,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    dtype: torch.dtype = torch.float32,
    show_progress: bool = False,
) -> PreprocessedImages:
    """Decode + preprocess a whole split once (see :class:`PreprocessedImages`)."""
    loader = _image_loader(dataset.with_transform(transform), batch_size, num_workers, pin=False)
    pixels: torch.Tensor | None = None
    labels = torch.empty(len(dataset), dtype=torch.long)
    pos = 0
    with tqdm(total=len(dataset), desc=f"preprocess {dataset.name}", unit="img", disable=not show_progress, leave=False) as bar:
        for x, y in loader:
            if pixels is None:
                pixels = torch.empty((len(dataset), *x.shape[1:]), dtype=dtype)
            pixels[pos : pos + len(x)] = x.to(dtype)
            labels[pos : pos + len(x)] = y
            pos += len(x)
            bar.update(len(x))
    assert pixels is not None
    return PreprocessedImages(
        pixels=pixels,
        labels=labels,
        preprocess_id=preprocess_fingerprint(transform),
        dataset=dataset.name,
        split_id=dataset.split_id,
        classnames=list(dataset.classnames),
        templates=list(dataset.templates),
        split_detail=dict(dataset.split_detail),
    )


def _image_loader(dataset: ZeroShotDataset, batch_size: int, num_workers: int, pin: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin,
        drop_last=False,
    )


def _batches(
    data: ZeroShotDataset | PreprocessedImages, adapter, batch_size: int, num_workers: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, PreprocessedImages):
        expected = preprocess_fingerprint(adapter.preprocess)
        if data.preprocess_id != expected:
            raise ConfigError(
                f"the preprocessed images of {data.dataset} were made with a different preprocessing "
                f"({data.preprocess_id}) than this model's ({expected}); rebuild the cache for this model"
            )
        for start in range(0, len(data), batch_size):
            yield data.pixels[start : start + batch_size], data.labels[start : start + batch_size]
    else:
        loader = _image_loader(data.with_transform(adapter.preprocess), batch_size, num_workers, device.type == "cuda")
        yield from loader


# ---------------------------------------------------------------------------------------------- evaluation
def score_features(
    features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, chunk: int = 8192
) -> ClassificationMetrics:
    """Metrics of raw image features against a (dim, n_classes) classifier (features normalised here)."""
    acc = MetricAccumulator(classifier.shape[1])
    for start in range(0, len(features), chunk):
        f = features[start : start + chunk].float()
        f = f / f.norm(dim=-1, keepdim=True)
        acc.update(f @ classifier.to(f.device, torch.float32), labels[start : start + chunk])
    return acc.compute()


@dataclass
class ZeroShotResult:
    """Outcome of one (model, dataset) evaluation."""

    metrics: ClassificationMetrics
    dataset: str
    split_id: str
    n_images: int
    n_classes: int
    n_templates: int
    seconds: float  # total wall time (text classifier + images)
    seconds_text: float
    seconds_images: float
    device: str
    precision: str
    split_detail: dict[str, Any] = field(default_factory=dict)
    #: per-image top-k (``top_k_predictions`` > 0): {"labels": (n,), "indices": (n, k), "scores": (n, k)}
    predictions: dict[str, torch.Tensor] | None = None

    @property
    def images_per_second(self) -> float:
        return self.n_images / self.seconds_images if self.seconds_images > 0 else float("nan")


@torch.inference_mode()
def evaluate_zeroshot(
    adapter,
    data: ZeroShotDataset | PreprocessedImages,
    *,
    templates: Sequence[str] | None = None,
    classifier: torch.Tensor | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    text_batch_size: int = 256,
    show_progress: bool = True,
    top_k_predictions: int = 0,
) -> ZeroShotResult:
    """Zero-shot top-1 / top-5 / mean per-class recall of ``adapter`` on ``data``.

    ``top_k_predictions`` > 0 also returns every image's k best classes and cosine scores
    (``result.predictions``), to check a result independently (see :func:`write_predictions`).

    ``templates`` overrides the dataset's own; ``classifier`` (from :func:`build_text_classifier`)
    skips the text side. The model is moved to ``device`` (default: CUDA when present) and put in
    eval mode.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    if len(data) == 0:
        raise DatasetError(f"{data.dataset if isinstance(data, PreprocessedImages) else data.name}: no images to evaluate")
    dev = resolve_device(device)
    autocast_context(dev, precision)  # validate before any work
    adapter.to(dev)
    adapter.eval()
    name = data.dataset if isinstance(data, PreprocessedImages) else data.name
    templates = list(templates) if templates is not None else list(data.templates)
    t0 = time.perf_counter()
    if classifier is None:
        classifier = build_text_classifier(
            adapter, data.classnames, templates, batch_size=text_batch_size, device=dev, precision=precision
        )
    classifier = classifier.to(dev, torch.float32)
    if classifier.shape[1] != data.n_classes:
        raise ConfigError(f"classifier has {classifier.shape[1]} classes but {name} has {data.n_classes}")
    t_text = time.perf_counter() - t0

    in_dtype = _model_dtype(adapter)
    t1 = time.perf_counter()
    feats_list: list[torch.Tensor] = []
    labels_list: list[torch.Tensor] = []
    with tqdm(total=len(data), desc=f"eval {name}", unit="img", disable=not show_progress, leave=False) as bar:
        for pixels, labels in _batches(data, adapter, batch_size, num_workers, dev):
            pixels = pixels.to(dev, dtype=in_dtype, non_blocking=True)
            with autocast_context(dev, precision):
                feats_list.append(checked_embeddings(adapter.encode_image(pixels), pixels.shape[0], adapter, "encode_image").float())
            labels_list.append(torch.as_tensor(labels).view(-1))
            bar.update(len(labels))
    # scoring once at the end (features are n x dim, small) keeps the per-batch work to the encoder
    feats, all_labels = torch.cat(feats_list), torch.cat(labels_list)
    metrics = score_features(feats, all_labels, classifier)
    predictions = top_k_of(feats, classifier, top_k_predictions, all_labels) if top_k_predictions > 0 else None
    t_images = time.perf_counter() - t1
    if metrics.n_nonfinite:
        logger.warning("%s: %d images got non-finite logits (counted as wrong)", name, metrics.n_nonfinite)
    return ZeroShotResult(
        metrics=metrics,
        dataset=name,
        split_id=data.split_id,
        n_images=metrics.n_images,
        n_classes=data.n_classes,
        n_templates=len(templates),
        seconds=t_text + t_images,
        seconds_text=t_text,
        seconds_images=t_images,
        device=str(dev),
        precision=precision,
        split_detail=dict(data.split_detail),
        predictions=predictions,
    )


def top_k_of(features: torch.Tensor, classifier: torch.Tensor, k: int, labels: torch.Tensor, chunk: int = 8192) -> dict[str, torch.Tensor]:
    """The k best classes and their cosine scores per image (same scoring as :func:`score_features`)."""
    k = min(k, classifier.shape[1])
    indices, scores = [], []
    for start in range(0, len(features), chunk):
        f = features[start : start + chunk].float()
        f = f / f.norm(dim=-1, keepdim=True)
        top = (f @ classifier.to(f.device, torch.float32)).topk(k, dim=-1)
        indices.append(top.indices.cpu())
        scores.append(top.values.cpu())
    return {"labels": labels.cpu(), "indices": torch.cat(indices), "scores": torch.cat(scores)}


def write_predictions(path: str | Path, result: ZeroShotResult, classnames: Sequence[str], images: Sequence[str] | None = None) -> Path:
    """One JSON line per image: its index, file, label and top-k classes with scores (atomic write)."""
    import json

    from vlmpress.io import atomic_write_text

    if result.predictions is None:
        raise ConfigError("the result holds no predictions; evaluate with top_k_predictions > 0")
    p = result.predictions
    lines = []
    for i in range(len(p["labels"])):
        label = int(p["labels"][i])
        top = [int(c) for c in p["indices"][i]]
        lines.append(json.dumps({
            "index": i,
            "image": images[i] if images is not None else None,
            "label": label,
            "label_name": classnames[label],
            "top_k": [{"class": c, "name": classnames[c], "score": round(float(s), 6)} for c, s in zip(top, p["scores"][i])],
            "correct_top1": top[0] == label,
        }))
    return atomic_write_text(path, "\n".join(lines) + "\n")
