"""Unknowns, measured by leaving one class out: for each label, a classifier is trained without it, and its
crops are classified as animals the model never saw.

    python benchmarks/open_set.py [--sets sample animl] [--epochs 6] [--image-size 64] [--recall 0.95]

Per set and score (max softmax probability, energy, top-1 - top-2 margin; ``core.ml.open_set``), averaged over
the held-out labels: AUROC of the known test crops against the held-out crops, the share of held-out crops
flagged unknown at the threshold fitted on val (``recall`` of the val crops kept known, as the evaluation
does), and the share of known test crops flagged with them. Sets: ``sample``, the generated sample crops
(4 species, their location split), and ``animl``, the Animl-format sample export ingested and built into a
dataset through the Definitions (reviewed boxes only, as a real Animl export). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from animl_assets.core.ingest.sample import write_sample_crops  # noqa: E402
from animl_assets.core.ml import open_set  # noqa: E402
from animl_assets.core.ml.frames import Preprocessing, split_frame  # noqa: E402
from animl_assets.core.ml.recipe import Checkpoints, TrainingParams  # noqa: E402
from animl_assets.resources.storage import LocalStore  # noqa: E402


def sample_set(folder: Path, size: int) -> tuple[pd.DataFrame, dict, Path]:
    """The generated sample crops: (classification_ds rows, splits, crops folder)."""
    sample = write_sample_crops(folder / "sample", crops_per_label_and_location=6, size=size)
    ds = pd.read_csv(sample.dataset_dir / "classification_ds.csv")
    return ds, json.loads((sample.dataset_dir / "splits.json").read_text()), sample.crops_dir


def animl_set(folder: Path) -> tuple[pd.DataFrame, dict, Path]:
    """The Animl sample export registered, ingested and built into a dataset and splits by the CLI."""
    from animl_assets.cli import main as animl
    from animl_assets.core.ingest.sample_animl import ANIML_EXPORT_NAME, ARCHIVE

    home = folder / "animl-home"
    os.environ["ANIML_HOME"] = str(home)
    animl(["sample-export", str(folder / "animl"), "--format", "animl"])
    animl(["register", str(folder / "animl" / ANIML_EXPORT_NAME), "--images-root", str(folder / "animl" / ARCHIVE)])
    animl(["build-dataset"])
    artifacts = home / "artifacts"
    [ds_file] = sorted((artifacts / "classification_dataset").rglob("classification_ds.csv"))
    [splits_file] = sorted((artifacts / "splits").rglob("splits.json"))
    return pd.read_csv(ds_file, dtype=str).astype({"confidence": float}), json.loads(splits_file.read_text()), \
        artifacts / "crops"


def logits_of(best: dict, params: TrainingParams, rows: pd.DataFrame, crops: Path, classes: int) -> np.ndarray:
    """The trained model's logits for ``rows`` (the evaluation's transform)."""
    from animl_assets.core.ml.data import resolve_device
    from animl_assets.core.ml.evaluation import eval_loader, predict_logits
    from animl_assets.core.ml.models import build_model

    if rows.empty:
        return np.zeros((0, classes))
    model = build_model(params.model_name, classes, image_size=params.image_size)
    model.load_state_dict(best["model"])
    loader = eval_loader(rows["path"], [0] * len(rows), [1.0] * len(rows), crops, Preprocessing(params.image_size))
    return predict_logits(model, loader, resolve_device("cpu"))


def outputs_of(logits: np.ndarray, paths: list[str], names: list[str], fitted: dict) -> pd.DataFrame:
    """Classifier outputs as ``classifications`` writes them: ``path``, probabilities, the unknowns' column."""
    from animl_assets.core.ml.evaluation import softmax

    frame = pd.DataFrame(softmax(np.asarray(logits, dtype=np.float64)), columns=names)
    frame.insert(0, "path", list(paths))
    frame["unknown"] = open_set.is_unknown(logits, fitted).astype(float)
    return frame


def held_out(ds: pd.DataFrame, splits: dict, crops: Path, label: str, params: TrainingParams, recall: float,
             folder: Path) -> dict[str, dict[str, float]]:
    """Train without ``label``; per score: AUROC (known test vs held-out crops), held-out share flagged, known
    test share flagged."""
    from animl_assets.core.ml.training import train_classifier

    known = ds[ds["label"] != label]
    names = sorted(known["label"].unique())
    index = {str(i): name for i, name in enumerate(names)}
    frame = split_frame(known, index, splits, True)
    result = train_classifier(frame, crops, len(names), params, Checkpoints(LocalStore(folder / label), "run"),
                              init="lite0", resume=False)
    val, test = (logits_of(result.best, params, frame[frame["split"] == s], crops, len(names)) for s in ("val", "test"))
    unseen = logits_of(result.best, params, ds[ds["label"] == label], crops, len(names))
    figures = {}
    for score in open_set.SCORES:
        fitted = open_set.fit(val, score, recall)
        figures[score] = {
            "auroc": open_set.auroc(open_set.known_score(test, score), open_set.known_score(unseen, score)),
            "held_out_flagged": float(open_set.is_unknown(unseen, fitted).mean()),
            "known_flagged": float(open_set.is_unknown(test, fitted).mean())}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["sample", "animl"], choices=["sample", "animl"])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--recall", type=float, default=0.95, help="share of val crops the threshold keeps known")
    args = parser.parse_args()
    params = TrainingParams(model_name="efficientnet-lite0", image_size=args.image_size, epochs=args.epochs,
                            patience=args.epochs, batch_size=16, num_workers=0, progress_every=0, device="cpu")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="animl-open-set-") as tmp:
        for name in args.sets:
            ds, splits, crops = sample_set(Path(tmp), args.image_size) if name == "sample" else animl_set(Path(tmp))
            labels = sorted(ds["label"].unique())
            per_label = {label: held_out(ds, splits, crops, label, params, args.recall, Path(tmp) / name)
                         for label in labels}
            results[name] = {score: {figure: round(statistics.mean(per_label[label][score][figure] for label in labels), 3)
                                     for figure in ("auroc", "held_out_flagged", "known_flagged")}
                             for score in open_set.SCORES}
            for score, figures in results[name].items():
                print(f"{name:7s} {score:7s} AUROC {figures['auroc']:.3f}  held-out flagged "
                      f"{figures['held_out_flagged']:.0%}  known flagged {figures['known_flagged']:.0%}  "
                      f"({len(labels)} labels held out in turn, {len(ds)} crops)", flush=True)
    print(json.dumps({"recall": args.recall, "epochs": args.epochs, "image_size": args.image_size, **results}))


if __name__ == "__main__":
    main()
