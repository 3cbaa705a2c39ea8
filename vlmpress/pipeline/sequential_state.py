"""Progress of a sequential (block-by-block) compression on disk, so a killed run can resume.

After each finished decoder block, its factors (``block-NNNN.safetensors``) and report rows
(``block-NNNN.json``, written last: its presence marks the block done) are written atomically into
a state directory next to the output. ``--resume`` reloads the finished blocks' factors and
continues with the next block; the blocks' inputs are recomputed by running the finished blocks
again on the calibration data (a forward pass, no factorisation), so nothing as large as the
activations is ever stored. The state records a fingerprint of the model and the recipe: a resume
with a different one is refused instead of mixing two runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlmpress.errors import ConfigError
from vlmpress.io import atomic_write, atomic_write_json
from vlmpress.pipeline.report import LayerReport

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: recipe keys that do not change the result (where it runs, how it is shown)
_NEUTRAL_KEYS = ("device", "device_map", "num_workers")


def state_dir_for(out_dir: str | Path) -> Path:
    """The state directory of a run writing to ``out_dir`` (a hidden sibling)."""
    out = Path(out_dir).expanduser().absolute()
    return out.with_name(f".{out.name}.sequential-state")


def fingerprint(model_spec: str, config_dict: dict[str, Any], n_blocks: int) -> str:
    recipe = {k: v for k, v in config_dict.items() if k not in _NEUTRAL_KEYS}
    text = json.dumps({"model": model_spec, "recipe": recipe, "blocks": n_blocks}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class SequentialState:
    """Finished blocks of one sequential run, persisted in ``directory``."""

    def __init__(self, directory: Path, print_: str):
        self.directory = directory
        self.fingerprint = print_

    @classmethod
    def open(cls, directory: str | Path, model_spec: str, config_dict: dict, n_blocks: int, *, resume: bool) -> "SequentialState":
        directory = Path(directory)
        fp = fingerprint(model_spec, config_dict, n_blocks)
        manifest = directory / MANIFEST
        if manifest.is_file():
            try:
                old = json.loads(manifest.read_text())
            except json.JSONDecodeError:
                old = {}
            done = cls(directory, fp).done_blocks()
            if not resume and not done:  # nothing finished: nothing to lose, start over
                shutil.rmtree(directory, ignore_errors=True)
                return cls.open(directory, model_spec, config_dict, n_blocks, resume=False)
            if not resume:
                raise ConfigError(
                    f"an interrupted sequential run left its progress in {directory} ({len(done)}/{n_blocks} blocks done); "
                    "pass --resume to continue it, or delete that directory to start over"
                )
            if old.get("fingerprint") != fp:
                raise ConfigError(
                    f"cannot resume from {directory}: it belongs to a run of another model or recipe "
                    f"({old.get('model_spec')}); use the same --model and options, or delete it to start over"
                )
            logger.info("resuming sequential run from %s: %d/%d blocks already done", directory, len(done), n_blocks)
            return cls(directory, fp)
        if resume:
            logger.warning("--resume: no saved progress in %s; starting from the first block", directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(manifest, {"fingerprint": fp, "model_spec": model_spec, "n_blocks": n_blocks})
        return cls(directory, fp)

    def _paths(self, index: int) -> tuple[Path, Path]:
        return self.directory / f"block-{index:04d}.safetensors", self.directory / f"block-{index:04d}.json"

    def done_blocks(self) -> list[int]:
        """Indices of finished blocks, consecutive from 0 (a gap ends the list)."""
        out, i = [], 0
        while self._paths(i)[1].is_file():
            out.append(i)
            i += 1
        return out

    def save_block(self, index: int, tensors: dict[str, torch.Tensor], reports: list[LayerReport], seconds: dict[str, float]) -> None:
        weights, meta = self._paths(index)
        payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        atomic_write(weights, lambda tmp: save_file(payload, str(tmp)))
        atomic_write_json(meta, {
            "block": index,
            "reports": [dataclasses.asdict(r) for r in reports],
            "seconds": seconds,
            "weights": weights.name,
        })

    def load_block(self, index: int) -> tuple[dict[str, torch.Tensor], list[LayerReport], dict[str, float]]:
        weights, meta = self._paths(index)
        data = json.loads(meta.read_text())
        tensors = load_file(str(weights)) if weights.is_file() else {}
        return tensors, [LayerReport(**r) for r in data["reports"]], data.get("seconds", {})

    def finish(self) -> None:
        """Remove the state once the checkpoint it was building is saved."""
        shutil.rmtree(self.directory, ignore_errors=True)
