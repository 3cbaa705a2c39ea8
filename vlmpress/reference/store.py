"""Trained reference checkpoints on disk: write atomically, find in the cache, or train on demand.

A reference directory holds ``model.safetensors`` (a stock open_clip state dict, loadable with
``open_clip.create_model_and_transforms(model_name, pretrained=path)``) and ``reference.json``
(the sidecar: recipe, prompts, data, seed, loss, held-out top-1, timings, versions). Cached
models live in ``cache_dir()/reference/<name>/<config hash>/`` so a changed recipe retrains.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmpress.errors import CheckpointError
from vlmpress.reference.config import get_config, register_model_configs
from vlmpress.reference.data import data_id, dataset_text
from vlmpress.reference.train import TrainResult, train_reference
from vlmpress.io import atomic_write
from vlmpress.io.resources import cache_dir

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
SIDECAR = "reference.json"


@dataclass
class ReferenceModel:
    """A trained reference CLIP: where its checkpoint is and how to load and prompt it."""

    name: str
    model_name: str  # open_clip config name (configs/models/<model_name>.json)
    checkpoint: Path
    spec: str  # vlmpress model spec: open_clip:<model_name>/<absolute checkpoint path>
    classnames: list[str]
    templates: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)

    def load(self, device: str = "cpu"):
        """``(model, preprocess, tokenizer)`` via stock open_clip; the model is in eval mode."""
        import open_clip

        register_model_configs()
        model, _, preprocess = open_clip.create_model_and_transforms(self.model_name, pretrained=str(self.checkpoint), device=device)
        model.eval()
        return model, preprocess, open_clip.get_tokenizer(self.model_name)


def save_reference(result: TrainResult, directory: str | os.PathLike) -> ReferenceModel:
    """Write weights then sidecar (each temp file + ``os.replace``); the sidecar marks completion."""
    from safetensors.torch import save_file

    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
    metadata = dict(result.metadata, checkpoint=WEIGHTS)
    atomic_write(directory / WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write(directory / SIDECAR, lambda p: p.write_text(json.dumps(metadata, indent=2) + "\n"))
    logger.info("saved reference '%s' to %s", result.config.name, directory)
    return load_reference(directory)


def load_reference(directory: str | os.PathLike) -> ReferenceModel:
    """A :class:`ReferenceModel` from a directory written by :func:`save_reference`."""
    directory = Path(directory).resolve()
    sidecar, weights = directory / SIDECAR, directory / WEIGHTS
    if not sidecar.is_file() or not weights.is_file():
        raise CheckpointError(f"no reference model in {directory}: expected {WEIGHTS} and {SIDECAR}")
    try:
        meta = json.loads(sidecar.read_text())
        return ReferenceModel(
            name=meta["name"],
            model_name=meta["model_name"],
            checkpoint=weights,
            spec=f"open_clip:{meta['model_name']}/{weights}",
            classnames=list(meta["classnames"]),
            templates=list(meta["templates"]),
            metadata=meta,
        )
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"corrupt reference sidecar {sidecar}: {err}") from None


def reference_cache_dir(name: str) -> Path:
    """``cache_dir()/reference/<name>``: one sub-directory per recipe hash."""
    return cache_dir() / "reference" / name


def get_reference(
    name: str,
    *,
    retrain: bool = False,
    quick: bool = False,
    epochs: int | None = None,
    seed: int | None = None,
    progress: bool = True,
    threads: int | None = None,
    data_root: str | None = None,
) -> ReferenceModel:
    """The trained reference model ``name`` (``digits``, ``caltech101``): from the cache, else trained.

    The cache key is a hash of the recipe, the model config JSON, the prompts and the data split,
    so any change trains a new model; ``retrain`` trains even when a cached one exists.
    ``quick`` trains a few steps on a handful of images (tests). ``epochs`` / ``seed`` override
    the recipe.
    """
    config = get_config(name, quick=quick, epochs=epochs, seed=seed)
    classnames, templates = dataset_text(config.dataset, data_root)
    if config.templates:
        templates = list(config.templates)
    key = config.fingerprint(classnames, templates, data_id(config.dataset, data_root))
    directory = reference_cache_dir(name) / key[:16]
    if not retrain:
        try:
            ref = load_reference(directory)
            if ref.metadata.get("config_hash") == key:
                logger.info("using cached reference '%s' from %s", name, directory)
                return ref
            logger.warning("cached reference in %s has a different config hash; retraining", directory)
        except CheckpointError:
            pass
    result = train_reference(config, progress=progress, threads=threads, data_root=data_root)
    return save_reference(result, directory)


def load_state(ref: ReferenceModel) -> dict[str, torch.Tensor]:
    """The raw state dict of a reference checkpoint (for comparisons and tests)."""
    from safetensors.torch import load_file

    return load_file(str(ref.checkpoint))
