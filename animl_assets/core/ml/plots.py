"""Figures as PNG bytes (matplotlib, headless): the learning curve, and the evaluation's confusion
heatmaps, reliability curves and error grids (drawn with scikit-learn's displays)."""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np


def learning_curve(history: Sequence[Mapping[str, float]], best_epoch: int | None = None) -> bytes:
    """Loss and top-1 accuracy per epoch, train and val, the best epoch marked."""
    epochs = [row["epoch"] + 1 for row in history]
    figure = _figure(8, 3.2)
    for axis, metric, title in zip(figure.subplots(1, 2), ("loss", "acc_top1"), ("loss", "top-1 accuracy")):
        for split in ("train", "val"):
            values = [row.get(f"{split}/{metric}") for row in history]
            if any(v is not None for v in values):
                axis.plot(epochs, values, marker="o", markersize=3, label=split)
        if best_epoch is not None:
            axis.axvline(best_epoch + 1, color="grey", linestyle=":", label="best")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.legend()
    return _png(figure)


def _figure(width: float, height: float):  # noqa: ANN202 - a matplotlib Figure, imported lazily
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _png(figure) -> bytes:  # noqa: ANN001
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def confusion_heatmap(cm: np.ndarray, names: Sequence[str], title: str) -> bytes:
    """A confusion matrix as a heatmap (scikit-learn's ``ConfusionMatrixDisplay``), rows the true labels."""
    from sklearn.metrics import ConfusionMatrixDisplay

    side = 2.5 + 0.45 * len(names)
    figure = _figure(side + 1, side)
    axis = figure.subplots()
    ConfusionMatrixDisplay(cm, display_labels=list(names)).plot(ax=axis, cmap="Blues", colorbar=False,
                                                                xticks_rotation="vertical")
    axis.set_title(title)
    return _png(figure)


def reliability(y: np.ndarray, probs: np.ndarray, names: Sequence[str], title: str, n_bins: int = 10) -> bytes:
    """A reliability (calibration) curve per label, one-vs-rest on its probability column
    (scikit-learn's ``CalibrationDisplay``); labels without crops are left out."""
    from sklearn.calibration import CalibrationDisplay

    shown = [i for i in range(len(names)) if 0 < (y == i).sum() < len(y)]
    columns = min(4, max(1, len(shown)))
    rows = max(1, -(-len(shown) // columns))
    figure = _figure(3 * columns, 3 * rows)
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for axis, i in zip(axes, shown):
        CalibrationDisplay.from_predictions(y == i, probs[:, i], n_bins=n_bins, strategy="uniform", ax=axis,
                                            name=names[i])
        axis.set_title(names[i], fontsize=9)
        axis.get_legend().remove()
    for axis in axes[len(shown):]:
        axis.set_axis_off()
    figure.suptitle(title)
    return _png(figure)


def error_grid(rows: Sequence[tuple[str, Sequence[tuple[Any, str]]]], title: str, thumb: int = 96) -> bytes:
    """An image grid: one row per label, its crops (PIL images) each with a caption."""
    width = max([len(images) for _, images in rows] + [1])
    figure = _figure(1.3 * width + 1.4, 1.45 * max(1, len(rows)) + 0.4)
    axes = np.array(figure.subplots(max(1, len(rows)), width, squeeze=False))
    for r, (label, images) in enumerate(rows):
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        for c in range(width):
            axis = axes[r, c]
            axis.set_xticks([])
            axis.set_yticks([])
            if c < len(images):
                image, caption = images[c]
                axis.imshow(image.convert("RGB").resize((thumb, thumb)))
                axis.set_title(caption, fontsize=6)
            else:
                for spine in axis.spines.values():
                    spine.set_visible(False)
    figure.suptitle(title, fontsize=10)
    return _png(figure)


def label_shares(reference: Mapping[str, float], observed: Mapping[str, float], title: str) -> bytes:
    """The share of crops predicted as each label: a model's test split beside an export (drift)."""
    names = sorted(set(reference) | set(observed))
    x = np.arange(len(names))
    figure = _figure(2.5 + 0.5 * len(names), 3.2)
    axis = figure.subplots()
    axis.bar(x - 0.2, [reference.get(n, 0.0) for n in names], width=0.4, label="model's test split")
    axis.bar(x + 0.2, [observed.get(n, 0.0) for n in names], width=0.4, label="this export")
    axis.set_xticks(x, names, rotation=45, ha="right")
    axis.set_ylabel("share of crops predicted")
    axis.set_title(title)
    axis.legend()
    return _png(figure)
