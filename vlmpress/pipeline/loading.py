"""One loader for everything vlmpress can open: a model spec or a compressed checkpoint directory."""

from __future__ import annotations

from pathlib import Path

from vlmpress.adapters.base import ModelAdapter
from vlmpress.adapters.registry import adapter_for_spec
from vlmpress.pipeline.checkpoint import load_compressed


def is_compressed_dir(spec: str) -> bool:
    """Whether ``spec`` names a directory written by ``save_compressed``."""
    return Path(spec).is_dir() and (Path(spec) / "vlmpress_config.json").is_file()


def load_model(spec: str, *, device="cpu", adapter: str | None = None, **kwargs) -> ModelAdapter:
    """Load any model vlmpress knows: a spec string or a compressed checkpoint directory."""
    verify = kwargs.pop("verify", True)  # compressed checkpoints: check file hashes
    if is_compressed_dir(spec):
        return load_compressed(spec, device=device, verify=verify)
    return adapter_for_spec(spec, adapter).load(spec, device=device, **kwargs)
