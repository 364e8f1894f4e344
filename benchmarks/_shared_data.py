"""Where the benchmarks find their data: the real ENA24 camera-trap images (a clear stop when they are
absent), or a classification dataset of yours or a generated one."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

ENA24_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ena24_small"


def require(folder: Path, *names: str) -> Path:
    """``folder`` if it holds JPEGs and every file in ``names``; otherwise stop with what is missing."""
    missing = [name for name in names if not (folder / name).is_file()]
    if not folder.is_dir() or not any(folder.glob("*.jpg")) or missing:
        what = f"{', '.join(missing)} and JPEGs" if missing else "JPEGs"
        raise SystemExit(
            f"benchmark input missing: no {what} in {folder}. The default is the ENA24 sample in "
            f"../shared/data/ena24_small beside the repository (present in CI and the project's workspace, "
            f"not in a plain clone); pass --images-dir DIR with images of your own.")
    return folder


@dataclass
class ClassificationData:
    """A classification dataset's crops folder, ``classification_ds.csv``, label index and splits."""

    crops_dir: str
    ds: pd.DataFrame
    label_index: dict[str, str]
    splits: dict[str, list]
    temp: tempfile.TemporaryDirectory | None = None

    def cleanup(self) -> None:
        """Remove the generated crops, if these are generated."""
        if self.temp is not None:
            self.temp.cleanup()


def classification_data(crops_dir: str | None, dataset_dir: str | None,
                        crops_per_label_and_location: int) -> ClassificationData:
    """The dataset in ``dataset_dir`` (crops in ``crops_dir``), or without one a generated one in a temporary
    folder (4 labels, 6 locations, ``crops_per_label_and_location`` crops of 320 px each)."""
    temp = None
    if dataset_dir is None:
        from animl_assets.core.ingest.sample import write_sample_crops

        temp = tempfile.TemporaryDirectory(prefix="animl-bench-")
        sample = write_sample_crops(temp.name, crops_per_label_and_location=crops_per_label_and_location, size=320)
        crops_dir, dataset_dir = str(sample.crops_dir), str(sample.dataset_dir)
    folder = Path(dataset_dir)
    ds = pd.read_csv(folder / "classification_ds.csv", dtype={"dataset": str, "location": str})
    return ClassificationData(crops_dir, ds, json.loads((folder / "label_index.json").read_text()),
                              json.loads((folder / "splits.json").read_text()), temp)
