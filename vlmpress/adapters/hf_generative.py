"""The generative VLM base: any transformers image-text-to-text model, read from its structure.

Spec: ``hf:<name-or-dir>`` whose config ``model_type`` is in transformers'
``AutoModelForImageTextToText`` mapping. The model's own processor (image processor + tokenizer +
chat template) is loaded with it and travels with compressed checkpoints. What is read from the
model (:mod:`vlmpress.adapters.genvlm_structure`): the vision tower, the connector, a Q-Former and
the decoder LM by transformers' standard submodule names, ``vision_feature_layer`` from the config.
Groups: ``vision``, ``qformer`` (only BLIP-2-class models), ``projector`` (dense unless targeted),
``text`` (kinds ``attn``/``mlp``/``cross_attn``; an untied ``lm_head`` is a ``head`` candidate,
excluded by default).

Inputs are built **per image by the processor** (:mod:`vlmpress.adapters.genvlm_inputs`): the
user turn ``image + prompt`` through the chat template, so each image gets its own prefix length
(Qwen2-VL's dynamic grid and M-RoPE position ids, LLaVA-NeXT / OneVision tiles, Idefics3 splits)
and the model receives every input its processor makes (``image_grid_thw``, ``image_sizes``,
``pixel_attention_mask``, ``mm_token_type_ids``...). Images travel through data loaders as
canvases (:class:`~vlmpress.adapters.genvlm_inputs.CanvasTransform`). LLaVA and PaliGemma
(:mod:`vlmpress.adapters.hf_llava`) are instances with ``fixed_prefix = True``: one image geometry,
pixels preprocessed to a tensor, one prefix for every image.

Calibration positions per group (see :meth:`HFGenerativeVLMAdapter.calibration_positions`):
``vision``/``qformer``/``projector`` -- every token the tower (tiles, grids) and connector produce
for each calibration image; ``text`` -- image positions + prompt + caption tokens, right padding
masked out; a cross-attention's key/value projections (Mllama) count every image token they read.
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from vlmpress.adapters.base import ModelAdapter, TargetLayer
from vlmpress.adapters.genvlm_inputs import CanvasTransform, PrefixBatch, canvas_images, pair_inputs, repeat_image_inputs, split_processor_output
from vlmpress.adapters.hf_clip import ImageProcessorTransform, hf_model_type, hf_name
from vlmpress.adapters.hf_dual_encoder import loader_options, named_config_problem
from vlmpress.adapters.merge import merge_lowrank_layers
from vlmpress.errors import CalibrationError, CheckpointError, ConfigError, UnknownModelSpecError, VlmpressError

logger = logging.getLogger(__name__)

#: a LLaVA-1.5-style chat template ("USER: <image>\\n{prompt} ASSISTANT:")
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% if not loop.last %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


#: the question the image is shown with; the caption is the answer whose likelihood is scored
DEFAULT_PROMPT = "What is shown in this image?"
#: any of these in a checkpoint means its processor was saved (``save_preprocessing``)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")









def _rgb(item: Any) -> Image.Image:
    if isinstance(item, (str, Path)):
        with Image.open(item) as img:
            return img.convert("RGB")
    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    raise CalibrationError(f"calibration images must be PIL images or file paths, got {type(item).__name__}")


# ----------------------------------------------------------------------------------------- calibration data
@dataclass
class PairedCalibration:
    """Image/caption pairs for a generative VLM (image ``i`` is shown with caption ``i``).

    ``images`` feeds the ``vision``/``projector`` groups (the pipeline's image batches); the pairs
    feed the ``text`` group through :meth:`HFLlavaAdapter.token_batches`.
    """

    images: list[Any] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    image_source: str = ""
    caption_source: str = ""
    positions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.captions):
            raise CalibrationError(f"{len(self.images)} calibration images but {len(self.captions)} captions; pairs need one each")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, keep: Sequence[int], note: str) -> "PairedCalibration":
        return PairedCalibration(
            [self.images[i] for i in keep], [self.captions[i] for i in keep],
            f"{self.image_source} ({note})", f"{self.caption_source} ({note})", dict(self.positions),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "n_images": len(self.images),
            "n_captions": len(self.captions),
            "n_pairs": len(self.images),
            "image_source": self.image_source,
            "caption_source": self.caption_source,
            "positions": dict(self.positions),
        }


def build_paired_calibration(config) -> PairedCalibration:
    """Pairs from ``calib_images`` (+ ``calib_captions``): a caption file is cycled over the images;
    without one, each image gets a templated caption of its own class (class sub-folders or a
    registered dataset's labels)."""
    from vlmpress.data.calibration import GENERIC_TEMPLATES, build_calibration_set

    calib = build_calibration_set(
        config.calib_images, config.calib_captions, n_images=config.n_images, n_captions=config.n_captions,
        seed=config.seed, data_root=config.data_root, need_images=True, need_captions=bool(config.calib_captions),
        split_file=config.calib_split_file,
    )
    if config.calib_captions:
        captions = [calib.captions[i % len(calib.captions)] for i in range(len(calib.images))]
        source = f"{calib.caption_source}, cycled over the images"
    else:
        classes = calib.image_classes or []
        if len(classes) != len(calib.images) or any(c is None for c in classes):
            raise CalibrationError(
                "no caption file given and the calibration images have no class sub-folders to caption them with; "
                "pass --calib-captions FILE (one caption per line)"
            )
        rng = random.Random(config.seed)
        captions = [rng.choice(GENERIC_TEMPLATES).format(c) for c in classes]
        source = f"each image's class name in one of {len(GENERIC_TEMPLATES)} generic templates"
    return PairedCalibration(list(calib.images), captions, calib.image_source, source)


# ----------------------------------------------------------------------------------------- adapter
#: model types with a dedicated adapter (an instance of the base, or a retrieval dual encoder)
_DEDICATED_TYPES = ("llava", "paligemma", "blip")


def image_text_to_text_classes() -> dict[str, str]:
    """transformers' ``AutoModelForImageTextToText`` mapping: model_type -> model class name."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return dict(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def processor_inserts_image_tokens(processor: Any, text: str) -> bool:
    """Whether ``processor`` adds image tokens to a text that has no image placeholder (BLIP-2-style)."""
    token = getattr(processor, "image_token", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if token is None or tokenizer is None:
        return False
    image_id = tokenizer.convert_tokens_to_ids(str(token))
    try:
        encoded = processor(images=[Image.new("RGB", (32, 32))], text=[text], return_tensors="pt")
    except Exception:  # noqa: BLE001 - a processor that insists on a placeholder does not insert one
        return False
    return image_id is not None and bool((encoded["input_ids"] == image_id).any())


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


class HFGenerativeVLMAdapter(ModelAdapter):
    """Any transformers image-text-to-text model: ``vision tower -> connector -> decoder LM``, by structure."""

    family = "hf_generative"
    #: below the dedicated families (LLaVA, PaliGemma), above nothing
    priority: ClassVar[int] = -1
    groups = ("vision", "projector", "text")
    group_modality = {"vision": "images", "qformer": "images", "projector": "images", "text": "tokens"}
    default_exclude: ClassVar[tuple[str, ...]] = (r"(^|\.)multi_modal_projector\.", r"(^|\.)lm_head$")
    #: ``allocation: auto`` scores splits by next-token KL on held-out caption tokens
    allocation_proxy: ClassVar[str] = "caption_kl"
    #: one image geometry and one prefix for every image (LLaVA, PaliGemma); False: the processor decides per image
    fixed_prefix: ClassVar[bool] = False
    #: model types this class accepts; None = every image-text-to-text type without a dedicated adapter
    model_types: ClassVar[tuple[str, ...] | None] = None
    model_class_name: ClassVar[str | None] = None
    config_class_name: ClassVar[str | None] = None
    #: per-token processor outputs continued over the caption with these values (default 0)
    caption_token_values: ClassVar[dict[str, int]] = {}

    def __init__(self, model: nn.Module, spec: str, *, name: str, processor: Any = None, prompt: str = DEFAULT_PROMPT):
        super().__init__(model, spec)
        from vlmpress.adapters.genvlm_structure import classify_linears, find_parts

        self.name = name
        self.processor = processor
        self.prompt = prompt
        self.parts = find_parts(model)
        feature_layer = getattr(model.config, "vision_feature_layer", None)
        self._candidates = classify_linears(model, self.parts, vision_feature_layer=feature_layer)
        present = {layer.group for layer in self._candidates}
        self.groups = tuple(g for g in ("vision", "qformer", "projector", "text") if g in present or g in ("vision", "text"))
        if not self.fixed_prefix:
            projector = [layer.name for layer in self._candidates if layer.group == "projector"]
            self.default_exclude = tuple(rf"^{re.escape(n)}$" for n in projector) + (r"(^|\.)lm_head$",)
        self.preprocess = self._make_preprocess()
        self._prefix_ids: torch.Tensor | None = None

    def _make_preprocess(self):
        if self.fixed_prefix:
            return ImageProcessorTransform(getattr(self.processor, "image_processor", None), self.name)
        return CanvasTransform(self.canvas_size())

    def canvas_size(self) -> int:
        """Largest image side kept before the processor sees the image (the processor's own limits, capped at 1024)."""
        hints: list[float] = []
        ip = getattr(self.processor, "image_processor", None)
        size = getattr(ip, "size", None)
        size = dict(vars(size)) if size is not None and not isinstance(size, dict) and hasattr(size, "__dict__") else size
        if isinstance(size, dict):
            hints += [float(v) for v in size.values() if isinstance(v, (int, float)) and v < 10_000]
        for attr in ("max_pixels",):
            value = getattr(ip, attr, None) or (size.get(attr) if isinstance(size, dict) else None)
            if isinstance(value, (int, float)) and value > 0:
                hints.append(value**0.5)
        for pin in getattr(ip, "image_grid_pinpoints", None) or []:
            hints += [float(x) for x in pin]
        return int(min(1024, max([64.0] + [2 * h for h in hints if h < 512] + [h for h in hints if h >= 512])))

    # ------------------------------------------------------------------ loading
    @classmethod
    def _transformers_class(cls, attr: str):
        import transformers

        return getattr(transformers, attr)

    @classmethod
    def _accepted_types(cls) -> tuple[str, ...]:
        if cls.model_types is not None:
            return cls.model_types
        return tuple(t for t in image_text_to_text_classes() if t not in _DEDICATED_TYPES)

    @classmethod
    def accepts(cls, spec: str) -> bool:
        return isinstance(spec, str) and spec.startswith("hf:") and hf_model_type(spec) in cls._accepted_types()

    @classmethod
    def _model_class(cls, model_type: str):
        name = cls.model_class_name or image_text_to_text_classes().get(model_type)
        if name is None:
            raise UnknownModelSpecError(f"'{model_type}' is not an image-text-to-text model type of transformers")
        return cls._transformers_class(name)

    @classmethod
    def _config_from_dict(cls, model_config: dict):
        if cls.config_class_name:
            return cls._transformers_class(cls.config_class_name).from_dict(model_config)
        from transformers import CONFIG_MAPPING

        model_type = model_config.get("model_type")
        if model_type not in image_text_to_text_classes():
            raise CheckpointError(f"the checkpoint's config has model_type {str(model_type)[:40]!r}, not an image-text-to-text type")
        return CONFIG_MAPPING[model_type].from_dict(model_config)

    @staticmethod
    def _load_processor(source: str | Path, local_only: bool = False):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(str(source), **loader_options(local_only))

    @classmethod
    def load(
        cls, spec: str, *, device: str | torch.device = "cpu", torch_dtype: Any = None, device_map: Any = None, **kwargs: Any
    ) -> "HFGenerativeVLMAdapter":
        """``<Model>.from_pretrained`` (float32 unless ``torch_dtype``) plus ``AutoProcessor``."""
        from vlmpress.adapters.hf_causal_lm import _resolve_dtype

        name = hf_name(spec)
        model_type = hf_model_type(spec)
        if model_type not in cls._accepted_types():
            raise UnknownModelSpecError(
                f"'{name}' is a transformers model of type '{model_type}', not one {cls.family} accepts"
                if model_type
                else f"cannot read a transformers config for '{name}' (not a local model directory, and not in the "
                "Hugging Face cache)"
            )
        load_kwargs = dict(kwargs)
        load_kwargs["dtype"] = _resolve_dtype(torch_dtype) or torch.float32
        if device_map is not None:
            load_kwargs["device_map"] = device_map
        try:
            model = cls._model_class(model_type).from_pretrained(name, **load_kwargs)
        except OSError as err:
            raise CheckpointError(f"cannot load the weights of '{spec}': {err}") from None
        try:
            processor = cls._load_processor(name)
        except Exception as err:  # noqa: BLE001 - compressing without data still works
            logger.warning("no processor found for %s (%s); calibration and evaluation need one", name, err)
            processor = None
        if device_map is None:
            model.to(device)
        model.eval()
        return cls(model, spec, name=name, processor=processor)

    def spec_config(self) -> dict:
        return {
            "family": self.family,
            "name": self.name,
            "config": self.model.config.to_dict(),
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "prompt": self.prompt,
        }

    @classmethod
    def build_from_spec_config(
        cls, config: dict, *, device: str | torch.device = "cpu", preprocessing_dir: str | Path | None = None
    ) -> "HFGenerativeVLMAdapter":
        from vlmpress.adapters.hf_causal_lm import _resolve_dtype

        cls.require_valid_spec_config(config)
        name, model_config = config["name"], copy.deepcopy(config["config"])
        hf_config = cls._config_from_dict(model_config)
        dtype = _resolve_dtype(config.get("dtype")) or torch.float32
        model = cls._model_class(model_config.get("model_type", ""))(hf_config).to(device=device, dtype=dtype).eval()
        processor = None  # read from the checkpoint's files only, never from the saved name
        if preprocessing_dir is not None and any((Path(preprocessing_dir) / f).is_file() for f in PROCESSOR_FILES):
            try:
                processor = cls._load_processor(preprocessing_dir, local_only=True)
            except Exception as err:  # noqa: BLE001
                raise CheckpointError(f"the checkpoint's processor files are unreadable ({_first_line(err)})") from None
        else:
            logger.warning("the checkpoint of '%s' holds no processor files; calibration and evaluation will fail", name)
        return cls(model, "hf:" + name, name=name, processor=processor, prompt=config.get("prompt", DEFAULT_PROMPT))

    spec_config_keys = frozenset({"family", "name", "config", "dtype", "prompt"})

    @classmethod
    def spec_config_problem(cls, config: Any) -> str | None:
        problem = super().spec_config_problem(config)
        if problem:
            return problem
        from vlmpress.adapters.hf_causal_lm import saved_dtype_problem

        problem = named_config_problem(cls.family, config) or saved_dtype_problem(config.get("dtype"))
        if problem is None and not isinstance(config.get("prompt", ""), str):
            problem = "'prompt' must be a string"
        return problem

    def save_preprocessing(self, out_dir: str | Path) -> None:
        """The processor (image processor, tokenizer, chat template) travels with compressed checkpoints."""
        if self.processor is not None:
            self.processor.save_pretrained(str(out_dir))

    # ------------------------------------------------------------------ structure
    def decoder_blocks(self) -> list[tuple[str, nn.Module]]:
        """(dotted path, module) of every decoder LM block, in execution order (sequential mode)."""
        from vlmpress.adapters.genvlm_structure import decoder_blocks

        return decoder_blocks(self.model, self.parts)

    def target_layers(self) -> list[TargetLayer]:
        from vlmpress.adapters.genvlm_structure import classify_linears

        feature_layer = getattr(self.model.config, "vision_feature_layer", None)
        # re-read: compression replaces modules, so the cached list only fixes names and groups
        layers = classify_linears(self.model, self.parts, vision_feature_layer=feature_layer)
        called = self._called_linears()
        return layers if called is None else [layer for layer in layers if layer.name in called]

    def _called_linears(self) -> set[str] | None:
        """Linears the model calls on an image + caption (cached): a tower's unused pooling head or
        merger is no target. None when it cannot be run (no processor, weights on the meta device)."""
        if not hasattr(self, "_called"):
            self._called = None
            if self.processor is not None and not any(p.device.type == "meta" for p in self.model.parameters()):
                seen: set[str] = set()
                hooks = [
                    module.register_forward_pre_hook(lambda m, a, name=name: seen.add(name))
                    for name, module in self.model.named_modules() if isinstance(module, nn.Linear)
                ]
                try:
                    with torch.no_grad():
                        self.forward_tokens(self.pair_batch(self.pixel_values([Image.new("RGB", (48, 32), (90, 120, 150))]), ["a"]))
                    self._called = seen
                except Exception as err:  # noqa: BLE001 - no filtering then; calibration reports uncalled layers
                    logger.debug("no call trace for %s: %s", self.name, err)
                finally:
                    for hook in hooks:
                        hook.remove()
        return self._called

    # ------------------------------------------------------------------ processor-built inputs
    def _require_processor(self) -> Any:
        if self.processor is None or getattr(self.processor, "tokenizer", None) is None:
            raise VlmpressError(
                f"'{self.name}' has no processor (image processor + tokenizer); save one with the model "
                "(processor.save_pretrained(DIR)) to calibrate or evaluate it"
            )
        return self.processor

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", None)

    def prefix_text(self) -> str:
        """The user turn showing the image (and the prompt), ending where the answer starts."""
        processor = self._require_processor()
        image_token = getattr(processor, "image_token", "<image>")
        if getattr(processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
            return processor.apply_chat_template(messages, add_generation_prompt=True)
        if not self.fixed_prefix and processor_inserts_image_tokens(processor, self.prompt):
            return f"{self.prompt}\n"  # BLIP-2 / InstructBLIP put the query-token placeholders first themselves
        return f"{image_token}\n{self.prompt}\n"

    def prefix_ids(self) -> torch.Tensor:
        """(P,) token ids of the one prefix of a fixed-geometry model (image placeholder expanded; cached)."""
        if not self.fixed_prefix:
            raise ConfigError(f"{self.family} builds a prefix per image (encode_prefixes); it has no single prefix")
        if self._prefix_ids is None:
            processor = self._require_processor()
            size = self._image_size()
            blank = Image.new("RGB", (size, size))
            encoded = processor(images=[blank], text=[self.prefix_text()], return_tensors="pt")
            mask = encoded.get("attention_mask")
            ids = encoded["input_ids"][0]
            self._prefix_ids = ids[mask[0].bool()] if mask is not None else ids
        return self._prefix_ids

    def _image_size(self) -> int:
        vision = getattr(self.model.config, "vision_config", None)
        return int(getattr(vision, "image_size", 224) or 224)

    def encode_prefixes(self, pixels: torch.Tensor) -> PrefixBatch:
        """What the model sees before the caption, per image: prefix ids, per-token and image inputs."""
        if self.fixed_prefix:
            prefix = self.prefix_ids().tolist()
            return PrefixBatch([prefix] * pixels.shape[0], {}, {"pixel_values": pixels})
        processor = self._require_processor()
        images = canvas_images(pixels)
        texts = [self.prefix_text()] * len(images)
        try:
            encoded = processor(images=[[img] for img in images], text=texts, return_tensors="pt", padding=True)
        except (ValueError, TypeError, IndexError):  # processors that want a flat image list
            encoded = processor(images=images, text=texts, return_tensors="pt", padding=True)
        return split_processor_output(encoded)

    def caption_ids(self, captions: Sequence[str]) -> list[list[int]]:
        """Token ids of each caption as the answer that follows :meth:`prefix_text` (no special tokens)."""
        tokenizer = self._require_processor().tokenizer
        lead = self.caption_lead()
        texts = [lead + c.strip() for c in captions]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        if any(len(x) == 0 for x in ids):
            raise ConfigError("a caption tokenised to nothing; captions must hold text")
        return ids

    def caption_lead(self) -> str:
        """Text put before each caption: a space after a prompt that does not end in whitespace."""
        return "" if self.prefix_text()[-1:].isspace() else " "

    def extra_inputs(self, input_ids: torch.Tensor, caption_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Model inputs besides ids/mask/pixels (prefix-LM families mark the prefix); none by default."""
        return {}

    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        return torch.stack([self.preprocess(_rgb(img)) for img in images])

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else 0

    def pair_batch(self, pixels: torch.Tensor, captions: Sequence[str], *, prefixes: PrefixBatch | None = None) -> dict[str, torch.Tensor]:
        """Model inputs for image ``i`` answered by caption ``i``: its own prefix + caption, right padded.

        ``caption_mask`` marks the caption tokens (the positions whose likelihood is scored).
        ``prefixes`` (one image) with several captions repeats that image for every caption.
        """
        caps = self.caption_ids(captions)
        if prefixes is None:
            prefixes = self.encode_prefixes(pixels)
        if len(prefixes) == 1 and len(caps) > 1:
            prefixes = PrefixBatch(
                prefixes.ids * len(caps), {k: v * len(caps) for k, v in prefixes.per_token.items()},
                repeat_image_inputs(prefixes.image_inputs, len(caps)),
            )
        batch = pair_inputs(prefixes, caps, pad_id=self.pad_id, caption_values=self.caption_token_values)
        batch.update(self.extra_inputs(batch["input_ids"], batch["caption_mask"]))
        return batch

    def prefix_inputs(self, prefixes: PrefixBatch) -> dict[str, torch.Tensor]:
        """Model inputs of the prefixes alone (one image: no padding), for a KV-cache prefill."""
        if len(prefixes) != 1:
            raise ValueError("prefix_inputs encodes one image's prefix at a time")
        ids = torch.tensor([prefixes.ids[0]], dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        out.update({k: v[0].unsqueeze(0) for k, v in prefixes.per_token.items()})
        out.update(prefixes.image_inputs)
        out.update(self.extra_inputs(ids, None))
        return self.model_inputs(out)

    # ------------------------------------------------------------------ running
    @property
    def input_device(self) -> torch.device:
        weight = self.model.get_input_embeddings().weight
        return weight.device if weight.device.type != "meta" else torch.device("cpu")

    def _pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        tower = self.model.get_submodule(self.parts.vision)
        param = next(tower.parameters())
        return pixels.to(device=param.device, dtype=param.dtype)

    def image_features(self, pixels: torch.Tensor) -> Any:
        """Vision tower + connector on an image batch (what the LM receives at the image positions)."""
        base = self.model.model if hasattr(self.model, "model") else self.model
        if self.fixed_prefix:
            return self._fixed_image_features(base, pixels)
        prefixes = self.encode_prefixes(pixels)
        fn = getattr(base, "get_image_features", None) or getattr(self.model, "get_image_features", None)
        if fn is None:  # e.g. Mllama (cross-attention images): the model's own forward over the prefixes
            batch = pair_inputs(prefixes, [[] for _ in prefixes.ids], pad_id=self.pad_id)
            return self.forward_tokens(batch, logits=False)
        inputs = self.model_inputs(dict(prefixes.image_inputs))
        accepted = inspect.signature(fn).parameters  # only the inputs it names (its **kwargs reach the tower)
        return fn(**{k: v for k, v in inputs.items() if k in accepted})

    def _fixed_image_features(self, base: nn.Module, pixels: torch.Tensor) -> Any:
        cfg = self.model.config
        return base.get_image_features(
            pixel_values=self._pixels(pixels),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every tensor of ``batch`` the model takes (``caption_mask`` is ours), on the model's device."""
        dev = self.input_device
        out = {}
        for key, value in batch.items():
            if key == "caption_mask" or value is None:
                continue
            if key.startswith("pixel_values") and value.is_floating_point():
                out[key] = self._pixels(value)
            else:
                out[key] = value.to(dev)
        return out

    def forward_tokens(self, batch: dict[str, torch.Tensor], *, logits: bool = True, **kwargs: Any) -> Any:
        """Run a multimodal batch (``pair_batch``) without a KV cache.

        ``logits=False`` stops at the LM's last hidden state (enough to calibrate the blocks).
        """
        module = self.model if logits else (self.model.model if hasattr(self.model, "model") else self.model)
        try:
            return module(**self.model_inputs(batch), use_cache=False, **kwargs)
        except ValueError as err:
            if "image" in str(err).lower() and "token" in str(err).lower():
                raise ConfigError(
                    f"the processor of '{self.name}' and the model disagree on the number of image tokens ({err}); "
                    "the processor's patch_size / vision_feature_select_strategy must match the model config"
                ) from None
            raise

    def token_batches(self, calibration: PairedCalibration, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """The ``text`` group's batches: image/caption pairs built into full multimodal sequences."""
        if not isinstance(calibration, PairedCalibration) or not len(calibration):
            raise CalibrationError(f"{self.family} calibration needs image/caption pairs (--calib-images, --calib-captions)")
        batches = []
        for start in range(0, len(calibration), batch_size):
            images = calibration.images[start : start + batch_size]
            captions = calibration.captions[start : start + batch_size]
            batches.append(self.pair_batch(self.pixel_values(images), captions))
        return batches

    def calibration_forward(self, group: str, batch: Any, collector) -> None:
        from vlmpress.adapters.genvlm_structure import reads_other_sequence

        with torch.no_grad():
            if self.group_modality.get(group) == "images" and group in self.groups:  # every image token is real
                with collector.mask(None):
                    self.image_features(batch)
            elif group == "text":
                blocks = tuple(p + "." for p, _ in self.decoder_blocks())
                head = any(not name.startswith(blocks) for name in collector.modules)
                other = [l.name for l in self._candidates if l.group == "text" and reads_other_sequence(l)]
                with collector.mask(batch["attention_mask"].to(torch.bool), unmasked=other):
                    self.forward_tokens(batch, logits=head)
            else:
                raise ConfigError(f"{self.family} models have groups {', '.join(self.groups)}, not '{group}'")

    @classmethod
    def load_calibration(cls, config) -> PairedCalibration:
        calib = build_paired_calibration(config)
        calib.positions = cls.calibration_positions()
        return calib

    @staticmethod
    def calibration_positions() -> dict[str, str]:
        return {
            "vision": "every vision-tower token of each calibration image (every tile / grid patch the processor makes)",
            "projector": "every token the connector receives for each calibration image (a Q-Former, group "
            "'qformer': its learned queries, its cross-attention keys/values every image token)",
            "text": "the full multimodal sequence: image positions (projected image features) + prompt "
            "(chat template) + caption tokens; right padding masked out; cross-attention keys/values: every image token",
        }

    # ------------------------------------------------------------------ export
    def export_dense(self, out_dir: str | Path) -> None:
        """``save_pretrained`` of a merged copy (stock ``from_pretrained`` loads it) + the processor."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        dense = copy.deepcopy(self.model)
        merged = merge_lowrank_layers(dense)
        dense.save_pretrained(str(out), safe_serialization=True)
        self.save_preprocessing(out)
        logger.info("exported dense %s checkpoint to %s (%d low-rank layers merged)", self.family, out, merged)

    def exported_spec(self, out_dir: str | Path) -> str:
        """``hf:<dir>``: the export loads with the stock ``from_pretrained`` + ``AutoProcessor``."""
        return f"hf:{Path(out_dir).resolve()}"


__all__ = [
    "DEFAULT_PROMPT",
    "HFGenerativeVLMAdapter",
    "LLAVA15_CHAT_TEMPLATE",
    "PairedCalibration",
    "build_paired_calibration",
    "image_text_to_text_classes",
]
