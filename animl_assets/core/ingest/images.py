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
    PRESENT,
    MAX_PIXELS,
    NON_IMAGE,
    NONEXISTENT,
    STATUSES,
    TRUNCATED,
    USABLE,
    failure_category,
    pixel_cap_error,
)
from animl_assets.core.files import Journal
from animl_assets.core.paths import UnsafePathError, redact_credentials, safe_relative_path
from animl_assets.core.store import Store
from animl_assets.core.transfers import parallel_map

__all__ = ["BAD", "FETCH_FAILED", "GOOD", "MAX_PIXELS", "NONEXISTENT", "NON_IMAGE", "PRESENT", "STATUSES", "TRUNCATED",
           "USABLE", "ImageCheck", "ImageRequest", "collect_images", "list_images", "pixel_cap_error", "verify_image"]
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
    """What ``images`` stores: every referenced image with its category and its key in ``source``, where the
    crops step reads it: ``{"uri": root, "mirrored": bool}`` (mirrored: the copies in the artifact store;
    empty in a manifest written before sources were recorded, which mirrored every image)."""

    manifest: pd.DataFrame = field(metadata=artifact_file("manifest.csv"))
    source: dict = field(default_factory=dict, metadata=artifact_file("source.json"))


def usable_images(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest's rows the crops step reads (good or present), with ``source_key`` (the file name in a
    manifest from before keys were recorded) and numeric ``bytes``, ``width``, ``height``, ``orientation``,
    ``mtime_ns`` (NaN where unknown)."""
    rows = manifest[manifest["status"].isin(USABLE)].copy()
    if "source_key" not in rows:
        rows["source_key"] = rows["file_name"]
    rows["source_key"] = rows["source_key"].where(rows["source_key"].astype(str).isin(["", "nan"]) == False,  # noqa: E712
                                                  rows["file_name"]).astype(str)
    for column in ("bytes", "width", "height", "orientation", "mtime_ns"):
        rows[column] = pd.to_numeric(rows[column], errors="coerce") if column in rows else float("nan")
    return rows


def listed_sources(manifest: pd.DataFrame) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """For the crops step: each usable image's key in its source and its ``(size, mtime_ns)`` as listed
    (None where the manifest has no time, e.g. a mirrored copy: the crops step stats it)."""
    rows = usable_images(manifest)
    return {str(row.file_name): (row.source_key, None if pd.isna(row.mtime_ns) or pd.isna(row.bytes)
                                 else (int(row.bytes), int(row.mtime_ns))) for row in rows.itertuples()}


def upright_sizes(manifest: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """Upright (EXIF-applied) sizes of the usable images whose size is known (decoded, or read from the
    header), by file name."""
    rows = usable_images(manifest).dropna(subset=["width", "height"])
    return {str(row.file_name): ((int(row.height), int(row.width)) if int(row.orientation or 1) in (5, 6, 7, 8)
                                 else (int(row.width), int(row.height))) for row in rows.itertuples()}


MANIFEST_COLUMNS = ["image_id", "file_name", "status", "error", "bytes", "width", "height", "mode",
                    "orientation", "fetched", "source_key", "mtime_ns"]
HEADER_BYTES = 1 << 16  # a JPEG's size and EXIF orientation sit in its first 64 KiB (an APP1 segment is at most that)


def list_images(
    requests: Iterable[ImageRequest],
    source: Store,
    *,
    probe: set[str] | frozenset[str] = frozenset(),
    workers: int = 16,
    attempts: int = 3,
    backoff_s: float = 0.2,
    max_pixels: int = MAX_PIXELS,
) -> pd.DataFrame:
    """The manifest of ``requests`` without downloading them: each image's existence, size and modification
    time from one HEAD (a stat for a local folder), status ``present`` (or ``nonexistent``, ``non_image`` for
    an empty file, ``bad`` for an unsafe key, ``fetch_failed`` for a transport fault). The crops step reads
    and decodes each image it needs once. Images in ``probe`` (file names whose size the export lacks but
    whose boxes need it) also get their width, height and orientation from one ranged GET of their header;
    one over ``max_pixels`` is ``bad`` there and then. Rows as MANIFEST_COLUMNS, in request order."""

    def one(request: ImageRequest) -> dict:
        row = {"image_id": request.image_id, "file_name": request.file_name, "source_key": request.source_key,
               "bytes": None, "fetched": False}
        try:
            safe_relative_path(request.file_name)
            safe_relative_path(request.source_key)
        except UnsafePathError as err:
            return row | asdict(ImageCheck(BAD, f"rejected: {err}"))
        try:
            found = _retried(lambda: source.stat(request.source_key), attempts, backoff_s)
        except Exception as err:  # noqa: BLE001 - the transport, not the image: listed again by the next run
            message = redact_credentials(f"{type(err).__name__}: {err}")
            return row | asdict(ImageCheck(FETCH_FAILED, f"listing failed after {attempts} attempts: {message}"))
        if found is None:
            return row | asdict(ImageCheck(NONEXISTENT, f"not found in {source.uri(request.source_key)}"))
        row |= {"bytes": found.size, "mtime_ns": int(found.mtime * 1e9)}
        if not found.size:
            return row | asdict(ImageCheck(NON_IMAGE, "empty file (0 bytes)"))
        if request.file_name not in probe:
            return row | asdict(ImageCheck(PRESENT))
        return row | asdict(_header_check(source, request.source_key, found.size, attempts, backoff_s, max_pixels))

    return pd.DataFrame(list(parallel_map(one, list(requests), workers)), columns=MANIFEST_COLUMNS)


def _header_check(source: Store, key: str, size: int, attempts: int, backoff_s: float, max_pixels: int) -> ImageCheck:
    """Size and orientation from the header; an image whose header says nothing is read and verified whole."""
    try:
        header = _retried(lambda: source.read_start(key, HEADER_BYTES), attempts, backoff_s)
        with Image.open(io.BytesIO(header)) as image:
            too_large = pixel_cap_error(image.width, image.height, max_pixels)
            if too_large:
                return ImageCheck(BAD, too_large, image.width, image.height, image.mode)
            orientation = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
            return ImageCheck(PRESENT, "", image.width, image.height, image.mode, orientation)
    except FileNotFoundError:
        return ImageCheck(NONEXISTENT, f"not found in {source.uri(key)}")
    except Exception:  # noqa: BLE001 - a header beyond 64 KiB or unreadable: decide on the whole file
        pass
    try:
        return verify_image(_retried(lambda: source.read_bytes(key), attempts, backoff_s), max_pixels)
    except FileNotFoundError:
        return ImageCheck(NONEXISTENT, f"not found in {source.uri(key)}")
    except Exception as err:  # noqa: BLE001
        return ImageCheck(FETCH_FAILED, redact_credentials(f"fetch failed after {attempts} attempts: "
                                                           f"{type(err).__name__}: {err}"))


def _retried(call: Callable[[], Any], attempts: int, backoff_s: float) -> Any:
    """``call()``, again after a transport fault (with backoff) up to ``attempts`` times; a missing file or an
    unsafe key is raised at once."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
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
        row = {"image_id": request.image_id, "file_name": request.file_name, "source_key": request.file_name,
               "bytes": None, "fetched": False}  # source_key: the copy's key in ``dest``
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
            data = _retried(lambda: source.read_bytes(request.source_key), attempts, backoff_s)
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
