"""Data for vlmpress: benchmark datasets (zero-shot evaluation) and calibration inputs.

* :mod:`vlmpress.data.datasets` -- the benchmark registry (``build_dataset``, ``DATASETS``);
* :mod:`vlmpress.data.splits` -- deterministic hash splits and stratified subsets;
* :mod:`vlmpress.data.calibration` -- calibration images and captions for compression.
"""

from vlmpress.data.datasets import (
    DATA_ENV,
    DATASETS,
    SINGLE_TEMPLATE,
    TEMPLATE_MODES,
    DatasetMetadata,
    DatasetSpec,
    ZeroShotDataset,
    build_dataset,
    dataset_title,
    format_prompt,
    list_datasets,
    load_metadata,
    resolve_data_root,
    select_templates,
)
from vlmpress.data.splits import DEFAULT_TEST_FRACTION, hash_split, stratified_subset

__all__ = [
    "DATA_ENV",
    "DATASETS",
    "DEFAULT_TEST_FRACTION",
    "SINGLE_TEMPLATE",
    "TEMPLATE_MODES",
    "DatasetMetadata",
    "DatasetSpec",
    "ZeroShotDataset",
    "build_dataset",
    "dataset_title",
    "format_prompt",
    "hash_split",
    "list_datasets",
    "load_metadata",
    "resolve_data_root",
    "select_templates",
    "stratified_subset",
]
