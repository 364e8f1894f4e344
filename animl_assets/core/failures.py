"""The categories of MegaDetector's ``analyze_failed_images.py``, and which one an error falls in."""

from __future__ import annotations

from PIL import UnidentifiedImageError

GOOD, NONEXISTENT, NON_IMAGE, TRUNCATED, BAD = "good", "nonexistent", "non_image", "truncated", "bad"
STATUSES = (GOOD, NONEXISTENT, NON_IMAGE, TRUNCATED, BAD)


def failure_category(error: BaseException) -> str:
    """The category of an error raised while reading or decoding an image (Pillow or libjpeg-turbo)."""
    message = str(error).lower()
    if isinstance(error, FileNotFoundError):
        return NONEXISTENT
    if isinstance(error, UnidentifiedImageError) or "not a jpeg" in message:
        return NON_IMAGE
    if "truncat" in message or "premature end" in message:
        return TRUNCATED
    return BAD
