"""The empty-or-not model, on whole frames: ``empty_frames`` (each export's images resized, with their labels),
``empty_dataset`` and ``empty_splits`` (by location), its training, evaluation, registration and gate (the same
code as the species classifier's, under its own registered model, ``animl-empty``), and ``empty_scores``: an
export's images scored before any detection or crop, so its empties can be set aside or ranked for review."""

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from pydantic import Field

from animl_assets.assets.artifacts import cached_crops, location, stage_asset, stop, table
from animl_assets.assets.dataset import splits_asset
from animl_assets.assets.evaluation import evaluation_asset
from animl_assets.assets.exports import exports_partitions
from animl_assets.assets.families import EMPTY
from animl_assets.assets.images import image_store
from animl_assets.assets.registry import champion_asset, gate_check, registered_asset
from animl_assets.assets.training import checkpoint_asset
from animl_assets.core.artifact_files import artifact_file, value_version
from animl_assets.core.dataset.classification import DS_COLUMNS, DatasetVersion
from animl_assets.core.dataset.empty import (
    EMPTY as EMPTY_LABEL,
    EMPTY_CLASSES,
    FRAME_COLUMNS,
    LABEL_INDEX,
    NOT_EMPTY,
    frame_labels,
    frame_name,
    frame_thumbnail,
)
from animl_assets.core.ingest.cct import UNKNOWN_LOCATION, ExportArtifacts, image_location
from animl_assets.core.ingest.images import ImageManifest, usable_images
from animl_assets.core.layout import artifact_key, partition_folder
from animl_assets.core.ml.labels import label_names
from animl_assets.core.registry import registry
from animl_assets.core.transfers import TRANSFER_WORKERS, parallel_map
from animl_assets.resources.storage import ArtifactStore, ExportsLocation, ImageSource
from animl_assets.resources.tracking import MlflowTracking

GROUP = "empty"


@dataclass
class FrameManifest:
    """An export's whole frames: ``file, frame, label, dataset_class, location, status, error`` per image."""

    manifest: pd.DataFrame = field(metadata=artifact_file("manifest.csv"))


class FramesConfig(dg.Config):
    """How whole frames are made and labelled."""

    size: int = Field(default=256, ge=32, le=2048, description="Frames are resized to size x size (the whole "
                      "image, squeezed, not cropped); train at an image_size up to this.")
    empty_classes: list[str] = Field(default=list(EMPTY_CLASSES), description="Export classes that mean empty.")
    ground_truth: str = Field(default="reviewed", description="reviewed: a model's unreviewed guess (Animl's "
                              "validated: false) is no label; all: it is one.")
    workers: int = Field(default=0, ge=0, description="Images read and resized at once (0: 16).")


@stage_asset(partitions_def=exports_partitions, group_name=GROUP, kinds={"jpeg"})
def empty_frames(context: dg.AssetExecutionContext, config: FramesConfig, cct_export: ExportArtifacts,
                 images: ImageManifest, storage: ArtifactStore, exports: ExportsLocation,
                 image_source: ImageSource) -> dg.Output[FrameManifest]:
    """Every readable image of the export as a whole frame resized to ``size`` x ``size`` (no detector, no crop),
    each read once from its source, with its empty-or-not label from the export (``""``: none). An image that
    cannot be read is reported in the manifest (``status: failed``), never a failed run."""
    partition = context.partition_key
    export = cct_export.export
    labels = frame_labels(export, config.empty_classes, config.ground_truth == "reviewed").set_index("file")
    locations = {image["file_name"]: image_location(image) for image in export["images"]}
    source = image_store(images, storage, partition, exports, image_source)
    dest = storage.store().child(artifact_key(EMPTY.images, partition, ""))

    def make(row: Any) -> dict[str, str]:
        frame = frame_name(row.file_name)
        try:
            dest.write_bytes(frame, frame_thumbnail(source.read_bytes(row.source_key), config.size))
            return {"status": "ok", "error": ""}
        except Exception as err:  # noqa: BLE001 - any unreadable image is reported in the manifest
            return {"status": "failed", "error": f"{type(err).__name__}: {str(err)[:200]}"}

    rows = list(usable_images(images.manifest).itertuples())
    results = list(parallel_map(make, rows, config.workers or TRANSFER_WORKERS))
    files = [str(row.file_name) for row in rows]
    manifest = pd.DataFrame({
        "file": files, "frame": [frame_name(f) for f in files],
        "label": labels["label"].reindex(files).fillna("").to_numpy(),
        "dataset_class": labels["dataset_class"].reindex(files).fillna("").to_numpy(),
        "location": [locations.get(f, UNKNOWN_LOCATION) for f in files],
        "status": [r["status"] for r in results], "error": [r["error"] for r in results]}, columns=FRAME_COLUMNS)
    value = FrameManifest(manifest)
    failed = manifest[manifest["status"] != "ok"]
    if len(failed):
        context.log.warning(f"{len(failed)} of {len(manifest)} images could not be made into frames: "
                            f"{failed['error'].head(3).tolist()}")
    counts = manifest[manifest["status"] == "ok"]["label"].replace({"": "unlabelled"}).value_counts()
    return dg.Output(value, data_version=dg.DataVersion(value_version(value, EMPTY.images)), metadata={
        "num_frames": int((manifest["status"] == "ok").sum()), "num_failed": len(failed),
        "failed": table(failed[["file", "error"]].head(50)), "size": config.size,
        **{f"num_{label}": int(n) for label, n in counts.items()},
        "path": location(dest.uri("")), "dagster/row_count": len(manifest)})


class EmptyDatasetConfig(dg.Config):
    exports: list[str] = Field(default=[], description="Export partitions to include; empty: every export whose "
                                                       "empty_frames are materialized.")


@stage_asset(group_name=GROUP, kinds={"csv"})
def empty_dataset(context: dg.AssetExecutionContext, config: EmptyDatasetConfig,
                  empty_frames: dict[str, FrameManifest]) -> dg.Output[DatasetVersion]:
    """``classification_ds.csv`` of whole frames labelled ``empty`` or ``not_empty`` (each export a dataset, its
    location as in the export) and ``label_index.json``; frames without a label or that failed are left out."""
    wanted = config.exports or sorted(empty_frames)
    missing = sorted(set(wanted) - set(empty_frames))
    if missing:
        raise stop(f"empty_frames are not materialized for {missing}")
    parts = []
    for partition in wanted:
        rows = empty_frames[partition].manifest
        rows = rows[(rows["status"] == "ok") & (rows["label"].isin([EMPTY_LABEL, NOT_EMPTY]))]
        parts.append(pd.DataFrame({"path": partition_folder(partition) + "/" + rows["frame"], "dataset": partition,
                                   "location": rows["location"], "dataset_class": rows["dataset_class"],
                                   "confidence": 1.0, "label": rows["label"]}, columns=DS_COLUMNS))
    ds = pd.concat(parts, ignore_index=True).sort_values("path", kind="stable").reset_index(drop=True)
    counts = ds["label"].value_counts()
    if counts.get(EMPTY_LABEL, 0) == 0 or counts.get(NOT_EMPTY, 0) == 0:
        raise stop(f"the empty-or-not model needs labelled frames of both kinds; {wanted} have {counts.to_dict()}")
    value = DatasetVersion(ds, dict(LABEL_INDEX), {"generated": {"empty_classes": "see empty_frames"}}, [])
    return dg.Output(value, data_version=dg.DataVersion(value_version(value, EMPTY.dataset)), metadata={
        "num_frames": len(ds), **{f"num_{k}": int(v) for k, v in counts.items()}, "exports": dg.MetadataValue.json(wanted),
        "num_locations": ds[["dataset", "location"]].drop_duplicates().shape[0], "dagster/row_count": len(ds)})


empty_splits = splits_asset(EMPTY.splits, EMPTY.dataset, GROUP, (
    "empty_splits.json: the empty-or-not dataset's (dataset, location) pairs for train, val and test."))
empty_checkpoint = checkpoint_asset(EMPTY, (
    "The empty-or-not model trained on whole frames (the species classifier's training: recipes, resume, MLflow "
    "under the animl-empty/<model> experiments)."))
empty_evaluation = evaluation_asset(EMPTY, (
    "The empty-or-not checkpoint on its splits, in the reference's files, with its test ROC AUC (not_empty against "
    "empty)."))
registered_empty_model = registered_asset(EMPTY, (
    "The evaluated empty-or-not model as a new version of the registered model animl-empty (alias challenger)."))
empty_beats_champion = gate_check(EMPTY, registered_empty_model)
empty_champion = champion_asset(EMPTY)


class EmptyScoresConfig(dg.Config):
    model: str = Field(default=registry.CHAMPION, description="The animl-empty version that scores: champion, "
                       "challenger, or a version number.")
    registry_name: str = Field(default=EMPTY.registry_name, description="The registered empty-or-not model.")
    set_aside: float = Field(default=0.9, gt=0, le=1, description="Frames with p(empty) at or above this are set "
                             "aside as empty; the rest are ranked most-likely-empty first for review.")
    batch_size: int = Field(default=64, ge=1)
    num_workers: int = Field(default=2, ge=0)
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda, ...")


@stage_asset(partitions_def=exports_partitions, group_name=GROUP, kinds={"pytorch", "csv"}, gpu=True,
             deps=[EMPTY.champion])
def empty_scores(context: dg.AssetExecutionContext, config: EmptyScoresConfig, empty_frames: FrameManifest,
                 storage: ArtifactStore, mlflow: MlflowTracking) -> dg.Output[pd.DataFrame]:
    """Each image of the export scored by the empty-or-not model before any detection or crop: ``file,
    p_empty, set_aside, rank, export_label`` (rank 1: most likely empty), so its empties can be set aside, or
    ranked for review, without MegaDetector. Labelled images give the score's AUROC against the export."""
    from animl_assets.core.ml import evaluation as ev
    from animl_assets.core.ml.data import resolve_device
    from animl_assets.core.ml.frames import Preprocessing
    from animl_assets.core.ml.inference import Classifier, classify

    partition = context.partition_key
    try:
        version = registry.resolve(mlflow.client(), config.registry_name, config.model)
    except ValueError as err:
        raise stop(f"{err}: train and register an empty-or-not model first (job train_empty_model)") from err
    files = registry.model_files(mlflow.uri, version)
    classifier = Classifier(ev.load_script(files.torchscript), label_names(files.label_index),
                            Preprocessing.of(files.preprocessing), f"{version.name}/{version.version}")
    frames = empty_frames.manifest[empty_frames.manifest["status"] == "ok"]
    paths = [f"{partition_folder(partition)}/{frame}" for frame in frames["frame"]]
    root, cache = cached_crops(storage, paths, EMPTY.images)
    with tempfile.TemporaryDirectory(prefix="animl-empty-") as tmp:
        report = classify(classifier, root, paths, Path(tmp) / "scores.csv", device=resolve_device(config.device),
                          batch_size=config.batch_size, workers=config.num_workers)
        probs = pd.read_csv(Path(tmp) / "scores.csv")
    scores = _scores(frames, paths, probs, config.set_aside)
    auroc = _auroc(scores)
    return dg.Output(scores, metadata={
        "model": f"{version.name} v{version.version}", "num_scored": len(scores),
        "num_set_aside": int(scores["set_aside"].sum()), "set_aside_at": config.set_aside,
        **({"auroc_against_export_labels": round(auroc, 4)} if auroc == auroc else {}),
        "num_failed": len(report.failures), "most_likely_empty": table(scores.head(20)), **cache,
        "dagster/row_count": len(scores)})


def _auroc(scores: pd.DataFrame) -> float:
    """How well p(empty) ranks the export's own labelled images (NaN without both kinds)."""
    from animl_assets.core.ml.evaluation import binary_auroc

    labelled = scores[scores["export_label"].isin([EMPTY_LABEL, NOT_EMPTY])]
    return binary_auroc(pd.DataFrame({"label": labelled["export_label"], EMPTY_LABEL: labelled["p_empty"],
                                      NOT_EMPTY: 1 - labelled["p_empty"]}), [EMPTY_LABEL, NOT_EMPTY])


def _scores(frames: pd.DataFrame, paths: list[str], probs: pd.DataFrame, set_aside: float) -> pd.DataFrame:
    """The scores table from the classifier's ``path, empty, not_empty`` rows, most likely empty first."""
    p_empty = probs.set_index("path")[EMPTY_LABEL].reindex(paths).to_numpy()
    scores = pd.DataFrame({"file": frames["file"].to_numpy(), "p_empty": p_empty.round(6),
                           "export_label": frames["label"].fillna("").to_numpy()}).dropna(subset=["p_empty"])
    scores = scores.sort_values(["p_empty", "file"], ascending=[False, True], kind="stable").reset_index(drop=True)
    scores.insert(2, "set_aside", scores["p_empty"] >= set_aside)
    scores.insert(3, "rank", range(1, len(scores) + 1))
    return scores


EMPTY_TRAINING_ASSETS = [empty_dataset, empty_splits, empty_checkpoint, empty_evaluation, registered_empty_model,
                         empty_champion]
EMPTY_PER_EXPORT_ASSETS = [empty_frames, empty_scores]
EMPTY_CHECKS = [empty_beats_champion]
