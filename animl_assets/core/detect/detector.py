"""Running MegaDetector itself (optional extra ``pip install '.[detector]'``) on images without boxes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from animl_assets.core.detect.megadetector import DETECTION_CATEGORIES, FORMAT_VERSION

WEIGHTS_HINT = ("download MegaDetector weights (e.g. md_v5a.0.0.pt from the MegaDetector releases page) and "
                "set the md_detections config detector_weights to the file's path")


class DetectorUnavailable(RuntimeError):
    """MegaDetector cannot run here: the extra is not installed or the weights file is missing."""


def run_megadetector(weights: str | Path, images_dir: str | Path, files: list[str], *,
                     threshold: float = 0.005) -> dict[str, Any]:
    """Batch output (format 1.4) for ``files`` (relative to ``images_dir``) from the weights at ``weights``."""
    weights = Path(weights) if weights else None
    if weights is None or not weights.is_file():
        raise DetectorUnavailable(f"MegaDetector weights not found at {weights or '(not set)'}: {WEIGHTS_HINT}")
    try:
        from megadetector.detection.run_detector_batch import load_and_run_detector_batch
    except ImportError as err:
        raise DetectorUnavailable(
            "running MegaDetector needs the optional extra: pip install 'animl-assets[detector]' "
            f"(pip install -e '.[detector]' in a checkout); import failed: {err}") from err
    images_dir = Path(images_dir)
    by_path = {str(images_dir / file): file for file in files}
    results = load_and_run_detector_batch(model_file=str(weights), image_file_names=list(by_path),
                                          quiet=True, confidence_threshold=threshold)
    images = []
    for result in results:
        entry = {"file": by_path.get(result["file"], result["file"])}
        if result.get("failure"):
            entry.update(failure=str(result["failure"]), detections=None)
        else:
            entry["detections"] = result.get("detections") or []
        images.append(entry)
    return {"info": {"format_version": FORMAT_VERSION, "detector": weights.name},
            "detection_categories": dict(DETECTION_CATEGORIES), "images": images}
