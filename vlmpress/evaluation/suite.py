"""Benchmark suites: one model x {methods} x {reduction levels}, zero-shot evaluated, Table 2 out.

A suite (YAML in ``eval/suites/``) names a model (a spec, or ``reference:<name>`` for vlmpress's
own trained reference CLIPs), the evaluation data (a registered dataset's test split or
``reference:<name>``), the calibration data (always a *train* split or a user folder), the methods,
the reduction levels and, for PGSVD, the tower allocations to compare. The runner:

1. loads the model and evaluates it (the Base row);
2. collects the input covariances and weight SVDs once, on the uncompressed model;
3. for every method x level (x allocation) compresses a copy, reusing (2), evaluates it, and
   appends the record to ``results.jsonl`` at once (a crash keeps every finished row);
4. writes the Table 2 layout (Markdown + CSV), the accuracy-vs-reduction plot and the per-layer
   rank profile plot.

Evaluation images are preprocessed once and shared by every variant.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from vlmpress.pipeline.loading import load_model
from vlmpress.pipeline.compress import calibrate, compress, select_layers
from vlmpress.pipeline.config import METHOD_LABELS, CompressionConfig
from vlmpress.data.calibration import CalibrationSet, build_calibration_set, captions_from_classes
from vlmpress.errors import ConfigError
from vlmpress.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

REFERENCE_PREFIX = "reference:"


@dataclass
class SuiteConfig:
    """One benchmark suite (maps 1:1 to ``eval/suites/*.yaml``)."""

    name: str = "suite"
    model: str = "reference:digits"
    datasets: list[str] = field(default_factory=lambda: ["reference:digits"])  # evaluation data (test splits)
    calib_images: str = "reference:digits"  # calibration data (train split / folder / dataset)
    calib_captions: str | None = None
    split_file: str | None = None
    data_root: str | None = None
    methods: list[str] = field(default_factory=lambda: ["svd", "svd_llm", "svd_als", "pgsvd"])
    reductions: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8])
    pgsvd_allocations: list[str] = field(default_factory=lambda: ["shared"])
    eps_proportion: dict[str, float] = field(default_factory=lambda: {"vision": 1.0, "text": 1.0})
    als_iters: int = 10
    n_images: int = 256
    n_captions: int = 256
    batch_size: int = 32
    eval_batch_size: int = 256
    templates: str = "ensemble"
    limit: int | None = None
    device: str = "auto"
    seed: int = 0
    out: str = "runs/suite"
    source_dir: str | None = None  # directory of the suite file: relative paths in it resolve from there

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "SuiteConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"suite file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"suite file {path} is not valid UTF-8 YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"suite file {path} must hold a mapping of keys to values")
        known = {f.name for f in dataclasses.fields(cls)} - {"source_dir"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown suite keys in {path}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        data["source_dir"] = str(path.resolve().parent)
        return cls(**data)

    def variants(self) -> list[tuple[str, float, str]]:
        """(method, level, allocation) for every compressed row, in table order."""
        out = []
        for method in self.methods:
            for level in self.reductions:
                allocations = self.pgsvd_allocations if method == "pgsvd" else ["shared"]
                out.extend((method, float(level), alloc) for alloc in allocations)
        return out


def variant_label(method: str, allocation: str, multiple: bool) -> str:
    label = METHOD_LABELS.get(method, method)
    return f"{label} ({allocation})" if multiple and method == "pgsvd" else label


# ------------------------------------------------------------------------------ data
def _reference_name(value: str) -> str | None:
    return value[len(REFERENCE_PREFIX):] if value.startswith(REFERENCE_PREFIX) else None


def load_suite_model(cfg: SuiteConfig, *, quick: bool = False, device="cpu"):
    name = _reference_name(cfg.model)
    if name is not None:
        from vlmpress.reference import get_reference

        ref = get_reference(name, quick=quick)
        adapter = load_model(ref.spec, device=device)
        adapter.reference = ref  # type: ignore[attr-defined]
        return adapter
    return load_model(cfg.model, device=device)


def _existing(candidates: list[Path]) -> Path | None:
    return next((c for c in candidates if c.exists()), None)


def resolve_suite_paths(cfg: SuiteConfig) -> SuiteConfig:
    """Absolute ``data_root`` / ``split_file``, independent of the current directory.

    A relative ``data_root`` is taken from the suite file's directory; a relative ``split_file``
    from the data root, ``$VLMPRESS_DATA`` or the suite file's directory (first that exists).
    Missing paths fail here, before any model is loaded or trained.
    """
    import os

    from vlmpress.errors import DatasetError

    base = Path(cfg.source_dir) if cfg.source_dir else Path.cwd()
    out = dataclasses.replace(cfg)
    if cfg.data_root:
        root = Path(cfg.data_root).expanduser()
        if not root.is_absolute():
            root = _existing([base / root, Path.cwd() / root]) or base / root
        if not root.is_dir():
            raise DatasetError(f"suite data_root {cfg.data_root} not found (looked at {root}); pass --data-root DIR")
        out.data_root = str(root.resolve())
    if cfg.split_file:
        path = Path(cfg.split_file).expanduser()
        if path.is_absolute():
            candidates = [path]
        else:
            roots = [Path(out.data_root)] if out.data_root else []
            if os.environ.get("VLMPRESS_DATA"):
                roots.append(Path(os.environ["VLMPRESS_DATA"]))
            candidates = [r / path for r in roots] + [base / path]
        found = _existing(candidates)
        if found is None:
            raise DatasetError(
                f"suite split_file {cfg.split_file} not found at {', '.join(str(c) for c in candidates)}; "
                "pass --data-root (the directory holding the datasets) or set VLMPRESS_DATA"
            )
        out.split_file = str(found.resolve())
    return out


def prepare_eval_data(cfg: SuiteConfig, dataset: str):
    """The evaluation split of ``dataset`` as files and labels (checked before any model loads)."""
    name = _reference_name(dataset)
    if name is None:
        from vlmpress.data.datasets import build_dataset

        return build_dataset(
            dataset, "test", cfg.data_root, split_file=cfg.split_file, seed=cfg.seed, templates=cfg.templates, limit=cfg.limit
        )
    from vlmpress.reference import reference_dataset

    return reference_dataset(name, "test", data_root=cfg.data_root)


def load_eval_images(cfg: SuiteConfig, adapter, dataset: str, prepared: Any = None):
    """Preprocessed test images (a :class:`PreprocessedImages`) of one evaluation dataset."""
    from vlmpress.evaluation.zeroshot import PreprocessedImages, preprocess_fingerprint, preprocess_images

    name = _reference_name(dataset)
    prepared = prepared if prepared is not None else prepare_eval_data(cfg, dataset)
    if name is None:
        return preprocess_images(prepared, adapter.preprocess, batch_size=cfg.eval_batch_size, show_progress=True)
    from vlmpress.reference import dataset_text

    images, labels, classnames = prepared
    _, templates = dataset_text(name, cfg.data_root)
    ref = getattr(adapter, "reference", None)
    if ref is not None and getattr(ref, "templates", None):
        templates = list(ref.templates)  # the prompts the reference was trained with
    if cfg.templates == "single":
        templates = ["a photo of a {}."]
    indices = list(range(len(labels)))
    if cfg.limit:
        from vlmpress.reference.data import subset_indices

        indices = subset_indices(len(labels), cfg.limit)
    pixels = torch.stack([adapter.preprocess(images.image(i) if hasattr(images, "image") else images[i]) for i in tqdm(indices, desc=f"preprocess {name}", leave=False)])
    return PreprocessedImages(
        pixels=pixels.to(torch.float32),  # exact: a float16 cache flips borderline predictions
        labels=torch.as_tensor([int(labels[i]) for i in indices]),
        preprocess_id=preprocess_fingerprint(adapter.preprocess),
        dataset=dataset,
        split_id=f"reference-{name}-test" + (f"+limit{cfg.limit}" if cfg.limit else ""),
        classnames=list(classnames),
        templates=list(templates),
        split_detail={"kind": "reference held-out split", "reference": name, "n": len(indices)},
    )


def load_suite_calibration(cfg: SuiteConfig) -> CalibrationSet:
    """Calibration images + captions from a train split (never the evaluation split)."""
    name = _reference_name(cfg.calib_images)
    if name is None:
        return build_calibration_set(
            cfg.calib_images, cfg.calib_captions, n_images=cfg.n_images, n_captions=cfg.n_captions, seed=cfg.seed, data_root=cfg.data_root
        )
    import random

    from vlmpress.reference import dataset_text, reference_dataset

    images, labels, classnames = reference_dataset(name, "train", data_root=cfg.data_root)
    n = len(labels)
    chosen = sorted(random.Random(cfg.seed).sample(range(n), min(cfg.n_images, n)))
    pil = [images.image(i) if hasattr(images, "image") else images[i] for i in chosen]
    _, templates = dataset_text(name, cfg.data_root)
    captions = captions_from_classes(classnames, cfg.n_captions, cfg.seed, templates)
    return CalibrationSet(
        pil, captions, f"reference {name} train split ({len(pil)} of {n} images)",
        f"class names of reference {name} x its {len(templates)} prompt templates", list(classnames),
    )


# ------------------------------------------------------------------------------ rank profile
def plot_rank_profile(profiles: dict[str, dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Kept fraction of each layer's rank (r / min(m, n); 1 = dense) per variant, layer by layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.2))
    names = None
    for label, prof in profiles.items():
        layers = prof["layers"]
        names = [l["name"] for l in layers]
        frac = [(l["rank"] if l["rank"] is not None else min(l["out_features"], l["in_features"])) / min(l["out_features"], l["in_features"]) for l in layers]
        ax.plot(range(len(frac)), frac, marker=".", linewidth=1, label=label)
    if names:
        groups = [n.split(".")[0] for n in names]
        for i in range(1, len(groups)):
            if groups[i] != groups[i - 1]:
                ax.axvline(i - 0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(0, len(names), max(1, len(names) // 12)))
    ax.set_xlabel("layer (model order; dashed line: vision | text)")
    ax.set_ylabel("rank / min(out, in)")
    ax.set_ylim(0, 1.05)
    ax.set_title(title or "per-layer rank profile")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------ runner
@dataclass
class SuiteResult:
    records: list
    table_markdown: str
    out_dir: Path
    seconds: float
    files: dict[str, str]


def _evaluate(adapter, eval_sets, cfg: SuiteConfig, model_id: str, label: str, device, out: Path, base_id: str) -> list:
    """Evaluate on every dataset; each record is written (atomically) as soon as it exists."""
    from vlmpress.evaluation.results import make_record, write_record
    from vlmpress.evaluation.zeroshot import evaluate_zeroshot

    records = []
    for images in eval_sets.values():
        result = evaluate_zeroshot(adapter, images, batch_size=cfg.eval_batch_size, device=device, show_progress=False)
        record = make_record(result, model=model_id, adapter=adapter, label=label, templates=cfg.templates)
        record.base_model = base_id  # one Base row per suite model in the table
        write_record(record, out)
        records.append(record)
    adapter.to("cpu")
    return records


def run_suite(cfg: SuiteConfig, *, quick: bool = False) -> SuiteResult:
    """Run every row of a suite; results stream to ``<out>/results.jsonl`` as they finish."""
    from vlmpress.pipeline.compress import resolve_device
    from vlmpress.evaluation.table import build_table

    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "results.jsonl"
    if jsonl.exists():
        jsonl.replace(out / "results.previous.jsonl")  # a fresh run starts a fresh table
    device = resolve_device(cfg.device)
    # data first: a missing dataset or split file fails in seconds, not after loading/training a model
    cfg = resolve_suite_paths(cfg)
    prepared = {d: prepare_eval_data(cfg, d) for d in cfg.datasets}
    calib = load_suite_calibration(cfg)
    base = load_suite_model(cfg, quick=quick, device="cpu")
    short = _reference_name(cfg.model) or cfg.model.replace("/", "_")
    logger.info("suite %s: model %s, %d compressed variants", cfg.name, cfg.model, len(cfg.variants()))
    eval_sets = {d: load_eval_images(cfg, base, d, prepared[d]) for d in cfg.datasets}
    flagged: list[str] = []
    records = _evaluate(base, eval_sets, cfg, f"{short}:base", "Base", device, out, short)

    probe = CompressionConfig(method="pgsvd", eps=0.5, als_iters=cfg.als_iters, batch_size=cfg.batch_size, device=cfg.device, seed=cfg.seed)
    layers = select_layers(base, probe)
    collectors = calibrate(base, layers, calib, probe)  # once, on the uncompressed model
    spectra: dict = {}
    profiles: dict[str, dict[str, Any]] = {}
    multiple_alloc = len(cfg.pgsvd_allocations) > 1
    for method, level, allocation in tqdm(cfg.variants(), desc=f"suite {cfg.name}", unit="model"):
        label = variant_label(method, allocation, multiple_alloc)
        ccfg = CompressionConfig(
            method=method, target_reduction=level, allocation="shared" if method != "pgsvd" else allocation,
            eps_proportion=dict(cfg.eps_proportion), als_iters=cfg.als_iters, batch_size=cfg.batch_size,
            device=cfg.device, seed=cfg.seed,
        )
        variant = copy.deepcopy(base)
        t0 = time.perf_counter()
        if method == "pgsvd" and allocation == "auto":
            from vlmpress.pipeline.auto_allocation import auto_compress

            report = auto_compress(variant, ccfg, calib)
        else:
            report = compress(variant, ccfg, calib, collectors=collectors, spectra_cache=spectra)
        seconds_compress = time.perf_counter() - t0
        run_id = f"{method}-{allocation}-{round(level * 100)}"
        report.write(out / "reports" / run_id)  # per-layer ranks and errors of every run
        for hit in report.bound_hits():
            flagged.append(f"{label} @ {round(100 * level)}%: {hit}")
            logger.warning("%s @ %.0f%%: %s -- this row is not the requested configuration", label, 100 * level, hit)
        variant.checkpoint_config = {"compression": {**report.summary(), "seconds_compress": seconds_compress}, "method": method}
        new = _evaluate(variant, eval_sets, cfg, f"{short}:{method}-{allocation}-{round(level * 100)}", label, device, out, short)
        records.extend(new)
        profiles[f"{label} {round(level * 100)}%"] = {
            "method": method, "level": level, "allocation": allocation, "tolerances": report.tolerances,
            "layers": [{k: getattr(l, k) for k in ("name", "group", "kind", "out_features", "in_features", "rank")} for l in report.layers],
        }
        atomic_write_json(out / "rank_profiles.json", profiles)
        logger.info("%s @ %.0f%%: top1 %s (reduction %.3f)", label, 100 * level, [round(r.top1, 4) for r in new], report.targeted_reduction)
        del variant

    table = build_table(records)
    files = {
        "results": str(jsonl),
        "table_md": str(atomic_write_text(out / "table.md", table.to_markdown())),
        "table_csv": str(atomic_write_text(out / "table.csv", table.to_csv())),
        "rank_profiles": str(out / "rank_profiles.json"),
    }
    from vlmpress.evaluation.plots import plot_accuracy_vs_reduction

    files["accuracy_plot"] = str(plot_accuracy_vs_reduction(records, out / "accuracy_vs_reduction.png"))
    mid = sorted(cfg.reductions)[len(cfg.reductions) // 2]
    chosen = {k: v for k, v in profiles.items() if abs(v["level"] - mid) < 1e-9}
    if chosen:
        files["rank_plot"] = str(plot_rank_profile(chosen, out / "rank_profile.png", f"per-layer ranks at {round(mid * 100)}% reduction"))
    seconds = time.perf_counter() - t_start
    files["reports"] = str(out / "reports")
    atomic_write_json(out / "suite.json", {
        "config": dataclasses.asdict(cfg), "quick": quick, "seconds": seconds, "files": files, "flagged": flagged,
    })
    return SuiteResult(records, table.to_markdown(), out, seconds, files)
