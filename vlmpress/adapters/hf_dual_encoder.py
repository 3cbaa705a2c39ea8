"""Public base class for transformers dual encoders (CLIP-style: an image tower and a text tower).

A new family of this kind is a few class attributes::

    @register_adapter
    class HFAltClipAdapter(HFDualEncoderAdapter):
        family = "hf_altclip"
        model_type = "altclip"                      # config.json "model_type" this adapter claims
        model_class_name = "AltCLIPModel"           # transformers classes (looked up by name)
        config_class_name = "AltCLIPConfig"
        towers = {"vision": ("vision_model.", "visual_projection"), "text": ("text_model.", "text_projection")}

Targets are every linear layer under each tower's module-path prefixes
(:mod:`vlmpress.adapters.discovery`), minus :attr:`HFDualEncoderAdapter.exclude_patterns`; packed
``nn.MultiheadAttention`` (SigLIP's pooling head) is split exactly before compression and re-packed on
export. Override :meth:`image_inputs`/:meth:`text_inputs` when the model's feature methods take other
arguments, :meth:`encode_image`/:meth:`encode_text` when it has no ``get_*_features`` methods, and
:meth:`text_valid_mask` when padding is not described by the attention mask.
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

from vlmpress.adapters.attention import split_attention_modules, unsplit_attention_modules
from vlmpress.adapters.base import TargetLayer, VisionLanguageAdapter
from vlmpress.adapters.discovery import discover_targets
from vlmpress.adapters.merge import merge_lowrank_layers
from vlmpress.errors import CheckpointError, ConfigError, UnknownModelSpecError, VlmpressError

logger = logging.getLogger(__name__)

PREFIX = "hf:"


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


def loader_options(local_only: bool) -> dict[str, Any]:
    """``from_pretrained`` options: never remote code; checkpoint files only when ``local_only``."""
    return {"trust_remote_code": False, **({"local_files_only": True} if local_only else {})}


def named_config_problem(family: str, config: dict) -> str | None:
    """Spec configs of transformers families hold the model's ``name`` (a label) and its ``config``."""
    if not isinstance(config.get("name"), str) or not isinstance(config.get("config"), dict):
        return f"{family} spec config needs 'name' (a string) and 'config' (a mapping)"
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


class HFDualEncoderAdapter(VisionLanguageAdapter):
    """transformers dual encoder: one ``model_type``, a model class, towers by module prefix."""

    model_type: ClassVar[str]
    model_class_name: ClassVar[str]
    config_class_name: ClassVar[str]
    towers: ClassVar[dict[str, tuple[str, ...]]] = {
        "vision": ("vision_model.", "visual_projection"),
        "text": ("text_model.", "text_projection"),
    }
    #: regexes of tower layers that are not on the contrastive path (never called by encode_*)
    exclude_patterns: ClassVar[tuple[str, ...]] = ()
    #: tokenizer call options; ``max_length`` None = the text config's max_position_embeddings
    padding: ClassVar[bool | str] = True
    #: False when the model was trained without an attention mask (SigLIP)
    uses_attention_mask: ClassVar[bool] = True
    #: positions the text model reserves (RoBERTa-style ids start after the padding index: 2)
    position_offset: ClassVar[int] = 0

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
    def _load_preprocessing(cls, source: str | Path, local_only: bool = False) -> tuple[Any, Any]:
        """Tokenizer and image processor from ``source``; ``local_only``: files in that directory only."""
        from transformers import AutoImageProcessor, AutoTokenizer

        opts = loader_options(local_only)
        return AutoTokenizer.from_pretrained(str(source), **opts), AutoImageProcessor.from_pretrained(str(source), **opts)

    @classmethod
    def load(cls, spec: str, *, device: str | torch.device = "cpu", **kwargs: Any) -> "HFDualEncoderAdapter":
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
    ) -> "HFDualEncoderAdapter":
        """Random-init model from the saved config (no download); processors from ``preprocessing_dir`` only.

        ``preprocessing_dir`` is the checkpoint's verified files (see :meth:`ModelAdapter.build_from_spec_config`);
        files missing there fail with a CheckpointError -- the saved ``name`` is a label, never a
        place to read from. Without ``preprocessing_dir`` the adapter builds without processors and
        :meth:`tokenize`/:attr:`preprocess` raise a clear error when used.
        """
        cls.require_valid_spec_config(config)
        name, model_config = config["name"], config["config"]
        hf_config = cls._transformers_class(cls.config_class_name).from_dict(deepcopy(model_config))
        model = cls._transformers_class(cls.model_class_name)(hf_config).to(device).eval()
        tokenizer = image_processor = None
        if preprocessing_dir is not None:
            try:
                tokenizer, image_processor = cls._load_preprocessing(preprocessing_dir, local_only=True)
            except Exception as err:  # noqa: BLE001 - any loader failure means the files are absent or unusable
                raise CheckpointError(
                    f"the checkpoint's tokenizer/image processor files are missing or unreadable "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                    "they are read from the checkpoint only"
                ) from None
        adapter = cls(model, PREFIX + name, name=name, tokenizer=tokenizer, image_processor=image_processor)
        adapter.prepare_for_compression()  # the layout compressed state dicts use
        return adapter

    spec_config_keys = frozenset({"family", "name", "config"})

    @classmethod
    def spec_config_problem(cls, config: Any) -> str | None:
        problem = super().spec_config_problem(config)
        if problem:
            return problem
        return named_config_problem(cls.family, config)

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
    def prepare_for_compression(self) -> None:
        """Split packed ``nn.MultiheadAttention`` (e.g. SigLIP's pooling head) exactly; idempotent."""
        split_attention_modules(self.model)

    def target_layers(self) -> list[TargetLayer]:
        self.prepare_for_compression()
        skip = [re.compile(p) for p in self.exclude_patterns]
        found = discover_targets(self.model, self.towers, skip=lambda name, _: any(p.search(name) for p in skip))
        return self.reached_targets(found)

    @classmethod
    def build_meta(cls) -> "HFDualEncoderAdapter":
        """The family's default-config architecture on the meta device (zoo survey; no weights)."""
        with torch.device("meta"):
            model = cls._transformers_class(cls.model_class_name)(cls._transformers_class(cls.config_class_name)())
        return cls(model.eval(), PREFIX + cls.model_type, name=cls.model_type)

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
        unsplit_attention_modules(dense)
        dense.save_pretrained(str(out))
        if self.tokenizer is not None and self.image_processor is not None:
            self.save_preprocessing(out)
        else:
            logger.warning("exported %s without tokenizer/image processor files (not available)", self.name)
        logger.info("exported dense %s checkpoint to %s (%d low-rank layers merged)", self.model_type, out, merged)

    def exported_spec(self, out_dir: str | Path) -> str:
        return f"{PREFIX}{Path(out_dir).resolve()}"

    # ------------------------------------------------------------------ inference
    def _text_config(self):
        config = self.model.config
        return getattr(config, "text_config", config)

    def tokenizer_kwargs(self) -> dict:
        """Options of the tokenizer call (padding, truncation length)."""
        max_length = getattr(self._text_config(), "max_position_embeddings", None)
        if isinstance(max_length, int):
            max_length -= self.position_offset
        return {"padding": self.padding, "max_length": max_length}

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        self._require_preprocessing()
        if isinstance(texts, str):
            texts = [texts]
        encoded = self.tokenizer(list(texts), truncation=True, return_tensors="pt", **self.tokenizer_kwargs())
        keep = ("input_ids", "attention_mask") if self.uses_attention_mask else ("input_ids",)
        return {k: encoded[k].to(self.device) for k in keep if k in encoded}

    def image_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keyword arguments of ``get_image_features`` for a batch of preprocessed images."""
        return {"pixel_values": pixels.to(self.device)}

    def text_inputs(self, tokens: dict[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Keyword arguments of ``get_text_features`` for a tokenised batch."""
        if isinstance(tokens, torch.Tensor):
            tokens = {"input_ids": tokens}
        return {k: v.to(self.device) for k, v in tokens.items()}

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(**self.image_inputs(pixels)))

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return _features(self.model.get_text_features(**self.text_inputs(tokens)))

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().item())




# backwards-compatible private name
_HFDualEncoderAdapter = HFDualEncoderAdapter
