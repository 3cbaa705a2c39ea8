"""Survey of the model zoo: which towers of which architectures vlmpress can compress.

Every open_clip config is built on the ``meta`` device (no weights, no memory), wrapped in the
open_clip adapter and inventoried: target layers and the fraction of linear parameters they cover per
tower, convolutions kept dense, and whether every target is called as a module in a (meta) forward
pass -- the condition for calibration hooks and low-rank replacement to work. Used by
``scripts/zoo_table.py`` (the committed table under ``eval/zoo/``) and the zoo tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: a tower counts as covered when its targets hold at least this share of its linear parameters
MIN_COVERAGE = 0.9


@dataclass
class ZooRow:
    """One architecture's survey result."""

    source: str  # "open_clip" / "hf"
    name: str
    status: str  # "ok" | "partial" | "not built"
    reason: str = ""
    towers: dict[str, dict[str, Any]] = field(default_factory=dict)
    forward_check: str = "-"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "forward_check": self.forward_check,
            "towers": self.towers,
        }


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160]}" if text else type(err).__name__


def build_open_clip_meta(name: str):
    """An :class:`OpenClipAdapter` around ``name`` built on the meta device (no download, no memory)."""
    import open_clip

    from vlmpress.adapters.open_clip import OpenClipAdapter

    with torch.device("meta"):
        model = open_clip.create_model(name, pretrained=None, device="meta", pretrained_hf=False)
    adapter = OpenClipAdapter(
        model.eval(), f"open_clip:{name}", model_name=name, pretrained=None, preprocess=None, tokenizer=None
    )
    adapter.prepare_for_compression()
    return adapter


def _forward_check(adapter, targets) -> str:
    """Run both towers on meta inputs with hooks; 'ok', or which targets were never called."""
    import open_clip

    model = adapter.model
    called: set[str] = set()
    handles = [
        layer.module.register_forward_hook(lambda m, i, o, n=layer.name: called.add(n)) for layer in targets
    ]
    try:
        size = open_clip.get_model_preprocess_cfg(model).get("size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        context = getattr(adapter.model, "context_length", None) or getattr(
            getattr(adapter.model, "text", None), "context_length", 77
        )
        with torch.no_grad():
            model.encode_image(torch.zeros(1, 3, *size, device="meta"))
            model.encode_text(torch.zeros(1, context, dtype=torch.long, device="meta"))
    except Exception as err:  # meta tensors do not support every op (data-dependent shapes, .item())
        return f"n/a ({_first_line(err)})"
    finally:
        for h in handles:
            h.remove()
    missed = [layer.name for layer in targets if layer.name not in called]
    return "ok" if not missed else f"{len(missed)} targets not called as modules, e.g. {missed[0]}"


def survey_open_clip(name: str, *, forward: bool = True) -> ZooRow:
    """Inventory one open_clip config (see the module docstring)."""
    try:
        adapter = build_open_clip_meta(name)
    except Exception as err:  # noqa: BLE001 - the table records why a config does not build offline
        import open_clip

        hf_name = ((open_clip.get_model_config(name) or {}).get("text_cfg") or {}).get("hf_model_name")
        reason = _first_line(err)
        if hf_name and isinstance(err, OSError):
            reason = f"text tower is transformers '{hf_name}', whose config is not available offline ({reason[:60]}...)"
        return ZooRow("open_clip", name, "not built", reason)
    row = _inventory_row("open_clip", name, adapter)
    if forward:
        row.forward_check = _forward_check(adapter, adapter.target_layers())
        if row.forward_check != "ok" and not row.forward_check.startswith("n/a"):
            row.status = "partial"
            row.reason = "; ".join(filter(None, [row.reason, row.forward_check]))
    return row


def _inventory_row(source: str, name: str, adapter) -> ZooRow:
    targets = adapter.target_layers()
    inventory = adapter.tower_inventory([layer.name for layer in targets])
    row = ZooRow(source, name, "ok")
    problems = []
    for group, inv in inventory.items():
        kinds: dict[str, int] = {}
        for layer in targets:
            if layer.group == group:
                kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
        row.towers[group] = {
            "targets": inv.targeted_layers,
            "kinds": kinds,
            "linear_params": inv.linear_params,
            "targeted_params": inv.targeted_params,
            "coverage": round(inv.coverage, 4),
            "dense_convs": inv.conv_layers,
            "untargeted_linear": inv.untargeted_linear[:5],
        }
        if inv.targeted_layers == 0:
            problems.append(f"{group} tower has no compressible layer ({inv.describe()})")
        elif inv.coverage < MIN_COVERAGE:
            problems.append(f"{group} tower coverage {100 * inv.coverage:.1f}% < {100 * MIN_COVERAGE:.0f}%")
    if problems:
        row.status, row.reason = "partial", "; ".join(problems)
    return row


def open_clip_names() -> list[str]:
    import open_clip

    import vlmpress.adapters.open_clip  # noqa: F401 - registers vlmpress' own configs

    return list(open_clip.list_models())


def survey_hf_families() -> list[ZooRow]:
    """Every registered transformers dual-encoder family, built from its default config on meta."""
    from vlmpress.adapters.registry import get_adapter_class, known_adapters
    from vlmpress.adapters.hf_dual_encoder import HFDualEncoderAdapter

    rows = []
    for family in known_adapters():
        cls = get_adapter_class(family)
        if not (isinstance(cls, type) and issubclass(cls, HFDualEncoderAdapter)):
            continue
        name = f"{family} ({cls.model_class_name}, default config)"
        try:
            adapter = cls.build_meta()
        except Exception as err:  # noqa: BLE001 - recorded in the table
            rows.append(ZooRow("hf", name, "not built", _first_line(err)))
            continue
        row = _inventory_row("hf", name, adapter)
        if cls.exclude_patterns and row.status == "partial":
            row.reason += f" (by design: {', '.join(cls.exclude_patterns)} are not on the contrastive path)"
        rows.append(row)
    return rows
