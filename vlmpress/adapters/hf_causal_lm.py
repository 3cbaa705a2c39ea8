"""Decoder-only causal LMs from ``transformers``: Llama, Mistral, Qwen2, OPT and GPT-2.

Spec: ``hf:<name-or-dir>``; the architecture comes from the checkpoint's ``config.json``
(``model_type``), so a local directory works offline. Targets are every linear layer inside the
decoder blocks -- attention (q/k/v/o, or GPT-2's packed ``c_attn`` as one layer) and MLP
(gate/up/down, fc1/fc2) -- in one group ``decoder`` with kinds ``attn``/``mlp`` (the paper's
clustered allocation: one tolerance per class of layer). An untied ``lm_head`` is a candidate too
but excluded by default (:attr:`HFCausalLMAdapter.default_exclude`; name it in ``targets`` to
compress it). Embeddings are not linear layers and are never factorised.

GPT-2's ``Conv1D`` stores its weight transposed (``y = x @ W + b``); :func:`weight_matrix` reads it
as (out x in), ``LowRankLinear`` replaces it directly, and :meth:`export_dense` writes merged
weights back in ``Conv1D`` layout so stock ``from_pretrained`` reloads them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vlmpress.adapters.base import ModelAdapter, TargetLayer, replace_module
from vlmpress.core.lowrank import LowRankLinear
from vlmpress.errors import CheckpointError, ConfigError, UnknownModelSpecError

logger = logging.getLogger(__name__)

#: model_type -> dotted path of the decoder block list
BLOCK_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(BLOCK_PATHS)

#: path components that mark a layer as part of attention
_ATTN_PARTS = {"self_attn", "attn", "attention", "self_attention"}


class UnsupportedArchitectureError(UnknownModelSpecError):
    """An ``hf:`` checkpoint whose architecture this adapter does not know."""


def _model_name(spec: str) -> str:
    if not spec.startswith("hf:") or not spec[3:].strip():
        raise UnknownModelSpecError(f"expected a spec 'hf:<name-or-dir>', got '{spec}'")
    return spec[3:].strip()


def read_model_config(name: str) -> dict | None:
    """``config.json`` of a local directory or a cached Hub model as a dict; None when unavailable.

    Cheap: a local directory is read as JSON; a Hub name is only looked up in the local cache.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            return None
        try:
            return json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError):
            return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name, local_files_only=True).to_dict()
    except Exception:  # not cached / not a model id
        return None


_VISION_KEYS = ("vision_config", "visual", "vision_tower", "image_size", "mm_vision_tower", "vision_encoder")


def has_vision_part(config: dict) -> bool:
    """True when a transformers config describes an image tower (a VLM or dual encoder, not a pure LM)."""
    return any(key in config for key in _VISION_KEYS) or any(
        isinstance(v, dict) and "image_size" in v for v in config.values()
    )


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _max_positions(config: Any) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = config.get(attr) if isinstance(config, dict) else getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _resolve_dtype(dtype: Any) -> torch.dtype | str | None:
    """A torch dtype from a dtype or its name; ``"auto"`` (the checkpoint's own dtype) passes through."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(value, torch.dtype):
            return value
    raise ConfigError(f"unknown torch_dtype {dtype!r}; use float32, float16, bfloat16 or auto")


def saved_dtype_problem(dtype: Any) -> str | None:
    """A checkpoint's recorded weight dtype must be one vlmpress builds models in."""
    if dtype not in (None, "float32", "float16", "bfloat16"):
        return f"'dtype' must be float32, float16 or bfloat16, got {str(dtype)[:40]!r}"
    return None


class HFCausalLMAdapter(ModelAdapter):
    """``transformers`` decoder-only LM (``AutoModelForCausalLM``) plus its tokenizer."""

    family = "hf_causal_lm"
    groups = ("decoder",)
    group_modality = {"decoder": "tokens"}
    #: layers dropped unless ``targets`` is given (embeddings are never candidates: not linear)
    default_exclude: ClassVar[tuple[str, ...]] = (r"(^|\.)lm_head$", r"(^|\.)embed")
    supported_model_types: ClassVar[tuple[str, ...]] = SUPPORTED_MODEL_TYPES

    def __init__(self, model: nn.Module, spec: str, tokenizer: Any = None):
        super().__init__(model, spec)
        self.tokenizer = tokenizer
        self.model_type: str = model.config.model_type
        if self.model_type not in BLOCK_PATHS:
            raise UnsupportedArchitectureError(self._unsupported_message(self.model_type, spec))
        # remembered before compression replaces them: export writes these back as Conv1D
        self._conv1d_layers = {name for name, m in model.named_modules() if _is_conv1d(m)}

    # ------------------------------------------------------------------ discovery / loading
    @staticmethod
    def _unsupported_message(model_type: str | None, spec: str) -> str:
        return (
            f"model '{spec}' has architecture '{model_type}', which vlmpress cannot compress as a causal LM; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )

    @classmethod
    def accepts(cls, spec: str) -> bool:
        """An ``hf:`` spec whose config names a supported causal LM and has no vision part.

        Configs with a vision part (``vision_config``, ``visual``...) belong to vision-language
        adapters; unsupported architectures are reported by the registry with what is supported.
        """
        if not isinstance(spec, str) or not spec.startswith("hf:") or not spec[3:].strip():
            return False
        config = read_model_config(spec[3:].strip())
        if config is None or has_vision_part(config):
            return False
        return config.get("model_type") in BLOCK_PATHS

    @classmethod
    def load(
        cls,
        spec: str,
        *,
        device: str | torch.device = "cpu",
        torch_dtype: Any = None,
        device_map: Any = None,
        **kwargs: Any,
    ) -> "HFCausalLMAdapter":
        """``AutoModelForCausalLM.from_pretrained`` (fp32 unless ``torch_dtype``) + ``AutoTokenizer``.

        ``device_map`` (e.g. ``"auto"`` or a dict, with ``offload_folder`` for disk offload) is
        passed through to accelerate; the model is then left where it was dispatched.
        """
        from transformers import AutoModelForCausalLM

        name = _model_name(spec)
        config = read_model_config(name)
        if config is None:
            raise UnknownModelSpecError(
                f"cannot read a model config for '{spec}': not a local directory with config.json and not in the "
                "Hugging Face cache (nothing is downloaded here)"
            )
        if config.get("model_type") not in BLOCK_PATHS or has_vision_part(config):
            raise UnsupportedArchitectureError(cls._unsupported_message(config.get("model_type"), spec))
        dtype = _resolve_dtype(torch_dtype) or torch.float32
        load_kwargs = dict(kwargs)
        if device_map is not None:
            load_kwargs["device_map"] = device_map
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **load_kwargs)
        except OSError as err:
            raise CheckpointError(f"cannot load the weights of '{spec}': {err}") from None
        if device_map is None:
            model.to(device)
        model.eval()
        return cls(model, spec, cls._load_tokenizer(name))

    @staticmethod
    def _load_tokenizer(name: str | Path, local_only: bool = False):
        """The tokenizer at ``name``; None (a warning) when there is none. ``local_only``: that
        directory's files only (checkpoints), where a failure is a CheckpointError."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(name), trust_remote_code=False, **({"local_files_only": True} if local_only else {}))
        except Exception as err:  # a model without a tokenizer can still be compressed with given windows
            if local_only:
                raise CheckpointError(
                    f"the checkpoint's tokenizer files are unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                ) from None
            logger.warning("no tokenizer found for %s (%s); text calibration and perplexity need one", name, err)
            return None

    def spec_config(self) -> dict:
        return {
            "model_type": self.model_type,
            "config": self.model.config.to_dict(),
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
        }

    @classmethod
    def build_from_spec_config(
        cls, config: dict, *, device: str | torch.device = "cpu", preprocessing_dir: str | Path | None = None
    ) -> "HFCausalLMAdapter":
        from transformers import AutoConfig, AutoModelForCausalLM

        cls.require_valid_spec_config(config)
        try:
            hf_config = AutoConfig.for_model(**config["config"])
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"cannot rebuild the model config from the checkpoint: {err}") from None
        dtype = _resolve_dtype(config.get("dtype")) or torch.float32
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).to(device).eval()
        tokenizer = None  # optional: a checkpoint of a model without a tokenizer has no tokenizer files
        if preprocessing_dir is not None and (Path(preprocessing_dir) / "tokenizer_config.json").is_file():
            tokenizer = cls._load_tokenizer(preprocessing_dir, local_only=True)
        return cls(model, f"hf:{hf_config.model_type}(rebuilt)", tokenizer)

    spec_config_keys = frozenset({"model_type", "config", "dtype"})

    @classmethod
    def spec_config_problem(cls, config: Any) -> str | None:
        problem = super().spec_config_problem(config)
        if problem:
            return problem
        model_config = config.get("config")
        if not isinstance(model_config, dict) or model_config.get("model_type") not in BLOCK_PATHS:
            return f"'config' must be a transformers config of a supported model type ({', '.join(BLOCK_PATHS)})"
        return saved_dtype_problem(config.get("dtype"))

    def save_preprocessing(self, out_dir: str | Path) -> None:
        """The tokenizer travels with compressed checkpoints (reload and evaluate without the original)."""
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out_dir))

    # ------------------------------------------------------------------ structure
    @property
    def max_positions(self) -> int | None:
        return _max_positions(self.model.config)

    def decoder_blocks(self) -> list[tuple[str, nn.Module]]:
        """(dotted path, module) of every decoder block, in execution order."""
        path = BLOCK_PATHS[self.model_type]
        blocks = self.model.get_submodule(path)
        return [(f"{path}.{i}", block) for i, block in enumerate(blocks)]

    def target_layers(self) -> list[TargetLayer]:
        out: list[TargetLayer] = []
        for prefix, block in self.decoder_blocks():
            for name, module in block.named_modules():
                if not (isinstance(module, nn.Linear) or _is_conv1d(module)):
                    continue
                kind = "attn" if _ATTN_PARTS.intersection(name.split(".")) else "mlp"
                out.append(TargetLayer(f"{prefix}.{name}", "decoder", kind, module))
        head = self.model.get_output_embeddings()
        if isinstance(head, nn.Linear) and not self._head_is_tied():
            name = next(n for n, m in self.model.named_modules() if m is head)
            out.append(TargetLayer(name, "decoder", "head", head))
        return out

    def _head_is_tied(self) -> bool:
        head, emb = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        return head is not None and emb is not None and getattr(head, "weight", None) is getattr(emb, "weight", None)

    @property
    def input_device(self) -> torch.device:
        """Where token ids go: the input embedding's device (dispatched models included)."""
        weight = self.model.get_input_embeddings().weight
        return weight.device if weight.device.type != "meta" else torch.device("cpu")

    # ------------------------------------------------------------------ running
    def forward_tokens(self, batch: dict[str, torch.Tensor], *, logits: bool = True) -> Any:
        """Run a token batch (``input_ids`` + ``attention_mask``), without a KV cache.

        ``logits=False`` stops at the last hidden state (the LM head's vocab-sized output is not
        needed to calibrate the blocks and is the largest activation of all).
        """
        dev = self.input_device
        ids = batch["input_ids"].to(dev)
        mask = batch.get("attention_mask")
        mask = mask.to(dev) if mask is not None else None
        module = self.model if logits else self.model.base_model
        return module(input_ids=ids, attention_mask=mask, use_cache=False)

    def token_batches(self, calibration, batch_size: int) -> list[dict[str, torch.Tensor]]:
        from vlmpress.data.text_calibration import token_batches

        return token_batches(calibration, batch_size)

    def calibration_forward(self, group: str, batch: Any, collector) -> None:
        valid = batch["attention_mask"].to(torch.bool) if batch.get("attention_mask") is not None else None
        head = any(name not in self._block_layer_names() for name in collector.modules)
        with collector.mask(valid):
            self.forward_tokens(batch, logits=head)

    def _block_layer_names(self) -> set[str]:
        prefixes = tuple(f"{p}." for p, _ in self.decoder_blocks())
        return {n for n, _ in self.model.named_modules() if n.startswith(prefixes)}

    @classmethod
    def load_calibration(cls, config) -> Any:
        """Token windows from ``config.calib_text`` (file or cached dataset), checked against the model."""
        from vlmpress.data.text_calibration import build_token_calibration
        from vlmpress.errors import CalibrationError

        if not config.calib_text:
            raise CalibrationError(
                "LLM calibration needs text: pass --calib-text FILE (UTF-8 text) or a locally cached dataset "
                "such as wikitext2"
            )
        name = _model_name(config.model)
        model_config = read_model_config(name) or {}
        tokenizer = cls._load_tokenizer(name)
        if tokenizer is None:
            raise CalibrationError(f"'{config.model}' ships no tokenizer; calibration text cannot be tokenised")
        return build_token_calibration(
            config.calib_text,
            tokenizer,
            n_samples=config.n_samples,
            seq_len=config.seq_len,
            seed=config.seed,
            max_positions=_max_positions(model_config),
            windows=getattr(config, "calib_windows", "random"),
        )

    # ------------------------------------------------------------------ export
    def _dense_module(self, name: str, module: LowRankLinear) -> nn.Module:
        if name in self._conv1d_layers:
            from transformers.pytorch_utils import Conv1D

            W = (module.A @ module.B).detach()
            bias = module.bias.detach().clone() if module.bias is not None else None
            layer = Conv1D(module.out_features, module.in_features).to(device=W.device, dtype=W.dtype)
            layer.weight = nn.Parameter(W.T.contiguous())
            layer.bias = nn.Parameter(bias if bias is not None else torch.zeros_like(layer.bias))
            return layer
        return module.to_dense()

    def export_dense(self, out_dir: str | Path) -> None:
        """Merge every LowRankLinear (GPT-2: back into Conv1D layout), ``save_pretrained``, restore.

        The compressed modules are put back afterwards, so the adapter stays compressed.
        """
        swapped: list[tuple[str, nn.Module]] = []
        try:
            for name, module in list(self.model.named_modules()):
                if isinstance(module, LowRankLinear):
                    swapped.append((name, replace_module(self.model, name, self._dense_module(name, module))))
            self.model.save_pretrained(str(out_dir), safe_serialization=True)
        finally:
            for name, module in swapped:
                replace_module(self.model, name, module)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out_dir))


__all__ = ["HFCausalLMAdapter", "SUPPORTED_MODEL_TYPES", "has_vision_part", "UnsupportedArchitectureError", "read_model_config"]
