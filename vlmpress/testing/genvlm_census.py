"""Census of transformers' image-text-to-text families: each built tiny and offline, then round-tripped.

For a ``model_type`` of ``AutoModelForImageTextToText``'s mapping, :func:`build_tiny_family` takes
the family's **default config** and shrinks it (:func:`shrink_config`: 2 blocks per stack, width
64, 4 heads, 32-px images in 8-px patches, the family's coupled sizes kept consistent), builds the
family's **own processor class** from its own image / video processor classes (default arguments,
sizes shrunk to match the tower) and a tiny byte-level BPE holding every special token the
processor names, and writes model + processor with ``save_pretrained``. Nothing is downloaded.

:func:`family_roundtrip` then loads ``hf:<dir>`` as a user would and runs the generative
conformance kit (:func:`vlmpress.testing.conformance_genvlm.check_generative_adapter`): compress
(truncated SVD at half rank, every group calibrated) -> forward (same as the dense ``A @ B``
reconstruction) -> save -> load (same processor ids, same logits) -> export_dense -> the stock
``from_pretrained`` (same logits). A family is **ok** only when all of it passes; otherwise the row
holds the stage and a one-line reason.
"""

from __future__ import annotations

import inspect
import re
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

TINY = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "image": 32, "patch": 8}
_LAYER_KEYS = ("num_hidden_layers", "depth", "num_layers", "n_layers", "encoder_layers", "decoder_layers", "vision_layers", "text_layers")
_WIDTH_KEYS = ("hidden_size", "embed_dim", "d_model", "n_embd", "projection_dim", "out_hidden_size", "encoder_hidden_size", "word_embed_proj_dim")
_FFN_KEYS = ("intermediate_size", "ffn_dim", "mlp_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim")
_HEAD_KEYS = ("num_attention_heads", "num_heads", "n_head", "encoder_attention_heads", "decoder_attention_heads")


def _sub_configs(config) -> list[tuple[str, Any]]:
    from transformers import PretrainedConfig

    return [(k, v) for k, v in vars(config).items() if isinstance(v, PretrainedConfig)]


def _uses_mrope(config) -> bool:
    """Whether the family's modeling code reads ``mrope_section`` (M-RoPE; its default fits full-size heads only)."""
    import importlib

    module = type(config).__module__.replace("configuration_", "modeling_")
    try:
        return "mrope_section" in inspect.getsource(importlib.import_module(module))
    except (ImportError, OSError, TypeError):
        return False


def _shrink_one(config, is_vision: bool) -> None:
    def shrink(keys, value):
        for key in keys:
            current = getattr(config, key, None)
            if isinstance(current, int) and not isinstance(current, bool) and current > value:
                setattr(config, key, value)

    n_layers = None
    for key in _LAYER_KEYS:
        current = getattr(config, key, None)
        if isinstance(current, int) and current > TINY["layers"]:
            setattr(config, key, TINY["layers"])
        if isinstance(getattr(config, key, None), int):
            n_layers = n_layers or getattr(config, key)
    shrink(_WIDTH_KEYS, TINY["hidden"])
    shrink(_FFN_KEYS, TINY["intermediate"])
    shrink(_HEAD_KEYS, TINY["heads"])
    shrink(("num_key_value_heads", "n_kv_heads", "num_kv_heads"), TINY["kv_heads"])
    if isinstance(getattr(config, "head_dim", None), int):
        config.head_dim = TINY["hidden"] // TINY["heads"]
    if n_layers and isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:n_layers]
    for key in ("rope_parameters", "rope_scaling"):
        rope = getattr(config, key, None)
        if isinstance(rope, dict) and not is_vision and ("mrope_section" in rope or _uses_mrope(config)):
            half = TINY["hidden"] // TINY["heads"] // 2
            t = half // 4
            h = (half - t) // 2
            rope["mrope_section"] = [t, h, half - t - h]
    if is_vision:
        for key, value in (("image_size", TINY["image"]), ("patch_size", TINY["patch"])):
            current = getattr(config, key, None)
            if isinstance(current, int):
                setattr(config, key, value)
            elif isinstance(current, (list, tuple)) and all(isinstance(v, int) for v in current):
                setattr(config, key, type(current)([value] * len(current)))
    for key, value in list(vars(config).items()):  # layer indices (Mllama's kept states, Qwen3-VL's deepstack)
        if (key.endswith("_indexes") or key.endswith("_indices")) and isinstance(value, list) and n_layers:
            setattr(config, key, list(range(min(len(value), n_layers))))
    if isinstance(getattr(config, "cross_attention_layers", None), list):  # Mllama's LM: which layers see the image
        config.cross_attention_layers = [1]
    if isinstance(getattr(config, "num_global_layers", None), int):
        config.num_global_layers = 1
    kept = getattr(config, "intermediate_layers_indices", None)
    if isinstance(getattr(config, "vision_output_dim", None), int) and isinstance(kept, list):
        config.vision_output_dim = getattr(config, "hidden_size") * (len(kept) + 1)  # Mllama: final + kept states


def shrink_config(config) -> Any:
    """The family's default config made tiny in place (sub-configs too); returns it."""
    for name, sub in _sub_configs(config):
        _shrink_one(sub, is_vision="vision" in name or "image" in name)
        for inner_name, inner in _sub_configs(sub):
            _shrink_one(inner, is_vision="vision" in inner_name)
    _shrink_one(config, is_vision=False)
    for key in ("mm_tokens_per_image",):  # Gemma 3: pooled tokens per image, a square dividing the patch grid
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, 4)
    if isinstance(getattr(config, "vision_feature_layer", None), list):
        config.vision_feature_layer = [-1]
    if getattr(config, "image_grid_pinpoints", None):  # any-resolution grids, matched by the image processor
        image = TINY["image"]
        config.image_grid_pinpoints = [[image, 2 * image], [2 * image, image], [2 * image, 2 * image]]
    return config


# ----------------------------------------------------------------------------------------- processor
_TOKEN_LITERAL = re.compile(r"[\"'](<[^\"'\s{}]{1,40}>)[\"']")
_TOKENIZER_ATTR = re.compile(r"tokenizer\.(\w+?_token)(?:_id)?\b")
_STANDARD_TOKENS = {"pad_token", "bos_token", "eos_token", "unk_token", "sep_token", "cls_token", "mask_token"}


def _named_tokens(processor_cls) -> dict[str, str]:
    """Special tokens the processor reads as tokenizer attributes (``tokenizer.image_token``), with
    the processor's own default string where its constructor names one."""
    try:
        source = inspect.getsource(inspect.getmodule(processor_cls))
    except (OSError, TypeError):
        return {}
    defaults = {
        name: p.default for name, p in inspect.signature(processor_cls.__init__).parameters.items()
        if isinstance(p.default, str) and p.default.startswith("<")
    }
    names = sorted(n for n in set(_TOKENIZER_ATTR.findall(source)) - _STANDARD_TOKENS if not n.startswith("add_"))
    return {name: defaults.get(name, f"<|{name.removesuffix('_token')}|>") for name in names}


def _processor_token_literals(processor_cls) -> list[str]:
    """``<...>`` string literals in the processor's module: the special tokens it may look up."""
    try:
        source = inspect.getsource(inspect.getmodule(processor_cls))
    except (OSError, TypeError):
        return []
    return sorted(set(_TOKEN_LITERAL.findall(source)))


def _as_int(value) -> int:
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


def _component_class(mapping: dict, model_type: str):
    import transformers

    names = mapping.get(model_type)
    if names is None:
        return None
    if isinstance(names, dict):
        names = [names.get("torchvision"), names.get("pil"), *names.values()]
    elif isinstance(names, str):
        names = [names]
    for name in names:
        if name and hasattr(transformers, name):
            return getattr(transformers, name)
    return None


def _shrink_sizes(component, image: int, patch: int) -> None:
    """Image / video processor sizes matched to the tiny tower (tiles of ``image`` px, ``patch``-px patches)."""
    size = getattr(component, "size", None)
    if size is not None:
        values = dict(vars(size)) if not isinstance(size, dict) and hasattr(size, "__dict__") else dict(size)
        new = {}
        for key, value in values.items():
            if value is None:
                continue
            if key in ("min_pixels", "shortest_edge") and values.get("longest_edge", 0) and values["longest_edge"] > 10_000:
                new[key] = (2 * patch) ** 2  # Qwen-style pixel budgets
            elif key in ("max_pixels", "longest_edge") and value > 10_000:
                new[key] = (8 * patch) ** 2
            elif key in ("min_pixels",):
                new[key] = (2 * patch) ** 2
            elif key in ("max_pixels",):
                new[key] = (8 * patch) ** 2
            elif key == "longest_edge":
                new[key] = 2 * image
            else:
                new[key] = image
        component.size = new if isinstance(size, dict) else type(size)(**new)  # keep SizeDict where used
    for attr, value in (
        ("crop_size", {"height": image, "width": image}),
        ("max_image_size", {"longest_edge": image}),
        ("patch_size", patch),
        ("min_pixels", (2 * patch) ** 2),
        ("max_pixels", (8 * patch) ** 2),
        ("image_grid_pinpoints", [[image, 2 * image], [2 * image, image], [2 * image, 2 * image]]),
        ("max_patches", 4),
        ("max_dynamic_patch", 2),
        ("max_num_patches", 16),
    ):
        if getattr(component, attr, None) is not None:
            setattr(component, attr, value)


def build_processor(model_type: str, config):
    """The family's processor from its own component classes at tiny sizes, with a tiny BPE tokenizer.

    The tokenizer first carries the special tokens the processor reads as its attributes
    (``tokenizer.image_token``); a processor that adds them itself (BLIP-2) gets a plain one. The
    processor must encode an image with the chat template's prompt.
    """
    import transformers
    from PIL import Image
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    processor_cls = getattr(transformers, PROCESSOR_MAPPING_NAMES.get(model_type, ""), None)
    if processor_cls is None:
        raise RuntimeError(f"no processor class for '{model_type}'")
    error: Exception | None = None
    for named in (_named_tokens(processor_cls), {}):
        try:
            processor, tokenizer = _build_processor(model_type, config, named)
            prompt = "what is it?"
            if processor.chat_template:
                prompt = processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                    add_generation_prompt=True,
                )
            processor(images=[[Image.new("RGB", (40, 24))]], text=[prompt], return_tensors="pt")
            return processor, tokenizer
        except Exception as err:  # noqa: BLE001 - the next way, then the first error
            error = error or err
    raise error


def _build_processor(model_type: str, config, named: dict[str, str]):
    import transformers
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

    from vlmpress.adapters.hf_generative import processor_inserts_image_tokens
    from vlmpress.testing.genvlm_families import chat_template, tiny_tokenizer

    processor_cls = getattr(transformers, PROCESSOR_MAPPING_NAMES.get(model_type, ""), None)
    if processor_cls is None:
        raise RuntimeError(f"no processor class for '{model_type}'")
    vision = getattr(config, "vision_config", None)
    image = _as_int(getattr(vision, "image_size", TINY["image"]) or TINY["image"])
    patch = _as_int(getattr(vision, "patch_size", TINY["patch"]) or TINY["patch"])
    tokens = _processor_token_literals(processor_cls)
    tokenizer = tiny_tokenizer(tokens, named=named)
    parts: dict[str, Any] = {}
    for attribute in processor_cls.get_attributes():
        if attribute == "image_processor":
            cls = _component_class(IMAGE_PROCESSOR_MAPPING_NAMES, model_type)
        elif attribute == "video_processor":
            cls = _component_class(VIDEO_PROCESSOR_MAPPING_NAMES, model_type)
        elif attribute.endswith("tokenizer"):
            parts[attribute] = tokenizer if attribute == "tokenizer" else tiny_tokenizer(tokens, named=named)
            continue
        else:
            raise RuntimeError(f"processor part '{attribute}' is not an image, video or text part")
        if cls is None:
            raise RuntimeError(f"no {attribute} class for '{model_type}'")
        component = cls()
        _shrink_sizes(component, image, patch)
        if hasattr(component, "image_seq_length"):  # PaliGemma-style: tokens per image on the image processor
            component.image_seq_length = (image // patch) ** 2
        parts[attribute] = component
    init = inspect.signature(processor_cls.__init__).parameters
    n_tokens = getattr(config, "mm_tokens_per_image", None) or _image_seq_len(config)
    class_token = 1 if "clip" in str(getattr(vision, "model_type", "")) else 0
    candidates = {
        "patch_size": patch,
        "image_seq_len": n_tokens,
        "image_seq_length": n_tokens,
        "num_image_tokens": (image // patch) ** 2,
        "num_query_tokens": getattr(config, "num_query_tokens", None),
        "vision_feature_select_strategy": getattr(config, "vision_feature_select_strategy", None),
        "num_additional_image_tokens": class_token,
    }
    kwargs = {k: v for k, v in candidates.items() if k in init and v is not None}
    processor = processor_cls(**parts, **kwargs)
    placeholder = getattr(processor, "boi_token", None) if model_type.startswith("gemma3") else None
    placeholder = placeholder or getattr(processor, "image_token", None) or "<image>"
    if not processor_inserts_image_tokens(processor, "what is it?"):  # else: no template, the base's plain prompt
        processor.chat_template = chat_template(str(placeholder) + "\n")
    return processor, tokenizer


def _image_seq_len(config) -> int:
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return (TINY["image"] // TINY["patch"]) ** 2
    per_side = _as_int(getattr(vision, "image_size", TINY["image"])) // _as_int(getattr(vision, "patch_size", TINY["patch"]))
    scale = getattr(config, "scale_factor", None) or 1
    ratio = getattr(config, "downsample_ratio", None)  # InternVL's pixel shuffle
    if isinstance(ratio, float) and 0 < ratio < 1:
        scale = round(1 / ratio)
    return int(per_side // scale) ** 2


def _named(tokenizer, name: str) -> str | None:
    try:
        value = getattr(tokenizer, name)
    except AttributeError:
        return None
    return value if isinstance(value, str) else None


def _set_token_ids(config, processor, tokenizer) -> None:
    """Point the config's special-token ids at the tiny tokenizer's, and its vocabulary at its size."""
    vocab = tokenizer.get_vocab()
    for holder in [config] + [sub for _, sub in _sub_configs(config)]:
        for key, value in list(vars(holder).items()):
            if not (key.endswith("_token_id") or key.endswith("_token_index")) or key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
                continue
            stem = key.rsplit("_token", 1)[0]
            # the tokenizer's named token first: Gemma 3's processor calls its begin-of-image token image_token
            token = _named(tokenizer, f"{stem}_token") or getattr(processor, f"{stem}_token", None)
            token = None if token is None else str(token)  # AddedToken -> its text
            if token in vocab:
                setattr(holder, key, vocab[token])
            elif isinstance(value, int) and value >= len(tokenizer):
                setattr(holder, key, len(tokenizer) - 1)
        if getattr(holder, "vocab_size", None) is not None and holder is not getattr(config, "vision_config", None):
            holder.vocab_size = len(tokenizer)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(holder, key, None)
            if isinstance(value, int) and value >= len(tokenizer):
                setattr(holder, key, tokenizer.pad_token_id if key == "pad_token_id" else tokenizer.eos_token_id)
            elif isinstance(value, list):
                setattr(holder, key, tokenizer.eos_token_id)


def build_tiny_family(model_type: str, directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny ``model_type`` model + processor (see the module docstring) to ``directory``."""
    import transformers
    from transformers import CONFIG_MAPPING

    from vlmpress.adapters.hf_generative import image_text_to_text_classes
    from vlmpress.testing.genvlm import save_seeded

    model_cls = getattr(transformers, image_text_to_text_classes()[model_type])
    config = shrink_config(CONFIG_MAPPING[model_type]())
    for holder in [config] + [sub for _, sub in _sub_configs(config)]:  # untied everywhere: one consistent head
        if hasattr(holder, "tie_word_embeddings"):
            holder.tie_word_embeddings = False
    processor, tokenizer = build_processor(model_type, config)
    _set_token_ids(config, processor, tokenizer)
    directory = save_seeded(model_cls, config, processor, directory, seed)
    stock_forward(model_cls, directory)
    return directory


def stock_forward(model_cls, directory: Path) -> None:
    """The tiny family is *built* when plain transformers runs it: reload model and processor from
    ``directory`` and run one image + prompt through them (no vlmpress code involved)."""
    from PIL import Image
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(directory))
        model = model_cls.from_pretrained(str(directory)).eval()
        prompt = "what is it?"
        if getattr(processor, "chat_template", None):
            prompt = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                add_generation_prompt=True,
            )
        encoded = processor(images=[[Image.new("RGB", (40, 24), (90, 120, 150))]], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            model(**encoded)
    except Exception as err:  # noqa: BLE001
        raise RuntimeError(f"plain transformers cannot run the tiny model: {_one_line(err)}") from None


# ----------------------------------------------------------------------------------------- round trip
@dataclass
class FamilyRow:
    """One census row: ``ok``, ``failed`` (stage + reason) or ``not built`` (reason)."""

    model_type: str
    model_class: str
    status: str = "not built"
    stage: str = ""
    reason: str = ""
    adapter: str = ""
    groups: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)
    targeted_share: float = 0.0
    compressed: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def _targeted_share(adapter) -> float:
    """Parameters of the selected targets / parameters of every linear in the tower(s) and the LM."""
    from vlmpress.pipeline.compress import select_layers
    from vlmpress.pipeline.config import CompressionConfig

    candidates = adapter.target_layers()
    selected = {l.name for l in select_layers(adapter, CompressionConfig(model=adapter.spec, method="svd", ratio=0.5, device="cpu"))}
    total = sum(l.module.weight.numel() for l in candidates)
    return sum(l.module.weight.numel() for l in candidates if l.name in selected) / total if total else 0.0


def family_roundtrip(model_type: str, work_dir: str | Path | None = None, seed: int = 0) -> FamilyRow:
    """Build ``model_type`` tiny and run the round trip (module docstring); never raises."""
    from vlmpress.adapters.hf_generative import image_text_to_text_classes
    from vlmpress.pipeline.loading import load_model
    from vlmpress.testing.conformance_genvlm import check_generative_adapter

    row = FamilyRow(model_type, image_text_to_text_classes().get(model_type, ""))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        try:
            directory = build_tiny_family(model_type, Path(tmp) / "model", seed=seed)
        except Exception as err:  # noqa: BLE001 - recorded as the row's reason
            row.reason = _one_line(err)
            row.seconds = time.perf_counter() - t0
            return row
        stage = "load"
        try:
            adapter = load_model(f"hf:{directory}")
            row.adapter = adapter.family
            layers = adapter.target_layers()
            row.groups = dict(Counter(l.group for l in layers))
            row.kinds = dict(Counter(l.kind for l in layers))
            row.targeted_share = round(_targeted_share(adapter), 4)
            stage = "round trip"
            info = check_generative_adapter(adapter, Path(tmp) / "kit")
            row.compressed = sum(info["compressed"].values())
            row.status = "ok"
        except Exception as err:  # noqa: BLE001
            row.status, row.stage, row.reason = "failed", stage, _one_line(err)
            if isinstance(err, AssertionError) and not str(err):
                row.reason = "AssertionError at " + traceback.extract_tb(err.__traceback__)[-1].line
    row.seconds = round(time.perf_counter() - t0, 2)
    return row


def image_text_to_text_types() -> list[str]:
    from vlmpress.adapters.hf_generative import image_text_to_text_classes

    return sorted(image_text_to_text_classes())


__all__ = ["FamilyRow", "build_processor", "build_tiny_family", "family_roundtrip", "image_text_to_text_types", "shrink_config"]
