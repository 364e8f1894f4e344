"""Classifications back into MegaDetector batch output for review in Timelapse, as the reference
``merge_classification_detection_output.py`` (with its known bugs fixed: confidences are rounded, not
truncated; the completion time has its time of day; a crop whose detection is missing is reported, not a
KeyError)."""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from animl_assets.core.detect.megadetector import LABEL_ID_OFFSET

CROP_MARK = "___crop"


def crop_source(crop: str) -> tuple[str, int]:
    """The image file and detection index a crop name ``<file>___cropNN_<detector>.jpg`` comes from."""
    file, mark, suffix = crop.rpartition(CROP_MARK)
    if not mark or not suffix[:2].isdigit():
        raise ValueError(f"{crop!r} is not a crop name (<file>___cropNN_<detector>.jpg)")
    return file, int(suffix[:2])


def classification_list(probs: np.ndarray, threshold: float, label_conf: float | None = None,
                        relative_conf: bool = False) -> list[list[Any]]:
    """``[[id_str, conf], …]`` for the categories at or above ``threshold``, by descending confidence,
    rounded to 4 decimals. With ``relative_conf`` each confidence is its margin over the labelled
    category's (``label_conf``), floored at 0, as the reference."""
    values = np.maximum(probs - label_conf, 0) if relative_conf and label_conf is not None else probs
    kept = [(str(i), round(float(v), 4)) for i, v in enumerate(values) if v >= threshold]
    return [list(item) for item in sorted(kept, key=lambda item: -item[1])]


def merge_classifications(md: Mapping[str, Any], outputs: pd.DataFrame, labels: Sequence[str], classifier: str, *,
                          threshold: float = 0.1, ground_truth: Mapping[str, str] | None = None,
                          label_pos: str | None = None, relative_conf: bool = False,
                          typical_threshold: float | None = None,
                          completed: datetime | None = None) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``md`` whose detections carry the ``classifications`` of their crops (``outputs``: a
    ``path`` column of crop names and one column per label), with ``classification_categories`` and
    ``info.classifier`` / ``classification_completion_time``. Detections without a crop (e.g. below the
    crop threshold) keep their place and get none. ``ground_truth`` (crop -> label) adds the labelled
    category (id + 1,000,000, ``label: <name>``) first or last (``label_pos``) and enables
    ``relative_conf``. Returns the merged output and the crops that matched no detection."""
    if label_pos not in (None, "first", "last"):
        raise ValueError("label_pos is None, 'first' or 'last'")
    if relative_conf and ground_truth is None:
        raise ValueError("relative_conf needs the ground-truth labels")
    merged = copy.deepcopy(dict(md))
    categories = {str(i): name for i, name in enumerate(labels)}
    if ground_truth is not None and label_pos is not None:
        categories |= {str(i + LABEL_ID_OFFSET): f"label: {name}" for i, name in enumerate(labels)}
    when = (completed or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M:%S")
    merged["info"] = {**merged.get("info", {}), "classifier": classifier, "classification_completion_time": when}
    if typical_threshold is not None:
        merged["info"]["classifier_metadata"] = {"typical_classification_threshold": typical_threshold}
    merged["classification_categories"] = categories
    images = {image["file"]: image for image in merged["images"]}
    index = {name: i for i, name in enumerate(labels)}
    probs = outputs[list(labels)].to_numpy(dtype=float)
    unmatched = []
    for row, crop in enumerate(outputs["path"]):
        file, detection = crop_source(crop)
        detections = (images.get(file) or {}).get("detections") or []
        if detection >= len(detections):
            unmatched.append(crop)
            continue
        label = (ground_truth or {}).get(crop)
        label_conf = probs[row, index[label]] if label in index else None
        result = classification_list(probs[row], threshold, label_conf, relative_conf and label is not None)
        if label in index and label_pos is not None:
            item = [str(index[label] + LABEL_ID_OFFSET), 1.0]
            result = [item, *result] if label_pos == "first" else [*result, item]
        detections[detection]["classifications"] = result
    return merged, unmatched


def add_outputs(merged: dict[str, Any], outputs: Mapping[str, pd.DataFrame]) -> int:
    """A multi-output model's extra outputs into merged batch output (in place): each cropped detection gets
    ``outputs: {output: [class, conf]}`` (the most probable class, confidence rounded to 4 decimals) beside its
    ``classifications``, and ``info.classifier_outputs`` lists each output's classes. ``outputs``: per output, a
    ``path`` column of crop names and one probability column per class. Returns the detections given outputs."""
    images = {image["file"]: image for image in merged["images"]}
    merged["info"]["classifier_outputs"] = {name: [c for c in frame.columns if c != "path"]
                                            for name, frame in outputs.items()}
    given = set()
    for name, frame in outputs.items():
        classes = [c for c in frame.columns if c != "path"]
        probs = frame[classes].to_numpy(dtype=float)
        best = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
        for row, crop in enumerate(frame["path"]):
            file, detection = crop_source(crop)
            detections = (images.get(file) or {}).get("detections") or []
            if detection < len(detections):
                found = detections[detection].setdefault("outputs", {})
                found[name] = [classes[best[row]], round(float(probs[row, best[row]]), 4)]
                given.add((file, detection))
    return len(given)


# ---- mislabeled candidates and corrections ----------------------------------------------------------------
