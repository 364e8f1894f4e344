"""Classifying crops with a trained model, streamed into the reference ``run_classifier.py``'s CSV
(``path`` + one probability column per category, optionally gzipped), with flat memory.

Unlike the reference, an unreadable crop is reported and skipped instead of stopping the run, and a
target mapping (``{target: [classifier labels]}``, the reference ``aggregate_classifier_probs.py``'s
semantics: probabilities summed, unmapped labels to ``other``) is applied on the fly.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from animl_assets.core.ml import open_set
from animl_assets.core.ml.data import eval_resize, normalize
from animl_assets.core.ml.evaluation import map_logits
from animl_assets.core.ml.frames import Preprocessing
from animl_assets.core.ml.labels import target_columns

Decode = Literal["auto", "loader", "device"]


@dataclass
class Classifier:
    """A model with what running it needs: its labels, its input (size, resize, normalization) and a version
    (what a re-run compares)."""

    model: nn.Module | torch.jit.ScriptModule | Callable[[torch.Tensor], torch.Tensor]  # or an OnnxModel
    labels: list[str]
    prep: Preprocessing
    version: str
    name: str = ""
    open_set: dict[str, Any] = field(default_factory=dict)  # open_set.json: unknowns flagged below its threshold
    prediction_profile: dict[str, Any] = field(default_factory=dict)  # its test predictions, for drift
    # a multi-output model's extra outputs and their classes, in the order of its logits after the species'
    outputs: dict[str, list[str]] = field(default_factory=dict)

    def split(self, logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The species logits and each extra output's probabilities from a multi-output model's logits."""
        start, found = len(self.labels), {}
        for name, classes in self.outputs.items():
            found[name] = torch.softmax(logits[:, start:start + len(classes)], dim=1)
            start += len(classes)
        return logits[:, :len(self.labels)], found

    @property
    def flags_unknowns(self) -> bool:
        return self.open_set.get("threshold") is not None


class CropFiles(Dataset):
    """Crop files under ``root`` resized and cropped as in evaluation, as uint8 tensors (a quarter of the
    float bytes between loader workers, pinned memory and the GPU; ``classify`` normalizes on the device).
    An unreadable file yields an empty tensor and its error, so one bad file never stops the batch."""

    def __init__(self, root: str | Path, paths: Sequence[str], image_size: int, interpolation: str = "bicubic"
                 ) -> None:
        self.root, self.paths, self.transform = Path(root), list(paths), eval_resize(image_size, interpolation)
        self.size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        path = self.root / self.paths[index]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB")), index, ""
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            error = "empty file" if path.is_file() and not path.stat().st_size else f"{type(err).__name__}: {err}"
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), index, error


class CropBytes(Dataset):
    """Crop files' encoded bytes, for decoding on the device (nvJPEG on CUDA): the loader workers only read,
    which takes the CPU loader out of the way of a fast GPU. A file that cannot be read yields its error."""

    def __init__(self, root: str | Path, paths: Sequence[str]) -> None:
        self.root, self.paths = Path(root), list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            data = (self.root / self.paths[index]).read_bytes()
            return encoded_tensor(data), index, ""
        except OSError as err:
            return torch.empty(0, dtype=torch.uint8), index, f"{type(err).__name__}: {err}"


def encoded_tensor(data: bytes) -> torch.Tensor:
    """A file's bytes as the 1-D uint8 tensor ``decode_on`` takes (empty for an empty file)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _as_lists(batch: list[tuple[torch.Tensor, int, str]]) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
    """Collate encoded files of different lengths: a list of them, the indices, the errors."""
    data, indices, errors = zip(*batch)
    return list(data), torch.tensor(indices), list(errors)


def decode_on(device: torch.device, encoded: Sequence[torch.Tensor], size: int, interpolation: str = "bicubic"
              ) -> tuple[torch.Tensor, list[str]]:
    """Decode JPEG bytes on ``device`` (nvJPEG on CUDA; one call for the batch) and resize and crop them
    there as ``eval_resize`` does. A file the JPEG decoder refuses (a PNG, a CMYK or corrupt JPEG) goes to
    PIL on the CPU, or is reported. Returns the uint8 batch of the decoded files and each file's error
    ("" when decoded)."""
    images, errors = [], []
    for data, image in zip(encoded, _decode_jpegs(device, encoded)):
        if image is None:
            if not data.numel():
                errors.append("empty file")
                continue
            try:
                with Image.open(io.BytesIO(data.numpy().tobytes())) as pil:
                    image = eval_resize(size, interpolation)(pil.convert("RGB")).to(device)
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
        else:
            image = F.center_crop(F.resize(image, [size], interpolation=F.InterpolationMode(interpolation),
                                           antialias=True), [size, size])
        images.append(image)
        errors.append("")
    batch = torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8, device=device)
    return batch, errors


def _decode_jpegs(device: torch.device, encoded: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """``decode_jpeg`` over the batch at once, else file by file; None where it cannot decode a file."""
    if not encoded:
        return []
    try:
        return list(decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        decoded: list[torch.Tensor | None] = []
        for data in encoded:
            try:
                decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
        return decoded


@dataclass
class ClassifyReport:
    """What a classification run did: crops written, crops that failed (path, error), and its speed."""

    columns: list[str]
    classified: int = 0
    unknown: int = 0  # crops flagged unknown (their column is the last one)
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def crops_per_s(self) -> float:
        return self.classified / self.seconds if self.seconds else 0.0


def prepare(model: nn.Module | torch.jit.ScriptModule, device: torch.device, image_size: int
            ) -> torch.jit.ScriptModule | nn.Module:
    """The model ready for inference on ``device``, fed channels-last batches. On CPU it is traced (if eager)
    and frozen, for oneDNN's fused kernels (3x an unfrozen TorchScript EfficientNet-B0 on 2 cores, same
    outputs); on CUDA it runs channels-last in bf16 autocast. Another runtime's model (``OnnxModel``) is
    returned as it is."""
    if not isinstance(model, nn.Module):
        return model
    model = model.eval()
    if device.type != "cpu":
        return model.to(device, memory_format=torch.channels_last)
    if not isinstance(model, torch.jit.ScriptModule):
        with torch.no_grad():
            model = torch.jit.trace(model, torch.rand(1, 3, image_size, image_size))
    return torch.jit.freeze(model)


@contextlib.contextmanager
def _onednn_fusion(enabled: bool) -> Iterator[None]:
    before = torch.jit.onednn_fusion_enabled()
    torch.jit.enable_onednn_fusion(enabled)
    try:
        yield
    finally:
        torch.jit.enable_onednn_fusion(before)


def output_file(out: str | Path, output: str) -> Path:
    """Where ``classify`` writes an extra output's rows beside ``out``: ``classifier_output_<output>.csv.gz``."""
    out = Path(out)
    stem, dot, suffix = out.name.partition(".")
    return out.with_name(f"{stem}_{output}{dot}{suffix}")


def classify(classifier: Classifier, crops_root: str | Path, paths: Sequence[str], out: str | Path, *,
             mapping: Mapping[str, Sequence[str]] | None = None, targets: Sequence[str] | None = None,
             device: torch.device | None = None, batch_size: int = 64, workers: int = 2,
             decode: Decode = "auto", progress: Callable[[int, int], None] | None = None,
             progress_every: int = 50) -> ClassifyReport:
    """Classify the crops ``paths`` (relative to ``crops_root``) and stream ``path,<category>…`` rows to
    ``out`` (gzipped when it ends in ``.gz``) batch by batch. With ``mapping`` the columns are ``targets``
    (default: the mapping's keys, in order) plus ``other`` for unmapped labels; probabilities are summed.
    ``decode``: "loader" (PIL in the loader workers, the evaluation's exact pixels), "device" (``decode_on``)
    or "auto" (the device on CUDA). ``progress(done, total)`` is called every ``progress_every`` batches. A
    classifier with an unknowns' threshold adds a last column (``unknown``): 1 for a crop below it, else 0. A
    multi-output classifier also writes each extra output's ``path,<class>…`` rows to ``output_file(out, name)``."""
    device, prep = device or torch.device("cpu"), classifier.prep
    if mapping is not None:
        columns, cols = target_columns(classifier.labels, list(targets or mapping), mapping)
    else:
        columns, cols = list(classifier.labels), None
    if classifier.flags_unknowns:  # 1 for a crop below the threshold, else 0; scored on the model's own labels
        columns.append(open_set.unknown_column(columns))
    on_device = decode == "device" or (decode == "auto" and device.type == "cuda")
    dataset = (CropBytes(crops_root, paths) if on_device
               else CropFiles(crops_root, paths, prep.image_size, prep.interpolation))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=False, collate_fn=_as_lists if on_device else None)
    model = prepare(classifier.model, device, prep.image_size)
    # torch runs channels-last; another runtime (ONNX) takes the plain NCHW layout its graph was exported with
    memory_format = torch.channels_last if isinstance(model, nn.Module) else torch.contiguous_format
    to_input = normalize(prep.mean, prep.std)
    report = ClassifyReport(columns)
    started = time.perf_counter()
    opener = gzip.open if str(out).endswith(".gz") else open
    with contextlib.ExitStack() as files, torch.inference_mode(), _onednn_fusion(device.type == "cpu"):
        stream = files.enter_context(opener(out, "wt", newline=""))
        extra = {name: files.enter_context(opener(output_file(out, name), "wt", newline=""))
                 for name in classifier.outputs}
        for name, header in [("", columns), *classifier.outputs.items()]:
            (extra[name] if name else stream).write(",".join(["path", *(_csv_field(c) for c in header)]) + "\n")
        for batch, (images, indices, errors) in enumerate(loader):
            if on_device:  # decode what was read; ``images`` becomes the decoded batch
                read = [i for i, error in enumerate(errors) if not error]
                images, decode_errors = decode_on(device, [images[i] for i in read], prep.image_size,
                                                  prep.interpolation)
                for i, error in zip(read, decode_errors):
                    errors[i] = error
            ok = torch.tensor([not error for error in errors], dtype=torch.bool)
            report.failures += [(dataset.paths[i], error) for i, error in zip(indices.tolist(), errors) if error]
            if ok.any():
                images = images if on_device else images[ok]
                images = to_input(images.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(images).float()
                logits, output_probs = classifier.split(logits)
                unknown = open_set.is_unknown(logits.cpu().numpy(), classifier.open_set)
                if cols is not None:
                    logits = map_logits(logits, cols)
                probs = torch.softmax(logits, dim=1).cpu().numpy()
                if classifier.flags_unknowns:
                    probs = np.column_stack([probs, unknown.astype(probs.dtype)])
                    report.unknown += int(unknown.sum())
                names = [dataset.paths[i] for i in indices[ok].tolist()]
                _write_rows(stream, names, probs)
                for name, output in output_probs.items():
                    _write_rows(extra[name], names, output.cpu().numpy())
                report.classified += len(names)
            if progress and progress_every and (batch + 1) % progress_every == 0:
                progress(report.classified + len(report.failures), len(dataset))
    report.seconds = time.perf_counter() - started
    return report


def _csv_field(value: str) -> str:
    return f'"{value.replace(chr(34), chr(34) * 2)}"' if any(c in value for c in ',"\n') else value


def _write_rows(stream: io.TextIOBase, paths: Sequence[str], probs: np.ndarray) -> None:
    for path, row in zip(paths, probs):
        stream.write(_csv_field(path) + "," + ",".join(f"{p:.6g}" for p in row) + "\n")
