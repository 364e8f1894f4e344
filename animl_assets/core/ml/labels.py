"""Label names: a ``label_index.json`` in label-id order, and another model's labels mapped onto ours (the
reference's MegaClassifier comparison), with no PyTorch import."""

from __future__ import annotations

from typing import Mapping, Sequence

OTHER = "other"


def label_names(label_index: Mapping[str, str]) -> list[str]:
    """Label names in label-id order, from a ``label_index.json`` mapping."""
    return [label_index[str(i)] for i in range(len(label_index))]


def remapped_label_index(columns: Sequence[str]) -> dict[str, str]:
    """The label index of a (mapped) classifier output: ``{"0": name, …}`` in column order."""
    return {str(i): name for i, name in enumerate(columns)}


def target_columns(model_labels: Sequence[str], targets: Sequence[str],
                   mapping: Mapping[str, Sequence[str]] | None = None) -> tuple[list[str], list[list[int]]]:
    """The output label names and, for each, the model's columns whose probabilities add up to it.

    Without ``mapping`` a model label counts for the target of the same name. Model labels that map to
    no target go to ``other`` (appended when ``targets`` lack it), as the reference's MegaClassifier
    comparison does. Raises ValueError on a mapping naming labels the model does not have."""
    index = {name: i for i, name in enumerate(model_labels)}
    mapping = {t: [t] for t in targets if t in index} if mapping is None else dict(mapping)
    unknown = sorted({name for names in mapping.values() for name in names} - set(index))
    if unknown:
        raise ValueError(f"the target mapping names labels the model does not have: {unknown[:10]}")
    names = list(targets)
    columns = [[index[n] for n in mapping.get(t, ())] for t in names]
    unmapped = sorted(set(range(len(model_labels))) - {c for cols in columns for c in cols})
    if unmapped:
        if OTHER not in names:
            names.append(OTHER)
            columns.append([])
        columns[names.index(OTHER)] += unmapped
    return names, columns
