"""High-level entry points: one call to load, one to compress.

    import vlmpress
    adapter, report = vlmpress.compress_model("open_clip:ViT-B-16/openai", method="pgsvd",
                                              eps_v=0.3, eps_t=0.5, calib_images="images/")
    vlmpress.save_compressed(adapter, "vitb16-pgsvd")
    adapter = vlmpress.load_model("vitb16-pgsvd")          # reload, no download
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmpress.adapters import ModelAdapter, adapter_for_spec
from vlmpress.pipeline.loading import is_compressed_dir, load_model
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.errors import ConfigError
from vlmpress.pipeline.report import CompressionReport


def resolve_config(config: CompressionConfig | dict | str | Path | None = None, **overrides: Any) -> CompressionConfig:
    """A validated config from a dataclass, a dict, a YAML path or nothing, plus keyword overrides."""
    if config is None:
        base = CompressionConfig()
    elif isinstance(config, CompressionConfig):
        base = config
    elif isinstance(config, dict):
        base = CompressionConfig.from_dict(config)
    else:
        base = CompressionConfig.from_yaml(config)
    return base.replace(**overrides).validate()


def compress_model(
    model: str | ModelAdapter,
    config: CompressionConfig | dict | str | Path | None = None,
    calibration: Any = None,
    *,
    state_dir: str | Path | None = None,
    resume: bool = False,
    **overrides: Any,
) -> tuple[ModelAdapter, CompressionReport]:
    """Load (if given a spec), calibrate and compress a model; returns (adapter, report).

    ``calibration`` defaults to what the config names (``calib_images``/``calib_captions`` for
    CLIP-style models, ``calib_text`` for LLMs). Dispatches to the auto tower allocation or the
    sequential (block-by-block) mode when the config asks for them. In sequential mode,
    ``state_dir`` persists each finished block and ``resume`` continues an interrupted run.
    """
    from vlmpress.pipeline.compress import compress, load_calibration, resolve_device

    spec = model if isinstance(model, str) else model.spec
    cfg = resolve_config(config, model=spec, **overrides)
    if (state_dir is not None or resume) and cfg.mode != "sequential":
        raise ConfigError("resuming applies to --mode sequential (block-by-block) runs only")
    if resume and state_dir is None:
        raise ConfigError("resume=True needs the state_dir of the interrupted run")
    if isinstance(model, str):
        if is_compressed_dir(model):
            raise ConfigError(f"{model} is already a compressed checkpoint; compress the original model instead")
        adapter_cls = adapter_for_spec(model)
    else:
        adapter_cls = type(model)
    # the adapter resolves dtype names ("bfloat16", "auto") itself
    load_kwargs = {k: v for k, v in (("torch_dtype", cfg.torch_dtype), ("device_map", cfg.device_map)) if v}
    if load_kwargs and not hasattr(adapter_cls, "decoder_blocks"):
        raise ConfigError("torch_dtype / device_map apply to Hugging Face causal LMs (hf:...), not to this model")
    device = resolve_device(cfg.device)
    if calibration is None:
        calibration = load_calibration(adapter_cls, cfg)  # before loading: bad data fails fast
    adapter = adapter_cls.load(model, device=device, **load_kwargs) if isinstance(model, str) else model
    if cfg.mode == "sequential":
        from vlmpress.pipeline.sequential import compress_sequential

        report = compress_sequential(adapter, cfg, calibration, state_dir=state_dir, resume=resume)
    elif cfg.allocation == "auto" and cfg.target_reduction is not None and cfg.rank_rule == "tolerance":
        from vlmpress.pipeline.auto_allocation import auto_compress

        report = auto_compress(adapter, cfg, calibration)
    else:
        report = compress(adapter, cfg, calibration)
    return adapter, report


__all__ = ["compress_model", "load_model", "resolve_config"]
