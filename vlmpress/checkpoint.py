"""Save / load compressed models (peft style: ``model.safetensors`` + ``vlmpress_config.json``).

``save_compressed`` writes into a temporary sibling directory and renames it into place, so an
interrupted save never leaves a half-written checkpoint. ``load_compressed`` rebuilds the
architecture from the saved spec config (no pretrained download), swaps in ``LowRankLinear`` per
the rank map, loads the tensors with ``strict=True`` and checks every shape.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from vlmpress.adapters import adapter_origin, get_adapter_class
from vlmpress.adapters.base import ModelAdapter, replace_module, weight_matrix
from vlmpress.core.lowrank import LowRankLinear
from vlmpress.errors import CheckpointError, ConfigError, UnknownModelSpecError
from vlmpress.io import atomic_write_json, library_versions

logger = logging.getLogger(__name__)

CONFIG_NAME = "vlmpress_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a vlmpress checkpoint: {CONFIG_NAME} is missing")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is corrupt (not valid JSON: {err})") from None
    for key in ("format_version", "family", "spec_config", "ranks"):
        if key not in config:
            raise CheckpointError(f"{path} is incomplete: the '{key}' entry is missing")
    if config["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer vlmpress (format {config['format_version']}); upgrade vlmpress to load it"
        )
    return config


def check_output_dir(out_dir: str | Path, model_spec: str, overwrite: bool = False) -> None:
    """Refuse to replace a directory holding something else unless ``overwrite``."""
    out = Path(out_dir)
    if overwrite or not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    config_path = out / CONFIG_NAME
    if config_path.is_file():
        try:
            existing = json.loads(config_path.read_text()).get("model_spec")
        except json.JSONDecodeError:
            existing = None
        if existing == model_spec:
            return  # same model: replacing an earlier run of it is expected
        raise ConfigError(
            f"output directory {out} already holds a different compressed model ({existing}); "
            "choose another --out or pass --overwrite"
        )
    raise ConfigError(f"output directory {out} is not empty and holds no vlmpress checkpoint; pass --overwrite to replace it")


def save_compressed(
    adapter: ModelAdapter,
    out_dir: str | Path,
    report=None,
    *,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``vlmpress_config.json`` (+ report files) atomically."""
    report = report if report is not None else getattr(adapter, "compression_report", None)
    if report is None:
        raise ConfigError("save_compressed needs the CompressionReport returned by compress()")
    out = Path(out_dir).expanduser().resolve()
    check_output_dir(out, adapter.spec, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_model(adapter.model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": "vlmpress"})
        if hasattr(adapter, "save_preprocessing"):
            adapter.save_preprocessing(tmp)
        config = {
            "format_version": FORMAT_VERSION,
            "model_spec": adapter.spec,
            "family": adapter.family,
            "adapter_origin": adapter_origin(adapter.family),
            "spec_config": adapter.spec_config(),
            "method": report.method,
            "tolerances": report.tolerances,
            "ratio": report.ratio,
            "ranks": report.rank_map,
            "dense_layers": report.dense_layers,
            "layer_shapes": {l.name: [l.out_features, l.in_features] for l in report.layers},
            "compression": report.summary(),
            "recipe": report.config,
            "versions": library_versions(),
            **(extra or {}),
        }
        atomic_write_json(tmp / CONFIG_NAME, config)
        report.write(tmp)
        if out.exists():
            backup = out.with_name(f".{out.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(out, backup)
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved compressed model to %s", out)
    return out


def apply_rank_map(adapter: ModelAdapter, ranks: dict[str, int], shapes: dict[str, list[int]] | None = None) -> None:
    """Replace each named layer by an (uninitialised) LowRankLinear of the saved rank."""
    for name, rank in ranks.items():
        try:
            module = adapter.model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"checkpoint names layer '{name}', which this architecture does not have") from None
        W = weight_matrix(module)
        out_features, in_features = W.shape
        if shapes and name in shapes and list(shapes[name]) != [out_features, in_features]:
            raise CheckpointError(
                f"layer '{name}' is {out_features}x{in_features} in the rebuilt model but "
                f"{shapes[name][0]}x{shapes[name][1]} in the checkpoint config"
            )
        if not 1 <= int(rank) <= min(out_features, in_features):
            raise CheckpointError(f"layer '{name}' has invalid rank {rank} for a {out_features}x{in_features} weight")
        bias = getattr(module, "bias", None)
        new = LowRankLinear(in_features, out_features, int(rank), bias=bias is not None, device=W.device, dtype=W.dtype)
        replace_module(adapter.model, name, new)


def load_compressed(directory: str | Path, *, device: str | torch.device = "cpu") -> ModelAdapter:
    """Rebuild a compressed model saved by :func:`save_compressed` (no download needed)."""
    directory = Path(directory).expanduser()
    config = read_checkpoint_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{directory} is missing {WEIGHTS_NAME}")
    try:
        cls = get_adapter_class(config["family"])
    except UnknownModelSpecError as err:
        origin = str(config.get("adapter_origin", ""))
        package = f" It was written with the adapter package '{origin[7:]}': install it." if origin.startswith("plugin:") else ""
        raise CheckpointError(f"{directory} needs adapter family '{config['family']}', which is not installed.{package} {err}") from None
    adapter = cls.build_from_spec_config(config["spec_config"], device="cpu", preprocessing_dir=directory)
    adapter.spec = config.get("model_spec", adapter.spec)
    adapter.prepare_for_compression()
    apply_rank_map(adapter, config["ranks"], config.get("layer_shapes"))
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is corrupt or unreadable: {err}") from None
    expected = adapter.model.state_dict()
    missing = sorted(set(expected) - set(state))
    # tied weights are stored once by safetensors.save_model; only complain about real gaps
    shared = {k for k in missing if any(expected[k].data_ptr() == expected[o].data_ptr() for o in state if o in expected)}
    missing = [k for k in missing if k not in shared]
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match the architecture in {CONFIG_NAME}: "
            f"{len(missing)} missing tensors (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"tensor '{key}' has shape {tuple(tensor.shape)} in {weights} but {tuple(expected[key].shape)} "
                "in the architecture described by the config (mismatched or corrupt checkpoint)"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"tensor '{key}' in {weights} holds NaN/inf values (corrupt checkpoint)")
    adapter.model.load_state_dict(state, strict=not shared)
    adapter.model.to(device)
    adapter.model.eval()
    adapter.checkpoint_config = config  # type: ignore[attr-defined]
    return adapter


def export_dense(adapter: ModelAdapter, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Merge factors back into dense weights and write a stock checkpoint of the model's family."""
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {out} is not empty; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    adapter.export_dense(out)
    return out
