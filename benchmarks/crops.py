"""Crop throughput: `crop_detections` against the reference algorithm on the same real JPEGs.

    python benchmarks/crops.py [--images-dir DIR] [--count N]

Default input: the real ENA24 JPEGs and boxes in ../shared/data/ena24_small (md_annotations.json),
repeated to --count images (at least 200). Prints images/s, crops/s and peak RSS for 1 worker and all
cores, the re-run, and the reference algorithm (crop_detections.py's Pillow load + crop + pad + save,
in threads as it runs them) on the same input.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps

from animl_assets.core.crops import crop_detections, crop_name

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ena24_small"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--count", type=int, default=210)
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration (median and best)")
    args = parser.parse_args()
    source = json.loads((args.images_dir / "md_annotations.json").read_text())
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        images_dir = Path(tmp) / "images"
        images_dir.mkdir()
        md = {**source, "images": []}
        for i in range(max(args.count, 200)):
            image = source["images"][i % len(source["images"])]
            name = f"{i:05d}_{image['file']}"
            shutil.copyfile(args.images_dir / image["file"], images_dir / name)
            md["images"].append({**image, "file": name})
        boxes = sum(len(image["detections"]) for image in md["images"])
        megapixels = sum(Image.open(images_dir / i["file"]).size[0] * Image.open(images_dir / i["file"]).size[1]
                         for i in md["images"]) / 1e6 / len(md["images"])
        print(f"{len(md['images'])} images ({megapixels:.1f} MP average), {boxes} boxes, {cores} cores")
        runs = [(1, "threads", None)] + [(cores, executor, None) for executor in ("threads", "processes")]
        runs += [(cores, "threads", 224)]
        for workers, executor, max_side in runs:
            rates = []
            for attempt in range(args.repeat):
                crops_dir = Path(tmp) / f"crops{workers}{executor}{max_side}-{attempt}"
                report = crop_detections(md, images_dir, crops_dir, workers=workers, executor=executor,
                                         max_side=max_side)
                assert report.crops == boxes and not report.failures, report.errors
                rates.append(report.crops / report.seconds)
            rate, best = statistics.median(rates), max(rates)
            label = f"workers={workers} {executor}" + (f" max_side={max_side} (draft decode)" if max_side else "")
            reference = REFERENCE_CROPS_PER_S.get(workers, float("nan"))
            print(f"  crop_detections {label}: {rate:6.1f} crops/s median, {best:6.1f} best of {args.repeat} "
                  f"({len(md['images']) * rate / report.crops:.1f} images/s; {rate / reference:.2f}x median, "
                  f"{best / reference:.2f}x best vs the reference figure {reference})")
        crops_dir = Path(tmp) / f"crops{cores}threadsNone-0"
        rerun = crop_detections(md, images_dir, crops_dir, workers=cores)
        print(f"  re-run, nothing to do: {rerun.seconds:.2f}s ({rerun.reused} crops reused, "
              f"{rerun.images_decoded} images decoded)")
        detector = md["info"]["detector"]
        for threads in sorted({1, cores}):
            rates = []
            for attempt in range(args.repeat):
                out = Path(tmp) / f"reference{threads}-{attempt}"
                started = time.perf_counter()
                with ThreadPoolExecutor(threads) as pool:
                    made = sum(pool.map(lambda i, out=out: reference_image(
                        str(images_dir / i["file"]), i["detections"], str(out), detector, i["file"]), md["images"]))
                rates.append(made / (time.perf_counter() - started))
            print(f"  reference algorithm threads={threads}: {statistics.median(rates):6.1f} crops/s median, "
                  f"{max(rates):6.1f} best, on the same input")
        sample = md["images"][0]
        ours = (crops_dir / crop_name(sample["file"], 0, detector)).read_bytes()
        theirs = (out / crop_name(sample["file"], 0, detector)).read_bytes()
        print(f"  crop bytes identical to the reference's: {ours == theirs}")
    print(f"  peak RSS: {peak_rss_mb():.0f} MB (largest of this process and its workers)")


if __name__ == "__main__":
    main()
