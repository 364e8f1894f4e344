"""Running MegaDetector itself (optional extra ``pip install '.[detector]'``) on images without boxes."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping

from animl_assets.core.detect.megadetector import DETECTION_CATEGORIES, FORMAT_VERSION
from animl_assets.core.files import atomic_write
from animl_assets.core.paths import safe_relative_path
from animl_assets.core.store import Store
from animl_assets.core.transfers import parallel_map

CHUNK = 256  # images on local disk at once while a remote source is streamed through the detector

WEIGHTS_HINT = ("download MegaDetector weights (e.g. md_v5a.0.0.pt from the MegaDetector releases page) and "
                "set the md_detections config detector_weights to the file's path")


class DetectorUnavailable(RuntimeError):
    """MegaDetector cannot run here: the extra is not installed or the weights file is missing."""


def run_megadetector(weights: str | Path, images: str | Path | Store, files: list[str], *,
                     threshold: float = 0.005, keys: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Batch output (format 1.4) for ``files`` from the weights at ``weights``. ``images`` is a local folder the
    files are relative to, or a store: a local store's folder is read in place; a remote one (S3) is streamed,
    ``CHUNK`` images at a time fetched concurrently into a temporary folder and deleted after detection, so
    local disk stays bounded and nothing is mirrored. ``keys`` maps a file to its key in the store (default:
    the file name)."""
    root = getattr(images, "root", None) if not isinstance(images, (str, Path)) else Path(images)
    if root is not None:
        return _detect(weights, Path(root), files, threshold)
    store: Store = images  # type: ignore[assignment]
    merged: dict[str, Any] | None = None
    for start in range(0, len(files), CHUNK):
        chunk = files[start:start + CHUNK]
        with tempfile.TemporaryDirectory(prefix="animl-detect-") as tmp:
            def fetch(file: str) -> None:
                atomic_write(Path(tmp) / safe_relative_path(file), store.read_bytes((keys or {}).get(file, file)))

            for _ in parallel_map(_or_missing(fetch), chunk):
                pass
            ran = _detect(weights, Path(tmp), chunk, threshold)
        merged = ran if merged is None else {**merged, "images": merged["images"] + ran["images"]}
    return merged or _detect(weights, Path(tempfile.gettempdir()), [], threshold)


def _or_missing(fetch: Any) -> Any:
    """``fetch`` with a missing image left out: the detector reports it as a failure to access the file."""
    def tolerant(file: str) -> None:
        try:
            fetch(file)
        except FileNotFoundError:
            pass
    return tolerant


def _detect(weights: str | Path, images_dir: Path, files: list[str], threshold: float) -> dict[str, Any]:
    weights = Path(weights) if weights else None
    if weights is None or not weights.is_file():
        raise DetectorUnavailable(f"MegaDetector weights not found at {weights or '(not set)'}: {WEIGHTS_HINT}")
    try:
        from megadetector.detection.run_detector_batch import load_and_run_detector_batch
    except ImportError as err:
        raise DetectorUnavailable(
            "running MegaDetector needs the optional extra: pip install 'animl-assets[detector]' "
            f"(pip install -e '.[detector]' in a checkout); import failed: {err}") from err
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
