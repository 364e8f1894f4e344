"""Inference and review. Per export, after a champion exists: ``classifications`` (the reference
``run_classifier.py``'s ``classifier_output.csv.gz``, streamed) and ``classified_detections``
(MegaDetector JSON with classifications, for Timelapse). Across exports: ``mislabeled_candidates`` from
an evaluation, to review and correct (``classification_dataset``'s ``corrections``).

PyTorch (``core.ml.inference``) is imported when a step runs, not when the Definitions load."""

import gzip
import hashlib
import json
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import dagster as dg
import pandas as pd
from pydantic import Field

from animl_assets.assets.artifacts import (
    cached_crops,
    image_metadata,
    location,
    stage_asset,
    stop,
    table,
)
from animl_assets.assets.evaluation import read_json
from animl_assets.assets.exports import exports_partitions
from animl_assets.core.artifact_files import config_key, value_version
from animl_assets.core.detect.contact_sheet import contact_sheet
from animl_assets.core.detect.crops import CropManifest
from animl_assets.core.detect.megadetector import Detections, validate_batch_output
from animl_assets.core.layout import artifact_key, partition_folder, version_file
from animl_assets.core.ml import drift, plots
from animl_assets.core.ml.drift import DriftLimits
from animl_assets.core.ml.frames import Preprocessing
from animl_assets.core.ml.labels import label_names, remapped_label_index
from animl_assets.core.ml.recipe import Classifications, Evaluation
from animl_assets.core.registry import registry
from animl_assets.core.review import candidates, queue
from animl_assets.core.review.queue import ReviewQueue
from animl_assets.core.review.merge import add_outputs, merge_classifications
from animl_assets.core.review.sequences import aggregate_csv, crop_image, image_cameras, sequence_ids
from animl_assets.core.tables import read_csv
from animl_assets.resources.storage import ArtifactStore, read_uri
from animl_assets.resources.tracking import MlflowTracking

if TYPE_CHECKING:
    from animl_assets.core.ml.inference import Classifier

OUTPUT = "classifier_output.csv.gz"
SEQUENCE_OUTPUT = "sequence_output.csv.gz"

# A partition runs again when its crops, detections or the champion changed and nothing it reads is missing or
# being written: a new export is classified, and every export again under a new champion.
FOLLOW_UPSTREAM = dg.AutomationCondition.eager()


class ClassificationsConfig(dg.Config):
    """Which model classifies the export's crops, and how it runs."""

    model: str = Field(default=registry.CHAMPION, description="A version of the registered model: an alias "
                       "(champion), a number or a models:/ URI. Ignored when torchscript is set.")
    registry_name: str = registry.DEFAULT_MODEL
    torchscript: str = Field(default="", description="An external TorchScript model (path or s3:// URI) instead.")
    label_index: str = Field(default="", description="The external model's label_index.json.")
    image_size: int = Field(default=224, ge=8, description="The external model's input size.")
    target_mapping: str = Field(default="", description="JSON {target: [classifier labels]} (path or s3:// URI): "
                                "probabilities summed per target, unmapped labels to 'other'.")
    batch_size: int = Field(default=64, ge=1)
    num_workers: int = Field(default=2, ge=0)
    device: str = "auto"
    runtime: Literal["torch", "onnx"] = Field(default="torch", description="torch: the TorchScript model "
                                              "(frozen for oneDNN on CPU); onnx: the registered ONNX model on ONNX "
                                              "Runtime (registered versions evaluated with portable: true).")
    decode: Literal["auto", "loader", "device"] = Field(default="auto", description="Where crops are decoded: "
                                                        "loader (PIL in the workers), device (nvJPEG on the GPU) "
                                                        "or auto (the device on CUDA).")
    progress_every: int = Field(default=50, ge=0, description="A progress line every N batches (0: none).")
    sequences: bool = Field(default=False, description="Also write sequence_output.csv.gz: the mean of the crops' "
                            "probabilities per sequence (export seq_id, else one camera's images within the gap: Animl's "
                            "camera, else the location).")
    sequence_gap_s: float = Field(default=60.0, gt=0)
    drift_max_psi: float = Field(default=0.25, ge=0, description="Drift check: the most the population stability "
                                 "index of the predicted labels may reach against the model's test split.")
    drift_max_confidence_drop: float = Field(default=0.10, ge=0, le=1, description="Drift check: the most the mean "
                                             "top-1 confidence may fall below the test split's.")
    drift_max_unknown_rise: float = Field(default=0.10, ge=0, le=1, description="Drift check: the most the share "
                                          "of unknowns may rise above the test split's.")
    drift_min_crops: int = Field(default=30, ge=1, description="Drift check: a camera (Animl) or location with at "
                                 "least this many crops is checked on its own too.")

    def drift_limits(self) -> DriftLimits:
        return DriftLimits(self.drift_max_psi, self.drift_max_confidence_drop, self.drift_max_unknown_rise,
                           self.drift_min_crops)


def load_classifier(config: ClassificationsConfig, storage: ArtifactStore, mlflow: MlflowTracking) -> "Classifier":
    """The configured model: a registered version (default: the champion) or an external TorchScript file."""
    from animl_assets.core.ml.data import resolve_device
    from animl_assets.core.ml.evaluation import load_script
    from animl_assets.core.ml.inference import Classifier
    from animl_assets.core.ml.portable import OnnxModel

    if config.torchscript:
        if not config.label_index:
            raise stop("an external torchscript model needs its label_index")
        if config.runtime == "onnx":
            raise stop("runtime: onnx runs registered versions' ONNX models; an external model is TorchScript")
        data = read_uri(config.torchscript, storage.s3)
        labels = label_names(read_json(config.label_index, storage))
        fingerprint = hashlib.sha256(data + json.dumps(labels).encode()).hexdigest()[:16]
        return Classifier(load_script(data), labels, Preprocessing(config.image_size), f"external:{fingerprint}",
                          Path(config.torchscript).name)
    client = mlflow.client()
    try:
        version = registry.resolve(client, config.registry_name, config.model)
    except ValueError as err:
        raise stop(f"{err}: train and register a model first (animl train), or set torchscript") from err
    files = registry.model_files(mlflow.uri, version)
    if config.runtime == "onnx" and not files.onnx:
        raise stop(f"{version.name} version {version.version} has no ONNX model (evaluated before ONNX export, or "
                   "with portable: false): re-evaluate and register it, or use runtime: torch")
    if config.runtime == "onnx" and files.output_index:
        raise stop(f"{version.name} version {version.version} is a multi-output model: its extra outputs run on "
                   "runtime: torch (the ONNX model is its species head alone)")
    model = (OnnxModel(files.onnx, resolve_device(config.device)) if config.runtime == "onnx"
             else load_script(files.outputs_torchscript or files.torchscript))
    return Classifier(model, label_names(files.label_index), Preprocessing.of(files.preprocessing),
                      f"{version.name}/{version.version}", f"{version.name} v{version.version}", files.open_set,
                      files.prediction_profile, {name: label_names(index) for name, index in files.output_index.items()})


DRIFT_CHECK = "drift"
# A check partitioned like its asset records each export's result apart (the UI's history per export). Dagster
# 1.13 calls a partitioned check spec a preview; the project pins Dagster's version.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec",
                        category=dg.PreviewWarning)


@stage_asset(gpu=True, partitions_def=exports_partitions, group_name="inference", kinds={"pytorch"},
             deps=["champion_model"],
             automation_condition=FOLLOW_UPSTREAM,
             check_specs=[dg.AssetCheckSpec(DRIFT_CHECK, asset="classifications", blocking=False,
                                            partitions_def=exports_partitions,  # each export's own result
                                            description="The export's predictions against the model's test split: "
                                                        "PSI of the predicted labels, mean confidence, unknowns, "
                                                        "overall and per camera. A failure starts a retraining.")])
def classifications(context: dg.AssetExecutionContext, config: ClassificationsConfig, crops: CropManifest,
                    storage: ArtifactStore, mlflow: MlflowTracking) -> Iterator[dg.Output | dg.AssetCheckResult]:
    """The export's crops classified by the champion (or a chosen version, or an external TorchScript model):
    ``classifier_output.csv.gz`` (``path`` + one probability column per category, and ``unknown``: 1 for a
    crop below the model's unknowns' threshold) streamed batch by batch, and its ``label_index.json``; the
    ``drift`` check. A re-run with the same model and crops does nothing unless crops failed last time (they
    are tried again); a new champion makes it stale."""
    from animl_assets.core.ml.data import resolve_device
    from animl_assets.core.ml.inference import classify, output_file

    partition = context.partition_key
    store = storage.store()
    classifier = load_classifier(config, storage, mlflow)
    mapping = read_json(config.target_mapping, storage) if config.target_mapping else None
    paths = crops.manifest["crop"].astype(str).tolist()
    key = config_key({"model": classifier.version, "crops": value_version(crops, "crops"), "mapping": mapping,
                      "sequences": config.sequences and config.sequence_gap_s,
                      # the default runtime adds nothing: outputs classified before runtimes existed stay current
                      **({"runtime": config.runtime} if config.runtime != "torch" else {})})
    folder = artifact_key("classifications", partition, "")
    previous = _previous(storage, partition)
    if previous and previous.key == key and store.exists(f"{folder}/{OUTPUT}"):
        if not previous.num_failed:
            context.log.info(f"{partition}: already classified by {classifier.name} ({key}); nothing to do")
            yield dg.Output(previous, data_version=dg.DataVersion(key), metadata={"skipped": True, **_meta(previous)})
            yield drift_check(context, config, previous, classifier, crops, storage)
            return
        context.log.info(f"{partition}: {previous.num_failed} crops failed last time; classifying again")
    crops_root, cache = cached_crops(storage, [f"{partition_folder(partition)}/{path}" for path in paths])
    crops_root = crops_root / partition_folder(partition)
    device = resolve_device(config.device)
    with tempfile.TemporaryDirectory(prefix="animl-classify-") as tmp:
        out = Path(tmp) / OUTPUT
        report = classify(classifier, crops_root, paths, out, mapping=mapping, device=device,
                          batch_size=config.batch_size, workers=config.num_workers, decode=config.decode,
                          progress=lambda done, total: context.log.info(f"classified {done}/{total} crops"),
                          progress_every=config.progress_every)
        store.put_file(f"{folder}/{OUTPUT}", out)
        for name in classifier.outputs:  # a multi-output model's extra outputs, a file each
            store.put_file(f"{folder}/{output_file(OUTPUT, name)}", output_file(out, name))
        if config.sequences:
            export = storage.load("cct_export", partition=partition).export
            images = sequence_ids(export["images"], config.sequence_gap_s)
            per_sequence = aggregate_csv(str(out), report.columns,
                                         {p: images[crop_image(p)] for p in paths if crop_image(p) in images})
            sequence_file = Path(tmp) / SEQUENCE_OUTPUT
            per_sequence.to_csv(sequence_file, index=False, compression={"method": "gzip", "mtime": 0})
            store.put_file(f"{folder}/{SEQUENCE_OUTPUT}", sequence_file)
    label_index = remapped_label_index(report.columns)
    store.write_bytes(f"{folder}/label_index.json", json.dumps(label_index, indent=1).encode())
    failures = pd.DataFrame(report.failures, columns=["path", "error"])
    value = Classifications(key, classifier.version, classifier.name, label_index, f"{folder}/{OUTPUT}",
                            report.classified, len(failures), mapping, failures.to_dict("records"),
                            datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            f"{folder}/{SEQUENCE_OUTPUT}" if config.sequences else "",
                            report.columns[-1] if classifier.flags_unknowns else "", report.unknown,
                            {name: f"{folder}/{output_file(OUTPUT, name)}" for name in classifier.outputs})
    # crops that failed make another version: the run that classifies them too changes what is downstream
    data_version = f"{key}-{len(failures)}-failed" if len(failures) else key
    yield dg.Output(value, data_version=dg.DataVersion(data_version), metadata={
        **_meta(value), "crops_per_s": round(report.crops_per_s, 1), "device": str(device), "runtime": config.runtime,
        **cache, "failures": table(failures), "classifier_output": location(store.uri(f"{folder}/{OUTPUT}"))})
    yield drift_check(context, config, value, classifier, crops, storage)


def drift_check(context: dg.AssetExecutionContext, config: ClassificationsConfig, value: Classifications,
                classifier: "Classifier", crops: CropManifest, storage: ArtifactStore) -> dg.AssetCheckResult:
    """The ``drift`` check of an export's classifications against the model's test-split profile: a warning
    past the configured limits, overall or for a camera, with the table and a plot of the label shares."""
    partition, store = context.partition_key, storage.store()
    identity = {"export": partition, "export_version": value_version(crops, "crops"), "model": value.model}
    reference = classifier.prediction_profile
    if not reference or value.mapping is not None:
        why = "the model has no test-split profile" if not reference else "a target mapping changes the labels"
        return dg.AssetCheckResult(passed=True, check_name=DRIFT_CHECK, description=f"not measured: {why}",
                                   metadata={**identity, "measured": False})
    outputs = read_csv(gzip.decompress(store.read_bytes(value.output)))
    labels = [name for name in label_names(value.label_index) if name != value.unknown_column]
    cameras = image_cameras(storage.load("cct_export", partition=partition).export["images"])
    group_of = {crop: cameras.get(file, "") for crop, file in zip(crops.manifest["crop"], crops.manifest["file"])}
    found = drift.drift_table(outputs, labels, value.unknown_column or None, group_of, reference,
                              config.drift_limits())
    overall = found.iloc[0]
    observed = drift.outputs_profile(outputs, labels, value.unknown_column or None)
    png = plots.label_shares(reference["predicted"], observed["predicted"], f"predicted labels: {partition}")
    drifted = found[found["drifted"]]
    return dg.AssetCheckResult(
        passed=drifted.empty, check_name=DRIFT_CHECK, severity=dg.AssetCheckSeverity.WARN,
        description="; ".join(f"{row.scope}: {row.reasons}" for row in drifted.itertuples())[:1000] or None,
        metadata={**identity, "measured": True,
                  **{k: round(float(overall[k]), 4) for k in ("psi", "mean_top1", "unknown_share")
                     if overall[k] is not None and overall[k] == overall[k]},
                  "scopes_drifted": len(drifted), "scopes_checked": len(found), "drift": table(found.round(4)),
                  **image_metadata(store, artifact_key("classifications", partition, "drift.png"), png,
                                   "label_shares", "predicted label shares: test split vs export")})


def _previous(storage: ArtifactStore, partition: str) -> Classifications | None:
    """The value the last materialization of this partition stored (the IO manager's files), if any."""
    if not storage.has("classifications", partition=partition):
        return None
    previous = storage.load("classifications", partition=partition, expected=Classifications)
    return previous if isinstance(previous, Classifications) else None


def _meta(value: Classifications) -> dict[str, Any]:
    return {"model": value.model, "classifier": value.classifier, "num_classified": value.num_classified,
            "num_failed": value.num_failed, "labels": len(value.label_index), "dagster/row_count": value.num_classified,
            **({"num_unknown": value.num_unknown,
                "unknown_share": round(value.num_unknown / max(1, value.num_classified), 4)}
               if value.unknown_column else {"num_unknown": "not flagged (the model has no unknowns' threshold)"}),
            **({"outputs": dg.MetadataValue.json(value.outputs)} if value.outputs else {})}


class ReviewConfig(dg.Config):
    """How classifications are written into the MegaDetector JSON (the reference merge script's options)."""

    threshold: float = Field(default=0.1, ge=0, le=1, description="Omit categories below this confidence.")
    label_pos: Literal["none", "first", "last"] = Field(default="none", description="Add the export's label of "
                                                        "each crop as an extra category (id + 1,000,000).")
    relative_conf: bool = Field(default=False, description="Each confidence as its margin over the labelled "
                                                           "category's (needs the export's labels).")
    typical_threshold: float = Field(default=-1.0, description="Passed along as info.classifier_metadata."
                                                               "typical_classification_threshold (<0: omitted).")


@stage_asset(partitions_def=exports_partitions, group_name="inference", kinds={"json"},
             automation_condition=FOLLOW_UPSTREAM,
             check_specs=[dg.AssetCheckSpec("md_format", asset="classified_detections", blocking=True,
                                         description="The output passes the MegaDetector batch-output rules.")])
def classified_detections(context: dg.AssetExecutionContext, config: ReviewConfig, md_detections: Detections,
                          crops: CropManifest, classifications: Classifications,
                          storage: ArtifactStore) -> Iterator[dg.Output | dg.AssetCheckResult]:
    """The export's MegaDetector JSON with each cropped detection's ``classifications`` (at or above the
    threshold, by descending confidence), ``classification_categories`` and ``info.classifier``: what
    Timelapse opens. Detections without a crop keep their place and get none."""
    outputs = read_csv(gzip.decompress(storage.store().read_bytes(classifications.output)))
    labels = label_names(classifications.label_index)
    truth = crop_labels(crops, md_detections) if config.label_pos != "none" or config.relative_conf else None
    merged, unmatched = merge_classifications(
        md_detections.md, outputs, labels, classifications.classifier, threshold=config.threshold,
        ground_truth=truth, label_pos=None if config.label_pos == "none" else config.label_pos,
        relative_conf=config.relative_conf,
        typical_threshold=config.typical_threshold if config.typical_threshold >= 0 else None,
        completed=datetime.fromisoformat(classifications.completed))
    extra = {name: read_csv(gzip.decompress(storage.store().read_bytes(key)))
             for name, key in classifications.outputs.items()}
    with_outputs = add_outputs(merged, extra) if extra else 0
    problems = validate_batch_output(merged)
    classified = sum(1 for image in merged["images"] for d in image.get("detections") or []
                     if d.get("classifications"))
    yield dg.Output(merged, metadata={
        "classifier": classifications.classifier, "num_images": len(merged["images"]),
        "num_classified_detections": classified, "num_unmatched_crops": len(unmatched),
        **({"outputs": dg.MetadataValue.json(sorted(extra)), "num_detections_with_outputs": with_outputs}
           if extra else {}),
        "threshold": config.threshold})
    yield dg.AssetCheckResult(check_name="md_format", passed=not problems, metadata={
        "problems": len(problems), "first_problems": dg.MetadataValue.json(problems[:20])})


def crop_labels(crops: CropManifest, md_detections: Detections) -> dict[str, str]:
    """``{crop: the export's label of its box}`` for the crops whose box the export labels."""
    keys = crops.manifest[["crop", "file", "detection_index"]].astype({"detection_index": int})
    labelled = keys.merge(md_detections.labels[["file", "detection_index", "label"]]
                          .astype({"detection_index": int}), on=["file", "detection_index"], how="left")
    return {c: lab for c, lab in zip(labelled["crop"], labelled["label"].fillna("")) if lab}


class ReviewQueueConfig(dg.Config):
    """How many crops a reviewer gets, and how bursts are told apart."""

    budget: int = Field(default=200, ge=1, description="The most crops in the queue.")
    sequence_gap_s: float = Field(default=60.0, gt=0, description="Bursts: images of one camera this close in "
                                  "time, where the export has no seq_id.")


@stage_asset(partitions_def=exports_partitions, group_name="inference", kinds={"csv", "json"},
             deps=["cct_export"], automation_condition=FOLLOW_UPSTREAM)  # cct_export: its sequences and cameras
def review_queue(context: dg.AssetExecutionContext, config: ReviewQueueConfig, classified_detections: dict,
                 classifications: Classifications, crops: CropManifest, md_detections: Detections,
                 storage: ArtifactStore) -> dg.Output[ReviewQueue]:
    """The export's crops a person should look at first, within the budget: unsure, unknown, or against the
    export's own label, one per burst, spread over classes and cameras. ``review_queue.csv`` (mark
    ``reviewed``, fix ``correct_label``; then give it to ``classification_dataset``'s corrections) and
    ``review_queue.md.json``, the MegaDetector JSON of just those images, for Timelapse."""
    partition, store = context.partition_key, storage.store()
    outputs = read_csv(gzip.decompress(store.read_bytes(classifications.output)))
    labels = [n for n in label_names(classifications.label_index) if n != classifications.unknown_column]
    crops_frame = queue.crop_priorities(outputs, labels, classifications.unknown_column or None,
                                        crop_labels(crops, md_detections))
    images = storage.load("cct_export", partition=partition).export["images"]
    sequences = sequence_ids(images, config.sequence_gap_s)
    of_crop = {crop: sequences[crop_image(crop)] for crop in crops_frame["crop"] if crop_image(crop) in sequences}
    ranked = queue.review_queue(crops_frame, config.budget, of_crop, image_cameras(images))
    value = ReviewQueue(queue.queue_file(ranked, partition), queue.queue_md(classified_detections, ranked["file"]))
    sample = {f"{row.rank}. {row.pred} ({row.confidence:.2f})": [row.crop] for row in value.queue.head(24).itertuples()}
    sheet = contact_sheet(sample, lambda crop: store.read_bytes(artifact_key("crops", partition, crop)))
    reasons = queue.reason_counts(value.queue["reasons"])
    per_class = value.queue.groupby("pred").size().reset_index(name="crops")
    return dg.Output(value, metadata={
        "queued": len(value.queue), "budget": config.budget, "classified_crops": len(outputs),
        "queued_unknown": reasons[queue.UNKNOWN], "queued_disagreeing": reasons[queue.DISAGREES],
        "classes": int(value.queue["pred"].nunique()), "cameras": int(value.queue["camera"].nunique()),
        "images": len(value.md["images"]), "reasons": dg.MetadataValue.json(reasons),
        "per_class": table(per_class), "queue": table(value.queue),
        **image_metadata(store, artifact_key("review_queue", partition, "contact_sheet.png"), sheet, "contact_sheet",
                         "the queue's first crops"),
        "dagster/row_count": len(value.queue)})


class MislabeledConfig(dg.Config):
    """Which crops look mislabeled."""

    margin: float = Field(default=0.95, gt=0, le=1, description="Predicted confidence minus labelled confidence.")
    splits: list[str] = Field(default=["train", "val", "test"])


@stage_asset(group_name="evaluation", kinds={"csv"})
def mislabeled_candidates(context: dg.AssetExecutionContext, config: MislabeledConfig,
                          classifier_evaluation: Evaluation, storage: ArtifactStore) -> dg.Output[pd.DataFrame]:
    """Crops whose predicted label beats their label by the margin, per split and dataset, to review (e.g. in
    Timelapse) and correct: the corrections file feeds the next ``classification_dataset``."""
    evaluation = classifier_evaluation
    frames = [candidates.mislabeled_candidates(evaluation.outputs(split), evaluation.names, config.margin)
              .assign(split=split) for split in config.splits]
    found = pd.concat(frames, ignore_index=True)
    folders = {partition_folder(p): p for p in context.instance.get_dynamic_partitions(exports_partitions.name)}
    found.insert(0, "dataset", found["path"].str.split("/", n=1).str[0].map(folders).fillna(""))
    store = storage.store()
    sample = {f"{label} as {pred}": list(group["path"].head(8))
              for (label, pred), group in found.groupby(["label", "pred"])}
    sheet = contact_sheet(sample, lambda path: store.read_bytes(artifact_key("crops", None, path)))
    per = found.groupby(["split", "dataset"]).size().reset_index(name="candidates")
    version = value_version(found, "mislabeled_candidates")
    return dg.Output(found, data_version=dg.DataVersion(version), metadata={
        "num_candidates": len(found), "margin": config.margin, "per_split_and_dataset": table(per),
        "candidates": table(found.round(4)),
        **image_metadata(store, version_file("mislabeled_candidates", version, "contact_sheet.png"), sheet, "contact_sheet",
                         "mislabeled candidates: label as prediction")})
