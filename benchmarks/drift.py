"""Drift, measured: a classifier trained on the sample crops, its test split profiled as the evaluation does,
then exports that did and did not change classified and checked as the ``drift`` check does.

    python benchmarks/drift.py [--epochs 6] [--image-size 64]

Exports: ``unshifted`` (new crops of the same species and locations, another seed), ``class removed`` (the same
without two species), ``other cameras`` (the same species at locations the model never saw, other backdrops)
and ``new species only`` (crops of the one species left out of training). Printed per export: PSI of the
predicted labels, mean top-1 confidence, share of unknowns (margin score at 0.95 of val), and whether the
check fails and why. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from open_set import logits_of, outputs_of  # noqa: E402

from animl_assets.core.ingest.sample import LOCATIONS, SPECIES, write_sample_crops  # noqa: E402
from animl_assets.core.ml import drift, open_set  # noqa: E402
from animl_assets.core.ml.frames import split_frame  # noqa: E402
from animl_assets.core.ml.recipe import Checkpoints, TrainingParams  # noqa: E402
from animl_assets.resources.storage import LocalStore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    from animl_assets.core.ml.training import train_classifier

    params = TrainingParams(model_name="efficientnet-lite0", image_size=args.image_size, epochs=args.epochs,
                            patience=args.epochs, batch_size=16, num_workers=0, progress_every=0, device="cpu")
    trained_on = list(SPECIES[:3])  # the fourth is the new species
    results = {}
    with tempfile.TemporaryDirectory(prefix="animl-drift-") as tmp:
        base = write_sample_crops(Path(tmp) / "base", crops_per_label_and_location=6, size=args.image_size)
        ds = pd.read_csv(base.dataset_dir / "classification_ds.csv")
        splits = json.loads((base.dataset_dir / "splits.json").read_text())
        ds = ds[ds["label"].isin(trained_on)]
        index = {str(i): name for i, name in enumerate(sorted(trained_on))}
        names = list(index.values())
        frame = split_frame(ds, index, splits, True)
        result = train_classifier(frame, base.crops_dir, len(names), params, Checkpoints(LocalStore(Path(tmp) / "m"), "run"),
                                  init="lite0", resume=False)
        fitted = open_set.fit(logits_of(result.best, params, frame[frame["split"] == "val"], base.crops_dir, len(names)))
        test = frame[frame["split"] == "test"]
        test_logits = logits_of(result.best, params, test, base.crops_dir, len(names))
        reference = drift.profile(outputs_of(test_logits, list(test["path"]), names, fitted)[names].to_numpy(),
                                  open_set.is_unknown(test_logits, fitted), names)
        new = write_sample_crops(Path(tmp) / "new", crops_per_label_and_location=4, locations=6, seed=1,
                                 size=args.image_size)
        new_ds = pd.read_csv(new.dataset_dir / "classification_ds.csv")
        unseen = write_sample_crops(Path(tmp) / "unseen", crops_per_label_and_location=8, locations=len(LOCATIONS),
                                    seed=2, size=args.image_size)
        unseen_ds = pd.read_csv(unseen.dataset_dir / "classification_ds.csv")
        exports = {
            "unshifted": (new_ds[new_ds["label"].isin(trained_on)], new.crops_dir),
            "class removed": (new_ds[new_ds["label"] == trained_on[0]], new.crops_dir),
            "other cameras": (unseen_ds[unseen_ds["label"].isin(trained_on)
                                        & unseen_ds["location"].isin(LOCATIONS[6:])], unseen.crops_dir),
            "new species only": (new_ds[new_ds["label"] == SPECIES[3]], new.crops_dir),
        }
        for name, (rows, crops) in exports.items():
            logits = logits_of(result.best, params, rows, crops, len(names))
            table = drift.drift_table(outputs_of(logits, list(rows["path"]), names, fitted), names, "unknown", {},
                                      reference)
            row = table.iloc[0]
            results[name] = {"crops": int(row["crops"]), "psi": round(float(row["psi"]), 3),
                             "mean_top1": round(float(row["mean_top1"]), 3),
                             "unknown_share": round(float(row["unknown_share"]), 3),
                             "drifted": bool(row["drifted"]), "reasons": row["reasons"]}
            print(f"{name:17s} {row['crops']:4d} crops  PSI {row['psi']:6.3f}  mean top-1 {row['mean_top1']:.3f} "
                  f"(test {reference['mean_top1']:.3f})  unknowns {row['unknown_share']:.0%} "
                  f"(test {reference['unknown_share']:.0%})  {'DRIFT: ' + row['reasons'] if row['drifted'] else 'ok'}",
                  flush=True)
    print(json.dumps({"reference": {k: reference[k] for k in ("crops", "mean_top1", "unknown_share")}, **results}))


if __name__ == "__main__":
    main()
