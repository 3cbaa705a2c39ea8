"""Zero-shot benchmark harness: classifier, metrics, result records, Table 2 and plots.

Main entry points::

    from vlmpress.data import build_dataset
    from vlmpress.evaluation import evaluate_zeroshot, make_record, write_record, build_table

    ds = build_dataset("caltech101", split="test", root="/data")
    result = evaluate_zeroshot(adapter, ds, batch_size=64, num_workers=4)
    write_record(make_record(result, model="open_clip:ViT-B-16/openai", adapter=adapter), "results/")
    print(build_table(read_records("results/results.jsonl")).to_markdown())

``plot_accuracy_vs_reduction`` lives in :mod:`vlmpress.evaluation.plots` (imports matplotlib lazily);
how compression changes an MoE model's expert routing in :mod:`vlmpress.evaluation.routing`.
"""

from vlmpress.evaluation.metrics import (
    ClassificationMetrics,
    MetricAccumulator,
    compute_metrics,
    topk_accuracy,
    true_class_rank,
)
from vlmpress.evaluation.results import (
    EvalRecord,
    compression_info,
    make_record,
    read_records,
    write_record,
)
from vlmpress.evaluation.table import Table, TableRow, build_table
from vlmpress.evaluation.zeroshot import (
    PreprocessedImages,
    ZeroShotResult,
    build_text_classifier,
    evaluate_zeroshot,
    preprocess_images,
)


def plot_accuracy_vs_reduction(records, path, **kwargs):
    """See :func:`vlmpress.evaluation.plots.plot_accuracy_vs_reduction`."""
    from vlmpress.evaluation.plots import plot_accuracy_vs_reduction as _plot

    return _plot(records, path, **kwargs)


__all__ = [
    "ClassificationMetrics",
    "EvalRecord",
    "MetricAccumulator",
    "PreprocessedImages",
    "Table",
    "TableRow",
    "ZeroShotResult",
    "build_table",
    "build_text_classifier",
    "compression_info",
    "compute_metrics",
    "evaluate_zeroshot",
    "make_record",
    "plot_accuracy_vs_reduction",
    "preprocess_images",
    "read_records",
    "topk_accuracy",
    "true_class_rank",
    "write_record",
]
