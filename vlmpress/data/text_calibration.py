"""Text for LLM calibration and evaluation: a local text file or a locally cached HF dataset.

Calibration follows GPTQ / SVD-LLM: the text is tokenised once as one stream and ``n_samples``
windows of ``seq_len`` tokens are cut at seeded random offsets. Windows shorter than ``seq_len``
(only when the whole text is shorter) are right-padded in a batch and the padding is masked out of
the covariances (``attention_mask`` -> ``collector.mask``).

Dataset sources are read with the Hub switched off (``HF_DATASETS_OFFLINE`` behaviour): a dataset
that is not in the local ``datasets`` cache is a clear :class:`~vlmpress.errors.DatasetError`, never
a download attempt.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmpress.errors import CalibrationError, ConfigError, DatasetError

logger = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 2048  # calibration / perplexity context when the model allows it

#: short names -> (datasets path, config name, text column)
DATASET_ALIASES: dict[str, tuple[str, str | None, str]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text"),
    "wikitext-2": ("wikitext", "wikitext-2-raw-v1", "text"),
    "wikitext-2-raw-v1": ("wikitext", "wikitext-2-raw-v1", "text"),
    "wikitext103": ("wikitext", "wikitext-103-raw-v1", "text"),
}


@dataclass
class TextSource:
    """Loaded text plus a description of where it came from (recorded in every result)."""

    text: str
    name: str  # file path or dataset id
    split: str | None = None

    def describe(self) -> str:
        return f"{self.name}[{self.split}]" if self.split else self.name


@dataclass
class TokenCalibration:
    """Token windows for calibrating a causal LM (``windows`` are 1-D LongTensors)."""

    windows: list[torch.Tensor]
    source: str
    seq_len: int
    pad_token_id: int = 0
    seed: int = 0
    total_tokens: int = 0  # tokens in the text the windows were cut from
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def n_tokens(self) -> int:
        return int(sum(w.numel() for w in self.windows))

    def describe(self) -> dict[str, Any]:
        return {
            "text_source": self.source,
            "n_samples": len(self.windows),
            "seq_len": self.seq_len,
            "n_tokens": self.n_tokens,
            "source_tokens": self.total_tokens,
            "seed": self.seed,
            **self.extra,
        }


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Switch ``datasets`` to offline mode for the duration (cached datasets still load)."""
    import datasets

    previous = getattr(datasets.config, "HF_HUB_OFFLINE", False)
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = previous


def _parse_dataset_name(name: str) -> tuple[str, str | None, str]:
    """'wikitext2' | 'wikitext/wikitext-2-raw-v1' | 'hf:wikitext:wikitext-2-raw-v1' -> (path, config, column)."""
    key = name.removeprefix("hf:").strip()
    if key.lower() in DATASET_ALIASES:
        return DATASET_ALIASES[key.lower()]
    for sep in (":", "/"):
        if sep in key:
            path, _, config = key.partition(sep)
            return path, config or None, "text"
    return key, None, "text"


def read_text_source(source: str | Path, split: str = "train") -> TextSource:
    """Text of a local file, or of a dataset split found in the local ``datasets`` cache.

    A path that exists is always read as a file; anything else is looked up as a dataset name
    (``wikitext2`` = WikiText-2 raw, or ``NAME/CONFIG``). Dataset rows are joined with blank lines,
    as in Hugging Face's perplexity guide.
    """
    if source is None or str(source).strip() == "":
        raise CalibrationError("no text source given: pass a UTF-8 text file or a locally cached dataset (e.g. wikitext2)")
    path = Path(str(source)).expanduser()
    if path.is_dir():
        raise CalibrationError(f"text source {path} is a directory; give a text file")
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise CalibrationError(f"text file {path} is not UTF-8 text ({err})") from None
        if not text.strip():
            raise CalibrationError(f"text file {path} is empty; calibration and perplexity need some text")
        return TextSource(text, str(path))
    looks_like_file = path.suffix in {".txt", ".md", ".text", ".raw"} or "/" in str(source) and path.parent.is_dir()
    if looks_like_file and path.suffix:  # a file name with an extension is never a dataset name
        raise CalibrationError(f"text file {path} does not exist; pass an existing UTF-8 text file or a cached dataset name")
    ds_path, ds_config, column = _parse_dataset_name(str(source))
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise DatasetError("the 'datasets' package is needed for dataset text sources; pip install datasets") from None
    try:
        with _hub_offline():
            rows = datasets.load_dataset(ds_path, ds_config, split=split)
    except Exception as err:  # datasets raises ConnectionError/FileNotFoundError/ValueError for missing caches
        hint = f"file {path} does not exist; " if looks_like_file else ""
        raise DatasetError(
            f"{hint}dataset '{ds_path}'{f' ({ds_config})' if ds_config else ''} split '{split}' is not in the local "
            f"datasets cache and nothing is downloaded here ({type(err).__name__}: {str(err)[:160]}). Pass a text file "
            f"instead, or cache it first on a machine with network: "
            f"python -c \"import datasets; datasets.load_dataset('{ds_path}', {ds_config!r})\""
        ) from None
    if column not in rows.column_names:
        raise DatasetError(f"dataset '{ds_path}' has no '{column}' column (columns: {', '.join(rows.column_names)})")
    text = "\n\n".join(rows[column])
    if not text.strip():
        raise DatasetError(f"dataset '{ds_path}' split '{split}' holds no text")
    name = f"{ds_path}/{ds_config}" if ds_config else ds_path
    return TextSource(text, name, split)


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids (special tokens as the tokenizer adds them)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "sequence longer than model_max_length" is expected here
    try:
        ids = tokenizer(text, return_tensors="pt", return_attention_mask=False)["input_ids"][0]
    finally:
        transformers.logging.set_verbosity(verbosity)
    if ids.numel() == 0:
        raise CalibrationError("the text tokenised to zero tokens")
    return ids.to(torch.long)


def sample_windows(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    """``n_samples`` windows of ``seq_len`` tokens at seeded random offsets (GPTQ-style).

    A text shorter than ``seq_len`` gives a single, shorter window (with a warning).
    """
    if n_samples < 1 or seq_len < 1:
        raise ConfigError(f"n_samples and seq_len must be >= 1, got {n_samples} and {seq_len}")
    total = ids.numel()
    if total < 2:
        raise CalibrationError(f"the calibration text has only {total} token(s); give more text")
    if total <= seq_len:
        logger.warning("calibration text has only %d tokens (< seq_len %d): using it as one window", total, seq_len)
        return [ids.clone()]
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, total - seq_len + 1, (n_samples,), generator=g)
    return [ids[s : s + seq_len].clone() for s in starts.tolist()]


WINDOW_MODES = ("random", "document")


def split_documents(text: str) -> list[str]:
    """Documents of a text: blocks separated by blank lines (dataset rows are joined that way)."""
    return [doc.strip() for doc in re.split(r"\n\s*\n", text) if doc.strip()]


def document_windows(tokenizer, text: str, n_samples: int, seq_len: int, seed: int = 0) -> tuple[list[torch.Tensor], int]:
    """One window per document (its first ``seq_len`` tokens; never crossing into the next one).

    ``n_samples`` documents are drawn without replacement (seeded); shorter documents give shorter
    windows, whose padding is masked out of the covariances. Returns (windows, documents in text).
    """
    docs = split_documents(text)
    if not docs:
        raise CalibrationError("the calibration text holds no document (blocks separated by blank lines)")
    chosen = sorted(random.Random(seed).sample(range(len(docs)), min(n_samples, len(docs))))
    if len(chosen) < n_samples:
        logger.warning("only %d documents for %d requested windows: using every document once", len(docs), n_samples)
    windows = [w for w in (tokenize_text(tokenizer, docs[i])[:seq_len] for i in chosen) if w.numel() >= 2]
    if not windows:
        raise CalibrationError("every sampled document is shorter than 2 tokens; give longer documents")
    return windows, len(docs)


def build_token_calibration(
    source: str | Path,
    tokenizer,
    *,
    n_samples: int,
    seq_len: int | None,
    seed: int = 0,
    split: str = "train",
    max_positions: int | None = None,
    windows: str = "random",
) -> TokenCalibration:
    """Read, tokenise and window a text source for calibration (``seq_len`` None: min(2048, model maximum))."""
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, max_positions or DEFAULT_SEQ_LEN)
    if max_positions is not None and seq_len > max_positions:
        raise ConfigError(
            f"seq_len {seq_len} is larger than the model's maximum of {max_positions} positions; "
            f"pass --seq-len {max_positions} or less"
        )
    if windows not in WINDOW_MODES:
        raise ConfigError(f"calibration windows must be one of {', '.join(WINDOW_MODES)}, got '{windows}'")
    text = read_text_source(source, split=split)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if windows == "document":
        cut, n_docs = document_windows(tokenizer, text.text, n_samples, seq_len, seed)
        total = int(sum(w.numel() for w in cut))
        logger.info("calibration: %d windows (one per document, <= %d tokens) from %s (%d documents)",
                    len(cut), seq_len, text.describe(), n_docs)
        return TokenCalibration(cut, text.describe(), seq_len, int(pad), int(seed), total,
                                extra={"windows": "document", "documents": n_docs})
    ids = tokenize_text(tokenizer, text.text)
    cut = sample_windows(ids, n_samples, seq_len, seed)
    logger.info("calibration: %d windows x %d tokens from %s (%d tokens)", len(cut), seq_len, text.describe(), ids.numel())
    return TokenCalibration(cut, text.describe(), seq_len, int(pad), int(seed), int(ids.numel()), extra={"windows": "random"})


def pad_windows(windows: Sequence[torch.Tensor], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad 1-D windows into ``input_ids`` / ``attention_mask`` (1 = real token)."""
    length = max(w.numel() for w in windows)
    ids = torch.full((len(windows), length), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(windows), length), dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, : w.numel()] = w
        mask[i, : w.numel()] = 1
    return {"input_ids": ids, "attention_mask": mask}


def token_batches(calibration: TokenCalibration, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Calibration windows in fixed-order batches (the same batches in whole and sequential mode)."""
    if not isinstance(calibration, TokenCalibration):
        raise CalibrationError(
            f"LLM calibration needs token windows (TokenCalibration), got {type(calibration).__name__}; "
            "pass --calib-text FILE"
        )
    if not calibration.windows:
        raise CalibrationError("the calibration set holds no token windows")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    w = calibration.windows
    return [pad_windows(w[i : i + batch_size], calibration.pad_token_id) for i in range(0, len(w), batch_size)]
