#!/usr/bin/env python
"""Compression cost of a random-init open_clip ViT-B-16 (real architecture, no weights needed).

Prints, per tower: calibration wall time vs a plain forward over the same batches (q/k/v share one
accumulator), and spectra + factorisation time at a 40% target reduction with PGSVD (ALS to its
default tolerance, or --als-iters N for the paper's fixed tau) against a floor: one float64
eigendecomposition of each layer's smaller-side Gram matrix (what tolerance ranks need anyway),
timed alternately with the factorisation in the same run, best of --repeats. --parts also times,
part by part, the arithmetic the closed form (tolerance-mode ALS's limit) cannot skip: the Gram of
W, its eigenvalues, K = C M C^T and the eigendecomposition of K. The layer shapes of each tower are listed (ViT-B-16's vision tower is 768
wide, its text tower 512 wide: same layer count, ~3.4x the cubic work).
Random-init weights have flat spectra, so the tolerance needed for 40% is far higher than on a
trained model; the cost of the factorisation depends on the ranks, not on the values.

    python scripts/bench_compress.py [--model open_clip:ViT-B-16] [--n-images 64] [--device cpu] [--repeats 3] [--parts]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _bench_common import calibration_images, captions, machine, sync  # noqa: E402

from vlmpress.pipeline.loading import load_model  # noqa: E402
from vlmpress.pipeline.compress import als_path, calibrate, compress, select_layers  # noqa: E402
from vlmpress.pipeline.config import CompressionConfig  # noqa: E402
from vlmpress.data.calibration import CalibrationSet, caption_batches, image_batches  # noqa: E402


def time_floor(layers, device: torch.device) -> dict[str, float]:
    """Seconds per tower of one float64 ``eigh`` of each layer's smaller-side Gram matrix (with the
    library's own eigensolver, so a faster LAPACK driver lowers the floor too)."""
    from vlmpress.core.solvers import symmetric_eigh

    floor: dict[str, float] = {}
    for layer in layers:
        W = layer.weight_matrix.detach().to(device=device, dtype=torch.float64)
        sync(); t0 = time.perf_counter()
        symmetric_eigh(W @ W.mT if W.shape[0] <= W.shape[1] else W.mT @ W)  # the fastest eigh vlmpress knows
        sync(); floor[layer.group] = floor.get(layer.group, 0.0) + time.perf_counter() - t0
    return floor


def time_closed_form_parts(layers, collectors, report, device: torch.device) -> dict[str, dict[str, float]]:
    """Seconds per tower of the arithmetic the closed form (ALS's limit) cannot skip: the Gram of W,
    its eigenvalues (ranks), K = C M C^T and the eigendecomposition of K. Two passes, in the
    pipeline's order (all spectra, then all solves), so SciPy's and torch's thread pools do not
    interleave differently from a real run."""
    from vlmpress.core.covariance import gram, sandwich
    from vlmpress.core.solvers import _top_eigenvectors, symmetric_eigenvalues

    ranks = report.rank_map
    chosen = [layer for layer in layers if ranks.get(layer.name)]
    out = {layer.group: {"gram": 0.0, "values": 0.0, "K": 0.0, "eigh": 0.0} for layer in chosen}
    for layer in chosen:  # pass 1: rank planning
        W = layer.weight_matrix.detach().to(device=device, dtype=torch.float64)
        wide = W.shape[0] <= W.shape[1]
        sync(); t0 = time.perf_counter()
        G = gram(W.mT if wide else W)
        sync(); t1 = time.perf_counter()
        symmetric_eigenvalues(G)
        sync(); t2 = time.perf_counter()
        out[layer.group]["gram"] += t1 - t0
        out[layer.group]["values"] += t2 - t1
    for layer in chosen:  # pass 2: the solves
        W = layer.weight_matrix.detach().to(device=device, dtype=torch.float64)
        M = collectors[layer.group].covariance(layer.name).to(device=device, dtype=torch.float64)
        C = W if W.shape[0] <= W.shape[1] else torch.linalg.cholesky_ex(gram(W))[0].mT
        sync(); t0 = time.perf_counter()
        K = sandwich(C, M)
        sync(); t1 = time.perf_counter()
        _top_eigenvectors(K, ranks[layer.name])
        sync(); t2 = time.perf_counter()
        out[layer.group]["K"] += t1 - t0
        out[layer.group]["eigh"] += t2 - t1
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="open_clip:ViT-B-16")
    p.add_argument("--n-images", type=int, default=64)
    p.add_argument("--n-captions", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--target-reduction", type=float, default=0.4)
    p.add_argument("--als-iters", type=int, default=None, help="fixed ALS rounds (default: iterate to the tolerance)")
    p.add_argument("--als-path", default="auto", choices=["auto", "rounds", "limit"], help="tolerance-mode ALS path")
    p.add_argument("--repeats", type=int, default=3, help="floor and factorisation timed alternately, best kept")
    p.add_argument("--parts", action="store_true", help="also time the closed form's own arithmetic part by part")
    p.add_argument("--device", default="auto")
    p.add_argument("--solve-batch-sizes", type=int, nargs="+", default=None,
                   help="also time the factorisation with these --solve-batch-size values (same model, same covariances)")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    print(f"# machine: {machine()}")
    print(f"# model: {args.model} (random init) on {device}; {args.n_images} images, {args.n_captions} captions, batch {args.batch_size}")
    torch.manual_seed(0)
    adapter = load_model(args.model, device=device)
    calib = CalibrationSet(calibration_images(args.n_images), captions(args.n_captions), "bench images", "bench captions")
    config = CompressionConfig(
        method="pgsvd", target_reduction=args.target_reduction, als_iters=args.als_iters, als_path=args.als_path, device=str(device),
        batch_size=args.batch_size,
    )
    layers = select_layers(adapter, config)
    img_batches = [b.to(device) for b in image_batches(calib.images, adapter.preprocess, args.batch_size)]
    txt_batches = caption_batches(calib.captions, args.batch_size)

    # plain forward vs calibration (the same forwards with covariance hooks) over the same
    # pre-decoded batches, alternated per tower, best of --repeats
    import importlib

    pipeline = importlib.import_module("vlmpress.pipeline.compress")  # the module, not a same-named function

    def plain_forward(group: str) -> None:
        with torch.no_grad():
            if group == "vision":
                for b in img_batches:
                    adapter.encode_image(b)
            else:
                for b in txt_batches:
                    adapter.encode_text(adapter.tokenize(b))

    with torch.no_grad():
        adapter.encode_image(img_batches[0][:2])  # warm-up
    original = pipeline._calibration_batches
    pipeline._calibration_batches = lambda ad, group, c, cfg: img_batches if group == "vision" else txt_batches
    plain: dict[str, float] = {}
    timings: dict[str, float] = {}
    collectors = {}
    try:
        for _ in range(args.repeats):
            for group in ("vision", "text"):
                sync(); t0 = time.perf_counter()
                plain_forward(group)
                sync(); plain[group] = min(plain.get(group, float("inf")), time.perf_counter() - t0)
                sync(); t0 = time.perf_counter()
                collectors[group] = calibrate(adapter, [l for l in layers if l.group == group], calib, config)[group]
                sync(); timings[group] = min(timings.get(group, float("inf")), time.perf_counter() - t0)
    finally:
        pipeline._calibration_batches = original
    shared = {g: len(c.shared_inputs) for g, c in collectors.items()}
    print(f"\n{'tower':<7} {'plain fwd s':>11} {'calib s':>8} {'ratio':>6}  (target <= 1.5; shared q/k/v accumulators; best of {args.repeats})")
    for group in ("vision", "text"):
        print(f"{group:<7} {plain[group]:>11.2f} {timings[group]:>8.2f} {timings[group] / plain[group]:>6.2f}  ({shared[group]} shared)")

    # floor: one float64 eigh of each layer's smaller-side Gram (what tolerance ranks need anyway),
    # timed alternately with the factorisation, best of --repeats (the machine's noise cancels)
    shapes: dict[str, dict[str, int]] = {}
    for layer in layers:
        key = "x".join(map(str, layer.weight_matrix.shape))
        shapes.setdefault(layer.group, {})[key] = shapes.setdefault(layer.group, {}).get(key, 0) + 1
    pristine = copy.deepcopy(adapter)
    floor: dict[str, float] = {}
    parts: dict[str, dict[str, float]] = {}
    best: dict[str, float] = {}
    report = None
    for _ in range(args.repeats):
        for group, seconds in time_floor(layers, device).items():
            floor[group] = min(floor.get(group, float("inf")), seconds)
        trial = copy.deepcopy(pristine)
        run = compress(trial, config, calib, collectors=collectors)
        del trial
        for group, t in run.group_totals().items():
            if t["seconds"] < best.get(group, float("inf")):
                best[group] = t["seconds"]
        total = run.seconds["spectra"] + run.seconds["factorisation"]
        if report is None or total < report.seconds["spectra"] + report.seconds["factorisation"]:
            report = run
        if args.parts:
            for group, named in time_closed_form_parts(layers, collectors, report, device).items():
                for name, seconds in named.items():
                    parts.setdefault(group, {})[name] = min(parts.get(group, {}).get(name, float("inf")), seconds)
    totals = report.group_totals()
    mode = f"ALS tau={args.als_iters}" if args.als_iters is not None else f"ALS to tol {config.als_tol:g}, path {als_path(config, device)}"
    size = config.solve_batch_size or ("32" if device.type == "cuda" else "1")
    print(f"\n{'tower':<7} {'layers':>6} {'eps':>7} {'reduction':>9} {'factorise s':>11} {'floor s':>8} {'ratio':>6} {'ALS it':>6}  "
          f"(spectra + {mode}; solve batch {size}; best of {args.repeats})")
    for group, t in totals.items():
        eps = report.tolerances.get(group, report.tolerances.get("*", float("nan")))
        its = [l.als_iters for l in report.layers if l.group == group and l.als_iters is not None]
        it_text = f"{sum(its) / len(its):.1f}" if its else "-"
        print(f"{group:<7} {t['layers']:>6} {eps:>7.4f} {t['reduction']:>9.3f} {best[group]:>11.2f} {floor[group]:>8.2f} "
              f"{best[group] / floor[group]:>6.2f} {it_text:>6}")
    for group, counts in shapes.items():
        print(f"  {group} shapes: " + ", ".join(f"{k} x{v}" for k, v in counts.items()))
    total = sum(best.values())
    print(f"both towers: {total:.2f} s factorisation (best run: spectra {report.seconds['spectra']:.2f} s + solves "
          f"{report.seconds['factorisation']:.2f} s) vs floor {sum(floor.values()):.2f} s "
          f"(ratio {total / sum(floor.values()):.2f}); targeted reduction {report.targeted_reduction:.3f}")
    if parts:
        print("\nthe closed form's own arithmetic, per tower (each part timed alone, summed over layers, best of the repeats):")
        print(f"{'tower':<7} {'Gram':>6} {'values':>7} {'K=CMC^T':>8} {'eigh(K)':>8} {'sum':>6} {'sum/floor':>9}")
        for group, named in parts.items():
            s_ = sum(named.values())
            print(f"{group:<7} {named['gram']:>6.2f} {named['values']:>7.2f} {named['K']:>8.2f} {named['eigh']:>8.2f} {s_:>6.2f} {s_ / floor[group]:>9.2f}")
    for batch in args.solve_batch_sizes or []:
        trial = copy.deepcopy(pristine)
        other = compress(trial, config.replace(solve_batch_size=batch), calib, collectors=collectors)
        same = other.rank_map == report.rank_map
        worst = max(
            (abs(a.act_error - b.act_error) / max(b.act_error, 1e-30) for a, b in zip(other.layers, report.layers) if a.act_error is not None),
            default=0.0,
        )
        t = other.seconds["spectra"] + other.seconds["factorisation"]
        print(f"solve batch {batch:>3}: {t:.2f} s (spectra {other.seconds['spectra']:.2f} s + solves "
              f"{other.seconds['factorisation']:.2f} s), ratio to floor {t / sum(floor.values()):.2f}; "
              f"same ranks: {same}, largest relative change of a layer's activation error: {worst:.1e}")
        del trial

if __name__ == "__main__":
    main()
