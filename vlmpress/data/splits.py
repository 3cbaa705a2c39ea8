"""Deterministic train/test splits and stratified subsets.

Caltech101 and EuroSAT ship without an official test split, and ``--limit N`` needs a subset that
covers the classes rather than the first N files (which would all be one class). Both are decided
here from each file's *relative path* and a seed only, so they are identical on every machine and
never depend on the order in which the filesystem lists files.

Split policy (``hash_split``): within each class, files are ordered by
``sha256(f"{seed}:{relative_path}")``; the first ``round(test_fraction * n)`` go to *test*, the
rest to *train* (at least one file on each side when a class has two or more). The split is
therefore stratified (every class keeps its proportion), reproducible, and a file's side only
changes when its class gains or loses files.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from vlmpress.errors import DatasetError

logger = logging.getLogger(__name__)

#: fraction of each class that the default hash split puts into *test*
DEFAULT_TEST_FRACTION = 0.3


def hash_key(seed: int, relpath: str) -> str:
    """Stable sort key of one file: sha256 of ``"{seed}:{posix relative path}"``."""
    return hashlib.sha256(f"{seed}:{relpath}".encode("utf-8")).hexdigest()


def _n_test(n: int, test_fraction: float) -> int:
    k = int(round(test_fraction * n))
    if n >= 2:
        k = min(max(k, 1), n - 1)
    return k


def hash_split(
    relpaths: Sequence[str], labels: Sequence[int], *, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 0
) -> tuple[list[int], list[int]]:
    """(train indices, test indices), both sorted, by the per-class hash policy above."""
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if len(relpaths) != len(labels):
        raise ValueError("relpaths and labels differ in length")
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    train: list[int] = []
    test: list[int] = []
    for members in by_class.values():
        ordered = sorted(members, key=lambda i: (hash_key(seed, relpaths[i]), relpaths[i]))
        k = _n_test(len(ordered), test_fraction)
        test.extend(ordered[:k])
        train.extend(ordered[k:])
    return sorted(train), sorted(test)


def stratified_subset(
    labels: Sequence[int], n: int, *, seed: int = 0, keys: Sequence[str] | None = None
) -> list[int]:
    """Indices of a deterministic, class-proportional subset of size ``min(n, len(labels))``.

    Each class gets ``n * n_c / N`` items by largest-remainder rounding (ties: classes in seeded hash
    order, so with ``n`` below the class count the chosen classes are spread, not the first ones).
    Within a class the items with the smallest ``hash_key(seed, key)`` are taken; ``keys`` default
    to the index. Returned indices are sorted.
    """
    total = len(labels)
    if n >= total:
        return list(range(total))
    if n <= 0:
        raise DatasetError(f"--limit must be a positive number of images, got {n}")
    keys = [str(i) for i in range(total)] if keys is None else list(keys)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    quotas = {c: n * len(m) / total for c, m in by_class.items()}
    alloc = {c: int(q) for c, q in quotas.items()}
    left = n - sum(alloc.values())
    order = sorted(by_class, key=lambda c: (-(quotas[c] - alloc[c]), hash_key(seed, f"class:{c}")))
    for c in order[:left]:
        alloc[c] += 1
    chosen: list[int] = []
    for c, members in by_class.items():
        ranked = sorted(members, key=lambda i: (hash_key(seed, keys[i]), keys[i]))
        chosen.extend(ranked[: alloc[c]])
    return sorted(chosen)


def read_split_file(path: str | Path) -> list[str]:
    """Relative paths listed in a split file (one per line; blank lines and ``#`` comments skipped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"split file not found: {path} (expected one relative image path per line)")
    from vlmpress.io.strict import read_text_strict

    lines = [line.strip().replace("\\", "/") for line in read_text_strict(path, "split file", DatasetError, max_bytes=256 << 20).splitlines()]
    items = [line for line in lines if line and not line.startswith("#")]
    if not items:
        raise DatasetError(f"split file {path} lists no images")
    return items


def file_digest(path: str | Path, length: int = 12) -> str:
    """Short sha256 of a file, recorded with results so a split file's exact version is known."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:length]
