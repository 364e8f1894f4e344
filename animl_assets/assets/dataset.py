"""``classification_dataset`` and ``splits``: one dataset version across exports, split by location."""

import hashlib
import json
from typing import Any, Iterator, Literal

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from animl_assets.assets.artifacts import (
    image_metadata,
    location,
    stage_asset,
    stop,
    table,
    table_schema,
)
from animl_assets.assets.exports import export_sequences, exports_partitions
from animl_assets.core.artifact_files import value_version
from animl_assets.core.dataset.classification import (
    CROP_COLUMNS,
    OWN_BOX,
    DatasetVersion,
    build_classification_dataset,
    label_index,
    match_test,
)
from animl_assets.core.dataset.label_spec import (
    DEFAULT_EXCLUDED,
    LabelSpecError,
    check_writable,
    default_label_mapping,
    merged_spellings,
    parse_label_spec,
    parse_taxonomy,
    resolve_label_spec,
)
from animl_assets.core.dataset.outputs import (
    SPECIES,
    OutputSpec,
    OutputSpecError,
    annotation_fields,
    crop_outputs,
    csv_fields,
    output_counts,
    output_index,
    parse_outputs,
)
from animl_assets.core.dataset.splits import (
    check_splits,
    linked_locations,
    make_splits,
    prioritize_by_label,
    split_score,
    split_table,
)
from animl_assets.core.detect.contact_sheet import contact_sheet
from animl_assets.core.detect.crops import CropManifest
from animl_assets.core.detect.megadetector import Detections, unreviewed_boxes, with_box_labels
from animl_assets.core.ingest.cct import UNKNOWN_LOCATION, ExportArtifacts, image_location
from animl_assets.core.layout import artifact_key, partition_folder, version_folder
from animl_assets.core.review.corrections import CorrectionsError, apply_corrections, read_corrections
from animl_assets.core.tables import read_csv as read_table
from animl_assets.resources.storage import ArtifactStore, read_uri

DATASET_CSV = "classification_ds.csv"
SAMPLE_GRID = "sample_grid.png"
READ_METADATA = "exports_read"  # {partition: {crops: data version, cct_export: sha256}}: the lineage


class DatasetConfig(dg.Config):
    """Which crops make the dataset and how they are labelled."""

    exports: list[str] = Field(default=[], description="Export partitions to include; empty: every export "
                                                       "whose crops are materialized.")
    label_spec: str = Field(default="", description="Label spec file (.json or .csv; path or s3:// URI). "
                                                    "Empty: each export category is its own label.")
    taxonomy_csv: str = Field(default="", description="Taxonomy mapping CSV for 'taxa' in the spec.")
    excluded_classes: list[str] = Field(default=list(DEFAULT_EXCLUDED),
                                        description="Classes left out when there is no spec.")
    threshold: float = Field(default=0.0, ge=0, le=1, description="Minimum detection confidence of a crop.")
    min_locs: int = Field(default=0, ge=0, description="Drop labels seen at fewer (dataset, location) pairs.")
    one_label_per_image: bool = True
    ground_truth: Literal["reviewed", "all"] = Field(
        default="reviewed", description="reviewed: an export's boxes marked validated: false (a model's guess no "
                                        "person reviewed) are left out, counted per label; all: they are labels too.")
    seed: int = 0
    match_test_csv: str = Field(default="", description="An earlier classification_ds.csv whose test-split "
                                                        "crops are appended (with match_test_splits).")
    match_test_splits: str = ""
    min_crops_per_label: int = Field(default=10, ge=1, description="The enough_labels_to_train check needs at "
                                                                   "least two labels with this many crops.")
    corrections: str = Field(default="", description="Reviewed labels (path or s3:// URI): a dataset,file,"
                             "correct_label list (dataset: the export partition; or file as <dataset>/<file>). "
                             "Relabels every crop of a listed image, or drops them when the correct label is "
                             "empty. A bare file name that matches images of two exports is refused.")
    export_corrections: dict[str, str] = Field(default={}, description="Reviewed labels per export: {partition: "
                                               "path or s3:// URI} of Timelapse's CSV (mislabeled, correct_class) "
                                               "or a file,correct_label list, for that export's images only.")
    allow_new_labels: bool = Field(default=False, description="Let corrections name labels the dataset does not "
                                   "have yet (by default an unknown label, such as a typo, is refused).")
    outputs: list[str] = Field(default=[], description="A multi-output model's outputs: species (always first) and "
                               "annotation fields of the exports, e.g. [species, count, standing, resting, moving, "
                               "eating, interacting, young_present]. Each extra output is a column of "
                               "classification_ds.csv with its own label_index_<output>.json; a missing value is "
                               "left out of that output's loss, never a class.")
    output_bins: dict[str, list[int]] = Field(default={}, description="Numeric outputs binned by lower bounds "
                                              "(count's default [1, 2, 3, 6]: 1, 2, 3-5, 6+).")
    outputs_csv: dict[str, str] = Field(default={}, description="Per export {partition: path or s3:// URI}: a CSV "
                                        "of the outputs' values (file, optional class, one column per output) read "
                                        "instead of that export's annotation fields.")
    output_values: dict[str, dict[str, str]] = Field(default={}, description="Outputs mapped value by value "
                                                     "({output: {raw value: class}}); values not listed are missing. "
                                                     "Flag-like fields are yes/no without one.")


def _read_text(uri: str, storage: ArtifactStore) -> str:
    return read_uri(uri, storage.s3).decode()


def _corrections(context: dg.AssetExecutionContext, config: DatasetConfig, storage: ArtifactStore,
                 ds: pd.DataFrame, ready: list[str]) -> tuple[dict, dict[str, pd.DataFrame]]:
    """The dataset with the configured corrections applied (under ``dataset``), a summary for the event log
    (files, counts, the first unmatched rows) and the full tables of applied and unmatched rows."""
    sources = ([("", config.corrections)] if config.corrections else []) + sorted(config.export_corrections.items())
    if not sources:
        return {}, {}
    unknown = sorted(set(config.export_corrections) - set(ready))
    if unknown:
        raise stop(f"export_corrections names exports that are not in the dataset: {unknown}")
    frames, files = [], []
    for export, uri in sources:
        data = read_uri(uri, storage.s3)
        try:
            frames.append(read_corrections(data, dataset=export))
        except ValueError as err:
            raise stop(f"corrections {uri}: {err}") from err
        files.append({"uri": uri, "export": export, "sha256": hashlib.sha256(data).hexdigest()})
    try:
        out, report = apply_corrections(ds, pd.concat(frames, ignore_index=True),
                                        {p: partition_folder(p) for p in ready}, config.allow_new_labels)
    except CorrectionsError as err:
        raise stop(f"corrections: {err}") from err
    for warning in report["warnings"]:
        context.log.warning(f"corrections: {warning}")
    unmatched = report["unmatched"]
    if len(unmatched):
        context.log.warning(f"{len(unmatched)} corrections match no crop of the dataset")
    summary = {"dataset": out, "files": files, **{k: report[k] for k in ("corrections", "crops_relabeled",
                                                                          "crops_dropped")},
               "warnings": report["warnings"][:20], "num_unmatched": len(unmatched),
               "unmatched_first": unmatched.head(20).to_dict("records")}
    return summary, {"corrections_applied.csv": report["applied"], "corrections_unmatched.csv": unmatched}


def _correction_files(store, folder: str, tables: dict[str, pd.DataFrame]) -> dict[str, dg.MetadataValue]:
    """The corrections' full tables as artifacts beside the dataset version (the event log has a summary)."""
    for name, frame in tables.items():
        store.write_bytes(f"{folder}/{name}", frame.to_csv(index=False).encode())
    return {f"{name.removesuffix('.csv')}_path": location(store.uri(f"{folder}/{name}")) for name in tables}


def _among(rows: pd.DataFrame, boxes: pd.DataFrame) -> np.ndarray:
    """Which of ``rows`` are one of ``boxes`` (both with ``file`` and ``detection_index``)."""
    keys = ["file", "detection_index"]
    return pd.MultiIndex.from_frame(rows[keys].astype({"detection_index": int})).isin(
        pd.MultiIndex.from_frame(boxes[keys].astype({"detection_index": int})))


def _crop_rows(partition: str, crops: CropManifest, detections: Detections, export: ExportArtifacts,
               reviewed_only: bool) -> tuple[pd.DataFrame, dict[str, str], dict[str, int]]:
    """CROP_COLUMNS rows for one export's crops, with its class and location per crop; the versions read
    (the crops' data version, the export file's SHA-256), for the dataset's lineage; and with
    ``reviewed_only``, the crops of unreviewed boxes left out, counted per label."""
    locations = {image["file_name"]: image_location(image) for image in export.export["images"]}
    rows = with_box_labels(crops.manifest, detections.labels)
    unreviewed: dict[str, int] = {}
    if reviewed_only:
        left_out = _among(rows, unreviewed_boxes(export.export, detections.md))
        unreviewed = {str(k): int(v) for k, v in rows.loc[left_out, "label"].value_counts().items()}
        rows = rows[~left_out]
    own_box = _among(rows, detections.labels[detections.labels["source"] == "ground_truth"])
    frame = pd.DataFrame({
        "path": partition_folder(partition) + "/" + rows["crop"].astype(str), "dataset": partition,
        "location": rows["file"].map(locations).fillna(UNKNOWN_LOCATION),
        "dataset_class": rows["label"].astype(str), "confidence": rows["conf"].astype(float),
        "image": rows["file"], OWN_BOX: own_box,
    }, columns=[*CROP_COLUMNS, OWN_BOX])
    return frame, {"crops": value_version(crops, "crops"), "cct_export": export.source["sha256"]}, unreviewed


def _with_outputs(config: DatasetConfig, frame: pd.DataFrame, cct_export: dict[str, ExportArtifacts],
                  ready: list[str], storage: ArtifactStore) -> tuple[pd.DataFrame, list[OutputSpec], dict[str, Any]]:
    """The crop rows with a column per extra output, read from each export's annotations (or the CSV beside
    it, ``outputs_csv``); the outputs' specs and, per output, the crops whose value is missing or conflicting."""
    names = [name for name in config.outputs if name != SPECIES]
    if not names:
        return frame, [], {}
    if unknown := sorted(set(config.outputs_csv) - set(ready)):
        raise stop(f"outputs_csv names exports that are not in the dataset: {unknown}")
    try:
        fields = {p: csv_fields(read_uri(config.outputs_csv[p], storage.s3), names, frame[frame["dataset"] == p])
                  if p in config.outputs_csv else annotation_fields(cct_export[p].export, names) for p in ready}
    except (OutputSpecError, OSError) as err:
        raise stop(f"outputs_csv: {err}") from err
    seen = {name: pd.concat([f[name] for f in fields.values()]).tolist() for name in names}
    try:
        specs = parse_outputs(config.outputs, config.output_bins, config.output_values, seen)
    except OutputSpecError as err:
        raise stop(f"outputs: {err}") from err
    absent = [name for name in names if not any(v is not None for v in seen[name])]
    if absent:
        raise stop(f"outputs: no annotation of {ready} has the fields {absent}")
    parts, report = [], {}
    for partition in ready:
        rows, missing = crop_outputs(frame[frame["dataset"] == partition], fields[partition], specs)
        parts.append(rows)
        report[partition] = missing
    return pd.concat(parts).sort_index(), specs, report


def _label_mapping(config: DatasetConfig, storage: ArtifactStore, classes: set[tuple[str, str]]
                   ) -> tuple[dict[str, Any] | None, dict[tuple[str, str], str]]:
    """The label spec (None without one) and each (dataset, class) pair's label."""
    spec = None
    try:
        if config.label_spec:
            fmt = "csv" if config.label_spec.lower().endswith(".csv") else "json"
            spec = parse_label_spec(_read_text(config.label_spec, storage), fmt)
            taxonomy = parse_taxonomy(_read_text(config.taxonomy_csv, storage)) if config.taxonomy_csv else None
            mapping = resolve_label_spec(spec, classes, taxonomy)
        else:
            mapping = default_label_mapping(classes, config.excluded_classes)
        check_writable(mapping.values())
    except (LabelSpecError, FileNotFoundError) as err:
        raise stop(f"label spec: {err}") from err
    return spec, mapping


def _report_label_merges(context: dg.AssetExecutionContext, unreviewed: dict[str, dict[str, int]],
                         merged: dict[str, list[str]]) -> dict[str, list[str]]:
    """Log the crops of unreviewed boxes left out and the class names merged into one label; returns ``merged``
    (a label spec's merges are the user's own and are not reported)."""
    if unreviewed:
        context.log.info(f"crops of boxes no person reviewed, left out (ground_truth: reviewed): {unreviewed}")
    if merged:
        context.log.warning(f"class names that differ only in case or spacing are one label: {merged}")
    return merged


def _per_label(ds: pd.DataFrame) -> pd.DataFrame:
    """Crops, exports and locations per label."""
    return pd.DataFrame({
        "crops": ds.groupby("label").size(),
        "datasets": ds.groupby("label")["dataset"].nunique(),
        "locations": ds.drop_duplicates(["label", "dataset", "location"]).groupby("label").size(),
    }).reset_index(names="label")


def _outputs_metadata(dataset: DatasetVersion, missing: dict[str, Any]) -> dict[str, Any]:
    """A multi-output dataset's outputs, crops per class of each, and the crops whose value is missing."""
    if not dataset.output_index:
        return {}
    return {"outputs": dg.MetadataValue.json([SPECIES, *dataset.output_index]),
            "crops_per_output_class": table(output_counts(dataset.classification_ds, dataset.output_index)),
            "outputs_missing": dg.MetadataValue.json(missing)}


@stage_asset(group_name="dataset", kinds={"csv"},
             check_specs=[dg.AssetCheckSpec("enough_labels_to_train", asset="classification_dataset", blocking=True,
                                            description="At least two labels have min_crops_per_label crops.")])
def classification_dataset(context: dg.AssetExecutionContext, config: DatasetConfig, crops: dict[str, CropManifest],
                           md_detections: dict[str, Detections], cct_export: dict[str, ExportArtifacts],
                           storage: ArtifactStore) -> Iterator[dg.Output | dg.AssetCheckResult]:
    """``classification_ds.csv`` + ``label_index.json`` over the crops of the chosen exports (each export a
    dataset), labelled by the label spec; every crop left out is counted by reason."""
    store = storage.store()
    registered = context.instance.get_dynamic_partitions(exports_partitions.name)
    wanted = config.exports or registered
    unknown = sorted(set(wanted) - set(registered))
    if unknown:
        raise stop(f"not registered exports: {unknown}")
    ready = [p for p in wanted if p in crops and p in md_detections and p in cct_export]
    if not ready:
        raise stop(f"no crops materialized yet for {wanted or 'any export'}: materialize crops first")
    skipped = sorted(set(wanted) - set(ready))
    per_export = {p: _crop_rows(p, crops[p], md_detections[p], cct_export[p], config.ground_truth == "reviewed")
                  for p in ready}
    frame = pd.concat([rows for rows, _, _ in per_export.values()], ignore_index=True)
    frame, output_specs, outputs_missing = _with_outputs(config, frame, cct_export, ready, storage)
    unreviewed = {p: left_out for p, (_, _, left_out) in per_export.items() if left_out}
    spec, mapping = _label_mapping(config, storage, set(zip(frame["dataset"], frame["dataset_class"]))
                                   - {(d, "") for d in ready})
    merged = _report_label_merges(context, unreviewed, {} if spec else merged_spellings(mapping))
    ds, report = build_classification_dataset(frame, mapping, spec=spec, threshold=config.threshold,
                                              min_locs=config.min_locs or None,
                                              one_label_per_image=config.one_label_per_image, seed=config.seed,
                                              extra_columns=[spec.name for spec in output_specs])
    test_locations = []
    if config.match_test_csv:
        earlier = read_table(_read_text(config.match_test_csv, storage)).fillna({"location": ""})
        ds, test_locations = match_test(ds, earlier, json.loads(_read_text(config.match_test_splits, storage)))
    corrected, correction_tables = _corrections(context, config, storage, ds, ready)
    if corrected:
        ds = corrected.pop("dataset")
    if ds.empty:
        raise stop(f"the dataset is empty; left out: {report.dropped}")
    dataset = DatasetVersion(ds, label_index(ds), spec or {
        "generated": {f"{d}|{c}": label for (d, c), label in sorted(mapping.items())}}, test_locations,
        output_index(ds, output_specs))
    version = value_version(dataset, "classification_dataset")
    per_label = _per_label(ds)
    sample = ds.groupby("label")["path"].apply(lambda s: list(s.sample(min(len(s), 8), random_state=0))).to_dict()
    grid = contact_sheet(sample, lambda path: store.read_bytes(artifact_key("crops", None, path)))
    trainable = per_label[per_label["crops"] >= config.min_crops_per_label]
    folder = version_folder("classification_dataset", version)
    yield dg.Output(
        dataset, data_version=dg.DataVersion(version),
        metadata={
            "num_crops": len(ds), "num_labels": ds["label"].nunique(), "num_datasets": ds["dataset"].nunique(),
            "num_locations": ds[["dataset", "location"]].drop_duplicates().shape[0],
            "dagster/row_count": len(ds),
            "dagster/column_schema": table_schema(ds),
            "exports": dg.MetadataValue.json(ready), "exports_without_crops": dg.MetadataValue.json(skipped),
            READ_METADATA: dg.MetadataValue.json({p: read for p, (_, read, _) in per_export.items()}),
            "merged_class_names": dg.MetadataValue.json(merged),
            "num_unreviewed_left_out": sum(sum(counts.values()) for counts in unreviewed.values()),
            "unreviewed_left_out": dg.MetadataValue.json(unreviewed),
            "crops_per_label": table(per_label),
            "left_out": dg.MetadataValue.json(report.dropped),
            "conflicting_images": table(report.conflicts),
            "sampled": dg.MetadataValue.json({k: {"before": a, "after": b} for k, (a, b) in report.sampled.items()}),
            "match_test_locations": len(test_locations),
            **_outputs_metadata(dataset, outputs_missing),
            "corrections": dg.MetadataValue.json(corrected),
            **_correction_files(store, folder, correction_tables),
            **image_metadata(store, f"{folder}/{SAMPLE_GRID}", grid, "sample_grid", "sample crops per label"),
            "path": location(store.uri(f"{folder}/{DATASET_CSV}")),
        },
    )
    yield dg.AssetCheckResult(
        check_name="enough_labels_to_train", passed=len(trainable) >= 2, severity=dg.AssetCheckSeverity.ERROR,
        description=f"{len(trainable)} labels have at least {config.min_crops_per_label} crops; training needs two",
        metadata={"labels_with_enough_crops": len(trainable), "min_crops_per_label": config.min_crops_per_label,
                  "crops_per_label": table(per_label)},
    )


class SplitsConfig(dg.Config):
    """How to divide locations into train, val and test."""

    val_frac: float = Field(default=0.15, ge=0, lt=1)
    test_frac: float = Field(default=0.15, ge=0, lt=1, description="Ignored (0) when match_test fixes the test split.")
    method: Literal["random", "smallest_first"] = "random"
    seed: int = 0
    trials: int = Field(default=10_000, ge=1, description="Random assignments tried by 'random'.")
    sequence_gap_s: float = Field(default=60.0, gt=0, description="Sequences (bursts): images of one camera this "
                                  "close in time, where the export has no seq_id. Locations that share one are "
                                  "put in one split.")


def split_dataset(config: SplitsConfig, classification_dataset: DatasetVersion, storage: ArtifactStore
                  ) -> Iterator[dg.Output | dg.AssetCheckResult]:
    """The splits of one dataset version of the asset's family (``splits_asset``)."""
    ds, test_locations = classification_dataset.classification_ds, classification_dataset.match_test_locations
    test_frac = 0.0 if test_locations else config.test_frac
    linked = linked_locations(ds, export_sequences(storage, sorted(ds["dataset"].unique()), ds["path"],
                                                   config.sequence_gap_s))
    result = make_splits(ds, val_frac=config.val_frac, test_frac=test_frac, method=config.method,
                         seed=config.seed, trials=config.trials,
                         prioritize=prioritize_by_label(classification_dataset.label_spec),
                         test_locations=test_locations, linked=linked)
    expected = tuple(name for name, wanted in (("train", True), ("val", config.val_frac > 0),
                                               ("test", test_frac > 0 or bool(test_locations))) if wanted)
    leaks, missing = check_splits(ds, result, expected)
    score = split_score(ds, result, val_frac=config.val_frac, test_frac=test_frac)
    yield dg.Output(
        result, data_version=dg.DataVersion(value_version(result, "splits")),
        metadata={
            "score": round(score, 4), "method": config.method,
            "linked_locations": dg.MetadataValue.json([[list(pair) for pair in group] for group in linked]),
            **{f"num_{name}_locations": len(result[name]) for name in result},
            "crops_per_label_and_split": table(split_table(ds, result).reset_index(names="label")),
        },
    )
    yield dg.AssetCheckResult(check_name="no_location_leakage", passed=not leaks, severity=dg.AssetCheckSeverity.ERROR,
                              metadata={"problems": dg.MetadataValue.json(leaks[:50])})
    yield dg.AssetCheckResult(check_name="every_label_in_every_split", passed=not missing,
                              severity=dg.AssetCheckSeverity.ERROR,
                              metadata={"labels_that_cannot_be_placed": dg.MetadataValue.json(missing)})


def splits_asset(name: str, dataset: str, group_name: str, description: str) -> dg.AssetsDefinition:
    """``split_dataset`` as the splits asset ``name`` of the dataset asset ``dataset``, with its blocking checks."""
    return stage_asset(name=name, group_name=group_name, kinds={"json"}, description=description,
                       ins={"classification_dataset": dg.AssetIn(dataset)}, check_specs=[
                           dg.AssetCheckSpec("no_location_leakage", asset=name, blocking=True,
                                             description="Every (dataset, location) is in exactly one split."),
                           dg.AssetCheckSpec("every_label_in_every_split", asset=name, blocking=True,
                                             description="Each label has crops in train, val and test.")])(split_dataset)


splits = splits_asset("splits", "classification_dataset", "dataset", (
    "splits.json: (dataset, location) pairs for train, val and test, from one dataset version; locations that share "
    "a sequence (from the exports) go to one split."))
