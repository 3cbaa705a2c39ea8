"""``allocation: auto`` for generative VLMs: split a target reduction between vision tower and LM.

As for CLIP (:mod:`vlmpress.pipeline.auto_allocation.contrastive`), the calibration pairs are divided into a *fit* part
(covariances) and a *held-out* part (scoring), and candidate proportions rho = eps_v / eps_t are
each solved to the target reduction by bisection and applied to a copy of the model. The proxy
differs: a generative model is scored by how far its **next-token distributions on the held-out
caption tokens** (given the image and prompt) move from the original model's -- the mean
KL(p_original || p_compressed) over caption tokens. Only calibration pairs are ever seen.
Covariances and weight spectra are computed once and reused across candidates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vlmpress.pipeline.auto_allocation.contrastive import (
    DEFAULT_PROPORTIONS,
    HELD_OUT_FRACTION,
    AutoAllocationResult,
    best_candidate,
    compress_with_winner,
    score_proportions,
)
from vlmpress.pipeline.compress import calibrate, select_layers
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.errors import ConfigError
from vlmpress.pipeline.report import CompressionReport

logger = logging.getLogger(__name__)


def split_pairs(calibration, fraction: float = HELD_OUT_FRACTION):
    """Deterministic fit / held-out split of image/caption pairs (every k-th pair is held out)."""
    k = max(2, round(1 / fraction))
    n = len(calibration)
    fit = calibration.subset([i for i in range(n) if i % k], "fit part")
    held = calibration.subset([i for i in range(n) if not i % k], "held-out part")
    if not len(fit) or not len(held):
        raise ConfigError("allocation 'auto' needs at least 2 calibration pairs (fit + held-out)")
    return fit, held


@torch.no_grad()
def caption_log_probs(adapter, batches: Sequence[dict]) -> list[torch.Tensor]:
    """Per batch: (n_caption_tokens, vocab) log-probabilities of the next token at each caption position."""
    out = []
    for batch in batches:
        logits = adapter.forward_tokens(batch).logits.float()
        # logits at position j predict token j + 1: the caption tokens are predicted one step earlier
        predict = batch["caption_mask"][:, 1:].to(logits.device)
        out.append(F.log_softmax(logits[:, :-1][predict], dim=-1).cpu())
    return out


def caption_kl(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> tuple[float, float]:
    """(mean KL(p_ref || p_cand) over caption tokens, top-1 next-token agreement)."""
    ref, cand = torch.cat(reference), torch.cat(candidate)
    kl = (ref.exp() * (ref - cand)).sum(-1)
    agreement = (ref.argmax(-1) == cand.argmax(-1)).float().mean()
    return float(kl.mean()), float(agreement)


def _weights(groups: set[str], rho: float) -> dict[str, float]:
    # the projector (when targeted) follows the LM's tolerance
    return {g: (float(rho) if g == "vision" else 1.0) for g in groups}


def search_generative_allocation(
    adapter, config: CompressionConfig, calibration, *, proportions: Sequence[float] = DEFAULT_PROPORTIONS, _state: dict | None = None
) -> AutoAllocationResult:
    """Score every candidate eps_v:eps_t proportion on held-out caption tokens; ``adapter`` is untouched."""
    if config.target_reduction is None or config.rank_rule != "tolerance":
        raise ConfigError("allocation 'auto' needs a tolerance method (pgsvd) and --target-reduction")
    layers = select_layers(adapter, config)
    groups = {layer.group for layer in layers}
    if not {"vision", "text"} <= groups:
        raise ConfigError(
            f"allocation 'auto' splits the budget between the vision tower and the LM, but only {', '.join(sorted(groups))} "
            "is targeted; use --allocation shared"
        )
    fit, held = split_pairs(calibration)
    state = _state if _state is not None else {}
    state["fit"] = fit
    if config.needs_activations:
        state["collectors"] = calibrate(adapter, layers, fit, config)
    state["spectra"] = {}
    batches = adapter.token_batches(held, config.batch_size)
    reference = caption_log_probs(adapter, batches)
    candidates = score_proportions(
        adapter, config, fit, state, proportions, lambda rho: _weights(groups, rho),
        lambda trial: caption_kl(reference, caption_log_probs(trial, batches)), "caption KL",
    )
    return AutoAllocationResult(best_candidate(candidates), candidates, held.describe())


def auto_compress_generative(adapter, config: CompressionConfig, calibration, **kwargs) -> CompressionReport:
    """Search the vision/LM split, then compress ``adapter`` in place with the winning tolerances."""
    state: dict = {}
    result = search_generative_allocation(adapter, config, calibration, _state=state, **kwargs)
    groups = {layer.group for layer in select_layers(adapter, config)}
    return compress_with_winner(
        adapter, config, state["fit"], result, state, _weights(groups, result.best.proportion),
        proxy="mean KL(original || compressed) of next-token distributions on held-out caption tokens (given image + prompt)",
    )


__all__ = ["auto_compress_generative", "caption_kl", "caption_log_probs", "search_generative_allocation", "split_pairs"]
