"""The pure domain core, one room per stage (ingest, detect, dataset, ml, registry, review) over a shared base
(store, files, paths, tables, artifact files, failures, layout). No Dagster imports here.

Names are loaded on first use, so that importing one module (a crop worker importing
``animl_assets.core.detect.crops``, say) does not import the others.
"""

from importlib import import_module

_EXPORTS = {
    **dict.fromkeys(("CCTFormatError", "CCTValidation", "load_cct", "summarize_cct", "validate_cct"), "ingest.cct"),
    **dict.fromkeys(("ImageCheck", "ImageRequest", "collect_images", "verify_image"), "ingest.images"),
    **dict.fromkeys(("UnsafePathError", "safe_relative_path"), "paths"),
    **dict.fromkeys(("write_sample_export",), "ingest.sample"),
    **dict.fromkeys(("cct_to_md", "validate_batch_output",
                    "merge_detections", "upgrade_batch_output"), "detect.megadetector"),
    **dict.fromkeys(("CropReport", "crop_detections"), "detect.crops"),
    **dict.fromkeys(("LabelSpecError", "parse_label_spec", "resolve_label_spec"), "dataset.label_spec"),
    **dict.fromkeys(("build_classification_dataset", "label_index"), "dataset.classification"),
    **dict.fromkeys(("make_splits", "split_score", "check_splits"), "dataset.splits"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
