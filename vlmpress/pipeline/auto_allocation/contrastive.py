"""``allocation: auto`` -- choose how a target reduction is split between the vision and text towers.

The paper fixes eps_v and eps_t by hand and names learning tolerances from data as future work.
Here the split is searched on a calibration-only proxy: the calibration images and captions are
divided into a *fit* part (covariances) and a *held-out* part (scoring). For each candidate
proportion rho = eps_v / eps_t the tolerances meeting the target reduction are solved by
bisection, a copy of the model is compressed, and the candidate is scored by how far the
compressed model's zero-shot distribution over the held-out captions (or class prompts) moves
from the original's: mean KL(p_original || p_compressed) over held-out images. No label of any
evaluation set is ever seen. Covariances and weight SVDs are computed once and reused.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from vlmpress.adapters.base import VisionLanguageAdapter
from vlmpress.pipeline.compress import calibrate, compress, select_layers
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.data.calibration import CalibrationSet, image_batches
from vlmpress.errors import ConfigError
from vlmpress.pipeline.report import CompressionReport

logger = logging.getLogger(__name__)

DEFAULT_PROPORTIONS = (0.4, 0.55, 0.7, 0.85, 1.0, 1.2, 1.45, 1.8, 2.5)  # rho = eps_v / eps_t
HELD_OUT_FRACTION = 0.25


@dataclass
class Candidate:
    proportion: float
    tolerances: dict[str, float]
    planned_reduction: float
    score: float
    agreement: float


@dataclass
class AutoAllocationResult:
    best: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    held_out: dict = field(default_factory=dict)


def split_calibration(calibration: CalibrationSet, fraction: float = HELD_OUT_FRACTION) -> tuple[CalibrationSet, CalibrationSet]:
    """Deterministic fit / held-out split (every k-th item is held out)."""
    k = max(2, round(1 / fraction))
    fit = CalibrationSet(
        [x for i, x in enumerate(calibration.images) if i % k],
        [x for i, x in enumerate(calibration.captions) if i % k],
        calibration.image_source + " (fit part)",
        calibration.caption_source + " (fit part)",
        calibration.class_names,
    )
    held = CalibrationSet(
        [x for i, x in enumerate(calibration.images) if not i % k],
        [x for i, x in enumerate(calibration.captions) if not i % k],
        calibration.image_source + " (held-out part)",
        calibration.caption_source + " (held-out part)",
        calibration.class_names,
    )
    if not held.images or not fit.images:
        raise ConfigError("auto allocation needs at least 2 calibration images (fit + held-out)")
    return fit, held


def _prompt_texts(held: CalibrationSet) -> list[str]:
    if held.class_names:
        return [f"a photo of a {name}." for name in held.class_names]
    return list(dict.fromkeys(held.captions))


@torch.no_grad()
def _embeddings(adapter: VisionLanguageAdapter, held: CalibrationSet, texts: Sequence[str], batch_size: int):
    images = torch.cat([adapter.encode_image(b.to(adapter.device)) for b in image_batches(held.images, adapter.preprocess, batch_size)])
    txt = torch.cat([adapter.encode_text(adapter.tokenize(list(texts[i : i + batch_size]))) for i in range(0, len(texts), batch_size)])
    return F.normalize(images.float(), dim=-1), F.normalize(txt.float(), dim=-1)


def kl_score(reference: tuple[torch.Tensor, torch.Tensor], candidate: tuple[torch.Tensor, torch.Tensor], scale: float):
    """(mean KL(p_ref || p_cand), top-1 agreement) of image->text distributions."""
    log_p = F.log_softmax(scale * reference[0] @ reference[1].T, dim=-1)
    log_q = F.log_softmax(scale * candidate[0] @ candidate[1].T, dim=-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    agreement = float((log_p.argmax(-1) == log_q.argmax(-1)).float().mean())
    return kl, agreement


def search_allocation(
    adapter: VisionLanguageAdapter,
    config: CompressionConfig,
    calibration: CalibrationSet,
    *,
    proportions: Sequence[float] = DEFAULT_PROPORTIONS,
    scorer: Callable | None = None,
    _state: dict | None = None,
) -> AutoAllocationResult:
    """Score every candidate eps_v:eps_t proportion; the adapter itself is left untouched."""
    if not isinstance(adapter, VisionLanguageAdapter) or set(adapter.groups) != {"vision", "text"}:
        raise ConfigError("allocation 'auto' splits the budget between a vision and a text tower (CLIP-style models)")
    if config.target_reduction is None or config.rank_rule != "tolerance":
        raise ConfigError("allocation 'auto' needs a tolerance method (pgsvd) and --target-reduction")
    fit, held = split_calibration(calibration)
    state = _state if _state is not None else {}
    layers = select_layers(adapter, config)
    if config.needs_activations:
        state["collectors"] = calibrate(adapter, layers, fit, config)
    state["spectra"] = {}
    texts = _prompt_texts(held)
    scale = min(100.0, max(1.0, float(adapter.logit_scale())))
    reference = _embeddings(adapter, held, texts, config.batch_size)
    scorer = scorer or (lambda ref, cand_adapter, held_set: kl_score(ref, _embeddings(cand_adapter, held_set, texts, config.batch_size), scale))
    candidates = score_proportions(
        adapter, config, fit, state, proportions, lambda rho: {"vision": float(rho), "text": 1.0},
        lambda trial: scorer(reference, trial, held), "KL",
    )
    return AutoAllocationResult(best_candidate(candidates), candidates, held.describe())


def score_proportions(
    adapter, config: CompressionConfig, fit, state: dict, proportions: Sequence[float],
    weights_for: Callable[[float], dict[str, float]], score: Callable, score_name: str,
) -> list[Candidate]:
    """Compress a copy of ``adapter`` at each proportion rho = eps_v / eps_t (covariances and spectra
    reused from ``state``) and score it with ``score(trial) -> (score, agreement)``."""
    candidates = []
    for rho in proportions:
        trial = copy.deepcopy(adapter)
        probe = config.replace(allocation="proportion", eps_proportion=weights_for(rho))
        report = compress(trial, probe, fit, collectors=state.get("collectors"), spectra_cache=state["spectra"])
        value, agreement = score(trial)
        candidates.append(Candidate(float(rho), report.tolerances, report.targeted_reduction, value, agreement))
        logger.info("auto allocation: eps_v/eps_t=%.2f -> %s, reduction %.3f, %s %.5f, agreement %.3f",
                    rho, {k: round(v, 4) for k, v in report.tolerances.items()}, report.targeted_reduction,
                    score_name, value, agreement)
        del trial
    return candidates


def best_candidate(candidates: list[Candidate]) -> Candidate:
    """Lowest score; ties go to the proportion closest to 1 (the shared split)."""
    return min(candidates, key=lambda c: (c.score, abs(math.log(c.proportion))))


def auto_compress_contrastive(
    adapter: VisionLanguageAdapter, config: CompressionConfig, calibration: CalibrationSet, **kwargs
) -> CompressionReport:
    """Search the tower split on the zero-shot KL proxy, then compress ``adapter`` in place with the winner."""
    state: dict = {}
    result = search_allocation(adapter, config, calibration, _state=state, **kwargs)
    fit, _ = split_calibration(calibration)
    return compress_with_winner(
        adapter, config, fit, result, state, {"vision": result.best.proportion, "text": 1.0},
        proxy="mean KL(original || compressed) of image->text zero-shot distributions on held-out calibration data",
    )


def compress_with_winner(
    adapter, config: CompressionConfig, fit, result: AutoAllocationResult, state: dict,
    eps_proportion: dict[str, float], *, proxy: str,
) -> CompressionReport:
    """Compress ``adapter`` in place with the searched tolerances (reusing the search's covariances
    and spectra) and record the search in the report."""
    report = compress(
        adapter, config.replace(allocation="proportion", eps_proportion=eps_proportion),
        fit, tolerances=result.best.tolerances, collectors=state.get("collectors"), spectra_cache=state["spectra"],
    )
    report.allocation = "auto"
    report.config["allocation"] = "auto"
    report.calibration["auto_allocation"] = {
        "chosen_proportion_eps_v_over_eps_t": result.best.proportion,
        "chosen_tolerances": result.best.tolerances,
        "proxy": proxy,
        "held_out": result.held_out,
        "candidates": [c.__dict__ for c in result.candidates],
    }
    return report
