"""Likelihood zero-shot bench for generative VLMs (used by ``bench_eval.py`` when the model is one).

Scores every class caption of N Caltech101 test images two ways, with the same model and batches:

* full sequence: image + prompt + caption re-run for every (image, caption) pair
  (:func:`vlmpress.evaluation.likelihood.full_sequence_log_likelihoods`);
* cached prefix: image + prompt encoded once per image, captions run from copies of its KV cache
  (:func:`vlmpress.evaluation.likelihood.caption_log_likelihoods`, what ``vlmpress eval`` uses).

Both give the same scores (checked here); the ratio of their times is the speed-up.
"""

from __future__ import annotations

import statistics
import time

import torch

from vlmpress.data.datasets import format_prompt
from vlmpress.evaluation.likelihood import caption_log_likelihoods, full_sequence_log_likelihoods


def bench_likelihood(adapter, ds, *, batch_size: int, repeats: int, max_sequences: int = 256) -> None:
    transformed = ds.with_transform(adapter.preprocess)
    pixels = torch.stack([transformed[i][0] for i in range(len(ds))])
    captions = [format_prompt(t, c) for c in ds.classnames for t in ds.templates]
    n_prefix = adapter.prefix_ids().numel()
    lengths = [len(x) for x in adapter.caption_ids(captions)]
    print(f"# {len(ds)} images x {len(captions)} captions; prefix {n_prefix} positions (image + prompt), "
          f"captions {min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.1f}); image batch {batch_size}")

    def run(fn):
        t0 = time.perf_counter()
        out = [fn(adapter, pixels[s : s + batch_size], captions, max_sequences=max_sequences)[0]
               for s in range(0, len(pixels), batch_size)]
        return time.perf_counter() - t0, torch.cat(out)

    run(caption_log_likelihoods)  # warm-up
    full_t, cached_t = [], []
    for _ in range(repeats):  # interleaved: load changes on a shared machine hit both sides
        t, full = run(full_sequence_log_likelihoods)
        full_t.append(t)
        t, cached = run(caption_log_likelihoods)
        cached_t.append(t)
    diff = float((full - cached).abs().max())
    n = len(pixels)
    print(f"# {repeats} interleaved repeats; max |score difference| {diff:.2e}")
    print(f"{'path':<36} {'best s':>8} {'img/s':>7} | {'median s':>8} {'img/s':>7}")
    for name, times in (("full sequence per caption", full_t), ("cached image prefix (vlmpress eval)", cached_t)):
        print(f"{name:<36} {min(times):>8.2f} {n / min(times):>7.2f} | {statistics.median(times):>8.2f} "
              f"{n / statistics.median(times):>7.2f}")
    print(f"speed-up of the cached prefix: {min(full_t) / min(cached_t):.2f}x (best), "
          f"{statistics.median(full_t) / statistics.median(cached_t):.2f}x (median)")
