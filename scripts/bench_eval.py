#!/usr/bin/env python
"""Images/s of the zero-shot harness vs a plain loop, on the real Caltech101 images, in one run.

Both sides decode the same N JPEGs (a stratified subset of the Caltech101 test list), run the
model's own preprocess and encode the images with the same model and batch size:

* plain loop: ``torchvision.datasets.Caltech101(transform=preprocess)``, indexed one image at a
  time, stacked into batches, ``encode_image`` under ``torch.no_grad``;
* harness: :func:`vlmpress.evaluation.evaluate_zeroshot` image pass (DataLoader with
  ``num_workers``, inference mode, feature normalisation, logits and metrics included), timed by
  its own ``seconds_images``; the text classifier is built once beforehand and not counted.

Each side is run ``--repeats`` times, interleaved; best and median times are reported (a shared
machine is noisy).
Target: harness / plain >= 1.0.

    python scripts/bench_eval.py [--n 300] [--model open_clip:vlmpress-tiny] [--num-workers 0 2]

Generative VLMs (``--model hf:LLAVA_DIR``, or ``--model tiny-llava`` for a random LLaVA with
LLaVA-1.5's 24x24 = 576 image positions built offline) bench the likelihood zero-shot instead:
cached image prefix vs re-running the full sequence per class caption (``_bench_likelihood.py``).

    python scripts/bench_eval.py --model tiny-llava --n 8 --batch-size 4 --templates single
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _bench_common import SHARED_CALTECH, machine  # noqa: E402

from vlmpress.pipeline.loading import load_model  # noqa: E402
from vlmpress.data import build_dataset  # noqa: E402
from vlmpress.evaluation import build_text_classifier, evaluate_zeroshot  # noqa: E402


def plain_loop(adapter, tv_dataset, indices: list[int], batch_size: int) -> float:
    """Seconds for decode + preprocess + encode of ``indices`` with a straightforward loop."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            batch = torch.stack([tv_dataset[i][0] for i in indices[start : start + batch_size]])
            adapter.encode_image(batch)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="open_clip:vlmpress-tiny")
    p.add_argument("--n", type=int, default=300, help="images (stratified subset of the test list)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-root", default=str(SHARED_CALTECH.parent))
    p.add_argument("--split-file", default=str(SHARED_CALTECH / "test.txt"))
    p.add_argument("--templates", choices=["ensemble", "single"], default="ensemble",
                   help="generative VLMs: caption templates per class (default: %(default)s)")
    args = p.parse_args()
    if args.model == "tiny-llava" or _is_generative(args.model):
        return _bench_generative(args)

    import torchvision

    print(f"# machine: {machine()}")
    torch.manual_seed(0)
    adapter = load_model(args.model).eval()
    split_file = args.split_file if Path(args.split_file).is_file() else None
    ds = build_dataset("caltech101", "test", args.data_root, split_file=split_file, limit=args.n, templates="single")
    print(f"# model {args.model}, {len(ds)} images ({ds.split_id}), batch {args.batch_size}")

    tv = torchvision.datasets.Caltech101(args.data_root, target_type="category", transform=adapter.preprocess)
    position = {(tv.categories[y], idx): i for i, (idx, y) in enumerate(zip(tv.index, tv.y))}
    indices = []
    for s in ds.samples:
        cls, name = s.relpath.split("/")
        indices.append(position[(cls, int(name[len("image_") : -len(".jpg")]))])

    classifier = build_text_classifier(adapter, ds.classnames, ds.templates)
    # warm up both paths (first-call allocations, file cache)
    plain_loop(adapter, tv, indices[: args.batch_size], args.batch_size)
    evaluate_zeroshot(adapter, ds.subset(range(args.batch_size), "warmup"), classifier=classifier,
                      batch_size=args.batch_size, num_workers=0, show_progress=False)

    plain_times: list[float] = []
    harness_times: dict[int, list[float]] = {w: [] for w in args.num_workers}
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit both sides
        plain_times.append(plain_loop(adapter, tv, indices, args.batch_size))
        for w in args.num_workers:
            r = evaluate_zeroshot(adapter, ds, classifier=classifier, batch_size=args.batch_size, num_workers=w,
                                  device="cpu", show_progress=False)
            assert r.n_images == len(indices)
            harness_times[w].append(r.seconds_images)

    n = len(indices)
    plain_best, plain_med = min(plain_times), statistics.median(plain_times)
    print(f"# {args.repeats} interleaved repeats; images/s from the best and the median time")
    print(f"{'path':<30} {'best s':>7} {'img/s':>7} {'ratio':>6} | {'median s':>8} {'img/s':>7} {'ratio':>6}")
    print(f"{'plain torchvision loop':<30} {plain_best:>7.3f} {n / plain_best:>7.1f} {1.0:>6.2f} | "
          f"{plain_med:>8.3f} {n / plain_med:>7.1f} {1.0:>6.2f}")
    for w, times in harness_times.items():
        best, med = min(times), statistics.median(times)
        print(f"{f'harness (num_workers={w})':<30} {best:>7.3f} {n / best:>7.1f} {plain_best / best:>6.2f} | "
              f"{med:>8.3f} {n / med:>7.1f} {plain_med / med:>6.2f}")

def _is_generative(spec: str) -> bool:
    from vlmpress.adapters import adapter_for_spec
    from vlmpress.pipeline.loading import is_compressed_dir

    if is_compressed_dir(spec):
        import json

        return json.loads((Path(spec) / "vlmpress_config.json").read_text())["family"] == "hf_llava"
    try:
        return adapter_for_spec(spec).family == "hf_llava"
    except Exception:  # noqa: BLE001 - unknown specs fail later with the loader's own message
        return False


def _bench_generative(args) -> None:
    import tempfile

    from _bench_likelihood import bench_likelihood

    print(f"# machine: {machine()}")
    spec = args.model
    if spec == "tiny-llava":
        from vlmpress.testing.genvlm import save_tiny_llava

        spec = "hf:" + str(save_tiny_llava(Path(tempfile.mkdtemp()) / "llava", image_size=336, patch_size=14, hidden=64, max_positions=1024))
    adapter = load_model(spec).eval()
    split_file = args.split_file if Path(args.split_file).is_file() else None
    ds = build_dataset("caltech101", "test", args.data_root, split_file=split_file, limit=args.n, templates=args.templates)
    print(f"# model {args.model}, {len(ds)} images ({ds.split_id}), {len(ds.classnames)} classes x {len(ds.templates)} templates")
    bench_likelihood(adapter, ds, batch_size=args.batch_size, repeats=args.repeats)


if __name__ == "__main__":
    main()
