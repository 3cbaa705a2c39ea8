"""Shared helpers for the benchmark scripts (timing, machine description, synthetic inputs)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from PIL import Image

SHARED_CALTECH = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "caltech101"


def machine() -> str:
    from vlmpress.deploy.latency import cpu_model

    gpu = f" | GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu_model()} | {os.cpu_count()} CPUs | torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(fn, *, min_seconds: float = 1.0, max_repeats: int = 50, warmup: int = 1) -> float:
    """Median-free simple timer: warm up, then repeat until ``min_seconds``; mean seconds per call."""
    for _ in range(warmup):
        fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds or n >= max_repeats:
            return elapsed / n


def interleaved_rates(calls: dict, *, rounds: int = 5, warmup: int = 1) -> dict:
    """Median seconds per call of each callable, timed in ``rounds`` interleaved rounds.

    Each round calls every function once, so a load change on a shared machine slows all of them
    alike instead of whichever happened to be timed then; the ratios are what is compared.
    """
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: dict = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - t0)
    return {name: sorted(s)[len(s) // 2] for name, s in samples.items()}


def calibration_images(n: int, size: int = 224, seed: int = 0) -> list:
    """Real Caltech-101 images when ../shared has them (sorted, every k-th), else seeded noise images."""
    root = SHARED_CALTECH / "101_ObjectCategories"
    if root.is_dir():
        paths = sorted(p for p in root.rglob("*.jpg") if "BACKGROUND_Google" not in str(p))
        step = max(1, len(paths) // n)
        return [Image.open(p).convert("RGB") for p in paths[::step][:n]]
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


CAPTION_WORDS = "a photo of the small large red blue dog cat car plane tree house person bird boat".split()


def captions(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(4, 12, (1,), generator=g))
        idx = torch.randint(0, len(CAPTION_WORDS), (k,), generator=g)
        out.append(" ".join(CAPTION_WORDS[i] for i in idx))
    return out
