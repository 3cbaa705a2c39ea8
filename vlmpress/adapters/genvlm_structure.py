"""Where a transformers generative VLM keeps its parts, read from the module tree and the config.

transformers 5 builds image-text-to-text models from a few standard submodules: a vision tower
(``vision_tower`` / ``visual`` / ``vision_model``), a connector (``multi_modal_projector``,
``connector``, a merger inside the tower, or a Q-Former + ``language_projection``) and a decoder
LM (``language_model``, with ``text_config``). :func:`find_parts` locates them and
:func:`classify_linears` puts every ``nn.Linear`` into a group with a kind:

* ``vision`` -- linears of the tower's transformer blocks (only blocks up to the config's
  ``vision_feature_layer`` where the model reads an intermediate layer);
* ``qformer`` -- a Q-Former's linears (BLIP-2 / InstructBLIP), a group of its own;
* ``projector`` -- every other linear between the tower and the LM (projectors, pixel-shuffle
  connectors, patch mergers, a tower's unused heads);
* ``text`` -- the decoder LM's blocks, kinds ``attn`` / ``mlp`` / ``cross_attn`` (Mllama's image
  cross-attention layers), plus an untied ``lm_head`` (kind ``head``).

No ``model_type`` table: a family is covered when its modules follow these conventions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from vlmpress.adapters.layers import TargetLayer
from vlmpress.adapters.hf_causal_lm import UnsupportedArchitectureError

VISION_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder", "image_encoder", "image_tower")
LANGUAGE_NAMES = ("language_model", "text_model", "llm", "text_decoder")
QFORMER_NAMES = ("qformer",)
BLOCK_LIST_NAMES = ("layers", "layer", "h", "blocks")
_ATTN_PARTS = {"self_attn", "attn", "attention", "self_attention", "selfattention"}
_CROSS_PARTS = {"cross_attn", "crossattention", "cross_attention", "encoder_attn"}
_KV_NAMES = {"k_proj", "v_proj", "key", "value", "kv_proj"}


@dataclass(frozen=True)
class VLMParts:
    """Dotted paths of a generative VLM's parts (``qformer`` is empty when it has none)."""

    vision: str
    language: str
    qformer: str = ""


def _child(model: nn.Module, names: Sequence[str]) -> str | None:
    """The dotted path of the first of ``names`` found on the model or on its inner ``model``."""
    for owner in ("", "model."):
        for name in names:
            path = owner + name
            try:
                model.get_submodule(path)
            except AttributeError:
                continue
            return path
    return None


def find_parts(model: nn.Module) -> VLMParts:
    """The vision tower, the language model and a Q-Former, by transformers' standard names."""
    vision, language = _child(model, VISION_NAMES), _child(model, LANGUAGE_NAMES)
    if vision is None or language is None:
        missing = "vision tower" if vision is None else "language model"
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no {missing} under the standard names "
            f"({', '.join(VISION_NAMES if vision is None else LANGUAGE_NAMES)}); the generative base cannot read its "
            "structure: subclass vlmpress.adapters.hf_generative.HFGenerativeVLMAdapter (see docs/generative-vlms.md)"
        )
    return VLMParts(vision, language, _child(model, QFORMER_NAMES) or "")


def block_lists(module: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every ``ModuleList`` named like a block list inside ``module`` (not nested in another), in order."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES and len(child):
            if not any(name.startswith(prefix + ".") for prefix, _ in found):
                found.append((name, child))
    return found


def block_list(module: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The first block list inside ``module`` (its transformer blocks)."""
    found = block_lists(module)
    return found[0] if found else None


def kind_of(path: str) -> str:
    """``cross_attn`` / ``attn`` / ``mlp`` from a linear's dotted path inside its block."""
    parts = {p.lower() for p in path.split(".")}
    if parts & _CROSS_PARTS:
        return "cross_attn"
    return "attn" if parts & _ATTN_PARTS else "mlp"


def reads_other_sequence(layer: TargetLayer) -> bool:
    """A cross-attention key/value projection: its rows are image tokens, not the text positions."""
    return layer.kind == "cross_attn" and layer.name.rsplit(".", 1)[-1] in _KV_NAMES


def used_blocks(n_blocks: int, feature_layer) -> int:
    """Blocks up to the deepest ``vision_feature_layer`` (hidden_states[k] is block k-1's output)."""
    if feature_layer is None:
        return n_blocks
    indices = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
    resolved = [k if k >= 0 else n_blocks + 1 + k for k in indices if isinstance(k, int)]
    return max(0, min(n_blocks, max(resolved))) if resolved else n_blocks


def _linears(module: nn.Module, prefix: str) -> list[tuple[str, nn.Linear]]:
    if isinstance(module, nn.Linear):
        return [(prefix, module)]
    return [(f"{prefix}.{n}", m) for n, m in module.named_modules() if n and isinstance(m, nn.Linear)]


def classify_linears(model: nn.Module, parts: VLMParts, *, vision_feature_layer=None) -> list[TargetLayer]:
    """Every linear of the model as a :class:`TargetLayer` (order: vision, qformer, projector, text, head)."""
    out: dict[str, list[TargetLayer]] = {"vision": [], "qformer": [], "projector": [], "text": []}
    claimed: set[int] = set()

    def add(group: str, name: str, module: nn.Linear, kind: str) -> None:
        if id(module) not in claimed:
            claimed.add(id(module))
            out[group].append(TargetLayer(name, group, kind, module))

    tower = model.get_submodule(parts.vision)
    stacks = block_lists(tower)
    for n_stack, (path, blocks) in enumerate(stacks):
        # the main stack (the first) may be read at an intermediate layer; later stacks (Mllama's global one) run whole
        used = used_blocks(len(blocks), vision_feature_layer) if n_stack == 0 else len(blocks)
        for i, block in enumerate(list(blocks)[:used]):
            for name, module in _linears(block, f"{parts.vision}.{path}.{i}"):
                add("vision", name, module, kind_of(name[len(parts.vision) + 1 :]))
        for block in list(blocks)[used:]:  # unused blocks are never targets
            claimed.update(id(m) for m in block.modules() if isinstance(m, nn.Linear))
    if not stacks:  # a tower without a block list: every linear layer
        for name, module in _linears(tower, parts.vision):
            add("vision", name, module, kind_of(name))
    if parts.qformer:
        for name, module in _linears(model.get_submodule(parts.qformer), parts.qformer):
            add("qformer", name, module, kind_of(name))
    lm = model.get_submodule(parts.language)
    found = block_list(lm)
    if found is None:
        raise UnsupportedArchitectureError(f"cannot find the decoder blocks of {type(lm).__name__}")
    path, blocks = found
    text_blocks = [(f"{parts.language}.{path}.{i}", block) for i, block in enumerate(blocks)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = isinstance(head, nn.Linear) and head.weight is getattr(emb, "weight", None)
    skip = {id(head)} if isinstance(head, nn.Linear) else set()
    # connector: linears that are neither tower blocks, Q-Former, LM blocks nor the head
    lm_ids = {id(m) for _, b in text_blocks for m in b.modules()} | {id(m) for m in lm.modules()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module) not in claimed and id(module) not in lm_ids and id(module) not in skip:
            add("projector", name, module, "mlp")
    for prefix, block in text_blocks:
        for name, module in _linears(block, prefix):
            add("text", name, module, kind_of(name[len(prefix) + 1 :]))
    layers = out["vision"] + out["qformer"] + out["projector"] + out["text"]
    if isinstance(head, nn.Linear) and not tied:
        name = next(n for n, m in model.named_modules() if m is head)
        layers.append(TargetLayer(name, "text", "head", head))
    return layers


def decoder_blocks(model: nn.Module, parts: VLMParts) -> list[tuple[str, nn.Module]]:
    """(dotted path, module) of every decoder LM block, in execution order."""
    lm = model.get_submodule(parts.language)
    found = block_list(lm)
    if found is None:
        raise UnsupportedArchitectureError(f"cannot find the decoder blocks of {type(lm).__name__}")
    path, blocks = found
    return [(f"{parts.language}.{path}.{i}", block) for i, block in enumerate(blocks)]


__all__ = ["VLMParts", "block_list", "block_lists", "classify_linears", "decoder_blocks", "find_parts", "kind_of", "reads_other_sequence", "used_blocks"]
