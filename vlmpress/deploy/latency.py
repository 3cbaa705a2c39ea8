"""Layer latency on the deployment device: dense vs low-rank GEMMs, measured once and cached.

Whether a rank-``r`` factorisation runs faster than its dense layer depends on the device, the
dtype and the number of rows (batch x tokens) more than on arithmetic: on a GPU two narrow GEMMs
can cost more than one wide GEMM at well below the parameter break-even rank. Deployment-aware
ranks (``--latency-aware``) ask :class:`LatencyTable` for each distinct layer shape and keep a
layer dense where its factorisation would be slower.

Timings are cached in a JSON file (default ``<cache dir>/latency.json``) keyed by device name,
torch version, shape, rank, rows and dtype, so each shape is timed once per machine.
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from vlmpress.io import atomic_write_json
from vlmpress.io.resources import cache_dir

logger = logging.getLogger(__name__)

CACHE_NAME = "latency.json"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """What the timings depend on: the GPU's name, or the CPU model and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


@dataclass(frozen=True)
class LayerShape:
    """One timing: a ``out x in`` layer, dense (rank None) or rank ``rank``, on ``rows`` input rows."""

    out_features: int
    in_features: int
    rank: int | None
    rows: int
    dtype: str  # "float32", "bfloat16", ...

    def key(self, device: str) -> str:
        form = "dense" if self.rank is None else f"rank {self.rank}"
        return f"{device} | torch {torch.__version__} | {self.out_features}x{self.in_features} {form} | rows {self.rows} | {self.dtype}"


def time_linear(shape: LayerShape, device: torch.device, *, repeats: int = 7, warmup: int = 2) -> float:
    """Median seconds of one forward of a random dense or low-rank linear layer of ``shape``."""
    dtype = getattr(torch, shape.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    x = make(shape.rows, shape.in_features)
    bias = make(shape.out_features)
    if shape.rank is None:
        W = make(shape.out_features, shape.in_features)
        run = lambda: F.linear(x, W, bias)  # noqa: E731
    else:
        A, B = make(shape.out_features, shape.rank), make(shape.rank, shape.in_features)
        run = lambda: F.linear(F.linear(x, B), A, bias)  # noqa: E731
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    samples = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


class LatencyTable:
    """Cached dense / low-rank timings for one device (see the module docstring)."""

    def __init__(
        self,
        device: torch.device | str = "cpu",
        path: str | Path | None = None,
        timer: Callable[[LayerShape, torch.device], float] | None = None,
    ):
        self.device = torch.device(device)
        self.device_name = device_name(self.device)
        self.path = Path(path) if path is not None else cache_dir() / CACHE_NAME
        self.timer = timer or time_linear
        self.measured = 0  # timings taken by this table (not found in the cache)
        self._entries = self._read()

    def _read(self) -> dict[str, float]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            logger.warning("ignoring unreadable latency cache %s (%s); layers will be timed again", self.path, err)
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and v > 0}

    def seconds(self, shape: LayerShape) -> float:
        key = shape.key(self.device_name)
        if key not in self._entries:
            self._entries[key] = float(self.timer(shape, self.device))
            self.measured += 1
            atomic_write_json(self.path, dict(sorted(self._entries.items())))
        return self._entries[key]

    def compare(self, out_features: int, in_features: int, rank: int, rows: int, dtype: torch.dtype) -> tuple[float, float]:
        """(dense seconds, low-rank seconds) of one layer shape at ``rows`` input rows."""
        name = str(dtype).replace("torch.", "")
        dense = self.seconds(LayerShape(out_features, in_features, None, rows, name))
        lowrank = self.seconds(LayerShape(out_features, in_features, rank, rows, name))
        return dense, lowrank
