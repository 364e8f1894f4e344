"""The dataset as every ML stage sees it, with no PyTorch import (the Definitions load without it): the
splits, the reference's label weights (``split_frame``), the crop files that can be read, and the top-k
accuracies reported."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

MEANS = (0.485, 0.456, 0.406)
STDS = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class Preprocessing:
    """How a crop becomes a model's input: resized (short side, ``interpolation``) and centre-cropped to
    ``image_size``, then normalized with ``mean`` and ``std``; the model's own (timm's pretrained config, or
    ImageNet's for the rest). Recorded in ``params.json`` and the registered ``preprocessing.json``."""

    image_size: int
    mean: tuple[float, ...] = MEANS
    std: tuple[float, ...] = STDS
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {self.interpolation!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def record(self) -> dict[str, Any]:
        """The JSON fields (``image_size``, ``mean``, ``std``, ``interpolation``)."""
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> "Preprocessing":
        """From ``params.json`` or ``preprocessing.json``; files written before these fields existed get
        the ImageNet values every model used then."""
        return cls(int(record["image_size"]), record.get("mean") or MEANS, record.get("std") or STDS,
                   record.get("interpolation") or "bicubic")


def top_ks(num_labels: int) -> tuple[int, int]:
    """Top-1 and top-3, or top-(number of labels) when there are fewer than three (as the reference)."""
    return 1, min(3, num_labels)


def detection_weights(confidence: np.ndarray, calibration: Mapping[str, np.ndarray] | None) -> np.ndarray:
    """Detection confidences as sample weights, optionally through an isotonic calibration (``x``, ``y``)."""
    if calibration is None:
        return confidence.astype(float)
    return np.interp(confidence, calibration["x"], calibration["y"])


def crop_problem(path: Path) -> str | None:
    """Why the crop file at ``path`` cannot be trained on (missing, empty, not a JPEG or PNG, cut short
    before its end marker), or None. Reads its first and last bytes only, so a whole dataset is checked in
    moments before a training that would otherwise fail at the first bad crop in a loader worker."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            start = handle.read(8)
            handle.seek(max(0, size - 12))
            end = handle.read()
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    if size == 0:
        return "empty file"
    if start.startswith(b"\xff\xd8"):
        return None if end.rstrip(b"\x00").endswith(b"\xff\xd9") else "truncated JPEG (no end marker)"
    if start.startswith(b"\x89PNG"):
        return None if b"IEND" in end else "truncated PNG (no IEND chunk)"
    return "not a JPEG or PNG"


def readable_crops(ds: pd.DataFrame, crops_root: Path) -> tuple[pd.Series, pd.DataFrame]:
    """Which rows of ``ds`` have a crop that can be trained on (a boolean Series), and the others as
    ``path, dataset, label, problem`` rows."""
    problems = ds["path"].map(lambda path: crop_problem(crops_root / path))
    usable = problems.isna()
    return usable, ds.loc[~usable, ["path", "dataset", "label"]].assign(problem=problems[~usable])


def output_index_column(output: str) -> str:
    """The frame's column of an extra output's class index (-1: missing)."""
    return f"{output}_index"


def with_output_indices(frame: pd.DataFrame, output_index: Mapping[str, Mapping[str, str]]) -> pd.DataFrame:
    """``frame`` with each extra output's class index (``output_index_column``): -1 where the value is missing
    or a class the index lacks, which that output's loss and metrics leave out."""
    from animl_assets.core.dataset.outputs import output_values

    columns = {}
    for name, classes in output_index.items():
        to_index = {label: int(i) for i, label in classes.items()}
        values = output_values(frame[name]) if name in frame else pd.Series("", index=frame.index)
        columns[output_index_column(name)] = values.map(to_index).fillna(-1).astype(int)
    return frame.assign(**columns)


def split_frame(ds: pd.DataFrame, label_index: Mapping[str, str], splits: Mapping[str, Sequence[Sequence[str]]],
                label_weighted: bool, weight_by_detection_conf: bool = False,
                calibration: Mapping[str, np.ndarray] | None = None,
                output_index: Mapping[str, Mapping[str, str]] | None = None) -> pd.DataFrame:
    """The dataset rows with ``split``, ``label_index`` and ``weight``, as the reference's ``load_dataset_csv``:
    training rows weighted by detection confidence (optionally calibrated) when asked; with ``label_weighted``
    each split's weight is shared equally among the labels it holds and sums to its (weighted) size. Unlike
    the reference this does not fail when a split lacks a label. Extra outputs (``output_index``) get their
    class index columns (``with_output_indices``)."""
    to_index = {name: int(i) for i, name in label_index.items()}
    if ds["label"].str.contains(",").any():
        raise ValueError("multi-label rows (comma-joined labels) are not supported for training")
    split_of = {(dataset, location): split for split in SPLITS for dataset, location in splits.get(split, [])}
    frame = ds.assign(split=[split_of.get(pair) for pair in zip(ds["dataset"], ds["location"])],
                      label_index=ds["label"].map(to_index), weight=1.0)
    frame = frame[frame["split"].notna()].reset_index(drop=True)
    if frame["label_index"].isna().any():
        raise ValueError(f"labels missing from label_index.json: {sorted(frame.loc[frame['label_index'].isna(), 'label'].unique())}")
    frame["label_index"] = frame["label_index"].astype(int)
    if weight_by_detection_conf:
        train = frame["split"] == "train"
        frame.loc[train, "weight"] = detection_weights(frame.loc[train, "confidence"].to_numpy(), calibration)
    if label_weighted:
        per_label = frame.groupby(["split", "label"])["weight"].transform("sum")
        split_total = frame.groupby("split")["weight"].transform("sum")
        labels_in_split = frame.groupby("split")["label"].transform("nunique")
        frame["weight"] = frame["weight"] * (split_total / labels_in_split) / per_label
    return with_output_indices(frame, output_index or {})


def trainable_frame(ds: pd.DataFrame, label_index: Mapping[str, str], splits: Mapping[str, Sequence[Sequence[str]]],
                    crops_root: Path, label_weighted: bool, weight_by_detection_conf: bool = False,
                    calibration: Mapping[str, np.ndarray] | None = None,
                    output_index: Mapping[str, Mapping[str, str]] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``split_frame`` over the rows whose crop can be read (training and evaluation see the same crops),
    and the rows left out as ``path, dataset, label, problem``."""
    usable, left_out = readable_crops(ds, crops_root)
    frame = split_frame(ds[usable], label_index, splits, label_weighted, weight_by_detection_conf, calibration,
                        output_index)
    return frame, left_out
