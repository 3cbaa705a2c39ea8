"""Layer-wise (sequential) compression for decoder LLMs that do not fit whole-model calibration.

Whole-model mode holds every target's covariance at once (for Llama-7B about 40 GiB of float64
``X^T X``). Sequential mode processes one decoder block at a time, as GPTQ does:

1. **Spectra first** (data-agnostic): singular values of every target weight, block by block, so
   rank planning -- including a global ``target_reduction`` -- is done before any calibration.
2. **Catch the block inputs**: run the embeddings once per calibration batch with every block's
   ``forward`` replaced by a recorder (the GPTQ ``Catcher``, generalised to record each block's own
   kwargs: attention mask, position ids / rotary embeddings, Qwen2's per-layer sliding masks).
3. **Per block**: accumulate only that block's covariances, factorise its layers with the same
   solvers, rank plan, :class:`~vlmpress.core.lowrank.LowRankLinear` and report rows as
   :func:`vlmpress.pipeline.compress.compress`, then feed the next block the *original* or the *compressed*
   block's outputs (``config.propagate``). With ``original`` the covariances equal whole-mode's
   exactly (same batches, same ops).

Memory bound (fp32 activations, ``T = n_samples * seq_len`` calibration tokens, hidden size ``d``):
the compute device holds one block (dense weights + its factors while they are built) plus that
block's covariances (``8 * sum_i d_in_i^2`` bytes, inputs shared by q/k/v and gate/up counted once)
plus one batch of activations; host RAM additionally holds the block inputs and outputs
(``2 * 4 * T * d`` bytes) and whatever of the model is resident -- with accelerate disk offload
(``device_map`` + ``offload_folder``) that is only the embeddings, the head and the blocks
compressed so far (a block is read from disk when its turn comes and stays resident, compressed).

Works on CPU and CUDA: a block on the host is moved to the compute device for its turn and moved
back; a block dispatched by accelerate (``device_map``) runs on its own execution device.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vlmpress.adapters.base import ModelAdapter, TargetLayer
from vlmpress.pipeline.rank_plan import reduction_of, tolerance_key
from vlmpress.pipeline.compress import (
    SVD_CACHE_BYTES,
    count_parameters,
    dense_layer_report,
    factorise_layer,
    finish_report,
    layer_plan,
    layer_spectrum,
    needs_singular_vectors,
    plan_ranks,
    resolve_device,
    select_layers,
)
from vlmpress.pipeline.config import CompressionConfig
from vlmpress.core.covariance import CovarianceCollector
from vlmpress.core.rank import saves_parameters
from vlmpress.errors import CalibrationError, ConfigError
from vlmpress.pipeline.report import CompressionReport, LayerReport

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the last block's recorder: nothing after the blocks is needed for calibration."""


@dataclass
class BlockInputs:
    """Per calibration batch: the first block's input, and every block's other call arguments."""

    hidden: list[torch.Tensor] = field(default_factory=list)  # per batch, on the storage device
    args: list[list[tuple]] = field(default_factory=list)  # [block][batch] extra positional args
    kwargs: list[list[dict]] = field(default_factory=list)  # [block][batch] keyword args
    valid: list[torch.Tensor | None] = field(default_factory=list)  # per batch (batch, seq) bool


# ----------------------------------------------------------------------------- devices / offload


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _hooks_of(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))  # accelerate SequentialHook holds several


def _offloaded_value(block: nn.Module, rel_name: str) -> torch.Tensor | None:
    """The tensor ``rel_name`` (relative to ``block``) from an accelerate offload weights map."""
    for mod_name, module in block.named_modules():
        for hook in _hooks_of(module):
            if not getattr(hook, "offload", False) or getattr(hook, "weights_map", None) is None:
                continue
            prefix = f"{mod_name}." if mod_name else ""
            if not rel_name.startswith(prefix):
                continue
            key = rel_name[len(prefix) :]
            if "." in key and not getattr(hook, "place_submodules", False):
                continue
            try:
                return hook.weights_map[key]
            except KeyError:
                continue
    return None


def _materialize_offloaded(block: nn.Module, device: torch.device) -> bool:
    """Load a disk/CPU-offloaded block's tensors onto ``device`` and drop its accelerate hooks.

    Returns True when the block was offloaded. The block then is an ordinary resident module.
    """
    offloaded = any(
        getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None
        for m in block.modules()
        for h in _hooks_of(m)
    )
    if not offloaded:
        return False
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    for name, tensor in list(block.named_parameters()) + list(block.named_buffers()):
        if tensor.device.type != "meta":
            continue
        value = _offloaded_value(block, name)
        if value is None:
            raise ConfigError(f"cannot find the offloaded weights of '{name}' in its accelerate hook")
        set_module_tensor_to_device(block, name, device, value=value)
    remove_hook_from_module(block, recurse=True)
    return True


def _execution_device(block: nn.Module) -> torch.device | None:
    """The accelerate execution device of a dispatched (not offloaded) block, if any."""
    for module in block.modules():
        for hook in _hooks_of(module):
            dev = getattr(hook, "execution_device", None)
            if dev is not None:
                return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    return None


def _home_device(block: nn.Module) -> torch.device:
    for p in block.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def block_on_device(block: nn.Module, compute: torch.device) -> Iterator[torch.device]:
    """Make ``block`` runnable for its turn; yields the device it runs on.

    Offloaded blocks are loaded (to ``compute`` when it is CUDA, else the host) and stay resident;
    dispatched blocks run on their accelerate execution device; host blocks move to a CUDA compute
    device for the turn and back afterwards.
    """
    if _materialize_offloaded(block, compute):
        home = torch.device("cpu")
        run = _home_device(block)
    else:
        dispatched = _execution_device(block)
        home = _home_device(block)
        run = dispatched if dispatched is not None else (compute if compute.type == "cuda" else home)
    moved = run != home and _execution_device(block) is None
    if moved:
        block.to(run)
    try:
        yield run
    finally:
        if moved:
            block.to(home)


# ----------------------------------------------------------------------------- capture


def _replace_forward(block: nn.Module, fn: Callable) -> Callable[[], None]:
    """Temporarily shadow ``block.forward`` (keeps accelerate's instance-level forward intact)."""
    had_own = "forward" in block.__dict__
    saved = block.__dict__.get("forward")
    block.forward = fn

    def restore() -> None:
        if had_own:
            block.forward = saved
        else:
            del block.forward

    return restore


def capture_block_inputs(
    adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]], storage: torch.device | str = "cpu"
) -> BlockInputs:
    """Run the embeddings once per batch and record what every decoder block would be called with."""
    blocks = [b for _, b in adapter.decoder_blocks()]  # type: ignore[attr-defined]
    captured = BlockInputs(args=[[] for _ in blocks], kwargs=[[] for _ in blocks])
    storage = torch.device(storage)

    def recorder(i: int) -> Callable:
        def record(hidden, *args, **kwargs):
            if i == 0:
                captured.hidden.append(hidden.detach().to(storage))
            captured.args[i].append(args)
            captured.kwargs[i].append(kwargs)
            if i == len(blocks) - 1:
                raise _StopForward
            return hidden

        return record

    restores = [_replace_forward(block, recorder(i)) for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="catch block inputs", unit="batch", leave=False):
                mask = batch.get("attention_mask")
                captured.valid.append(mask.to(torch.bool) if mask is not None else None)
                try:
                    adapter.forward_tokens(batch, logits=False)  # type: ignore[attr-defined]
                except _StopForward:
                    pass
                else:  # pragma: no cover - a model that skips its last block
                    raise CalibrationError("the model's forward did not reach its last decoder block")
    finally:
        for restore in restores:
            restore()
    return captured


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(
    block: nn.Module,
    hidden: list[torch.Tensor],
    args: list[tuple],
    kwargs: list[dict],
    run_device: torch.device,
    *,
    collector: CovarianceCollector | None = None,
    valid: list[torch.Tensor | None] | None = None,
    keep_outputs: bool = True,
    storage: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """Call one block on every batch (optionally under a covariance collector); outputs on ``storage``."""
    outputs: list[torch.Tensor] = []
    with torch.no_grad():
        for j, h in enumerate(hidden):
            ctx = collector.mask(valid[j]) if collector is not None and valid is not None else contextlib.nullcontext()
            with ctx:
                out = _block_output(block(h.to(run_device), *_to_device(args[j], run_device), **_to_device(kwargs[j], run_device)))
            if keep_outputs:
                outputs.append(out.detach().to(storage))
    return outputs


# ----------------------------------------------------------------------------- spectra


def _layer_weight(block: nn.Module, block_prefix: str, layer: TargetLayer) -> torch.Tensor:
    """(out x in) weight of a target, read from the offload map when the block lives on disk."""
    W = layer.weight_matrix
    if W.device.type != "meta":
        return W.detach()
    value = _offloaded_value(block, f"{layer.name[len(block_prefix) + 1 :]}.weight")
    if value is None:
        raise ConfigError(f"the weight of '{layer.name}' is on the meta device and no offload map holds it")
    return value.T if type(layer.module).__name__ == "Conv1D" else value


def _block_spectra(
    blocks: list[tuple[str, nn.Module]],
    layers_by_block: list[list[TargetLayer]],
    device: torch.device,
    keep_vectors: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Singular values of every target, block by block, computed exactly as whole mode does.

    Both modes call :func:`layer_spectrum` with the same cache budget (vectors dropped here), so
    the tolerance ranks are bit-identical between the two modes.
    """
    values: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    budget = SVD_CACHE_BYTES if keep_vectors else 0
    total = sum(len(ls) for ls in layers_by_block)
    with tqdm(total=total, desc="spectra", unit="layer", leave=False) as progress:
        for (prefix, block), layers in zip(blocks, layers_by_block):
            for layer in layers:
                t0 = time.perf_counter()
                W = _layer_weight(block, prefix, layer)
                S, _, used = layer_spectrum(W, device, budget)
                budget -= used
                values[layer.name] = S.cpu()
                seconds[layer.name] = time.perf_counter() - t0
                progress.update()
    return values, seconds


# ----------------------------------------------------------------------------- main entry


def _group_by_block(
    layers: list[TargetLayer], blocks: list[tuple[str, nn.Module]]
) -> list[list[TargetLayer]]:
    by_block: list[list[TargetLayer]] = [[] for _ in blocks]
    index = {prefix: i for i, (prefix, _) in enumerate(blocks)}
    outside = []
    for layer in layers:
        i = next((k for prefix, k in index.items() if layer.name.startswith(prefix + ".")), None)
        if i is None:
            outside.append(layer.name)
        else:
            by_block[i].append(layer)
    if outside:
        raise ConfigError(
            f"sequential mode compresses decoder blocks only; {', '.join(outside[:4])} lie outside them. "
            "Exclude them (--exclude) or use --mode whole"
        )
    return by_block


def compress_sequential(
    adapter: ModelAdapter,
    config: CompressionConfig,
    calibration: Any = None,
    *,
    covariance_sink: dict[str, torch.Tensor] | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
) -> CompressionReport:
    """Compress ``adapter.model`` one decoder block at a time; same report as :func:`compress`.

    ``covariance_sink`` (diagnostics/tests) receives a copy of every factorised layer's covariance.
    With ``state_dir``, every finished block (factors + report rows) is persisted there atomically;
    ``resume=True`` reloads the finished blocks and continues with the next one, giving the same
    result as an uninterrupted run (see :mod:`vlmpress.pipeline.sequential_state`).
    """
    config.validate()
    if not hasattr(adapter, "decoder_blocks"):
        raise ConfigError(f"sequential mode needs a decoder LLM adapter; {adapter.family} has no decoder blocks")
    t_start = time.perf_counter()
    device = resolve_device(config.device)
    storage = torch.device("cpu")
    layers = select_layers(adapter, config)
    blocks = adapter.decoder_blocks()  # type: ignore[attr-defined]
    by_block = _group_by_block(layers, blocks)
    whole_before = count_parameters(adapter.model)
    plans = {layer.name: layer_plan(layer) for layer in layers}
    state = None
    if state_dir is not None:
        from vlmpress.pipeline.sequential_state import SequentialState

        state = SequentialState.open(state_dir, adapter.spec, config.to_dict(), len(blocks), resume=resume)
    done = set(state.done_blocks()) if state is not None else set()

    # 1. spectra of every target and a global rank plan (data-agnostic)
    t0 = time.perf_counter()
    svd_seconds: dict[str, float] = {}
    if config.rank_rule == "tolerance":
        values, svd_seconds = _block_spectra(blocks, by_block, device, needs_singular_vectors(config, device))
        for name, plan in plans.items():
            plan.singular_values = values[name]
    t_spectra = time.perf_counter() - t0
    plan_list = [plans[layer.name] for layer in layers]
    ranks, used_tolerances, ratio = plan_ranks(plan_list, config)
    compressible = {
        p.name for p in plan_list if saves_parameters(p.out_features, p.in_features, ranks[p.name])
    }
    logger.info(
        "%s (sequential, propagate=%s): %d target layers in %d blocks, %d factorised (planned reduction %.2f%%)",
        config.method, config.propagate, len(layers), len(blocks), len(compressible), 100 * reduction_of(plan_list, ranks),
    )

    # 2. catch the first block's inputs and every block's kwargs
    t0 = time.perf_counter()
    captured: BlockInputs | None = None
    needs_data = (config.needs_activations or calibration is not None) and bool(compressible)  # svd: measured error
    if needs_data:
        if calibration is None:
            raise CalibrationError(f"method {config.method} needs calibration text (--calib-text)")
        batches = adapter.token_batches(calibration, config.batch_size)  # type: ignore[attr-defined]
        was_training = adapter.model.training
        adapter.model.eval()
        captured = capture_block_inputs(adapter, batches, storage)
        adapter.model.train(was_training)
    t_calib = time.perf_counter() - t0

    # 3. block by block
    reports: list[LayerReport] = []
    t_factor = 0.0
    hidden = captured.hidden if captured is not None else None
    last_needed = max((i for i, ls in enumerate(by_block) if any(l.name in compressible for l in ls)), default=-1)
    for i, ((prefix, block), block_layers) in enumerate(
        tqdm(list(zip(blocks, by_block)), desc="blocks", unit="block", leave=False)
    ):
        todo = [layer for layer in block_layers if layer.name in compressible]
        for layer in block_layers:
            if layer.name not in compressible:
                plan = plans[layer.name]
                tol = used_tolerances[tolerance_key(plan, used_tolerances)] if used_tolerances else None
                reports.append(dense_layer_report(plan, ranks[plan.name], tol, ratio))
        if i in done:  # finished before an interruption: reload its factors, recompute its outputs
            hidden = _resume_block(adapter, state, i, block, todo, reports, hidden, captured,
                                   needs_data and i < last_needed, config, device, storage)
            continue
        if not todo and (not needs_data or i >= last_needed):
            if state is not None:
                state.save_block(i, {}, [], {})
            continue  # nothing to do here, and no later block needs this block's outputs
        with block_on_device(block, device) as run_device:
            # target modules are looked up again: materialising an offloaded block keeps the objects,
            # but a fresh lookup is robust to adapters that rebuild them
            todo = [TargetLayer(l.name, l.group, l.kind, adapter.model.get_submodule(l.name)) for l in todo]
            collector = None
            outputs = None
            if needs_data:
                t0 = time.perf_counter()
                keep = i < last_needed and config.propagate == "original"
                if todo:
                    collector = CovarianceCollector(
                        {l.name: l.module for l in todo}, accumulate_dtype=config.accumulate_dtype
                    )
                    with collector:
                        outputs = run_block(
                            block, hidden, captured.args[i], captured.kwargs[i], run_device,
                            collector=collector, valid=captured.valid, keep_outputs=keep, storage=storage,
                        )
                    collector.check_complete()
                else:
                    outputs = run_block(block, hidden, captured.args[i], captured.kwargs[i], run_device, storage=storage)
                t_calib += time.perf_counter() - t0
            t0 = time.perf_counter()
            for layer in todo:
                plan = plans[layer.name]
                tol = used_tolerances[tolerance_key(plan, used_tolerances)] if used_tolerances else None
                M = tokens = None
                if collector is not None:
                    M, tokens = collector.covariance(layer.name), collector.token_count(layer.name)
                    if covariance_sink is not None:
                        covariance_sink[layer.name] = M.detach().cpu().clone()
                reports.append(
                    factorise_layer(
                        adapter, layer, plan, ranks[plan.name], config, device, tol=tol, ratio=ratio, M=M,
                        tokens=tokens, extra_seconds=svd_seconds.get(layer.name, 0.0),
                    )
                )
                if collector is not None:
                    collector.release(layer.name)
            t_factor += time.perf_counter() - t0
            del collector
            if state is not None:
                state.save_block(i, _factor_tensors(adapter, todo), reports[-len(todo):] if todo else [], {})
            if needs_data and i < last_needed:
                if config.propagate == "compressed" and todo:
                    t0 = time.perf_counter()
                    outputs = run_block(block, hidden, captured.args[i], captured.kwargs[i], run_device, storage=storage)
                    t_calib += time.perf_counter() - t0
                hidden = outputs
        if i >= last_needed:
            hidden = None  # free the activations as soon as no later block needs them

    return finish_report(
        adapter, config, layers, reports, used_tolerances, ratio, whole_before, calibration,
        {"spectra": t_spectra, "calibration": t_calib, "factorisation": t_factor, "total": time.perf_counter() - t_start},
        calibration_extra={"mode": "sequential", "propagate": config.propagate},
    )


def _factor_tensors(adapter: ModelAdapter, layers: list[TargetLayer]) -> dict[str, torch.Tensor]:
    return {
        f"{layer.name}.{key}": value
        for layer in layers
        for key, value in adapter.model.get_submodule(layer.name).state_dict().items()
    }


def _load_factors(adapter: ModelAdapter, layers: list[TargetLayer], tensors: dict[str, torch.Tensor]) -> None:
    """Swap in the saved LowRankLinear of each layer (on the device/dtype its weight has now)."""
    from vlmpress.adapters.base import replace_module, weight_matrix
    from vlmpress.core.lowrank import LowRankLinear
    from vlmpress.errors import CheckpointError

    for layer in layers:
        module = adapter.model.get_submodule(layer.name)
        A, B = tensors.get(f"{layer.name}.A"), tensors.get(f"{layer.name}.B")
        if A is None or B is None:
            raise CheckpointError(f"saved progress lacks the factors of '{layer.name}'; delete the state directory to start over")
        W = weight_matrix(module)
        bias = tensors.get(f"{layer.name}.bias")
        out_f, in_f = W.shape
        r = A.shape[1] if A.dim() == 2 else -1
        if (A.dim() != 2 or B.dim() != 2 or A.shape[0] != out_f or tuple(B.shape) != (r, in_f) or not 1 <= r <= min(out_f, in_f)
                or (bias is not None and tuple(bias.shape) != (out_f,))):
            raise CheckpointError(
                f"saved progress holds factors of shape {tuple(A.shape)} x {tuple(B.shape)} for '{layer.name}', a "
                f"{out_f}x{in_f} layer; delete the state directory to start over"
            )
        new = LowRankLinear(W.shape[1], W.shape[0], A.shape[1], bias=bias is not None, device=W.device, dtype=W.dtype)
        new.load_state_dict({k[len(layer.name) + 1:]: v for k, v in tensors.items() if k.startswith(layer.name + ".")})
        replace_module(adapter.model, layer.name, new)


def _resume_block(adapter, state, index, block, todo, reports, hidden, captured, need_outputs, config, device, storage):
    """Restore a block finished before an interruption; returns the next block's input (or None)."""
    tensors, saved, _ = state.load_block(index)
    from vlmpress.errors import CheckpointError

    if [r.name for r in saved] != [l.name for l in todo]:
        raise CheckpointError(
            f"saved block {index} in {state.directory} holds layers {[r.name for r in saved][:3]}, this run compresses "
            f"{[l.name for l in todo][:3]}; delete that directory to start over"
        )
    expected_keys = {k for l in todo for k in tensors if k.startswith(l.name + ".")}
    if set(tensors) != expected_keys:
        raise CheckpointError(f"saved block {index} in {state.directory} holds tensors of other layers; delete that directory to start over")
    reports.extend(saved)
    todo = [TargetLayer(l.name, l.group, l.kind, adapter.model.get_submodule(l.name)) for l in todo]
    with block_on_device(block, device) as run_device:
        outputs = None
        if need_outputs and config.propagate == "original":  # the uncompressed block's outputs feed forward
            outputs = run_block(block, hidden, captured.args[index], captured.kwargs[index], run_device, storage=storage)
        _load_factors(adapter, todo, tensors)
        if need_outputs and config.propagate == "compressed":
            outputs = run_block(block, hidden, captured.args[index], captured.kwargs[index], run_device, storage=storage)
    return outputs


__all__ = ["BlockInputs", "block_on_device", "capture_block_inputs", "compress_sequential", "run_block"]
