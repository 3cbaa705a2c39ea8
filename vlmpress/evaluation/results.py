"""The evaluation result record: one (model, dataset) run, as written by ``vlmpress eval``.

Each run is written twice: ``<out>/<model>__<dataset>.json`` (atomic: temp file + ``os.replace``)
and one line appended to ``<out>/results.jsonl`` (flush + fsync), so a crash mid-suite leaves the
datasets already evaluated intact. ``vlmpress report`` and :func:`vlmpress.evaluation.table.build_table`
read the JSONL.

Schema (``schema_version`` 1; accuracies are fractions in [0, 1]):

==================  ======================================================================
field               meaning
==================  ======================================================================
model               model spec or checkpoint directory, as given to ``--model``
base_model          spec of the uncompressed model (compression block's ``model``; = model for base)
method              ``"base"`` when uncompressed, else the compression method (pgsvd, svd_als, ...)
reduction           targeted-layer parameter reduction fraction (compression block's
                    ``targeted_reduction``); 0.0 for base
label               free text naming the row, e.g. "PGSVD auto" (default: the method's display name)
dataset             registry name (``caltech101``...) or ``imagefolder:<path>``
split               split id, e.g. ``official-test``, ``hash(seed=0,test=0.3)-test``,
                    ``file(test.txt@16b3dc245b7a)-test``, plus ``+limit50(seed=0)`` for subsets
split_detail        how the split was made (kind, seed, fraction, split file + sha256, limit)
metrics             {top1, top5, mean_per_class_recall}
top1_stderr         binomial standard error sqrt(p (1 - p) / n) of top1
top5_k              k actually used for "top-5" (min(5, n_classes))
n_images            images evaluated
n_classes           classes in the classifier (all of the dataset's classes)
n_classes_present   classes with at least one evaluated image
n_nonfinite         images whose logits were NaN/inf (counted wrong)
templates           ``ensemble`` or ``single``; n_templates: prompts per class
seconds             wall time of the run (text classifier + images); seconds_text, seconds_images
device, precision   where and how it ran (cuda/cpu; fp32/fp16/bf16 autocast)
compression         the ``compression`` block of ``vlmpress_config.json`` (None for base models)
versions            library versions (python, torch, torchvision, open_clip_torch, ...)
timestamp           UTC ISO-8601 time the record was written
==================  ======================================================================
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from vlmpress.errors import VlmpressError
from vlmpress.io import append_jsonl, atomic_write_json, library_versions

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RESULTS_JSONL = "results.jsonl"
METRIC_KEYS = ("top1", "top5", "mean_per_class_recall")


class ResultsError(VlmpressError, ValueError):
    """A results file is missing or holds no usable records."""


_NUM = (int, float)
#: JSON types of the record fields (a record with others is skipped, never half-used)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "dataset": (str,), "split": (str,), "metrics": (dict,), "method": (str,), "label": (str,),
    "base_model": (str,), "templates": (str,), "device": (str,), "precision": (str,), "timestamp": (str,),
    "predictions_file": (str,), "n_images": (int,), "n_classes": (int,), "n_classes_present": (int,), "n_nonfinite": (int,),
    "top5_k": (int,), "n_templates": (int,), "schema_version": (int,), "reduction": _NUM, "top1_stderr": _NUM,
    "seconds": _NUM, "seconds_text": _NUM, "seconds_images": _NUM, "split_detail": (dict,), "compression": (dict,),
    "versions": (dict,),
}
_NULLABLE = frozenset({"reduction", "compression", "predictions_file", "top1_stderr"})


@dataclass
class EvalRecord:
    """One (model, dataset) zero-shot evaluation (see the module docstring for every field)."""

    model: str
    dataset: str
    split: str
    metrics: dict[str, float]
    n_images: int
    n_classes: int
    top1_stderr: float
    seconds: float
    method: str = "base"
    reduction: float = 0.0
    label: str = ""
    base_model: str = ""
    n_classes_present: int = 0
    n_nonfinite: int = 0
    top5_k: int = 5
    templates: str = "ensemble"
    n_templates: int = 0
    seconds_text: float = 0.0
    seconds_images: float = 0.0
    device: str = "cpu"
    precision: str = "fp32"
    split_detail: dict[str, Any] = field(default_factory=dict)
    compression: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    predictions_file: str | None = None  # per-image top-k (eval --save-predictions)
    timestamp: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def top1(self) -> float:
        return float(self.metrics["top1"])

    @property
    def top5(self) -> float:
        return float(self.metrics["top5"])

    @property
    def is_base(self) -> bool:
        return self.method == "base"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalRecord":
        """Tolerant of extra keys (newer writers) and fills derived defaults for older ones."""
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("model", "dataset", "metrics") if k not in data]
        if missing:
            raise ResultsError(f"result record lacks {', '.join(missing)}: {str(data)[:120]}")
        for key, kinds in _FIELD_TYPES.items():
            value = data.get(key)
            if key in data and not (isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)):
                if value is None and key in _NULLABLE:
                    continue
                raise ResultsError(f"result record field '{key}' has the wrong type ({type(value).__name__})")
            if isinstance(value, float) and not math.isfinite(value) and key != "top1_stderr":
                raise ResultsError(f"result record field '{key}' is not finite")
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs.setdefault("split", "unknown")
        kwargs.setdefault("n_images", 0)
        kwargs.setdefault("n_classes", 0)
        kwargs.setdefault("top1_stderr", float("nan"))
        kwargs.setdefault("seconds", 0.0)
        rec = cls(**kwargs)
        if rec.reduction is None:
            rec.reduction = 0.0
        if not rec.label:
            rec.label = default_label(rec.method)
        if not rec.base_model:
            rec.base_model = (rec.compression or {}).get("model") or rec.model
        return rec


# ---------------------------------------------------------------------------------------------- compression info
def method_display(method: str) -> str:
    from vlmpress.pipeline.config import METHOD_LABELS

    return METHOD_LABELS.get(method, method.upper().replace("_", "-"))


def default_label(method: str) -> str:
    return method_display(method)


def compression_info(adapter: Any = None, model_spec: str | None = None) -> tuple[str, float, dict | None, str]:
    """(method, targeted reduction, compression block or None, base model spec) of a loaded model.

    Read from ``adapter.checkpoint_config`` (set by ``load_compressed``) or, failing that, from
    ``<model_spec>/vlmpress_config.json``; an uncompressed model is ``("base", 0.0, None, spec)``.
    """
    config = getattr(adapter, "checkpoint_config", None) if adapter is not None else None
    if config is None and model_spec and Path(model_spec, "vlmpress_config.json").is_file():
        try:
            config = json.loads(Path(model_spec, "vlmpress_config.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            logger.warning("could not read %s/vlmpress_config.json: %s", model_spec, err)
    spec = model_spec or getattr(adapter, "spec", "") or ""
    if not config:
        return "base", 0.0, None, spec
    block = config.get("compression") or {}
    method = block.get("method") or config.get("method") or "unknown"
    reduction = block.get("targeted_reduction")
    if reduction is None:
        before, after = block.get("targeted_params_before"), block.get("targeted_params_after")
        reduction = 1 - after / before if before and after is not None else 0.0
    base = block.get("model") or config.get("model_spec") or spec
    return str(method), float(reduction), block or None, str(base)


def make_record(
    result,
    *,
    model: str,
    adapter: Any = None,
    label: str | None = None,
    templates: str = "ensemble",
) -> EvalRecord:
    """An :class:`EvalRecord` from a :class:`~vlmpress.evaluation.zeroshot.ZeroShotResult`."""
    method, reduction, block, base = compression_info(adapter, model)
    m = result.metrics
    return EvalRecord(
        model=model,
        dataset=result.dataset,
        split=result.split_id,
        metrics={"top1": m.top1, "top5": m.top5, "mean_per_class_recall": m.mean_per_class_recall},
        n_images=m.n_images,
        n_classes=m.n_classes,
        top1_stderr=m.top1_stderr,
        seconds=round(result.seconds, 3),
        method=method,
        reduction=reduction,
        label=label or default_label(method),
        base_model=base,
        n_classes_present=m.n_classes_present,
        n_nonfinite=m.n_nonfinite,
        top5_k=m.top5_k,
        templates=templates,
        n_templates=result.n_templates,
        seconds_text=round(result.seconds_text, 3),
        seconds_images=round(result.seconds_images, 3),
        device=result.device,
        precision=result.precision,
        split_detail=dict(result.split_detail),
        compression=block,
        versions=library_versions(),
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


# ---------------------------------------------------------------------------------------------- I/O
def _slug(text: str) -> str:
    text = text.rstrip("/\\")
    if "/" in text or "\\" in text:
        parts = re.split(r"[/\\]", text)
        text = "-".join(p for p in parts[-2:] if p)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def record_filename(record: EvalRecord) -> str:
    """``<model>__<dataset>[__single].json``: one file per (model, dataset, templates) run."""
    suffix = "" if record.templates == "ensemble" else f"__{record.templates}"
    return f"{_slug(record.model)}__{_slug(record.dataset)}{suffix}.json"


def write_record(record: EvalRecord, out_dir: str | Path, jsonl_name: str = RESULTS_JSONL) -> Path:
    """Write the per-run JSON atomically, then append it to ``results.jsonl`` (fsynced)."""
    out = Path(out_dir)
    path = atomic_write_json(out / record_filename(record), record.to_dict())
    append_jsonl(out / jsonl_name, record.to_dict())
    return path


def iter_json_records(path: Path) -> Iterable[tuple[int, Any]]:
    """(line number, parsed value) of every readable line of a JSONL (or the one value of a .json).

    Lines that are not UTF-8, not JSON, nested absurdly deep or hold huge integers or duplicate
    keys are skipped with one warning each (a crash mid-append leaves such a line); a ``.json``
    file that cannot be read is a :class:`ResultsError`.
    """
    from vlmpress.io.strict import loads_strict, read_text_strict

    if path.suffix == ".json":
        yield 1, loads_strict(read_text_strict(path, "result file", ResultsError, max_bytes=64 << 20), str(path), ResultsError, allow_nan=True)
        return
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ResultsError(f"results file {path} cannot be read: {err.strerror or err}") from None
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            yield lineno, loads_strict(raw.decode("utf-8"), f"{path}:{lineno}", ResultsError, allow_nan=True)
        except UnicodeDecodeError:
            logger.warning("%s:%d: skipping a line that is not UTF-8", path, lineno)
        except ResultsError as err:
            logger.warning("skipping unreadable record: %s", err)


def _check_metrics(data: Any) -> None:
    metrics = data.get("metrics") if isinstance(data, dict) else None
    if not isinstance(metrics, dict):
        raise ResultsError("its 'metrics' is not a mapping")
    for key in METRIC_KEYS:
        value = metrics.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
            raise ResultsError(f"its metric {key} = {str(value)[:20]} is not a fraction in [0, 1] (NaN or corrupt)")


def read_records(paths: str | Path | Iterable[str | Path]) -> list[EvalRecord]:
    """Records from ``results.jsonl`` files, per-run ``.json`` files or directories holding a JSONL.

    A truncated or corrupt JSONL line (e.g. a crash while appending), or a record whose accuracy is
    NaN or outside [0, 1], is skipped with a warning -- never printed as a number.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    records: list[EvalRecord] = []
    for p in map(Path, paths):
        if p.is_dir():
            p = p / RESULTS_JSONL
        if not p.is_file():
            raise ResultsError(f"results file not found: {p} (expected a results.jsonl written by 'vlmpress eval')")
        for lineno, data in iter_json_records(p):
            if isinstance(data, dict) and data.get("kind") in ("perplexity", "lm_eval"):
                continue  # LLM records (perplexity, lm_eval): not zero-shot rows
            try:
                if not isinstance(data, dict):
                    raise ResultsError("it is not a JSON object")
                _check_metrics(data)
                records.append(EvalRecord.from_dict(data))
            except (ResultsError, TypeError, ValueError) as err:
                if p.suffix == ".json":
                    raise ResultsError(f"{p} is not a usable result record: {err}") from None
                logger.warning("%s:%d: skipping unreadable record (%s)", p, lineno, str(err)[:200])
    return records
