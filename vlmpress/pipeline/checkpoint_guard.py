"""What a checkpoint directory may contain and hand to library loaders: data, never code.

``load_compressed`` reads a checkpoint in three guarded steps (see docs/checkpoints.md):

1. :func:`refuse_code_switches` walks every value of ``vlmpress_config.json`` (and of every JSON
   file it will hand on): no ``trust_remote_code``, no ``auto_map`` (names Python modules), no
   attention implementation other than the built-in ones (a hub name would download kernels);
2. :func:`check_tree` refuses symbolic links that leave the checkpoint directory;
3. :func:`stage_files` copies exactly the files of the hash list into a private directory,
   hashing the bytes it copies and comparing them with the list. Library loaders (tokenizers, image
   processors, open_clip text configs) are pointed at that directory only, so every file they can
   open was listed and verified, and nothing outside the checkpoint (another path, a hub id) is
   reachable through a name in the config.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from vlmpress.errors import CheckpointError
from vlmpress.io.strict import loads_strict

#: keys that switch on code execution or name code to import, wherever they appear
CODE_KEYS = frozenset({"trust_remote_code", "auto_map", "custom_pipelines"})
#: keys naming an attention implementation; values other than these would fetch kernels from a hub
ATTENTION_KEYS = frozenset({"attn_implementation", "_attn_implementation", "_attn_implementation_internal"})
ATTENTION_VALUES = frozenset({"eager", "sdpa"})
#: file kinds that hold code or pickles: refused in a checkpoint's hash list whatever their hash
CODE_SUFFIXES = frozenset({".py", ".pyc", ".pyo", ".so", ".dll", ".dylib", ".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".joblib"})
_HASH = re.compile(r"[0-9a-f]{64}")


def refuse_code_switches(value: Any, where: str) -> None:
    """Raise CheckpointError if any nested key of ``value`` could turn on or name code."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                here = f"{path}.{key}" if path else str(key)
                lowered = str(key).lower()
                if lowered in CODE_KEYS:
                    raise CheckpointError(
                        f"{where} is refused: '{here}' would let a library run or import code; "
                        "checkpoints are data only (remove that entry)"
                    )
                if lowered in ATTENTION_KEYS and child is not None and child not in ATTENTION_VALUES:
                    raise CheckpointError(
                        f"{where} is refused: '{here}' = {str(child)[:60]!r} is not a built-in attention "
                        f"implementation ({', '.join(sorted(ATTENTION_VALUES))} or null)"
                    )
                stack.append((child, here))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))


def hash_list_problem(value: Any, *, subfolders: bool) -> str | None:
    """Why a ``file_sha256`` value is invalid, or None (relative POSIX paths -> 64 hex digits)."""
    if not isinstance(value, dict) or not value:
        return "must map file names to SHA-256 hex digests"
    for name, digest in value.items():
        bad = not isinstance(name, str) or not isinstance(digest, str) or not _HASH.fullmatch(digest)
        if not bad:
            parts = name.split("/")
            bad = (
                "\\" in name or "\x00" in name or PurePosixPath(name).is_absolute()
                or any(not p or p in (".", "..") or p.startswith(".") for p in parts)
                or (len(parts) > 1 and not subfolders)
            )
        if bad:
            return f"has an invalid entry {name!r}: {digest!r} (expected a relative file path inside the checkpoint -> 64 hex digits)"
        if PurePosixPath(name).suffix.lower() in CODE_SUFFIXES:
            return f"lists {name!r}, a code or pickle file; checkpoints hold safetensors and JSON/text files only"
    return None


def check_tree(directory: Path) -> None:
    """Refuse symbolic links inside the checkpoint that resolve outside it (or do not resolve)."""
    root = directory.resolve()
    for base, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(base) / name
            if not path.is_symlink():
                continue
            try:
                target = path.resolve(strict=True)
            except (OSError, RuntimeError):
                raise CheckpointError(f"{path} is a broken or looping symbolic link; a checkpoint holds plain files") from None
            if target != root and root not in target.parents:
                raise CheckpointError(
                    f"{path} is a symbolic link to {target}, outside the checkpoint; a checkpoint must hold its own files"
                )


def sha256_copy(src: Path, dst: Path | None, chunk: int = 1 << 22) -> str:
    """SHA-256 of ``src``, copying the very bytes hashed to ``dst`` when given."""
    digest = hashlib.sha256()
    with open(src, "rb") as f, (open(dst, "wb") if dst is not None else _Null()) as out:
        while block := f.read(chunk):
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, _):
        return None


def _regular_file(directory: Path, name: str) -> Path:
    path = directory / name
    if path.is_symlink():
        check_tree(directory)  # a link inside the checkpoint is fine, one leaving it is refused
    if not path.is_file():
        raise CheckpointError(f"{directory} is incomplete: {name} (recorded in vlmpress_config.json) is missing")
    return path


def verify_file(directory: Path, name: str, expected: str) -> None:
    """Compare one listed file's SHA-256 with the hash list (weights: hashed in place, not copied)."""
    path = _regular_file(directory, name)
    if sha256_copy(path, None) != expected:
        raise CheckpointError(
            f"{path} does not match the SHA-256 recorded in vlmpress_config.json: the file is corrupt or was modified "
            "(restore it, or load with verify=False / --no-verify to skip the check)"
        )


def stage_files(directory: Path, hashes: dict[str, str], dest: Path, *, skip: set[str], verify: bool) -> list[str]:
    """Copy every listed file except ``skip`` into ``dest`` (hash-checked unless ``verify`` is False).

    JSON files among them are parsed strictly (duplicate keys refused) and walked by
    :func:`refuse_code_switches`. Returns the staged names.
    """
    staged = []
    for name, expected in hashes.items():
        if name in skip:
            continue
        src = _regular_file(directory, name)
        dst = dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if sha256_copy(src, dst) != expected and verify:
            raise CheckpointError(
                f"{src} does not match the SHA-256 recorded in vlmpress_config.json: the file is corrupt or was modified "
                "(restore it, or load with verify=False / --no-verify to skip the check)"
            )
        if dst.suffix.lower() == ".json":
            try:
                text = dst.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise CheckpointError(f"{src} is not valid UTF-8 JSON") from None
            refuse_code_switches(loads_strict(text, str(src), CheckpointError), str(src))
        staged.append(name)
    return staged


def remove_staging(dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
