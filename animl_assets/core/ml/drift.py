"""Drift: how an export's predictions differ from those of the model's own test split.

A model's *prediction profile* (``prediction_profile.json``, made by the evaluation on its test split) is the
share of crops predicted as each label, the mean top-1 confidence and the share flagged unknown. An export's
classifications get the same profile, overall and per camera (or location) with enough crops, and are
compared with it: the population stability index (PSI) of the predicted-label distribution, the drop in
mean confidence and the rise in unknowns, each against a threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from animl_assets.core.ml import open_set

PSI_FLOOR = 1e-4  # a label's share where it has none (the PSI of an empty bin is infinite otherwise)
ALL = "(all)"


def profile(probs: np.ndarray, unknown: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """The prediction profile of crops' probabilities (crops × labels) and unknown flags."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, len(labels))
    n = len(probs)
    counts = np.bincount(probs.argmax(axis=1), minlength=len(labels)) if n else np.zeros(len(labels))
    return {"crops": int(n), "predicted": {name: float(c / n) if n else 0.0 for name, c in zip(labels, counts)},
            "mean_top1": float(probs.max(axis=1).mean()) if n else None,
            "unknown_share": float(np.mean(unknown)) if n else None}


def outputs_profile(outputs: pd.DataFrame, labels: Sequence[str], unknown_column: str | None) -> dict[str, Any]:
    """The prediction profile of classifier outputs (``path``, a probability column per label, the unknowns')."""
    return profile(outputs[list(labels)].to_numpy(dtype=np.float64), open_set.flags(outputs, unknown_column), labels)


def psi(expected: Mapping[str, float], actual: Mapping[str, float]) -> float:
    """Population stability index of ``actual`` shares against ``expected`` over the union of their labels:
    sum of (a - e) * ln(a / e), shares floored at ``PSI_FLOOR``. Under 0.1 is stable by the usual rule, over
    0.25 a shift."""
    names = sorted(set(expected) | set(actual))
    e = np.maximum([expected.get(n, 0.0) for n in names], PSI_FLOOR)
    a = np.maximum([actual.get(n, 0.0) for n in names], PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass(frozen=True)
class DriftLimits:
    """Past any of these, an export (or one of its cameras) has drifted."""

    max_psi: float = 0.25
    max_confidence_drop: float = 0.10
    max_unknown_rise: float = 0.10
    min_crops: int = 30  # a camera with fewer crops gets no row of its own


def compare(reference: Mapping[str, Any], observed: Mapping[str, Any], limits: DriftLimits) -> dict[str, Any]:
    """One row of the drift table: the figures of ``observed`` against ``reference`` and why it drifted (no
    crops: nothing to compare, not drifted)."""
    if not observed["crops"]:
        return {"crops": 0, "psi": None, "mean_top1": None, "reference_mean_top1": reference["mean_top1"],
                "unknown_share": None, "reference_unknown_share": reference.get("unknown_share"),
                "drifted": False, "reasons": "no crops to compare"}
    row = {"crops": observed["crops"], "psi": psi(reference["predicted"], observed["predicted"]),
           "mean_top1": observed["mean_top1"], "reference_mean_top1": reference["mean_top1"],
           "unknown_share": observed["unknown_share"], "reference_unknown_share": reference.get("unknown_share")}
    reasons = []
    if row["psi"] > limits.max_psi:
        reasons.append(f"predicted labels shifted (PSI {row['psi']:.2f} > {limits.max_psi})")
    if reference["mean_top1"] is not None and observed["mean_top1"] is not None \
            and reference["mean_top1"] - observed["mean_top1"] > limits.max_confidence_drop:
        reasons.append(f"mean confidence {observed['mean_top1']:.2f} vs {reference['mean_top1']:.2f}")
    if reference.get("unknown_share") is not None and observed["unknown_share"] is not None \
            and observed["unknown_share"] - reference["unknown_share"] > limits.max_unknown_rise:
        reasons.append(f"unknowns {observed['unknown_share']:.0%} vs {reference['unknown_share']:.0%}")
    return row | {"drifted": bool(reasons), "reasons": "; ".join(reasons)}


def drift_table(outputs: pd.DataFrame, labels: Sequence[str], unknown_column: str | None,
                group_of: Mapping[str, str], reference: Mapping[str, Any], limits: DriftLimits = DriftLimits()
                ) -> pd.DataFrame:
    """The drift of classifier outputs (``path``, one probability column per label, the unknowns' column
    when the model has one) against a model's ``reference`` profile: a row for all crops, then one per group
    (camera or location, from ``group_of``: crop path -> group) with at least ``limits.min_crops`` crops."""
    probs = outputs[list(labels)].to_numpy(dtype=np.float64)
    unknown = open_set.flags(outputs, unknown_column)
    rows = [{"scope": ALL, **compare(reference, profile(probs, unknown, labels), limits)}]
    groups = np.array([group_of.get(path, "") for path in outputs["path"]], dtype=object)
    for group in sorted(set(groups) - {""}):
        rows_of = groups == group
        if rows_of.sum() >= limits.min_crops:
            rows.append({"scope": group, **compare(reference, profile(probs[rows_of], unknown[rows_of], labels),
                                                   limits)})
    return pd.DataFrame(rows)
