"""The causal-LM zoo census: every ``AutoModelForCausalLM`` family through a real tiny round trip.

A family is **ok** only when all of this passes on its tiny model (:mod:`vlmpress.census.tiny_configs`):

1. ``save_pretrained`` of the random tiny model and ``hf:DIR`` resolved by the registry to
   :class:`~vlmpress.adapters.hf_causal_lm.HFCausalLMAdapter` (structural discovery);
2. ``compress`` with PGSVD (tolerance ``EPS``, a few windows of random token ids), at least one
   layer factorised, finite logits;
3. ``save_compressed`` -> ``load_compressed``: logits equal to the compressed model's;
4. ``export_dense`` -> stock ``AutoModelForCausalLM.from_pretrained``: logits equal up to float
   rounding (``ATOL``);
5. sequential mode (one block at a time, progress saved per block) on a fresh copy gives the whole
   mode's ranks, and resuming it from its saved state gives the same model.

Rows record the decoder blocks found, the kinds of their linears, the share of the decoder's
parameters that are targets (per-expert layers of split MoE experts included), expert counts, the
per-expert layers and how many were factorised from their weights alone (too few routed tokens),
fused expert tensors kept dense and why, the stage that failed and why. Families whose config has a vision part are image-text-to-text models (the generative VLM
table), not rows here.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

EPS = 0.6  # random tiny weights need a loose tolerance before a factor saves parameters
WINDOWS, SEQ_LEN = 8, 32  # 256 tokens: most tiny experts (top-2 of 4) see more tokens than inputs
ATOL = 1e-4
MAX_TINY_PARAMS = 3_000_000  # a shrunk config above this did not shrink (an unknown size field)


@dataclass
class CensusRow:
    """One causal-LM family's census result (``status``: ok / failed / not built / vlm)."""

    family: str
    status: str
    stage: str = ""
    reason: str = ""
    note: str = ""
    block_path: str = ""
    blocks: int = 0
    hybrid: bool = False
    kinds: dict[str, int] = field(default_factory=dict)
    decoder_params: int = 0
    targeted_params: int = 0
    fused_expert_params: int = 0  # fused 3-D expert tensors left fused (dense): their layout is not declared
    fused_kept_reason: str = ""
    experts: int | None = None
    expert_layers: int = 0  # per-expert layers (one per expert and matrix) among the targets
    expert_weight_only: int = 0  # of those, factorised from the weight alone (fewer routed tokens than inputs)
    factorised: int = 0
    max_logit_diff: float | None = None
    seconds: float = 0.0

    @property
    def targeted_share(self) -> float:
        return self.targeted_params / self.decoder_params if self.decoder_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targeted_share": round(self.targeted_share, 4)}


def causal_lm_families() -> list[str]:
    """Every ``model_type`` transformers maps to an ``AutoModelForCausalLM`` class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _random_windows(vocab: int, seed: int = 0):
    from vlmpress.data.text_calibration import TokenCalibration

    gen = torch.Generator().manual_seed(seed)
    high = max(4, min(vocab, 256))
    windows = [torch.randint(3, high, (SEQ_LEN,), generator=gen) for _ in range(WINDOWS)]
    return TokenCalibration(windows, "random token ids", SEQ_LEN, pad_token_id=0, seed=seed)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def _structure(row: CensusRow, adapter) -> list:
    """Fill the structural fields from the adapter; returns its target layers."""
    from vlmpress.adapters.routed_experts import EXPERT_KINDS, config_expert_counts

    adapter.prepare_for_compression()  # splits fused MoE experts into per-expert layers
    blocks = adapter.decoder_blocks()
    targets = adapter.target_layers()
    row.block_path = adapter._blocks.path
    row.blocks = len(blocks)
    row.hybrid = not adapter._blocks.homogeneous
    row.kinds = dict(Counter(t.kind for t in targets if t.kind != "head"))
    row.decoder_params = sum(p.numel() for _, b in blocks for p in b.parameters())
    row.targeted_params = sum(
        p.numel() for t in targets if t.kind != "head" for p in t.module.parameters()
    )
    kept = [item for item in adapter.fused_experts if item.reason is not None]
    row.fused_expert_params = sum(item.params for item in kept)
    row.fused_kept_reason = kept[0].reason if kept else ""
    row.expert_layers = sum(t.kind in EXPERT_KINDS for t in targets)
    row.experts = max(config_expert_counts(adapter.model.config), default=None)
    return targets


def census_family(family: str, workdir: str | Path | None = None, *, sequential: bool = True) -> CensusRow:
    """Run one family through the round trip of the module docstring; never raises."""
    t0 = time.perf_counter()
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix=f"census-{family}-") as tmp:
            return census_family(family, tmp, sequential=sequential)
    row = CensusRow(family, "failed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _run(row, family, Path(workdir), sequential, lambda s: _set_stage(row, s))
        row.status = "ok"
        row.stage = ""
    except _NotBuilt as err:
        row.status, row.reason = "not built", str(err)
    except _IsVLM as err:
        row.status, row.reason = "vlm", str(err)
    except Exception as err:  # noqa: BLE001 - the table records why a family fails
        row.status, row.reason = "failed", _first_line(err)
        logger.debug("census %s failed at %s", family, row.stage, exc_info=True)
    row.seconds = round(time.perf_counter() - t0, 2)
    return row


class _NotBuilt(Exception):
    pass


class _IsVLM(Exception):
    pass


def _set_stage(row: CensusRow, stage: str) -> None:
    row.stage = stage


def _run(row: CensusRow, family: str, work: Path, sequential: bool, stage) -> None:
    from transformers import AutoModelForCausalLM

    from vlmpress.adapters.hf_causal_lm import HFCausalLMAdapter, has_vision_part
    from vlmpress.adapters.registry import adapter_for_spec
    from vlmpress.census.tiny_configs import tiny_config
    from vlmpress.pipeline.checkpoint import export_dense, load_compressed, save_compressed
    from vlmpress.pipeline.compress import compress
    from vlmpress.pipeline.config import CompressionConfig

    stage("config")
    try:
        config, row.note = tiny_config(family)
    except Exception as err:  # noqa: BLE001
        raise _NotBuilt(f"the shrunk default config is invalid ({_first_line(err)})") from None
    if has_vision_part(config.to_dict()):
        raise _IsVLM("image-text-to-text family (vision part): see the generative VLM rows")
    stage("build")
    try:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
        n = sum(p.numel() for p in meta.parameters())
        del meta
        if n > MAX_TINY_PARAMS:
            raise _NotBuilt(f"the default config did not shrink ({n:,} parameters: a size field the rules do not know)")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        _logits(model, torch.arange(3, 3 + SEQ_LEN)[None] % max(4, config.vocab_size))  # the family's own forward runs
        model.save_pretrained(work / "model", safe_serialization=True)
    except _NotBuilt:
        raise
    except Exception as err:  # noqa: BLE001
        raise _NotBuilt(f"the tiny model does not build or run its own forward ({_first_line(err)})") from None
    spec = f"hf:{work / 'model'}"
    stage("discovery")
    if adapter_for_spec(spec) is not HFCausalLMAdapter:
        raise RuntimeError(f"the registry resolves {spec} to another adapter")
    adapter = HFCausalLMAdapter.load(spec)
    targets = _structure(row, adapter)
    if not targets:
        raise RuntimeError("no target layer found in the decoder blocks")
    calib = _random_windows(model.config.vocab_size)
    ids = torch.stack(calib.windows[:2])
    stage("compress")
    cfg = CompressionConfig(model=spec, method="pgsvd", eps=EPS, device="cpu", batch_size=2, als_iters=1)
    report = compress(adapter, cfg, calib)
    row.factorised = len(report.rank_map)
    row.expert_weight_only = report.expert_totals()["weight_only"]
    if not row.factorised:
        raise RuntimeError(f"no layer factorised at eps={EPS}")
    stage("forward")
    ref = _logits(adapter.model, ids)
    if not torch.isfinite(ref).all():
        raise RuntimeError("the compressed model's logits are not finite")
    stage("save/load")
    save_compressed(adapter, work / "compressed", report)
    loaded = load_compressed(work / "compressed")
    diff = (_logits(loaded.model, ids) - ref).abs().max().item()
    if diff > ATOL:
        raise RuntimeError(f"load_compressed changes the logits by {diff:.2e}")
    stage("export_dense")
    export_dense(loaded, work / "dense")
    stock = AutoModelForCausalLM.from_pretrained(work / "dense").eval()
    row.max_logit_diff = (_logits(stock, ids) - ref).abs().max().item()
    if row.max_logit_diff > ATOL * max(1.0, ref.abs().max().item()):
        raise RuntimeError(f"the stock reload of the dense export differs by {row.max_logit_diff:.2e}")
    if sequential:
        stage("sequential")
        from vlmpress.pipeline.sequential import compress_sequential

        first = HFCausalLMAdapter.load(spec)
        seq = compress_sequential(first, cfg, calib, state_dir=work / "state")
        if seq.rank_map != report.rank_map:
            raise RuntimeError("sequential mode planned other ranks than whole mode")
        stage("resume")
        resumed = HFCausalLMAdapter.load(spec)
        again = compress_sequential(resumed, cfg, calib, state_dir=work / "state", resume=True)
        diff = (_logits(resumed.model, ids) - _logits(first.model, ids)).abs().max().item()
        if again.rank_map != seq.rank_map or diff > ATOL:
            raise RuntimeError(f"resuming a finished sequential run changes the model (logits by {diff:.2e})")




def summarize(rows: list[dict]) -> dict[str, Any]:
    """Counts of the table: ok among the families that build offline (vision families excluded)."""
    built = [r for r in rows if r["status"] in ("ok", "failed")]
    ok = [r for r in built if r["status"] == "ok"]
    return {
        "families": len(rows),
        "vlm": sum(r["status"] == "vlm" for r in rows),
        "not_built": sum(r["status"] == "not built" for r in rows),
        "built": len(built),
        "ok": len(ok),
        "ok_share": round(len(ok) / len(built), 4) if built else 0.0,
    }


def _kinds_cell(kinds: dict[str, int]) -> str:
    return "/".join(f"{k}:{v}" for k, v in sorted(kinds.items())) or "-"


def markdown(rows: list[dict], meta: dict) -> str:
    """The committed ``eval/zoo/causal_lm.md`` table."""
    s = summarize(rows)
    lines = [
        "# Causal-LM zoo: every transformers `AutoModelForCausalLM` family",
        "",
        f"Generated by `python scripts/zoo_table.py --causal-lm` ({meta['date']}, transformers {meta['transformers']}, "
        f"torch {meta['torch']}, {meta['seconds']:.0f} s on {meta['machine']}).",
        "",
        "Each family's default config is shrunk (`vlmpress/census/tiny_configs.py`) and its random tiny model goes",
        f"through a real round trip: PGSVD at eps={EPS} on {WINDOWS} windows of {SEQ_LEN} random token ids -> forward ->",
        "`save_compressed` -> `load_compressed` (same logits) -> `export_dense` -> stock `from_pretrained` (logits within",
        f"{ATOL:g} relative) -> sequential mode (same ranks) -> resume from its saved state (same logits). **ok** means all of it passed. *share* = targeted share of the",
        "decoder blocks' parameters. MoE experts: fused 3-D expert tensors are split into one layer per expert and matrix and",
        "targeted (*expert layers*; in parentheses those factorised from their weights alone because the few calibration",
        "tokens routed to them were fewer than their inputs); *fused kept* = expert tensors whose layout is not declared,",
        "left fused and dense (reason under *why*).",
        "",
        f"**{s['ok']} of {s['built']} families that build offline are ok ({100 * s['ok_share']:.1f} %)**; "
        f"{s['not_built']} do not build from a shrunk default config (reason given), {s['vlm']} are image-text-to-text "
        "families (vision part: generative VLM table).",
        "",
        "| family | status | blocks | kinds | share | experts | expert layers | fused kept | failed at | why / note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        blocks = f"{r['blocks']} × `{r['block_path']}`" + (" (hybrid)" if r["hybrid"] else "") if r["blocks"] else "-"
        kept = r.get("fused_kept_reason") and f"experts kept fused: {r['fused_kept_reason']}"
        why = "; ".join(filter(None, [r["reason"], kept, r["note"] and f"override: {r['note']}"])).replace("|", "/")
        layers = f"{r['expert_layers']} ({r['expert_weight_only']})" if r.get("expert_layers") else "-"
        lines.append(
            f"| {r['family']} | {r['status']} | {blocks} | {_kinds_cell(r['kinds'])} | "
            f"{100 * r['targeted_share']:.0f} % | {r['experts'] or '-'} | {layers} | {r['fused_expert_params'] or '-'} | "
            f"{r['stage'] or '-'} | {why} |"
        )
    return "\n".join(lines) + "\n"


__all__ = ["ATOL", "EPS", "CensusRow", "causal_lm_families", "census_family", "markdown", "summarize"]
