"""Progress of a sequential (block-by-block) compression on disk, so a killed run can resume.

After each finished decoder block, its factors (``block-NNNN.safetensors``) and report rows
(``block-NNNN.json``) are written atomically into a state directory next to the output, then the
manifest is rewritten (atomically) with both files' SHA-256: a block counts as done only once the
manifest lists it. ``--resume`` reloads the finished blocks' factors and continues with the next
block; the blocks' inputs are recomputed by running the finished blocks again on the calibration
data (a forward pass, no factorisation), so nothing as large as the activations is ever stored.

The state is treated like a checkpoint (see docs/checkpoints.md):

* the manifest records a fingerprint of the recipe *and of the inputs' content* -- SHA-256 of every
  file of a local model and of the calibration text/caption/split files, name+size+mtime of the
  files in a calibration folder -- so a resume after the model or the data changed at the same path
  is refused, naming what changed;
* a missing or unreadable manifest next to saved blocks refuses to reuse them (nothing proves
  which run wrote them);
* every block is verified before use: both files' hashes, the JSON strictly parsed and
  schema-checked, the tensors' names, dtypes, shapes (checked by the caller against the layers)
  and finiteness;
* the CLI removes the state only after the final checkpoint was written and its files verified.
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlmpress.errors import CheckpointError, ConfigError
from vlmpress.io import atomic_write, atomic_write_json
from vlmpress.io.strict import loads_strict, read_json_strict, read_safetensors_header
from vlmpress.pipeline.report import LayerReport

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE_VERSION = 2
#: recipe keys that do not change the result (where it runs, how it is shown)
_NEUTRAL_KEYS = ("device", "device_map", "num_workers")
#: recipe keys naming calibration inputs whose content the fingerprint covers
_INPUT_KEYS = ("calib_text", "calib_images", "calib_captions", "calib_split_file")


def state_dir_for(out_dir: str | Path) -> Path:
    """The state directory of a run writing to ``out_dir`` (a hidden sibling)."""
    out = Path(out_dir).expanduser().absolute()
    return out.with_name(f".{out.name}.sequential-state")


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(directory).parts))


def path_content(value: str | None, *, hash_folder_files: bool) -> str | None:
    """A digest of what a path holds (None when it names no local file or folder, e.g. a dataset name).

    A file: its SHA-256. A folder: every file's relative name, size and mtime, plus each file's
    SHA-256 when ``hash_folder_files`` (model directories; image folders are keyed by stat only).
    """
    if not value:
        return None
    path = Path(value).expanduser()
    try:
        if path.is_file():
            return _sha256(path)
        if not path.is_dir():
            return None
        digest = hashlib.sha256()
        for f in _files_under(path):
            st = f.stat()
            digest.update(f"{f.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            if hash_folder_files:
                digest.update(_sha256(f).encode())
        return digest.hexdigest()
    except OSError as err:
        raise ConfigError(f"cannot read {path} to fingerprint the run: {err.strerror or err}") from None


def inputs_fingerprint(model_spec: str, config_dict: dict[str, Any]) -> dict[str, str | None]:
    """Content digests of the run's inputs: the model's local files and the calibration data."""
    from vlmpress.pipeline.checkpoint import model_paths  # one place knows which paths a spec reads

    model = [path_content(str(p), hash_folder_files=True) for p in model_paths(model_spec)]
    out: dict[str, str | None] = {"model": hashlib.sha256("\0".join(m or "" for m in model).encode()).hexdigest() if model else None}
    for key in _INPUT_KEYS:
        out[key] = path_content(config_dict.get(key), hash_folder_files=False)
    return out


def fingerprint(model_spec: str, config_dict: dict[str, Any], n_blocks: int, inputs: dict | None = None) -> str:
    recipe = {k: v for k, v in config_dict.items() if k not in _NEUTRAL_KEYS}
    text = json.dumps({"model": model_spec, "recipe": recipe, "blocks": n_blocks, "inputs": inputs or {}}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_manifest(data: Any, path: Path) -> dict[str, Any]:
    if not isinstance(data, dict) or not isinstance(data.get("fingerprint"), str):
        raise ConfigError(f"cannot resume from {path.parent}: {path.name} is not a vlmpress run manifest; delete {path.parent} to start over")
    blocks = data.get("blocks", {})
    if not isinstance(blocks, dict) or not all(
        isinstance(k, str) and k.isdigit() and isinstance(v, dict)
        and all(isinstance(v.get(f), str) and len(v[f]) == 64 for f in ("weights_sha256", "meta_sha256"))
        for k, v in blocks.items()
    ):
        raise ConfigError(f"cannot resume from {path.parent}: {path.name} has a malformed block list; delete {path.parent} to start over")
    return data


class SequentialState:
    """Finished blocks of one sequential run, persisted in ``directory``."""

    def __init__(self, directory: Path, print_: str, manifest: dict[str, Any] | None = None):
        """``manifest`` None: read the one in ``directory`` (inspection; :meth:`open` validates it)."""
        self.directory = Path(directory)
        self.fingerprint = print_
        if manifest is None:
            path = self.directory / MANIFEST
            manifest = _check_manifest(read_json_strict(path, "run manifest", ConfigError), path) if path.is_file() else {}
        self.manifest = manifest

    @classmethod
    def open(cls, directory: str | Path, model_spec: str, config_dict: dict, n_blocks: int, *, resume: bool) -> "SequentialState":
        directory = Path(directory)
        inputs = inputs_fingerprint(model_spec, config_dict)
        fp = fingerprint(model_spec, config_dict, n_blocks, inputs)
        manifest_path = directory / MANIFEST
        leftovers = [p for p in directory.iterdir()] if directory.is_dir() else []
        if manifest_path.is_file():
            old = _check_manifest(read_json_strict(manifest_path, "run manifest", ConfigError), manifest_path)
            done = cls(directory, fp, old).done_blocks()
            if not resume and not done:  # nothing finished: nothing to lose, start over
                shutil.rmtree(directory, ignore_errors=True)
                return cls.open(directory, model_spec, config_dict, n_blocks, resume=False)
            if not resume:
                raise ConfigError(
                    f"an interrupted sequential run left its progress in {directory} ({len(done)}/{n_blocks} blocks done); "
                    "pass --resume to continue it, or delete that directory to start over"
                )
            if old.get("fingerprint") != fp:
                changed = [k for k, v in inputs.items() if (old.get("inputs") or {}).get(k) != v]
                what = f"the content of {', '.join(changed)} changed" if changed else "it belongs to a run of another model or recipe"
                raise ConfigError(
                    f"cannot resume from {directory}: {what} ({old.get('model_spec')}); use the same --model, data and "
                    "options, or delete it to start over"
                )
            logger.info("resuming sequential run from %s: %d/%d blocks already done", directory, len(done), n_blocks)
            return cls(directory, fp, old)
        if leftovers:
            raise ConfigError(
                f"{directory} holds saved blocks but no readable {MANIFEST}: nothing proves which run wrote them, so they "
                "are not reused; delete that directory to start over"
            )
        if resume:
            logger.warning("--resume: no saved progress in %s; starting from the first block", directory)
        directory.mkdir(parents=True, exist_ok=True)
        manifest = {"version": STATE_VERSION, "fingerprint": fp, "model_spec": model_spec, "n_blocks": n_blocks,
                    "inputs": inputs, "blocks": {}}
        state = cls(directory, fp, manifest)
        state._write_manifest()
        return state

    def _write_manifest(self) -> None:
        atomic_write_json(self.directory / MANIFEST, self.manifest)

    def _paths(self, index: int) -> tuple[Path, Path]:
        return self.directory / f"block-{index:04d}.safetensors", self.directory / f"block-{index:04d}.json"

    def done_blocks(self) -> list[int]:
        """Indices of finished blocks listed in the manifest, consecutive from 0 (a gap ends the list)."""
        listed = self.manifest.get("blocks", {})
        out, i = [], 0
        while str(i) in listed:
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
        self.manifest.setdefault("blocks", {})[str(index)] = {"weights_sha256": _sha256(weights), "meta_sha256": _sha256(meta)}
        self._write_manifest()  # the block is done once the manifest lists it

    def _refuse(self, index: int, why: str) -> CheckpointError:
        return CheckpointError(f"saved block {index} in {self.directory} is refused: {why}; delete that directory to start over")

    def load_block(self, index: int) -> tuple[dict[str, torch.Tensor], list[LayerReport], dict[str, float]]:
        """A finished block's factors and report rows, verified (hashes, schema, finite tensors)."""
        weights, meta = self._paths(index)
        entry = self.manifest.get("blocks", {}).get(str(index))
        if entry is None:
            raise self._refuse(index, "the manifest does not list it")
        for path, key in ((weights, "weights_sha256"), (meta, "meta_sha256")):
            if not path.is_file() or path.is_symlink():
                raise self._refuse(index, f"{path.name} is missing")
            if _sha256(path) != entry[key]:
                raise self._refuse(index, f"{path.name} does not match the SHA-256 in the manifest (corrupt or modified)")
        try:
            text = meta.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise self._refuse(index, f"{meta.name} is not UTF-8 JSON") from None
        data = loads_strict(text, str(meta), CheckpointError)
        fields = {f.name for f in dataclasses.fields(LayerReport)}
        if not isinstance(data, dict) or not isinstance(data.get("reports"), list) or not all(
            isinstance(r, dict) and set(r) <= fields and {"name", "out_features", "in_features", "rank"} <= set(r) for r in data["reports"]
        ):
            raise self._refuse(index, f"{meta.name} is not a block record")
        try:
            reports = [LayerReport(**r) for r in data["reports"]]
        except TypeError as err:
            raise self._refuse(index, f"{meta.name}: {err}") from None
        read_safetensors_header(weights, CheckpointError)
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as err:
            raise self._refuse(index, f"{weights.name} is unreadable ({err})") from None
        for key, tensor in tensors.items():
            if not tensor.is_floating_point():
                raise self._refuse(index, f"tensor '{key}' is {str(tensor.dtype).removeprefix('torch.')}, not floating point")
            if not torch.isfinite(tensor).all():
                raise self._refuse(index, f"tensor '{key}' holds NaN/inf values")
        seconds = data.get("seconds", {})
        return tensors, reports, seconds if isinstance(seconds, dict) else {}

    def finish(self) -> None:
        """Remove the state once the checkpoint it was building is saved and verified."""
        shutil.rmtree(self.directory, ignore_errors=True)


def remove_state(directory: str | Path) -> None:
    """Remove a run's state directory (only one holding a manifest: never an unrelated folder)."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file() and not directory.is_symlink():
        shutil.rmtree(directory, ignore_errors=True)


__all__ = ["MANIFEST", "SequentialState", "fingerprint", "inputs_fingerprint", "remove_state", "state_dir_for"]
