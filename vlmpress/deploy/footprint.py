"""Bytes and memory of a model: tensor bytes by dtype, bytes on disk, peak memory of a forward.

Parameter bytes count every tensor of the state dict once (tied weights once; quantised factors
are buffers), which is what a checkpoint stores. Peak forward memory is measured around one call:
on CUDA with ``torch.cuda.max_memory_allocated`` (after a reset), on CPU from the allocation
events of the torch profiler (``profile_memory=True``), replayed in time order. Both count memory
allocated *during* the forward (activations, dequantised weights), not the resident weights.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable

import torch


def tensor_bytes_by_dtype(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the model's state dict by dtype name (each storage counted once)."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, int] = {}
    for tensor in model.state_dict().values():
        if tensor.device.type == "meta":
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else (id(tensor), 0)
        if key in seen:
            continue
        seen.add(key)
        name = str(tensor.dtype).replace("torch.", "")
        out[name] = out.get(name, 0) + tensor.numel() * tensor.element_size()
    return dict(sorted(out.items()))


def bytes_on_disk(path: str | Path) -> int:
    """Size of a file, or of every file under a directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextlib.contextmanager
def _quiet_native_stderr():
    # the profiler's native library logs start/stop lines straight to file descriptor 2
    try:
        saved = os.dup(2)
    except OSError:  # pragma: no cover - no usable stderr
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_forward_bytes(run: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated by ``run()`` above what was allocated before it (no grad)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            run()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return int(peak)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover
