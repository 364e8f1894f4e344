"""The categories of MegaDetector's ``analyze_failed_images.py``, and which one an error falls in."""

from __future__ import annotations

from PIL import UnidentifiedImageError

GOOD, NONEXISTENT, NON_IMAGE, TRUNCATED, BAD = "good", "nonexistent", "non_image", "truncated", "bad"
FETCH_FAILED = "fetch_failed"  # not the image's fault: the transport failed every attempt; fetched again next run
PRESENT = "present"  # in the source with a size, not decoded yet: the crops step reads and verifies it once
STATUSES = (GOOD, PRESENT, NONEXISTENT, NON_IMAGE, TRUNCATED, BAD, FETCH_FAILED)
USABLE = (GOOD, PRESENT)  # what the crops step reads; every other status is a failure


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


def failure_message(error: BaseException) -> str:
    """``error`` as one line for a failure report, without the in-memory buffer's address Pillow puts in it."""
    if isinstance(error, UnidentifiedImageError):
        return "UnidentifiedImageError: not an image format Pillow can read"
    return f"{type(error).__name__}: {error}"


MAX_PIXELS = 50_000_000  # 150 MB decoded (RGB) per worker: camera traps stay well below, PNG bombs do not


def pixel_cap_error(width: int, height: int, max_pixels: int) -> str:
    """Why an image of ``width`` x ``height`` is not decoded, or "" when it is within ``max_pixels``."""
    if width * height <= max_pixels:
        return ""
    return (f"{width}x{height} is {width * height / 1e6:.0f} megapixels, over the cap of {max_pixels / 1e6:g} "
            "(max_megapixels); not decoded")
