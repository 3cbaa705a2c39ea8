"""Per-layer compression report: JSON, CSV and a printed table."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlmpress.io import atomic_write_text


@dataclass
class LayerReport:
    name: str
    group: str
    kind: str
    out_features: int
    in_features: int
    rank: int | None  # None: kept dense
    status: str  # "compressed" or "dense (...reason...)"
    params_before: int
    params_after: int
    tolerance: float | None = None
    ratio: float | None = None
    weight_error: float | None = None
    act_error_init: float | None = None  # activation error of the SVD start (before ALS)
    act_error: float | None = None  # activation error of the returned factors
    tokens: int | None = None  # calibration tokens seen by the layer
    seconds: float = 0.0
    als_iters: int | None = None  # ALS rounds run (None: not an ALS solve)
    quant_weight_error: float | None = None  # ||W - A_q B_q|| / ||W|| with quantised factors
    quant_act_error: float | None = None  # ||(W - A_q B_q) X|| / ||W X|| with quantised factors

    @property
    def shape(self) -> str:
        return f"{self.out_features}x{self.in_features}"


@dataclass
class CompressionReport:
    model: str
    method: str
    solver: str
    rank_rule: str
    layers: list[LayerReport] = field(default_factory=list)
    tolerances: dict[str, float] = field(default_factory=dict)
    ratio: float | None = None
    target_reduction: float | None = None
    allocation: str | None = None
    whole_model_params_before: int = 0
    whole_model_params_after: int = 0
    calibration: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    #: per tower: linear params, targeted share, layers kept dense (untargeted linears, convolutions)
    coverage: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: bytes: tensor bytes by dtype before/after, peak forward memory per group, bytes on disk (at save)
    footprint: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ totals
    def group_totals(self) -> dict[str, dict[str, Any]]:
        groups: dict[str, dict[str, Any]] = {}
        for layer in self.layers:
            g = groups.setdefault(
                layer.group, {"layers": 0, "compressed": 0, "params_before": 0, "params_after": 0, "seconds": 0.0}
            )
            g["layers"] += 1
            g["compressed"] += layer.rank is not None
            g["params_before"] += layer.params_before
            g["params_after"] += layer.params_after
            g["seconds"] += layer.seconds
        for g in groups.values():
            g["reduction"] = 1 - g["params_after"] / g["params_before"] if g["params_before"] else 0.0
        return groups

    @property
    def targeted_params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def targeted_params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def targeted_reduction(self) -> float:
        before = self.targeted_params_before
        return 1 - self.targeted_params_after / before if before else 0.0

    @property
    def whole_model_reduction(self) -> float:
        before = self.whole_model_params_before
        return 1 - self.whole_model_params_after / before if before else 0.0

    @property
    def rank_map(self) -> dict[str, int]:
        return {layer.name: layer.rank for layer in self.layers if layer.rank is not None}

    @property
    def dense_layers(self) -> dict[str, str]:
        return {layer.name: layer.status for layer in self.layers if layer.rank is None}

    @property
    def latency_dense_layers(self) -> list[str]:
        """Layers kept dense by ``--latency-aware`` because their factorisation ran slower."""
        return [layer.name for layer in self.layers if layer.rank is None and layer.status.startswith("dense (latency")]

    def summary(self) -> dict[str, Any]:
        """The block stored in ``vlmpress_config.json`` and in evaluation results."""
        return {
            "model": self.model,
            "method": self.method,
            "tolerances": self.tolerances,
            "ratio": self.ratio,
            "target_reduction": self.target_reduction,
            "allocation": self.allocation,
            "targeted_params_before": self.targeted_params_before,
            "targeted_params_after": self.targeted_params_after,
            "targeted_reduction": self.targeted_reduction,
            "whole_model_params_before": self.whole_model_params_before,
            "whole_model_params_after": self.whole_model_params_after,
            "whole_model_reduction": self.whole_model_reduction,
            "groups": self.group_totals(),
            "n_layers_compressed": len(self.rank_map),
            "n_layers_dense": len(self.dense_layers),
            "latency_dense_layers": self.latency_dense_layers,
            "calibration": self.calibration,
            "seconds": self.seconds,
            "coverage": self.coverage,
            "bound_hits": self.bound_hits(),
            "footprint": self.footprint,
        }

    def bound_hits(self) -> list[str]:
        """Where what ran differs from what was asked: a tolerance at a bound (0 or the cap 1),
        a fixed tolerance split distorted by the cap, a target reduction not met.

        A tolerance at 1 gives its layers rank 1, so a requested split like 1:1.5 silently becomes
        another one; suites flag such rows in their tables and logs.
        """
        hits = []
        for key, eps in sorted(self.tolerances.items()):
            name = "eps" if key == "*" else f"eps_{key}"
            if eps >= 1.0 - 1e-9:
                hits.append(f"{name} hit its cap 1.0 (those layers got the smallest rank)")
            elif eps <= 0.0:
                hits.append(f"{name} is 0 (those layers stay exact/dense)")
        proportion = (self.config or {}).get("eps_proportion") or {}
        if self.allocation == "proportion" and len(self.tolerances) > 1 and proportion:
            keys = [k for k in self.tolerances if k in proportion]
            if len(keys) > 1:
                want = [proportion[k] / proportion[keys[0]] for k in keys]
                got = [self.tolerances[k] / self.tolerances[keys[0]] if self.tolerances[keys[0]] else float("inf") for k in keys]
                if any(abs(w - g) > 1e-6 * max(1.0, abs(w)) for w, g in zip(want, got)):
                    ran = ":".join(f"{self.tolerances[k]:.3g}" for k in keys)
                    asked = ":".join(f"{proportion[k]:.3g}" for k in keys)
                    hits.append(f"ran eps {'/'.join(keys)} = {ran}, not the requested proportion {asked}")
        if self.target_reduction is not None and abs(self.targeted_reduction - self.target_reduction) > 0.005:
            hits.append(
                f"reached {100 * self.targeted_reduction:.1f}% reduction, not the {100 * self.target_reduction:.1f}% target"
            )
        return hits

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "config": self.config, "layers": [asdict(layer) for layer in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_csv(self) -> str:
        buf = io.StringIO()
        fields = list(LayerReport.__dataclass_fields__)
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        for layer in self.layers:
            writer.writerow(asdict(layer))
        return buf.getvalue()

    def write(self, out_dir: str | Path, stem: str = "compression_report") -> tuple[Path, Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
        atomic_write_text(json_path, self.to_json())
        atomic_write_text(csv_path, self.to_csv())
        return json_path, csv_path

    def format_table(self, max_rows: int | None = None) -> str:
        """Human-readable per-layer table plus group and model totals (:meth:`format_summary`)."""

        def fmt(x: float | None, spec: str = ".4f") -> str:
            return "-" if x is None else format(x, spec)

        rows = self.layers if max_rows is None else self.layers[:max_rows]
        width = max([len("layer")] + [len(l.name) for l in rows])  # never cut names: they identify layers
        gwidth = max([len("group")] + [len(l.group) for l in rows])
        head = (
            f"{'layer':<{width}} {'group':<{gwidth}} {'shape':>11} {'rank':>6} {'params':>19} {'w.err':>7} "
            f"{'act0':>7} {'act':>7} {'iters':>5} {'sec':>6}"
        )
        lines = [head, "-" * len(head)]
        for l in rows:
            rank = str(l.rank) if l.rank is not None else "dense"
            params = f"{l.params_before}->{l.params_after}"
            lines.append(
                f"{l.name:<{width}} {l.group:<{gwidth}} {l.shape:>11} {rank:>6} {params:>19} {fmt(l.weight_error):>7} "
                f"{fmt(l.act_error_init):>7} {fmt(l.act_error):>7} {fmt(l.als_iters, 'd'):>5} {l.seconds:>6.2f}"
            )
        if max_rows is not None and len(self.layers) > max_rows:
            lines.append(f"... {len(self.layers) - max_rows} more layers (see the CSV report)")
        lines.append("")
        lines.append(self.format_summary())
        return "\n".join(lines)

    def group_tolerance_text(self, group: str) -> str:
        """Every tolerance a group's layers used: 'eps=0.3000' or 'eps attn=0.3000, mlp=0.4500'."""
        used: dict[str, float] = {}
        for layer in self.layers:
            if layer.group == group and layer.tolerance is not None:
                used.setdefault(layer.kind, layer.tolerance)
        values = set(used.values())
        if not values:
            eps = self.tolerances.get(group, self.tolerances.get("*"))
            return f", eps={eps:.4f}" if eps is not None else ""
        if len(values) == 1:
            return f", eps={values.pop():.4f}"
        return ", eps " + ", ".join(f"{kind}={value:.4f}" for kind, value in sorted(used.items()))

    def footprint_lines(self) -> list[str]:
        """Bytes and memory lines of the summary (empty when not measured)."""
        from vlmpress.deploy.footprint import format_bytes

        fp = self.footprint or {}
        if not fp:
            return []
        by_dtype = ", ".join(f"{k} {format_bytes(v)}" for k, v in fp.get("tensor_bytes_by_dtype_after", {}).items())
        lines = [
            f"bytes             : {format_bytes(fp['tensor_bytes_before'])} -> {format_bytes(fp['tensor_bytes_after'])} "
            f"in tensors ({by_dtype})" + (f"; {format_bytes(fp['bytes_on_disk'])} on disk" if "bytes_on_disk" in fp else "")
        ]
        if fp.get("peak_forward_bytes"):
            peaks = ", ".join(f"{g} {format_bytes(v)}" for g, v in fp["peak_forward_bytes"].items())
            lines.append(f"peak forward mem  : {peaks} (batch {fp['peak_forward_batch']}, {fp['peak_forward_device']}, above the weights)")
        return lines

    def format_summary(self) -> str:
        """Group and model totals (what ``vlmpress compress -q`` prints)."""
        lines = []
        gwidth = max([8] + [len(g) for g in self.group_totals()])
        for group, t in self.group_totals().items():
            lines.append(
                f"group {group:<{gwidth}}: {t['compressed']}/{t['layers']} layers factorised, "
                f"params {t['params_before']:,} -> {t['params_after']:,} ({100 * t['reduction']:.1f}% removed"
                f"{self.group_tolerance_text(group)})"
            )
        lines.append(
            f"targeted layers   : {self.targeted_params_before:,} -> {self.targeted_params_after:,} params "
            f"({100 * self.targeted_reduction:.2f}% removed)"
        )
        lines.append(
            f"whole model       : {self.whole_model_params_before:,} -> {self.whole_model_params_after:,} params "
            f"({100 * self.whole_model_reduction:.2f}% removed)"
        )
        latency = self.latency_dense_layers
        if len(self.dense_layers) > len(latency):
            lines.append(f"kept dense        : {len(self.dense_layers) - len(latency)} layers whose rank would not save parameters")
        if latency:
            shown = ", ".join(latency[:4]) + (f" (+{len(latency) - 4} more)" if len(latency) > 4 else "")
            lines.append(f"kept dense        : {len(latency)} layers where low-rank ran slower on the device: {shown}")
        for hit in self.bound_hits():
            lines.append(f"WARNING           : {hit}")
        quantized = [l for l in self.layers if l.quant_weight_error is not None]
        if quantized:
            scheme = (self.config or {}).get("quantize", "?")
            act = [l for l in quantized if l.quant_act_error is not None and l.act_error is not None]
            errors = (
                f"; mean activation error {sum(l.quant_act_error for l in act) / len(act):.4f} "
                f"(low-rank alone {sum(l.act_error for l in act) / len(act):.4f})" if act else ""
            )
            lines.append(f"quantised         : {scheme} factors in {len(quantized)} layers{errors}")
        lines += self.footprint_lines()
        skipped = (self.calibration or {}).get("skipped_images")
        if skipped:
            lines.append(
                f"calibration       : {skipped} unreadable image(s) skipped (first: {self.calibration.get('first_skipped_image')})"
            )
        for group, cov in self.coverage.items():
            convs = f", {len(cov['dense_convs'])} convolutions kept dense" if cov.get("dense_convs") else ""
            lines.append(
                f"tower {group:<8}: {100 * cov['targeted_fraction']:.1f}% of {cov['linear_params']:,} linear params targeted{convs}"
            )
        return "\n".join(lines)
