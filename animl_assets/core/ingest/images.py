"""Fetching and verifying the images an export references.

Every image ends in one of the categories of MegaDetector's ``analyze_failed_images.py``:
good, nonexistent, non_image, truncated or bad.
"""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import pandas as pd
from PIL import Image, UnidentifiedImageError

from animl_assets.core.artifact_files import artifact_file
from animl_assets.core.failures import (
    BAD,
    FETCH_FAILED,
    GOOD,
    MAX_PIXELS,
    NON_IMAGE,
    NONEXISTENT,
    STATUSES,
    TRUNCATED,
    failure_category,
    pixel_cap_error,
)
from animl_assets.core.files import Journal
from animl_assets.core.paths import UnsafePathError, redact_credentials, safe_relative_path
from animl_assets.core.store import Store

__all__ = ["BAD", "FETCH_FAILED", "GOOD", "MAX_PIXELS", "NONEXISTENT", "NON_IMAGE", "STATUSES", "TRUNCATED", "ImageCheck",
           "ImageRequest", "collect_images", "pixel_cap_error", "verify_image"]
EXIF_ORIENTATION_TAG = 0x0112
@dataclass(frozen=True)
class ImageCheck:
    """The outcome of decoding one image file completely."""

    status: str
    error: str = ""
    width: int | None = None
    height: int | None = None
    mode: str = ""
    orientation: int = 1


def verify_image(data: bytes, max_pixels: int = MAX_PIXELS) -> ImageCheck:
    """Decode ``data`` fully and say whether it is a usable image, and if not, which kind of failure.
    An image of more than ``max_pixels`` is ``bad`` from its header alone, never decoded."""
    if not data:
        return ImageCheck(NON_IMAGE, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            too_large = pixel_cap_error(image.width, image.height, max_pixels)
            if too_large:
                return ImageCheck(BAD, too_large, image.width, image.height, image.mode)
            image.load()
            orientation = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
            return ImageCheck(GOOD, "", image.width, image.height, image.mode, orientation)
    except UnidentifiedImageError:
        return ImageCheck(NON_IMAGE, "not a recognised image format")
    except Exception as err:  # noqa: BLE001 - any decoder fault is a failed image, never a crashed run
        return ImageCheck(failure_category(err), f"{type(err).__name__}: {err}")


@dataclass(frozen=True)
class ImageRequest:
    """One image to make available: its id, its file name in the export and its key in the source."""

    image_id: str
    file_name: str
    source_key: str


@dataclass
class ImageManifest:
    """What ``images`` stores besides the image files: every referenced image with its category."""

    manifest: pd.DataFrame = field(metadata=artifact_file("manifest.csv"))


MANIFEST_COLUMNS = ["image_id", "file_name", "status", "error", "bytes", "width", "height", "mode",
                    "orientation", "fetched"]


def _fetch(source: Store, key: str, attempts: int, backoff_s: float) -> bytes:
    for attempt in range(1, attempts + 1):
        try:
            return source.read_bytes(key)
        except (FileNotFoundError, UnsafePathError):
            raise
        except Exception:  # noqa: BLE001 - transient transport faults are retried, then reported
            if attempt == attempts:
                raise
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def collect_images(
    requests: Iterable[ImageRequest],
    source: Store,
    dest: Store,
    *,
    already_good: dict[str, dict] | None = None,
    workers: int = 8,
    attempts: int = 3,
    backoff_s: float = 0.2,
    max_pixels: int = MAX_PIXELS,
    journal: Journal | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Copy each requested image from ``source`` to ``<file_name>`` in ``dest`` if it decodes.

    ``already_good`` maps file names verified by an earlier run to their manifest row; those still
    present in ``dest`` with the recorded size are neither fetched nor decoded again. Images over
    ``max_pixels`` are ``bad`` without being decoded, so memory stays within ``workers`` times that cap.
    A transport fault that outlasts ``attempts`` (with backoff) is ``fetch_failed``, not a property of
    the image: the next run fetches it again. With a ``journal`` every row is recorded as it is done, and
    good images a killed run recorded there count as ``already_good``. Returns the manifest: one row per
    request (MANIFEST_COLUMNS), in request order. Only good images are written.
    """
    already_good = dict(already_good or {})
    if journal is not None:
        already_good |= {row["file_name"]: _typed(row) for row in journal.read() if row["status"] == GOOD}
    requests = list(requests)
    done = 0

    def handle(request: ImageRequest) -> dict:
        row = {"image_id": request.image_id, "file_name": request.file_name, "bytes": None, "fetched": False}
        try:
            relative = safe_relative_path(request.file_name)
            safe_relative_path(request.source_key)
        except UnsafePathError as err:
            return row | asdict(ImageCheck(BAD, f"rejected: {err}"))
        earlier = already_good.get(request.file_name)
        if earlier is not None:
            present = dest.stat(relative)
            if present is not None and present.size == earlier.get("bytes"):
                return {**earlier, **row, "bytes": present.size, "status": GOOD, "error": ""}
        try:
            data = _fetch(source, request.source_key, attempts, backoff_s)
        except FileNotFoundError:
            return row | asdict(ImageCheck(NONEXISTENT, f"not found in {source.uri(request.source_key)}"))
        except Exception as err:  # noqa: BLE001 - the transport, not the image: retried by the next run
            message = redact_credentials(f"{type(err).__name__}: {err}")
            return row | asdict(ImageCheck(FETCH_FAILED, f"fetch failed after {attempts} attempts: {message}"))
        check = verify_image(data, max_pixels)
        if check.status == GOOD:
            dest.write_bytes(relative, data)
        return row | asdict(check) | {"bytes": len(data), "fetched": True}

    lock = threading.Lock()

    def tracked(batch: list[ImageRequest]) -> list[dict]:
        nonlocal done
        rows = [handle(request) for request in batch]
        if journal is not None:
            journal.append(rows)
        with lock:
            done += len(batch)
            if on_progress is not None:
                on_progress(done, len(requests))
        return rows

    # Small batches per task: one future per image cost more than a missing image's check (500k exports).
    size = max(1, min(64, len(requests) // (max(1, workers) * 16)))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rows = [row for batch in pool.map(tracked, (requests[i:i + size] for i in range(0, len(requests), size)))
                for row in batch]
    if journal is not None:
        journal.close()
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def _typed(row: dict[str, str]) -> dict[str, Any]:
    """A journal row (all text) with its numbers as numbers."""
    numbers = {k: int(row[k]) for k in ("bytes", "width", "height", "orientation") if row.get(k, "").isdigit()}
    return {**row, **numbers, "fetched": row.get("fetched") == "True"}
