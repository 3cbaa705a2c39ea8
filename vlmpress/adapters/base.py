"""The adapter interface: everything vlmpress needs to know about one model family.

An adapter wraps a loaded model and answers four questions:

1. *Which layers can be compressed?*  :meth:`ModelAdapter.target_layers` returns every candidate
   linear layer with its group (``vision``/``text`` for CLIP, ``decoder`` for LLMs) and kind
   (``attn``/``mlp``; the paper's clustered allocation assigns one tolerance per kind).
2. *How does calibration data flow through a group?*  :meth:`ModelAdapter.calibration_forward`
   runs one batch of the group's modality through the model with a covariance collector attached
   (and tells the collector which positions are real tokens).
3. *How is the architecture rebuilt without downloading weights?*  :meth:`spec_config` /
   :meth:`build_from_spec_config` (used by ``load_compressed``).
4. *How is a dense, stock checkpoint written?*  :meth:`export_dense`.

Vision-language adapters additionally implement :class:`VisionLanguageAdapter` (preprocess,
tokenize, encode_image, encode_text), which is all the zero-shot harness uses.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from vlmpress.adapters.discovery import tower_inventory, unreached_layers
from vlmpress.adapters.layers import (  # noqa: F401  (re-exported: the historical vlmpress.adapters.base names)
    TargetLayer,
    get_submodule_parent,
    replace_module,
    select_targets,
    weight_matrix,
)

logger = logging.getLogger(__name__)


class ModelAdapter(ABC):
    """Base class for one model family. Subclasses register with :func:`register_adapter`."""

    #: registry key, e.g. ``"open_clip"``
    family: ClassVar[str]
    #: groups of target layers, e.g. ``("vision", "text")`` or ``("decoder",)``
    groups: ClassVar[tuple[str, ...]]
    #: calibration modality per group: "images", "texts" (captions) or "tokens" (LM text)
    group_modality: ClassVar[dict[str, str]]
    #: registry precedence when several adapters accept a spec (higher first; see vlmpress.adapters)
    priority: ClassVar[int] = 0

    def __init__(self, model: nn.Module, spec: str):
        self.model = model
        self.spec = spec

    # ------------------------------------------------------------------ discovery / loading
    @classmethod
    @abstractmethod
    def accepts(cls, spec: str) -> bool:
        """True when this adapter understands the model spec string."""

    @classmethod
    @abstractmethod
    def load(cls, spec: str, *, device: str | torch.device = "cpu", **kwargs: Any) -> "ModelAdapter":
        """Load the model named by ``spec`` (pretrained weights when the spec names them)."""

    @abstractmethod
    def spec_config(self) -> dict:
        """JSON-serialisable description that rebuilds the architecture with no download."""

    @classmethod
    @abstractmethod
    def build_from_spec_config(
        cls,
        config: dict,
        *,
        device: str | torch.device = "cpu",
        preprocessing_dir: str | Path | None = None,
    ) -> "ModelAdapter":
        """Rebuild the (randomly initialised) architecture from :meth:`spec_config` output.

        ``load_compressed`` calls this with ``preprocessing_dir`` = a private copy of the
        checkpoint's hash-verified files (what :meth:`save_preprocessing` wrote: tokenizer, image
        processor); adapters that need none ignore it. Read preprocessing files from there only
        (``local_files_only=True``, never ``trust_remote_code``), never from a name in ``config``:
        a checkpoint is data and must not reach other paths or a hub. ``config`` has passed
        :meth:`spec_config_problem`. The result must have the layout compressed state dicts use
        (the pipeline calls :meth:`prepare_for_compression` on it before loading weights).
        """

    #: top-level keys :meth:`spec_config` writes; None accepts any (plugins that declare none)
    spec_config_keys: ClassVar[frozenset[str] | None] = None

    @classmethod
    def spec_config_problem(cls, config: Any) -> str | None:
        """Why a checkpoint's ``spec_config`` must not be built (allow-list of keys), or None.

        Runs before :meth:`build_from_spec_config`. Families override it to check values that reach
        a library loader (dtypes, tokenizer options); keys that switch on code are refused for every
        family by the pipeline before this is called.
        """
        if not isinstance(config, dict):
            return f"expected a mapping, got {type(config).__name__}"
        if cls.spec_config_keys is not None:
            unknown = sorted(str(k) for k in config if k not in cls.spec_config_keys)
            if unknown:
                return f"unknown key(s) {', '.join(unknown)} for family {cls.family} (allowed: {', '.join(sorted(cls.spec_config_keys))})"
        return None

    @classmethod
    def require_valid_spec_config(cls, config: Any) -> None:
        """:meth:`spec_config_problem` as a CheckpointError (first line of :meth:`build_from_spec_config`)."""
        from vlmpress.errors import CheckpointError

        problem = cls.spec_config_problem(config)
        if problem:
            raise CheckpointError(f"{cls.family} spec config: {problem}")

    def save_preprocessing(self, out_dir: str | Path) -> None:
        """Optional hook: write what :meth:`build_from_spec_config` needs besides the weights.

        Called by ``save_compressed`` with the checkpoint directory. The default writes nothing,
        which is right when :meth:`spec_config` describes preprocessing fully (open_clip); adapters
        whose tokenizer/processor live in files (transformers) must override it, or checkpoints
        depend on the original model directory.
        """

    # ------------------------------------------------------------------ compression hooks
    def prepare_for_compression(self) -> None:
        """Make every target an explicit linear layer (e.g. split packed attention). Idempotent.

        Must leave the model's outputs unchanged (tested to 1e-5 in fp32).
        """

    @abstractmethod
    def target_layers(self) -> list[TargetLayer]:
        """All candidate layers, after :meth:`prepare_for_compression`."""

    @abstractmethod
    def calibration_forward(self, group: str, batch: Any, collector) -> None:
        """Run one calibration batch of ``group``'s modality through the model.

        ``batch`` is a preprocessed image tensor for "images" groups, a list of strings for
        "texts" groups and a dict with ``input_ids``/``attention_mask`` for "tokens" groups.
        Adapters wrap the forward in ``collector.mask(valid)`` when some positions must not count
        (text padding after the end-of-text token).
        """

    @abstractmethod
    def export_dense(self, out_dir: str | Path) -> None:
        """Write a stock checkpoint of the family (loadable without vlmpress) into ``out_dir``.

        The model may hold ``LowRankLinear`` layers (and split attention): implementations merge
        them themselves (:func:`vlmpress.adapters.merge.merge_lowrank_layers` on a copy, or
        re-packing) and must leave the adapter's model compressed. ``out_dir`` exists.
        """

    def exported_spec(self, out_dir: str | Path) -> str | None:
        """The model spec that loads :meth:`export_dense` output with the family's stock loader.

        Used by the conformance kit (``vlmpress.testing.check_adapter``); None = not checkable.
        """
        return None

    #: tower name -> module-path prefixes (``{"vision": ("visual.",)}``); enables
    #: :meth:`tower_inventory` (coverage and dense-layer reporting, the "nothing to compress" check)
    towers: ClassVar[dict[str, tuple[str, ...]]] = {}

    def tower_inventory(self, targets: Sequence[str] | None = None) -> dict:
        """Per group: linear parameters found, how many ``targets`` cover, convolutions kept dense.

        ``targets`` defaults to :meth:`target_layers`. Empty when the adapter declares no ``towers``.
        """
        if not self.towers:
            return {}
        names = [layer.name for layer in self.target_layers()] if targets is None else list(targets)
        return tower_inventory(self.model, self.towers, names)

    # ------------------------------------------------------------------ conveniences
    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:  # pragma: no cover
            return torch.device("cpu")

    def to(self, device) -> "ModelAdapter":
        self.model.to(device)
        return self

    def eval(self) -> "ModelAdapter":
        self.model.eval()
        return self


class VisionLanguageAdapter(ModelAdapter):
    """CLIP-style model with separate image and text towers (what the zero-shot harness uses)."""

    groups = ("vision", "text")
    group_modality = {"vision": "images", "text": "texts"}
    #: how ``allocation: auto`` scores a candidate tower split (a key of
    #: ``vlmpress.pipeline.auto_allocation.AUTO_ALLOCATION_PROXIES``): the zero-shot image->text distribution
    allocation_proxy: ClassVar[str] = "zero_shot_kl"

    #: PIL image -> float tensor (C, H, W), the model's own eval transform
    preprocess: Callable

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> Any:
        """Tokenised batch for :meth:`encode_text` (tensor or dict of tensors)."""

    @abstractmethod
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(batch, dim) image embeddings, *not* normalised."""

    @abstractmethod
    def encode_text(self, tokens: Any) -> torch.Tensor:
        """(batch, dim) text embeddings, *not* normalised."""

    def logit_scale(self) -> float:
        """The model's learned temperature (informational; zero-shot top-k does not need it)."""
        return 1.0

    # ------------------------------------------------------------------ output probes
    #: a short caption every tokenizer handles (the text probe)
    PROBE_TEXT: ClassVar[str] = "a photo of a small thing"

    def probe_pixels(self) -> torch.Tensor:
        """One preprocessed image batch (1, C, H, W) for output probes (a grey image through :attr:`preprocess`)."""
        from PIL import Image

        return self.preprocess(Image.new("RGB", (64, 64), (127, 127, 127))).unsqueeze(0)

    def probe_batch(self, group: str) -> Any:
        """A tiny input of ``group``'s modality that :meth:`group_output` accepts."""
        if self.group_modality[group] == "images":
            return self.probe_pixels()
        return self.tokenize([self.PROBE_TEXT])

    def group_output(self, group: str, batch: Any) -> Any:
        """What ``group``'s layers exist to produce, from a :meth:`probe_batch`: the tower's embeddings."""
        if self.group_modality[group] == "images":
            return self.encode_image(batch)
        return self.encode_text(batch)

    def reached_targets(self, candidates: list[TargetLayer]) -> list[TargetLayer]:
        """``candidates`` minus the layers whose output never reaches their group's output.

        Found by a call trace (:func:`vlmpress.adapters.discovery.unreached_layers`) of
        :meth:`group_output` on a :meth:`probe_batch`, once per adapter (cached by layer name): a linear
        the forward computes but never reads (a text pooler the contrastive path ignores) or never
        calls is not a target. When a probe cannot run, the group keeps every candidate (logged).
        """
        unreached = getattr(self, "_unreached_layers", None)
        if unreached is None:
            unreached = set()
            for group in dict.fromkeys(layer.group for layer in candidates):
                mine = {layer.name: layer.module for layer in candidates if layer.group == group}
                try:
                    batch = self.probe_batch(group)
                    found = unreached_layers(mine, lambda: self.group_output(group, batch))
                except Exception as err:  # noqa: BLE001 - a probe is an optimisation of the target list, not a requirement
                    logger.warning("could not trace which %s layers reach the output (%s); keeping all", group, err)
                    continue
                if found == set(mine):  # nothing reached: the output is computed without autograd
                    logger.warning("the %s output does not depend on any candidate layer under autograd; keeping all", group)
                    continue
                if found:
                    logger.info("%d %s layer(s) never reach the output and are not targets: %s", len(found), group,
                                ", ".join(sorted(found)[:4]))
                unreached |= found
            self._unreached_layers = unreached
        return [layer for layer in candidates if layer.name not in unreached]
