"""What every ML stage reads: the reference's transforms, crop files checked and loaded as a ``CropDataset``,
the dataset framed by split (``split_frame``), the device, and the top-k accuracies reported."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

MEANS = (0.485, 0.456, 0.406)
STDS = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")


def top_ks(num_labels: int) -> tuple[int, int]:
    """Top-1 and top-3, or top-(number of labels) when there are fewer than three (as the reference)."""
    return 1, min(3, num_labels)


def train_transform(size: int) -> v2.Compose:
    """The reference's training augmentation, ending in a normalized float tensor."""
    return v2.Compose([
        v2.RandomResizedCrop(size, antialias=True), v2.RandomRotation(degrees=(-90, 90)),
        v2.RandomHorizontalFlip(p=0.5), v2.RandomVerticalFlip(p=0.1), v2.RandomGrayscale(p=0.1),
        v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25),
        v2.PILToTensor(), normalize(),
    ])


def eval_resize(size: int) -> v2.Compose:
    """The reference's evaluation geometry: bicubic resize of the short side, centre crop; a uint8 tensor."""
    return v2.Compose([
        v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(size),
        v2.PILToTensor(),
    ])


def normalize(mean: Sequence[float] = MEANS, std: Sequence[float] = STDS) -> v2.Compose:
    """uint8 image tensors (one or a batch) to the model's normalized float input."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def eval_transform(size: int) -> v2.Compose:
    """The reference's evaluation transform: ``eval_resize`` then ``normalize``."""
    return v2.Compose([eval_resize(size), normalize()])


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


def split_frame(ds: pd.DataFrame, label_index: Mapping[str, str], splits: Mapping[str, Sequence[Sequence[str]]],
                label_weighted: bool, weight_by_detection_conf: bool = False,
                calibration: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
    """The dataset rows with ``split``, ``label_index`` and ``weight``, as the reference's ``load_dataset_csv``:
    training rows weighted by detection confidence (optionally calibrated) when asked; with ``label_weighted``
    each split's weight is shared equally among the labels it holds and sums to its (weighted) size. Unlike
    the reference this does not fail when a split lacks a label."""
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
    return frame


def trainable_frame(ds: pd.DataFrame, label_index: Mapping[str, str], splits: Mapping[str, Sequence[Sequence[str]]],
                    crops_root: Path, label_weighted: bool, weight_by_detection_conf: bool = False,
                    calibration: Mapping[str, np.ndarray] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``split_frame`` over the rows whose crop can be read (training and evaluation see the same crops),
    and the rows left out as ``path, dataset, label, problem``."""
    usable, left_out = readable_crops(ds, crops_root)
    frame = split_frame(ds[usable], label_index, splits, label_weighted, weight_by_detection_conf, calibration)
    return frame, left_out


class CropDataset(Dataset):
    """Crops under ``root`` with their label index and weight: ``(image, label, weight, index)`` items."""

    def __init__(self, root: str | Path, paths: Sequence[str], labels: Sequence[int], weights: Sequence[float],
                 transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.root, self.paths, self.transform = Path(root), list(paths), transform
        self.labels = torch.tensor(np.array(labels), dtype=torch.long)
        self.weights = torch.tensor(np.array(weights), dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Item ``key``: an index, or ``(index, seed)`` from an ``EpochSampler``, whose seed alone decides the
        random augmentation (whichever loader worker draws it, and however often workers were restarted)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        path = self.root / self.paths[index]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, ValueError) as err:
            raise OSError(f"cannot read crop {path}: {err}") from err
        if seed is None:
            return self.transform(rgb), self.labels[index], self.weights[index], index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(rgb), self.labels[index], self.weights[index], index


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else CPU (a torchrun rank names its own device)."""
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
