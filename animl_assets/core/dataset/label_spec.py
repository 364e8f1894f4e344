"""Label specifications: which (dataset, dataset class) pairs make each output label.

Two syntaxes, as MegaDetector's classification scripts define them. JSON, per output label::

    {"cervid": {"dataset_labels": {"idfg": ["deer", "elk"]},
                "taxa": [{"level": "family", "name": "cervidae", "datasets": ["idfg"]}],
                "exclude": {"dataset_labels": {...}, "taxa": [...]},
                "max_count": 50000,
                "prioritize": [["idfg"], ["wcs"]]}}

CSV (``output_label,type,content``; '#' comments): ``row`` (``dataset|class``), ``datasettaxon``
(``dataset|level|name``), a taxon level (content: the taxon name), ``max_count``, ``prioritize``
(a list of lists of datasets), and ``!label`` rows for exclusions. Taxa are resolved through a
taxonomy CSV (``dataset_name,query,taxonomy_string``, the lineage as MegaDetector's
camera_trap_taxonomy_mapping.csv writes it).
"""

from __future__ import annotations

import ast
import io
import json
from collections import defaultdict
from typing import Any, Iterable

import pandas as pd

DEFAULT_EXCLUDED = ("empty", "blank", "nothing", "none", "human", "person", "people", "vehicle", "car",
                    "truck", "unknown", "misfire", "start", "end", "setup")
SPEC_KEYS = {"dataset_labels", "taxa", "exclude", "max_count", "prioritize"}

Pair = tuple[str, str]


class LabelSpecError(ValueError):
    """A label specification that cannot be applied; the message lists every problem."""


def _literal(text: str, what: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as err:
        raise LabelSpecError(f"{what} {text!r} is not a Python/JSON literal: {err}") from err


def csv_to_spec(text: str) -> dict[str, dict[str, Any]]:
    """The JSON form of a CSV label specification."""
    frame = pd.read_csv(io.StringIO(text), comment="#", skip_blank_lines=True, dtype=str, keep_default_na=False,
                        skipinitialspace=True)
    if [c.strip() for c in frame.columns] != ["output_label", "type", "content"]:
        raise LabelSpecError(f"CSV label spec needs the columns output_label,type,content, not {list(frame.columns)}")
    spec: dict[str, dict[str, Any]] = defaultdict(dict)
    problems = []
    for line, (label, kind, content) in enumerate(frame.itertuples(index=False), start=2):
        label, kind, content = label.strip(), kind.strip(), content.strip()
        target = spec[label[1:]].setdefault("exclude", {}) if label.startswith("!") else spec[label]
        parts = content.split("|")
        if kind == "row":
            if len(parts) != 2:
                problems.append(f"row {line}: 'row' content must be dataset|class, not {content!r}")
                continue
            target.setdefault("dataset_labels", defaultdict(list))[parts[0]].append(parts[1])
        elif kind == "datasettaxon":
            if len(parts) != 3:
                problems.append(f"row {line}: 'datasettaxon' content must be dataset|level|name, not {content!r}")
                continue
            target.setdefault("taxa", []).append({"level": parts[1], "name": parts[2], "datasets": [parts[0]]})
        elif kind == "max_count":
            if not content.isdigit():
                problems.append(f"row {line}: max_count must be a whole number, not {content!r}")
                continue
            target["max_count"] = int(content)
        elif kind == "prioritize":
            target["prioritize"] = _literal(content, f"row {line}: prioritize")
        elif kind:
            target.setdefault("taxa", []).append({"level": kind, "name": content})
        else:
            problems.append(f"row {line}: empty type")
    if problems:
        raise LabelSpecError("; ".join(problems))
    return json.loads(json.dumps(spec))


def parse_label_spec(text: str, fmt: str) -> dict[str, dict[str, Any]]:
    """A label specification from JSON or CSV text (``fmt``: 'json' or 'csv'), checked for shape."""
    if fmt == "csv":
        spec = csv_to_spec(text)
    else:
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as err:
            raise LabelSpecError(f"label spec is not valid JSON: {err.msg} at line {err.lineno}") from err
    if not isinstance(spec, dict) or not spec:
        raise LabelSpecError("label spec must be a non-empty object of output label -> specification")
    problems = []
    for label, body in spec.items():
        if not isinstance(body, dict):
            problems.append(f"label {label!r}: specification must be an object")
            continue
        if unknown := set(body) - SPEC_KEYS:
            problems.append(f"label {label!r}: unknown keys {sorted(unknown)}")
        if "prioritize" in body:
            if "max_count" not in body:
                problems.append(f"label {label!r}: 'prioritize' needs 'max_count'")
            if not (isinstance(body["prioritize"], list) and all(isinstance(level, list) for level in body["prioritize"])):
                problems.append(f"label {label!r}: 'prioritize' must be a list of lists of datasets")
        if "max_count" in body and not (isinstance(body["max_count"], int) and body["max_count"] > 0):
            problems.append(f"label {label!r}: 'max_count' must be a positive integer")
    if problems:
        raise LabelSpecError("; ".join(problems))
    return spec


def parse_taxonomy(text: str) -> dict[Pair, set[tuple[str, str]]]:
    """(dataset, class) -> the set of (level, name) taxa in its lineage, from a taxonomy mapping CSV.

    ``taxonomy_string`` holds the lineage as a list of (id, level, name, common names) tuples,
    most specific first (a plain 'level:name|level:name' string is accepted too).
    """
    frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    missing = {"dataset_name", "query", "taxonomy_string"} - set(frame.columns)
    if missing:
        raise LabelSpecError(f"taxonomy CSV lacks the columns {sorted(missing)}")
    lineages: dict[Pair, set[tuple[str, str]]] = {}
    for row in frame.itertuples(index=False):
        text_lineage = row.taxonomy_string.strip()
        if not text_lineage:
            continue
        if text_lineage.startswith("["):
            taxa = {(str(t[1]).lower(), str(t[2]).lower()) for t in _literal(text_lineage, "taxonomy_string")}
        else:
            taxa = {tuple(part.lower().split(":", 1)) for part in text_lineage.split("|") if ":" in part}
        lineages[(row.dataset_name, row.query.lower())] = taxa
    return lineages


def _matches(body: dict[str, Any], classes: set[Pair], taxonomy: dict[Pair, set[tuple[str, str]]] | None,
             label: str, problems: list[str]) -> set[Pair]:
    found: set[Pair] = set()
    for dataset, names in body.get("dataset_labels", {}).items():
        for name in names:
            if (dataset, name) in classes:
                found.add((dataset, name))
            else:
                problems.append(f"label {label!r}: class {name!r} of dataset {dataset!r} is not in the data")
    for taxon in body.get("taxa", []):
        if taxonomy is None:
            problems.append(f"label {label!r}: taxon {taxon.get('level')}:{taxon.get('name')} needs a taxonomy CSV")
            continue
        key = (str(taxon.get("level", "")).lower(), str(taxon.get("name", "")).lower())
        datasets = taxon.get("datasets")
        hits = {(d, c) for d, c in classes if key in taxonomy.get((d, c.lower()), set())
                and (datasets is None or d in datasets)}
        if not hits:
            problems.append(f"label {label!r}: taxon {key[0]}:{key[1]} matches no class in the data")
        found |= hits
    return found


def resolve_label_spec(spec: dict[str, dict[str, Any]], classes: Iterable[Pair],
                       taxonomy: dict[Pair, set[tuple[str, str]]] | None = None) -> dict[Pair, str]:
    """Map each (dataset, dataset class) to its output label; raise LabelSpecError naming every
    unknown class, unmatched taxon, label that matches nothing and class claimed by two labels."""
    classes = set(classes)
    problems: list[str] = []
    owner: dict[Pair, str] = {}
    for label, body in spec.items():
        included = _matches(body, classes, taxonomy, label, problems)
        # exclusions may name classes these exports lack: nothing to take away, nothing to report
        included -= _matches(body.get("exclude", {}), classes, taxonomy, f"!{label}", [])
        if not included:
            problems.append(f"label {label!r} matches no class in the data")
        for pair in sorted(included):
            if pair in owner:
                problems.append(f"class {pair[1]!r} of dataset {pair[0]!r} is claimed by both "
                                f"{owner[pair]!r} and {label!r}")
            else:
                owner[pair] = label
    if problems:
        raise LabelSpecError("label spec problems: " + "; ".join(problems))
    return owner


def default_label_mapping(classes: Iterable[Pair], excluded: Iterable[str] = DEFAULT_EXCLUDED) -> dict[Pair, str]:
    """No spec: every class is its own label (lower-cased, each run of spaces as one '_': ``Mule Deer`` and
    ``mule  deer`` are one label), empty/human/vehicle-like left out."""
    skip = {" ".join(name.split()).lower() for name in excluded}
    return {(dataset, name): "_".join(name.split()).lower()
            for dataset, name in classes if " ".join(name.split()).lower() not in skip}


def merged_spellings(mapping: dict[Pair, str]) -> dict[str, list[str]]:
    """The labels that several differently written class names map to (within or across exports), with those
    names: what a user should know was merged."""
    names: dict[str, set[str]] = {}
    for (_, name), label in mapping.items():
        names.setdefault(label, set()).add(name)
    return {label: sorted(spellings) for label, spellings in sorted(names.items()) if len(spellings) > 1}


def check_writable(labels: Iterable[str]) -> None:
    """Raise LabelSpecError for output labels ``classification_ds.csv`` cannot hold: it joins a crop's labels
    with commas, so a label with one would read back as two."""
    bad = sorted({label for label in labels if "," in label})
    if bad:
        raise LabelSpecError(f"labels with a comma cannot be written to classification_ds.csv (it joins labels with "
                             f"commas): {bad}; map those classes to other names with a label spec")
