"""transformers CLIP / SigLIP adapters (``hf:NAME_OR_DIR`` whose config ``model_type`` is clip/siglip).

Targets are the explicit ``q_proj``/``k_proj``/``v_proj``/``out_proj`` (``attn``) and ``mlp.fc1``/``fc2``
(``mlp``) linears of every encoder layer in ``vision_model`` and ``text_model``.

SigLIP's vision tower ends in an attention-pooling head (``vision_model.head``) built on a packed
``nn.MultiheadAttention``. It is *not* a target: it is a single pooling block (one query token), so
compressing it saves little, and its inputs are the final hidden states of every patch, a different
distribution from the encoder layers. It is left untouched (not split) and keeps working.

Text calibration masks:

* CLIP: the tokenizer's ``attention_mask`` (real tokens up to and including end-of-text); the model
  is causal and pools the end-of-text token, so padding never reaches the output.
* SigLIP: pads to ``max_length`` (64 for released models) and was trained without an attention mask,
  pooling the *last* position with bidirectional attention -- every position, padding included,
  influences the output, so all positions are valid (no mask).
"""

from __future__ import annotations

import functools

import logging
import re
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vlmpress.adapters import register_adapter
from vlmpress.adapters.base import TargetLayer, VisionLanguageAdapter
from vlmpress.adapters.merge import merge_lowrank_layers
from vlmpress.errors import CheckpointError, ConfigError, UnknownModelSpecError, VlmpressError

logger = logging.getLogger(__name__)

PREFIX = "hf:"
_TARGET_RE = re.compile(
    r"^(?P<tower>vision_model|text_model)\.encoder\.layers\.\d+\."
    r"(?:(?P<attn>self_attn\.(?:q|k|v|out)_proj)|(?P<mlp>mlp\.fc[12]))$"
)
_GROUP = {"vision_model": "vision", "text_model": "text"}


def hf_name(spec: str) -> str:
    """``hf:NAME_OR_DIR`` -> ``NAME_OR_DIR`` (a clear error for anything else)."""
    if not isinstance(spec, str) or not spec.startswith(PREFIX) or not spec[len(PREFIX):]:
        raise UnknownModelSpecError(f"not a transformers spec: '{spec}' (expected 'hf:NAME_OR_DIR')")
    return spec[len(PREFIX):]


def hf_model_type(spec: str) -> str | None:
    """The ``model_type`` of an ``hf:`` spec's config, or None when it cannot be read.

    Uses ``transformers.AutoConfig.from_pretrained`` (offline for local directories and cached hub
    models); failures are logged at debug level so registry probing stays quiet.
    """
    try:
        name = hf_name(spec)
    except UnknownModelSpecError:
        return None
    return _cached_model_type(name)


@functools.lru_cache(maxsize=128)
def _cached_model_type(name: str) -> str | None:
    # cached: several adapters probe the same spec, and an offline hub lookup retries for seconds
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name).model_type
    except Exception as err:  # OSError (missing/offline), ValueError (unknown model type), ...
        logger.debug("cannot read a transformers config for '%s': %s", name, err)
        return None


def _features(output: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor in older transformers, a ModelOutput (pooler_output) in 5.x."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"unexpected feature output of type {type(output).__name__}")
    return pooled


class ImageProcessorTransform:
    """PIL image -> (3, H, W) float tensor through a transformers image processor.

    A small picklable object (not a bound method of the adapter), so data loader workers do not
    have to pickle the model.
    """

    def __init__(self, image_processor: Any, name: str):
        self.image_processor = image_processor
        self.name = name

    def __call__(self, image) -> torch.Tensor:
        if self.image_processor is None:
            raise VlmpressError(f"the image processor of '{self.name}' is not available")
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


class _HFDualEncoderAdapter(VisionLanguageAdapter):
    """Shared logic of the transformers CLIP-style adapters."""

    model_type: ClassVar[str]
    model_class_name: ClassVar[str]
    config_class_name: ClassVar[str]

    def __init__(self, model: nn.Module, spec: str, *, name: str, tokenizer: Any = None, image_processor: Any = None):
        super().__init__(model, spec)
        self.name = name
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.preprocess = ImageProcessorTransform(image_processor, name)

    # ------------------------------------------------------------------ loading
    @classmethod
    def _transformers_class(cls, attr: str):
        import transformers

        return getattr(transformers, attr)

    @classmethod
    def accepts(cls, spec: str) -> bool:
        return isinstance(spec, str) and spec.startswith(PREFIX) and hf_model_type(spec) == cls.model_type

    @classmethod
    def _load_preprocessing(cls, source: str | Path) -> tuple[Any, Any]:
        from transformers import AutoImageProcessor, AutoTokenizer

        return AutoTokenizer.from_pretrained(str(source)), AutoImageProcessor.from_pretrained(str(source))

    @classmethod
    def load(cls, spec: str, *, device: str | torch.device = "cpu", **kwargs: Any) -> "_HFDualEncoderAdapter":
        """``<Model>.from_pretrained(NAME)`` in float32 (override with ``dtype=``) plus its processors."""
        name = hf_name(spec)
        model_type = hf_model_type(spec)
        if model_type != cls.model_type:
            raise UnknownModelSpecError(
                f"'{name}' is a transformers model of type '{model_type}', not '{cls.model_type}'"
                if model_type
                else f"cannot read a transformers config for '{name}' (not a local model directory, and not "
                "available from the Hugging Face hub or its cache)"
            )
        kwargs.setdefault("dtype", torch.float32)
        try:
            model = cls._transformers_class(cls.model_class_name).from_pretrained(name, **kwargs)
            tokenizer, image_processor = cls._load_preprocessing(name)
        except OSError as err:
            raise VlmpressError(f"could not load transformers model '{name}': {err}") from err
        model.to(device).eval()
        logger.info("loaded transformers %s model %s", cls.model_type, name)
        return cls(model, spec, name=name, tokenizer=tokenizer, image_processor=image_processor)

    def spec_config(self) -> dict:
        return {"family": self.family, "name": self.name, "config": self.model.config.to_dict()}

    @classmethod
    def build_from_spec_config(
        cls,
        config: dict,
        *,
        device: str | torch.device = "cpu",
        preprocessing_dir: str | Path | None = None,
    ) -> "_HFDualEncoderAdapter":
        """Random-init model from the saved config (no download); processors from ``preprocessing_dir``.

        Without ``preprocessing_dir`` the processors are loaded from the original name (works offline
        only for local directories and cached hub models); if that fails the adapter still builds and
        :meth:`tokenize`/:attr:`preprocess` raise a clear error when used.
        """
        try:
            name, model_config = config["name"], config["config"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{cls.family} spec config needs 'name' and 'config'") from None
        hf_config = cls._transformers_class(cls.config_class_name).from_dict(deepcopy(model_config))
        model = cls._transformers_class(cls.model_class_name)(hf_config).to(device).eval()
        tokenizer = image_processor = None
        for source in [s for s in (preprocessing_dir, name) if s is not None]:
            try:
                tokenizer, image_processor = cls._load_preprocessing(source)
                break
            except Exception as err:
                logger.debug("no tokenizer/image processor at %s: %s", source, err)
        else:
            logger.warning("could not load the tokenizer/image processor of '%s'; tokenize/preprocess will fail", name)
        return cls(model, PREFIX + name, name=name, tokenizer=tokenizer, image_processor=image_processor)

    def save_preprocessing(self, out_dir: str | Path) -> None:
        """Write tokenizer and image processor files so the checkpoint is self-contained."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._require_preprocessing()
        self.tokenizer.save_pretrained(str(out))
        self.image_processor.save_pretrained(str(out))

    def _require_preprocessing(self) -> None:
        if self.tokenizer is None or self.image_processor is None:
            raise VlmpressError(
                f"the tokenizer/image processor of '{self.name}' are not available (rebuild the model with "
                "preprocessing_dir pointing at a directory holding them)"
            )

    # ------------------------------------------------------------------ compression hooks
    def target_layers(self) -> list[TargetLayer]:
        layers: list[TargetLayer] = []
        for group in self.groups:
            for name, module in self.model.named_modules():
                match = _TARGET_RE.match(name)
                if match is None or _GROUP[match["tower"]] != group or not isinstance(module, nn.Linear):
                    continue
                layers.append(TargetLayer(name, group, "attn" if match["attn"] else "mlp", module))
        return layers

    def text_valid_mask(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Positions that influence the pooled text embedding (see the module docstring)."""
        mask = tokens.get("attention_mask")
        return None if mask is None else mask.to(torch.bool)

    def calibration_forward(self, group: str, batch: Any, collector) -> None:
        with torch.no_grad():
            if group == "vision":
                self.encode_image(batch)
            elif group == "text":
                tokens = batch if isinstance(batch, dict) else self.tokenize(batch)
                tokens = {k: v.to(self.device) for k, v in tokens.items()}
                with collector.mask(self.text_valid_mask(tokens)):
                    self.encode_text(tokens)
            else:
                raise ConfigError(f"{self.family} models have groups {self.groups}, not '{group}'")

    # ------------------------------------------------------------------ export
    def export_dense(self, out_dir: str | Path) -> None:
        """``save_pretrained`` of a merged copy (loadable by stock ``from_pretrained``) + processor files."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        dense = deepcopy(self.model)
        merged = merge_lowrank_layers(dense)
        dense.save_pretrained(str(out))
        if self.tokenizer is not None and self.image_processor is not None:
            self.save_preprocessing(out)
        else:
            logger.warning("exported %s without tokenizer/image processor files (not available)", self.name)
        logger.info("exported dense %s checkpoint to %s (%d low-rank layers merged)", self.model_type, out, merged)

    # ------------------------------------------------------------------ inference
    def _tokenizer_kwargs(self) -> dict:
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        self._require_preprocessing()
        if isinstance(texts, str):
            texts = [texts]
        encoded = self.tokenizer(list(texts), truncation=True, return_tensors="pt", **self._tokenizer_kwargs())
        keep = ("input_ids", "attention_mask") if self._uses_attention_mask else ("input_ids",)
        return {k: encoded[k].to(self.device) for k in keep if k in encoded}

    _uses_attention_mask: ClassVar[bool] = True

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels.to(self.device)))

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(tokens, torch.Tensor):
            tokens = {"input_ids": tokens}
        return _features(self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()}))

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().item())


@register_adapter
class HFClipAdapter(_HFDualEncoderAdapter):
    """transformers ``CLIPModel`` (``hf:openai/clip-vit-base-patch16`` or a local directory)."""

    family = "hf_clip"
    model_type = "clip"
    model_class_name = "CLIPModel"
    config_class_name = "CLIPConfig"

    def _tokenizer_kwargs(self) -> dict:
        # Pad to the longest caption (cheaper than 77); the attention mask marks padding.
        return {"padding": True, "max_length": self.model.config.text_config.max_position_embeddings}


@register_adapter
class HFSiglipAdapter(_HFDualEncoderAdapter):
    """transformers ``SiglipModel`` (``hf:google/siglip-base-patch16-224`` or a local directory)."""

    family = "hf_siglip"
    model_type = "siglip"
    model_class_name = "SiglipModel"
    config_class_name = "SiglipConfig"
    # SigLIP was trained on max_length-padded text without an attention mask; passing one changes outputs.
    _uses_attention_mask = False

    def _tokenizer_kwargs(self) -> dict:
        return {"padding": "max_length", "max_length": self.model.config.text_config.max_position_embeddings}
