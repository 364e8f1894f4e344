"""Figures as PNG bytes (matplotlib, headless): the learning curve."""

from __future__ import annotations

import io
from typing import Mapping, Sequence


def learning_curve(history: Sequence[Mapping[str, float]], best_epoch: int | None = None) -> bytes:
    """Loss and top-1 accuracy per epoch, train and val, the best epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    epochs = [row["epoch"] + 1 for row in history]
    figure = Figure(figsize=(8, 3.2), dpi=100)
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
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
