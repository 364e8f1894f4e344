"""COCO Camera Traps exports: loading, validation and summaries."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import pandas as pd

from animl_assets.core.artifact_files import artifact_file
from animl_assets.core.paths import normalized_path

UNKNOWN_LOCATION = "unknown_location"
BBOX_OVERHANG_TOLERANCE = 0.05  # share of the image's side a box may reach past its edge; it is clipped
CHECKS = ("schema", "unique_ids", "references", "bboxes")
SET_ASIDE = "annotations_set_aside"  # the non-blocking check, and its list in validation.json


@dataclass
class ExportArtifacts:
    """What ``cct_export`` stores: the export as read, its problems per check, and where it was read from
    (``uri``, and the ``sha256`` of the file: the export's data version)."""

    export: dict[str, Any] = field(metadata=artifact_file("export.json"))
    validation: dict[str, list[str]] = field(metadata=artifact_file("validation.json"))
    source: dict[str, str] = field(metadata=artifact_file("source.json"))


class CCTFormatError(ValueError):
    """The export cannot be read as a COCO Camera Traps JSON object at all."""


ENDS_EARLY = ("the file was cut off. It cannot be repaired safely: export it again (Animl's exporter can end an "
              "export of more than 18,000 images early; an export filtered by camera or date range stays smaller)")


def load_cct(data: bytes | str) -> dict[str, Any]:
    """Parse an export; raise CCTFormatError with the position of the fault when it is not a JSON object, saying
    so when the file ends before its JSON does (a truncated export)."""
    try:
        cct = json.loads(data)
    except UnicodeDecodeError as err:
        raise CCTFormatError(f"export is not UTF-8 text: {err}") from err
    except json.JSONDecodeError as err:
        if not err.doc.strip():
            raise CCTFormatError("export is not valid JSON: the file is empty") from err
        if err.pos >= len(err.doc.rstrip()):
            raise CCTFormatError(f"export is not valid JSON: it ends early, at line {err.lineno}, column "
                                 f"{err.colno} ({err.msg}): {ENDS_EARLY}") from err
        raise CCTFormatError(
            f"export is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
        ) from err
    if not isinstance(cct, dict):
        raise CCTFormatError(f"export must be a JSON object, not {type(cct).__name__}")
    return cct


@dataclass
class CCTValidation:
    """Problems found per check (see CHECKS); a check passes when its list is empty. Annotations whose box
    cannot be used (null, malformed or without area) are not problems of the export: they are set aside
    (``set_aside``: annotation id -> reason) and left out of what is ingested."""

    problems: dict[str, list[str]] = field(default_factory=lambda: {name: [] for name in CHECKS})
    clipped: list[str] = field(default_factory=list)  # boxes that overhang within the tolerance
    set_aside: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())

    def add(self, check: str, message: str) -> None:
        self.problems[check].append(message)

    def set_aside_by_reason(self) -> dict[str, int]:
        """How many annotations were set aside, per reason."""
        return dict(Counter(self.set_aside.values()))

    def record(self) -> dict[str, list[str]]:
        """What ``validation.json`` holds: the problems per check, and each annotation set aside with why."""
        return {**self.problems, SET_ASIDE: [f"annotation {key}: {reason}" for key, reason in self.set_aside.items()]}


def _records(cct: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = cct.get(key)
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


_ID = ("an int or string", _is_id)
_NAME = ("a non-empty string", _is_name)
_REQUIRED_FIELDS = {
    "images": {"id": _ID, "file_name": _NAME},
    "annotations": {"id": _ID, "image_id": _ID, "category_id": _ID},
    "categories": {"id": _ID, "name": _NAME},
}


def _check_schema(cct: dict[str, Any], report: CCTValidation) -> None:
    for key in ("images", "annotations", "categories"):
        if key not in cct:
            report.add("schema", f"missing top-level key '{key}'")
        elif not isinstance(cct[key], list):
            report.add("schema", f"'{key}' must be a list, not {type(cct[key]).__name__}")
        else:
            for index, item in enumerate(cct[key]):
                if not isinstance(item, dict):
                    report.add("schema", f"{key}[{index}] must be an object, not {type(item).__name__}")
    for key, fields in _REQUIRED_FIELDS.items():
        for index, item in enumerate(_records(cct, key)):
            for name, (what, is_valid) in fields.items():
                if not is_valid(item.get(name)):
                    report.add("schema", f"{key}[{index}]: '{name}' must be {what}")
    for index, image in enumerate(_records(cct, "images")):
        for dim in ("width", "height"):
            if dim in image and not (isinstance(image[dim], int) and image[dim] > 0):
                report.add("schema", f"images[{index}]: '{dim}' must be a positive integer")


def _unusable_box(bbox: Any) -> str | None:
    """Why a present ``bbox`` cannot be used, or None when it is four numbers with an area."""
    if isinstance(bbox, list) and len(bbox) == 4 and all(value is None for value in bbox):
        return "null box (the image had no size when it was exported)"
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
        return "malformed box (not [x, y, width, height] numbers)"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return "box without area"
    return None


def _annotation_key(index: int, ann: dict[str, Any]) -> str:
    """How ``set_aside`` names an annotation: its id, or its place in the list where it has none."""
    return str(ann.get("id", f"#{index}"))


def _set_aside_boxes(cct: dict[str, Any], report: CCTValidation) -> None:
    annotations = cct.get("annotations") if isinstance(cct.get("annotations"), list) else []
    for index, ann in enumerate(annotations):
        if isinstance(ann, dict) and ann.get("bbox") is not None and (reason := _unusable_box(ann["bbox"])):
            report.set_aside[_annotation_key(index, ann)] = reason


def _check_unique(cct: dict[str, Any], report: CCTValidation) -> None:
    for key, field_name in (("images", "id"), ("annotations", "id"), ("categories", "id"), ("categories", "name")):
        values = [item.get(field_name) for item in _records(cct, key) if field_name in item]
        for value, count in Counter(map(str, values)).items():
            if count > 1:
                report.add("unique_ids", f"{key}.{field_name} {value!r} occurs {count} times")
    spellings: dict[str, list[str]] = {}  # file names are unique as the paths their files are written under
    for image in _records(cct, "images"):
        if _is_name(image.get("file_name")):
            spellings.setdefault(normalized_path(image["file_name"]), []).append(image["file_name"])
    for path, names in spellings.items():
        if len(names) > 1:
            report.add("unique_ids", f"images.file_name {path!r} occurs {len(names)} times"
                       + (f" (as {', '.join(map(repr, names))})" if len(set(names)) > 1 else ""))


def _check_references(cct: dict[str, Any], report: CCTValidation) -> None:
    image_ids = {str(image.get("id")) for image in _records(cct, "images")}
    category_ids = {str(cat.get("id")) for cat in _records(cct, "categories")}
    for ann in _records(cct, "annotations"):
        if str(ann.get("image_id")) not in image_ids:
            report.add("references", f"annotation {ann.get('id')!r} points at missing image {ann.get('image_id')!r}")
        if str(ann.get("category_id")) not in category_ids:
            report.add("references",
                       f"annotation {ann.get('id')!r} points at missing category {ann.get('category_id')!r}")


def _check_bboxes(cct: dict[str, Any], report: CCTValidation, tolerance: float) -> None:
    images = {str(image.get("id")): image for image in _records(cct, "images")}
    for ann in _records(cct, "annotations"):
        bbox = ann.get("bbox")
        if bbox is None or _unusable_box(bbox):
            continue  # absent boxes are fine (image-level labels); unusable ones are set aside
        x, y, w, h = bbox
        where = f"annotation {ann.get('id')!r} bbox {bbox}"
        image = images.get(str(ann.get("image_id")))
        if image is None or not all(isinstance(image.get(d), int) for d in ("width", "height")):
            if x < 0 or y < 0:
                report.add("bboxes", f"{where} has a negative coordinate")
            continue
        width, height = image["width"], image["height"]
        overhang_x, overhang_y = max(0, -x, x + w - width), max(0, -y, y + h - height)
        if not (overhang_x or overhang_y):
            continue
        if overhang_x > tolerance * width or overhang_y > tolerance * height or x >= width or y >= height:
            report.add("bboxes", f"{where} reaches {max(overhang_x, overhang_y):g} px outside its {width}x{height} "
                                 f"image (more than the tolerance of {tolerance:g} of its side)")
        else:
            report.clipped.append(f"{where} overhangs its {width}x{height} image by "
                                  f"{max(overhang_x, overhang_y):g} px: clipped")


def validate_cct(cct: dict[str, Any], *, bbox_tolerance: float = BBOX_OVERHANG_TOLERANCE) -> CCTValidation:
    """Run every check in CHECKS over a parsed export; never raises on malformed content.

    A box that reaches past its image's edge by at most ``bbox_tolerance`` of the image's side is listed
    in ``clipped`` (``cct_to_md`` clips it, as MegaDetector's tools do); a larger overhang or one that
    starts outside its image is a ``bboxes`` problem. An annotation with a null, malformed or zero-area box
    is set aside (``set_aside``), not a problem.
    """
    report = CCTValidation()
    for check in (_check_schema, _check_unique, _check_references, _set_aside_boxes):
        check(cct, report)
    _check_bboxes(cct, report, bbox_tolerance)
    return report


PERSONAL_FIELDS = ("validated_by",)  # Animl: the reviewer's user name, often an e-mail address


def as_ingested(cct: dict[str, Any], report: CCTValidation) -> dict[str, Any]:
    """The export as the stages after ``cct_export`` read it: without the annotations ``report`` set aside and
    without personal data (PERSONAL_FIELDS). The same object when neither is there."""
    annotations = cct.get("annotations")
    if not isinstance(annotations, list) or not (report.set_aside or any(
            isinstance(ann, dict) and any(name in ann for name in PERSONAL_FIELDS) for ann in annotations)):
        return cct
    kept = [{k: v for k, v in ann.items() if k not in PERSONAL_FIELDS} if isinstance(ann, dict) else ann
            for index, ann in enumerate(annotations)
            if not (isinstance(ann, dict) and _annotation_key(index, ann) in report.set_aside)]
    return {**cct, "annotations": kept}


IMAGE_KEY_FIELDS = {"animl": "serving_bucket_key", "coco": "file_name"}  # profile -> image field with its key


def export_profile(cct: dict[str, Any]) -> str:
    """``animl`` for an export the Animl web app wrote (its images carry ``serving_bucket_key``: where each
    file is, ``file_name`` being only a suggested local path), else ``coco`` (LILA, MegaDetector's tools)."""
    return "animl" if any("serving_bucket_key" in image for image in _records(cct, "images")) else "coco"


def image_location(image: dict[str, Any]) -> str:
    """An image's location as a string; missing or blank locations become UNKNOWN_LOCATION."""
    location = image.get("location")
    if location is None or str(location).strip() == "":
        return UNKNOWN_LOCATION
    return str(location)


def image_camera(image: dict[str, Any]) -> str:
    """The camera of an Animl export's image: the second segment of its ``file_name``
    (``<project>/<camera>/<deployment>/<file>``); its location where the name has fewer segments."""
    parts = str(image.get("file_name", "")).split("/")
    return parts[1] if len(parts) >= 4 and parts[1] else image_location(image)


def category_location_table(cct: dict[str, Any]) -> pd.DataFrame:
    """Annotation counts with one row per category name and one column per location."""
    categories = {str(cat.get("id")): str(cat.get("name")) for cat in _records(cct, "categories")}
    locations = {str(image.get("id")): image_location(image) for image in _records(cct, "images")}
    rows = [
        (categories.get(str(ann.get("category_id")), "?"), locations.get(str(ann.get("image_id")), "?"))
        for ann in _records(cct, "annotations")
    ]
    frame = pd.DataFrame(rows, columns=["category", "location"])
    return pd.crosstab(frame["category"], frame["location"]) if rows else frame


def summarize_cct(cct: dict[str, Any]) -> dict[str, int]:
    """Counts of images, annotations, categories and distinct locations."""
    images = _records(cct, "images")
    return {
        "images": len(images),
        "annotations": len(_records(cct, "annotations")),
        "categories": len(_records(cct, "categories")),
        "locations": len({image_location(image) for image in images}),
    }
