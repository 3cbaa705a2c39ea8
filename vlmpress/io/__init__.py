"""Files on disk: atomic writes (:mod:`~vlmpress.io.atomic`) and the project's data files
(:mod:`~vlmpress.io.resources`: ``configs/``, ``eval/``, the cache directory).

Imports nothing of vlmpress but :mod:`vlmpress.errors`; every other package may use it.
"""

from vlmpress.io.atomic import (  # noqa: F401  (the historical ``vlmpress.io`` names)
    append_jsonl,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    library_versions,
)

__all__ = ["append_jsonl", "atomic_write", "atomic_write_json", "atomic_write_text", "library_versions"]
