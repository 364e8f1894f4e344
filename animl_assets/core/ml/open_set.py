"""Unknowns (open set): a score that tells crops of the classes a model knows from crops of animals it never saw,
and a threshold on it fitted on the validation split at a target recall of the known classes.

Scores, each higher for what looks known, all from the model's logits:

- ``msp``: the maximum softmax probability (Hendrycks & Gimpel, 2017);
- ``energy``: the negative free energy ``T * logsumexp(logits / T)`` (Liu et al., 2020);
- ``margin``: the top-1 probability minus the top-2.

``benchmarks/open_set.py`` measures them leaving one class out of training; ``DEFAULT_SCORE`` is its choice.
The fitted threshold is ``open_set.json``, stored with the evaluation and the registered model.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import numpy as np

Score = Literal["msp", "energy", "margin"]
SCORES: tuple[str, ...] = ("msp", "energy", "margin")
DEFAULT_SCORE: Score = "margin"  # benchmarks/open_set.py: the best mean AUROC over its two sets
UNKNOWN = "unknown"  # the category unknowns get in classifier_output.csv.gz and the MegaDetector JSON


def known_score(logits: np.ndarray, score: str, temperature: float = 1.0) -> np.ndarray:
    """Per row of ``logits`` (crops × labels), how much the crop looks like a class the model knows."""
    from scipy.special import logsumexp, softmax

    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or not logits.shape[1]:
        return np.zeros(len(logits))
    if score == "energy":
        return temperature * logsumexp(logits / temperature, axis=1)
    probs = softmax(logits, axis=1)
    if score == "msp":
        return probs.max(axis=1)
    if score == "margin":
        return margin(probs)
    raise ValueError(f"unknown open-set score {score!r}: one of {', '.join(SCORES)}")


def margin(probs: np.ndarray) -> np.ndarray:
    """Per row of class probabilities, the top-1 minus the top-2 (the top-1 alone with one class)."""
    probs = np.asarray(probs, dtype=np.float64)
    if not probs.size:
        return np.zeros(len(probs))
    top = np.sort(probs, axis=1)
    return top[:, -1] - (top[:, -2] if probs.shape[1] > 1 else 0.0)


def flags(outputs: Any, column: str | None) -> np.ndarray:
    """The unknown flags of classifier outputs (a frame with the unknowns' ``column``; all False without one)."""
    return outputs[column].to_numpy() >= 0.5 if column else np.zeros(len(outputs), dtype=bool)


def fit(val_logits: np.ndarray, score: str = DEFAULT_SCORE, target_recall: float = 0.95) -> dict[str, Any]:
    """``open_set.json``: the threshold at which ``target_recall`` of the validation crops (all of known
    classes) score at or above it, with the recall reached there; ``threshold`` None without val crops."""
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], not {target_recall}")
    scores = known_score(val_logits, score)
    found: dict[str, Any] = {"score": score, "target_recall": target_recall, "split": "val",
                             "val_crops": int(len(scores)), "threshold": None, "val_recall": None}
    if len(scores):
        threshold = float(np.quantile(scores, 1 - target_recall, method="lower"))
        found |= {"threshold": threshold, "val_recall": float((scores >= threshold).mean())}
    return found


def is_unknown(logits: np.ndarray, open_set: Mapping[str, Any] | None) -> np.ndarray:
    """Which rows of ``logits`` fall below the fitted threshold (all False without one)."""
    if not open_set or open_set.get("threshold") is None:
        return np.zeros(len(logits), dtype=bool)
    return known_score(logits, open_set["score"]) < open_set["threshold"]


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """Area under the ROC curve of telling known crops (positives) from unknown ones by their score."""
    from sklearn.metrics import roc_auc_score

    if not len(known) or not len(unknown):
        return float("nan")
    y = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
    return float(roc_auc_score(y, np.r_[known, unknown]))


def unknown_column(labels: Sequence[str]) -> str:
    """The name of the unknowns' column beside ``labels``: ``unknown``, or a free variant when a label is
    called that."""
    name = UNKNOWN
    while name in labels:
        name = f"{name}_"
    return name
