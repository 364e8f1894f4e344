"""Classification throughput through the core function the ``classifications`` asset uses (``classify``):
from crop files to the written ``classifier_output.csv.gz``.

    python benchmarks/infer.py [--crops-dir DIR] [--model efficientnet-b0] [--image-size 224]
                               [--batch-size 16] [--workers 2] [--device auto] [--decode auto]
                               [--model-file FILE] [--repeat 1]

``--crops-dir``: every image under it (else generated crops). ``--model-file``: a TorchScript file or a
checkpoint (``{"model": state_dict}``) of ``--model``; without it the model has random weights (the speed
does not depend on them). Prints one JSON object last: crops, crops_per_s, peak_rss_mb (and gpu_mem_mb on
CUDA), and where the time goes: ``loader_crops_per_s_per_worker`` (decode, resize and crop of one loader
process alone; times ``--workers`` it is the most the loader can feed the model).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from animl_assets.core.ingest.sample import write_sample_crops  # noqa: E402
from animl_assets.core.ml.data import resolve_device  # noqa: E402
from animl_assets.core.ml.evaluation import load_script  # noqa: E402
from animl_assets.core.ml.inference import Classifier, CropFiles, classify  # noqa: E402
from animl_assets.core.artifact_files import read_checkpoint  # noqa: E402
from animl_assets.core.ml.models import build_model  # noqa: E402
from animl_assets.core.ml.recipe import VALID_MODELS, default_image_size  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops-dir")
    parser.add_argument("--model", default="efficientnet-b0", choices=VALID_MODELS)
    parser.add_argument("--image-size", type=int, default=0, help="0: the model's default")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--decode", default="auto", choices=["auto", "loader", "device"],
                        help="decode crops in the loader workers (PIL) or on the device (auto: the device on CUDA)")
    parser.add_argument("--model-file", help="TorchScript file or checkpoint of --model")
    parser.add_argument("--labels", type=int, default=4, help="outputs of a random-weight model")
    parser.add_argument("--generated-crops", type=int, default=480)
    parser.add_argument("--repeat", type=int, default=1, help="run over the crops this many times (the best)")
    args = parser.parse_args()

    temp = tempfile.TemporaryDirectory(prefix="animl-infer-")
    if args.crops_dir is None:
        per = max(1, args.generated_crops // (4 * 6))
        args.crops_dir = str(write_sample_crops(temp.name, crops_per_label_and_location=per, size=320).crops_dir)
    root = Path(args.crops_dir)
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    size = args.image_size or default_image_size(args.model)
    model: torch.nn.Module | torch.jit.ScriptModule
    if args.model_file and not _is_checkpoint(args.model_file):
        model = load_script(Path(args.model_file).read_bytes())
        labels = [f"label{i}" for i in range(_outputs(model, size))]
    else:
        labels = [f"label{i}" for i in range(args.labels)]
        model = build_model(args.model, len(labels), image_size=size)
        if args.model_file:
            model.load_state_dict(read_checkpoint(args.model_file)["model"])
    device = resolve_device(args.device)
    classifier = Classifier(model, labels, size, "bench")
    best = None
    for _ in range(args.repeat):
        report = classify(classifier, root, paths, Path(temp.name) / "classifier_output.csv.gz", device=device,
                          batch_size=args.batch_size, workers=args.workers, decode=args.decode)
        print(f"{report.classified} crops in {report.seconds:.1f}s: {report.crops_per_s:.1f} crops/s", flush=True)
        best = report if best is None or report.crops_per_s > best.crops_per_s else best
    print(json.dumps({
        "model": args.model, "image_size": size, "batch_size": args.batch_size, "workers": args.workers,
        "device": str(device), "decode": args.decode, "crops": best.classified, "failed": len(best.failures),
        "crops_per_s": round(best.crops_per_s, 1),
        "loader_crops_per_s_per_worker": round(_loader_speed(root, paths, size), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        **({"gpu_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20)} if device.type == "cuda" else {}),
    }))
    temp.cleanup()


def _loader_speed(root: Path, paths: list[str], size: int, most: int = 400) -> float:
    """Crops per second one loader process prepares (``CropFiles``: decode, resize, crop) with no model."""
    dataset = CropFiles(root, paths[:most], size)
    started = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    return len(dataset) / (time.perf_counter() - started)


def _is_checkpoint(path: str) -> bool:
    try:
        torch.jit.load(path, map_location="cpu")
        return False
    except RuntimeError:
        return True


def _outputs(model: torch.jit.ScriptModule, size: int) -> int:
    with torch.no_grad():
        return int(model(torch.zeros(1, 3, size, size)).shape[1])


if __name__ == "__main__":
    main()
