"""Training and evaluation throughput through the core the classifier_checkpoint asset uses.

    python benchmarks/train.py [--crops-dir DIR --dataset-dir DIR] [--model efficientnet-b0] [--image-size 224]
                               [--batch-size 16] [--workers 2] [--epochs 1] [--device auto]

``--dataset-dir`` holds the reference-format ``classification_ds.csv``, ``label_index.json`` and
``splits.json``; without it a learnable set of generated crops is written to a temporary folder. Prints
one line per epoch, then one JSON object: train_crops_per_s, eval_crops_per_s, peak_rss_mb (and gpu_mem_mb,
gpu_util on CUDA).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _shared_data import classification_data  # noqa: E402

from animl_assets.core.ml.data import resolve_device  # noqa: E402
from animl_assets.core.ml.frames import split_frame  # noqa: E402
from animl_assets.core.ml.recipe import VALID_MODELS, TrainingParams, default_image_size  # noqa: E402
from animl_assets.core.ml.training import (  # noqa: E402
    init_model,
    make_loaders,
    make_optimizer,
    train_one_epoch,
    validate,
)


def _gpu_sampler(device: torch.device, samples: list[float], stop: threading.Event) -> None:
    while not stop.wait(0.2):
        try:
            samples.append(float(torch.cuda.utilization(device)))
        except Exception:  # no NVML: utilization is not reported
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops-dir")
    parser.add_argument("--dataset-dir")
    parser.add_argument("--model", default="efficientnet-b0", choices=VALID_MODELS)
    parser.add_argument("--image-size", type=int, default=0, help="0: the model's default")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--generated-crops", type=int, default=640, help="size of the generated set")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--no-amp", action="store_true")
    args = parser.parse_args()

    data = classification_data(args.crops_dir, args.dataset_dir, max(1, args.generated_crops // (4 * 6)))
    crops_dir, label_index = data.crops_dir, data.label_index
    params = TrainingParams(model_name=args.model, image_size=args.image_size or default_image_size(args.model),
                            batch_size=args.batch_size, num_workers=args.workers, device=args.device,
                            amp=not args.no_amp, channels_last=not args.no_channels_last, epochs=args.epochs)
    device = resolve_device(params.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    frame = split_frame(data.ds, label_index, data.splits, params.label_weighted)
    eval_split = "val" if (frame["split"] == "val").any() else "train"
    loaders = make_loaders(frame, crops_dir, params, device)
    eval_loader = make_loaders(frame.assign(split=eval_split), crops_dir, params, device)[eval_split] \
        if eval_split == "train" else loaders["val"]
    model = init_model(params, len(label_index))
    model.to(device, memory_format=torch.channels_last if params.channels_last else torch.contiguous_format)
    optimizer, _, _ = make_optimizer(model, params, device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    utilization: list[float] = []
    stop = threading.Event()
    if device.type == "cuda":
        threading.Thread(target=_gpu_sampler, args=(device, utilization, stop), daemon=True).start()
    train_rates, eval_rates = [], []
    for epoch in range(args.epochs):
        loaders["train"].sampler.set_epoch(epoch)
        train = train_one_epoch(model, loaders["train"], optimizer, scaler, device, amp=params.amp,
                                channels_last=params.channels_last)
        evaluation = validate(model, eval_loader, device, amp=params.amp, channels_last=params.channels_last)
        train_rates.append(train["crops_per_s"])
        eval_rates.append(evaluation["crops_per_s"])
        print(f"epoch {epoch}: train {train['crops_per_s']:.1f} crops/s ({int(train['count'])} crops), "
              f"eval {evaluation['crops_per_s']:.1f} crops/s ({int(evaluation['count'])} crops)", flush=True)
    stop.set()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    steady = train_rates[1:] or train_rates  # the first epoch includes warm-up when there are more
    result = {"model": args.model, "image_size": params.image_size, "batch_size": args.batch_size,
              "workers": args.workers, "device": str(device), "channels_last": params.channels_last,
              "train_crops_per_s": round(sum(steady) / len(steady), 1),
              "eval_crops_per_s": round(max(eval_rates), 1),
              "peak_rss_mb": round(rss), "peak_worker_rss_mb": round(children)}
    if device.type == "cuda":
        result["gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
        result["gpu_util"] = round(sum(utilization) / len(utilization), 1) if utilization else None
        result["gpu"] = torch.cuda.get_device_name(device)
    print(json.dumps(result))
    data.cleanup()


if __name__ == "__main__":
    main()
