"""Camera-trap sequences (bursts): which images belong together, and crop probabilities averaged per sequence.

An export's ``seq_id`` is used where an image has one; otherwise images of one location whose times are
at most ``gap_s`` apart (each from the previous) form a sequence; an image without a usable time is its
own sequence.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from animl_assets.core.ingest.cct import image_location
from animl_assets.core.review.merge import CROP_MARK


def sequence_ids(images: Iterable[Mapping[str, Any]], gap_s: float = 60.0) -> dict[str, str]:
    """``{file_name: sequence id}`` for a COCO Camera Traps ``images`` list."""
    rows = [{"file": image["file_name"], "seq_id": image.get("seq_id"), "location": image_location(image),
             "time": pd.to_datetime(image.get("datetime"), errors="coerce")} for image in images]
    frame = pd.DataFrame(rows, columns=["file", "seq_id", "location", "time"])
    given = frame["seq_id"].notna() & (frame["seq_id"].astype(str).str.strip() != "")
    ids = {f: f"seq:{s}" for f, s in zip(frame.loc[given, "file"], frame.loc[given, "seq_id"].astype(str))}
    rest = frame[~given & frame["time"].notna()].sort_values(["location", "time"])
    for location, group in rest.groupby("location", sort=False):
        new = group["time"].diff().dt.total_seconds().fillna(np.inf) > gap_s
        for file, number in zip(group["file"], new.cumsum()):
            ids[file] = f"gap:{location}:{number}"
    for file in frame.loc[~given & frame["time"].isna(), "file"]:
        ids[file] = f"image:{file}"
    return ids


def crop_image(path: str) -> str:
    """The image a crop path (``…/<file>___cropNN_<detector>.jpg``) was cut from."""
    return path.rpartition(CROP_MARK)[0]


def aggregate(outputs: pd.DataFrame, labels: Sequence[str], sequence_of: Mapping[str, str]) -> pd.DataFrame:
    """Per sequence: the number of crops, the mean of their probabilities per label and the predicted label
    (``sequence``, ``crops``, ``<label>…``, ``pred``; with ``label`` when ``outputs`` has one: the most
    common label of the sequence's crops). ``sequence_of`` maps each crop path to its sequence."""
    frame = outputs.assign(sequence=outputs["path"].map(sequence_of))
    if frame["sequence"].isna().any():
        missing = frame.loc[frame["sequence"].isna(), "path"].head(3).tolist()
        raise ValueError(f"crops without a sequence, e.g. {missing}")
    grouped = frame.groupby("sequence", sort=True)
    result = grouped[list(labels)].mean()
    result.insert(0, "crops", grouped.size())
    if "label" in frame:
        result.insert(0, "label", grouped["label"].agg(lambda s: s.mode().iloc[0]))
    result["pred"] = np.asarray(labels, dtype=object)[result[list(labels)].to_numpy().argmax(axis=1)]
    return result.reset_index()


def sequence_top1(outputs: pd.DataFrame, labels: Sequence[str], sequence_of: Mapping[str, str]) -> float:
    """Top-1 accuracy over sequences (labelled by their crops' most common label)."""
    if outputs.empty:
        return float("nan")
    per_sequence = aggregate(outputs, labels, sequence_of)
    return float((per_sequence["pred"] == per_sequence["label"]).mean())


def aggregate_csv(path: str, labels: Sequence[str], sequence_of: Mapping[str, str], chunksize: int = 50_000
                  ) -> pd.DataFrame:
    """``aggregate`` over a classifier output CSV read in chunks (memory grows with the sequences, not the
    crops); crops without a sequence count as their own."""
    sums, counts = [], []
    for chunk in pd.read_csv(path, chunksize=chunksize):
        sequence = chunk["path"].map(sequence_of).fillna("crop:" + chunk["path"])
        grouped = chunk[list(labels)].groupby(sequence)
        sums.append(grouped.sum())
        counts.append(grouped.size())
    if not sums:
        return pd.DataFrame(columns=["sequence", "crops", *labels, "pred"])
    total = pd.concat(sums).groupby(level=0).sum()
    crops = pd.concat(counts).groupby(level=0).sum()
    result = total.div(crops, axis=0)
    result.insert(0, "crops", crops)
    result["pred"] = np.asarray(labels, dtype=object)[result[list(labels)].to_numpy().argmax(axis=1)]
    return result.rename_axis("sequence").reset_index()
