#!/usr/bin/env python
"""Inference throughput of dense vs compressed CLIP towers, measured in one run (ratios).

Compresses copies of a random-init open_clip model to 20% and 40% reduction of the targeted
layers' parameters (uniform-ratio SVD ranks: throughput depends on ranks, not on values) and
times images/s and texts/s at batch 1, 32 and 128. On a GPU both fp32 and bf16 are measured.
Target at 40%: >= 1.45x for the image tower at batch 32 on CPU (arithmetic limit about 1.6x).

``--fast-path`` adds, for each reduction, a variant on vlmpress's inference path (packed factors
and one GEMM for the first factors of layers sharing an input, :mod:`vlmpress.deploy.fuse`);
``--stock-dense`` adds the dense model with its attention packed back into ``nn.MultiheadAttention``
(PyTorch's fused in-projection and native attention kernel), the baseline a deployer starts from.
Variants are timed in interleaved rounds (each round times every variant once) and the median
per variant is reported, so a load change on a shared machine hits all variants alike.

    python scripts/bench_inference.py [--model open_clip:ViT-B-16] [--batch-sizes 1 32 128] [--fast-path]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _bench_common import calibration_images, captions, interleaved_rates, machine  # noqa: E402

from vlmpress.pipeline.loading import load_model  # noqa: E402
from vlmpress.pipeline.compress import compress  # noqa: E402
from vlmpress.pipeline.config import CompressionConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="open_clip:ViT-B-16")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--reductions", type=float, nargs="+", default=[0.2, 0.4])
    p.add_argument("--rank-multiples", type=int, nargs="+", default=[1],
                   help="also time ranks aligned to these multiples (e.g. 1 8: exact and tensor-core friendly)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    p.add_argument("--fast-path", action="store_true", help="also time each reduction on the fused inference path")
    p.add_argument("--stock-dense", action="store_true", help="also time dense with stock nn.MultiheadAttention")
    p.add_argument("--compile", action="store_true",
                   help="time every variant under torch.compile (inductor, weights frozen: bias/activation epilogues fused)")
    p.add_argument("--towers", nargs="+", default=["image", "text"], choices=["image", "text"])
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    print(f"# machine: {machine()}")
    torch.manual_seed(0)
    dense = load_model(args.model, device="cpu")
    dense.prepare_for_compression()
    variants = {"dense": dense}
    if args.stock_dense:
        from vlmpress.adapters.attention import unsplit_attention_modules

        stock = copy.deepcopy(dense)
        unsplit_attention_modules(stock.model)
        variants["stock"] = stock
    for r in args.reductions:
        for multiple in args.rank_multiples:
            v = copy.deepcopy(dense)
            rep = compress(v, CompressionConfig(method="svd", target_reduction=r, device="cpu", rank_multiple=multiple))
            name = f"{int(r * 100)}%" + (f"/{multiple}" if multiple > 1 else "")
            variants[name] = v
            if args.fast_path:
                variants[name + "+fast"] = fast_variant(v, dense)
            print(f"# {name} variant (ranks multiple of {multiple}): targeted reduction {rep.targeted_reduction:.3f}, "
                  f"whole model {rep.whole_model_reduction:.3f}")
    images = calibration_images(max(args.batch_sizes))
    pixels = torch.stack([dense.preprocess(im) for im in images])
    texts = captions(max(args.batch_sizes))
    tokens = dense.tokenize(texts)
    print(f"\n{'dtype':<9} {'tower':<6} {'batch':>5} " + " ".join(f"{name + ' /s':>12}" for name in variants)
          + " " + " ".join(f"{'x' + name:>8}" for name in variants if name != "dense"))
    for dtype in dtypes:
        for name, v in variants.items():
            v.model.to(device=device, dtype=dtype).eval()
        for tower in args.towers:
            for bs in args.batch_sizes:
                calls = {}
                for name, v in variants.items():
                    if tower == "image":
                        x = pixels[:bs].to(device=device, dtype=dtype)
                        fn = compiled(v.model.encode_image) if args.compile else v.encode_image
                        calls[name] = lambda fn=fn, x=x: fn(x)
                    else:
                        t = tokens[:bs].to(device) if isinstance(tokens, torch.Tensor) else {k: val[:bs].to(device) for k, val in tokens.items()}
                        fn = compiled(v.model.encode_text) if args.compile else v.encode_text
                        calls[name] = lambda fn=fn, t=t: fn(t)
                with torch.no_grad():
                    rates = {name: bs / seconds for name, seconds in interleaved_rates(calls, rounds=args.rounds).items()}
                ratios = " ".join(f"{rates[n] / rates['dense']:>8.2f}" for n in variants if n != "dense")
                print(f"{str(dtype).replace('torch.', ''):<9} {tower:<6} {bs:>5} "
                      + " ".join(f"{rates[n]:>12.1f}" for n in variants) + " " + ratios, flush=True)


def compiled(fn):
    """``torch.compile`` with inductor's weight freezing (constant-folded, prepacked weights and
    fused bias / activation epilogues; inference under no_grad only)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(fn)


def fast_variant(compressed, dense):
    """A copy of ``compressed`` on the inference path: packed factors, fused first factors of
    layers found (on a sample of both towers) to read the same input."""
    from vlmpress.core.lowrank import LowRankLinear
    from vlmpress.deploy.fuse import fuse_shared_inputs

    v = copy.deepcopy(compressed)
    for module in v.model.modules():
        if isinstance(module, LowRankLinear):
            module.pack_()
    pixels = torch.stack([dense.preprocess(im) for im in calibration_images(2)])
    tokens = dense.tokenize(captions(2))
    groups = fuse_shared_inputs(v.model, lambda: (v.encode_image(pixels), v.encode_text(tokens)))
    print(f"# fast path: {len(groups)} groups of layers share their first GEMM "
          f"(e.g. {groups[0].names() if groups else '-'})")
    return v


if __name__ == "__main__":
    main()
