"""Reviewers' corrections (Timelapse's CSV or a plain list) read, checked and applied to a classification
dataset: relabel or drop a crop's rows, refusing ambiguous, conflicting or unknown labels."""

from __future__ import annotations

import difflib
import io
from typing import Any, Mapping

import numpy as np
import pandas as pd

from animl_assets.core.review.merge import CROP_MARK

TRUE = {"true", "1", "yes", "y", "x"}
CORRECTION_COLUMNS = ["dataset", "file", "correct_label"]


class CorrectionsError(ValueError):
    """Corrections that cannot be applied as they stand; the message lists the problems."""


def read_corrections(data: bytes, dataset: str = "") -> pd.DataFrame:
    """A corrections file as ``dataset, file, correct_label`` rows (an empty label: drop the image's crops).

    Either Timelapse's exported CSV (``File``, ``RelativePath``, a ``mislabeled`` flag and ``correct_class``;
    only flagged rows count; Timelapse files are per export, so ``dataset`` names it) or a plain
    ``file,correct_label`` list, optionally with a ``dataset`` (or ``export``) column and a ``reviewed`` flag
    (a review queue's CSV: only flagged rows count). Raises ValueError for anything else."""
    frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    columns = {c.lower(): c for c in frame.columns}
    if "file" in columns and "correct_label" in columns:
        if "reviewed" in columns:  # a review queue's CSV: only the rows a reviewer marked count
            frame = frame[frame[columns["reviewed"]].str.strip().str.lower().isin(TRUE)]
        named = columns.get("dataset") or columns.get("export")
        out = pd.DataFrame({"dataset": frame[named] if named else dataset, "file": frame[columns["file"]],
                            "correct_label": frame[columns["correct_label"]]})
    elif {"file", "mislabeled", "correct_class"} <= set(columns):
        flagged = frame[frame[columns["mislabeled"]].str.strip().str.lower().isin(TRUE)]
        folder = (flagged[columns["relativepath"]].str.replace("\\", "/", regex=False).str.strip("/")
                  if "relativepath" in columns else pd.Series("", index=flagged.index))
        files = (folder + "/").where(folder != "", "") + flagged[columns["file"]]
        out = pd.DataFrame({"dataset": dataset, "file": files, "correct_label": flagged[columns["correct_class"]]})
    else:
        raise ValueError("a corrections file is Timelapse's CSV (File, RelativePath, mislabeled, correct_class) or "
                         f"a [dataset,]file,correct_label list; this one has columns {list(frame.columns)}")
    out = out.astype(str).apply(lambda column: column.str.strip())
    return out[out["file"].str.len() > 0].drop_duplicates().reset_index(drop=True)[CORRECTION_COLUMNS]


def normalize_label(name: str) -> str:
    """A label as the dataset writes its own: lower case, spaces as '_' (see ``default_label_mapping``)."""
    return name.strip().lower().replace(" ", "_")


def _correct_labels(corrections: pd.DataFrame, known: set[str], allow_new_labels: bool
                    ) -> tuple[pd.Series, list[str], list[str]]:
    """The corrections' labels mapped onto the dataset's spelling; (labels, warnings, problems)."""
    by_normal = {normalize_label(name): name for name in known}
    labels, warnings, problems, unknown = [], [], [], set()
    for correct in corrections["correct_label"]:
        if "," in correct:
            problems.append(f"label {correct!r} has a comma (classification_ds.csv joins labels with commas)")
        elif correct and correct not in known and normalize_label(correct) in by_normal:
            warnings.append(f"{correct!r} read as the dataset's label {by_normal[normalize_label(correct)]!r}")
            correct = by_normal[normalize_label(correct)]
        elif correct and correct not in known and not allow_new_labels:
            unknown.add(correct)
        labels.append(correct)
    if unknown:
        hints = {name: difflib.get_close_matches(name, sorted(known), n=1) for name in sorted(unknown)}
        problems.append("labels not in the dataset (allow_new_labels adds them): " + ", ".join(
            f"{name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") for name, hint in hints.items()))
    return pd.Series(labels, index=corrections.index, dtype=object), sorted(set(warnings)), problems


def _crop_keys(ds: pd.DataFrame, dataset_folder: Mapping[str, str]) -> tuple[pd.Series, pd.Series]:
    """Each crop's dataset and image file as its export names it."""
    folder_to_dataset = {folder: name for name, folder in dataset_folder.items()}
    image = ds["path"].str.rsplit(CROP_MARK, n=1).str[0]
    folder, file = image.str.split("/", n=1).str[0], image.str.split("/", n=1).str[1]
    return folder.map(folder_to_dataset).fillna(folder), file


def apply_corrections(ds: pd.DataFrame, corrections: pd.DataFrame, dataset_folder: Mapping[str, str],
                      allow_new_labels: bool = False) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``classification_ds.csv`` rows with the corrections applied to every crop of a corrected image:
    relabelled, or dropped when the correct label is empty. A correction names its export (``dataset``) or
    prefixes the file with it (``<dataset>/<file>``); a bare file name that matches images of more than one
    export, two corrections that disagree about one crop, a label the dataset does not have (unless
    ``allow_new_labels``) or a label with a comma raise CorrectionsError. Case and spacing variants of a
    label are read as the dataset's spelling, with a warning. Returns the rows and a report: counts,
    ``warnings``, and ``applied`` / ``unmatched`` rows."""
    datasets, files = _crop_keys(ds, dataset_folder)
    rows_of: dict[tuple[str, str], list[int]] = {}
    for row, (d, f) in enumerate(zip(datasets, files)):
        rows_of.setdefault((d, f), []).append(row)
        rows_of.setdefault(("", f), []).append(row)
        rows_of.setdefault(("", f"{d}/{f}"), []).append(row)
    matches = [rows_of.get(key, []) for key in zip(corrections["dataset"], corrections["file"])]
    matched = corrections[[bool(rows) for rows in matches]]
    labels, warnings, problems = _correct_labels(matched, set(ds["label"]), allow_new_labels)
    assigned: dict[int, tuple[str, str]] = {}  # crop row -> (label, the correction's file)
    applied = []
    for rows, file, correct in zip([m for m in matches if m], matched["file"], labels):
        exports = sorted({datasets.iloc[r] for r in rows})
        if len(exports) > 1:
            problems.append(f"{file!r} matches images of {len(exports)} exports ({', '.join(exports[:5])}): "
                            "name its export (a dataset column, or dataset/file)")
            continue
        for row in rows:
            if row in assigned and assigned[row][0] != correct:
                problems.append(f"{assigned[row][1]!r} and {file!r} correct crop {ds['path'].iloc[row]!r} to "
                                f"{assigned[row][0] or '(drop)'!r} and {correct or '(drop)'!r}")
                break
            assigned[row] = (correct, file)
        applied.append({"dataset": exports[0], "file": file, "correct_label": correct, "crops": len(rows)})
    unmatched = corrections[[not rows for rows in matches]].reset_index(drop=True)
    if problems:
        shown = list(dict.fromkeys(problems))
        raise CorrectionsError(f"{len(shown)} problems: " + "; ".join(shown[:10]) +
                               ("; …" if len(shown) > 10 else ""))
    label, drop = ds["label"].copy(), np.zeros(len(ds), dtype=bool)
    for row, (correct, _) in assigned.items():
        if correct:
            label.iloc[row] = correct
        else:
            drop[row] = True
    before = ds["label"].to_numpy()
    relabeled = sum(1 for row, (correct, _) in assigned.items() if correct and before[row] != correct)
    out = ds.assign(label=label)[~drop].reset_index(drop=True)
    return out, {"corrections": len(corrections), "crops_relabeled": relabeled, "crops_dropped": int(drop.sum()),
                 "warnings": warnings, "applied": pd.DataFrame(applied, columns=[*CORRECTION_COLUMNS, "crops"]),
                 "unmatched": unmatched}
