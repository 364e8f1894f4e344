"""The dataset chain at scale, without image I/O: cct -> MD JSON -> classification_ds -> splits.

    python benchmarks/dataset.py [--images 1000000] [--labels 100] [--locations 2000] [--trials 10000]

Prints seconds and peak RSS (the process's high-water mark after each stage) for a synthetic export,
then compares the random split with the reference's per-trial pandas loop on a dataset the size of
the reference's measurement (1,673 crops, 10 locations, 10 labels): time for the same trials, score.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import pandas as pd

from animl_assets.core.dataset.classification import build_classification_dataset, detection_rows
from animl_assets.core.dataset.label_spec import default_label_mapping
from animl_assets.core.dataset.splits import make_splits, split_score
from animl_assets.core.detect.megadetector import cct_to_md, ground_truth_labels


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def synthetic_export(images: int, labels: int, locations: int, seed: int = 0) -> dict:
    """A COCO Camera Traps dict: skewed label and location frequencies, one box per image."""
    rng = np.random.default_rng(seed)
    label_of = rng.zipf(1.3, images) % labels
    location_of = (rng.zipf(1.2, images) + label_of * 7) % locations
    boxes = rng.uniform(0.05, 0.5, (images, 2))
    return {
        "images": [{"id": i, "file_name": f"loc{int(loc):04d}/img{i:07d}.jpg", "width": 2048, "height": 1536,
                    "location": int(loc)} for i, loc in enumerate(location_of)],
        "annotations": [{"id": i, "image_id": i, "category_id": int(label),
                         "bbox": [10.0, 20.0, float(w * 2000), float(h * 1500)]}
                        for i, (label, (w, h)) in enumerate(zip(label_of, boxes))],
        "categories": [{"id": k, "name": f"species_{k:03d}"} for k in range(labels)],
    }


def reference_random_split(df: pd.DataFrame, val_frac: float, test_frac: float, trials: int, seed: int) -> dict:
    """create_classification_dataset.py's create_splits_random loop, restated (per-trial pandas)."""
    np.random.seed(seed)
    train_frac = 1.0 - val_frac - test_frac
    targets = {"train": train_frac, "val": val_frac, "test": test_frac}
    df = df.assign(dataset_location=df["dataset"] + "/" + df["location"].astype(str))
    counts = df.groupby(["label", "dataset_location"]).size().unstack("label", fill_value=0)
    num_locs, label_count, loc_count = len(counts), counts.sum(), (counts > 0).sum()
    best_score, best = np.inf, None
    for _ in range(trials):
        num_train = int(num_locs * (train_frac + np.random.uniform(-.03, .03)))
        num_val = int(num_locs * (val_frac + np.random.uniform(-.03, .03)))
        permuted = counts.index[np.random.permutation(num_locs)]
        split_to_locs = {"train": permuted[:num_train], "val": permuted[num_train:num_train + num_val],
                         "test": permuted[num_train + num_val:]}
        score = 0.0
        for split, locs in split_to_locs.items():
            split_df = counts.loc[locs]
            score += 2 * ((split_df.sum() / label_count - targets[split]) ** 2).sum()
            score += (((split_df > 0).sum() / loc_count - targets[split]) ** 2).sum()
        if score < best_score:
            best_score, best = score, split_to_locs
    return {s: [loc.split("/", 1) for loc in locs] for s, locs in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--locations", type=int, default=2000)
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--reference-trials", type=int, default=10_000)
    args = parser.parse_args()

    started = time.perf_counter()
    cct = synthetic_export(args.images, args.labels, args.locations)
    print(f"synthetic export: {args.images:,} images, {args.labels} labels, {args.locations:,} locations "
          f"({time.perf_counter() - started:.1f}s to generate, peak RSS {peak_gb():.2f} GB)")

    chain = time.perf_counter()
    started = time.perf_counter()
    md = cct_to_md(cct)
    print(f"  cct -> MD JSON:        {time.perf_counter() - started:6.2f}s  peak RSS {peak_gb():.2f} GB  "
          f"({sum(len(i['detections']) for i in md['images']):,} detections)")

    started = time.perf_counter()
    locations = {image["file_name"]: str(image["location"]) for image in cct["images"]}
    crops = detection_rows(md, "synthetic", ground_truth_labels(cct), locations)
    mapping = default_label_mapping(set(zip(crops["dataset"], crops["dataset_class"])))
    ds, report = build_classification_dataset(crops, mapping, min_locs=3)
    del crops
    print(f"  MD -> classification_ds: {time.perf_counter() - started:4.2f}s  peak RSS {peak_gb():.2f} GB  "
          f"({len(ds):,} rows, {ds['label'].nunique()} labels, left out {report.dropped})")

    started = time.perf_counter()
    splits = make_splits(ds, val_frac=0.15, test_frac=0.15, seed=0, trials=args.trials)
    split_seconds = time.perf_counter() - started
    score = split_score(ds, splits, val_frac=0.15, test_frac=0.15)
    print(f"  random splits ({args.trials:,} trials): {split_seconds:.2f}s  peak RSS {peak_gb():.2f} GB  "
          f"(score {score:.4f}; {', '.join(f'{k} {len(v)}' for k, v in splits.items())} locations)")
    print(f"  whole chain: {time.perf_counter() - chain:.1f}s, peak RSS {peak_gb():.2f} GB "
          f"(goals: < 60 s, < 4 GB; random split < 5 s)")

    small = synthetic_export(1673, 10, 10, seed=3)
    rows = pd.DataFrame({"dataset": "small", "location": [str(i["location"]) for i in small["images"]],
                         "label": [f"species_{a['category_id']:03d}" for a in small["annotations"]]})
    started = time.perf_counter()
    ours = make_splits(rows, val_frac=0.15, test_frac=0.15, seed=0, trials=args.reference_trials)
    ours_seconds = time.perf_counter() - started
    started = time.perf_counter()
    theirs = reference_random_split(rows, 0.15, 0.15, args.reference_trials, seed=0)
    theirs_seconds = time.perf_counter() - started
    print(f"1,673 crops, 10 locations, 10 labels, {args.reference_trials:,} trials: "
          f"vectorized {ours_seconds:.2f}s score {split_score(rows, ours, val_frac=.15, test_frac=.15):.4f}; "
          f"reference loop {theirs_seconds:.1f}s score {split_score(rows, theirs, val_frac=.15, test_frac=.15):.4f}")


if __name__ == "__main__":
    main()
