"""Square (or tight) crops of MegaDetector boxes, with the reference geometry, at full machine speed.

One decode per image for all its boxes, and only of the part they cover: ordinary JPEGs decode just
the rows and iMCU columns the crops need (libjpeg-turbo's partial decoding, ``_jpegregion``; the same
pixels as a whole decode), other JPEGs through simplejpeg, everything else through Pillow. EXIF
orientation is applied before boxes are mapped. Crops are encoded straight into their files, as the
reference's Pillow code writes them (byte-identical). Parallel workers: threads by default (the
decoder and Pillow's encoder into a file release the GIL, so threads scale without process
start-up), processes on request. A manifest lets a re-run decode only images whose crops are missing
or whose source or boxes changed. Opt-in: ``max_side`` decodes JPEGs DCT-scaled (draft mode) when
every crop stays at least that large, and shrinks crops to it.
This module imports neither torch nor Dagster: workers start light.
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import os
import re
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageOps

from animl_assets.core.artifact_files import artifact_file
from animl_assets.core.detect.megadetector import animal_categories
from animl_assets.core.failures import FETCH_FAILED, MAX_PIXELS, NONEXISTENT, failure_category, failure_message, pixel_cap_error
from animl_assets.core.files import TEMP_PREFIX, Journal
from animl_assets.core.paths import UnsafePathError, redact_credentials, safe_relative_path
from animl_assets.core.store import LocalStore, Store
from animl_assets.core.transfers import parallel_map

try:
    from animl_assets.core.detect._jpegregion import decode_region
except ImportError:  # built without libjpeg's headers: every image is decoded whole
    decode_region = None

MANIFEST = "crops.csv"
JOURNAL = f"{TEMP_PREFIX}crops-journal.csv"  # temp-prefixed: never listed, published or taken for a crop
MANIFEST_COLUMNS = ["crop", "file", "detection_index", "category", "conf", "bbox", "square",
                    "width", "height", "source_size", "source_mtime_ns", "max_side"]
JPEG_MAGIC = b"\xff\xd8"
JPEG_END = b"\xff\xd9"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_EXIF_TRANSPOSES = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1),
}


def detector_tag(detector: str) -> str:
    """``info.detector`` made filesystem-safe: its base name, other characters than [A-Za-z0-9._-] as '_'."""
    base = re.split(r"[\\/]", detector.strip())[-1]
    return _UNSAFE.sub("_", base).strip("._") or "detector"


def crop_name(file: str, index: int, detector: str) -> str:
    """``<file>___crop<NN>_<detector>.jpg``, NN the box's index among the image's detections."""
    return crop_names([file], [index], detector)[0]


def crop_names(files: Iterable[str], indices: Iterable[int], detector: str) -> list[str]:
    """``crop_name`` for many boxes of one batch output (the detector tag is made once)."""
    tag = detector_tag(detector)
    return [f"{file}___crop{index:02d}_{tag}.jpg" for file, index in zip(files, indices)]


@dataclass
class CropManifest:
    """What ``crops`` stores besides the crop files: one row per crop, and the images that failed."""

    manifest: Any = field(metadata=artifact_file(MANIFEST))  # a DataFrame of MANIFEST_COLUMNS
    failures: Any = field(metadata=artifact_file("failures.csv"))  # file, category, error


@dataclass(frozen=True)
class CropBox:
    """Where to cut: ``left, top, width, height`` in pixels (may reach past the image, which reads
    as black, as Pillow's crop does) and ``side``, the square's side to pad to (0 for tight crops)."""

    left: int
    top: int
    width: int
    height: int
    side: int

    @property
    def padded(self) -> bool:
        """Whether the clipped crop is padded to a square (a new image in the reference: no comment)."""
        return bool(self.side) and self.width != self.height


def crop_box(image_width: int, image_height: int, bbox: list[float], square: bool) -> CropBox | None:
    """The reference geometry of crop_detections.py; None for a zero-size box.

    Unlike the reference, a box that is zero pixels wide or high is skipped in square mode too
    (the reference would square it into a crop of a line).
    """
    x, y = int(bbox[0] * image_width), int(bbox[1] * image_height)
    w, h = int(bbox[2] * image_width), int(bbox[3] * image_height)
    if w == 0 or h == 0:
        return None
    side = 0
    if square:
        side = max(w, h)
        x = max(0, min(x - int((side - w) / 2), image_width - w))
        y = max(0, min(y - int((side - h) / 2), image_height - h))
        w, h = min(image_width, side), min(image_height, side)
    return CropBox(x, y, w, h, side)


def cut(pixels: np.ndarray, box: CropBox) -> np.ndarray:
    """The crop as an RGB array, black where the box reaches past the image, padded to a centred
    square as ``ImageOps.pad(color=0)`` does when the clipped crop is not square."""
    height, width = pixels.shape[:2]
    out = np.zeros((box.height, box.width, 3), dtype=np.uint8)
    x0, y0 = max(box.left, 0), max(box.top, 0)
    x1, y1 = min(box.left + box.width, width), min(box.top + box.height, height)
    if x1 > x0 and y1 > y0:
        out[y0 - box.top:y1 - box.top, x0 - box.left:x1 - box.left] = pixels[y0:y1, x0:x1]
    if not box.padded:
        return out
    if box.width < box.side and box.height < box.side:  # only for boxes beyond the image: let Pillow scale
        return np.asarray(ImageOps.pad(Image.fromarray(out), (box.side, box.side), color=0))
    square = np.zeros((box.side, box.side, 3), dtype=np.uint8)
    left, top = round((box.side - box.width) * 0.5), round((box.side - box.height) * 0.5)
    square[top:top + box.height, left:left + box.width] = out
    return square


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit: scale to 8 bits instead of clipping
        wide = np.asarray(image, dtype=np.uint32)
        return Image.fromarray((wide >> 8 if wide.max() > 255 else wide).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def _draft_factor(size: tuple[int, int], boxes: Iterable[tuple], max_side: int | None) -> int:
    """The coarsest DCT scale (1, 2, 4, 8) at which every box's crop keeps a side of ``max_side``."""
    if not max_side:
        return 1
    sides = [max(int(b[2] * size[0]), int(b[3] * size[1])) for b in boxes]
    smallest = min(sides, default=0)
    return next((f for f in (8, 4, 2) if smallest // f >= max_side), 1)


def load_rgb(data: bytes, *, boxes: Iterable[tuple] = (), max_side: int | None = None) -> np.ndarray:
    """Decode to an upright RGB array: EXIF orientation applied, any mode (CMYK, L, P, RGBA, 16-bit)
    converted. Ordinary JPEGs go through libjpeg-turbo directly, with the same pixels as Pillow.
    With ``max_side``, JPEGs are decoded DCT-scaled as far as the normalized ``boxes`` allow."""
    with Image.open(io.BytesIO(data)) as image:  # reads the header only
        orientation = image.getexif().get(0x0112, 1)
        upright = image.size[::-1] if orientation in (5, 6, 7, 8) else image.size
        factor = _draft_factor(upright, boxes, max_side) if image.format == "JPEG" else 1
        if data[:2] == JPEG_MAGIC and image.mode in ("RGB", "L"):
            import simplejpeg

            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_factor=factor,
                                            min_width=image.width // factor, min_height=image.height // factor)
        else:
            if factor > 1:
                image.draft("RGB", (image.width // factor, image.height // factor))
            image.load()
            pixels = np.asarray(_to_rgb(image))
    transpose = _EXIF_TRANSPOSES.get(orientation)
    return np.ascontiguousarray(transpose(pixels)) if transpose else pixels


def region_decoding_available() -> bool:
    """Whether the partial JPEG decoder was built (it needs libjpeg's headers at install time)."""
    return decode_region is not None


@dataclass(frozen=True)
class DecodedCrops:
    """What ``decode_for_crops`` decoded: ``pixels`` (RGB, upright), each box's ``CropBox`` in those
    pixels (None for a zero-size box), whether only a ``region`` was decoded, and the source's
    ``comment`` (the reference's crops carry it when they are not padded)."""

    pixels: np.ndarray
    boxes: list[CropBox | None]
    region: bool
    comment: bytes | None


def decode_for_crops(data: bytes, bboxes: list[tuple[float, ...]], *, square: bool = True,
                     max_side: int | None = None, max_pixels: int = MAX_PIXELS) -> DecodedCrops:
    """Decode what the crops of the normalized ``bboxes`` need.

    A complete YCbCr, RGB or grayscale JPEG without EXIF rotation decodes only the rows and iMCU
    columns the crops cover (DCT-scaled as ``max_side`` allows), with the same pixels as a whole
    decode; anything else, or a region decode that meets corrupt data, decodes whole through
    ``load_rgb``. An image of more than ``max_pixels`` raises ValueError before anything is decoded.
    """
    with Image.open(io.BytesIO(data)) as image:  # reads the header only
        comment = image.info.get("comment")
        width, height = image.size
        too_large = pixel_cap_error(width, height, max_pixels)
        if too_large:
            raise ValueError(too_large)
        plain = (decode_region is not None and data[:2] == JPEG_MAGIC
                 and image.mode in ("RGB", "L") and image.getexif().get(0x0112, 1) == 1)
    if plain and data[-65536:].rstrip(b"\0").endswith(JPEG_END):
        scale = _draft_factor((width, height), bboxes, max_side)
        width, height = -(-width // scale), -(-height // scale)  # libjpeg's scaled size rounds up
        boxes = [crop_box(width, height, list(bbox), square) for bbox in bboxes]
        inside = [(max(b.left, 0), max(b.top, 0), min(b.left + b.width, width), min(b.top + b.height, height))
                  for b in boxes if b is not None]
        if not inside:
            return DecodedCrops(np.zeros((0, 0, 3), np.uint8), boxes, True, comment)
        try:
            raw, x0, y0, region_width, region_height = decode_region(
                data, min(i[0] for i in inside), min(i[1] for i in inside),
                max(i[2] for i in inside), max(i[3] for i in inside), scale)
        except ValueError:
            pass  # corrupt somewhere in the region: a full decode reports it as it always did
        else:
            pixels = np.frombuffer(raw, np.uint8).reshape(region_height, region_width, 3)
            moved = [None if b is None else CropBox(b.left - x0, b.top - y0, b.width, b.height, b.side)
                     for b in boxes]
            return DecodedCrops(pixels, moved, True, comment)
    pixels = load_rgb(data, boxes=bboxes, max_side=max_side)
    height, width = pixels.shape[:2]
    return DecodedCrops(pixels, [crop_box(width, height, list(bbox), square) for bbox in bboxes], False, comment)


def encode_jpeg(pixels: np.ndarray, comment: bytes | None = None) -> bytes:
    """``pixels`` as the reference's ``crop.save(path)`` writes them (Pillow defaults, quality 75), with the
    source's ``comment`` where the reference's crop carries it. Encoded into an in-memory file descriptor
    (memfd): Pillow's encoder releases the GIL for a real file, not for a BytesIO, and is faster that way."""
    fd = os.memfd_create("crop") if hasattr(os, "memfd_create") else None
    with (open(fd, "w+b") if fd is not None else tempfile.TemporaryFile()) as handle:
        Image.fromarray(pixels).save(handle, "JPEG", comment=comment)
        handle.seek(0)
        return handle.read()


@dataclass
class CropReport:
    """What a crop run did: images seen, crops made and reused, zero-size boxes, and each failed image
    with its category (``failures``) and message (``errors``)."""

    images: int = 0
    crops: int = 0
    reused: int = 0
    zero_size: int = 0
    images_decoded: int = 0
    images_region_decoded: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _Task:
    file: str
    key: str  # the image's key in the source store
    boxes: tuple[tuple[int, str, float, tuple[float, ...]], ...]  # (index, category, conf, bbox)
    previous: tuple[tuple[str, Any], ...]  # crop name -> earlier manifest row, for this image
    fingerprint: tuple[int, int] | None = None  # (size, mtime_ns) from the images manifest; None: stat the source


@dataclass(frozen=True)
class CropSettings:
    """How every image of a run is cropped."""

    square: bool = True
    detector: str = "unknown"
    max_side: int | None = None
    max_pixels: int = MAX_PIXELS
    attempts: int = 3
    backoff_s: float = 0.2


def _row(task: _Task, settings: CropSettings, name: str, box: tuple, size: tuple[int, int],
         fingerprint: tuple[int, int]) -> dict[str, Any]:
    index, category, conf, bbox = box
    return {"crop": name, "file": task.file, "detection_index": index, "category": category, "conf": conf,
            "bbox": json.dumps(list(bbox)), "square": settings.square, "width": size[0], "height": size[1],
            "source_size": fingerprint[0], "source_mtime_ns": fingerprint[1], "max_side": settings.max_side or ""}


def _is_fresh(earlier: dict | None, bbox: tuple, settings: CropSettings, fingerprint: tuple[int, int]) -> bool:
    return (earlier is not None and earlier["bbox"] == json.dumps(list(bbox))
            and str(earlier["square"]) == str(settings.square)
            and str(earlier.get("max_side") or "") == str(settings.max_side or "")
            and int(earlier["source_size"]) == fingerprint[0] and int(earlier["source_mtime_ns"]) == fingerprint[1])


def cut_crops(data: bytes, boxes: list[tuple[float, ...]],
              settings: CropSettings) -> tuple[list[tuple[bytes, tuple[int, int]] | None], bool]:
    """Each box's crop from an image's bytes, as JPEG bytes and (width, height) (None for a zero-size box),
    and whether only a region was decoded. Raises what the decoder raises for a broken image. Pure CPU work: runs in a thread or,
    with the processes executor, in a worker process."""
    decoded = decode_for_crops(data, boxes, square=settings.square, max_side=settings.max_side,
                               max_pixels=settings.max_pixels)
    out: list[tuple[bytes, tuple[int, int]] | None] = []
    for box in decoded.boxes:
        if box is None:
            out.append(None)
            continue
        crop = cut(decoded.pixels, box)
        if settings.max_side and max(crop.shape[:2]) > settings.max_side:
            longest = max(crop.shape[:2])
            crop = np.asarray(Image.fromarray(crop).resize(
                (max(1, crop.shape[1] * settings.max_side // longest), max(1, crop.shape[0] * settings.max_side // longest)),
                Image.Resampling.BILINEAR))
        out.append((encode_jpeg(crop, None if box.padded else decoded.comment), (crop.shape[1], crop.shape[0])))
    return out, decoded.region


def _read(source: Store, key: str, settings: CropSettings) -> bytes:
    """The image's bytes, read again after a transport fault (with backoff); a missing image raises at once."""
    for attempt in range(1, settings.attempts + 1):
        try:
            return source.read_bytes(key)
        except (FileNotFoundError, UnsafePathError):
            raise
        except Exception:  # noqa: BLE001 - the transport: retried, then reported as fetch_failed
            if attempt == settings.attempts:
                raise
            time.sleep(settings.backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


class _Cropper:
    """One image at a time, start to end: freshness, one read, crops in memory, each crop written to ``dest``."""

    def __init__(self, source: Store, dest: Store, present: set[str], settings: CropSettings,
                 processes: Executor | None) -> None:
        self.source, self.dest, self.present, self.settings, self.processes = source, dest, present, settings, processes

    def __call__(self, task: _Task) -> dict[str, Any]:
        """Crop every box of ``task``'s image that is missing or stale. Never raises."""
        result: dict[str, Any] = {"file": task.file, "rows": [], "made": 0, "reused": 0, "zero": 0,
                                  "decoded": False, "region": False, "bytes_read": 0, "bytes_written": 0}
        try:
            fingerprint = task.fingerprint or self._stat(task.key)
            previous, todo = dict(task.previous), []
            for box in task.boxes:
                name = crop_name(task.file, box[0], self.settings.detector)
                earlier = previous.get(name)
                if _is_fresh(earlier, box[3], self.settings, fingerprint) and name in self.present:
                    result["rows"].append(dict(earlier))
                    result["reused"] += 1
                else:
                    todo.append((box, name))
            if not todo:
                return result
            try:
                data = _read(self.source, task.key, self.settings)
            except FileNotFoundError:
                raise
            except Exception as err:  # noqa: BLE001 - the transport, not the image: tried again next run
                result.update(failure=FETCH_FAILED, error=redact_credentials(
                    f"fetch failed after {self.settings.attempts} attempts: {type(err).__name__}: {err}"), rows=[])
                return result
            result["bytes_read"] = len(data)
            fingerprint = (len(data), fingerprint[1])
            bboxes = [box[3] for box, _ in todo]
            crops, region = (self.processes.submit(cut_crops, data, bboxes, self.settings).result()
                             if self.processes else cut_crops(data, bboxes, self.settings))
            result["decoded"], result["region"] = True, region
            for (box, name), crop in zip(todo, crops):
                if crop is None:
                    result["zero"] += 1
                    continue
                self.dest.write_bytes(name, crop[0])
                result["rows"].append(_row(task, self.settings, name, box, crop[1], fingerprint))
                result["made"] += 1
                result["bytes_written"] += len(crop[0])
        except Exception as err:  # noqa: BLE001 - one bad image never aborts the run
            result.update(failure=failure_category(err), error=failure_message(err), rows=[])
        return result

    def _stat(self, key: str) -> tuple[int, int]:
        found = self.source.stat(key)
        if found is None:
            raise FileNotFoundError(f"not found in {self.source.uri(key)}")
        return found.size, round(found.mtime * 1e9)


def read_manifest(crops: str | os.PathLike[str] | Store) -> list[dict[str, Any]]:
    """The crop manifest a previous run left in ``crops`` (a folder or a store; empty when there is none)."""
    store = crops if hasattr(crops, "read_bytes") else LocalStore(crops)
    try:
        data = store.read_bytes(MANIFEST)
    except FileNotFoundError:
        return []
    return list(csv.DictReader(io.StringIO(data.decode())))


def manifest_bytes(rows: list[dict[str, Any]]) -> bytes:
    """``crops.csv``: the rows sorted by crop name."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda row: row["crop"]))
    return buffer.getvalue().encode()


def _tasks(detections: dict[str, Any], threshold: float, detector: str, previous: dict[str, dict],
           sources: dict[str, tuple[str, tuple[int, int] | None]] | None, report: CropReport) -> Iterable[_Task]:
    animal = animal_categories(detections)
    for image in detections.get("images", []):
        file = image.get("file")
        boxes = tuple(
            (index, det["category"], float(det.get("conf", 1.0)), tuple(det["bbox"]))
            for index, det in enumerate(image.get("detections") or [])
            if det.get("category") in animal and float(det.get("conf", 1.0)) >= threshold
        )
        if not boxes:
            continue  # images without animal boxes at the threshold (and failed detections) have no crops
        report.images += 1
        try:
            relative = safe_relative_path(file)
        except UnsafePathError as err:
            report.failures[str(file)], report.errors[str(file)] = "bad", f"rejected: {err}"
            continue
        if sources is not None and relative not in sources:
            report.failures[relative], report.errors[relative] = NONEXISTENT, "not in the images manifest"
            continue
        key, fingerprint = sources[relative] if sources is not None else (relative, None)
        names = {crop_name(relative, index, detector) for index, *_ in boxes}
        yield _Task(relative, key, boxes, tuple((name, previous[name]) for name in sorted(names & previous.keys())),
                    fingerprint)


def _pool(workers: int, executor: str) -> Executor | None:
    """The process pool for the CPU work with ``executor="processes"``; None for threads."""
    if executor == "threads":
        return None
    if executor != "processes":
        raise ValueError(f"executor must be 'threads' or 'processes', not {executor!r}")
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(max_workers=workers, mp_context=context)


def crop_images(detections: dict[str, Any], source: Store, dest: Store, journal: Journal, *,
                sources: dict[str, tuple[str, tuple[int, int] | None]] | None = None, threshold: float = 0.0,
                square: bool = True, workers: int | None = None, executor: str = "threads",
                max_side: int | None = None, max_pixels: int = MAX_PIXELS, attempts: int = 3,
                write_manifest: bool = True) -> CropReport:
    """Crop every ``animal`` box at or above ``threshold`` in MegaDetector batch output ``detections``, reading
    each image from ``source`` once and writing its crops straight to ``dest`` (no local copy of either).

    ``sources`` maps an image's file to its key in ``source`` and its ``(size, mtime_ns)`` as listed (the
    images manifest; an image not in it fails as ``nonexistent``); without it the key is the file and the
    source is stat'ed. A re-run reads only images whose crops are missing in ``dest`` or whose source or boxes
    changed; the crops a killed run finished are in ``journal`` and not redone. A transport fault that outlasts
    ``attempts`` fails the image as ``fetch_failed`` (tried again next run). ``workers`` images are in flight at
    once (default: all cores; memory stays within workers x ``max_pixels``), their decoding in the same threads
    or, with ``executor="processes"``, in worker processes. ``max_side`` (opt-in, not pixel-identical to the
    reference): DCT-scaled JPEG decoding, crops shrunk to at most that side. With ``write_manifest``,
    ``crops.csv`` is written to ``dest`` (a shard of a fanned-out run leaves it to the merge).
    """
    started = time.perf_counter()
    detector = str(detections.get("info", {}).get("detector") or "unknown")
    settings = CropSettings(square, detector, max_side, max_pixels, attempts)
    report = CropReport()
    previous = {row["crop"]: row for row in [*read_manifest(dest), *journal.read()]}
    tasks = list(_tasks(detections, threshold, detector, previous, sources, report))
    present = {item.key for item in dest.list(suffix=".jpg")} if previous else set()
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    processes = _pool(workers, executor)
    try:
        for result in parallel_map(_Cropper(source, dest, present, settings, processes), tasks, workers):
            _record(report, result, journal)
    finally:
        if processes is not None:
            processes.shutdown()
    journal.close()
    if write_manifest:
        dest.write_bytes(MANIFEST, manifest_bytes(report.rows))
        journal.remove()
    report.seconds = time.perf_counter() - started
    return report


def _record(report: CropReport, result: dict[str, Any], journal: Journal) -> None:
    report.rows.extend(result["rows"])
    report.crops += result["made"]
    report.reused += result["reused"]
    report.zero_size += result["zero"]
    report.images_decoded += result["decoded"]
    report.images_region_decoded += result["region"]
    report.bytes_read += result["bytes_read"]
    report.bytes_written += result["bytes_written"]
    if "failure" in result:
        report.failures[result["file"]] = result["failure"]
        report.errors[result["file"]] = result["error"]
    elif result["made"]:
        journal.append(result["rows"])


def shard_count(detections: dict[str, Any], shards: int, images_per_shard: int) -> int:
    """How many shards a fanned-out crop run has: ``shards`` when set, else one per ``images_per_shard`` images
    with a detection (at least one; a small export is one shard)."""
    if shards:
        return shards
    boxed = sum(1 for image in detections.get("images", []) if image.get("detections"))
    return max(1, math.ceil(boxed / images_per_shard))


def shard_of(detections: dict[str, Any], index: int, count: int) -> dict[str, Any]:
    """Shard ``index`` of ``count``: the batch output with a contiguous ``count``-th of its images that have a
    detection (the others have nothing to crop). The shards are disjoint, in order, and together all of it."""
    boxed = [image for image in detections.get("images", []) if image.get("detections")]
    return {**detections, "images": boxed[index * len(boxed) // count:(index + 1) * len(boxed) // count]}


def report_bytes(report: CropReport) -> bytes:
    """``report`` as JSON, for a shard's report left in the store for the merge."""
    return json.dumps(asdict(report), sort_keys=True).encode()


def read_report(data: bytes) -> CropReport:
    """The report ``report_bytes`` wrote."""
    return CropReport(**json.loads(data))


def merge_reports(reports: Iterable[CropReport]) -> CropReport:
    """One report for shards run side by side: counts summed, failures and rows joined, the longest time."""
    merged = CropReport()
    for report in reports:
        for name in ("images", "crops", "reused", "zero_size", "images_decoded", "images_region_decoded",
                     "bytes_read", "bytes_written"):
            setattr(merged, name, getattr(merged, name) + getattr(report, name))
        merged.seconds = max(merged.seconds, report.seconds)
        merged.failures.update(report.failures)
        merged.errors.update(report.errors)
        merged.rows.extend(report.rows)
    return merged


def crop_detections(detections: dict[str, Any], images_dir: str | os.PathLike[str],
                    crops_dir: str | os.PathLike[str], **options: Any) -> CropReport:
    """``crop_images`` between two local folders: images read from ``images_dir/<file>``, crops written to
    ``crops_dir/<file>___cropNN_<detector>.jpg`` with ``crops.csv``, the journal of a killed run in
    ``crops_dir`` (temp-prefixed, never taken for a crop)."""
    crops_dir = Path(crops_dir)
    crops_dir.mkdir(parents=True, exist_ok=True)
    return crop_images(detections, LocalStore(images_dir), LocalStore(crops_dir),
                       Journal(crops_dir / JOURNAL, MANIFEST_COLUMNS), **options)
