"""Generative VLMs from ``transformers``: LLaVA (``LlavaForConditionalGeneration``, any vision tower / LM).

Spec: ``hf:<name-or-dir>`` whose config ``model_type`` is ``llava``; the checkpoint's processor
(image processor + tokenizer + chat template) is loaded with it and travels with compressed
checkpoints. Groups:

* ``vision`` -- every linear layer of the vision tower's encoder blocks that can influence the
  features LLaVA reads (``vision_feature_layer``; with the default ``-2`` the last block is
  unused by the model and is not a target), kinds ``attn``/``mlp``;
* ``projector`` -- the multimodal projector's linears (kind ``mlp``); dense unless targeted
  (:attr:`HFLlavaAdapter.default_exclude`; name it in ``--targets`` to compress it);
* ``text`` -- every linear layer of the decoder LM's blocks, kinds ``attn``/``mlp``, so
  ``--eps-t`` or the clustered ``--eps-attn``/``--eps-mlp`` apply to it. An untied ``lm_head`` is a
  candidate (kind ``head``) but excluded by default, as for causal LMs.

Calibration (see :class:`PairedCalibration`): image/caption pairs are built into the model's real
inputs -- the user turn ``<image> + prompt`` through the processor's chat template, then the caption
as the assistant's answer. Positions per group:

* ``vision``: every token of the vision tower (class token + patches) of each calibration image;
* ``projector``: the selected vision features (the tokens the projector sees);
* ``text``: the full multimodal sequence -- the expanded image-placeholder positions (projected image
  features), the prompt tokens and the caption tokens; right padding is masked out.

The prefix (image + prompt) has the same token ids for every image (LLaVA resizes to a fixed
resolution), so it is computed once through the processor and reused; that is also what lets
:mod:`vlmpress.evaluation.likelihood` encode each image once and score every class caption
from the cached prefix.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from vlmpress.adapters.base import ModelAdapter, TargetLayer
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

_ATTN_PARTS = {"self_attn", "attn", "attention", "self_attention"}


def _first_submodule(model: nn.Module, paths: Sequence[str]) -> tuple[str, nn.Module]:
    for path in paths:
        try:
            return path, model.get_submodule(path)
        except AttributeError:
            continue
    raise VlmpressError(f"{type(model).__name__} has none of the submodules {', '.join(paths)}")


def _block_list(module: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The first ``ModuleList`` named ``layers``/``layer``/``h`` inside ``module`` (its transformer blocks)."""
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "layer", "h"):
            return name, child
    return None


def _kind(path: str) -> str:
    return "attn" if _ATTN_PARTS.intersection(path.split(".")) else "mlp"


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
class HFGenerativeVLMAdapter(ModelAdapter):
    """Shared logic of ``vision tower -> projector -> decoder LM`` models from transformers."""

    groups = ("vision", "projector", "text")
    group_modality = {"vision": "images", "projector": "images", "text": "tokens"}
    default_exclude: ClassVar[tuple[str, ...]] = (r"(^|\.)multi_modal_projector\.", r"(^|\.)lm_head$")
    #: ``allocation: auto`` scores splits by next-token KL on held-out caption tokens
    allocation_proxy: ClassVar[str] = "caption_kl"

    model_types: ClassVar[tuple[str, ...]]
    model_class_name: ClassVar[str]
    config_class_name: ClassVar[str]
    vision_paths: ClassVar[tuple[str, ...]] = ("model.vision_tower", "vision_tower")
    projector_paths: ClassVar[tuple[str, ...]] = ("model.multi_modal_projector", "multi_modal_projector")
    language_paths: ClassVar[tuple[str, ...]] = ("model.language_model", "language_model")

    def __init__(self, model: nn.Module, spec: str, *, name: str, processor: Any = None, prompt: str = DEFAULT_PROMPT):
        super().__init__(model, spec)
        self.name = name
        self.processor = processor
        self.prompt = prompt
        self.preprocess = ImageProcessorTransform(getattr(processor, "image_processor", None), name)
        self._prefix_ids: torch.Tensor | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def _transformers_class(cls, attr: str):
        import transformers

        return getattr(transformers, attr)

    @classmethod
    def accepts(cls, spec: str) -> bool:
        return isinstance(spec, str) and spec.startswith("hf:") and hf_model_type(spec) in cls.model_types

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
        if model_type not in cls.model_types:
            raise UnknownModelSpecError(
                f"'{name}' is a transformers model of type '{model_type}', not {'/'.join(cls.model_types)}"
                if model_type
                else f"cannot read a transformers config for '{name}' (not a local model directory, and not in the "
                "Hugging Face cache)"
            )
        load_kwargs = dict(kwargs)
        load_kwargs["dtype"] = _resolve_dtype(torch_dtype) or torch.float32
        if device_map is not None:
            load_kwargs["device_map"] = device_map
        try:
            model = cls._transformers_class(cls.model_class_name).from_pretrained(name, **load_kwargs)
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
        hf_config = cls._transformers_class(cls.config_class_name).from_dict(model_config)
        dtype = _resolve_dtype(config.get("dtype")) or torch.float32
        model = cls._transformers_class(cls.model_class_name)(hf_config).to(device=device, dtype=dtype).eval()
        processor = None  # read from the checkpoint's files only, never from the saved name
        if preprocessing_dir is not None and any((Path(preprocessing_dir) / f).is_file() for f in PROCESSOR_FILES):
            try:
                processor = cls._load_processor(preprocessing_dir, local_only=True)
            except Exception as err:  # noqa: BLE001
                raise CheckpointError(
                    f"the checkpoint's processor files are unreadable ({type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''})"
                ) from None
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
    @property
    def vision_tower(self) -> tuple[str, nn.Module]:
        return _first_submodule(self.model, self.vision_paths)

    @property
    def projector(self) -> tuple[str, nn.Module]:
        return _first_submodule(self.model, self.projector_paths)

    @property
    def language_model(self) -> tuple[str, nn.Module]:
        return _first_submodule(self.model, self.language_paths)

    def used_vision_blocks(self, n_blocks: int) -> int:
        """How many vision encoder blocks can influence the features the model reads."""
        return n_blocks

    def decoder_blocks(self) -> list[tuple[str, nn.Module]]:
        """(dotted path, module) of every decoder LM block, in execution order (sequential mode)."""
        prefix, lm = self.language_model
        found = _block_list(lm)
        if found is None:
            raise VlmpressError(f"cannot find the decoder blocks of {type(lm).__name__}")
        path, blocks = found
        return [(f"{prefix}.{path}.{i}", block) for i, block in enumerate(blocks)]

    def target_layers(self) -> list[TargetLayer]:
        out: list[TargetLayer] = []
        vprefix, tower = self.vision_tower
        found = _block_list(tower)
        if found is not None:
            path, blocks = found
            for i, block in enumerate(list(blocks)[: self.used_vision_blocks(len(blocks))]):
                for name, module in block.named_modules():
                    if isinstance(module, nn.Linear):
                        out.append(TargetLayer(f"{vprefix}.{path}.{i}.{name}", "vision", _kind(name), module))
        else:  # a tower without a block list: every linear layer
            for name, module in tower.named_modules():
                if isinstance(module, nn.Linear):
                    out.append(TargetLayer(f"{vprefix}.{name}", "vision", _kind(name), module))
        pprefix, projector = self.projector
        if isinstance(projector, nn.Linear):
            out.append(TargetLayer(pprefix, "projector", "mlp", projector))
        for name, module in projector.named_modules():
            if name and isinstance(module, nn.Linear):
                out.append(TargetLayer(f"{pprefix}.{name}", "projector", "mlp", module))
        for prefix, block in self.decoder_blocks():
            for name, module in block.named_modules():
                if isinstance(module, nn.Linear):
                    out.append(TargetLayer(f"{prefix}.{name}", "text", _kind(name), module))
        head = self.model.get_output_embeddings()
        emb = self.model.get_input_embeddings()
        if isinstance(head, nn.Linear) and head.weight is not getattr(emb, "weight", None):
            name = next(n for n, m in self.model.named_modules() if m is head)
            out.append(TargetLayer(name, "text", "head", head))
        return out

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
        return f"{image_token}\n{self.prompt}\n"

    def prefix_ids(self) -> torch.Tensor:
        """(P,) token ids of the prefix with the image placeholder expanded by the processor (cached)."""
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
        """Model inputs besides ids/mask/pixels (prefix-LM families mark the prefix); none for LLaVA."""
        return {}

    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        return torch.stack([self.preprocess(_rgb(img)) for img in images])

    def pair_batch(self, pixel_values: torch.Tensor, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Model inputs for image ``i`` answered by caption ``i``: prefix + caption, right padded.

        ``caption_mask`` marks the caption tokens (the positions whose likelihood is scored).
        """
        prefix = self.prefix_ids().tolist()
        caps = self.caption_ids(captions)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else 0
        length = len(prefix) + max(len(c) for c in caps)
        n = len(caps)
        ids = torch.full((n, length), pad, dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        caption_mask = torch.zeros((n, length), dtype=torch.bool)
        for i, cap in enumerate(caps):
            seq = prefix + cap
            ids[i, : len(seq)] = torch.tensor(seq)
            attention[i, : len(seq)] = 1
            caption_mask[i, len(prefix) : len(seq)] = True
        batch = {"input_ids": ids, "attention_mask": attention, "pixel_values": pixel_values, "caption_mask": caption_mask}
        batch.update(self.extra_inputs(ids, caption_mask))
        return batch

    # ------------------------------------------------------------------ running
    @property
    def input_device(self) -> torch.device:
        weight = self.model.get_input_embeddings().weight
        return weight.device if weight.device.type != "meta" else torch.device("cpu")

    def _pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        _, tower = self.vision_tower
        param = next(tower.parameters())
        return pixels.to(device=param.device, dtype=param.dtype)

    def image_features(self, pixels: torch.Tensor) -> Any:
        """Vision tower + projector on a pixel batch (what the LM receives at the image positions)."""
        cfg = self.model.config
        base = self.model.model if hasattr(self.model, "model") else self.model
        return base.get_image_features(
            pixel_values=self._pixels(pixels),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = self.input_device
        out = {"input_ids": batch["input_ids"].to(dev)}
        if batch.get("attention_mask") is not None:
            out["attention_mask"] = batch["attention_mask"].to(dev)
        if batch.get("pixel_values") is not None:
            out["pixel_values"] = self._pixels(batch["pixel_values"])
        for key in self.extra_input_names:
            if batch.get(key) is not None:
                out[key] = batch[key].to(dev)
        return out

    #: keys of :meth:`extra_inputs` passed on to the model
    extra_input_names: ClassVar[tuple[str, ...]] = ()

    def forward_tokens(self, batch: dict[str, torch.Tensor], *, logits: bool = True, **kwargs: Any) -> Any:
        """Run a multimodal batch (``input_ids``, ``attention_mask``, ``pixel_values``) without a KV cache.

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
        with torch.no_grad():
            if group in ("vision", "projector"):  # image batches: every vision token is real
                with collector.mask(None):
                    self.image_features(batch)
            elif group == "text":
                head = any(not name.startswith(tuple(p + "." for p, _ in self.decoder_blocks())) for name in collector.modules)
                with collector.mask(batch["attention_mask"].to(torch.bool)):
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
            "vision": "every vision-tower token (class token + patches) of each calibration image",
            "projector": "the selected vision features of each calibration image (the projector's input tokens)",
            "text": "the full multimodal sequence: image-placeholder positions (projected image features) + prompt "
            "(chat template) + caption tokens; right padding masked out",
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


class HFLlavaAdapter(HFGenerativeVLMAdapter):
    """transformers ``LlavaForConditionalGeneration`` (``hf:llava-hf/llava-1.5-7b-hf`` or a local directory)."""

    family = "hf_llava"
    model_types = ("llava",)
    model_class_name = "LlavaForConditionalGeneration"
    config_class_name = "LlavaConfig"

    def used_vision_blocks(self, n_blocks: int) -> int:
        """Blocks up to the deepest ``vision_feature_layer`` (hidden_states[k] is block k-1's output)."""
        layer = self.model.config.vision_feature_layer
        indices = layer if isinstance(layer, (list, tuple)) else [layer]
        resolved = [k if k >= 0 else n_blocks + 1 + k for k in indices]
        return max(0, min(n_blocks, max(resolved)))


class HFPaliGemmaAdapter(HFGenerativeVLMAdapter):
    """transformers ``PaliGemmaForConditionalGeneration`` (SigLIP tower + linear projector + Gemma).

    PaliGemma is a prefix-LM: image and prompt attend to each other bidirectionally, the answer
    causally (``token_type_ids`` 0 on the prefix, 1 on the answer). Its processor inserts the image
    tokens, BOS and the closing newline itself; the default prompt is PaliGemma's captioning task
    ``caption en``. The vision tower's last hidden state is read, so every block is a target.
    """

    family = "hf_paligemma"
    model_types = ("paligemma",)
    model_class_name = "PaliGemmaForConditionalGeneration"
    config_class_name = "PaliGemmaConfig"
    extra_input_names = ("token_type_ids",)
    default_prompt = "caption en"

    def __init__(self, model: nn.Module, spec: str, *, name: str, processor: Any = None, prompt: str | None = None):
        super().__init__(model, spec, name=name, processor=processor, prompt=prompt or self.default_prompt)

    @classmethod
    def build_from_spec_config(cls, config: dict, **kwargs: Any) -> "HFPaliGemmaAdapter":
        return super().build_from_spec_config({**config, "prompt": config.get("prompt", cls.default_prompt)}, **kwargs)

    def prefix_text(self) -> str:
        processor = self._require_processor()
        return f"{getattr(processor, 'image_token', '<image>')}{self.prompt}"

    def caption_lead(self) -> str:
        return ""  # the processor ends the prefix with a newline

    def extra_inputs(self, input_ids: torch.Tensor, caption_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if caption_mask is None:  # a bare prefix: all bidirectional
            return {"token_type_ids": torch.zeros_like(input_ids)}
        prefix_len = int(caption_mask[0].nonzero()[0]) if caption_mask[0].any() else input_ids.shape[1]
        types = torch.ones_like(input_ids)
        types[:, :prefix_len] = 0
        return {"token_type_ids": types}

    def image_features(self, pixels: torch.Tensor) -> Any:
        base = self.model.model if hasattr(self.model, "model") else self.model
        return base.get_image_features(pixel_values=self._pixels(pixels))


__all__ = ["DEFAULT_PROMPT", "HFGenerativeVLMAdapter", "HFLlavaAdapter", "HFPaliGemmaAdapter", "PairedCalibration", "build_paired_calibration"]
