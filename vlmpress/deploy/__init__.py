"""Deployment stage: what runs a compressed model smaller and faster after compression.

Owns the inference-time model transforms (:mod:`~vlmpress.deploy.fuse`: one GEMM for the first
factors of low-rank layers that read the same input), layer latency measurement for
deployment-aware ranks (:mod:`~vlmpress.deploy.latency`), byte and peak-memory accounting
(:mod:`~vlmpress.deploy.footprint`) and ONNX export (:mod:`~vlmpress.deploy.onnx`).

May import ``vlmpress.core``, ``vlmpress.io``, ``vlmpress.errors`` and ``vlmpress.adapters``;
never ``vlmpress.pipeline`` or anything above it (the pipeline calls into this package).
"""
