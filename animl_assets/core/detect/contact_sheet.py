"""A contact sheet: a few sample crops per class in one PNG, for the asset's metadata."""

from __future__ import annotations

import io
from typing import Callable

from PIL import Image, ImageDraw

THUMB = 96
LABEL_WIDTH = 140


def contact_sheet(crops_by_label: dict[str, list[str]], read: Callable[[str], bytes], per_label: int = 8) -> bytes:
    """PNG bytes: one row per label with up to ``per_label`` thumbnails of its crops (bytes from ``read``)."""
    labels = sorted(crops_by_label)
    sheet = Image.new("RGB", (LABEL_WIDTH + per_label * (THUMB + 4), max(1, len(labels)) * (THUMB + 4)),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if not labels:
        draw.text((4, THUMB // 2 - 6), "no crops", fill=(0, 0, 0))
    for row, label in enumerate(labels):
        top = row * (THUMB + 4)
        draw.text((4, top + THUMB // 2 - 6), f"{label} ({len(crops_by_label[label])})", fill=(0, 0, 0))
        for column, crop in enumerate(sorted(crops_by_label[label])[:per_label]):
            with Image.open(io.BytesIO(read(crop))) as image:
                image.thumbnail((THUMB, THUMB))
                sheet.paste(image.convert("RGB"), (LABEL_WIDTH + column * (THUMB + 4), top))
    buffer = io.BytesIO()
    sheet.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()
