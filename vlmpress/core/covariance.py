"""Input-covariance collection for linear layers (``M = X^T X`` per layer).

A :class:`CovarianceCollector` registers forward pre-hooks on named modules whose first positional
argument is the layer input (``nn.Linear``, GPT-2's ``Conv1D``, ``LowRankLinear``) and accumulates
``M += X^T X`` over every valid token. Layers that read the very same tensor in the same forward
(q/k/v projections) share one accumulator, so the product is computed once. Hooks are removed on
exit from the ``with`` block, also when the forward raises.

Routed layers (MoE experts) see only the tokens a router sends them: the routing module states
which rows of the flattened batch an input holds (:func:`routed_rows`), so a (batch, seq) mask of
real tokens still selects the right rows, and such layers may be declared ``optional`` (an expert
no calibration token reached is no error).

Precision: ``accumulate_dtype="float64"`` casts X to float64 before the product (exact, ~2x slower on
CPU); ``"float32"`` (default) forms each batch's product in float32 and adds it to a float64 running
sum, so rounding never grows with the number of batches.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Callable

import torch
from torch import nn

from vlmpress.errors import CalibrationError

logger = logging.getLogger(__name__)

_ACCUMULATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_TRIANGLE_MIN_WIDTH = 1024  # from this input width the product skips the lower block triangle
_ROUTED = threading.local()  # rows of the flattened batch that the current routed input holds


@contextlib.contextmanager
def routed_rows(index: torch.Tensor, total: int) -> Iterator[None]:
    """Inputs made in this block hold rows ``index`` of a flattened batch of ``total`` tokens.

    A routing module (MoE experts) wraps each expert's call in it, so that a collector's (batch, seq)
    mask selects the routed tokens that are real (padding is routed too, and must not count).
    """
    previous = getattr(_ROUTED, "value", None)
    _ROUTED.value = (index, total)
    try:
        yield
    finally:
        _ROUTED.value = previous


def gram(rows: torch.Tensor, min_width: int = _TRIANGLE_MIN_WIDTH) -> torch.Tensor:
    """``rows^T rows`` (m x m; leading batch dimensions are kept).

    From ``min_width`` on, only the block upper triangle is multiplied (one GEMM per block row,
    k = 4 or 8 blocks) and mirrored: (k + 1) / 2k of the full product's flops. An MLP's second
    layer reads a 4x-wide input, so its covariance alone can cost more than the block's forward;
    the solvers use it for the Gram matrices of large weights too.
    """
    m = rows.shape[-1]
    if m < min_width:
        return rows.mT @ rows
    k = 8 if m >= 2 * min_width else 4
    edges = [i * m // k for i in range(k + 1)]
    out = rows.new_empty(*rows.shape[:-2], m, m)
    for i in range(k):
        lo, hi = edges[i], edges[i + 1]
        band = rows[..., lo:hi].mT @ rows[..., lo:]  # (hi - lo) x (m - lo)
        out[..., lo:hi, lo:] = band
        out[..., hi:, lo:hi] = band[..., hi - lo :].mT
    return out


def sandwich(C: torch.Tensor, M: torch.Tensor, min_width: int = _TRIANGLE_MIN_WIDTH) -> torch.Tensor:
    """``C M C^T`` for a symmetric M (n x m and m x m; leading batch dimensions are kept), exactly
    symmetric.

    From ``min_width`` on, M's symmetry saves work: with column blocks ``C_j`` and
    ``Z_j = sum_{i<j} C_i M_ij + C_j M_jj / 2`` the product is ``U + U^T``, ``U = Z C^T``, so only
    M's block upper triangle is multiplied: n m^2 / 2 + n^2 m multiply-adds instead of
    n m^2 + n^2 m (25 % less for a square C, 40 % for a 1:4 wide one). Below it (and for the
    diagonal blocks) M is read whole; off the diagonal only its upper blocks are read.
    """
    m = M.shape[-1]
    if m < min_width:
        K = C @ M @ C.mT
        return 0.5 * (K + K.mT)
    k = 8 if m >= 2 * min_width else 4
    edges = [i * m // k for i in range(k + 1)]
    Z = torch.empty_like(C)
    for j in range(k):
        lo, hi = edges[j], edges[j + 1]
        Zj = (0.5 * C[..., lo:hi]) @ M[..., lo:hi, lo:hi]
        if lo:
            Zj += C[..., :lo] @ M[..., :lo, lo:hi]
        Z[..., lo:hi] = Zj
    U = Z @ C.mT
    return U + U.mT


class CovarianceCollector:
    """Accumulate ``X^T X`` (float64) and token counts for named layers.

    Usage::

        with CovarianceCollector({"blocks.0.attn.q": q, ...}) as cov:
            for batch, valid in batches:
                with cov.mask(valid):          # optional (batch, seq) bool mask of real tokens
                    model(batch)
        M = cov.covariance("blocks.0.attn.q")
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        *,
        accumulate_dtype: str = "float32",
        storage_device: torch.device | str | None = None,
        share_inputs: bool = True,
        optional: Iterable[str] = (),
    ):
        if not modules:
            raise CalibrationError("no layers to calibrate (the target selection matched nothing)")
        if accumulate_dtype not in _ACCUMULATE_DTYPES:
            raise ValueError(f"accumulate_dtype must be one of {sorted(_ACCUMULATE_DTYPES)}, got {accumulate_dtype!r}")
        self.modules = dict(modules)
        self.compute_dtype = _ACCUMULATE_DTYPES[accumulate_dtype]
        self.storage_device = torch.device(storage_device) if storage_device is not None else None
        self.share_inputs = share_inputs
        self.optional = set(optional)  # layers that may receive no token (routed experts)
        self._sums: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, int] = {}
        self._calls: dict[str, int] = {name: 0 for name in self.modules}
        self._leader: dict[str, str] = {}  # layer -> layer whose accumulator it shares
        self._seen: set[str] = set()
        self._last_input: torch.Tensor | None = None
        self._last_owner: str | None = None
        self._mask: torch.Tensor | None = None
        self._mask_all = False  # the current mask keeps every position
        self._unmasked: frozenset[str] = frozenset()
        self._handles: list = []
        self._released: set[str] = set()

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> "CovarianceCollector":
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> None:
        if self._handles:
            return
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))
        except Exception:
            self.detach()
            raise

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last_input = None  # drop the reference to the last activation
        self._last_owner = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @contextlib.contextmanager
    def mask(self, valid: torch.Tensor | None, *, unmasked: Iterable[str] = ()) -> Iterator[None]:
        """Only positions where ``valid`` is True are accumulated during this block.

        ``valid`` is a bool tensor matching the input's leading dims, e.g. (batch, seq); a
        sequence-first layer's (seq, batch) layout is recognised and transposed. Layers named in
        ``unmasked`` read another sequence whose rows are all real (a cross-attention's key/value
        projections reading image tokens while the queries are padded text) and accumulate every row.
        """
        previous = self._mask, self._mask_all, self._unmasked
        self._mask = None if valid is None else valid.to(torch.bool)
        self._mask_all = self._mask is not None and bool(self._mask.all())
        self._unmasked = frozenset(unmasked)
        try:
            yield
        finally:
            self._mask, self._mask_all, self._unmasked = previous

    def _make_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                raise CalibrationError(f"layer '{name}' was called without a tensor input; cannot collect its covariance")
            self._observe(name, args[0])

        return hook

    # ------------------------------------------------------------------ accumulation
    def _select(self, name: str, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1, x.shape[-1])
        if self._mask is None or name in self._unmasked:
            return flat
        lead = tuple(x.shape[:-1])
        if self._mask_all:  # every position is real: nothing to select, whatever the layout
            return flat
        mask = self._mask.to(x.device)
        routed = getattr(_ROUTED, "value", None)
        if routed is not None and len(lead) == 1 and mask.numel() == routed[1] and lead[0] == routed[0].numel():
            return flat[mask.reshape(-1)[routed[0].to(x.device)]]  # the routed tokens' own validity
        squeezed = tuple(d for d in lead if d != 1)
        if tuple(mask.shape) == lead:
            keep = mask.reshape(-1)
        elif mask.dim() == 2 and 1 not in mask.shape and squeezed == tuple(mask.shape):
            keep = mask.reshape(-1)  # singleton axes inserted (MLA's (batch, 1, seq) latent): same row-major order
        elif mask.dim() == 2 and lead[:2] == tuple(mask.shape):
            keep = mask.reshape(*mask.shape, *([1] * (len(lead) - 2))).expand(lead).reshape(-1)  # per-token groups
        elif mask.dim() == 2 and tuple(mask.mT.shape) == lead:
            keep = mask.mT.reshape(-1)
        elif len(lead) == 1 and mask.numel() == lead[0]:  # tokens flattened row-major (OPT's MLP: (b*s, d))
            keep = mask.reshape(-1)
        elif mask.dim() == 2 and lead in ((mask.shape[0],), (mask.shape[0], 1), (1, mask.shape[0])):
            return flat  # one pooled row per sample (projection heads after pooling): every row is real
        else:
            raise CalibrationError(
                f"calibration mask of shape {tuple(mask.shape)} does not match the input of layer '{name}' "
                f"with leading shape {lead}"
            )
        return flat[keep]

    def _observe(self, name: str, x: torch.Tensor) -> None:
        self._calls[name] += 1
        if self.share_inputs:
            leader = self._leader.get(name)
            if leader is None and name not in self._seen and x is self._last_input and self._last_owner is not None:
                leader = self._leader[name] = self._last_owner
            self._seen.add(name)
            if leader is not None:
                if x is not self._last_input:
                    raise CalibrationError(
                        f"layer '{name}' shared its input with '{leader}' on the first batch but not later; "
                        "run the calibration with share_inputs=False for this model"
                    )
                return
        rows = self._select(name, x)
        n = rows.shape[0]
        if n:
            product = gram(rows.to(self.compute_dtype))
            if self.storage_device is not None:
                product = product.to(self.storage_device)
            if name in self._sums:
                self._sums[name].add_(product)  # promoted in place: no float64 copy of the batch's product
            else:
                self._sums[name] = product.to(torch.float64)
        self._tokens[name] = self._tokens.get(name, 0) + n
        if self.share_inputs:
            self._last_input = x
            self._last_owner = name

    # ------------------------------------------------------------------ results
    def _owner(self, name: str) -> str:
        if name not in self.modules:
            raise KeyError(f"'{name}' is not a calibrated layer")
        return self._leader.get(name, name)

    def missing(self) -> list[str]:
        """Layers that received no (unmasked) token at all (``optional`` ones are not missing)."""
        return [n for n in self.modules if n not in self.optional and self._tokens.get(self._owner(n), 0) == 0]

    def check_complete(self) -> None:
        missing = self.missing()
        if missing:
            shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise CalibrationError(
                f"these layers received no input during calibration: {shown}. Check that the calibration "
                "batches run through the part of the model that holds them (and are not fully masked)."
            )

    def covariance(self, name: str) -> torch.Tensor:
        """``X^T X`` summed over all valid tokens seen by ``name`` (float64, shared tensors are not copied)."""
        owner = self._owner(name)
        if owner not in self._sums:
            raise CalibrationError(f"layer '{name}' received no input during calibration")
        return self._sums[owner]

    def token_count(self, name: str) -> int:
        return self._tokens.get(self._owner(name), 0)

    def call_count(self, name: str) -> int:
        return self._calls[name]

    def covariances(self) -> dict[str, torch.Tensor]:
        self.check_complete()
        return {name: self.covariance(name) for name in self.modules}

    @property
    def shared_inputs(self) -> dict[str, list[str]]:
        """Accumulator owner -> every layer that reads it (only owners with followers)."""
        groups: dict[str, list[str]] = {}
        for follower, owner in self._leader.items():
            groups.setdefault(owner, [owner]).append(follower)
        return groups

    def release(self, name: str) -> None:
        """Free a layer's accumulator once it is no longer needed (shared owners stay while used)."""
        owner = self._owner(name)
        users = [n for n in self.modules if self._owner(n) == owner]
        if all(n == name or n in self._released for n in users):
            self._sums.pop(owner, None)
        self._released.add(name)


def collect_covariances(
    modules: Mapping[str, nn.Module],
    run: Callable[["CovarianceCollector"], None],
    **kwargs,
) -> CovarianceCollector:
    """Attach a collector, call ``run(collector)`` (which does the forwards), always detach."""
    collector = CovarianceCollector(modules, **kwargs)
    collector.attach()
    try:
        run(collector)
    finally:
        collector.detach()
    collector.check_complete()
    return collector
