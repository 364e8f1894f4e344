"""Classifications back into MegaDetector batch output for review in Timelapse, as the reference
``merge_classification_detection_output.py`` (with its known bugs fixed: confidences are rounded, not
truncated; the completion time has its time of day; a crop whose detection is missing is reported, not a
KeyError)."""

from __future__ import annotations

import copy
import difflib
import io
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from animl_assets.core.megadetector import LABEL_ID_OFFSET

CROP_MARK = "___crop"


def crop_source(crop: str) -> tuple[str, int]:
    """The image file and detection index a crop name ``<file>___cropNN_<detector>.jpg`` comes from."""
    file, mark, suffix = crop.rpartition(CROP_MARK)
    if not mark or not suffix[:2].isdigit():
        raise ValueError(f"{crop!r} is not a crop name (<file>___cropNN_<detector>.jpg)")
    return file, int(suffix[:2])


def classification_list(probs: np.ndarray, threshold: float, label_conf: float | None = None,
                        relative_conf: bool = False) -> list[list[Any]]:
    """``[[id_str, conf], …]`` for the categories at or above ``threshold``, by descending confidence,
    rounded to 4 decimals. With ``relative_conf`` each confidence is its margin over the labelled
    category's (``label_conf``), floored at 0, as the reference."""
    values = np.maximum(probs - label_conf, 0) if relative_conf and label_conf is not None else probs
    kept = [(str(i), round(float(v), 4)) for i, v in enumerate(values) if v >= threshold]
    return [list(item) for item in sorted(kept, key=lambda item: -item[1])]


def merge_classifications(md: Mapping[str, Any], outputs: pd.DataFrame, labels: Sequence[str], classifier: str, *,
                          threshold: float = 0.1, ground_truth: Mapping[str, str] | None = None,
                          label_pos: str | None = None, relative_conf: bool = False,
                          typical_threshold: float | None = None,
                          completed: datetime | None = None) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``md`` whose detections carry the ``classifications`` of their crops (``outputs``: a
    ``path`` column of crop names and one column per label), with ``classification_categories`` and
    ``info.classifier`` / ``classification_completion_time``. Detections without a crop (e.g. below the
    crop threshold) keep their place and get none. ``ground_truth`` (crop -> label) adds the labelled
    category (id + 1,000,000, ``label: <name>``) first or last (``label_pos``) and enables
    ``relative_conf``. Returns the merged output and the crops that matched no detection."""
    if label_pos not in (None, "first", "last"):
        raise ValueError("label_pos is None, 'first' or 'last'")
    if relative_conf and ground_truth is None:
        raise ValueError("relative_conf needs the ground-truth labels")
    merged = copy.deepcopy(dict(md))
    categories = {str(i): name for i, name in enumerate(labels)}
    if ground_truth is not None and label_pos is not None:
        categories |= {str(i + LABEL_ID_OFFSET): f"label: {name}" for i, name in enumerate(labels)}
    when = (completed or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M:%S")
    merged["info"] = {**merged.get("info", {}), "classifier": classifier, "classification_completion_time": when}
    if typical_threshold is not None:
        merged["info"]["classifier_metadata"] = {"typical_classification_threshold": typical_threshold}
    merged["classification_categories"] = categories
    images = {image["file"]: image for image in merged["images"]}
    index = {name: i for i, name in enumerate(labels)}
    probs = outputs[list(labels)].to_numpy(dtype=float)
    unmatched = []
    for row, crop in enumerate(outputs["path"]):
        file, detection = crop_source(crop)
        detections = (images.get(file) or {}).get("detections") or []
        if detection >= len(detections):
            unmatched.append(crop)
            continue
        label = (ground_truth or {}).get(crop)
        label_conf = probs[row, index[label]] if label in index else None
        result = classification_list(probs[row], threshold, label_conf, relative_conf and label is not None)
        if label in index and label_pos is not None:
            item = [str(index[label] + LABEL_ID_OFFSET), 1.0]
            result = [item, *result] if label_pos == "first" else [*result, item]
        detections[detection]["classifications"] = result
    return merged, unmatched


# ---- mislabeled candidates and corrections ----------------------------------------------------------------

def mislabeled_candidates(outputs: pd.DataFrame, labels: Sequence[str], margin: float = 0.95) -> pd.DataFrame:
    """Crops whose predicted label's confidence beats their labelled one's by ``margin`` or more (the
    reference ``identify_mislabeled_candidates.py``, which no longer runs on pandas 2): ``path, image,
    label, pred, pred_conf, label_conf``, most confident first."""
    probs = outputs[list(labels)].to_numpy(dtype=float)
    index = {name: i for i, name in enumerate(labels)}
    rows = np.arange(len(outputs))
    label_conf = probs[rows, outputs["label"].map(index).to_numpy(dtype=int)] if len(outputs) else np.array([])
    pred = probs.argmax(axis=1) if len(outputs) else np.array([], dtype=int)
    frame = pd.DataFrame({"path": outputs["path"], "image": outputs["path"].str.rsplit(CROP_MARK, n=1).str[0],
                          "label": outputs["label"], "pred": np.asarray(labels, dtype=object)[pred],
                          "pred_conf": probs.max(axis=1) if len(outputs) else [], "label_conf": label_conf})
    found = frame[frame["pred_conf"] >= frame["label_conf"] + margin]
    return found.sort_values("pred_conf", ascending=False).reset_index(drop=True)


TRUE = {"true", "1", "yes", "y", "x"}
CORRECTION_COLUMNS = ["dataset", "file", "correct_label"]


class CorrectionsError(ValueError):
    """Corrections that cannot be applied as they stand; the message lists the problems."""


def read_corrections(data: bytes, dataset: str = "") -> pd.DataFrame:
    """A corrections file as ``dataset, file, correct_label`` rows (an empty label: drop the image's crops).

    Either Timelapse's exported CSV (``File``, ``RelativePath``, a ``mislabeled`` flag and ``correct_class``;
    only flagged rows count; Timelapse files are per export, so ``dataset`` names it) or a plain
    ``file,correct_label`` list, optionally with a ``dataset`` (or ``export``) column. Raises ValueError for
    anything else."""
    frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    columns = {c.lower(): c for c in frame.columns}
    if "file" in columns and "correct_label" in columns:
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
