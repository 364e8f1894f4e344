"""The empty-or-not model's data: each image's label from the export and the whole frame, resized, as the picture
it learns from (no detector, no crop).

An image is ``not_empty`` when the export gives it any label that is not an empty one (an animal, a person, a
vehicle; boxed or not), ``empty`` when its labels are all empty ones (Animl: category 0 with a full-frame box),
and unlabelled otherwise: an image without any annotation may be unreviewed, so it is no example of either. With
``reviewed_only`` a model's unreviewed guess (Animl's ``validated: false``) is no label."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
from PIL import Image

from animl_assets.core.detect.crops import encode_jpeg, load_rgb

EMPTY, NOT_EMPTY = "empty", "not_empty"
LABEL_INDEX = {"0": EMPTY, "1": NOT_EMPTY}  # the model's label_index.json: p(not_empty) is its second column
EMPTY_CLASSES = ("empty", "blank", "nothing", "none")
FRAME_MARK = "___frame"  # a frame is stored as <file>___frame.jpg beside the export's folder layout
FRAME_COLUMNS = ["file", "frame", "label", "dataset_class", "location", "status", "error"]


def frame_name(file: str) -> str:
    """The stored frame of image ``file``."""
    return f"{file}{FRAME_MARK}.jpg"


def frame_image(frame: str) -> str:
    """The image a frame name was made from ("" for other names)."""
    head, mark, _ = frame.rpartition(FRAME_MARK)
    return head if mark else ""


def frame_labels(cct: Mapping[str, Any], empty_classes: Iterable[str] = EMPTY_CLASSES,
                 reviewed_only: bool = True) -> pd.DataFrame:
    """``file, label, dataset_class`` for every image of a COCO Camera Traps export: its empty-or-not label ("" when
    it has none) and the export class that decided it (the first other label of a not-empty image)."""
    empty = {" ".join(name.split()).lower() for name in empty_classes}
    names = {str(c["id"]): str(c["name"]) for c in cct.get("categories", [])}
    seen: dict[str, list[str]] = {}
    for ann in cct.get("annotations", []):
        if reviewed_only and ann.get("validated") is False:
            continue
        seen.setdefault(str(ann.get("image_id")), []).append(names.get(str(ann.get("category_id")), ""))
    rows = []
    for image in cct.get("images", []):
        classes = [c for c in seen.get(str(image["id"]), []) if c.strip()]
        animals = [c for c in classes if " ".join(c.split()).lower() not in empty]
        label = NOT_EMPTY if animals else EMPTY if classes else ""
        rows.append({"file": image["file_name"], "label": label,
                     "dataset_class": animals[0] if animals else classes[0] if classes else ""})
    return pd.DataFrame(rows, columns=["file", "label", "dataset_class"])


def frame_thumbnail(data: bytes, size: int) -> bytes:
    """The whole upright frame (EXIF orientation applied, any colour mode) resized to ``size`` x ``size`` (the
    model sees all of it, not a centre crop) as a JPEG."""
    pixels = load_rgb(data, max_side=2 * size)
    with Image.fromarray(pixels) as image:
        resized = image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
    return encode_jpeg(np.asarray(resized))
