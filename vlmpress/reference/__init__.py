"""Small reference CLIP models trained here, so compression is shown on trained (not random) weights.

No pretrained CLIP can be downloaded on these machines, so vlmpress trains its own: open_clip
architectures from ``configs/models/vlmpress-*.json`` trained contrastively on labelled images
with class-name captions. ``digits`` (scikit-learn's bundled 8x8 digits; about a minute on CPU) is
the demo's default; ``caltech101`` trains on the real Caltech-101 train list.

    ref = get_reference("digits")            # cached, or trained and cached
    model, preprocess, tokenizer = ref.load()
    images, labels, classnames = reference_dataset("digits", "test", transform=preprocess)
    adapter = vlmpress.load_model(ref.spec)   # open_clip:<name>//abs/path/model.safetensors
"""

from vlmpress.reference.config import REFERENCES, ReferenceConfig, get_config, register_model_configs
from vlmpress.reference.data import ReferenceImages, TensorSplit, dataset_text, load_tensor_split, reference_dataset
from vlmpress.reference.store import ReferenceModel, get_reference, load_reference, reference_cache_dir, save_reference
from vlmpress.reference.train import TrainResult, train_reference, zero_shot_classifier, zero_shot_top1

__all__ = [
    "REFERENCES",
    "ReferenceConfig",
    "ReferenceImages",
    "ReferenceModel",
    "TensorSplit",
    "TrainResult",
    "dataset_text",
    "get_config",
    "get_reference",
    "load_reference",
    "load_tensor_split",
    "reference_cache_dir",
    "reference_dataset",
    "register_model_configs",
    "save_reference",
    "train_reference",
    "zero_shot_classifier",
    "zero_shot_top1",
]
