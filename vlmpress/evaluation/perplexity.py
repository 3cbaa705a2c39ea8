"""Sliding-window perplexity of a causal LM (Hugging Face's perplexity guide, exact token accounting).

Published perplexities differ mainly by context length (2048 vs 4096) and stride, so both are part
of every result. The text is tokenised as one stream; window ``k`` covers tokens
``[k*stride, k*stride + seq_len)`` and scores only the tokens no earlier window scored (and never a
window's first token, which has no context). With ``stride == seq_len`` the windows are disjoint and
each window's first token goes unscored; with a smaller stride every token after the first is
scored exactly once, with at least ``seq_len - stride`` tokens of context. ``n_tokens`` is the number
of scored tokens and ``nll`` their mean negative log-likelihood (nats), so
``perplexity = exp(nll)``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from tqdm.auto import tqdm

from vlmpress.errors import ConfigError

logger = logging.getLogger(__name__)


def window_plan(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of every window over a stream of ``n_tokens`` tokens."""
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2 for perplexity, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise ConfigError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    plan, prev_end = [], 0
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + seq_len, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            plan.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return plan


@torch.no_grad()
def token_nll(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, stride: int, *, device=None, progress: bool = True) -> tuple[float, int]:
    """Summed NLL (float64, nats) and the number of scored tokens for a 1-D token stream."""
    plan = window_plan(ids.numel(), seq_len, stride)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    total, count = 0.0, 0
    for begin, end, first in tqdm(plan, desc="perplexity", unit="window", leave=False, disable=not progress):
        window = ids[begin:end].unsqueeze(0).to(device)
        logits = model(input_ids=window, use_cache=False).logits[0].float()
        # position t is predicted by the logits at t-1
        pred = logits[first - begin - 1 : end - begin - 1]
        target = window[0, first - begin : end - begin]
        logp = torch.log_softmax(pred, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        total -= float(logp.double().sum())
        count += int(target.numel())
    return total, count


def evaluate_perplexity(
    adapter,
    source: str,
    seq_len: int | None = None,
    stride: int | None = None,
    *,
    split: str = "test",
    max_tokens: int | None = None,
    device: str | torch.device | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of ``adapter.model`` on a text file or a cached dataset split (default: test).

    ``stride`` defaults to ``seq_len`` (disjoint windows); ``max_tokens`` truncates the token stream
    (stated in the result). Returns the metrics plus everything needed to compare numbers.
    """
    from vlmpress.data.text_calibration import read_text_source, tokenize_text

    max_pos = getattr(adapter, "max_positions", None)
    if seq_len is None:  # the usual 2048, or the model's whole context when it is shorter
        seq_len = min(2048, max_pos or 2048)
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ConfigError(f"stride must be in [1, seq-len={seq_len}], got {stride}")
    if max_pos is not None and seq_len > max_pos:
        raise ConfigError(
            f"seq_len {seq_len} is larger than the model's maximum of {max_pos} positions; pass --seq-len {max_pos} or less"
        )
    tokenizer = getattr(adapter, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("perplexity needs the model's tokenizer, and this model has none")
    text = read_text_source(source, split=split)
    ids = tokenize_text(tokenizer, text.text)
    truncated = max_tokens is not None and ids.numel() > max_tokens
    if truncated:
        ids = ids[:max_tokens]
    model = adapter.model
    was_training = model.training
    model.eval()
    try:
        nll_sum, n = token_nll(model, ids, seq_len, stride, device=device, progress=show_progress)
    finally:
        model.train(was_training)
    if n == 0:
        raise ConfigError(f"the text {text.describe()} is too short to score any token")
    nll = nll_sum / n
    result = {
        "perplexity": math.exp(nll),
        "nll": nll,
        "n_tokens": n,
        "text_tokens": int(ids.numel()),
        "n_windows": len(window_plan(ids.numel(), seq_len, stride)),
        "seq_len": seq_len,
        "stride": stride,
        "source": text.describe(),
        "truncated_to": max_tokens if truncated else None,
    }
    logger.info("perplexity %.3f on %s (seq_len %d, stride %d, %d tokens)", result["perplexity"], text.describe(), seq_len, stride, n)
    return result


__all__ = ["evaluate_perplexity", "token_nll", "window_plan"]
