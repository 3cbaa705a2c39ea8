"""Quantise the factors of a freshly compressed model (``--quantize int8|int4|fp8``).

Runs after factorisation, while the original weights (still held by the target layers) and the
calibration covariances are at hand, so each report row gets the activation error
``||(W - A_q B_q) X|| / ||W X||`` next to the low-rank error without quantisation.
"""

from __future__ import annotations

import logging

from vlmpress.adapters.base import TargetLayer, replace_module
from vlmpress.core.lowrank import LowRankLinear
from vlmpress.core.quantize import QuantizedLowRankLinear, activation_error, check_scheme_supported
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.pipeline.report import LayerReport

logger = logging.getLogger(__name__)


def quantize_compressed(
    adapter, layers: list[TargetLayer], reports: list[LayerReport], config: CompressionConfig, collectors: dict | None
) -> list[str]:
    """Replace every factorised layer by a :class:`QuantizedLowRankLinear`; returns their names.

    Fills ``quant_weight_error`` and (with calibration covariances) ``quant_act_error`` of the rows.
    """
    if config.quantize == "none":
        return []
    by_name = {layer.name: layer for layer in layers}
    done = []
    for row in reports:
        if row.rank is None:
            continue
        module = adapter.model.get_submodule(row.name)
        if not isinstance(module, LowRankLinear):
            continue
        check_scheme_supported(config.quantize, module.A.device)
        quantized = QuantizedLowRankLinear.from_lowrank(module, config.quantize, config.quantize_group_size)
        W = by_name[row.name].weight_matrix.detach()  # the original layer, replaced but still referenced
        W_hat = quantized.dense_weight().to(W.device)
        row.quant_weight_error = float((W.double() - W_hat).norm() / W.double().norm()) if W.abs().sum() > 0 else 0.0
        collector = (collectors or {}).get(row.group)
        if collector is not None:
            row.quant_act_error = activation_error(W, W_hat, collector.covariance(row.name))
        replace_module(adapter.model, row.name, quantized)
        done.append(row.name)
    logger.info("quantised the factors of %d layers to %s", len(done), config.quantize)
    return done


def quantization_map(model) -> dict | None:
    """What a checkpoint records to rebuild the quantised layers: scheme, group size, layer names."""
    from vlmpress.core.quantize import QuantizedLowRankLinear

    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLowRankLinear)}
    if not layers:
        return None
    first = next(iter(layers.values()))
    return {"scheme": first.A.scheme, "group_size": first.A.group_size, "layers": sorted(layers)}


def apply_quantization_map(model, qmap: dict) -> None:
    """Swap the named ``LowRankLinear`` layers for empty quantised shells of the same shapes
    (the state dict is loaded into them next)."""
    from vlmpress.core.quantize import QuantizedWeight

    scheme, group = qmap["scheme"], int(qmap.get("group_size", 64))
    for name in qmap["layers"]:
        module = model.get_submodule(name)
        if not isinstance(module, LowRankLinear):
            raise ValueError(f"layer '{name}' is recorded as quantised but has no rank in the checkpoint")
        shell = QuantizedLowRankLinear(
            QuantizedWeight(scheme, (module.out_features, module.rank), group),
            QuantizedWeight(scheme, (module.rank, module.in_features), group),
            module.bias,
        )
        replace_module(model, name, shell)


def quantize_dense_layers(
    adapter, layers: list[TargetLayer], scheme: str, group_size: int = 64, collectors: dict | None = None
) -> list[dict]:
    """Quantise the weights of the (still dense) target layers in place: the dense baseline at
    equal bytes. Returns one row per layer with its weight error and, given calibration
    covariances, its activation error ``||(W - W_q) X|| / ||W X||``."""
    from vlmpress.core.quantize import QuantizedLinear

    rows = []
    for layer in layers:
        module = adapter.model.get_submodule(layer.name)
        if isinstance(module, (LowRankLinear, QuantizedLowRankLinear, QuantizedLinear)):
            continue  # factorised or already quantised: not a dense layer any more
        W = layer.weight_matrix.detach()
        check_scheme_supported(scheme, W.device)
        quantized = QuantizedLinear.from_linear(module, scheme, group_size)
        W_hat = quantized.dense_weight().to(W.device)
        row = {"name": layer.name, "weight_error": float((W.double() - W_hat).norm() / W.double().norm()) if W.abs().sum() > 0 else 0.0}
        collector = (collectors or {}).get(layer.group)
        if collector is not None:
            row["act_error"] = activation_error(W, W_hat, collector.covariance(layer.name))
        replace_module(adapter.model, layer.name, quantized)
        rows.append(row)
    logger.info("quantised %d dense layers to %s", len(rows), scheme)
    return rows
