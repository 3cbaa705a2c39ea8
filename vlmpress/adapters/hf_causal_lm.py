"""Causal LMs from ``transformers``: every family with an ``AutoModelForCausalLM`` class and no vision part.

Spec: ``hf:<name-or-dir>``; the architecture comes from the checkpoint's ``config.json``, so a local
directory works offline. The decoder blocks and the kind of every linear in them are found from the
module tree (:mod:`vlmpress.adapters.decoder_discovery`, no table of model names): targets are every
linear layer a causal forward calls inside the blocks -- attention (q/k/v/o, packed ``c_attn`` /
``query_key_value`` as one layer, MLA's low-rank projections), MLP (gate/up/down, fc1/fc2, shared
experts) and ``other`` (Mamba / SSM projections) -- in one group ``decoder`` (the paper's clustered
allocation: one tolerance per kind). Fused MoE experts (transformers 5's 3-D expert tensors) are split
into one linear per expert and matrix by :meth:`prepare_for_compression`
(:mod:`vlmpress.adapters.routed_experts`): kinds ``expert_gate_up`` / ``expert_up`` / ``expert_down``,
each calibrated on the tokens routed to it. Routers stay dense. An untied ``lm_head`` is a candidate too
but excluded by default (:attr:`HFCausalLMAdapter.default_exclude`; name it in ``targets`` to
compress it). Embeddings are not linear layers and are never factorised.

GPT-2's ``Conv1D`` stores its weight transposed (``y = x @ W + b``); :func:`weight_matrix` reads it
as (out x in), ``LowRankLinear`` replaces it directly, and :meth:`export_dense` writes merged
weights back in ``Conv1D`` layout so stock ``from_pretrained`` reloads them.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vlmpress.adapters.base import ModelAdapter, TargetLayer, replace_module
from vlmpress.adapters.decoder_discovery import bidirectional_reason, block_linears, find_block_list, uncalled_layers
from vlmpress.adapters.routed_experts import EXPERT_KINDS, FusedExperts, fuse_experts, restore_split, split_experts
from vlmpress.core.lowrank import LowRankLinear
from vlmpress.adapters.unsupported import UnsupportedArchitectureError, unsupported_message
from vlmpress.errors import CheckpointError, ConfigError, UnknownModelSpecError

logger = logging.getLogger(__name__)



def causal_lm_class_name(model_type: str | None) -> str | None:
    """The ``AutoModelForCausalLM`` class transformers maps ``model_type`` to (None: no causal-LM class)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) if isinstance(model_type, str) else None


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


def _under_inner_list(model: nn.Module, name: str, block_path: str) -> bool:
    """True when ``name`` lies under an ``nn.ModuleList`` inside its decoder block (e.g. routed experts)."""
    parts = name[len(block_path) + 1 :].split(".")[1:-1]  # below the block index, above the layer
    module = model.get_submodule(f"{block_path}.{name[len(block_path) + 1 :].split('.')[0]}")
    for part in parts:
        module = module[int(part)] if part.isdigit() else getattr(module, part)
        if isinstance(module, nn.ModuleList):
            return True
    return False


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
    def __init__(self, model: nn.Module, spec: str, tokenizer: Any = None):
        super().__init__(model, spec)
        self.tokenizer = tokenizer
        self.model_type: str = model.config.model_type
        blocks = find_block_list(model, model.config)
        reason = bidirectional_reason(model.config, model) or (
            None if blocks is not None else "its module tree holds no list of decoder blocks (an nn.ModuleList of "
            "modules with linear layers)"
        )
        if reason:
            raise UnsupportedArchitectureError(unsupported_message(spec, self.model_type, reason))
        self._blocks = blocks
        self._uncalled: set[str] | None = None  # filled by the first target_layers() (a probe forward)
        self.fused_experts: list[FusedExperts] = []  # filled by prepare_for_compression
        head = model.get_output_embeddings()
        head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
        if head_name and head_name != "lm_head":  # e.g. BERT-style cls.predictions.decoder: also kept dense by default
            self.default_exclude = (*type(self).default_exclude, rf"^{re.escape(head_name)}$")
        # remembered before compression replaces them: export writes these back as Conv1D
        self._conv1d_layers = {name for name, m in model.named_modules() if _is_conv1d(m)}

    # ------------------------------------------------------------------ discovery / loading
    @classmethod
    def accepts(cls, spec: str) -> bool:
        """An ``hf:`` spec whose config names a family with a causal-LM class and has no vision part.

        Configs with a vision part (``vision_config``, ``visual``...) belong to vision-language
        adapters. Whether the model really is a decoder is decided from its structure when it is built.
        """
        if not isinstance(spec, str) or not spec.startswith("hf:") or not spec[3:].strip():
            return False
        config = read_model_config(spec[3:].strip())
        if config is None or has_vision_part(config) or bidirectional_reason(config):
            return False
        return causal_lm_class_name(config.get("model_type")) is not None

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
        why = (
            "it has a vision part" if has_vision_part(config)
            else "transformers has no AutoModelForCausalLM class for it" if causal_lm_class_name(config.get("model_type")) is None
            else bidirectional_reason(config)
        )
        if why:
            raise UnsupportedArchitectureError(unsupported_message(spec, config.get("model_type"), why))
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
        if not isinstance(model_config, dict) or not isinstance(model_config.get("model_type"), str):
            return "'config' must be a transformers config (a mapping with a 'model_type')"
        if causal_lm_class_name(model_config["model_type"]) is None:
            return f"'config' names model type {model_config['model_type']!r}, which has no AutoModelForCausalLM class"
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
        """(dotted path, module) of every decoder block, in execution order (found from the module tree)."""
        blocks = self.model.get_submodule(self._blocks.path)  # looked up again: blocks may have been replaced
        return [(f"{self._blocks.path}.{i}", block) for i, block in enumerate(blocks)]

    #: tokens of the probe forward that finds layers not called as modules
    PROBE_TOKENS: ClassVar[int] = 16

    def _not_called(self, found: dict[str, nn.Module]) -> set[str]:
        """Layers of ``found`` a short probe forward does not call as modules (computed once).

        Skipped (nothing excluded) when weights are offloaded (meta), where a probe would load them all.
        """
        if self._uncalled is None:
            if any(p.device.type == "meta" for p in self.model.parameters()):
                self._uncalled = set()
            else:
                ids = torch.arange(self.PROBE_TOKENS).remainder(max(2, self.model.config.vocab_size - 1)).add(1)[None]
                with torch.no_grad():
                    was_training = self.model.training
                    self.model.eval()
                    try:
                        self._uncalled = uncalled_layers(found, lambda: self.forward_tokens({"input_ids": ids}, logits=False))
                    finally:
                        self.model.train(was_training)
                # a routed expert kept in a ModuleList may just not be reached by a short probe
                self._uncalled = {n for n in self._uncalled if not _under_inner_list(self.model, n, self._blocks.path)}
                if self._uncalled:
                    logger.info("%d linear layers are not called as modules and stay dense, e.g. %s",
                                len(self._uncalled), sorted(self._uncalled)[0])
        return self._uncalled

    def prepare_for_compression(self) -> None:
        """Split fused MoE experts into per-expert linears (same outputs; idempotent)."""
        found = split_experts(self.model, self.model.config)
        known = {item.path for item in self.fused_experts}
        self.fused_experts += [item for item in found if item.path not in known]

    def target_layers(self) -> list[TargetLayer]:
        found: dict[str, tuple[nn.Module, str]] = {}
        for prefix, block in self.decoder_blocks():
            for name, module, kind in block_linears(block):
                if isinstance(module, nn.Linear) or _is_conv1d(module):  # not layers compressed already
                    found[f"{prefix}.{name}"] = (module, kind)
        routers = tuple(f"{item.router}." for item in self.fused_experts if item.router)
        found = {name: v for name, v in found.items() if not f"{name}.".startswith(routers)}  # routers stay dense
        skip = self._not_called({name: module for name, (module, _) in found.items()})
        out = [
            TargetLayer(name, "decoder", kind, module, routed=kind in EXPERT_KINDS)
            for name, (module, kind) in found.items() if name not in skip
        ]
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
        """Merge every LowRankLinear (GPT-2: back into Conv1D layout; split experts: back into the
        stock fused tensors), ``save_pretrained``, restore.

        The compressed modules are put back afterwards, so the adapter stays compressed.
        """
        swapped: list[tuple[str, nn.Module]] = []
        split: list = []
        try:
            for name, module in list(self.model.named_modules()):
                if isinstance(module, LowRankLinear):
                    swapped.append((name, replace_module(self.model, name, self._dense_module(name, module))))
            split = fuse_experts(self.model)
            self.model.save_pretrained(str(out_dir), safe_serialization=True)
        finally:
            restore_split(self.model, split)
            for name, module in swapped:
                replace_module(self.model, name, module)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out_dir))


__all__ = ["HFCausalLMAdapter", "causal_lm_class_name", "has_vision_part", "UnsupportedArchitectureError", "read_model_config"]
