"""Review rounds simulated on the sample crops: the review queue's choice of crops to label against a random
choice, each round retraining briefly and scoring the same test split.

    python benchmarks/active_learning.py [--rounds 5] [--budget 8] [--start 8] [--seeds 2] [--epochs 4]

The training split's crops are a pool whose labels are hidden; ``--start`` random crops are labelled first.
Each round trains a classifier on the labelled crops (pretrained Lite0, ``--epochs``), scores the test split,
classifies the rest of the pool and labels ``--budget`` more: those the review queue ranks first
(``core.review.queue``: low margin, unknowns at the val threshold, spread over predicted labels and
locations), or random ones. Printed: test top-1 after each round for both (mean over ``--seeds``), and the
labels the queue needed to reach the random strategy's final top-1. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from open_set import logits_of, outputs_of  # noqa: E402

from animl_assets.core.ingest.sample import write_sample_crops  # noqa: E402
from animl_assets.core.ml import open_set  # noqa: E402
from animl_assets.core.ml.frames import split_frame  # noqa: E402
from animl_assets.core.ml.recipe import Checkpoints, TrainingParams  # noqa: E402
from animl_assets.core.review import queue  # noqa: E402
from animl_assets.resources.storage import LocalStore  # noqa: E402


def one_round(ds: pd.DataFrame, labelled: set[str], splits: dict, crops: Path, params: TrainingParams,
              folder: Path) -> tuple[float, pd.DataFrame, dict]:
    """Train on the labelled pool crops; the test top-1, the unlabelled pool's outputs and the open-set fit."""
    from animl_assets.core.ml.training import train_classifier

    names = sorted(ds["label"].unique())
    index = {str(i): name for i, name in enumerate(names)}
    known = ds[ds["path"].isin(labelled) | (ds["split"] != "train")]
    frame = split_frame(known.drop(columns="split"), index, splits, True)
    result = train_classifier(frame, crops, len(names), params, Checkpoints(LocalStore(folder), "run"),
                              init="lite0", resume=False)
    test = ds[ds["split"] == "test"]
    top1 = float((logits_of(result.best, params, test, crops, len(names)).argmax(1)
                  == test["label"].map({n: i for i, n in enumerate(names)}).to_numpy()).mean())
    fitted = open_set.fit(logits_of(result.best, params, ds[ds["split"] == "val"], crops, len(names)))
    pool = ds[(ds["split"] == "train") & ~ds["path"].isin(labelled)]
    outputs = outputs_of(logits_of(result.best, params, pool, crops, len(names)), list(pool["path"]), names, fitted)
    return top1, outputs, {"names": names, "locations": dict(zip(pool["path"], pool["location"]))}


def choose(strategy: str, outputs: pd.DataFrame, info: dict, budget: int, rng: np.random.Generator) -> list[str]:
    """The crops labelled next: the review queue's first ``budget``, or random ones."""
    if strategy == "random":
        return list(rng.choice(outputs["path"].to_numpy(), size=min(budget, len(outputs)), replace=False))
    ranked = queue.review_queue(queue.crop_priorities(outputs, info["names"], "unknown", {}), budget, {},
                                {path.rpartition("___")[0]: loc for path, loc in info["locations"].items()})
    return ranked["crop"].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--start", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    params = TrainingParams(model_name="efficientnet-lite0", image_size=args.image_size, epochs=args.epochs,
                            patience=args.epochs, batch_size=16, num_workers=0, progress_every=0, device="cpu")
    curves: dict[str, list[list[float]]] = {"queue": [], "random": []}
    with tempfile.TemporaryDirectory(prefix="animl-active-") as tmp:
        sample = write_sample_crops(Path(tmp) / "sample", crops_per_label_and_location=10, size=args.image_size)
        ds = pd.read_csv(sample.dataset_dir / "classification_ds.csv")
        splits = json.loads((sample.dataset_dir / "splits.json").read_text())
        split_of = {loc: split for split, pairs in splits.items() for _, loc in pairs}
        ds["split"] = ds["location"].map(split_of)
        for seed in range(args.seeds):
            start_rng = np.random.default_rng(seed)
            start = set(start_rng.choice(ds.loc[ds["split"] == "train", "path"].to_numpy(), args.start, replace=False))
            for strategy in curves:
                rng, labelled, curve = np.random.default_rng(seed + 100), set(start), []
                for round_number in range(args.rounds + 1):
                    folder = Path(tmp) / f"{strategy}-{seed}-{round_number}"
                    top1, outputs, info = one_round(ds, labelled, splits, sample.crops_dir, params, folder)
                    curve.append(top1)
                    print(f"seed {seed} {strategy:6s} round {round_number}: {len(labelled):3d} labels, test top-1 "
                          f"{top1:.3f}", flush=True)
                    if round_number < args.rounds:
                        labelled |= set(choose(strategy, outputs, info, args.budget, rng))
                curves[strategy].append(curve)
    mean = {s: [round(statistics.mean(c[r] for c in runs), 3) for r in range(args.rounds + 1)]
            for s, runs in curves.items()}
    labels = [args.start + r * args.budget for r in range(args.rounds + 1)]
    target = mean["random"][-1]
    reached = next((n for n, top1 in zip(labels, mean["queue"]) if top1 >= target), None)
    print(f"labels:  {labels}\nqueue:   {mean['queue']}\nrandom:  {mean['random']}\n"
          f"the queue reached the random strategy's final top-1 ({target:.3f}) with "
          f"{reached if reached is not None else 'more than ' + str(labels[-1])} labels (random: {labels[-1]})")
    print(json.dumps({"labels": labels, "queue_top1": mean["queue"], "random_top1": mean["random"],
                      "labels_to_random_final": reached, "random_labels": labels[-1], "seeds": args.seeds}))


if __name__ == "__main__":
    main()
