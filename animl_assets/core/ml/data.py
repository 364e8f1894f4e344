"""What every ML stage reads through PyTorch: the reference's transforms, crops loaded as a ``CropDataset``,
and the device. The dataset framed by split, without PyTorch, is ``frames``."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from animl_assets.core.ml.frames import MEANS, STDS, Preprocessing


def train_transform(prep: Preprocessing, augment: str = "reference") -> v2.Compose:
    """The training augmentation at ``prep``'s size, ending in a tensor normalized with its mean and std:
    the reference's (random resized crop, rotation ±90°, flips, grayscale, colour jitter), or a random
    resized crop and horizontal flip followed by torchvision's TrivialAugmentWide or RandAugment
    (``augment``)."""
    size = prep.image_size
    if augment == "reference":
        steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomRotation(degrees=(-90, 90)),
                 v2.RandomHorizontalFlip(p=0.5), v2.RandomVerticalFlip(p=0.1), v2.RandomGrayscale(p=0.1),
                 v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25)]
    else:
        policy = v2.TrivialAugmentWide() if augment == "trivialaugment" else v2.RandAugment()
        steps = [v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True), v2.RandomHorizontalFlip(p=0.5),
                 policy]
    return v2.Compose([*steps, v2.PILToTensor(), normalize(prep.mean, prep.std)])


def batch_mix(num_classes: int, mixup_alpha: float, cutmix_alpha: float) -> v2.Transform | None:
    """MixUp and/or CutMix on a batch (one of them at random when both are on), or None when both are off."""
    mixes = [mix(alpha=alpha, num_classes=num_classes)
             for mix, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha)) if alpha > 0]
    return None if not mixes else mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def eval_resize(size: int, interpolation: str = "bicubic") -> v2.Compose:
    """The reference's evaluation geometry: resize of the short side (bicubic unless the model's config
    says otherwise), centre crop; a uint8 tensor."""
    return v2.Compose([
        v2.Resize(size, interpolation=v2.InterpolationMode(interpolation), antialias=True), v2.CenterCrop(size),
        v2.PILToTensor(),
    ])


def normalize(mean: Sequence[float] = MEANS, std: Sequence[float] = STDS) -> v2.Compose:
    """uint8 image tensors (one or a batch) to the model's normalized float input."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def eval_transform(prep: Preprocessing) -> v2.Compose:
    """The reference's evaluation transform with ``prep``'s values: ``eval_resize`` then ``normalize``."""
    return v2.Compose([eval_resize(prep.image_size, prep.interpolation), normalize(prep.mean, prep.std)])


class CropDataset(Dataset):
    """Crops under ``root`` with their label index and weight: ``(image, label, weight, index)`` items."""

    def __init__(self, root: str | Path, paths: Sequence[str], labels: Sequence[int], weights: Sequence[float],
                 transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.root, self.paths, self.transform = Path(root), list(paths), transform
        self.labels = torch.tensor(np.array(labels), dtype=torch.long)
        self.weights = torch.tensor(np.array(weights), dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Item ``key``: an index, or ``(index, seed)`` from an ``EpochSampler``, whose seed alone decides the
        random augmentation (whichever loader worker draws it, and however often workers were restarted)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        path = self.root / self.paths[index]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, ValueError) as err:
            raise OSError(f"cannot read crop {path}: {err}") from err
        if seed is None:
            return self.transform(rgb), self.labels[index], self.weights[index], index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(rgb), self.labels[index], self.weights[index], index


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else CPU (a torchrun rank names its own device)."""
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
