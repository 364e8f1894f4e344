"""Panthera's models on the sample: a multi-output model (species, count, behaviours) and the empty-or-not model,
each trained, evaluated and registered through the Definitions.

    python benchmarks/panthera.py [--images 4] [--empties 4] [--epochs 8] [--image-size 96]

A generated sample export with counts and behaviour flags (``animl sample-export --behaviours``; about 15% of each
field missing) and ``--empties`` empty frames per location. Prints, per output, the test top-1 of the multi-output
model beside the majority class's (what always guessing the commonest train class scores) and its macro recall
beside chance's (each output's classes are balanced in the loss, so macro recall is what it aims at), then the
empty-or-not
model's test ROC AUC and, on a second export it never saw (another seed), the AUROC of its scores against that
export's labels and the share of its empties among the images it sets aside. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from animl_assets.core.ingest.sample import EXPORT_NAME, write_sample_export  # noqa: E402
from animl_assets.core.ingest.exports import partition_key_for  # noqa: E402
from animl_assets.definitions import (  # noqa: E402
    DATASET_JOB,
    EMPTY_FRAMES_JOB,
    EMPTY_SCORE_JOB,
    EMPTY_TRAIN_JOB,
    INGEST_JOB,
    TRAIN_JOB,
    build_definitions,
)
from animl_assets.settings import Settings  # noqa: E402

OUTPUTS = ["species", "count", "standing", "resting", "moving", "eating", "interacting", "young_present"]
REPO = Path(__file__).resolve().parents[1]


class Home:
    """An ANIML_HOME and DAGSTER_HOME in a temporary folder, running the project's jobs in process."""

    def __init__(self, root: Path) -> None:
        self.root, self.settings = root, Settings.from_env({"ANIML_HOME": str(root / "animl")})
        self.dagster = root / "dagster"
        self.dagster.mkdir()
        (self.dagster / "dagster.yaml").write_bytes((REPO / "dagster.yaml").read_bytes())

    def run(self, job: str, partition: str | None = None, selection: list[str] | None = None, **ops) -> dict:
        """Run ``job`` and return each materialized asset's metadata."""
        with dg.DagsterInstance.from_config(str(self.dagster)) as instance:
            result = build_definitions(self.settings).resolve_job_def(job).execute_in_process(
                instance=instance, partition_key=partition, run_config={"ops": {k: {"config": v} for k, v in ops.items()}},
                asset_selection=[dg.AssetKey(a) for a in selection] if selection else None)
        return {e.step_materialization_data.materialization.asset_key.path[-1]:
                {k: v.value for k, v in e.step_materialization_data.materialization.metadata.items()}
                for e in result.get_asset_materialization_events()}

    def add_export(self, folder: str, **sample) -> str:
        write_sample_export(self.settings.home / "exports" / folder, **sample)
        partition = partition_key_for(f"{folder}/{EXPORT_NAME}")
        with dg.DagsterInstance.from_config(str(self.dagster)) as instance:
            instance.add_dynamic_partitions("exports", [partition])
        return partition

    def artifact(self, asset: str, name: str) -> Path:
        return max((self.settings.home / "artifacts" / asset).rglob(name), key=lambda p: p.stat().st_mtime)


def multi_output(home: Home, partition: str, training: dict) -> list[dict]:
    """Per output: test crops, the multi-output model's test top-1 and the majority class's."""
    home.run(INGEST_JOB, partition)
    home.run(DATASET_JOB, classification_dataset={"outputs": OUTPUTS})
    home.run(TRAIN_JOB, classifier_checkpoint=training, classifier_evaluation={"num_workers": 0, "portable": False})
    ds = pd.read_csv(home.artifact("classification_dataset", "classification_ds.csv"), dtype=str, keep_default_na=False)
    splits = json.loads(home.artifact("splits", "splits.json").read_text())
    split_of = {(d, loc): s for s, pairs in splits.items() for d, loc in pairs}
    ds["split"] = [split_of.get(pair) for pair in zip(ds["dataset"], ds["location"])]
    rows = []
    for output in OUTPUTS:
        column = "label" if output == "species" else output
        train, test = (ds[(ds["split"] == s) & (ds[column] != "")] for s in ("train", "test"))
        majority = train[column].value_counts().idxmax()
        suffix = "" if output == "species" else f"_{output}"
        overall = pd.read_csv(home.artifact("classifier_evaluation", f"overall_metrics{suffix}.csv")).set_index("split")
        stats = pd.read_csv(home.artifact("classifier_evaluation", f"label_stats{suffix}.csv"), dtype={"label": str})
        recalls = stats[(stats["split"] == "test") & stats["label"].isin(set(test[column]))]["recall"]
        rows.append({"output": output, "test_crops": len(test), "top1": round(overall.loc["test", "acc_top1"] / 100, 3),
                     "majority_top1": round(float((test[column] == majority).mean()), 3),
                     "macro_recall": round(float(recalls.mean()), 3), "chance_macro_recall": round(1 / len(recalls), 3)})
    return rows


def empty_or_not(home: Home, partition: str, training: dict, empties: int) -> dict:
    """The empty-or-not model's test AUROC, and its scores on an export it never saw."""
    home.run(EMPTY_FRAMES_JOB, partition)
    trained = home.run(EMPTY_TRAIN_JOB, empty_checkpoint=training, empty_evaluation={"num_workers": 0, "portable": False})
    new = home.add_export("new", seed=11, empties_per_location=empties)
    home.run(INGEST_JOB, new, selection=["cct_export", "images"])
    scored = home.run(EMPTY_SCORE_JOB, new, empty_scores={"num_workers": 0, "set_aside": 0.5})["empty_scores"]
    scores = pd.read_csv(home.artifact("empty_scores", "empty_scores.csv"), dtype={"export_label": str},
                         keep_default_na=False)
    aside = scores[scores["set_aside"]]
    return {"test_auroc": trained["empty_evaluation"].get("test_auroc"),
            "test_frames": trained["empty_evaluation"]["num_test_crops"],
            "new_export_auroc": scored.get("auroc_against_export_labels"), "new_export_images": len(scores),
            "new_export_empties": int((scores["export_label"] == "empty").sum()), "set_aside": len(aside),
            "set_aside_precision": round(float((aside["export_label"] == "empty").mean()), 3) if len(aside) else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4, help="images per species and location")
    parser.add_argument("--empties", type=int, default=4, help="empty frames per location")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--early-stopping-output", default="species", help="the output whose val top-1 keeps the "
                        "best epoch (species saturates first on the sample, leaving the other heads early)")
    args = parser.parse_args()
    training = {"model_name": "efficientnet-lite0", "pretrained": "lite0", "image_size": args.image_size,
                "epochs": args.epochs, "finetune": 1, "batch_size": 16, "num_workers": 0, "progress_every": 0}
    multi = training | {"early_stopping_output": args.early_stopping_output}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="animl-panthera-") as tmp:
        home = Home(Path(tmp))
        partition = home.add_export("sample", images_per_class_and_location=args.images, behaviours=True,
                                    empties_per_location=args.empties)
        heads = multi_output(home, partition, multi)
        empty = empty_or_not(home, partition, training, args.empties)
    print(f"{'output':<14} {'test crops':>10} {'top-1':>7} {'majority':>9} {'macro recall':>13} {'chance':>7}")
    for row in heads:
        print(f"{row['output']:<14} {row['test_crops']:>10} {row['top1']:>7.3f} {row['majority_top1']:>9.3f} "
              f"{row['macro_recall']:>13.3f} {row['chance_macro_recall']:>7.3f}")
    print(f"empty-or-not: test AUROC {empty['test_auroc']} on {empty['test_frames']} frames; a new export "
          f"({empty['new_export_images']} images, {empty['new_export_empties']} empty): AUROC {empty['new_export_auroc']}, "
          f"{empty['set_aside']} set aside at p(empty) >= 0.5, {empty['set_aside_precision']} of them empty")
    print(json.dumps({"heads": heads, "empty": empty, "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
