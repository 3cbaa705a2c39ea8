"""Save / load compressed models (peft style: ``model.safetensors`` + ``vlmpress_config.json``).

``save_compressed`` writes the complete checkpoint into a temporary sibling directory and only
then puts it in place: a new path by one ``rename``, an existing checkpoint by an atomic exchange
of the two directories (Linux ``renameat2(RENAME_EXCHANGE)``), so at every instant a kill can hit
the path holds either the old or the new complete checkpoint. Temporary directories of killed
saves (named after their process id) are removed by the next save to the same path.

``vlmpress_config.json`` records the SHA-256 of every file written before it (the weights,
preprocessing files); ``load_compressed`` verifies them (``verify=False`` skips this for huge
files), validates the config against a schema (types and ranges), rebuilds the architecture from
the saved spec config (no pretrained download), swaps in ``LowRankLinear`` per the rank map, loads
the tensors with ``strict=True`` and checks every shape.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import re
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
from vlmpress.errors import CheckpointError, ConfigError, UnknownModelSpecError
from vlmpress.io import atomic_write_json, library_versions
from vlmpress.pipeline.quantize import apply_quantization_map, quantization_map

logger = logging.getLogger(__name__)

CONFIG_NAME = "vlmpress_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 2  # 2: quantised factors ("quantization" entry); unquantised checkpoints are still written as 1


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
    if not isinstance(value, dict) or not value:
        return "must map file names to SHA-256 hex digests"
    for name, digest in value.items():
        if not isinstance(name, str) or "/" in name or name.startswith(".") or not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            return f"has an invalid entry {name!r}: {digest!r} (expected file name -> 64 hex digits)"
    return None


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
    "layer_shapes": (False, _check_shapes),
    "dense_layers": (False, _check_dense_layers),
    "file_sha256": (False, _check_hashes),
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
    shapes = config.get("layer_shapes") or {}
    unranked = [n for n in (config.get("quantization") or {}).get("layers", []) if n not in config["ranks"]]
    if unranked:
        raise CheckpointError(f"{path} is invalid: quantised layer '{unranked[0]}' has no rank")
    for name, rank in config["ranks"].items():
        if name in shapes and rank > min(shapes[name]):
            raise CheckpointError(f"{path} is invalid: rank {rank} of layer '{name}' exceeds its shape {shapes[name]}")
    return config


def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a vlmpress checkpoint: {CONFIG_NAME} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt (not valid JSON: {err})") from None
    return validate_checkpoint_config(config, path)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoint_files(directory: Path, config: dict[str, Any]) -> None:
    """Compare every recorded file hash with the file on disk (corruption, truncation, edits)."""
    hashes = config.get("file_sha256")
    if not hashes:
        logger.warning("%s records no file hashes (written by an older vlmpress): integrity not verified", directory)
        return
    for name, expected in hashes.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory} is incomplete: {name} (recorded in {CONFIG_NAME}) is missing")
        if file_sha256(path) != expected:
            raise CheckpointError(
                f"{path} does not match the SHA-256 recorded in {CONFIG_NAME}: the file is corrupt or was modified "
                "(restore it, or load with verify=False / --no-verify to skip the check)"
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
        probe = tempfile.mkdtemp(prefix=".vlmpress-write-probe.", dir=parent)
        os.rmdir(probe)
    except OSError as err:
        raise ConfigError(
            f"output path {out} is not writable ({err.strerror or err} in {parent}); choose another --out"
        ) from None


def check_output_dir(out_dir: str | Path, model_spec: str, overwrite: bool = False) -> None:
    """Refuse to replace an existing checkpoint or other content unless ``overwrite``; probe writability."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory; choose another --out")
    _probe_writable(out)
    if overwrite or not out.exists() or not any(out.iterdir()):
        return
    config_path = out / CONFIG_NAME
    if config_path.is_file():
        try:
            existing = json.loads(config_path.read_text()).get("model_spec")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            existing = None
        what = "a compressed checkpoint of the same model" if existing == model_spec else f"a different compressed model ({existing})"
        raise ConfigError(f"output directory {out} already holds {what}; choose another --out or pass --overwrite to replace it")
    raise ConfigError(f"output directory {out} is not empty and holds no vlmpress checkpoint; pass --overwrite to replace it")


# ------------------------------------------------------------------ atomic directory replacement

_RENAME_EXCHANGE = 2  # linux/fs.h


def _libc_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_renameat2 = _libc_renameat2()


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if _renameat2 is None:
        return False
    at_fdcwd = -100
    if _renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (38, 22, 95):  # ENOSYS, EINVAL (flag not supported by the file system), EOPNOTSUPP
        return False
    raise OSError(err, os.strerror(err), str(b))


def _temp_prefix(out: Path) -> str:
    return f".{out.name}.vlmpress-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(out: Path) -> list[Path]:
    """Remove temporary directories left next to ``out`` by saves whose process no longer runs."""
    removed = []
    pattern = re.compile(re.escape(_temp_prefix(out)) + r"(\d+)\.[^/]*\.tmp$")
    # earlier vlmpress versions: mkdtemp(prefix=".NAME.", suffix=".tmp") (8 random characters) and ".NAME.old"
    legacy = re.compile(re.escape(f".{out.name}.") + r"(old|[a-z0-9_]{8}\.tmp)$")
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        match = pattern.match(entry.name)
        stale = (match and not _pid_alive(int(match.group(1)))) or (not match and legacy.match(entry.name))
        if stale and entry.is_dir() and not entry.is_symlink():
            if not out.exists() and (entry / CONFIG_NAME).is_file() and entry.name.endswith(".old"):
                os.replace(entry, out)  # a legacy two-rename save was killed between its renames
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    if removed:
        logger.info("removed %d stale temporary director%s of killed saves next to %s", len(removed), "y" if len(removed) == 1 else "ies", out)
    return removed


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_directory(tmp: Path, out: Path) -> None:
    """Put the complete directory ``tmp`` at ``out``, never leaving ``out`` missing or partial."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if exchange_paths(tmp, out):  # tmp now holds the old checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # no atomic exchange (not Linux, or the file system lacks it): two renames; a kill in between
    # leaves the old copy at ``.NAME.old``, which the next save puts back before anything else
    backup = out.with_name(f".{out.name}.old")
    shutil.rmtree(backup, ignore_errors=True)
    os.replace(out, backup)
    os.replace(tmp, out)
    shutil.rmtree(backup, ignore_errors=True)


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
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(out)}{os.getpid()}.", suffix=".tmp", dir=out.parent))
    try:
        save_model(adapter.model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": "vlmpress"})
        report.footprint = {**(report.footprint or {}), "bytes_on_disk": (tmp / WEIGHTS_NAME).stat().st_size}
        if hasattr(adapter, "save_preprocessing"):
            adapter.save_preprocessing(tmp)
        hashes = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file() and not p.name.startswith(".")}
        quantization = quantization_map(adapter.model)
        config = {
            "format_version": FORMAT_VERSION if quantization else 1,  # readable by older vlmpress unless quantised
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
        _fsync_tree(tmp)
        replace_directory(tmp, out)
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


def load_compressed(directory: str | Path, *, device: str | torch.device = "cpu", verify: bool = True) -> ModelAdapter:
    """Rebuild a compressed model saved by :func:`save_compressed` (no download needed).

    ``verify`` checks the SHA-256 of the weights and preprocessing files against the config
    (reads every byte once; pass False to skip it for very large checkpoints).
    """
    directory = Path(directory).expanduser()
    config = read_checkpoint_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{directory} is missing {WEIGHTS_NAME}")
    if verify:
        verify_checkpoint_files(directory, config)
    try:
        cls = get_adapter_class(config["family"])
    except UnknownModelSpecError as err:
        origin = str(config.get("adapter_origin", ""))
        package = f" It was written with the adapter package '{origin[7:]}': install it." if origin.startswith("plugin:") else ""
        raise CheckpointError(f"{directory} needs adapter family '{config['family']}', which is not installed.{package} {err}") from None
    adapter = _quiet_build(cls, config["spec_config"], directory)
    adapter.spec = config.get("model_spec", adapter.spec)
    adapter.prepare_for_compression()
    apply_rank_map(adapter, config["ranks"], config.get("layer_shapes"))
    if config.get("quantization"):
        apply_quantization_map(adapter.model, config["quantization"])
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
        if tensor.dtype != expected[key].dtype and not (tensor.is_floating_point() and expected[key].is_floating_point()):
            raise CheckpointError(
                f"tensor '{key}' is {tensor.dtype} in {weights} but {expected[key].dtype} in the architecture "
                "described by the config (mismatched quantisation or corrupt checkpoint)"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor.float() if tensor.element_size() == 1 else tensor).all():
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
