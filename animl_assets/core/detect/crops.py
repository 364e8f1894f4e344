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
import multiprocessing
import os
import re
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageOps

from animl_assets.core.artifact_files import artifact_file
from animl_assets.core.detect.megadetector import animal_categories
from animl_assets.core.failures import MAX_PIXELS, failure_category, pixel_cap_error
from animl_assets.core.files import TEMP_PREFIX, Journal, atomic_open, atomic_write
from animl_assets.core.paths import UnsafePathError, safe_relative_path

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


def write_jpeg(path: str | os.PathLike[str], pixels: np.ndarray, comment: bytes | None = None) -> None:
    """Write ``pixels`` as the reference's ``crop.save(path)`` does (Pillow defaults, quality 75), with
    the source's ``comment`` where the reference's crop carries it. Atomic, and encoded straight into
    the file: Pillow's encoder holds the GIL when it encodes into memory, not into a file."""
    with atomic_open(path) as handle:
        Image.fromarray(pixels).save(handle, "JPEG", comment=comment)


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
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _Task:
    file: str
    source: str
    crops_dir: str
    boxes: tuple[tuple[int, str, float, tuple[float, ...]], ...]  # (index, category, conf, bbox)
    square: bool
    detector: str
    previous: tuple[tuple[str, Any], ...]  # crop name -> earlier manifest row, for this image
    max_side: int | None = None
    max_pixels: int = MAX_PIXELS


def _row(task: _Task, name: str, index: int, category: str, conf: float, bbox: tuple, size: tuple[int, int],
         stat: os.stat_result) -> dict[str, Any]:
    return {"crop": name, "file": task.file, "detection_index": index,
            "category": category, "conf": conf, "bbox": json.dumps(list(bbox)), "square": task.square,
            "width": size[0], "height": size[1], "source_size": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns, "max_side": task.max_side or ""}


def _crop_image(task: _Task) -> dict[str, Any]:
    """Worker: crop every box of one image that is missing or stale. Never raises."""
    result: dict[str, Any] = {"file": task.file, "rows": [], "made": 0, "reused": 0, "zero": 0, "decoded": False,
                              "region": False}
    try:
        stat = os.stat(task.source)
        previous = dict(task.previous)
        todo = []
        for index, category, conf, bbox in task.boxes:
            name = crop_name(task.file, index, task.detector)
            earlier = previous.get(name)
            fresh = (earlier is not None and earlier["bbox"] == json.dumps(list(bbox))
                     and str(earlier["square"]) == str(task.square)
                     and str(earlier.get("max_side") or "") == str(task.max_side or "")
                     and int(earlier["source_size"]) == stat.st_size
                     and int(earlier["source_mtime_ns"]) == stat.st_mtime_ns
                     and os.path.exists(os.path.join(task.crops_dir, name)))
            if fresh:
                result["rows"].append(dict(earlier))
                result["reused"] += 1
            else:
                todo.append((index, category, conf, bbox, name))
        if not todo:
            return result
        with open(task.source, "rb") as handle:
            decoded = decode_for_crops(handle.read(), [bbox for *_, bbox, _ in todo], square=task.square,
                                       max_side=task.max_side, max_pixels=task.max_pixels)
        result["decoded"], result["region"] = True, decoded.region
        for (index, category, conf, bbox, name), box in zip(todo, decoded.boxes):
            if box is None:
                result["zero"] += 1
                continue
            crop = cut(decoded.pixels, box)
            if task.max_side and max(crop.shape[:2]) > task.max_side:
                crop = np.asarray(Image.fromarray(crop).resize(
                    (max(1, crop.shape[1] * task.max_side // max(crop.shape[:2])),
                     max(1, crop.shape[0] * task.max_side // max(crop.shape[:2]))), Image.Resampling.BILINEAR))
            write_jpeg(os.path.join(task.crops_dir, name), crop, None if box.padded else decoded.comment)
            result["rows"].append(_row(task, name, index, category, conf, bbox, (crop.shape[1], crop.shape[0]), stat))
            result["made"] += 1
    except Exception as err:  # noqa: BLE001 - one bad image never aborts the run
        result["failure"] = failure_category(err)
        result["error"] = f"{type(err).__name__}: {err}"
        result["rows"] = []
    return result


def read_manifest(crops_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The crop manifest a previous run left in ``crops_dir`` (empty when there is none)."""
    path = Path(crops_dir) / MANIFEST
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _write_manifest(crops_dir: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda row: row["crop"]))
    atomic_write(crops_dir / MANIFEST, buffer.getvalue().encode())


def _tasks(detections: dict[str, Any], images_dir: Path, crops_dir: Path, threshold: float, square: bool,
           max_side: int | None, max_pixels: int, previous: dict[str, dict], report: CropReport) -> Iterable[_Task]:
    animal = animal_categories(detections)
    detector = str(detections.get("info", {}).get("detector") or "unknown")
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
        names = {crop_name(relative, index, detector) for index, *_ in boxes}
        yield _Task(relative, str(images_dir / relative), str(crops_dir), boxes, square, detector,
                    tuple((name, previous[name]) for name in sorted(names & previous.keys())), max_side, max_pixels)


def _pool(workers: int, executor: str) -> Executor:
    if executor == "threads":
        return ThreadPoolExecutor(max_workers=workers)
    if executor != "processes":
        raise ValueError(f"executor must be 'threads' or 'processes', not {executor!r}")
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(max_workers=workers, mp_context=context)


def crop_detections(detections: dict[str, Any], images_dir: str | os.PathLike[str],
                    crops_dir: str | os.PathLike[str], *, threshold: float = 0.0, square: bool = True,
                    workers: int | None = None, executor: str = "threads",
                    max_side: int | None = None, max_pixels: int = MAX_PIXELS) -> CropReport:
    """Crop every ``animal`` box at or above ``threshold`` in MegaDetector batch output ``detections``.

    Images are read from ``images_dir/<file>``; crops go to ``crops_dir/<file>___cropNN_<detector>.jpg``
    with a manifest (``crops.csv``). A re-run only decodes images whose crops are missing or whose
    source or boxes changed; the crops a killed run finished are kept in a journal and not redone. ``workers`` (default: all cores; 1 runs in this thread) are threads or,
    with ``executor="processes"``, processes. ``max_side`` (opt-in, not pixel-identical to the
    reference): DCT-scaled JPEG decoding, crops shrunk to at most that side. Images over ``max_pixels``
    fail as ``bad`` without being decoded.
    """
    started = time.perf_counter()
    images_dir, crops_dir = Path(images_dir), Path(crops_dir)
    crops_dir.mkdir(parents=True, exist_ok=True)
    report = CropReport()
    journal = Journal(crops_dir / JOURNAL, MANIFEST_COLUMNS)  # what a killed run finished: not redone
    previous = {row["crop"]: row for row in [*read_manifest(crops_dir), *journal.read()]}
    tasks = list(_tasks(detections, images_dir, crops_dir, threshold, square, max_side, max_pixels, previous, report))
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    if workers == 1:
        results = map(_crop_image, tasks)
    else:
        pool = _pool(workers, executor)
        results = pool.map(_crop_image, tasks, chunksize=max(1, min(16, len(tasks) // (workers * 4))))
    try:
        for result in results:
            report.rows.extend(result["rows"])
            report.crops += result["made"]
            report.reused += result["reused"]
            report.zero_size += result["zero"]
            report.images_decoded += result["decoded"]
            report.images_region_decoded += result["region"]
            if "failure" in result:
                report.failures[result["file"]] = result["failure"]
                report.errors[result["file"]] = result["error"]
            elif result["made"]:
                journal.append(result["rows"])
    finally:
        if workers > 1:
            pool.shutdown()
    _write_manifest(crops_dir, report.rows)
    journal.remove()
    report.seconds = time.perf_counter() - started
    return report
