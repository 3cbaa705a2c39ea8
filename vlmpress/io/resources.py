"""Locate data files that live at the repository root (configs/, eval/).

vlmpress keeps model configs, recipes, class names and prompt templates as plain data files in
the repository (open_clip style). The package is installed from a checkout (``pip install -e .``),
so these are found next to the package; ``VLMPRESS_HOME`` points elsewhere if needed.
"""

from __future__ import annotations

import os
from pathlib import Path

from vlmpress.errors import VlmpressError

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # vlmpress/ (this file is vlmpress/io/resources.py)


def project_root() -> Path:
    """The directory holding ``configs/`` and ``eval/`` (repository root by default)."""
    env = os.environ.get("VLMPRESS_HOME")
    if env:
        return Path(env).expanduser().resolve()
    return _PACKAGE_DIR.parent


def resource_path(relative: str | os.PathLike) -> Path:
    """Absolute path of a data file such as ``configs/models/digits-vit.json``.

    Raises a :class:`VlmpressError` naming the searched location when it is missing.
    """
    path = project_root() / relative
    if not path.exists():
        raise VlmpressError(
            f"vlmpress data file '{relative}' not found under {project_root()}. "
            "Install vlmpress from a source checkout (pip install -e .) or set VLMPRESS_HOME "
            "to a directory containing configs/ and eval/."
        )
    return path


def cache_dir() -> Path:
    """Per-user cache for trained reference models and other reusable artefacts."""
    env = os.environ.get("VLMPRESS_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlmpress"
    base.mkdir(parents=True, exist_ok=True)
    return base
