"""The classification dataset: ``classification_ds.csv`` and ``label_index.json`` from labelled crops."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from animl_assets.core.artifact_files import artifact_file, artifact_files
from animl_assets.core.dataset.label_spec import Pair
from animl_assets.core.dataset.outputs import output_values
from animl_assets.core.dataset.splits import pair_keys
from animl_assets.core.detect.crops import crop_names
from animl_assets.core.detect.megadetector import animal_categories, with_box_labels
from animl_assets.core.ingest.cct import UNKNOWN_LOCATION
from animl_assets.core.layout import partition_folder

DS_COLUMNS = ["path", "dataset", "location", "dataset_class", "confidence", "label"]
CROP_COLUMNS = DS_COLUMNS[:-1] + ["image"]  # what the builder takes: one row per crop, before labelling
OWN_BOX = "own_box"  # optional builder column: the crop's class is its own box's annotation, not its image's


@dataclass
class DatasetReport:
    """What the builder left out and why: counts per reason, conflicting images, sampling."""

    dropped: dict[str, int] = field(default_factory=dict)
    conflicts: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["dataset", "image", "labels"]))
    sampled: dict[str, tuple[int, int]] = field(default_factory=dict)

    def drop(self, reason: str, count: int) -> None:
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + int(count)


@dataclass
class DatasetVersion:
    """One version of the classification dataset, as the reference scripts' files."""

    classification_ds: pd.DataFrame = field(metadata=artifact_file("classification_ds.csv", keep_text=True))
    label_index: dict[str, str] = field(metadata=artifact_file("label_index.json"))
    label_spec: dict[str, Any] = field(metadata=artifact_file("label_spec.json"))
    match_test_locations: list[list[str]] = field(metadata=artifact_file("match_test_locations.json"))
    # extra outputs (core.dataset.outputs): one label_index_<output>.json each; their columns follow DS_COLUMNS
    output_index: dict[str, dict[str, str]] = field(default_factory=dict,
                                                    metadata=artifact_files("label_index_{}.json"))

    def __post_init__(self) -> None:
        # the extra outputs' columns as class names however the CSV reader typed them ("2", not 2.0; missing ""):
        # a loaded version writes the bytes it was read from, so its version is the same
        for name in self.output_index:
            if name in self.classification_ds:
                self.classification_ds[name] = output_values(self.classification_ds[name])


def detection_rows(md: dict[str, Any], dataset: str, dataset_classes: pd.DataFrame,
                   locations: dict[str, str]) -> pd.DataFrame:
    """One CROP_COLUMNS row per animal box of batch output ``md``, named as ``crop_detections`` names
    its crops; ``dataset_classes`` has ``file, detection_index, label`` and ``locations`` maps file to
    location. For building a dataset from detections alone (no crops on disk, e.g. benchmarks)."""
    animal = animal_categories(md)
    detector, folder = str(md["info"].get("detector", "unknown")), partition_folder(dataset)
    files, indices, confidences = [], [], []
    for image in md["images"]:
        for index, det in enumerate(image.get("detections") or []):
            if det["category"] in animal:
                files.append(image["file"])
                indices.append(index)
                confidences.append(float(det.get("conf", 1.0)))
    rows = pd.DataFrame({"file": files, "detection_index": indices, "confidence": confidences})
    rows = with_box_labels(rows, dataset_classes)
    return pd.DataFrame({
        "path": [f"{folder}/{name}" for name in crop_names(rows["file"], rows["detection_index"], detector)],
        "dataset": dataset,
        "location": rows["file"].map(locations).fillna(UNKNOWN_LOCATION).astype(str),
        "dataset_class": rows["label"].astype(str),
        "confidence": rows["confidence"],
        "image": rows["file"],
    })


def _sample_with_priority(rows: pd.DataFrame, max_count: int, prioritize: list[list[str]],
                          rng: np.random.Generator) -> pd.DataFrame:
    """At most ``max_count`` rows, taking datasets level by level in ``prioritize`` order, then the rest;
    a level larger than what is left is sampled at random."""
    chosen, remaining, taken = [], max_count, pd.Series(False, index=rows.index)
    for level in [*prioritize, None]:
        pool = rows[~taken & (rows["dataset"].isin(level) if level is not None else ~taken)]
        if len(pool) > remaining:
            pool = pool.iloc[np.sort(rng.choice(len(pool), remaining, replace=False))]
        chosen.append(pool)
        taken |= rows.index.isin(pool.index) | (rows["dataset"].isin(level) if level is not None else False)
        remaining -= len(pool)
        if remaining == 0:
            break
    return pd.concat(chosen)


def build_classification_dataset(
    crops: pd.DataFrame, mapping: dict[Pair, str], *, spec: dict[str, dict[str, Any]] | None = None,
    threshold: float = 0.0, min_locs: int | None = None, one_label_per_image: bool = True, seed: int = 0,
    extra_columns: Sequence[str] = (),
) -> tuple[pd.DataFrame, DatasetReport]:
    """``classification_ds.csv`` rows (DS_COLUMNS, sorted by path) from CROP_COLUMNS rows.

    ``mapping`` takes (dataset, dataset_class) to an output label (see label_spec); crops below
    ``threshold``, without a dataset class or outside the mapping are left out, as are images whose
    crops would get different labels (reported, not guessed; crops whose class is their own box's, the
    ``own_box`` column, are never such a clash), labels seen at fewer than ``min_locs``
    distinct (dataset, location) pairs, and crops beyond a label's ``max_count`` (sampled with its
    ``prioritize`` order, seeded). Every row left out is counted in the report by reason. ``extra_columns``
    (the extra outputs' labels) are kept after DS_COLUMNS.
    """
    report = DatasetReport()
    rows = crops.reset_index(drop=True)  # a copy, with one index label per row
    rows["location"] = rows["location"].fillna("").astype(str).replace({"": UNKNOWN_LOCATION})
    below = rows["confidence"] < threshold
    report.drop(f"detection confidence below {threshold}", below.sum())
    rows = rows[~below]
    unlabelled = rows["dataset_class"].astype(str).str.strip() == ""
    report.drop("no class in the export (detector box on an image without one label)", unlabelled.sum())
    rows = rows[~unlabelled]
    keys = pd.MultiIndex.from_arrays([rows["dataset"], rows["dataset_class"]])
    labels = pd.Series(mapping, dtype=object)
    rows = rows.assign(label=labels.reindex(keys).to_numpy() if len(labels) else None)
    unmapped = rows["label"].isna()
    report.drop("class not in any output label (excluded)", unmapped.sum())
    rows = rows[~unmapped]

    if one_label_per_image and len(rows):  # only image-level labels can clash: a box's own label is its own
        image_level = rows[~rows[OWN_BOX].astype(bool)] if OWN_BOX in rows else rows
        clashing = image_level.groupby(["dataset", "image"], sort=False)["label"].transform("nunique") > 1
        clash = rows.index.isin(clashing.index[clashing.to_numpy()])
        report.conflicts = (rows[clash].groupby(["dataset", "image"])["label"]
                            .agg(lambda s: ",".join(sorted(set(s)))).rename("labels").reset_index())
        report.drop("image with crops of different labels", clash.sum())
        rows = rows[~clash]

    if min_locs:
        locs = rows.drop_duplicates(["label", "dataset", "location"]).groupby("label").size()
        rare = rows["label"].map(locs) < min_locs
        report.drop(f"label at fewer than {min_locs} locations", rare.sum())
        rows = rows[~rare]

    rng = np.random.default_rng(seed)
    parts = []
    for label, group in rows.groupby("label", sort=True):
        body = (spec or {}).get(label, {})
        max_count = body.get("max_count")
        if max_count and len(group) > max_count:
            sampled = _sample_with_priority(group, max_count, body.get("prioritize", []), rng)
            report.sampled[label] = (len(group), len(sampled))
            report.drop("over max_count", len(group) - len(sampled))
            group = sampled
        parts.append(group)
    rows = pd.concat(parts) if parts else rows
    return rows[[*DS_COLUMNS, *extra_columns]].sort_values("path", kind="stable").reset_index(drop=True), report


def label_index(ds: pd.DataFrame) -> dict[str, str]:
    """``label_index.json``: ``{"0": name, …}`` over the sorted label names."""
    return {str(i): name for i, name in enumerate(sorted(ds["label"].unique()))}


def match_test(ds: pd.DataFrame, earlier_ds: pd.DataFrame, earlier_splits: dict[str, list]) -> tuple[pd.DataFrame, list]:
    """Append the crops of an earlier dataset that lie at its test locations (labels this dataset
    knows only); returns the rows and those test locations, which the splits keep in test."""
    test = {(str(d), str(loc)) for d, loc in earlier_splits.get("test", [])}
    at_test = pair_keys(earlier_ds).isin({f"{d}\x1f{loc}" for d, loc in test})
    extra = earlier_ds[at_test & earlier_ds["label"].isin(set(ds["label"]))]
    columns = [c for c in ds.columns if c in extra.columns]  # an earlier dataset may lack the extra outputs
    rows = pd.concat([ds, extra[columns]]).drop_duplicates("path", keep="first")
    return rows.sort_values("path", kind="stable").reset_index(drop=True), sorted(test)
