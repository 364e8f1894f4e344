"""MegaDetector batch-output JSON: conversion from COCO Camera Traps, validation, upgrade and merge.

Format rules follow MegaDetector's ``postprocessing/validate_batch_results.py``: category ids are
string ints, boxes are ``[x, y, w, h]`` normalized to 0–1 from the top-left corner, an image has
either ``failure`` or ``detections``, classifications are sorted by descending confidence.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from numbers import Real
from typing import Any, Iterator

import pandas as pd

from animl_assets.core.artifact_files import artifact_file

FORMAT_VERSION = "1.4"
MIN_FORMAT_VERSION = (1, 1)
DETECTION_CATEGORIES = {"1": "animal", "2": "person", "3": "vehicle"}
CCT_TO_MD_DETECTOR = "cct_to_md"
PERSON_NAMES = {"human", "person", "people"}
VEHICLE_NAMES = {"vehicle", "car", "truck"}
EMPTY_NAMES = {"empty"}
BOX_TOLERANCE = 1e-4  # detectors round; a box may overhang [0, 1] by this much
_INT_STRING = re.compile(r"^\d+$")


@dataclass
class Detections:
    """What ``md_detections`` stores: the batch output, each box's label, the images without boxes."""

    md: dict[str, Any] = field(metadata=artifact_file("md_detections.json"))
    labels: pd.DataFrame = field(metadata=artifact_file("labels.csv"))
    images_without_boxes: list[str] = field(metadata=artifact_file("images_without_boxes.json"))


def _md_category(name: str) -> str:
    name = name.strip().lower()
    if name in PERSON_NAMES:
        return "2"
    if name in VEHICLE_NAMES:
        return "3"
    return "1"


def is_empty_category(name: str) -> bool:
    """Whether a category name is the export's "nothing here" label (Animl: category 0, ``empty``)."""
    return name.strip().lower() in EMPTY_NAMES


def _ground_truth_boxes(cct: dict[str, Any]
                        ) -> Iterator[tuple[dict[str, Any], list[tuple[dict[str, Any], str]], bool]]:
    """Each image with its boxed annotations (annotation, category name), in export order, and whether it is
    marked empty. A box of the empty category (Animl's full-frame sentinel) is not an object: it is left out
    of the boxes, and an image with no other box is empty."""
    names = {str(cat["id"]): str(cat["name"]) for cat in cct.get("categories", [])}
    boxes: dict[str, list[tuple[dict, str]]] = {}
    marked_empty: set[str] = set()
    for ann in cct.get("annotations", []):
        if ann.get("bbox") is None:
            continue
        name = names.get(str(ann["category_id"]), "")
        if is_empty_category(name):
            marked_empty.add(str(ann["image_id"]))
        else:
            boxes.setdefault(str(ann["image_id"]), []).append((ann, name))
    for image in cct.get("images", []):
        found = boxes.get(str(image["id"]), [])
        yield image, found, not found and str(image["id"]) in marked_empty


def _image_size(image: dict[str, Any], sizes: dict[str, tuple[int, int]] | None) -> tuple[int, int] | None:
    if isinstance(image.get("width"), int) and isinstance(image.get("height"), int):
        return image["width"], image["height"]
    return (sizes or {}).get(str(image["file_name"]))


def _normalized_box(bbox: list[float], width: int, height: int) -> list[float]:
    """An absolute ``[x, y, w, h]`` box clipped to its image and normalized to 0–1."""
    x0, y0 = min(max(bbox[0], 0), width), min(max(bbox[1], 0), height)
    x1, y1 = min(max(bbox[0] + bbox[2], 0), width), min(max(bbox[1] + bbox[3], 0), height)
    return [x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height]


def sizes_needed(cct: dict[str, Any]) -> set[str]:
    """File names of the images with boxes whose width or height the export lacks: ``cct_to_md`` needs their
    measured size (``image_sizes``) to normalize the boxes."""
    return {str(image["file_name"]) for image, boxes, empty in _ground_truth_boxes(cct)
            if boxes and not empty and _image_size(image, None) is None}


def cct_to_md(cct: dict[str, Any], *, image_sizes: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """MegaDetector batch output (format 1.4) from an export's own boxes, every box with conf 1.0.

    Only images with at least one box are listed (see ``images_without_boxes``), and the images the export
    marks empty with an ``empty`` box, with no detection. Absolute boxes are
    clipped to the image (a box may overhang its edge a little) and normalized by the image's width and
    height, taken from ``image_sizes`` (file name -> (w, h)) where the export lacks them; an image whose
    size is unknown gets a ``failure`` entry instead.
    """
    images = []
    for image, boxes, empty in _ground_truth_boxes(cct):
        if empty:
            images.append({"file": image["file_name"], "detections": []})  # MegaDetector's "nothing here"
            continue
        if not boxes:
            continue
        size = _image_size(image, image_sizes)
        if size is None:
            images.append({"file": image["file_name"], "failure": "image size unknown: cannot normalize boxes"})
            continue
        images.append({"file": image["file_name"], "detections": [
            {"category": _md_category(name), "conf": 1.0, "bbox": _normalized_box(ann["bbox"], *size)}
            for ann, name in boxes
        ]})
    return {
        "info": {"format_version": FORMAT_VERSION, "detector": CCT_TO_MD_DETECTOR,
                 "detection_completion_time": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")},
        "detection_categories": dict(DETECTION_CATEGORIES),
        "images": images,
    }


def ground_truth_labels(cct: dict[str, Any]) -> pd.DataFrame:
    """The export's category name for each box cct_to_md writes: ``file, detection_index, label``."""
    rows = [(image["file_name"], index, name)
            for image, boxes, _ in _ground_truth_boxes(cct) for index, (_, name) in enumerate(boxes)]
    return pd.DataFrame(rows, columns=["file", "detection_index", "label"])


def _image_labels(cct: dict[str, Any]) -> dict[str, tuple[set[str], set[str]]]:
    """Per file: the category names of its annotations that a person reviewed, and of those no person did
    (Animl's ``validated: false``; an export without the field has reviewed labels only)."""
    names = {str(cat["id"]): str(cat["name"]) for cat in cct.get("categories", [])}
    files = {str(image["id"]): image["file_name"] for image in cct.get("images", [])}
    per_image: dict[str, tuple[set[str], set[str]]] = {}
    for ann in cct.get("annotations", []):
        name = names.get(str(ann.get("category_id")), "")
        if name:
            reviewed, unreviewed = per_image.setdefault(files.get(str(ann.get("image_id")), ""), (set(), set()))
            (unreviewed if ann.get("validated") is False else reviewed).add(name)
    return per_image


def unreviewed_boxes(cct: dict[str, Any], md: dict[str, Any] | None = None) -> pd.DataFrame:
    """The boxes whose label no person reviewed (Animl: ``validated: false``, a model's guess):
    ``file, detection_index, label``. The export's own boxes as cct_to_md numbers them and, with ``md``, the
    detector boxes of images whose image-level labels are all unreviewed. An export without the field has none."""
    rows = [(image["file_name"], index, name) for image, boxes, _ in _ground_truth_boxes(cct)
            for index, (ann, name) in enumerate(boxes) if ann.get("validated") is False]
    boxed = set(ground_truth_labels(cct)["file"])
    labels = _image_labels(cct)
    for image in (md or {}).get("images", []):
        reviewed, unreviewed = labels.get(image["file"], (set(), set()))
        if image["file"] not in boxed and unreviewed and not reviewed:
            label = next(iter(unreviewed)) if len(unreviewed) == 1 else ""
            rows += [(image["file"], index, label) for index in range(len(image.get("detections") or []))]
    return pd.DataFrame(rows, columns=["file", "detection_index", "label"])


def images_without_boxes(cct: dict[str, Any]) -> list[str]:
    """File names of images with no box in the export (nor an ``empty`` one): the ones a detector could be run on."""
    return [image["file_name"] for image, boxes, empty in _ground_truth_boxes(cct) if not boxes and not empty]


def _version(value: Any) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in str(value).split("."))
    except ValueError:
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_categories(md: dict[str, Any], key: str, problems: list[str]) -> dict[str, str]:
    categories = md.get(key)
    if not isinstance(categories, dict):
        problems.append(f"'{key}' must be an object of id -> name")
        return {}
    for category_id, name in categories.items():
        if not _INT_STRING.match(str(category_id)):
            problems.append(f"{key} id {category_id!r} is not a string int")
        if not isinstance(name, str):
            problems.append(f"{key} {category_id!r} name must be a string")
    return categories


LABEL_ID_OFFSET = 1_000_000  # the reference merge script's ids for ground-truth label categories


def _check_detection(where: str, det: Any, detection_categories: dict, classification_categories: dict,
                     problems: list[str]) -> None:
    if not isinstance(det, dict):
        problems.append(f"{where}: detection must be an object")
        return
    if str(det.get("category")) not in detection_categories or not isinstance(det.get("category"), str):
        problems.append(f"{where}: category {det.get('category')!r} is not a string id in detection_categories")
    if not (_is_number(det.get("conf")) and 0 <= det["conf"] <= 1):
        problems.append(f"{where}: conf {det.get('conf')!r} must be a number in [0, 1]")
    bbox = det.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
        problems.append(f"{where}: bbox {bbox!r} must be [x, y, w, h] numbers")
    else:
        x, y, w, h = bbox
        if min(x, y, w, h) < -BOX_TOLERANCE or x + w > 1 + BOX_TOLERANCE or y + h > 1 + BOX_TOLERANCE:
            problems.append(f"{where}: bbox {bbox} is not within 0-1")
    if "classifications" in det:
        classes = det["classifications"]
        if not isinstance(classes, list) or not all(
                isinstance(c, list) and len(c) == 2 and str(c[0]) in classification_categories
                and isinstance(c[0], str) and _is_number(c[1]) for c in classes):
            problems.append(f"{where}: classifications must be [[class id string, conf], …] "
                            "with ids in classification_categories")
        else:  # predictions sorted; ground-truth label entries (ids from 1,000,000) may sit first or last
            predicted = [c for c in classes if not (c[0].isdigit() and int(c[0]) >= LABEL_ID_OFFSET)]
            if any(a[1] < b[1] for a, b in zip(predicted, predicted[1:])):
                problems.append(f"{where}: classifications are not sorted by descending confidence")


def validate_batch_output(md: Any) -> list[str]:
    """Every way ``md`` breaks the MegaDetector batch-output format (empty when it is valid)."""
    if not isinstance(md, dict):
        return ["batch output must be a JSON object"]
    problems: list[str] = []
    info = md.get("info")
    if not isinstance(info, dict):
        problems.append("'info' must be an object")
    else:
        version = _version(info.get("format_version"))
        if version is None or version < MIN_FORMAT_VERSION:
            problems.append(f"info.format_version {info.get('format_version')!r} must be 1.1 or later")
    detection_categories = _check_categories(md, "detection_categories", problems)
    classification_categories = (_check_categories(md, "classification_categories", problems)
                                 if "classification_categories" in md else {})
    images = md.get("images")
    if not isinstance(images, list):
        return problems + ["'images' must be a list"]
    seen: set[str] = set()
    for index, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("file"), str):
            problems.append(f"images[{index}]: must be an object with a string 'file'")
            continue
        where = f"image {image['file']!r}"
        if image["file"] in seen:
            problems.append(f"{where}: listed twice")
        seen.add(image["file"])
        failed = image.get("failure") is not None
        detections = image.get("detections")
        if failed and detections:
            problems.append(f"{where}: has both a failure and detections")
        elif not failed and not isinstance(detections, list):
            problems.append(f"{where}: needs a 'detections' list or a 'failure'")
        for det_index, det in enumerate(detections or []):
            _check_detection(f"{where} detection {det_index}", det, detection_categories,
                             classification_categories, problems)
    return problems


def upgrade_batch_output(md: dict[str, Any]) -> dict[str, Any]:
    """A copy of older (1.1–1.3) batch output in 1.4 form: string category ids, ``detections: null``
    on failed images, no ``max_detection_conf``. Extra categories (e.g. ``4: group``) are kept."""
    md = copy.deepcopy(md)
    md.setdefault("info", {})["format_version"] = FORMAT_VERSION
    for key in ("detection_categories", "classification_categories"):
        if isinstance(md.get(key), dict):
            md[key] = {str(k): v for k, v in md[key].items()}
    for image in md.get("images", []):
        if not isinstance(image, dict):
            continue
        image.pop("max_detection_conf", None)
        if image.get("failure") is not None:
            image["detections"] = None
        for det in image.get("detections") or []:
            if isinstance(det, dict) and "category" in det:
                det["category"] = str(det["category"])
    return md


def merge_detections(ground_truth: dict[str, Any], detector: dict[str, Any]) -> dict[str, Any]:
    """One batch output: the detector's images plus the export's boxes, which win for the same file.

    Detector categories are matched to the export's by name and renumbered where their ids differ
    (MegaDetector v2/v3 files say ``3: group, 4: vehicle``; v4 and later ``3: vehicle``); names the
    export's table lacks get the next free id.
    """
    categories = dict(ground_truth["detection_categories"])
    by_name = {name: category_id for category_id, name in categories.items()}
    remap = {}
    for category_id, name in detector.get("detection_categories", {}).items():
        if name not in by_name:
            by_name[name] = str(max(map(int, categories), default=0) + 1)
            categories[by_name[name]] = name
        remap[category_id] = by_name[name]
    boxed = {image["file"] for image in ground_truth["images"]}
    merged = []
    for image in detector.get("images", []):
        if image.get("file") in boxed:
            continue
        image = dict(image)
        if image.get("detections"):
            image["detections"] = [{**det, "category": remap.get(det.get("category"), det.get("category"))}
                                   for det in image["detections"]]
        merged.append(image)
    merged += ground_truth["images"]
    info = dict(detector.get("info", {})) | {"format_version": FORMAT_VERSION}
    info["detector"] = detector.get("info", {}).get("detector", CCT_TO_MD_DETECTOR)
    result = {"info": info, "detection_categories": categories,
              "images": sorted(merged, key=lambda image: str(image["file"]))}
    if "classification_categories" in detector:
        result["classification_categories"] = detector["classification_categories"]
    return result


def animal_categories(md: dict[str, Any]) -> set[str]:
    """The detection category ids named 'animal' (normally just one)."""
    return {category_id for category_id, name in md.get("detection_categories", {}).items() if name == "animal"}


def with_box_labels(rows: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """``rows`` (one per box: ``file``, ``detection_index``) with each box's ``label`` from a ``box_labels``
    table; a box without one gets ''."""
    keys = ["file", "detection_index"]
    labels = labels[[*keys, "label"]].astype({"detection_index": int})
    return rows.astype({"detection_index": int}).merge(labels, how="left", on=keys).fillna({"label": ""})


def animal_category(md: dict[str, Any]) -> str:
    """The detection category id named 'animal'."""
    for category_id, name in md.get("detection_categories", {}).items():
        if name == "animal":
            return category_id
    raise ValueError("batch output has no 'animal' detection category")


def box_labels(cct: dict[str, Any], md: dict[str, Any]) -> pd.DataFrame:
    """The label of every box in ``md``: ``file, detection_index, label, source``.

    Boxes from the export carry their annotation's category; detector boxes carry the image's
    category when the export gives that image exactly one, and an empty label otherwise. A label a person
    reviewed wins over a model's unreviewed guesses for the same image.
    """
    truth = ground_truth_labels(cct).assign(source="ground_truth")
    per_image = _image_labels(cct)
    boxed = set(truth["file"])
    rows = []
    for image in md.get("images", []):
        if image["file"] in boxed:
            continue
        reviewed, unreviewed = per_image.get(image["file"], (set(), set()))
        found = reviewed or unreviewed
        label = next(iter(found)) if len(found) == 1 else ""
        rows += [(image["file"], index, label, "detector") for index in range(len(image.get("detections") or []))]
    detector = pd.DataFrame(rows, columns=["file", "detection_index", "label", "source"])
    return pd.concat([truth, detector], ignore_index=True) if rows else truth
