"""open_clip adapter (``open_clip:NAME[/PRETRAINED]``).

Spec forms (everything after the first ``/`` is open_clip's ``pretrained`` value):

* ``open_clip:ViT-B-16`` -- architecture only, random init;
* ``open_clip:ViT-B-16/openai`` -- a pretrained tag (downloaded by open_clip);
* ``open_clip:ViT-B-16//abs/path/model.safetensors`` -- a local checkpoint file;
* ``open_clip:hf-hub:org/repo`` and ``open_clip:local-dir:/path`` -- open_clip's own schemas.

Both ``CLIP`` (text tower at ``transformer.*``) and ``CustomTextCLIP`` (``text.*``, including
transformers text towers: RoBERTa, XLM-R, MT5, NLLB) are supported, with any vision tower open_clip
builds: its own ViT, ModifiedResNet (attention pool) or a timm trunk (ViT, EVA, SigLIP, ViTamin, PE,
Swin, ConvNeXt, FastViT) with attentional poolers and projection heads. Targets are found from the
module structure (:mod:`vlmpress.adapters.discovery`): every linear layer under ``visual.`` is a
vision target, every one under ``transformer.``/``text.`` a text target, minus layers a call trace
shows never reach the tower's output. Convolutions, embeddings and parameter-matrix projections
(``visual.proj``, ``text_projection``) stay dense.

CoCa (a model with a ``text_decoder``) gets a third group, ``multimodal``: the captioning decoder,
calibrated on image/caption pairs through the model's own captioning forward (see
``docs/generative-vlms.md``). Its text tower appends a class token; the text mask covers it.
"""

from __future__ import annotations

import difflib
import json
import re
import logging
import tempfile
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from torch import nn

from vlmpress.adapters.registry import register_adapter
from vlmpress.adapters.attention import SplitMultiheadAttention, dense_weight, split_attention_modules
from vlmpress.adapters.base import TargetLayer, VisionLanguageAdapter
from vlmpress.adapters.discovery import discover_targets
from vlmpress.adapters.module_calls import prepare_module_calls
from vlmpress.errors import CalibrationError, CheckpointError, ConfigError, UnknownModelSpecError, VlmpressError
from vlmpress.io.resources import project_root

logger = logging.getLogger(__name__)

PREFIX = "open_clip:"
_SCHEMAS = ("hf-hub:", "local-dir:")
#: file names of :meth:`OpenClipAdapter.export_dense` (open_clip's own hub / ``local-dir:`` layout)
WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"
#: where :meth:`OpenClipAdapter.save_preprocessing` puts a transformers tokenizer in a checkpoint
HF_TOKENIZER_DIR = "tokenizer"


def _register_vlmpress_configs() -> None:
    """Make ``configs/models/*.json`` (e.g. ``vlmpress-tiny``) known to open_clip by name."""
    models_dir = project_root() / "configs" / "models"
    known_paths = getattr(open_clip.factory, "_MODEL_CONFIG_PATHS", [])  # avoid re-adding on reload
    if models_dir.is_dir() and models_dir not in known_paths:
        open_clip.add_model_config(models_dir)


_register_vlmpress_configs()


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``open_clip:NAME[/PRETRAINED]`` -> (model name, pretrained tag/path or None)."""
    if not spec.startswith(PREFIX):
        raise UnknownModelSpecError(f"not an open_clip spec: '{spec}' (expected 'open_clip:NAME[/PRETRAINED]')")
    rest = spec[len(PREFIX):]
    if rest.startswith(_SCHEMAS):  # hf-hub:org/repo and local-dir:/path carry their own weights
        return rest, None
    name, _, pretrained = rest.partition("/")
    if not name:
        raise UnknownModelSpecError(f"open_clip spec '{spec}' names no model (expected 'open_clip:NAME[/PRETRAINED]')")
    return name, pretrained or None


def _check_known(name: str, pretrained: str | None) -> None:
    """Clear errors for unknown model names / tags before open_clip raises a generic RuntimeError."""
    if name.startswith(_SCHEMAS):
        return
    if open_clip.get_model_config(name) is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See open_clip.list_models()."
        raise UnknownModelSpecError(f"open_clip has no model config named '{name}'.{hint}")
    if pretrained and not Path(pretrained).is_file() and not open_clip.pretrained.is_pretrained_cfg(name, pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise UnknownModelSpecError(
            f"'{pretrained}' is neither a pretrained tag of open_clip model '{name}' nor an existing file. "
            f"Known tags: {', '.join(tags) if tags else '(none)'}"
        )


def _effective_model_cfg(name: str, model: nn.Module, kwargs: dict) -> dict | None:
    """The model config the model was really built from (open_clip's ``force_*`` overrides applied)."""
    try:
        cfg = open_clip.get_model_config(name)
    except Exception as err:  # hub config fetch failing after a successful load: cache race, offline
        logger.warning("could not read the open_clip config of '%s' (%s); spec_config will lack it", name, err)
        return None
    if cfg is None:
        return None
    if isinstance(model, open_clip.CustomTextCLIP):
        cfg["custom_text"] = True
    if kwargs.get("force_quick_gelu"):
        cfg["quick_gelu"] = True
    if kwargs.get("force_image_size") is not None:
        cfg["vision_cfg"]["image_size"] = kwargs["force_image_size"]
    if kwargs.get("force_context_length") is not None:
        cfg["text_cfg"]["context_length"] = kwargs["force_context_length"]
    if kwargs.get("force_patch_dropout") is not None:
        cfg["vision_cfg"]["patch_dropout"] = kwargs["force_patch_dropout"]
    return _jsonable(cfg)


#: open_clip tokenizer options a checkpoint may set, with their accepted values (nothing reaches a file path)
TOKENIZER_OPTIONS: dict[str, tuple[type, tuple | None]] = {
    "clean": (str, ("lower", "whitespace", "canonicalize")),
    "strip_sep_token": (bool, None),
    "language": (str, None),
    "reduction_mask": (str, None),
}
#: where save_preprocessing puts the transformers config of an HF text tower (open_clip reads it by path)
HF_TEXT_CONFIG_DIR = "text_config"
_TOP_LEVEL_CFG = frozenset({"embed_dim", "vision_cfg", "text_cfg", "multimodal_cfg", "custom_text", "quick_gelu",
                            "init_logit_scale", "init_logit_bias", "nonscalar_logit_scale", "cast_dtype"})


def _tokenizer_options(text_cfg: dict) -> dict:
    return dict(text_cfg.get("tokenizer_kwargs") or {})


def _model_cfg_problem(model_cfg: Any) -> str | None:
    """Allow-list of an open_clip ``model_cfg`` from a checkpoint: known keys, no download switch,
    no timm hub name, tokenizer options from :data:`TOKENIZER_OPTIONS` only."""
    import dataclasses

    from open_clip.coca_model import MultimodalCfg
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    if not isinstance(model_cfg, dict):
        return f"'model_cfg' must be a mapping, got {type(model_cfg).__name__}"
    unknown = sorted(str(k) for k in model_cfg if k not in _TOP_LEVEL_CFG)
    if unknown:
        return f"'model_cfg' has unknown key(s) {', '.join(unknown)}"
    for key, cfg_cls in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg), ("multimodal_cfg", MultimodalCfg)):
        section = model_cfg.get(key, {})
        if not isinstance(section, dict):
            return f"'model_cfg.{key}' must be a mapping"
        allowed = {f.name for f in dataclasses.fields(cfg_cls)}
        unknown = sorted(str(k) for k in section if k not in allowed)
        if unknown:
            return f"'model_cfg.{key}' has unknown key(s) {', '.join(unknown)}"
        for kwargs_key in ("act_kwargs", "norm_kwargs"):
            extra = section.get(kwargs_key)
            if extra is not None and (not isinstance(extra, dict) or not all(
                    isinstance(v, (int, float, str, bool, type(None))) for v in extra.values())):
                return f"'model_cfg.{key}.{kwargs_key}' must map names to plain values"
    vision = model_cfg.get("vision_cfg", {})
    if vision.get("timm_model_pretrained"):
        return "'model_cfg.vision_cfg.timm_model_pretrained' is true: a checkpoint never downloads weights"
    timm_name = vision.get("timm_model_name")
    if timm_name is not None and (not isinstance(timm_name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", timm_name)):
        return f"'model_cfg.vision_cfg.timm_model_name' {str(timm_name)[:60]!r} is not a plain timm model name"
    text = model_cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name", "tokenizer_mode"):
        if text.get(key) is not None and not isinstance(text.get(key), str):
            return f"'model_cfg.text_cfg.{key}' must be a string"
    options = text.get("tokenizer_kwargs")
    if options is not None:
        if not isinstance(options, dict):
            return "'model_cfg.text_cfg.tokenizer_kwargs' must be a mapping"
        for key, value in options.items():
            if key not in TOKENIZER_OPTIONS:
                return (f"'model_cfg.text_cfg.tokenizer_kwargs' has the option {str(key)[:40]!r}; "
                        f"accepted: {', '.join(TOKENIZER_OPTIONS)}")
            kind, values = TOKENIZER_OPTIONS[key]
            if not isinstance(value, kind) or (values is not None and value not in values):
                return f"'model_cfg.text_cfg.tokenizer_kwargs.{key}' = {str(value)[:40]!r} is not accepted"
    return None


def _tokenizer_for(name: str, model_cfg: dict, preprocessing_dir: str | Path | None = None):
    """open_clip's tokenizer for a rebuilt model, from the checkpoint's files and saved config only.

    A transformers tokenizer saved with the checkpoint (:meth:`OpenClipAdapter.save_preprocessing`)
    is read from ``preprocessing_dir/tokenizer``; a model whose config names a transformers
    tokenizer but whose checkpoint lacks those files fails (the saved names are never looked up);
    otherwise open_clip's built-in BPE tokenizer is built from the saved ``text_cfg``.
    """
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer, SimpleTokenizer

    text_cfg = model_cfg.get("text_cfg") or {}
    context_length = text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)
    options = _tokenizer_options(text_cfg)
    saved = Path(preprocessing_dir) / HF_TOKENIZER_DIR if preprocessing_dir is not None else None
    if saved is not None and saved.is_dir():
        try:
            return HFTokenizer(str(saved), context_length=context_length, tokenizer_mode=text_cfg.get("tokenizer_mode"),
                               trust_remote_code=False, local_files_only=True, **options)
        except Exception as err:  # noqa: BLE001 - unusable files in the checkpoint
            raise CheckpointError(f"the checkpoint's tokenizer files ({HF_TOKENIZER_DIR}/) are unreadable: {err}") from None
    if text_cfg.get("hf_tokenizer_name") or "siglip" in name.lower():
        raise CheckpointError(
            f"open_clip model '{name}' uses a transformers tokenizer, but the checkpoint holds no {HF_TOKENIZER_DIR}/ files "
            "(a checkpoint is read from its own files only)"
        )
    options.pop("strip_sep_token", None)
    options.pop("language", None)
    return SimpleTokenizer(context_length=context_length, **options)


def _text_tower(model: nn.Module) -> nn.Module:
    """The module holding the text tower's attributes (``CLIP`` keeps them on the model itself)."""
    return model.text if hasattr(model, "text") else model


def _multimodal_decoder(model: nn.Module) -> nn.Module | None:
    """The decoder that reads image tokens and text tokens together (CoCa's ``text_decoder``), if any."""
    decoder = getattr(model, "text_decoder", None)
    return decoder if isinstance(decoder, nn.Module) else None


def _appended_text_tokens(tower: nn.Module) -> int:
    """How many positions the text tower appends after the token ids (CoCa's class token: 1).

    Read from the structure: the positional table covers ``context_length`` ids plus the appended
    positions (``num_pos``); a tower without those attributes appends ``cls_emb`` when it has one.
    """
    num_pos, context = getattr(tower, "num_pos", None), getattr(tower, "context_length", None)
    if isinstance(num_pos, int) and isinstance(context, int):
        return num_pos - context
    return int(getattr(tower, "cls_emb", None) is not None)


@register_adapter
class OpenClipAdapter(VisionLanguageAdapter):
    """Adapter for open_clip ``CLIP`` / ``CustomTextCLIP`` models."""

    family = "open_clip"

    def __init__(
        self,
        model: nn.Module,
        spec: str,
        *,
        model_name: str,
        pretrained: str | None,
        preprocess: Callable,
        tokenizer: Callable,
        model_cfg: dict | None = None,
    ):
        super().__init__(model, spec)
        self.model_name = model_name
        self.pretrained = pretrained
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        if _multimodal_decoder(model) is not None:  # CoCa: a captioning decoder over image + text tokens
            self.groups = (*type(self).groups, "multimodal")
            self.group_modality = {**type(self).group_modality, "multimodal": "tokens"}
            self.towers = {**type(self).towers, "multimodal": ("text_decoder.",)}

    # ------------------------------------------------------------------ loading
    @classmethod
    def accepts(cls, spec: str) -> bool:
        if not isinstance(spec, str) or not spec.startswith(PREFIX):
            return False
        try:
            parse_spec(spec)
        except UnknownModelSpecError:
            return False
        return True

    @classmethod
    def load(cls, spec: str, *, device: str | torch.device = "cpu", **kwargs: Any) -> "OpenClipAdapter":
        """``open_clip.create_model_and_transforms(NAME, pretrained=...)``; extra kwargs go to it."""
        name, pretrained = parse_spec(spec)
        _check_known(name, pretrained)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, **kwargs
            )
        except RuntimeError as err:
            raise VlmpressError(f"open_clip could not create '{spec}': {err}") from err
        model_cfg = _effective_model_cfg(name, model, kwargs)
        tokenizer = open_clip.get_tokenizer(name)
        logger.info("loaded open_clip model %s (pretrained=%s)", name, pretrained)
        return cls(
            model.eval(),
            spec,
            model_name=name,
            pretrained=pretrained,
            preprocess=preprocess,
            tokenizer=tokenizer,
            model_cfg=model_cfg,
        )

    def spec_config(self) -> dict:
        return {
            "family": self.family,
            "model_name": self.model_name,
            "pretrained": self.pretrained,
            "model_cfg": deepcopy(self.model_cfg),
            "preprocess_cfg": _jsonable(open_clip.get_model_preprocess_cfg(self.model)),
        }

    @classmethod
    def build_from_spec_config(
        cls,
        config: dict,
        *,
        device: str | torch.device = "cpu",
        preprocessing_dir: str | Path | None = None,
    ) -> "OpenClipAdapter":
        """Random-init architecture from :meth:`spec_config`, never downloading weights.

        The saved ``model_cfg`` is used even when the name is not registered in this environment
        (it is materialised as an open_clip ``local-dir:`` folder without weights). The rebuilt model
        is already prepared for compression (attention split), the layout compressed state dicts use.
        ``preprocessing_dir`` is accepted for interface symmetry: open_clip's preprocessing and
        tokenizer are fully described by ``model_cfg``/``preprocess_cfg``.
        """
        cls.require_valid_spec_config(config)
        name = config["model_name"]
        model_cfg = config.get("model_cfg") or (None if name.startswith(_SCHEMAS) else open_clip.get_model_config(name))
        if model_cfg is None:
            raise CheckpointError(
                f"open_clip spec config for '{name}' holds no model_cfg, "
                "and the name is not a registered open_clip model"
            )
        build_cfg = deepcopy(model_cfg)
        text_cfg = build_cfg.get("text_cfg") or {}
        if text_cfg.get("hf_model_name"):
            # open_clip reads the transformers text config from this path: the checkpoint's copy only
            text_dir = Path(preprocessing_dir) / HF_TEXT_CONFIG_DIR if preprocessing_dir is not None else None
            if text_dir is None or not (text_dir / "config.json").is_file():
                raise CheckpointError(
                    f"open_clip model '{name}' has a transformers text tower, but the checkpoint holds no "
                    f"{HF_TEXT_CONFIG_DIR}/config.json (written by vlmpress >= 0.2; re-save the checkpoint)"
                )
            text_cfg["hf_model_name"] = str(text_dir)
            text_cfg["hf_model_pretrained"] = False
        with tempfile.TemporaryDirectory(prefix="vlmpress-open_clip-") as tmp:
            payload = {"model_cfg": build_cfg}
            if config.get("preprocess_cfg"):
                payload["preprocess_cfg"] = config["preprocess_cfg"]
            (Path(tmp) / CONFIG_FILE).write_text(json.dumps(payload), encoding="utf-8")
            source = f"local-dir:{tmp}"
            # pretrained_hf=False: a transformers text tower is built from its config; weights come from the checkpoint
            model, _, preprocess = open_clip.create_model_and_transforms(
                source, pretrained=None, device=device, pretrained_hf=False
            )
        tokenizer = _tokenizer_for(name, model_cfg, preprocessing_dir)
        pretrained = config.get("pretrained")
        spec = PREFIX + name + (f"/{pretrained}" if pretrained else "")
        adapter = cls(
            model.eval(),
            spec,
            model_name=name,
            pretrained=pretrained,
            preprocess=preprocess,
            tokenizer=tokenizer,
            model_cfg=deepcopy(model_cfg),
        )
        adapter.prepare_for_compression()
        return adapter

    def save_preprocessing(self, out_dir: str | Path) -> None:
        """Save a transformers tokenizer under ``tokenizer/`` and a transformers text tower's config
        under ``text_config/``; open_clip's own BPE tokenizer and the image transform are rebuilt
        from the spec config."""
        hf_tokenizer = getattr(self.tokenizer, "tokenizer", None)
        if hasattr(hf_tokenizer, "save_pretrained"):
            hf_tokenizer.save_pretrained(str(Path(out_dir) / HF_TOKENIZER_DIR))
        hf_config = getattr(getattr(self.model, "text", None), "config", None)
        if hasattr(hf_config, "save_pretrained"):
            hf_config.save_pretrained(str(Path(out_dir) / HF_TEXT_CONFIG_DIR))

    spec_config_keys = frozenset({"family", "model_name", "pretrained", "model_cfg", "preprocess_cfg"})

    @classmethod
    def spec_config_problem(cls, config: Any) -> str | None:
        problem = super().spec_config_problem(config)
        if problem:
            return problem
        if not isinstance(config.get("model_name"), str) or not config["model_name"]:
            return "open_clip spec config needs 'model_name' (a non-empty string)"
        if config.get("pretrained") is not None and not isinstance(config["pretrained"], str):
            return "'pretrained' must be a string label or null"
        if config.get("model_cfg") is not None:
            problem = _model_cfg_problem(config["model_cfg"])
            if problem:
                return problem
        preprocess = config.get("preprocess_cfg")
        if preprocess is not None:
            from open_clip.transform import PreprocessCfg
            import dataclasses

            allowed = {f.name for f in dataclasses.fields(PreprocessCfg)}
            if not isinstance(preprocess, dict) or any(k not in allowed for k in preprocess):
                return f"'preprocess_cfg' must be a mapping with keys among {', '.join(sorted(allowed))}"
        return None

    # ------------------------------------------------------------------ compression hooks
    def prepare_for_compression(self) -> None:
        """Make every tower linear a module call (idempotent, output-preserving; see :func:`target_layers`)."""
        count = split_attention_modules(self.model)
        count += prepare_module_calls(self.model)
        if count:
            logger.info("prepared %d attention module(s) of %s for compression", count, self.model_name)

    #: module-path prefixes of each tower (CoCa adds ``"multimodal": ("text_decoder.",)`` per instance)
    towers = {"vision": ("visual.",), "text": ("transformer.", "text.")}

    def target_layers(self) -> list[TargetLayer]:
        """Every linear layer of both towers, whatever built them (see :mod:`vlmpress.adapters.discovery`).

        Calls :meth:`prepare_for_compression` first (idempotent): packed ``nn.MultiheadAttention``
        is split into q/k/v/out linears, ModifiedResNet's attention pool and EVA attention with
        separate q/v biases are switched to forwards that call their linears as modules. timm's
        packed ``attn.qkv`` stays one layer (factorised with its shared input).
        """
        self.prepare_for_compression()
        targets = self.reached_targets(discover_targets(self.model, self.towers))
        if "multimodal" in self.groups:
            self._key_value_layers()  # traced now: during calibration the trace's forward would be collected
        return targets

    def text_valid_mask(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """(batch, seq) bool mask of text positions that can influence the pooled text embedding.

        With a causal mask (CLIP), positions after the pooled one (the end-of-text token, which is the
        argmax of the ids for open_clip's CLIP tokenizer) never reach it, so they are padding for the
        covariance. Without a causal mask every position counts, except keys masked as padding.
        """
        tower = _text_tower(self.model)
        seq = torch.arange(tokens.shape[1], device=tokens.device)
        if hasattr(tower, "config") and hasattr(tower, "transformer") and not hasattr(tower, "attn_mask"):
            return tokens != tower.config.pad_token_id  # HFTextEncoder: bidirectional with a padding mask
        if _appended_text_tokens(tower):
            return self._appended_token_mask(tower, tokens)
        pool_type = getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", "argmax")
        causal = getattr(tower, "attn_mask", None) is not None
        if causal:
            if pool_type == "argmax":
                pooled = tokens.argmax(dim=-1)
            elif pool_type == "eos":
                eos = getattr(tower, "text_eos_id", None)
                eos = getattr(tower, "eos_id", None) if eos is None else eos
                pooled = (tokens == eos).int().argmax(dim=-1)
            elif pool_type == "first":
                pooled = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
            else:  # "last" / "none": every position can reach the output
                return None
            return seq.unsqueeze(0) <= pooled.unsqueeze(1)
        if getattr(tower, "use_pad_mask", False):
            return tokens != tower.pad_id
        return None

    @staticmethod
    def _appended_token_mask(tower: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Valid positions of a text tower that appends tokens after the ids (CoCa's class token).

        The tower's sequence is the ids followed by the appended positions, so the mask is as long as
        the tower's real sequence, not the ids. The pooled (last, appended) token always counts; the
        others count when they are keys the tower's own padding mask lets through -- open_clip's rule
        places the appended token's key flag at the end (``correct_cls_mask``) or, in the legacy layout
        pretrained CoCa weights use, at the front (shifting the id flags by one).
        """
        extra = _appended_text_tokens(tower)
        keys = tokens != getattr(tower, "pad_id", 0)
        ones = keys.new_ones(keys.shape[0], extra)
        keys = torch.cat([keys, ones] if getattr(tower, "correct_cls_mask", True) else [ones, keys], dim=1)
        keys[:, -1] = True  # the pooled token's own row always reaches the embedding
        return keys

    def caption_valid_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, seq - 1) decoder positions that predict a real caption token (the captioning loss's)."""
        return tokens[:, 1:] != getattr(self.model, "pad_id", 0)

    def _key_value_layers(self) -> frozenset[str]:
        """Decoder key/value projections that read the image tokens (cross-attention), found by a call trace."""
        cached = getattr(self, "_cross_kv", None)
        if cached is not None:
            return cached
        decoder = _multimodal_decoder(self.model)
        found: set[str] = set()
        handles = []
        for name, module in decoder.named_modules():
            if isinstance(module, SplitMultiheadAttention):
                def hook(module, args, kwargs, name=name):
                    query = args[0] if args else kwargs.get("query")
                    key = args[1] if len(args) > 1 else kwargs.get("key")
                    if key is not None and key is not query:
                        found.update(f"text_decoder.{name}.{p}" for p in ("k_proj", "v_proj"))
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            with torch.no_grad():
                self.group_output("multimodal", self.probe_batch("multimodal"))
        finally:
            for handle in handles:
                handle.remove()
        self._cross_kv = frozenset(found)
        return self._cross_kv

    def calibration_forward(self, group: str, batch: Any, collector) -> None:
        with torch.no_grad():
            if group == "vision":
                self.encode_image(batch)
            elif group == "text":
                tokens = self.tokenize(batch) if not isinstance(batch, torch.Tensor) else batch.to(self.device)
                with collector.mask(self.text_valid_mask(tokens)):
                    self.encode_text(tokens)
            elif group == "multimodal" and group in self.groups:
                # the model's own captioning forward: teacher-forced caption after the image tokens
                tokens = batch["tokens"].to(self.device)
                if getattr(self, "_cross_kv", None) is None:
                    raise CalibrationError("call target_layers() before calibrating the multimodal group")
                with collector.mask(self.caption_valid_mask(tokens), unmasked=self._key_value_layers()):
                    self.group_output(group, batch)
            else:
                raise ConfigError(f"open_clip model '{self.model_name}' has groups {', '.join(self.groups)}, not '{group}'")

    def token_batches(self, calibration: Any, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """The ``multimodal`` group's batches: image ``i`` with caption ``i`` (captions cycled over the images)."""
        images, captions = list(getattr(calibration, "images", []) or []), list(getattr(calibration, "captions", []) or [])
        if not images or not captions:
            raise CalibrationError(
                f"the multimodal decoder of '{self.model_name}' calibrates on images with captions; "
                f"got {len(images)} images and {len(captions)} captions (pass --calib-images and --calib-captions)"
            )
        from vlmpress.data.calibration import image_batches

        batches, start = [], 0
        for pixels in image_batches(images, self.preprocess, batch_size, 0):
            texts = [captions[(start + i) % len(captions)] for i in range(pixels.shape[0])]
            batches.append({"pixels": pixels, "tokens": self.tokenize(texts).cpu()})
            start += pixels.shape[0]
        return batches

    # ------------------------------------------------------------------ output probes
    def probe_pixels(self) -> torch.Tensor:
        if self.preprocess is not None:
            return super().probe_pixels()
        size = getattr(self.model.visual, "image_size", 224)  # built without transforms (meta surveys)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return torch.zeros(1, 3, *size, device=self.device)

    def probe_batch(self, group: str) -> Any:
        if group == "multimodal":
            return {"pixels": self.probe_pixels(), "tokens": self.probe_batch("text")}
        if group == "text" and self.tokenizer is None:
            context = getattr(_text_tower(self.model), "context_length", None) or 77
            return torch.ones(1, context, dtype=torch.long, device=self.device)
        return super().probe_batch(group)

    def group_output(self, group: str, batch: Any) -> Any:
        """Embeddings for the contrastive towers; the captioning logits for CoCa's multimodal decoder."""
        if group == "multimodal":
            out = self.model(batch["pixels"].to(self.device), batch["tokens"].to(self.device))
            return out["logits"]
        return super().group_output(group, batch)

    # ------------------------------------------------------------------ export
    def merge_to_stock_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict with stock open_clip keys: split attention re-packed, low-rank layers merged."""
        from vlmpress.core.lowrank import LowRankLinear

        state: dict[str, torch.Tensor] = {}
        replaced: list[str] = []
        for name, module in self.model.named_modules():
            if any(name.startswith(prefix) for prefix in replaced):
                continue
            if isinstance(module, SplitMultiheadAttention):
                for key, value in module.stock_state_dict().items():
                    state[f"{name}.{key}"] = value
            elif isinstance(module, LowRankLinear):
                state[f"{name}.weight"] = dense_weight(module)
                if module.bias is not None:
                    state[f"{name}.bias"] = module.bias.detach()
            else:
                continue
            replaced.append(name + ".")
        for key, value in self.model.state_dict().items():
            if not any(key.startswith(prefix) for prefix in replaced):
                state[key] = value.detach()
        return {key: value.cpu().contiguous().clone() for key, value in state.items()}

    def export_dense(self, out_dir: str | Path) -> None:
        """Write ``open_clip_model.safetensors`` + ``open_clip_config.json`` (stock open_clip layout).

        Load with ``open_clip.create_model_and_transforms("local-dir:OUT_DIR")`` or
        ``create_model_and_transforms(NAME, pretrained="OUT_DIR/open_clip_model.safetensors")``.
        """
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file(self.merge_to_stock_state_dict(), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        config = self.spec_config()
        if config["model_cfg"] is None:
            raise CheckpointError(f"cannot export '{self.model_name}': its open_clip model config is unknown")
        payload = {"model_cfg": config["model_cfg"], "preprocess_cfg": config["preprocess_cfg"]}
        (out / CONFIG_FILE).write_text(json.dumps(payload, indent=2), encoding="utf-8")
        hf_tokenizer = getattr(self.tokenizer, "tokenizer", None)
        if hasattr(hf_tokenizer, "save_pretrained"):  # open_clip's local-dir: loads HF tokenizers from the folder
            hf_tokenizer.save_pretrained(str(out))
        logger.info("exported dense open_clip checkpoint to %s", out)

    def exported_spec(self, out_dir: str | Path) -> str:
        return f"{PREFIX}local-dir:{Path(out_dir).resolve()}"

    # ------------------------------------------------------------------ inference
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts)).to(self.device)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens.to(self.device))

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().item())


def _jsonable(value: Any) -> Any:
    """Tuples -> lists etc., so preprocess configs survive a JSON round trip unchanged."""
    return json.loads(json.dumps(value))
