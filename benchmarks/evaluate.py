"""Evaluation throughput through the core the classifier_evaluation asset uses: every split, the
TorchScript trace and parity check, and the figures.

    python benchmarks/evaluate.py [--crops-dir DIR --dataset-dir DIR] [--checkpoint ckpt.pt]
                                  [--model efficientnet-b0] [--image-size 224] [--batch-size 64]
                                  [--workers 2] [--device auto] [--out DIR]

``--dataset-dir`` holds the reference-format ``classification_ds.csv``, ``label_index.json`` and
``splits.json``; without it a set of generated crops is written to a temporary folder. Without
``--checkpoint`` the model has random weights (throughput does not depend on them). ``--out`` writes the
evaluation's files there, to diff with the reference ``evaluate_model.py``'s. Prints one JSON object:
crops, eval_crops_per_s (the three splits), torchscript_s, figures_s, peak_rss_mb.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _shared_data import classification_data  # noqa: E402

from animl_assets.assets.evaluation import evaluation_figures  # noqa: E402
from animl_assets.core.artifact_files import to_files  # noqa: E402
from animl_assets.core.ml import evaluation as ev  # noqa: E402
from animl_assets.core.ml.data import resolve_device  # noqa: E402
from animl_assets.core.ml.frames import split_frame  # noqa: E402
from animl_assets.core.artifact_files import read_checkpoint  # noqa: E402
from animl_assets.core.ml.models import build_model  # noqa: E402
from animl_assets.core.ml.recipe import VALID_MODELS, default_image_size, model_preprocessing  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops-dir")
    parser.add_argument("--dataset-dir")
    parser.add_argument("--checkpoint", help="a reference-layout checkpoint ({'model': state_dict, ...})")
    parser.add_argument("--model", default="efficientnet-b0", choices=VALID_MODELS)
    parser.add_argument("--image-size", type=int, default=0, help="0: the model's default")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--label-weighted", action="store_true")
    parser.add_argument("--out", help="write the evaluation's files into this folder")
    args = parser.parse_args()

    data = classification_data(args.crops_dir, args.dataset_dir, crops_per_label_and_location=10)
    crops_dir, label_index = data.crops_dir, data.label_index
    frame = split_frame(data.ds, label_index, data.splits, args.label_weighted)
    size = args.image_size or default_image_size(args.model)
    model = build_model(args.model, len(label_index), image_size=size)
    if args.checkpoint:
        model.load_state_dict(read_checkpoint(args.checkpoint)["model"])
    device = resolve_device(args.device)

    started = time.perf_counter()
    timings: dict[str, float] = {}
    result, gaps = ev.evaluate(model, frame, crops_dir, label_index, model_preprocessing(args.model, size), device,
                              batch_size=args.batch_size, num_workers=args.workers,
                              progress=lambda line: timings.setdefault(line, time.perf_counter() - started))
    total = time.perf_counter() - started
    predicted = max(timings.values())  # the last split evaluated; then TorchScript and the rest
    figures_started = time.perf_counter()
    evaluation_figures(result, Path(crops_dir), 4)
    figures = time.perf_counter() - figures_started
    if args.out:
        for name, data in to_files(result, "classifier_evaluation").items():
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / name).write_bytes(data)
    print(json.dumps({
        "model": args.model, "image_size": size, "device": str(device), "crops": len(frame),
        "eval_crops_per_s": round(len(frame) / predicted, 1), "compile_and_metrics_s": round(total - predicted, 2),
        "figures_s": round(figures, 2), **{f"{form}_max_abs_diff": gap for form, gap in gaps.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        **({"gpu_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20)} if device.type == "cuda" else {}),
    }))
    data.cleanup()


if __name__ == "__main__":
    main()
