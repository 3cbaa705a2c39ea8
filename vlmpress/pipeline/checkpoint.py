"""Save / load compressed models (peft style: ``model.safetensors`` + ``vlmpress_config.json``).

``save_compressed`` writes the complete checkpoint into a temporary sibling directory and only
then puts it in place: a new path by one ``rename``, an existing checkpoint by an atomic exchange
of the two directories (Linux ``renameat2(RENAME_EXCHANGE)``), so at every instant a kill can hit
the path holds either the old or the new complete checkpoint. Temporaries carry an ownership
marker (:mod:`vlmpress.io.atomic_dir`); the next save removes those of killed saves and never
touches a folder without the marker. ``--overwrite`` replaces only an empty directory or a
vlmpress checkpoint, never the input model's directory; a failed write (disk full, permissions)
is one :class:`~vlmpress.errors.OutputError` line, the previous checkpoint kept.

``vlmpress_config.json`` records the SHA-256 of every file written before it (the weights,
preprocessing files, sub-folders included); ``load_compressed`` treats the checkpoint as data only
(:mod:`vlmpress.pipeline.checkpoint_guard`): the config is parsed strictly and validated against a
schema (types, ranges, no key that could switch on code), the family's spec config against the
adapter's allow-list, the listed files are verified and copied to a private directory from which
alone tokenizers and processors are read, the weights' header is checked (duplicate names), and
every tensor's shape and dtype must match the architecture rebuilt from the config (no pretrained
download). ``verify=False`` skips the hash comparison (not the other checks) for huge files.
"""

from __future__ import annotations

import hashlib
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

from vlmpress.adapters.registry import adapter_origin, get_adapter_class
from vlmpress.adapters.base import ModelAdapter, replace_module, weight_matrix
from vlmpress.core.lowrank import LowRankLinear
from vlmpress.errors import CheckpointError, ConfigError, OutputError, UnknownModelSpecError
from vlmpress.io import atomic_write_json, library_versions
from vlmpress.io.atomic_dir import (  # noqa: F401  (exchange_paths: a historical name here)
    clean_stale_temporaries as _clean_stale,
    exchange_paths,
    fsync_tree,
    make_owned_temp,
    replace_directory,
    temp_prefix,
)
from vlmpress.io.strict import read_json_strict, read_safetensors_header
from vlmpress.pipeline.checkpoint_guard import (
    check_tree,
    hash_list_problem,
    refuse_code_switches,
    remove_staging,
    stage_files,
    verify_file,
)
from vlmpress.pipeline.quantize import apply_quantization_map, quantization_map

logger = logging.getLogger(__name__)

CONFIG_NAME = "vlmpress_config.json"
WEIGHTS_NAME = "model.safetensors"
#: 3: quantised factors (a ``quantization`` entry); 2: ``file_sha256`` lists files in sub-folders too
#: (``tokenizer/...``); 1 (vlmpress 0.1.0): top-level files only. All require the hash list with the
#: weights' entry and ``layer_shapes`` (0.1.0 wrote them). Unquantised checkpoints are written as 2,
#: so the previous release still reads them.
FORMAT_VERSION = 3


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_ranks(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"must map layer names to positive integer ranks, got {type(value).__name__}"
    for name, rank in value.items():
        if not isinstance(name, str) or not name:
            return f"has a non-string layer name {name!r}"
        if not _is_int(rank) or rank < 1:
            return f"gives layer '{name}' the rank {rank!r}; ranks are positive integers"
    return None


def _check_shapes(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"must map layer names to [out, in], got {type(value).__name__}"
    for name, shape in value.items():
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(v) and v >= 1 for v in shape)):
            return f"gives layer '{name}' the shape {shape!r}; expected [out_features, in_features] positive integers"
    return None


def _check_hashes(value: Any) -> str | None:
    return hash_list_problem(value, subfolders=True)


def _check_dense_layers(value: Any) -> str | None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return f"must map layer names to the reason they stayed dense, got {value!r}"
    return None


def _check_format_version(value: Any) -> str | None:
    if not _is_int(value) or value < 1:
        return f"must be a positive integer, got {value!r}"
    return None


def _check_quantization(value: Any) -> str | None:
    from vlmpress.core.quantize import SCHEMES

    if not isinstance(value, dict) or value.get("scheme") not in SCHEMES[1:]:
        return f"must give a scheme ({', '.join(SCHEMES[1:])}), got {value!r}"
    if not _is_int(value.get("group_size", 64)) or not isinstance(value.get("layers"), list) or not all(
        isinstance(n, str) and n for n in value["layers"]
    ):
        return "must give an integer group_size and a list of layer names"
    return None


def _check_str(value: Any) -> str | None:
    return None if isinstance(value, str) and value else f"must be a non-empty string, got {value!r}"


def _check_dict(value: Any) -> str | None:
    return None if isinstance(value, dict) else f"must be a mapping, got {type(value).__name__}"


#: vlmpress_config.json schema: key -> (required, check returning a problem or None)
CONFIG_SCHEMA: dict[str, tuple[bool, Any]] = {
    "format_version": (True, _check_format_version),
    "family": (True, _check_str),
    "spec_config": (True, _check_dict),
    "ranks": (True, _check_ranks),
    "model_spec": (False, _check_str),
    "layer_shapes": (True, _check_shapes),
    "dense_layers": (False, _check_dense_layers),
    "file_sha256": (True, _check_hashes),
    "adapter_origin": (False, _check_str),
    "quantization": (False, _check_quantization),
}


def validate_checkpoint_config(config: Any, path: str | Path = CONFIG_NAME) -> dict[str, Any]:
    """Check a parsed ``vlmpress_config.json`` against :data:`CONFIG_SCHEMA` (types and ranges)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is corrupt: expected a JSON object, got {type(config).__name__}")
    for key, (required, check) in CONFIG_SCHEMA.items():
        if key not in config:
            if required:
                raise CheckpointError(f"{path} is incomplete: the '{key}' entry is missing")
            continue
        problem = check(config[key])
        if problem:
            raise CheckpointError(f"{path} is invalid: '{key}' {problem}")
    if config["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer vlmpress (format {config['format_version']}, this one reads "
            f"<= {FORMAT_VERSION}); upgrade vlmpress to load it"
        )
    if config["format_version"] < 2:  # 0.1.0 listed top-level files only
        problem = hash_list_problem(config["file_sha256"], subfolders=False)
        if problem:
            raise CheckpointError(f"{path} is invalid: 'file_sha256' {problem} (format 1 lists top-level files only)")
    if WEIGHTS_NAME not in config["file_sha256"]:
        raise CheckpointError(f"{path} is invalid: 'file_sha256' has no entry for {WEIGHTS_NAME}; the weights must be hash-listed")
    shapes = config["layer_shapes"]
    unranked = [n for n in (config.get("quantization") or {}).get("layers", []) if n not in config["ranks"]]
    if unranked:
        raise CheckpointError(f"{path} is invalid: quantised layer '{unranked[0]}' has no rank")
    if config.get("quantization") and config["format_version"] < 3:
        raise CheckpointError(f"{path} is invalid: a 'quantization' entry needs format_version 3, not {config['format_version']}")
    for name, rank in config["ranks"].items():
        if name not in shapes:
            raise CheckpointError(f"{path} is invalid: layer '{name}' has a rank but no entry in 'layer_shapes'")
        if rank > min(shapes[name]):
            raise CheckpointError(f"{path} is invalid: rank {rank} of layer '{name}' exceeds its shape {shapes[name]}")
    refuse_code_switches(config, str(path))
    return config


def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a vlmpress checkpoint: {CONFIG_NAME} is missing")
    config = read_json_strict(path, "checkpoint config", CheckpointError, max_bytes=64 << 20, allow_nan=True)
    return validate_checkpoint_config(config, path)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoint_files(directory: Path, config: dict[str, Any]) -> None:
    """Compare every recorded file hash with the file on disk (corruption, truncation, edits)."""
    check_tree(Path(directory))
    for name, expected in config["file_sha256"].items():
        verify_file(Path(directory), name, expected)


def _listed_files(directory: Path) -> list[Path]:
    """Every non-hidden regular file under ``directory`` (sub-folders included), sorted."""
    return sorted(
        p for p in directory.rglob("*")
        if p.is_file() and not p.is_symlink() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def _probe_writable(out: Path) -> None:
    """Fail now, not after hours of compression, when the checkpoint could not be written."""
    parent = out.parent
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"output path {out} is not writable: {parent} is a file, not a directory")
    try:
        # beside ``out`` the probe takes a temporary's name, so one left by a kill between the two
        # calls is an empty temporary that the next save removes
        prefix = f"{temp_prefix(out)}{os.getpid()}." if parent == out.parent else ".vlmpress-write-probe."
        probe = tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent)
        os.rmdir(probe)
    except OSError as err:
        raise ConfigError(
            f"output path {out} is not writable ({err.strerror or err} in {parent}); choose another --out"
        ) from None


def _is_checkpoint_dir(directory: Path) -> bool:
    """Whether ``directory`` holds a vlmpress checkpoint (a parseable config with our keys)."""
    try:
        config = read_json_strict(directory / CONFIG_NAME, "checkpoint config", CheckpointError, max_bytes=64 << 20, allow_nan=True)
    except CheckpointError:
        return False
    return isinstance(config, dict) and "format_version" in config and "family" in config


def model_paths(model_spec: str) -> list[Path]:
    """Local paths a model spec reads (``hf:DIR``, ``open_clip:local-dir:DIR``, a checkpoint directory...)."""
    candidates = [model_spec]
    for prefix in ("hf:", "open_clip:local-dir:", "open_clip:"):
        if model_spec.startswith(prefix):
            candidates.append(model_spec[len(prefix):])
    if "//" in model_spec:  # open_clip:NAME//abs/path/weights.safetensors
        candidates.append("/" + model_spec.split("//", 1)[1])
    out = []
    for c in candidates:
        try:
            path = Path(c).expanduser()
            if c and path.exists():
                out.append(path.resolve())
        except (OSError, ValueError):
            continue
    return out


def refuse_model_inside(out: Path, model_spec: str, what: str) -> None:
    """Never let ``out`` (to be replaced) be, or contain, the input model's own files."""
    target = out.resolve()
    for path in model_paths(model_spec):
        if path == target or target in path.parents:
            raise ConfigError(f"{what} {out} is (or contains) the input model {path}; it would be replaced. Choose another directory")


def check_output_dir(out_dir: str | Path, model_spec: str, overwrite: bool = False) -> None:
    """Refuse to replace anything but an empty directory or a vlmpress checkpoint; ``overwrite`` is
    needed for the latter. Never the input model's directory. Probes writability."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory; choose another --out")
    refuse_model_inside(out, model_spec, "output directory")
    _probe_writable(out)
    if not out.exists() or not any(out.iterdir()):
        return
    if not _is_checkpoint_dir(out):
        raise ConfigError(
            f"output directory {out} is not empty and holds no vlmpress checkpoint; --overwrite replaces only a "
            "checkpoint or an empty directory: choose another --out"
        )
    if overwrite:
        return
    existing = read_json_strict(out / CONFIG_NAME, "checkpoint config", CheckpointError, allow_nan=True).get("model_spec")
    what = "a compressed checkpoint of the same model" if existing == model_spec else f"a different compressed model ({existing})"
    raise ConfigError(f"output directory {out} already holds {what}; choose another --out or pass --overwrite to replace it")


def check_export_dir(export_dir: str | Path, out_dir: str | Path | None, model_spec: str, overwrite: bool = False) -> None:
    """``--export-dense`` target: never the compressed output, a checkpoint or the input model;
    an existing non-empty directory only with ``overwrite``."""
    export = Path(export_dir).expanduser().absolute()
    if out_dir is not None:
        out = Path(out_dir).expanduser().absolute()
        a, b = export.resolve(), out.resolve()
        if a == b or b in a.parents or a in b.parents:
            raise ConfigError(f"--export-dense {export} overlaps --out {out}; the dense export needs its own directory")
    refuse_model_inside(export, model_spec, "--export-dense directory")
    if export.exists() and not export.is_dir():
        raise ConfigError(f"--export-dense path {export} exists and is not a directory")
    if export.is_dir() and any(export.iterdir()):
        if _is_checkpoint_dir(export):
            raise ConfigError(f"--export-dense directory {export} holds a compressed vlmpress checkpoint; an export never replaces one")
        if not overwrite:
            raise ConfigError(f"output directory {export} is not empty; pass --overwrite to replace it")


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
    out = Path(out_dir).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)
    check_output_dir(out, adapter.spec, overwrite)
    tmp = make_owned_temp(out)
    try:
        save_model(adapter.model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": "vlmpress"})
        report.footprint = {**(report.footprint or {}), "bytes_on_disk": (tmp / WEIGHTS_NAME).stat().st_size}
        if hasattr(adapter, "save_preprocessing"):
            adapter.save_preprocessing(tmp)
        hashes = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in _listed_files(tmp)}
        quantization = quantization_map(adapter.model)
        config = {
            "format_version": FORMAT_VERSION if quantization else 2,  # readable by the previous release unless quantised
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
            "file_sha256": hashes,
            **({"quantization": quantization} if quantization else {}),
            **(extra or {}),
        }
        validate_checkpoint_config(json.loads(json.dumps(config, default=str)))  # never write what load refuses
        atomic_write_json(tmp / CONFIG_NAME, config)
        report.write(tmp)
        fsync_tree(tmp)
        replace_directory(tmp, out)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = (getattr(err, "strerror", None) or str(err).splitlines()[0]) if str(err) else type(err).__name__
        kept = "the previous checkpoint there is unchanged" if (out / CONFIG_NAME).is_file() else "nothing was written there"
        raise OutputError(f"could not write the checkpoint to {out}: {reason}; {kept} (temporary files removed)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved compressed model to %s", out)
    return out


def clean_stale_temporaries(out: Path) -> list[Path]:
    """Remove vlmpress's own temporaries of killed saves beside ``out`` (see :mod:`vlmpress.io.atomic_dir`)."""
    return _clean_stale(Path(out), restorable=_is_checkpoint_dir)


def apply_rank_map(adapter: ModelAdapter, ranks: dict[str, int], shapes: dict[str, list[int]] | None = None) -> None:
    """Replace each named layer by an (uninitialised) LowRankLinear of the saved rank."""
    for name, rank in ranks.items():
        try:
            module = adapter.model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"checkpoint names layer '{name}', which this architecture does not have") from None
        try:
            W = weight_matrix(module)
        except TypeError:
            raise CheckpointError(
                f"checkpoint gives a rank to '{name}', a {type(module).__name__} module; ranks apply to linear layers only"
            ) from None
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


def _quiet_build(cls, spec_config: dict, directory: Path) -> ModelAdapter:
    """Rebuild the architecture without the libraries' INFO lines and "initialized randomly"
    warnings: the weights are loaded right after, so those messages would be false."""
    import warnings

    noisy = [logging.getLogger(n) for n in ("open_clip", "root", "transformers", "timm")]
    levels = [lg.level for lg in noisy]
    try:
        for lg in noisy:
            lg.setLevel(logging.ERROR)
        try:
            from transformers.utils import logging as hf_logging

            hf_verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
        except ImportError:  # pragma: no cover
            hf_verbosity = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls.build_from_spec_config(spec_config, device="cpu", preprocessing_dir=directory)
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError, AssertionError) as err:
        raise CheckpointError(
            f"{directory / CONFIG_NAME}: 'spec_config' does not describe a buildable {cls.family} model "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'invalid value'})"
        ) from None
    finally:
        for lg, level in zip(noisy, levels):
            lg.setLevel(level)
        if hf_verbosity is not None:
            hf_logging.set_verbosity(hf_verbosity)


def _check_tensors(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], weights: Path) -> None:
    """Every tensor: the architecture's shape, a floating dtype where the model holds floats (an
    int/bool tensor would be cast silently), the exact dtype elsewhere, and finite values."""
    for key, tensor in state.items():
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape):
            raise CheckpointError(
                f"tensor '{key}' has shape {tuple(tensor.shape)} in {weights} but {tuple(want.shape)} "
                "in the architecture described by the config (mismatched or corrupt checkpoint)"
            )
        if tensor.is_floating_point() != want.is_floating_point() or (not want.is_floating_point() and tensor.dtype != want.dtype):
            raise CheckpointError(
                f"tensor '{key}' is {str(tensor.dtype).removeprefix('torch.')} in {weights} but the architecture holds "
                f"{str(want.dtype).removeprefix('torch.')} there (mismatched or corrupt checkpoint)"
            )
        finite = torch.isfinite(tensor.float() if tensor.element_size() == 1 else tensor) if tensor.is_floating_point() else None
        if finite is not None and not finite.all():  # fp8 codes are checked through float32
            raise CheckpointError(f"tensor '{key}' in {weights} holds NaN/inf values (corrupt checkpoint)")


def _adapter_class(directory: Path, config: dict[str, Any]):
    try:
        return get_adapter_class(config["family"])
    except UnknownModelSpecError as err:
        origin = str(config.get("adapter_origin", ""))
        package = f" It was written with the adapter package '{origin[7:]}': install it." if origin.startswith("plugin:") else ""
        raise CheckpointError(f"{directory} needs adapter family '{config['family']}', which is not installed.{package} {err}") from None


def load_compressed(directory: str | Path, *, device: str | torch.device = "cpu", verify: bool = True) -> ModelAdapter:
    """Rebuild a compressed model saved by :func:`save_compressed` (no download, no code from the checkpoint).

    ``verify`` checks the SHA-256 of the weights and preprocessing files against the config
    (reads every byte once; pass False to skip the comparison for very large checkpoints -- the
    schema, allow-lists, header and tensor checks still run).
    """
    directory = Path(directory).expanduser()
    config = read_checkpoint_config(directory)
    check_tree(directory)
    cls = _adapter_class(directory, config)
    spec_problem = cls.spec_config_problem(config["spec_config"])
    if spec_problem:
        raise CheckpointError(f"{directory / CONFIG_NAME}: 'spec_config' is refused: {spec_problem}")
    hashes = config["file_sha256"]
    weights = directory / WEIGHTS_NAME
    if verify:
        verify_file(directory, WEIGHTS_NAME, hashes[WEIGHTS_NAME])
    elif not weights.is_file():
        raise CheckpointError(f"{directory} is missing {WEIGHTS_NAME}")
    header = read_safetensors_header(weights, CheckpointError)  # duplicate names, offsets: before the library parses it
    staging = Path(tempfile.mkdtemp(prefix="vlmpress-checkpoint-files-"))
    try:
        stage_files(directory, hashes, staging, skip={WEIGHTS_NAME}, verify=verify)
        adapter = _quiet_build(cls, config["spec_config"], staging)
    finally:
        remove_staging(staging)
    adapter.spec = config.get("model_spec", adapter.spec)
    adapter.prepare_for_compression()
    apply_rank_map(adapter, config["ranks"], config["layer_shapes"])
    if config.get("quantization"):
        apply_quantization_map(adapter.model, config["quantization"])
    expected = adapter.model.state_dict()
    missing = sorted(set(expected) - set(header))
    # tied weights are stored once by safetensors.save_model; only complain about real gaps
    shared = {k for k in missing if any(expected[k].data_ptr() == expected[o].data_ptr() for o in header if o in expected)}
    missing = [k for k in missing if k not in shared]
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match the architecture in {CONFIG_NAME}: "
            f"{len(missing)} missing tensors (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is corrupt or unreadable: {err}") from None
    _check_tensors(state, expected, weights)
    adapter.model.load_state_dict(state, strict=not shared)
    adapter.model.to(device)
    adapter.model.eval()
    adapter.checkpoint_config = config  # type: ignore[attr-defined]
    adapter.checkpoint_dir = directory  # type: ignore[attr-defined]  (an export never goes there)
    return adapter


def export_dense(adapter: ModelAdapter, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Merge factors back into dense weights and write a stock checkpoint of the model's family."""
    out = Path(out_dir).expanduser()
    check_export_dir(out, getattr(adapter, "checkpoint_dir", None), adapter.spec, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    adapter.export_dense(out)
    return out
