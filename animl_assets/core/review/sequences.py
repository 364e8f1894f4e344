"""Camera-trap sequences (bursts): which images belong together, and crop probabilities averaged per sequence.

An export's ``seq_id`` is used where an image has one; otherwise images of one camera whose times are at
most ``gap_s`` apart (each from the previous) form a sequence. The camera is the second segment of an Animl
export's ``file_name`` (Animl writes no sequence fields), else the image's location. Times are compared as
instants: offsets may differ within one file (daylight saving), ``Z``, milliseconds and naive times (read
as UTC) all mix. An image without a usable time is its own sequence.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from animl_assets.core.dataset.empty import frame_image
from animl_assets.core.layout import partition_folder
from animl_assets.core.ingest.cct import export_profile, image_camera, image_location
from animl_assets.core.review.merge import CROP_MARK


def image_times(values: Sequence[Any]) -> pd.Series:
    """ISO 8601 times (any offset, ``Z``, fractions of a second; other common forms too) as UTC instants;
    missing or unreadable times are NaT."""
    raw = pd.Series(list(values), dtype=object)
    times = pd.to_datetime(raw, utc=True, errors="coerce", format="ISO8601")
    retry = times.isna() & raw.notna()
    if retry.any():
        times[retry] = pd.to_datetime(raw[retry].astype(str), utc=True, errors="coerce", format="mixed")
    return times


def image_cameras(images: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """``{file_name: camera}`` for a COCO Camera Traps ``images`` list: an Animl export's camera (the second
    segment of ``file_name``), else the image's location."""
    images = list(images)
    by_camera = export_profile({"images": images}) == "animl"
    return {image["file_name"]: image_camera(image) if by_camera else image_location(image) for image in images}


def sequence_ids(images: Iterable[Mapping[str, Any]], gap_s: float = 60.0) -> dict[str, str]:
    """``{file_name: sequence id}`` for a COCO Camera Traps ``images`` list."""
    images = list(images)
    cameras = image_cameras(images)
    frame = pd.DataFrame({
        "file": [image["file_name"] for image in images], "seq_id": [image.get("seq_id") for image in images],
        "camera": [cameras[image["file_name"]] for image in images],
        "time": image_times([image.get("datetime") for image in images])})
    given = frame["seq_id"].notna() & (frame["seq_id"].astype(str).str.strip() != "")
    ids = {f: f"seq:{s}" for f, s in zip(frame.loc[given, "file"], frame.loc[given, "seq_id"].astype(str))}
    rest = frame[~given & frame["time"].notna()].sort_values(["camera", "time"], kind="stable")
    for camera, group in rest.groupby("camera", sort=False):
        new = group["time"].diff().dt.total_seconds().fillna(np.inf) > gap_s
        for file, number in zip(group["file"], new.cumsum()):
            ids[file] = f"gap:{camera}:{number}"
    for file in frame.loc[~given & frame["time"].isna(), "file"]:
        ids[file] = f"image:{file}"
    return ids


def crop_image(path: str) -> str:
    """The image a crop path (``…/<file>___cropNN_<detector>.jpg``) was cut from, or a whole frame's
    (``…/<file>___frame.jpg``, the empty-or-not model's) was made from."""
    return path.rpartition(CROP_MARK)[0] or frame_image(path)


def crop_sequences(images_by_partition: Mapping[str, Iterable[Mapping[str, Any]]], crops: Iterable[str],
                   gap_s: float = 60.0) -> dict[str, str]:
    """``{crop path: "<partition>|<sequence>"}`` for crop paths ``<partition folder>/<file>___cropNN…``, from
    each partition's export ``images``; crops of images the exports do not list are left out."""
    per_folder = {partition_folder(partition): {file: f"{partition}|{seq}"
                                                for file, seq in sequence_ids(images, gap_s).items()}
                  for partition, images in images_by_partition.items()}
    found = {}
    for path in crops:
        folder, _, file = crop_image(path).partition("/")
        if file in per_folder.get(folder, {}):
            found[path] = per_folder[folder][file]
    return found


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
