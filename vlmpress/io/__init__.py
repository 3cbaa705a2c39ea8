"""Files on disk: atomic writes (:mod:`~vlmpress.io.atomic`), atomic directory replacement with
owned temporaries (:mod:`~vlmpress.io.atomic_dir`), strict readers of untrusted JSON, YAML, text and
safetensors headers (:mod:`~vlmpress.io.strict`) and the project's data files
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
