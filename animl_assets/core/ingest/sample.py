"""A small, deterministic, real COCO Camera Traps export for demos and tests.

Four animal classes a classifier can tell apart (each has its own colour, shape and texture),
several locations with their own backdrop, boxes of varied size and aspect (some touching the
borders, some images with two animals), empty images, and a few deliberately awkward files:
CMYK, grayscale and EXIF-rotated JPEGs (valid), plus zero-byte, truncated, non-image and missing
files (broken).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SPECIES = ("deer", "fox", "raccoon", "turkey")
CATEGORIES = [{"id": 0, "name": "empty"}] + [{"id": i + 1, "name": name} for i, name in enumerate(SPECIES)]
LOCATIONS = ("ridge", "creek", "meadow", "pines", "quarry", "marsh", "bluff", "glade", "ford", "hollow")
BACKDROPS = {"ridge": (96, 110, 70), "creek": (70, 100, 110), "meadow": (120, 140, 60), "pines": (40, 70, 45),
             "quarry": (130, 120, 110), "marsh": (85, 105, 80), "bluff": (140, 125, 95), "glade": (105, 135, 75),
             "ford": (75, 90, 100), "hollow": (60, 75, 55)}
EXPORT_NAME = "sample_export.json"
BROKEN = ("zero_byte", "truncated", "not_an_image", "missing")
BEHAVIOURS = ("standing", "resting", "moving", "eating", "interacting", "young_present")  # Snapshot Safari's
ODD_BUT_VALID = ("cmyk", "grayscale", "exif_rotated")


@dataclass(frozen=True)
class SampleExport:
    """Where the generated export lies and what it holds."""

    path: Path
    images: int
    annotations: int
    broken_files: tuple[str, ...]


def backdrop(rng: np.random.Generator, size: tuple[int, int], location: str) -> Image.Image:
    width, height = size
    base = np.array(BACKDROPS[location], dtype=np.float32)
    noise = rng.normal(0, 18, (height, width, 1)).astype(np.float32)
    gradient = np.linspace(-25, 25, height, dtype=np.float32)[:, None, None]
    pixels = np.clip(base + noise + gradient, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def draw_animal(draw: ImageDraw.ImageDraw, species: str, box: tuple[int, int, int, int]) -> None:
    x, y, w, h = box
    x1, y1 = x + w - 1, y + h - 1
    if species == "deer":  # brown body with white spots
        draw.ellipse((x, y, x1, y1), fill=(140, 90, 40))
        for i in range(1, 4):
            cx, cy = x + w * i // 4, y + h // 3
            r = max(1, min(w, h) // 12)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(240, 235, 220))
    elif species == "fox":  # orange wedge with a white tail tip
        draw.polygon([(x, y1), (x1, y1), ((x + x1) // 2, y)], fill=(230, 110, 20))
        r = max(1, min(w, h) // 8)
        draw.ellipse((x1 - 2 * r, y1 - 2 * r, x1, y1), fill=(250, 250, 250))
    elif species == "raccoon":  # grey body with black rings
        draw.rectangle((x, y, x1, y1), fill=(120, 120, 125))
        for i in range(4):
            sx = x + (2 * i + 1) * w // 9
            draw.rectangle((sx, y, sx + max(1, w // 9), y1), fill=(20, 20, 20))
    else:  # turkey: dark body, red head, blue fan
        draw.ellipse((x, y, x1, y1), fill=(35, 30, 45))
        draw.pieslice((x, y, x1, y + h), 200, 340, fill=(40, 60, 200))
        r = max(1, min(w, h) // 7)
        draw.ellipse((x + w // 2 - r, y, x + w // 2 + r, y + 2 * r), fill=(210, 30, 30))


def random_box(rng: np.random.Generator, width: int, height: int, border: str | None) -> list[int]:
    w = int(rng.uniform(0.12, 0.55) * width)
    aspect = rng.uniform(0.5, 2.0)
    h = int(min(max(8, w / aspect), height * 0.8))
    x = int(rng.integers(0, width - w + 1))
    y = int(rng.integers(0, height - h + 1))
    x = {"left": 0, "right": width - w}.get(border, x)
    y = {"top": 0, "bottom": height - h}.get(border, y)
    return [x, y, w, h]


def jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def behaviour_fields(rng: np.random.Generator, bbox: list[int], count: int, missing: float = 0.15
                     ) -> dict[str, Any]:
    """Snapshot Safari-style fields of an image's animals: ``count`` and yes/no behaviour flags (a tall first box
    stands, a wide one rests, so the two can mostly be learned from a crop), each missing (absent or null) with
    probability ``missing``."""
    standing = bbox[3] > bbox[2]
    values: dict[str, Any] = {"count": count, "standing": standing, "resting": not standing,
                              **{name: bool(rng.random() < 0.3) for name in BEHAVIOURS[2:]}}
    fields: dict[str, Any] = {}
    for name, value in values.items():
        draw = rng.random()
        if draw >= missing:
            fields[name] = value
        elif draw < missing / 2:
            fields[name] = None  # written as null; otherwise the key is absent
    return fields


def write_sample_export(out_dir: str | Path, *, seed: int = 0, images_per_class_and_location: int = 2,
                        size: tuple[int, int] = (640, 480), behaviours: bool = False,
                        empties_per_location: int = 1) -> SampleExport:
    """Write ``sample_export.json`` and its JPEGs (file names relative to ``out_dir``) deterministically. With
    ``behaviours`` each animal annotation also carries ``count`` and behaviour flags (``behaviour_fields``,
    some missing); ``empties_per_location`` empty frames are written per location."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    fields_rng = np.random.default_rng(seed + 7_919)  # its own draws: the images stay those of a plain export
    images, annotations, files = [], [], {}
    borders = [None, "left", "right", "top", "bottom", None]

    def add_image(file_name: str, location: str, pixels: Image.Image, boxes: list[tuple[int, list[int]]],
                  data: bytes | None = None) -> None:
        image_id = f"img{len(images):04d}"
        images.append({"id": image_id, "file_name": file_name, "width": pixels.width, "height": pixels.height,
                       "location": location, "datetime": f"2024-06-{1 + len(images) % 28:02d} 12:00:00",
                       "seq_id": f"seq{len(images):04d}", "frame_num": 0})
        # Snapshot Safari labels per image and species: every box of the image carries the same fields
        extra = behaviour_fields(fields_rng, boxes[0][1], len(boxes)) if behaviours and boxes[0][1] else {}
        for category_id, bbox in boxes:
            annotations.append({"id": f"ann{len(annotations):04d}", "image_id": image_id,
                                "category_id": category_id, "bbox": bbox, **extra})
        files[file_name] = jpeg(pixels) if data is None else data

    for location_index, location in enumerate(LOCATIONS):
        for category_id, species in enumerate(SPECIES, start=1):
            for index in range(images_per_class_and_location):
                portrait = (location_index + category_id + index) % 3 == 0
                width, height = size[::-1] if portrait else size
                pixels = backdrop(rng, (width, height), location)
                draw = ImageDraw.Draw(pixels)
                count = 2 if rng.random() < 0.25 else 1
                boxes = []
                for _ in range(count):
                    bbox = random_box(rng, width, height, borders[int(rng.integers(len(borders)))])
                    draw_animal(draw, species, tuple(bbox))
                    boxes.append((category_id, bbox))
                add_image(f"{location}/{species}_{index:03d}.jpg", location, pixels, boxes)
        for index in range(empties_per_location):
            add_image(f"{location}/empty_{index:03d}.jpg", location, backdrop(rng, size, location), [(0, None)])

    # Valid but awkward encodings: each has one deer at a known box in display coordinates.
    for odd in ODD_BUT_VALID:
        pixels = backdrop(rng, size, "meadow")
        bbox = [200, 150, 180, 120]
        draw_animal(ImageDraw.Draw(pixels), "deer", tuple(bbox))
        if odd == "cmyk":
            data = jpeg(pixels.convert("CMYK"))
        elif odd == "grayscale":
            data = jpeg(pixels.convert("L"))
        else:  # stored rotated; EXIF orientation 6 asks viewers to rotate 90° clockwise back
            exif = Image.Exif()
            exif[0x0112] = 6
            data = jpeg(pixels.transpose(Image.Transpose.ROTATE_90), exif=exif)
        add_image(f"odd/{odd}.jpg", "meadow", pixels, [(1, bbox)], data)

    # Broken files, each annotated so that its loss is reported downstream.
    good = jpeg(backdrop(rng, size, "quarry"))
    broken_data = {"zero_byte": b"", "truncated": good[: len(good) // 2],
                   "not_an_image": b"this is a text file, not a JPEG\n"}
    for name in BROKEN:
        pixels = Image.new("RGB", size)
        add_image(f"broken/{name}.jpg", "quarry", pixels, [(2, [10, 10, 100, 80])], broken_data.get(name))
        if name == "missing":
            files.pop(f"broken/{name}.jpg")

    for file_name, data in files.items():
        target = out_dir / file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    export = {
        "info": {"version": "1.0", "description": "animl-assets synthetic sample export", "seed": seed},
        "images": images, "annotations": annotations, "categories": CATEGORIES,
    }
    path = out_dir / EXPORT_NAME
    path.write_text(json.dumps(export, indent=1))
    return SampleExport(path, len(images), len(annotations), tuple(f"broken/{n}.jpg" for n in BROKEN))


@dataclass(frozen=True)
class SampleCrops:
    """A generated set of labelled crops in the reference's dataset layout."""

    crops_dir: Path
    dataset_dir: Path  # classification_ds.csv, label_index.json, splits.json
    crops: int


def write_sample_crops(out_dir: str | Path, *, labels: int = 4, crops_per_label_and_location: int = 4,
                       locations: int = 6, size: int = 96, seed: int = 0) -> SampleCrops:
    """Square crops of the sample species (``labels`` ≤ 4) on location backdrops, with the reference's
    ``classification_ds.csv``, ``label_index.json`` and ``splits.json`` (locations dealt out train/val/test
    4:1:1): a set a classifier can learn, for tests and benchmarks."""
    if not 1 <= labels <= len(SPECIES) or locations < 3:
        raise ValueError(f"labels must be 1..{len(SPECIES)} and locations at least 3")
    out_dir = Path(out_dir)
    crops_dir, dataset_dir = out_dir / "crops", out_dir / "dataset"
    rng = np.random.default_rng(seed)
    rows = []
    for location in LOCATIONS[:locations]:
        for species in SPECIES[:labels]:
            for index in range(crops_per_label_and_location):
                pixels = backdrop(rng, (size, size), location)
                side = int(rng.uniform(0.55, 0.9) * size)
                x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
                draw_animal(ImageDraw.Draw(pixels), species, (x, y, side, int(side * rng.uniform(0.7, 1.0))))
                path = f"sample/{location}/{species}_{index:03d}___crop00_sample.jpg"
                (crops_dir / path).parent.mkdir(parents=True, exist_ok=True)
                (crops_dir / path).write_bytes(jpeg(pixels))
                rows.append({"path": path, "dataset": "sample", "location": location, "dataset_class": species,
                             "confidence": 1.0, "label": species})
    dataset_dir.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    pd.DataFrame(rows).to_csv(dataset_dir / "classification_ds.csv", index=False)
    names = sorted(SPECIES[:labels])
    (dataset_dir / "label_index.json").write_text(json.dumps({str(i): n for i, n in enumerate(names)}, indent=1))
    chosen = [["sample", loc] for loc in LOCATIONS[:locations]]
    splits = {"train": chosen[:-2 * max(1, locations // 6)], "val": chosen[-2 * max(1, locations // 6):-max(1, locations // 6)],
              "test": chosen[-max(1, locations // 6):]}
    (dataset_dir / "splits.json").write_text(json.dumps(splits, indent=1))
    return SampleCrops(crops_dir, dataset_dir, len(rows))
