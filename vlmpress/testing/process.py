"""Running a conformance check in a fresh Python interpreter (what a user's next session sees)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def fresh_process_env() -> dict[str, str]:
    """The environment of a child Python that imports what this process imports.

    The caller's whole import path is passed on (``PYTHONPATH`` extended, never replaced), so an
    adapter installed with ``pip --target`` + ``PYTHONPATH`` or sitting next to a test is found.
    """
    paths = [p for p in sys.path if p] + [str(Path(__file__).resolve().parents[2])]
    existing = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys([*paths, *filter(None, existing.split(os.pathsep))])))
