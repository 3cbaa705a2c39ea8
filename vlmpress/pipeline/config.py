"""Compression recipe: a dataclass that maps 1:1 to the YAML files in ``configs/recipes/``.

CLI flags override YAML values (``vlmpress compress --config recipe.yaml --eps-v 0.3``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from vlmpress.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: method -> (solver, rank rule). PGSVD = tolerance ranks + ALS; SVD-ALS = uniform ratio + ALS.
METHODS: dict[str, tuple[str, str]] = {
    "svd": ("svd", "ratio"),
    "svd_llm": ("svd_llm", "ratio"),
    "svd_als": ("als", "ratio"),
    "pgsvd": ("als", "tolerance"),
}

#: how a target reduction is split between groups (towers) for tolerance-based methods
ALLOCATIONS = ("shared", "proportion", "auto")
ALS_PATHS = ("auto", "rounds", "limit")  # tolerance-mode ALS: see CompressionConfig.als_path

#: display names used in reports
METHOD_LABELS = {"svd": "SVD", "svd_llm": "SVD-LLM", "svd_als": "SVD-ALS", "pgsvd": "PGSVD", "base": "Base"}


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def parse_device(device: Any) -> "torch.device":
    """A user's device string -> ``torch.device``; ``auto``/None = CUDA when present, else CPU.

    Refuses unknown types ('tpu', ''), indices of absent GPUs and CUDA on a machine without it,
    with one line naming what is accepted -- before anything is loaded.
    """
    import torch

    if device is None or (isinstance(device, str) and device.strip() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        dev = device
    else:
        expected = "expected auto, cpu, cuda or cuda:N"
        if not isinstance(device, str) or not device.strip():
            raise ConfigError(f"device must be a non-empty string, got {device!r}; {expected}")
        try:
            dev = torch.device(device.strip())
        except (RuntimeError, ValueError, TypeError):
            raise ConfigError(f"unknown device '{device}'; {expected}") from None
        if dev.type not in DEVICE_TYPES:
            raise ConfigError(f"unsupported device '{device}'; {expected}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{dev}' requested but no CUDA device is available; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device '{dev}' does not exist: {torch.cuda.device_count()} CUDA device(s) present (cuda:0...)"
            )
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"device '{dev}' requested but MPS is not available; use --device cpu or auto")
    return dev


def _is_number(value: Any) -> bool:
    """A real number of sane magnitude (a 400-digit YAML integer is not; nor is NaN/inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) < 1e300 if isinstance(value, int) else math.isfinite(value)


#: upper bounds of the integer settings: far above any real run, low enough that a typo
#: (``batch_size: 10**30``, ``--als-iters 1000000000``) is refused before it allocates or hangs
INT_LIMITS: dict[str, int] = {
    "n_images": 10_000_000, "n_captions": 10_000_000, "n_samples": 1_000_000, "seq_len": 1 << 20,
    "batch_size": 1 << 16, "num_workers": 256, "rank_multiple": 4096, "seed": (1 << 63) - 1,
    "als_iters": 10_000, "als_max_iters": 10_000, "solve_batch_size": 1 << 16,
}
#: accelerate device_map strings (or one device: cpu, cuda, cuda:N)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_STR_CHOICES = {
    "allocation": ALLOCATIONS, "als_path": ALS_PATHS, "accumulate_dtype": ("float32", "float64"),
    "calib_windows": ("random", "document"), "mode": ("whole", "sequential"), "propagate": ("original", "compressed"),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class CompressionConfig:
    """Everything that defines one compression run."""

    model: str = ""
    method: str = "pgsvd"
    # --- rank selection
    eps: float | None = None  # one tolerance for every group (pgsvd, or svd with tolerance ranks)
    eps_v: float | None = None  # vision tower tolerance (CLIP)
    eps_t: float | None = None  # text tower tolerance (CLIP)
    eps_attn: float | None = None  # attention layers (clustered allocation, LLMs)
    eps_mlp: float | None = None  # MLP layers (clustered allocation, LLMs)
    ratio: float | None = None  # uniform methods: fraction of each layer's parameters removed
    target_reduction: float | None = None  # fraction of the targeted layers' parameters to remove
    allocation: str = "shared"  # shared | proportion | auto (how target_reduction is split across groups)
    eps_proportion: dict[str, float] = field(default_factory=lambda: {"vision": 1.0, "text": 1.0})
    # ALS: an integer runs exactly that many rounds (the paper's fixed tau, for reproductions);
    # None iterates until the activation error changes by at most als_tol (relative) between
    # rounds, at most als_max_iters rounds
    als_iters: int | None = None
    als_tol: float = 2e-5  # within ~0.03% of the closed-form optimum on the bench shapes (scripts/bench_solvers.py)
    als_max_iters: int = 100
    # tolerance mode only: "rounds" iterates from the SVD start (jumping to the rounds' limit, the
    # closed-form optimum, once more rounds would cost more than an eigendecomposition); "limit"
    # computes that limit directly (no SVD start, no rounds); "auto" = limit on CPU, where one
    # eigendecomposition costs less than the start's vectors plus the probing rounds, rounds elsewhere
    als_path: str = "auto"
    # same-shape layers solved together (vlmpress.core.batched); None = 32 on CUDA, 1 (per layer) on CPU
    solve_batch_size: int | None = None
    rank_multiple: int = 1  # round ranks to a multiple (8 or 16: tensor-core GEMM shapes on GPU); 1 = paper
    # deployment-aware ranks: time dense vs low-rank per layer shape on `device` at the calibration
    # batch's rows (cached), keep layers dense where low-rank is slower, re-spend a target elsewhere
    latency_aware: bool = False
    # weight-only quantisation of the factors after factorisation: none | int8 | int4 | fp8 (CUDA, cc >= 8.9)
    quantize: str = "none"
    quantize_group_size: int = 64  # int4: columns per scale (32, 64 or 128)
    # --- which layers
    targets: list[str] = field(default_factory=list)  # regexes on layer names; empty = all candidates
    exclude: list[str] = field(default_factory=list)
    # --- calibration
    calib_images: str | None = None  # folder of images, or a registered dataset name (e.g. caltech101)
    calib_captions: str | None = None  # text file, one caption per line
    calib_split_file: str | None = None  # registered datasets: test list to keep calibration away from
    calib_text: str | None = None  # LLMs: text file or local HF dataset
    n_images: int = 256
    n_captions: int = 256
    n_samples: int = 256  # LLMs: number of token windows
    seq_len: int | None = None  # LLMs: window length; None = min(2048, the model's maximum positions)
    calib_windows: str = "random"  # LLMs: random offsets in one token stream, or "document": one window per document
    batch_size: int = 32
    num_workers: int = 0
    data_root: str | None = None
    seed: int = 0
    accumulate_dtype: str = "float32"
    # --- execution
    device: str = "auto"  # where the factorisation runs: auto = cuda when present
    torch_dtype: str | None = None  # hf LLMs: float32 | bfloat16 | float16 | auto (weights' dtype when loading)
    device_map: str | None = None  # hf LLMs: passed to from_pretrained (e.g. "auto": accelerate dispatch/offload)
    mode: str = "whole"  # whole | sequential (LLMs: one decoder block at a time)
    propagate: str = "compressed"  # sequential mode: feed next block the original or compressed outputs

    # ------------------------------------------------------------------ validation
    @property
    def solver(self) -> str:
        return METHODS[self.method][0]

    @property
    def rank_rule(self) -> str:
        rule = METHODS[self.method][1]
        if self.method == "svd" and self.ratio is None and self.target_reduction is None and self.has_tolerance:
            return "tolerance"  # plain SVD with tolerance ranks (ablation)
        return rule

    @property
    def needs_activations(self) -> bool:
        return self.solver != "svd"

    @property
    def has_tolerance(self) -> bool:
        return any(v is not None for v in (self.eps, self.eps_v, self.eps_t, self.eps_attn, self.eps_mlp))

    def group_tolerances(self) -> dict[str, float]:
        """Explicit tolerances keyed by group (vision/text) or kind (attn/mlp); '*' = everything."""
        out: dict[str, float] = {}
        if self.eps is not None:
            out["*"] = self.eps
        for key, value in (("vision", self.eps_v), ("text", self.eps_t), ("attn", self.eps_attn), ("mlp", self.eps_mlp)):
            if value is not None:
                out[key] = value
        return out

    def validate(self) -> "CompressionConfig":
        from vlmpress.io.strict import short_repr

        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {short_repr(self.method)}")
        if not isinstance(self.model, str):
            raise ConfigError(f"model must be a spec string, got {short_repr(self.model)}")
        for name, choices in _STR_CHOICES.items():
            value = getattr(self, name)
            if not isinstance(value, str) or value not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {short_repr(value)}")
        if self.device_map is not None and not (
            isinstance(self.device_map, str) and (self.device_map in DEVICE_MAPS or re.fullmatch(r"cpu|cuda(:\d+)?", self.device_map))
        ):
            raise ConfigError(
                f"device-map must be one of {', '.join(DEVICE_MAPS)} or a device (cpu, cuda, cuda:N), got {short_repr(self.device_map)}"
            )
        for name in ("eps", "eps_v", "eps_t", "eps_attn", "eps_mlp"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not math.isfinite(value) or not 0 <= value <= 1):
                raise ConfigError(f"{name.replace('_', '-')} must be a relative error in [0, 1], got {value}")
        for name in ("ratio", "target_reduction"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not math.isfinite(value) or not 0 < value < 1):
                raise ConfigError(f"{name.replace('_', '-')} must be a fraction strictly between 0 and 1, got {value}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got '{self.allocation}'")
        if not isinstance(self.eps_proportion, dict) or not self.eps_proportion or any(
            not isinstance(k, str) or not _is_number(v) or not math.isfinite(v) or v <= 0
            for k, v in self.eps_proportion.items()
        ):
            raise ConfigError(
                f"eps-proportion must map group names to finite positive numbers (e.g. vision=1.3,text=0.7), "
                f"got {short_repr(self.eps_proportion)}"
            )
        for name in ("rank_multiple", "n_images", "n_captions", "n_samples", "seq_len", "batch_size",
                     "num_workers", "seed"):
            if name == "seq_len" and self.seq_len is None:
                continue
            if not _is_int(getattr(self, name)):
                raise ConfigError(f"{name.replace('_', '-')} must be an integer, got {getattr(self, name)!r}")
        if self.als_iters is not None and (not _is_int(self.als_iters) or self.als_iters < 0):
            raise ConfigError(f"als_iters must be a whole number >= 0 (or unset to iterate to als_tol), got {self.als_iters!r}")
        if not _is_number(self.als_tol) or not (math.isfinite(self.als_tol) and 0 < self.als_tol <= 1):
            raise ConfigError(f"als_tol must be a positive relative change, e.g. 1e-4, got {self.als_tol!r}")
        if self.als_path not in ALS_PATHS:
            raise ConfigError(f"als_path must be one of {', '.join(ALS_PATHS)}, got {self.als_path!r}")
        if self.solve_batch_size is not None and (not _is_int(self.solve_batch_size) or self.solve_batch_size < 1):
            raise ConfigError(f"solve_batch_size must be a whole number >= 1 (or unset for the device default), got {self.solve_batch_size!r}")
        if not isinstance(self.latency_aware, bool):
            raise ConfigError(f"latency_aware must be true or false, got {self.latency_aware!r}")
        self._validate_quantize()
        if not _is_int(self.als_max_iters) or self.als_max_iters < 1:
            raise ConfigError(f"als_max_iters must be a whole number >= 1, got {self.als_max_iters!r}")
        if self.rank_multiple < 1:
            raise ConfigError(f"rank_multiple must be a positive integer (1 = exact ranks, 8/16 for GPUs), got {self.rank_multiple}")
        for name in ("n_images", "n_captions", "n_samples", "seq_len", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")
        for name, limit in INT_LIMITS.items():
            value = getattr(self, name)
            if value is None and name in ("seq_len", "als_iters", "solve_batch_size"):
                continue
            if not _is_int(value):
                raise ConfigError(f"{name.replace('_', '-')} must be an integer, got {short_repr(value)}")
            if value > limit:
                raise ConfigError(f"{name.replace('_', '-')} must be at most {limit}, got {short_repr(value)}")
        for name in ("targets", "exclude"):
            value = getattr(self, name)
            if not isinstance(value, list) or len(value) > 10_000 or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name} must be a list of regular expressions, got {short_repr(value)}")
            for pattern in value:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ConfigError(f"{name} pattern '{pattern}' is not a valid regular expression: {err}") from None
        for name in ("calib_images", "calib_captions", "calib_split_file", "calib_text", "data_root", "device_map"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name.replace('_', '-')} must be a string, got {short_repr(value)}")
        if not isinstance(self.device, (str, type(None))):
            raise ConfigError(f"device must be a string such as auto, cpu or cuda:0, got {short_repr(self.device)}")
        parse_device(self.device)
        if self.accumulate_dtype not in ("float32", "float64"):
            raise ConfigError(f"accumulate_dtype must be float32 or float64, got '{self.accumulate_dtype}'")
        if not isinstance(self.torch_dtype, (str, type(None))) or self.torch_dtype not in (None, "float32", "bfloat16", "float16", "auto"):
            raise ConfigError(f"torch_dtype must be float32, bfloat16, float16 or auto, got '{self.torch_dtype}'")
        if self.calib_windows not in ("random", "document"):
            raise ConfigError(f"calib_windows must be 'random' or 'document', got '{self.calib_windows}'")
        if self.mode not in ("whole", "sequential"):
            raise ConfigError(f"mode must be 'whole' or 'sequential', got '{self.mode}'")
        if self.propagate not in ("original", "compressed"):
            raise ConfigError(f"propagate must be 'original' or 'compressed', got '{self.propagate}'")
        rule = self.rank_rule
        if self.target_reduction is not None and (self.ratio is not None or self.has_tolerance):
            raise ConfigError("give either target-reduction or explicit eps/ratio values, not both")
        if rule == "tolerance" and self.target_reduction is None and not self.has_tolerance:
            raise ConfigError(f"method {self.method} needs a tolerance (--eps, or --eps-v/--eps-t) or --target-reduction")
        if rule == "ratio":
            if self.has_tolerance:
                raise ConfigError(
                    f"method {self.method} uses one uniform compression ratio per layer; use --ratio or "
                    "--target-reduction (tolerances apply to pgsvd)"
                )
            if self.ratio is None and self.target_reduction is None:
                raise ConfigError(f"method {self.method} needs --ratio or --target-reduction")
        return self

    def _validate_quantize(self) -> None:
        from vlmpress.core.quantize import QuantizationError, check_scheme, check_scheme_supported

        if not isinstance(self.quantize, str) or not _is_int(self.quantize_group_size):
            raise ConfigError(f"quantize must be a scheme name and quantize_group_size an integer, got {self.quantize!r}, {self.quantize_group_size!r}")
        try:
            check_scheme(self.quantize, self.quantize_group_size)
            check_scheme_supported(self.quantize, parse_device(self.device))
        except QuantizationError as err:
            raise ConfigError(str(err)) from None
        if self.quantize != "none" and self.mode == "sequential":
            raise ConfigError("quantize applies to --mode whole runs; sequential mode does not quantise yet")

    # ------------------------------------------------------------------ YAML / dict round trip
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompressionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted((str(k) if str(k).isprintable() else repr(str(k)))[:60] for k in data if k not in known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "CompressionConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        from vlmpress.io.strict import load_yaml_strict

        data = load_yaml_strict(path, "config file", ConfigError) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        return cls.from_dict(data)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def replace(self, **overrides: Any) -> "CompressionConfig":
        """Copy with the non-None overrides applied (how CLI flags override YAML)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})
