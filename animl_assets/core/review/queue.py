"""A review queue: which of an export's crops a person should look at first, within a budget.

Each classified crop gets a priority: how unsure the model is (one minus its top-1 – top-2 margin), plus one
if it is flagged unknown, plus one if it disagrees with the export's own label (where the export has one).
Bursts are looked at once: of a sequence whose crops agree, only its first-priority crop is a candidate; of a
sequence that disagrees with itself, the first of each predicted label (and that disagreement is a reason).
The queue then takes the candidates round by round: each predicted label in turn (the label with the most
urgent crop first), and within a label each camera in turn, most urgent first, so a budget is spread over
classes and cameras instead of spent on one burst of one animal.

The queue's CSV is also a corrections file (``core.review.corrections``): a reviewer marks ``reviewed`` and
sets ``correct_label`` (empty: drop the image's crops), and the next dataset version takes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from animl_assets.core.artifact_files import artifact_file
from animl_assets.core.ml import open_set
from animl_assets.core.review.corrections import normalize_label
from animl_assets.core.review.sequences import crop_image

UNKNOWN, DISAGREES, LOW_MARGIN, SPLIT_BURST = "unknown", "export says", "margin", "burst disagrees with itself"
REASONS = (UNKNOWN, DISAGREES, LOW_MARGIN, SPLIT_BURST)
QUEUE_COLUMNS = ["rank", "dataset", "file", "crop", "pred", "confidence", "margin", "unknown", "export_label",
                 "sequence", "camera", "priority", "reasons", "reviewed", "correct_label"]


@dataclass
class ReviewQueue:
    """``review_queue``'s files for one export: the ranked crops (``review_queue.csv``, a corrections file once
    reviewed) and the MegaDetector JSON of just their images, for Timelapse (``review_queue.md.json``)."""

    queue: pd.DataFrame = field(metadata=artifact_file("review_queue.csv"))
    md: dict[str, Any] = field(metadata=artifact_file("review_queue.md.json"))


def crop_priorities(outputs: pd.DataFrame, labels: Sequence[str], unknown_column: str | None,
                    export_label: Mapping[str, str]) -> pd.DataFrame:
    """Per crop of classifier ``outputs`` (``path`` + a probability column per label, the unknowns' column):
    pred, confidence, margin, unknown, export_label, priority and the reasons for it."""
    probs = outputs[list(labels)].to_numpy(dtype=np.float64)
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    margin = open_set.margin(probs)
    pred = np.asarray(labels, dtype=object)[probs.argmax(axis=1)] if len(probs) else np.array([], dtype=object)
    unknown = open_set.flags(outputs, unknown_column)
    given = [str(export_label.get(path) or "") for path in outputs["path"]]
    disagree = np.array([bool(g) and normalize_label(g) != normalize_label(p) for g, p in zip(given, pred)], bool)
    frame = pd.DataFrame({"crop": outputs["path"].to_numpy(), "pred": pred, "confidence": confidence,
                          "margin": margin, "unknown": unknown, "export_label": given})
    frame["priority"] = (1 - margin) + unknown + disagree
    frame["reasons"] = [", ".join(reason for reason, on in (
        (UNKNOWN, u), (f"{DISAGREES} {g}", d), (f"{LOW_MARGIN} {m:.2f}", m < 0.5)) if on)
        for u, d, g, m in zip(unknown, disagree, given, margin)]
    return frame


def reason_counts(reasons: pd.Series) -> dict[str, int]:
    """How many queued crops have each kind of reason (a crop may have several)."""
    listed = [reason for text in reasons for reason in str(text).split(", ") if reason]
    return {kind: sum(reason.startswith(kind) for reason in listed) for kind in REASONS}


def review_queue(crops: pd.DataFrame, budget: int, sequence_of: Mapping[str, str], camera_of: Mapping[str, str]
                 ) -> pd.DataFrame:
    """The ranked queue (at most ``budget`` crops) from ``crop_priorities``' rows, one candidate per burst (per
    predicted label where the burst disagrees with itself), round-robin over predicted labels and, within a
    label, over cameras."""
    frame = crops.assign(file=crops["crop"].map(crop_image))
    frame["sequence"] = [sequence_of.get(crop) or f"crop:{crop}" for crop in frame["crop"]]
    frame["camera"] = [camera_of.get(file, "") for file in frame["file"]]
    frame = frame.sort_values(["priority", "crop"], ascending=[False, True], kind="stable")
    preds_per_sequence = frame.groupby("sequence")["pred"].transform("nunique")
    split_bursts = preds_per_sequence > 1
    frame.loc[split_bursts, "priority"] += 0.5
    frame.loc[split_bursts, "reasons"] = frame.loc[split_bursts, "reasons"].map(
        lambda r: ", ".join(filter(None, [r, SPLIT_BURST])))
    candidates = frame.sort_values(["priority", "crop"], ascending=[False, True], kind="stable") \
        .drop_duplicates(["sequence", "pred"])
    # within a label, its cameras take turns; across labels, the labels take turns (most urgent label first)
    candidates = candidates.assign(camera_turn=candidates.groupby(["pred", "camera"]).cumcount())
    candidates = candidates.sort_values(["camera_turn", "priority", "crop"], ascending=[True, False, True],
                                        kind="stable")
    candidates = candidates.assign(turn=candidates.groupby("pred").cumcount(),
                                   first=candidates.groupby("pred")["priority"].transform("max"))
    queue = candidates.sort_values(["turn", "first", "priority", "crop"], ascending=[True, False, False, True],
                                   kind="stable").head(budget)
    return queue.drop(columns=["camera_turn", "turn", "first"]).reset_index(drop=True)


def queue_file(queue: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """The queue as its CSV: ranked, with the export's name (``dataset``) and the corrections columns
    (``reviewed`` empty; ``correct_label`` the prediction, to confirm or change)."""
    out = queue.assign(rank=np.arange(1, len(queue) + 1), dataset=dataset, reviewed="", correct_label=queue["pred"])
    return out[QUEUE_COLUMNS].round({"confidence": 4, "margin": 4, "priority": 4})


def queue_md(md: Mapping[str, Any], files: Sequence[str]) -> dict[str, Any]:
    """The MegaDetector JSON (with classifications) of just the images ``files``, in queue order."""
    wanted = list(dict.fromkeys(files))
    images = {image["file"]: image for image in md["images"]}
    return {**{k: v for k, v in md.items() if k != "images"}, "images": [images[f] for f in wanted if f in images]}
