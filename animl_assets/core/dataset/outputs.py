"""Extra outputs of a multi-output model (Panthera / Snapshot Safari style): annotation fields beyond the
species, such as ``count``, ``standing`` or ``young_present``, as one class label per crop. Counts are binned
(``1, 2, 3-5, 6+``), flags read as ``yes``/``no`` (a volunteers' fraction counts as yes from 0.5), other
fields mapped or taken as they are. A missing or unreadable value stays missing (``""`` in
``classification_ds.csv``): it is left out of that output's loss and metrics, never made a class."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

SPECIES = "species"  # the first output: the dataset's ``label`` column, indexed by ``label_index.json``
COUNT_BINS = (1, 2, 3, 6)  # lower bounds: 1, 2, 3-5, 6+
YES, NO = "yes", "no"
MISSING = ""
FLAG_WORDS = {"true": YES, "yes": YES, "y": YES, "1": YES, "false": NO, "no": NO, "n": NO, "0": NO}
COUNT_NAMES = ("count", "counts", "number", "n_animals")


class OutputSpecError(ValueError):
    """Outputs that cannot be made from the export: the message names each problem."""


@dataclass(frozen=True)
class OutputSpec:
    """How one annotation field becomes an output's classes: ``bins`` (numeric lower bounds), ``values``
    (raw value, lower-cased, to class) or, with neither, the value itself (a flag's read as yes/no)."""

    name: str
    kind: str  # "bins", "flag" or "category"
    bins: tuple[int, ...] = ()
    values: Mapping[str, str] = field(default_factory=dict)

    @property
    def classes(self) -> list[str] | None:
        """The classes in index order, where the spec fixes them (bins, flags); None: those seen, sorted."""
        if self.kind == "bins":
            return bin_names(self.bins)
        if self.kind == "flag":
            return [NO, YES]
        return sorted(set(self.values.values())) if self.values else None

    def classify(self, raw: Any) -> str:
        """The class of one raw annotation value, or MISSING."""
        if raw is None or (isinstance(raw, float) and math.isnan(raw)) or str(raw).strip() == "":
            return MISSING
        text = str(raw).strip().lower()
        if self.kind == "bins":
            number = _lower_bound(text)
            return MISSING if number is None or number < self.bins[0] else _bin_of(number, self.bins)
        if self.values:
            return self.values.get(text, MISSING)
        if self.kind == "flag":
            if text in FLAG_WORDS:
                return FLAG_WORDS[text]
            number = _number(text)
            return MISSING if number is None or not 0 <= number <= 1 else YES if number >= 0.5 else NO
        return text


def bin_names(bins: Sequence[int]) -> list[str]:
    """Class names of numeric bins by their lower bounds: (1, 2, 3, 6) -> 1, 2, 3-5, 6+."""
    names = []
    for low, high in zip(bins, [*bins[1:], None]):
        names.append(f"{low}+" if high is None else str(low) if high == low + 1 else f"{low}-{high - 1}")
    return names


def _bin_of(number: float, bins: Sequence[int]) -> str:
    names = bin_names(bins)
    return next(name for low, name in zip(reversed(bins), reversed(names)) if number >= low)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _lower_bound(text: str) -> float | None:
    """A count as exports write it: ``3``, ``3.0``, ``11-50`` (its lower end) or ``51+``."""
    return _number(text.rstrip("+").split("-")[0].strip()) if text and text[0].isdigit() else _number(text)


def parse_outputs(outputs: Sequence[str], bins: Mapping[str, Sequence[int]] | None = None,
                  values: Mapping[str, Mapping[str, str]] | None = None,
                  seen: Mapping[str, Iterable[Any]] | None = None) -> list[OutputSpec]:
    """The extra outputs' specs (``species`` is always the first output and needs none). A count-like field
    (``count``) is binned ``1, 2, 3-5, 6+`` unless ``bins`` says otherwise; a field whose ``seen`` values are all
    flag-like is a yes/no flag; ``values`` maps raw values to classes. Raises OutputSpecError."""
    bins, values, seen = dict(bins or {}), dict(values or {}), dict(seen or {})
    problems, specs = [], []
    extra = [name for name in outputs if name != SPECIES]
    if len(set(extra)) != len(extra):
        problems.append(f"an output is named twice: {list(outputs)}")
    for name in sorted((set(bins) | set(values)) - set(extra)):
        problems.append(f"output_bins/output_values name {name!r}, which is not in outputs")
    for name in dict.fromkeys(extra):
        if name in bins:
            edges = tuple(int(b) for b in bins[name])
            if not edges or list(edges) != sorted(set(edges)) or edges[0] < 0:
                problems.append(f"output {name!r}: bins must be increasing lower bounds, not {list(edges)}")
                continue
            specs.append(OutputSpec(name, "bins", edges))
        elif name in values:
            specs.append(OutputSpec(name, "category", values={str(k).strip().lower(): str(v)
                                                              for k, v in values[name].items()}))
        elif name.lower() in COUNT_NAMES:
            specs.append(OutputSpec(name, "bins", COUNT_BINS))
        else:
            specs.append(OutputSpec(name, "flag" if _flag_like(seen.get(name, ())) else "category"))
    if problems:
        raise OutputSpecError("; ".join(problems))
    return specs


def _flag_like(raw_values: Iterable[Any]) -> bool:
    texts = {str(v).strip().lower() for v in raw_values if v is not None and str(v).strip() != ""}
    return bool(texts) and all(t in FLAG_WORDS or ((n := _number(t)) is not None and 0 <= n <= 1) for t in texts)


def annotation_fields(export: Mapping[str, Any], names: Sequence[str]) -> pd.DataFrame:
    """One row per annotation of a COCO Camera Traps export: ``image`` (file name), ``dataset_class`` (its
    category's name) and the raw value of each field in ``names`` (None where it lacks one)."""
    files = {image["id"]: image["file_name"] for image in export.get("images", [])}
    categories = {c["id"]: str(c["name"]) for c in export.get("categories", [])}
    rows = [{"image": files.get(a.get("image_id")), "dataset_class": categories.get(a.get("category_id"), ""),
             **{name: a.get(name) for name in names}} for a in export.get("annotations", [])]
    return pd.DataFrame(rows, columns=["image", "dataset_class", *names]).dropna(subset=["image"])


def csv_fields(data: bytes, names: Sequence[str], classes: pd.DataFrame) -> pd.DataFrame:
    """``annotation_fields``' rows from a CSV beside an export: ``file`` (or ``image``), optionally ``class``, and
    a column per field in ``names``. Rows without a class hold for every class of their image in ``classes``
    (``image, dataset_class``: the export's crops). Raises OutputSpecError naming missing columns."""
    from animl_assets.core.tables import read_csv

    frame = read_csv(data).rename(columns={"file": "image", "class": "dataset_class"})
    missing = sorted({"image", *names} - set(frame.columns))
    if missing:
        raise OutputSpecError(f"the outputs CSV lacks the columns {missing} (it has {list(frame.columns)})")
    frame = frame.astype({"image": str}).astype({name: object for name in names})
    frame = frame.where(frame.notna(), None)
    if "dataset_class" not in frame:
        pairs = classes[["image", "dataset_class"]].astype(str).drop_duplicates()
        frame = frame.merge(pairs, on="image", how="inner")
    return frame[["image", "dataset_class", *names]]


def crop_outputs(rows: pd.DataFrame, fields: pd.DataFrame, specs: Sequence[OutputSpec]
                 ) -> tuple[pd.DataFrame, dict[str, dict[str, int]]]:
    """``rows`` (with ``image`` and ``dataset_class``) with one column per extra output: the class of its
    image's annotation of that class. Annotations of one image and class that disagree make the value
    missing. Returns the rows and, per output, how many crops are missing and why."""
    out, report = rows.copy(), {}
    keys = pd.MultiIndex.from_arrays([rows["image"].astype(str), rows["dataset_class"].astype(str)])
    for spec in specs:
        classes = fields.assign(value=fields[spec.name].map(spec.classify)) if len(fields) else \
            fields.assign(value=pd.Series(dtype=str))
        read = classes[classes["value"] != MISSING]
        agreed = read.groupby(["image", "dataset_class"])["value"].agg(
            lambda v: v.iloc[0] if v.nunique() == 1 else None)
        conflicting = set(agreed.index[agreed.isna()])
        values = pd.Series(agreed.reindex(keys).to_numpy(), index=rows.index).fillna(MISSING)
        out[spec.name] = values.astype(str)
        disagree = sum(key in conflicting for key in keys)
        report[spec.name] = {"missing": int((values == MISSING).sum()) - disagree, "conflicting": disagree}
    return out, report


def output_values(column: pd.Series) -> pd.Series:
    """An extra output's column as class names, however the CSV reader typed it (``2.0`` is ``2``, an empty
    cell MISSING)."""
    def text(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return MISSING
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    return column.map(text).astype(str)


def output_index(ds: pd.DataFrame, specs: Sequence[OutputSpec]) -> dict[str, dict[str, str]]:
    """Each extra output's index (``{"0": class, …}``, as ``label_index.json``): the spec's classes in their
    order where it fixes them, else the classes the dataset holds, sorted."""
    index = {}
    for spec in specs:
        present = set(output_values(ds[spec.name])) - {MISSING} if spec.name in ds else set()
        classes = spec.classes or sorted(present)
        index[spec.name] = {str(i): name for i, name in enumerate(classes)}
    return index


def output_counts(ds: pd.DataFrame, index: Mapping[str, Mapping[str, str]]) -> pd.DataFrame:
    """Crops per class of each extra output (``output, class, crops``), missing values counted as ``(missing)``."""
    rows = []
    for name, classes in index.items():
        counts = output_values(ds[name]).value_counts()
        rows += [{"output": name, "class": c, "crops": int(counts.get(c, 0))} for c in classes.values()]
        rows.append({"output": name, "class": "(missing)", "crops": int(counts.get(MISSING, 0))})
    return pd.DataFrame(rows, columns=["output", "class", "crops"])
