"""Atomic file writes: long jobs never leave a half-written result behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` to a temp file beside ``path``, fsync, then ``os.replace`` it into place.

    Readers never see a half-written file, and a failed write leaves no temp file behind. The file
    gets the usual umask-based mode (``mkstemp`` alone would leave it 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def append_jsonl(path: str | Path, record: dict) -> Path:
    """Append one JSON line, all or nothing, and fsync it.

    The line goes out in one ``write`` of the whole encoded line under an exclusive lock; if the
    write fails (disk full, quota) the file is cut back to its previous size, so a record is
    never half there to be glued to the next one. A torn last line left by an earlier crash (no
    final newline) is closed with a newline first, so readers report it as one unreadable line
    instead of merging it with this record.
    """
    import logging

    try:
        import fcntl  # POSIX: serialise concurrent appends (elsewhere O_APPEND alone)
    except ImportError:  # pragma: no cover
        fcntl = None

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            logging.getLogger(__name__).warning("%s ended in a torn line (an earlier crash); closed it before appending", path)
            line = b"\n" + line
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(28, f"short write ({written} of {len(line)} bytes)")
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)  # all or nothing
            raise
    finally:
        os.close(fd)  # releases the lock
    return path


def library_versions() -> dict[str, str]:
    """Versions of the libraries that determine a result (recorded with every output)."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("vlmpress", "torch", "torchvision", "open_clip_torch", "transformers", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out
