#!/usr/bin/env python
"""onnxruntime throughput of a compressed CLIP export vs the dense export, measured in one run.

Random-init open_clip model (throughput depends on ranks, not values), uniform SVD ranks at the
given reduction of the targeted layers, first factors of shared-input layers fused
(``--no-fuse`` to skip); both models exported by :func:`vlmpress.deploy.onnx.export_onnx` with
a dynamic batch, run by onnxruntime's CPU provider (default graph optimisations), timed in
interleaved rounds (median). Target at 40 %, batch 32: >= 1.3x for the image tower.

    python scripts/bench_onnx.py [--model open_clip:ViT-B-16] [--reduction 0.4] [--batch 32]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _bench_common import calibration_images, captions, interleaved_rates, machine  # noqa: E402

from vlmpress.deploy.onnx import export_onnx, fuse_for_export  # noqa: E402
from vlmpress.pipeline.compress import compress  # noqa: E402
from vlmpress.pipeline.config import CompressionConfig  # noqa: E402
from vlmpress.pipeline.loading import load_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="open_clip:ViT-B-16")
    p.add_argument("--reduction", type=float, default=0.4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-fuse", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    args = p.parse_args()
    import onnxruntime as ort

    print(f"# machine: {machine()} | onnxruntime {ort.__version__}")
    torch.manual_seed(0)
    dense = load_model(args.model, device="cpu")
    dense.prepare_for_compression()
    compressed = copy.deepcopy(dense)
    rep = compress(compressed, CompressionConfig(method="svd", target_reduction=args.reduction, device="cpu"))
    print(f"# compressed: targeted reduction {rep.targeted_reduction:.3f}, whole model {rep.whole_model_reduction:.3f}")
    if not args.no_fuse:
        print(f"# fused first factors: {len(fuse_for_export(compressed))} groups")
    pixels = torch.stack([dense.preprocess(im) for im in calibration_images(args.batch)])
    tokens = dense.tokenize(captions(args.batch))
    options = ort.SessionOptions()
    if args.threads:
        options.intra_op_num_threads = args.threads
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, adapter in (("dense", dense), ("compressed", compressed)):
            for graph in export_onnx(adapter, Path(tmp) / name):
                sessions[(name, graph.path.stem)] = ort.InferenceSession(str(graph.path), options, providers=["CPUExecutionProvider"])
                size = sum(f.stat().st_size for f in graph.path.parent.glob(graph.path.name + "*"))  # + external data
                print(f"# exported {name} {graph.path.name}: {size / 2**20:.1f} MiB", flush=True)
        print(f"\n{'tower':<14} {'batch':>5} {'dense /s':>10} {'compressed /s':>14} {'ratio':>7}")
        for tower, feed in (("image_encoder", {"pixels": pixels.numpy()}), ("text_encoder", {"tokens": tokens.numpy()})):
            calls = {name: (lambda s=sessions[(name, tower)]: s.run(None, feed)) for name in ("dense", "compressed")}
            seconds = interleaved_rates(calls, rounds=args.rounds)
            rates = {k: args.batch / v for k, v in seconds.items()}
            print(f"{tower:<14} {args.batch:>5} {rates['dense']:>10.2f} {rates['compressed']:>14.2f} "
                  f"{rates['compressed'] / rates['dense']:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
