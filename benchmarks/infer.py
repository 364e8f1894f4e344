"""Classification throughput through the core function the ``classifications`` asset uses (``classify``):
from crop files to the written ``classifier_output.csv.gz``.

    python benchmarks/infer.py [--crops-dir DIR] [--model efficientnet-b0] [--image-size 224]
                               [--batch-size 16] [--workers 2] [--device auto] [--decode auto]
                               [--model-file FILE] [--runtime torch onnx] [--repeat 1]
                               [--reference CameraTraps/classification/run_classifier.py]

``--crops-dir``: every image under it (else generated crops). ``--model-file``: a TorchScript file or a
checkpoint (``{"model": state_dict}``) of ``--model``; without it the model has random weights (the speed
does not depend on them). ``--runtime``: one or more of torch (the TorchScript model, frozen on CPU) and
onnx (the model exported as the evaluation does, on ONNX Runtime). ``--reference``: also time the reference
``run_classifier.py`` (its code as it is; its ``train_classifier`` import, which pulls its whole training
stack, is replaced by the MEANS, STDS and ``prep_device`` it uses) on the same crops, TorchScript model,
batch size and workers. Prints one JSON object last: per runtime crops_per_s (and the ratio to the
reference's), peak_rss_mb (and gpu_mem_mb on CUDA), and where the time goes:
``loader_crops_per_s_per_worker`` (decode, resize and crop of one loader process alone; times
``--workers`` it is the most the loader can feed the model).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from animl_assets.core.ingest.sample import write_sample_crops  # noqa: E402
from animl_assets.core.ml.data import resolve_device  # noqa: E402
from animl_assets.core.ml.evaluation import compile_model, load_script, script_bytes  # noqa: E402
from animl_assets.core.ml.frames import Preprocessing  # noqa: E402
from animl_assets.core.ml.inference import Classifier, CropFiles, classify  # noqa: E402
from animl_assets.core.artifact_files import read_checkpoint  # noqa: E402
from animl_assets.core.ml.models import build_model  # noqa: E402
from animl_assets.core.ml.portable import OnnxModel, export_program, onnx_bytes  # noqa: E402
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
    parser.add_argument("--runtime", nargs="+", default=["torch"], choices=["torch", "onnx"])
    parser.add_argument("--reference", help="the reference's classification/run_classifier.py, timed beside")
    args = parser.parse_args()
    if "onnx" in args.runtime and args.model_file and not _is_checkpoint(args.model_file):
        parser.error("--runtime onnx exports the eager model: give a checkpoint, not a TorchScript file")

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
    figures: dict[str, float] = {}
    best = None
    for runtime in args.runtime:
        runnable = OnnxModel(onnx_bytes(export_program(model, size)), device) if runtime == "onnx" else model
        best = _fastest(Classifier(runnable, labels, Preprocessing(size), "bench"), root, paths, Path(temp.name), device, args)
        figures[f"{runtime}_crops_per_s"] = round(best.crops_per_s, 1)
    if args.reference:
        reference = _reference_speed(Path(args.reference), model, size, root, paths, Path(temp.name), args)
        figures["reference_crops_per_s"] = round(reference, 1)
        figures |= {f"{runtime}_vs_reference": round(figures[f"{runtime}_crops_per_s"] / reference, 2)
                    for runtime in args.runtime}
    print(json.dumps({
        "model": args.model, "image_size": size, "batch_size": args.batch_size, "workers": args.workers,
        "device": str(device), "decode": args.decode, "crops": best.classified, "failed": len(best.failures),
        **figures,
        "loader_crops_per_s_per_worker": round(_loader_speed(root, paths, size), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        **({"gpu_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20)} if device.type == "cuda" else {}),
    }))
    temp.cleanup()


def _fastest(classifier: Classifier, root: Path, paths: list[str], folder: Path, device: torch.device,
             args: argparse.Namespace):
    """The fastest of ``--repeat`` runs of ``classify`` over the crops."""
    best = None
    for _ in range(args.repeat):
        report = classify(classifier, root, paths, folder / "classifier_output.csv.gz", device=device,
                          batch_size=args.batch_size, workers=args.workers, decode=args.decode)
        print(f"{type(classifier.model).__name__}: {report.classified} crops in {report.seconds:.1f}s: "
              f"{report.crops_per_s:.1f} crops/s", flush=True)
        best = report if best is None or report.crops_per_s > best.crops_per_s else best
    return best


REFERENCE_SHIM = """import torch
MEANS = [0.485, 0.456, 0.406]
STDS = [0.229, 0.224, 0.225]
def prep_device(model, device_id=None):
    device = torch.device("cuda", device_id or 0) if torch.cuda.is_available() else torch.device("cpu")
    return model.to(device), device
"""


def _reference_speed(script: Path, model: torch.nn.Module | torch.jit.ScriptModule, size: int, root: Path,
                     paths: list[str], folder: Path, args: argparse.Namespace) -> float:
    """Crops per second of the reference ``run_classifier.py`` on the same crops and TorchScript model: the
    fastest of ``--repeat`` runs, less the time its process takes to import torch, torchvision and pandas."""
    package = folder / "reference" / "classification"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "train_classifier.py").write_text(REFERENCE_SHIM)
    shutil.copy(script, package / "run_classifier.py")
    scripted = model if isinstance(model, torch.jit.ScriptModule) else compile_model(model, size)
    (folder / "model.pt").write_bytes(script_bytes(scripted))
    command = [sys.executable, "-m", "classification.run_classifier", str(folder / "model.pt"), str(root),
               str(folder / "reference_output.csv.gz"), "--image-size", str(size),
               "--batch-size", str(args.batch_size), "--num-workers", str(args.workers)]
    startup = _seconds([sys.executable, "-c", "import torch, torchvision, pandas, tqdm"], folder)
    seconds = min(_seconds(command, folder / "reference") for _ in range(args.repeat)) - startup
    print(f"reference run_classifier.py: {len(paths)} crops in {seconds:.1f}s (after {startup:.1f}s of imports)")
    return len(paths) / seconds


def _seconds(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - started


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
