"""Transfer: a trained model's heads rewritten for another dataset's classes, by name and through a class-mapping
JSON (``{new_class: [old classes]}``, as Panthera's ``-class_mapping_json``), so that fine-tuning on other exports
with the same outputs starts from what the model knows instead of a new head.

A new class takes its old classes' rows: the mean of their weights, and the log-sum-exp of their biases (so a
class made of several starts with their summed prior). A class named in no mapping keeps the old class of the
same name; one with neither starts at zero (no evidence either way). The body's weights are untouched."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from animl_assets.core.ml.labels import label_names
from animl_assets.core.ml.models import build_model, head

SPECIES = "species"


class ClassMappingError(ValueError):
    """A class mapping that does not fit the model or the dataset; the message names each problem."""


def parse_class_mapping(mapping: Mapping[str, Any], outputs: Sequence[str] = ()) -> dict[str, dict[str, list[str]]]:
    """``{output: {new_class: [old classes]}}`` from a class-mapping JSON: ``{new_class: [old classes]}`` maps the
    species, ``{"species": {...}, "<output>": {...}}`` any of the outputs."""
    if mapping and all(isinstance(v, list) for v in mapping.values()):
        mapping = {SPECIES: mapping}
    problems = [f"{name!r} is neither species nor an output ({', '.join([SPECIES, *outputs])})"
                for name in mapping if name not in (SPECIES, *outputs)]
    for name, classes in mapping.items():
        if not isinstance(classes, Mapping) or not all(isinstance(v, list) and all(isinstance(c, str) for c in v)
                                                       for v in classes.values()):
            problems.append(f"{name!r}: expected {{new_class: [old classes]}}")
    if problems:
        raise ClassMappingError("class mapping: " + "; ".join(problems))
    return {name: {new: list(old) for new, old in classes.items()} for name, classes in mapping.items()}


def mapped_rows(weight: torch.Tensor, bias: torch.Tensor, old: Sequence[str], new: Sequence[str],
                mapping: Mapping[str, Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[str]]]:
    """A head's weight and bias rows for the ``new`` classes from those of the ``old`` ones; and, per new class,
    the old classes it starts from (``[]``: from zero)."""
    index = {name: i for i, name in enumerate(old)}
    unknown = sorted({c for sources in mapping.values() for c in sources} - set(index))
    extra = sorted(set(mapping) - set(new))
    if unknown or extra:
        raise ClassMappingError("class mapping: " + "; ".join(
            ([f"old classes the model does not have: {unknown}"] if unknown else [])
            + ([f"new classes the dataset does not have: {extra}"] if extra else [])))
    rows, biases, sources = [], [], {}
    for name in new:
        found = list(mapping.get(name, [name] if name in index else []))
        sources[name] = found
        picked = [index[c] for c in found]
        rows.append(weight[picked].mean(dim=0) if picked else torch.zeros_like(weight[0]))
        biases.append(torch.logsumexp(bias[picked], dim=0) if picked else torch.zeros_like(bias[0]))
    return torch.stack(rows), torch.stack(biases), sources


def _species_head_keys(model_name: str, num_classes: int, image_size: int | None) -> tuple[str, str]:
    model = build_model(model_name, num_classes, image_size=image_size)
    layer = head(model)
    prefix = next(name for name, module in model.named_modules() if module is layer)
    return f"{prefix}.weight", f"{prefix}.bias"


def transfer_checkpoint(checkpoint: Mapping[str, Any], model_name: str, image_size: int | None,
                        old_index: Mapping[str, str], new_index: Mapping[str, str],
                        old_outputs: Mapping[str, Mapping[str, str]], new_outputs: Mapping[str, Mapping[str, str]],
                        mapping: Mapping[str, Mapping[str, Sequence[str]]] | None = None
                        ) -> tuple[dict[str, Any], dict[str, dict[str, list[str]]]]:
    """``checkpoint`` with its species head (and a multi-output model's heads) rewritten for the new dataset's
    classes (``mapped_rows``); extra outputs the checkpoint lacks are left out (their heads start new). Returns
    the checkpoint and, per output, where each new class starts from."""
    mapping = dict(mapping or {})
    weights = {k.removeprefix("module."): v for k, v in checkpoint["model"].items()}
    weight_key, bias_key = _species_head_keys(model_name, len(old_index), image_size)
    weights[weight_key], weights[bias_key], species = mapped_rows(
        weights[weight_key], weights[bias_key], label_names(old_index), label_names(new_index),
        mapping.get(SPECIES, {}))
    report, heads, sizes = {SPECIES: species}, {}, {}
    old_heads = checkpoint.get("heads") or {}
    for name, classes in new_outputs.items():
        if name not in old_outputs or f"{name}.weight" not in old_heads:
            continue
        w, b, report[name] = mapped_rows(old_heads[f"{name}.weight"], old_heads[f"{name}.bias"],
                                         label_names(old_outputs[name]), label_names(classes), mapping.get(name, {}))
        heads |= {f"{name}.weight": w, f"{name}.bias": b}
        sizes[name] = len(classes)
    unused = sorted(set(mapping) - set(report))
    if unused:
        raise ClassMappingError(f"class mapping names outputs the model and the dataset do not share: {unused}")
    return {"model": weights, "heads": heads, "outputs": sizes}, report
