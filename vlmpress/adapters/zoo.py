"""Zoo table rows: what one architecture's survey found (used by :mod:`vlmpress.testing.zoo`).

The survey itself -- shrinking each family and running a real compression round trip -- needs the
pipeline, so it lives in :mod:`vlmpress.testing.zoo`; this module holds the row type and the
per-tower inventory cells, which only need an adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ZooRow:
    """One architecture's survey result."""

    source: str  # "open_clip" / "hf" / "hf-image-text-to-text"
    name: str
    status: str  # "ok" | "failed" | "not built"
    reason: str = ""
    towers: dict[str, dict[str, Any]] = field(default_factory=dict)
    forward_check: str = "-"
    seconds: float = 0.0

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
            "seconds": self.seconds,
            "towers": self.towers,
        }


def first_line(err: BaseException) -> str:
    """``Type: first line of the message`` (table cells hold one line)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160]}" if text else type(err).__name__


def inventory_cells(adapter, targets) -> dict[str, dict[str, Any]]:
    """Per group: targets, their kinds, the share of the group's linear parameters they hold, dense convs."""
    inventory = adapter.tower_inventory([layer.name for layer in targets])
    cells = {}
    for group, inv in inventory.items():
        kinds: dict[str, int] = {}
        for layer in targets:
            if layer.group == group:
                kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
        cells[group] = {
            "targets": inv.targeted_layers, "kinds": kinds, "linear_params": inv.linear_params,
            "targeted_params": inv.targeted_params, "coverage": round(inv.coverage, 4),
            "dense_convs": inv.conv_layers, "untargeted_linear": inv.untargeted_linear[:5],
        }
    return cells


def open_clip_names() -> list[str]:
    import open_clip

    import vlmpress.adapters.open_clip  # noqa: F401 - registers vlmpress' own configs

    return list(open_clip.list_models())
