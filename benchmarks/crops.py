"""Crop throughput: `crop_detections` against the reference algorithm on the same real JPEGs.

    python benchmarks/crops.py [--images-dir DIR] [--count N] [--repeat R] [--boxes-per-image B]

Default input: the real ENA24 JPEGs and boxes in ../shared/data/ena24_small (md_annotations.json),
repeated to --count images (at least 200); --boxes-per-image adds random boxes of the real box's size.
Prints images/s, crops/s and peak RSS for 1 worker and all cores, the re-run, and the reference
algorithm (crop_detections.py's Pillow load + crop + pad + save, in threads as it runs them) on the
same input; then the same runs with whole-image decodes instead of the region decoder, and how many
crops are byte-identical to the reference's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from _shared_data import ENA24_DIR, require
from PIL import Image, ImageOps

from animl_assets.core.detect import crops as crops_module
from animl_assets.core.detect.crops import CropReport, crop_detections, crop_name

REFERENCE_CROPS_PER_S = {1: 57.5, 2: 99.8}  # crop_detections.py --square-crops, in-process, this machine class


def reference_image(path: str, detections: list, out_dir: str, detector: str, file: str) -> int:
    """crop_detections.py's load_and_crop + save_crop, restated (Pillow throughout)."""
    with Image.open(path) as img:
        img.load()
    if img.mode != "RGB":
        img = img.convert(mode="RGB")
    made = 0
    for index, det in enumerate(detections):
        img_w, img_h = img.size
        xmin, ymin = int(det["bbox"][0] * img_w), int(det["bbox"][1] * img_h)
        box_w, box_h = int(det["bbox"][2] * img_w), int(det["bbox"][3] * img_h)
        box_size = max(box_w, box_h)
        xmin = max(0, min(xmin - int((box_size - box_w) / 2), img_w - box_w))
        ymin = max(0, min(ymin - int((box_size - box_h) / 2), img_h - box_h))
        box_w, box_h = min(img_w, box_size), min(img_h, box_size)
        if box_w == 0 or box_h == 0:
            continue
        crop = img.crop(box=[xmin, ymin, xmin + box_w, ymin + box_h])
        if box_w != box_h:
            crop = ImageOps.pad(crop, size=(box_size, box_size), color=0)
        target = Path(out_dir) / crop_name(file, index, detector)
        target.parent.mkdir(parents=True, exist_ok=True)
        crop.save(target)
        made += 1
    return made


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def run_reference(md: dict, images_dir: Path, tmp: Path, threads: int, attempt: int) -> tuple[int, float]:
    """The reference algorithm over ``md``, in ``threads`` threads: (crops made, seconds)."""
    detector, out = md["info"]["detector"], tmp / f"reference{threads}-{attempt}"
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        made = sum(pool.map(lambda i: reference_image(str(images_dir / i["file"]), i["detections"], str(out),
                                                      detector, i["file"]), md["images"]))
    return made, time.perf_counter() - started


def ours_dir(tmp: Path, workers: int, executor: str, max_side: int | None, region: bool, attempt: int) -> Path:
    """Where ``run_ours`` writes the crops of one configuration and round."""
    return tmp / f"{workers}{executor}{max_side}{region}-{attempt}"


def run_ours(md: dict, images_dir: Path, tmp: Path, workers: int, executor: str, max_side: int | None,
             region: bool, attempt: int) -> CropReport:
    """``crop_detections`` over ``md``; with ``region`` False, the region decoder switched off."""
    decoder = crops_module.decode_region
    crops_module.decode_region = decoder if region else None
    try:
        report = crop_detections(md, images_dir, ours_dir(tmp, workers, executor, max_side, region, attempt),
                                 workers=workers, executor=executor, max_side=max_side)
    finally:
        crops_module.decode_region = decoder
    assert report.crops == sum(len(i["detections"]) for i in md["images"]) and not report.failures, report.errors
    return report


def paired(ours, reference, repeat: int) -> tuple[float, float, float, CropReport]:
    """Alternate ``ours(attempt)`` and ``reference(attempt)`` ``repeat`` times, so that both see the same
    machine load: median crops/s of each, the median of the ratios, and the last report."""
    pairs = []
    for attempt in range(repeat):
        made, seconds = reference(attempt)
        report = ours(attempt)
        pairs.append((report.crops / report.seconds, made / seconds))
    return (statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs),
            statistics.median(p[0] / p[1] for p in pairs), report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-dir", type=Path, default=ENA24_DIR)
    parser.add_argument("--count", type=int, default=210)
    parser.add_argument("--repeat", type=int, default=3, help="rounds per configuration (medians)")
    parser.add_argument("--boxes-per-image", type=int, default=1,
                        help="add random boxes (seeded, the real box's size) until each image has this many")
    args = parser.parse_args()
    source = json.loads((require(args.images_dir, "md_annotations.json") / "md_annotations.json").read_text())
    cores = os.cpu_count() or 1
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        images_dir = Path(tmp) / "images"
        images_dir.mkdir()
        md = {**source, "images": []}
        for i in range(max(args.count, 200)):
            image = source["images"][i % len(source["images"])]
            name = f"{i:05d}_{image['file']}"
            shutil.copyfile(args.images_dir / image["file"], images_dir / name)
            detections = list(image["detections"])
            while len(detections) < args.boxes_per_image:
                w, h = detections[0]["bbox"][2:]
                detections.append({**detections[0], "bbox": [rng.uniform(0, 1 - w), rng.uniform(0, 1 - h), w, h]})
            md["images"].append({**image, "file": name, "detections": detections})
        boxes = sum(len(image["detections"]) for image in md["images"])
        megapixels = sum(Image.open(images_dir / i["file"]).size[0] * Image.open(images_dir / i["file"]).size[1]
                         for i in md["images"]) / 1e6 / len(md["images"])
        print(f"{len(md['images'])} images ({megapixels:.1f} MP average), {boxes} boxes, {cores} cores, "
              f"region decoder built: {crops_module.region_decoding_available()}")
        worker_counts = sorted({1, cores})
        runs = [(workers, "threads", None, True) for workers in worker_counts]
        runs += [(cores, "processes", None, True), (cores, "threads", 224, True)]
        runs += [(workers, "threads", None, False) for workers in worker_counts]
        for workers, executor, max_side, region in runs:
            rate, restated, ratio, report = paired(
                partial(run_ours, md, images_dir, Path(tmp), workers, executor, max_side, region),
                partial(run_reference, md, images_dir, Path(tmp), workers), args.repeat)
            label = f"workers={workers} {executor}" + (f" max_side={max_side} (draft)" if max_side else "")
            label += "" if region else ", whole-image decodes (no region decoder)"
            figure = REFERENCE_CROPS_PER_S.get(workers, float("nan"))
            print(f"  crop_detections {label}: {rate:6.1f} crops/s, {rate * len(md['images']) / boxes:6.1f} images/s "
                  f"({report.images_region_decoded} of "
                  f"{report.images_decoded} images region-decoded) vs the reference algorithm {restated:6.1f} "
                  f"in the same rounds: {ratio:.2f}x; {rate / figure:.2f}x the issue's reference figure {figure}")
        crops_dir = ours_dir(Path(tmp), cores, "threads", None, True, 0)
        rerun = crop_detections(md, images_dir, crops_dir, workers=cores)
        print(f"  re-run, nothing to do: {rerun.seconds:.2f}s ({rerun.reused} crops reused, "
              f"{rerun.images_decoded} images decoded)")
        reference_dir = Path(tmp) / f"reference{cores}-0"  # written by the reference in the first round
        names = [row["crop"] for row in rerun.rows]
        same = sum((crops_dir / n).read_bytes() == (reference_dir / n).read_bytes() for n in names)
        print(f"  crops byte-identical to the reference's: {same} of {len(names)}")
    print(f"  peak RSS: {peak_rss_mb():.0f} MB (largest of this process and its workers)")


if __name__ == "__main__":
    main()
