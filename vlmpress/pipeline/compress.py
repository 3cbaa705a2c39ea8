"""The compression pipeline: select layers, plan ranks, calibrate, factorise, swap in LowRankLinear.

    adapter = load_model("open_clip:ViT-B-16/openai")
    calib = build_calibration_set("images/", "captions.txt")
    report = compress(adapter, CompressionConfig(method="pgsvd", eps_v=0.3, eps_t=0.5), calib)

Ranks come from each weight's spectrum (data-agnostic, as in the paper); the activations (input
covariances gathered per group with that group's own modality) only refine the factors.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from vlmpress.adapters.base import ModelAdapter, TargetLayer, replace_module, select_targets
from vlmpress.pipeline.rank_plan import (
    LayerPlan,
    ranks_from_ratio,
    ranks_from_tolerances,
    ranks_for_target_ratio,
    reduction_of,
    tolerance_key,
    tolerances_for_target,
)
from vlmpress.pipeline.config import CompressionConfig, parse_device
from vlmpress.core.covariance import CovarianceCollector, gram
from vlmpress.core.lowrank import LowRankLinear
from vlmpress.core.rank import break_even_rank, saves_parameters
from vlmpress.core.batched import BATCHED_SOLVERS, BatchItem, plan_batches, solve_batched
from vlmpress.core.solvers import (
    Factorization,
    factorize,
    full_svd,
    gram_eigen,
    gram_singular_values,
)
from vlmpress.errors import CalibrationError, ConfigError
from vlmpress.pipeline.report import CompressionReport, LayerReport
from vlmpress.pipeline.footprint import model_footprint
from vlmpress.deploy.footprint import tensor_bytes_by_dtype

logger = logging.getLogger(__name__)

SVD_CACHE_BYTES = 4 * 2**30  # keep singular vectors from rank planning for the solvers up to this size
SOLVE_BATCH_BYTES = 2**30  # float64 working memory of one batched solve


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> CUDA when present, else CPU; anything else validated (see :func:`parse_device`)."""
    return parse_device(device)


def count_parameters(module: torch.nn.Module) -> int:
    """Distinct parameters of a module (tied weights counted once); a quantised matrix counts its
    elements (its codes are buffers, but they are the layer's weights)."""
    from vlmpress.core.quantize import QuantizedWeight

    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total + sum(m.shape[0] * m.shape[1] for m in module.modules() if isinstance(m, QuantizedWeight))


def _layer_bias(module: torch.nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


def layer_plan(layer: TargetLayer) -> LayerPlan:
    """What rank planning needs to know about a target layer (spectrum filled in later)."""
    return LayerPlan(layer.name, layer.group, layer.kind, *layer.weight_matrix.shape, _layer_bias(layer.module) is not None)


def check_finite_weights(model: torch.nn.Module) -> None:
    """Refuse a model holding NaN/inf weights before any calibration, naming the first such tensor.

    A non-finite weight anywhere (not only in a target layer) poisons every activation behind it.
    Buffers are not checked (attention masks hold -inf by design); offloaded tensors (on the
    ``meta`` device) are covered by the finite-factor check when their block is compressed.
    """
    for name, tensor in model.named_parameters():
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            layer = name.rsplit(".", 1)[0] if "." in name else name
            raise ConfigError(
                f"layer '{layer}' holds {bad} NaN/inf value(s) in '{name}'; the model is corrupt "
                "(expected finite weights: re-download or re-export it)"
            )


def select_layers(adapter: ModelAdapter, config: CompressionConfig) -> list[TargetLayer]:
    adapter.prepare_for_compression()
    check_finite_weights(adapter.model)
    candidates = adapter.target_layers()
    # an adapter's default excludes (e.g. an LLM's lm_head) apply unless targets are named explicitly
    exclude = list(config.exclude) + ([] if config.targets else list(getattr(adapter, "default_exclude", ())))
    selected = select_targets(candidates, config.targets, exclude)
    check_groups_have_targets(adapter, config, candidates, selected)
    if not selected:
        examples = ", ".join(layer.name for layer in candidates[:4])
        raise ConfigError(
            f"no layer matched targets={config.targets or ['<all>']} exclude={exclude or []}; "
            f"{len(candidates)} candidate layers, e.g. {examples}"
        )
    return selected


def _given_groups(adapter: ModelAdapter, config: CompressionConfig) -> dict[str, str]:
    """Group/kind -> what the config gives it explicitly (``eps-v=0.5``), plus every group for global settings."""
    given: dict[str, str] = {}
    for key, flag in (("vision", "eps_v"), ("text", "eps_t"), ("attn", "eps_attn"), ("mlp", "eps_mlp")):
        value = getattr(config, flag, None)
        if value is not None:
            given[key] = f"a tolerance ({flag.replace('_', '-')}={value})"
    if config.target_reduction is not None and config.allocation == "proportion":
        for key in config.eps_proportion:
            if key != "*":
                given.setdefault(key, f"a share of the target (eps-proportion {key}={config.eps_proportion[key]})")
    return given


def check_groups_have_targets(
    adapter: ModelAdapter, config: CompressionConfig, candidates: list[TargetLayer], selected: list[TargetLayer]
) -> None:
    """No silent skip: a group (or kind) the config gives a tolerance, ratio or target share must have targets.

    Groups named explicitly must have selected layers; with a global setting (``eps``, ``ratio``,
    ``target_reduction``) and no layer filter, every group of the adapter must have candidates.
    """
    given = _given_groups(adapter, config)
    filtered = bool(config.targets or config.exclude)
    if not filtered and (config.eps is not None or config.ratio is not None or config.target_reduction is not None):
        what = (
            f"a tolerance (eps={config.eps})" if config.eps is not None
            else f"a ratio ({config.ratio})" if config.ratio is not None
            else f"part of the target reduction ({config.target_reduction})"
        )
        # a group the adapter keeps dense by default (e.g. a VLM's projector) is not given a global setting
        default_kept = select_targets(candidates, None, list(getattr(adapter, "default_exclude", ())))
        for group in adapter.groups:
            dense_by_default = any(l.group == group for l in candidates) and not any(l.group == group for l in default_kept)
            if not dense_by_default:
                given.setdefault(group, what)
    kinds = {layer.kind for layer in candidates} | {"attn", "mlp"}
    for key, what in given.items():
        if key in adapter.groups:
            if any(layer.group == key for layer in selected):
                continue
            inventory = _inventory(adapter, candidates).get(key)
            found = inventory.describe() if inventory is not None else f"{sum(l.group == key for l in candidates)} candidate layers"
            where = f"group '{key}'"
        elif key in kinds:
            if any(layer.kind == key for layer in selected):
                continue
            found = f"{sum(l.kind == key for l in candidates)} candidate layers of kind '{key}'"
            where = f"layer kind '{key}'"
        else:
            raise ConfigError(
                f"model '{adapter.spec}' has no group '{key}' (it was given {what}); its groups are "
                f"{', '.join(adapter.groups)}"
            )
        raise ConfigError(
            f"{where} of model '{adapter.spec}' was given {what} but has no compressible layer "
            f"(found: {found}{', after targets/exclude filtering' if filtered else ''}); "
            "drop that setting or give tolerances only to groups that have layers"
        )


def _inventory(adapter: ModelAdapter, candidates: list[TargetLayer]) -> dict:
    try:
        return adapter.tower_inventory([layer.name for layer in candidates])
    except Exception as err:  # noqa: BLE001 - the inventory only enriches an error message
        logger.debug("no tower inventory for %s: %s", adapter.spec, err)
        return {}


def _spectrum_bytes(shape) -> int:
    """Cache cost of one layer's spectrum: float64 singular values + the smaller side's vectors."""
    d = min(shape)
    return 8 * d * (d + 1)


@dataclass
class WeightGram:
    """A tall weight's ``W^T W`` from rank planning, kept for the closed form's Cholesky-QR basis."""

    matrix: torch.Tensor


def layer_spectrum(
    W: torch.Tensor, device: torch.device, budget: int, keep: str | None = "vectors"
) -> tuple[torch.Tensor, tuple | WeightGram | None, int]:
    """(singular values, cached spectrum or None, bytes used) of one weight, float64 on ``device``.

    One ``eigh`` of the smaller-side Gram matrix gives the singular values. While the cache
    ``budget`` allows, ``keep="vectors"`` also keeps that side's singular vectors for the solvers
    (the other side is formed only if a solver needs it); ``keep="gram"`` computes values only and
    keeps a tall weight's Gram matrix (the closed form's basis needs it again); ``keep=None`` keeps
    nothing. Beyond the budget only the values are computed. Whole and sequential mode both call this, so their tolerance
    ranks are bit-identical.
    """
    n, m = W.shape
    W64 = W.detach().to(device=device, dtype=torch.float64)
    need = _spectrum_bytes(W.shape)
    if keep == "vectors" and need <= budget:
        S, vecs = gram_eigen(W64)
        return S, (S, vecs), need
    if keep == "gram" and n > m and need <= budget:
        G = gram(W64)  # a tall weight's smaller side
        return gram_singular_values(W64, G), WeightGram(G), need
    return gram_singular_values(W64), None, 0


def _spectra(
    layers: list[TargetLayer], device: torch.device, keep: str | None, batch_size: int = 1, batched: bool | None = None
) -> tuple[dict, dict, dict]:
    """Singular values per layer, with seconds spent; while they fit the cache budget, what the
    solvers reuse (``keep``: ``vectors`` or ``gram``, see :func:`layer_spectrum`; None: nothing).

    Off the CPU with ``batch_size`` > 1, same-shape layers whose vectors fit the budget share one
    batched ``eigh`` call (one launch and sync per batch); each member gets the same values as
    :func:`layer_spectrum` would give it alone, up to the device library's rounding.
    """
    values, cache, seconds = {}, {}, {}
    budget = SVD_CACHE_BYTES if keep else 0
    pending: dict[tuple[int, int], list[TargetLayer]] = {}

    def flush(group: list[TargetLayer]) -> None:
        t0 = time.perf_counter()
        W = torch.stack([layer.weight_matrix.detach().to(device=device, dtype=torch.float64) for layer in group])
        S, vecs = gram_eigen(W)
        share = (time.perf_counter() - t0) / len(group)
        for i, layer in enumerate(group):
            cache[layer.name] = (S[i], vecs[i])
            values[layer.name] = S[i].cpu()
            seconds[layer.name] = share

    if batched is None:
        batched = device.type != "cpu"
    batched = batched and batch_size > 1
    for layer in tqdm(layers, desc="spectra", unit="layer", leave=False):
        shape = tuple(layer.weight_matrix.shape)
        need = _spectrum_bytes(shape)
        if batched and keep == "vectors" and need <= budget:
            budget -= need
            pending.setdefault(shape, []).append(layer)
            if len(pending[shape]) >= batch_size:
                flush(pending.pop(shape))
            continue
        t0 = time.perf_counter()
        S, cached, used = layer_spectrum(layer.weight_matrix, device, budget, keep)
        budget -= used
        if cached is not None:
            cache[layer.name] = cached
        values[layer.name] = S.cpu()
        seconds[layer.name] = time.perf_counter() - t0
    for group in pending.values():
        flush(group)
    return values, cache, seconds


def plan_ranks(
    plans: list[LayerPlan], config: CompressionConfig, tolerances: dict[str, float] | None = None
) -> tuple[dict[str, int], dict[str, float], float | None]:
    """(ranks, tolerances used, ratio used) for the config's rank rule."""
    if config.rank_rule == "tolerance":
        if tolerances is None:
            if config.target_reduction is not None:
                if config.allocation == "shared":
                    weights = {"*": 1.0}
                elif config.allocation == "proportion":
                    weights = dict(config.eps_proportion)
                else:
                    raise ConfigError("allocation 'auto' is resolved by vlmpress.pipeline.auto_allocation.contrastive before planning")
                tolerances, _ = tolerances_for_target(plans, config.target_reduction, weights, config.rank_multiple)
            else:
                tolerances = config.group_tolerances()
        return ranks_from_tolerances(plans, tolerances, config.rank_multiple), tolerances, None
    if config.ratio is not None:
        return ranks_from_ratio(plans, config.ratio, config.rank_multiple), {}, config.ratio
    ranks, _ = ranks_for_target_ratio(plans, config.target_reduction, config.rank_multiple)
    return ranks, {}, config.target_reduction


def dense_layer_report(plan: LayerPlan, rank: int, tol: float | None, ratio: float | None) -> LayerReport:
    """Report row of a layer kept dense because its rank would not save parameters."""
    return LayerReport(
        plan.name, plan.group, plan.kind, plan.out_features, plan.in_features, None,
        f"dense (rank {rank} >= break-even {break_even_rank(plan.out_features, plan.in_features):.1f})",
        plan.dense_params, plan.dense_params, tol, ratio,
    )


def factorise_layer(
    adapter: ModelAdapter,
    layer: TargetLayer,
    plan: LayerPlan,
    rank: int,
    config: CompressionConfig,
    device: torch.device,
    *,
    tol: float | None,
    ratio: float | None,
    M: torch.Tensor | None,
    tokens: int | None,
    svd: tuple | None = None,
    extra_seconds: float = 0.0,
) -> LayerReport:
    """Factorise one layer with the config's solver and swap in a LowRankLinear (shared by all modes).

    ``svd``: the layer's cached spectrum from :func:`layer_spectrum` (singular values and the smaller
    side's vectors, or a tall weight's :class:`WeightGram`), or a full ``(U, S, Vh)``.
    """
    W = layer.weight_matrix.detach()
    t_layer = time.perf_counter()
    weight_gram = None
    if isinstance(svd, WeightGram):
        weight_gram, svd = svd.matrix, None
    elif svd is not None and len(svd) == 2:
        svd = full_svd(W.to(device), *svd)
    result = factorize(
        config.solver, W, rank, M, device=device, iters=config.als_iters, tol=config.als_tol,
        max_iters=config.als_max_iters, path=als_path(config, device), svd=svd, gram=weight_gram,
    )
    return install_factors(
        adapter, layer, plan, result, tol=tol, ratio=ratio, tokens=tokens,
        seconds=time.perf_counter() - t_layer + extra_seconds,
    )


def install_factors(
    adapter: ModelAdapter,
    layer: TargetLayer,
    plan: LayerPlan,
    result: Factorization,
    *,
    tol: float | None,
    ratio: float | None,
    tokens: int | None,
    seconds: float,
) -> LayerReport:
    """Swap a LowRankLinear built from ``result`` in for ``layer``; its report row."""
    W = layer.weight_matrix
    bias = _layer_bias(layer.module)
    new = LowRankLinear.from_factors(result.A, result.B, bias, dtype=W.dtype, device=W.device)
    if not all(torch.isfinite(p).all() for p in new.parameters()):
        raise FloatingPointError(f"non-finite factors for layer {layer.name}; the model was not modified further")
    replace_module(adapter.model, layer.name, new)
    return LayerReport(
        plan.name, plan.group, plan.kind, plan.out_features, plan.in_features, result.rank, "compressed",
        plan.dense_params, new.num_parameters(), tol, ratio, result.weight_rel_error,
        result.act_rel_error_init, result.act_rel_error, tokens, seconds,
        als_iters=result.info.get("iters") if result.method == "als" else None,
    )


def als_path(config: CompressionConfig, device: torch.device) -> str:
    """Tolerance-mode ALS path: the config's, else ``limit`` on CPU (an eigendecomposition of K costs
    less there than the SVD start's vectors plus the probing rounds: scripts/bench_compress.py)
    and ``rounds`` elsewhere (GPU rounds are cheap next to an eigendecomposition)."""
    if config.als_path != "auto":
        return config.als_path
    return "limit" if device.type == "cpu" else "rounds"


def needs_singular_vectors(config: CompressionConfig, device: torch.device) -> bool:
    """Whether the solver uses W's singular vectors (plain SVD, and the ALS start when rounds run)."""
    if config.solver == "svd":
        return True
    return config.solver == "als" and (config.als_iters is not None or als_path(config, device) == "rounds")


def solve_batch_size(config: CompressionConfig, device: torch.device) -> int:
    """Layers per batched solve: the config's value, else 32 on CUDA (one sync per round for the
    whole batch) and 1 on CPU, where batching saves no arithmetic (measured: scripts/bench_compress.py)."""
    if config.solve_batch_size is not None:
        return int(config.solve_batch_size)
    return 32 if device.type == "cuda" else 1


def factorise_batched(
    adapter: ModelAdapter,
    items: list[tuple[TargetLayer, LayerPlan, int, float | None]],
    config: CompressionConfig,
    device: torch.device,
    collectors: dict[str, CovarianceCollector],
    svd_cache: dict,
    svd_seconds: dict,
    ratio: float | None,
    progress=None,
) -> list[LayerReport]:
    """Factorise same-shape layers in batches (:mod:`vlmpress.core.batched`) and swap them in."""
    by_name = {layer.name: (layer, plan, rank, tol) for layer, plan, rank, tol in items}
    batches = plan_batches(
        [BatchItem(layer.name, tuple(layer.weight_matrix.shape), rank) for layer, _, rank, _ in items],
        solve_batch_size(config, device), max_bytes=SOLVE_BATCH_BYTES,
    )
    reports = []
    for batch in batches:
        members = [by_name[item.key] for item in batch]
        t0 = time.perf_counter()
        W = torch.stack([layer.weight_matrix.detach().to(device=device, dtype=torch.float64) for layer, *_ in members])
        M = torch.stack([collectors[layer.group].covariance(layer.name).to(device=device, dtype=torch.float64) for layer, *_ in members])
        cached = [svd_cache.pop(layer.name, None) for layer, *_ in members]
        spectra = grams = None
        if all(isinstance(c, tuple) and len(c) == 2 for c in cached):
            spectra = (torch.stack([c[0] for c in cached]).to(device), torch.stack([c[1] for c in cached]).to(device))
        elif all(isinstance(c, WeightGram) for c in cached):
            grams = torch.stack([c.matrix for c in cached]).to(device)
        results = solve_batched(
            config.solver, W, M, [rank for _, _, rank, _ in members], spectra=spectra, grams=grams,
            iters=config.als_iters, tol=config.als_tol, max_iters=config.als_max_iters, path=als_path(config, device),
        )
        del W, M, spectra, grams
        share = (time.perf_counter() - t0) / len(members)
        for (layer, plan, rank, tol), result in zip(members, results):
            collector = collectors[layer.group]
            reports.append(
                install_factors(
                    adapter, layer, plan, result, tol=tol, ratio=ratio, tokens=collector.token_count(layer.name),
                    seconds=share + svd_seconds.get(layer.name, 0.0),
                )
            )
            if progress is not None:
                progress.update()
    return reports


def _calibration_batches(adapter: ModelAdapter, group: str, calibration: Any, config: CompressionConfig) -> Iterable:
    modality = adapter.group_modality[group]
    if modality == "images":
        from vlmpress.data.calibration import image_batches

        if not calibration.images:
            raise CalibrationError(f"group '{group}' needs calibration images but none were given")
        return image_batches(calibration.images, adapter.preprocess, config.batch_size, config.num_workers)
    if modality == "texts":
        from vlmpress.data.calibration import caption_batches

        if not calibration.captions:
            raise CalibrationError(f"group '{group}' needs calibration captions but none were given")
        return caption_batches(calibration.captions, config.batch_size)
    if modality == "tokens":
        return adapter.token_batches(calibration, config.batch_size)  # type: ignore[attr-defined]
    raise ConfigError(f"adapter {adapter.family} declares unknown modality '{modality}' for group '{group}'")


def calibrate(
    adapter: ModelAdapter,
    layers: list[TargetLayer],
    calibration: Any,
    config: CompressionConfig,
    *,
    storage_device: torch.device | None = None,
) -> dict[str, CovarianceCollector]:
    """Collect input covariances for ``layers``, one pass per group with that group's data."""
    collectors: dict[str, CovarianceCollector] = {}
    by_group: dict[str, list[TargetLayer]] = {}
    for layer in layers:
        by_group.setdefault(layer.group, []).append(layer)
    model = adapter.model
    was_training = model.training
    model.eval()
    try:
        for group, group_layers in by_group.items():
            collector = CovarianceCollector(
                {layer.name: layer.module for layer in group_layers},
                accumulate_dtype=config.accumulate_dtype,
                storage_device=storage_device,
            )
            batches = _calibration_batches(adapter, group, calibration, config)
            with collector, torch.no_grad():
                for batch in tqdm(batches, desc=f"calibrate {group}", unit="batch", leave=False):
                    adapter.calibration_forward(group, batch, collector)
            collector.check_complete()
            collectors[group] = collector
    finally:
        model.train(was_training)
    return collectors


def compress(
    adapter: ModelAdapter,
    config: CompressionConfig,
    calibration: Any = None,
    *,
    tolerances: dict[str, float] | None = None,
    collectors: dict[str, CovarianceCollector] | None = None,
    spectra_cache: dict | None = None,
) -> CompressionReport:
    """Compress ``adapter.model`` in place according to ``config``; returns the per-layer report.

    ``tolerances`` overrides the config's tolerances (used by the auto allocation search),
    ``collectors`` reuses covariances gathered earlier on the same, still uncompressed model, and
    ``spectra_cache`` (filled on first use) reuses the weight SVDs across repeated compressions.
    """
    config.validate()
    t_start = time.perf_counter()
    device = resolve_device(config.device)
    layers = select_layers(adapter, config)
    whole_before = count_parameters(adapter.model)
    bytes_before = tensor_bytes_by_dtype(adapter.model)

    plans = [layer_plan(layer) for layer in layers]
    keep_vectors = needs_singular_vectors(config, device)
    # the closed form (SVD-LLM, ALS's limit) reuses a tall weight's Gram from rank planning
    keep = "vectors" if keep_vectors else "gram" if config.solver in BATCHED_SOLVERS else None
    t0 = time.perf_counter()
    if spectra_cache is not None and spectra_cache:
        svd_cache = dict(spectra_cache["svd"])
        svd_seconds = spectra_cache["seconds"]
        for plan in plans:
            plan.singular_values = spectra_cache["values"][plan.name]
    elif config.rank_rule == "tolerance" or keep_vectors:
        spectra, svd_cache, svd_seconds = _spectra(layers, device, keep, solve_batch_size(config, device))
        for plan in plans:
            plan.singular_values = spectra[plan.name]
        if spectra_cache is not None:
            spectra_cache.update(values=spectra, svd=dict(svd_cache), seconds=svd_seconds)
    else:
        svd_cache, svd_seconds = {}, {}
    t_spectra = time.perf_counter() - t0

    ranks, used_tolerances, ratio = plan_ranks(plans, config, tolerances)
    compressible = [
        (layer, plan) for layer, plan in zip(layers, plans) if saves_parameters(plan.out_features, plan.in_features, ranks[plan.name])
    ]
    logger.info(
        "%s: %d target layers, %d factorised (planned reduction of targeted parameters %.2f%%)",
        config.method,
        len(layers),
        len(compressible),
        100 * reduction_of(plans, ranks),
    )

    t0 = time.perf_counter()
    # plain SVD needs no data, but with calibration data its activation error is measured and reported
    measure = config.needs_activations or calibration is not None or collectors is not None
    if measure and compressible:
        if collectors is None:
            if calibration is None:
                raise CalibrationError(f"method {config.method} needs calibration data (images and captions)")
            collectors = calibrate(adapter, [layer for layer, _ in compressible], calibration, config)
    t_calib = time.perf_counter() - t0

    latency_kept: dict[str, tuple] = {}
    if config.latency_aware and compressible:
        from vlmpress.pipeline.latency_aware import latency_aware_ranks

        ranks, latency_kept, replanned = latency_aware_ranks(
            plans, ranks, {plan.name for _, plan in compressible}, {l.name: l.weight_matrix.dtype for l in layers},
            collectors, config, device, lambda ps, cfg: plan_ranks(ps, cfg),
        )
        used_tolerances, ratio = replanned.get("tolerances", used_tolerances), replanned.get("ratio", ratio)
        compressible = [(layer, plan) for layer, plan in compressible if plan.name not in latency_kept]

    reports: list[LayerReport] = []
    compressible_names = {layer.name for layer, _ in compressible}
    t0 = time.perf_counter()
    for layer, plan in zip(layers, plans):
        rank = ranks[plan.name]
        tol = used_tolerances[tolerance_key(plan, used_tolerances)] if used_tolerances else None
        if plan.name in latency_kept:
            from vlmpress.pipeline.latency_aware import latency_dense_report

            reports.append(latency_dense_report(plan, latency_kept[plan.name], tol, ratio))
        elif layer.name not in compressible_names:
            reports.append(dense_layer_report(plan, rank, tol, ratio))
    # activation-aware solves go through the batched solver (batches of one on CPU by default: same
    # arithmetic as per-layer, and the singular vectors from rank planning are used as they are)
    batched = collectors is not None and config.solver in BATCHED_SOLVERS
    with tqdm(total=len(compressible), desc="factorise", unit="layer", leave=False) as progress:
        if batched:
            items = [
                (layer, plan, ranks[plan.name], used_tolerances[tolerance_key(plan, used_tolerances)] if used_tolerances else None)
                for layer, plan in compressible
            ]
            reports += factorise_batched(adapter, items, config, device, collectors, svd_cache, svd_seconds, ratio, progress)
        else:
            for layer, plan in compressible:
                rank = ranks[plan.name]
                tol = used_tolerances[tolerance_key(plan, used_tolerances)] if used_tolerances else None
                M, tokens = None, None
                if collectors is not None:
                    collector = collectors[layer.group]
                    M = collector.covariance(layer.name)
                    tokens = collector.token_count(layer.name)
                reports.append(
                    factorise_layer(
                        adapter, layer, plan, rank, config, device, tol=tol, ratio=ratio, M=M, tokens=tokens,
                        svd=svd_cache.pop(layer.name, None), extra_seconds=svd_seconds.get(layer.name, 0.0),
                    )
                )
                progress.update()
    t_factor = time.perf_counter() - t0
    if config.quantize != "none":
        from vlmpress.pipeline.quantize import quantize_compressed

        quantize_compressed(adapter, layers, reports, config, collectors)
    report = finish_report(
        adapter, config, layers, reports, used_tolerances, ratio, whole_before, calibration,
        {"spectra": t_spectra, "calibration": t_calib, "factorisation": t_factor, "total": time.perf_counter() - t_start},
    )
    first_batch = (lambda group: next(iter(_calibration_batches(adapter, group, calibration, config)))) if calibration is not None else None
    report.footprint = model_footprint(adapter, bytes_before, first_batch, config.batch_size)
    return report


def finish_report(
    adapter: ModelAdapter,
    config: CompressionConfig,
    layers: list[TargetLayer],
    reports: list[LayerReport],
    tolerances: dict[str, float],
    ratio: float | None,
    whole_before: int,
    calibration: Any,
    seconds: dict[str, float],
    calibration_extra: dict | None = None,
) -> CompressionReport:
    """The run's :class:`CompressionReport` (layers in model order), also attached to the adapter."""
    order = {layer.name: i for i, layer in enumerate(layers)}
    reports.sort(key=lambda r: order[r.name])
    # record only tolerances that were applied to at least one layer (no phantom group settings)
    tolerances = {key: value for key, value in tolerances.items() if any(tolerance_key(l, tolerances) == key for l in layers)}
    calib_info = calibration.describe() if calibration is not None and hasattr(calibration, "describe") else {}
    if calib_info and calibration_extra:
        calib_info = {**calib_info, **calibration_extra}
    report = CompressionReport(
        model=adapter.spec,
        method=config.method,
        solver=config.solver,
        rank_rule=config.rank_rule,
        layers=reports,
        tolerances=tolerances,
        ratio=ratio,
        target_reduction=config.target_reduction,
        allocation=config.allocation if config.target_reduction is not None and config.rank_rule == "tolerance" else None,
        whole_model_params_before=whole_before,
        whole_model_params_after=count_parameters(adapter.model),
        calibration=calib_info,
        seconds=seconds,
        config=config.to_dict(),
        coverage=tower_coverage(adapter, reports),
    )
    adapter.compression_report = report  # type: ignore[attr-defined]
    return report


def tower_coverage(adapter: ModelAdapter, reports: list[LayerReport]) -> dict[str, dict]:
    """Per tower: share of its linear parameters that were targeted, and what stayed dense."""
    try:
        inventory = adapter.tower_inventory([r.name for r in reports])
    except Exception as err:  # noqa: BLE001 - reporting must not fail a finished compression
        logger.debug("no tower inventory for %s: %s", adapter.spec, err)
        return {}
    out = {}
    for group, inv in inventory.items():
        targeted = sum(r.params_before for r in reports if r.group == group)
        untargeted = inv.linear_params - inv.targeted_params  # untouched layers: sizes unchanged
        total = targeted + untargeted
        out[group] = {
            "linear_params": total,
            "targeted_params": targeted,
            "targeted_fraction": targeted / total if total else 0.0,
            "untargeted_linear": inv.untargeted_linear,
            "dense_convs": inv.dense_convs,
            "conv_params": inv.conv_params,
        }
    return out


def load_calibration(adapter_cls, config: CompressionConfig):
    """Calibration data for an adapter family, resolved from the config (before the model loads).

    Vision-language families get images + captions; families that calibrate on token windows
    (LLMs) provide ``load_calibration(config)`` themselves.
    """
    names_data = any(getattr(config, k) for k in ("calib_images", "calib_captions", "calib_text"))
    if not config.needs_activations and not names_data:
        return None  # data-free (plain SVD); given data, its activation error is measured
    modalities = set(adapter_cls.group_modality.values())
    if "tokens" in modalities:
        return adapter_cls.load_calibration(config)  # type: ignore[attr-defined]
    from vlmpress.data.calibration import build_calibration_set

    return build_calibration_set(
        config.calib_images,
        config.calib_captions,
        n_images=config.n_images,
        n_captions=config.n_captions,
        seed=config.seed,
        data_root=config.data_root,
        need_images="images" in modalities,
        need_captions="texts" in modalities,
        split_file=config.calib_split_file,
    )
