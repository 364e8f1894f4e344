"""A small, deterministic export written the way the Animl web app writes one (``ANIML_EXPORT.md`` in the
design notes): for demos and tests of what real Animl exports hold.

Eight cameras at seven deployments (two cameras share ``Fraser's Point``), each with a three-frame burst per
species; labels per box (two images hold a fox box and a raccoon box); reviewed labels beside a model's
unreviewed guesses (``validated: false``, some of them wrong); "empty" as a full-frame box of category 0;
an older image without width/height whose box is ``[null, null, null, null]``; an image whose labels were
all rejected (no annotation); a box one pixel past the edge (Animl rounds); case variants of one name
(``Mule Deer``, ``mule deer``); times with milliseconds and offsets that change across daylight saving,
older ones in UTC (``Z``), one null, and one burst that crosses the end of daylight saving. One camera's
deployment starts in the middle of a burst, so that burst lies under two locations. Images are stored under
their ``serving_bucket_key`` (``original/<id>-original.jpg``) below ``archive/``.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from animl_assets.core.ingest.sample import SampleExport, backdrop, draw_animal, jpeg, random_box

ANIML_EXPORT_NAME = "animl_export.json"
ARCHIVE = "archive"  # the serving bucket's stand-in: images under their serving_bucket_key
PROJECT = "demo_project"
REVIEWER = "reviewer@example.org"  # validated_by: personal data that must not reach artifacts
# camera serial -> deployment display name (None: the camera's default deployment)
CAMERAS = {"X8114541": "Fraser's Point", "X8114542": "Fraser's Point", "X8114543": "Bob's Knoll",
           "X8114544": "Lower Creek", "X8114545": "Dry Lake", "X8114546": "Pelican Bay",
           "X8114547": "Coches Prietos", "X8114548": None}
LATE_DEPLOYMENT = "X8114545"  # its deployment starts after the first frame of its first burst
# drawn species -> the label each camera's users typed (case variants of one name on purpose)
SPECIES_LABELS = {"deer": "Mule Deer", "fox": "fox", "raccoon": "raccoon", "turkey": "wild turkey"}
LABELS = ["unknown", "animal", "person", "vehicle", "Mule Deer", "fox", "raccoon", "wild turkey", "mule deer", "skunk"]
BACKDROP_OF = dict(zip(CAMERAS, ("ridge", "creek", "meadow", "pines", "quarry", "marsh", "bluff", "glade")))
SIZE = (640, 480)


def _location(camera: str) -> str:
    return CAMERAS[camera] or f"{camera}-default"


def _deployment_folder(location: str) -> str:
    return location.lower().replace(" ", "_").replace("'", "")


def _animl_time(instant: datetime) -> str:
    """The export's time zone (US Pacific): -07:00 in summer, -08:00 in winter, with milliseconds."""
    year = instant.year  # daylight saving: second Sunday of March to first Sunday of November, at 02:00 local
    march = datetime(year, 3, 8 + (6 - datetime(year, 3, 8).weekday()) % 7, 10, tzinfo=timezone.utc)
    november = datetime(year, 11, 1 + (6 - datetime(year, 11, 1).weekday()) % 7, 9, tzinfo=timezone.utc)
    offset = timedelta(hours=-7 if march <= instant < november else -8)
    return instant.astimezone(timezone(offset)).isoformat(timespec="milliseconds")


class _Writer:
    """Accumulates images, annotations and files as Animl's exporter would write them."""

    def __init__(self, out_dir: Path, seed: int) -> None:
        self.out_dir, self.rng = out_dir, np.random.default_rng(seed)
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.categories = {name: i for i, name in enumerate(["empty", *LABELS])}

    def image(self, camera: str, pixels: Image.Image, when: str | None, *, location: str | None = None,
              sized: bool = True) -> dict[str, Any]:
        data = jpeg(pixels)
        md5 = hashlib.md5(data).hexdigest()
        image_id, location = f"{PROJECT}:{md5}", location or _location(camera)
        key = f"original/{image_id}-original.jpg"
        (self.out_dir / ARCHIVE / key).parent.mkdir(parents=True, exist_ok=True)
        (self.out_dir / ARCHIVE / key).write_bytes(data)
        image = {"id": image_id, "file_name": f"{PROJECT}/{camera}/{_deployment_folder(location)}/"
                                              f"{image_id.replace(':', '-')}.jpg",
                 "serving_bucket_key": key, "original_file_name": f"IMG_{len(self.images):04d}.JPG",
                 "datetime": when, "location": location}
        if sized:
            image |= {"width": pixels.width, "height": pixels.height}
        self.images.append(image)
        return image

    def annotate(self, image: dict[str, Any], label: str, bbox: list, *, reviewed: bool = True,
                 confidence: float | None = 1.0) -> None:
        annotation = {"id": hashlib.md5(f"annotation {len(self.annotations)}".encode()).hexdigest()[:24],
                      "image_id": image["id"], "category_id": self.categories[label],
                      "sequence_level_annotation": False, "bbox": bbox}
        if confidence is not None:
            annotation["confidence"] = confidence
        annotation |= {"validated": reviewed, "validated_by": REVIEWER if reviewed else "Not Reviewed"}
        self.annotations.append(annotation)

    def burst(self, camera: str, species: list[str], start: datetime, *, frames: int = 3, reviewed: bool = True,
              labels: list[str] | None = None, confidence: float = 1.0, first_location: str | None = None,
              times: list[str | None] | None = None) -> None:
        """One burst: ``frames`` frames a second apart, each box moving a little to the right."""
        width, height = SIZE
        boxes = [random_box(self.rng, width, height, None) for _ in species]
        for frame in range(frames):
            pixels = backdrop(self.rng, SIZE, BACKDROP_OF[camera])
            draw = ImageDraw.Draw(pixels)
            moved = [[min(x + frame * w // 10, width - w), y, w, h] for x, y, w, h in boxes]
            for name, box in zip(species, moved):
                draw_animal(draw, name, tuple(box))
            when = times[frame] if times else _animl_time(start + timedelta(seconds=frame))
            image = self.image(camera, pixels, when, location=first_location if frame == 0 else None)
            for index, (name, box) in enumerate(zip(species, moved)):
                label = (labels or [SPECIES_LABELS[n] for n in species])[index]
                self.annotate(image, label, box, reviewed=reviewed, confidence=confidence)

    def empties(self, camera: str, when: datetime) -> None:
        """A person's "empty" and a model's (no confidence, not reviewed): full-frame boxes of category 0."""
        for reviewed in (True, False):
            image = self.image(camera, backdrop(self.rng, SIZE, BACKDROP_OF[camera]), _animl_time(when))
            self.annotate(image, "empty", [0, 0, *SIZE], reviewed=reviewed, confidence=1.0 if reviewed else None)
            when += timedelta(hours=2)


def write_animl_export(out_dir: str | Path, *, seed: int = 0) -> SampleExport:
    """Write ``animl_export.json`` and ``archive/original/…`` deterministically (see the module's docstring)."""
    out_dir = Path(out_dir)
    writer = _Writer(out_dir, seed)
    species = list(SPECIES_LABELS)
    for c, camera in enumerate(CAMERAS):
        for s, name in enumerate(species):  # reviewed bursts: summer and winter 2025, the first camera in 2023 (Z)
            start = datetime(2025, 6 + 6 * (s % 2), 1 + c * 3 + s, 10, 15, 10, tzinfo=timezone.utc)
            kwargs: dict[str, Any] = {}
            if c == 0:
                start = start.replace(year=2023)
                kwargs["times"] = [(start + timedelta(seconds=f)).isoformat(timespec="milliseconds")
                                   .replace("+00:00", "Z") for f in range(3)]
            if camera == LATE_DEPLOYMENT and s == 0:
                kwargs["first_location"] = f"{camera}-default"
            labels = ["mule deer"] if name == "deer" and c in (2, 5) else None
            writer.burst(camera, [name], start, labels=labels, **kwargs)
        # a model's guesses nobody reviewed: MegaDetector's "animal", and a raccoon taken for a fox
        guess = datetime(2025, 8, 10 + c, 4, 0, 0, tzinfo=timezone.utc)
        writer.burst(camera, ["raccoon"], guess, reviewed=False, labels=["fox"], confidence=0.61)
        writer.burst(camera, ["turkey"], guess + timedelta(hours=1), frames=1, reviewed=False, labels=["animal"],
                     confidence=0.87)
        writer.empties(camera, datetime(2025, 7, 1 + c, 20, 0, 0, tzinfo=timezone.utc))
    # per-box labels: a fox box and a raccoon box in one image, at two sites
    for camera in ("X8114543", "X8114546"):
        writer.burst(camera, ["fox", "raccoon"], datetime(2025, 9, 20, 12, 0, 0, tzinfo=timezone.utc), frames=1)
    # a burst across the end of daylight saving: 01:59:59 -07:00, then 01:00:00.500 -08:00 (1.5 s later)
    writer.burst("X8114544", ["deer"], datetime(2025, 11, 2, 8, 59, 59, tzinfo=timezone.utc),
                 times=["2025-11-02T01:59:59.000-07:00", "2025-11-02T01:00:00.500-08:00",
                        "2025-11-02T01:00:01.500-08:00"])
    width, height = SIZE
    older = writer.image("X8114547", backdrop(writer.rng, SIZE, "bluff"), None, sized=False)  # no size, no time
    writer.annotate(older, "fox", [None, None, None, None])
    pixels = backdrop(writer.rng, SIZE, "pines")
    draw_animal(ImageDraw.Draw(pixels), "fox", (width - 200, 100, 200, 150))
    edge = writer.image("X8114544", pixels, _animl_time(datetime(2025, 10, 3, 6, 0, 0, tzinfo=timezone.utc)))
    writer.annotate(edge, "fox", [width - 200, 100, 201, 150])  # rounded: one pixel past the right edge
    writer.image("X8114548", backdrop(writer.rng, SIZE, "glade"), _animl_time(  # every label rejected
        datetime(2025, 10, 4, 6, 0, 0, tzinfo=timezone.utc)))
    export = {"images": writer.images, "annotations": writer.annotations,
              "categories": [{"id": i, "name": n} for n, i in writer.categories.items()],
              "info": {"version": "1.0", "description": f"Animl export of project {PROJECT}, export 0", "year": 2025,
                       "date_created": "2025-12-01T10:00:00.000-08:00"}}
    path = out_dir / ANIML_EXPORT_NAME
    path.write_text(json.dumps(export, indent=1))
    return SampleExport(path, len(writer.images), len(writer.annotations), ())
