"""``vlmpress export-onnx``: export a saved compressed checkpoint to ONNX and verify it with onnxruntime.

A sub-command rather than a ``compress`` flag: exporting is a deployment step on a finished
checkpoint (re-exporting needs no recompression), and it needs the optional deploy extra.
"""

from __future__ import annotations

import argparse

HELP = "export a compressed checkpoint to ONNX (dynamic batch) and check it against PyTorch in onnxruntime"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a compressed checkpoint directory (or any model spec)")
    p.add_argument("--out", required=True, help="directory for the .onnx files")
    p.add_argument("--fuse", action="store_true", help="fuse the first factors of layers sharing an input before export")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--atol", type=float, default=1e-4, help="largest accepted |onnxruntime - PyTorch| (relative to the output scale)")


def run(args: argparse.Namespace) -> int:
    from vlmpress.deploy.onnx import export_onnx, fuse_for_export, verify_onnx
    from vlmpress.errors import ConfigError
    from vlmpress.pipeline.loading import load_model

    adapter = load_model(args.model, device="cpu")
    if args.fuse:
        fuse_for_export(adapter)
    graphs = export_onnx(adapter, args.out)
    if not args.no_verify:
        verify_onnx(adapter, graphs)
    for g in graphs:
        check = "" if g.max_abs_error is None else f"  max |onnxruntime - torch| = {g.max_abs_error:.2e} (outputs up to {g.reference_scale:.2f})"
        print(f"{g.path}{check}")
        if g.max_abs_error is not None and g.max_abs_error > args.atol * max(1.0, g.reference_scale):
            raise ConfigError(f"{g.path.name}: onnxruntime differs from PyTorch by {g.max_abs_error:.2e} (> --atol {args.atol})")
    return 0
