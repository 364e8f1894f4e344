"""The pure domain core: formats, images, detections, crops, dataset, splits. No Dagster imports here.

Names are loaded on first use, so that importing one module (a crop worker importing
``animl_assets.core.crops``, say) does not import the others.
"""

from importlib import import_module

_EXPORTS = {
    "CCTFormatError": "cct", "CCTValidation": "cct", "load_cct": "cct", "summarize_cct": "cct",
    "validate_cct": "cct",
    "ImageCheck": "images", "ImageRequest": "images", "collect_images": "images", "verify_image": "images",
    "UnsafePathError": "paths", "safe_relative_path": "paths",
    "write_sample_export": "sample",
    "cct_to_md": "megadetector", "validate_batch_output": "megadetector", "merge_detections": "megadetector",
    "upgrade_batch_output": "megadetector",
    "CropReport": "crops", "crop_detections": "crops",
    "LabelSpecError": "label_spec", "parse_label_spec": "label_spec", "resolve_label_spec": "label_spec",
    "build_classification_dataset": "dataset", "label_index": "dataset",
    "make_splits": "splits", "split_score": "splits", "check_splits": "splits",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
