"""``crops``: a square (or tight) JPEG crop of every animal box, with a manifest and a failure report."""

from typing import Iterator, Literal

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from animl_assets.assets.artifacts import location, stage_op, table, thumbnail_markdown
from animl_assets.assets.checks import FAILURE_RATE, failure_rate_check, failure_rate_spec, log_failures
from animl_assets.assets.exports import exports_partitions
from animl_assets.assets.images import image_store
from animl_assets.core.artifact_files import value_version
from animl_assets.core.detect.contact_sheet import contact_sheet
from animl_assets.core.detect.crops import (
    JOURNAL,
    MANIFEST,
    MANIFEST_COLUMNS,
    CropManifest,
    CropReport,
    crop_images,
    manifest_bytes,
    merge_reports,
    read_report,
    report_bytes,
    shard_count,
    shard_of,
)
from animl_assets.core.detect.megadetector import Detections, with_box_labels
from animl_assets.core.failures import MAX_PIXELS
from animl_assets.core.files import Journal
from animl_assets.core.ingest.images import USABLE, ImageManifest, listed_sources
from animl_assets.core.layout import artifact_key, partition_folder
from animl_assets.core.store import LocalStore, Store
from animl_assets.core.tables import read_csv as read_table
from animl_assets.core.transfers import TRANSFER_WORKERS, parallel_map
from animl_assets.resources.storage import ArtifactStore, ExportsLocation, ImageSource

SIZE_BINS = [0, 32, 64, 128, 224, 512, 1024, 100_000]
CONTACT_SHEET = "contact_sheet.png"


class CropsConfig(dg.Config):
    """How to crop."""

    threshold: float = Field(default=0.0, ge=0, le=1, description="Crop animal boxes with conf at or above this.")
    square: bool = Field(default=True, description="Square crops (reference geometry); False: tight boxes.")
    workers: int = Field(default=0, ge=0, description="Images in flight at once (read, cropped, written); 0: all "
                                                     "cores for a local source, 16 for a remote one (S3).")
    attempts: int = Field(default=3, ge=1, le=10, description="Reads per image before a transport fault "
                                                              "fails it as fetch_failed (tried again next run).")
    executor: Literal["threads", "processes"] = "threads"
    max_side: int = Field(default=0, ge=0, description="Opt-in: shrink crops to this side and decode JPEGs "
                                                       "DCT-scaled (faster, not pixel-identical). 0: off.")
    max_megapixels: float = Field(default=MAX_PIXELS / 1e6, gt=0, description="Images larger than this are "
                                  "reported bad without being decoded (decompression bombs); memory stays within "
                                  "workers x this.")
    max_failure_rate: float = Field(default=0.05, ge=0, le=1, description="The failure_rate check warns when "
                                                                           "more than this share of images fail.")
    shards: int = Field(default=0, ge=0, le=4096, description="Steps the cropping fans out to (processes under "
                        "the multiprocess executor, pods under k8s_job_executor). 0: one per images_per_shard.")
    images_per_shard: int = Field(default=20_000, ge=1, description="With shards 0: images with a detection "
                                  "per shard; a smaller export is cropped in one step.")


def size_histogram(rows: pd.DataFrame) -> pd.DataFrame:
    """Crop counts by longest side in pixels."""
    sides = rows[["width", "height"]].astype(int).max(axis=1) if len(rows) else pd.Series(dtype=int)
    counts, edges = np.histogram(sides, bins=SIZE_BINS)
    return pd.DataFrame({"longest side (px)": [f"{a}–{b - 1}" for a, b in zip(edges[:-1], edges[1:])],
                         "crops": counts})


SHARDS = "shards"  # crops/<export>/shards/<i>-of-<n>.json: a shard's report, until the merge folds it in


def _shard_key(partition: str, index: int, count: int) -> str:
    return artifact_key("crops", partition, f"{SHARDS}/{index:04d}-of-{count:04d}.json")


@stage_op(out=dg.DynamicOut(dg.Nothing))
def crop_plan(context: dg.OpExecutionContext, config: CropsConfig,
              md_detections: Detections) -> Iterator[dg.DynamicOutput]:
    """One shard per ``images_per_shard`` images with a detection (or ``shards``): each runs as its own step."""
    count = shard_count(md_detections.md, config.shards, config.images_per_shard)
    context.log.info(f"cropping in {count} shard{'s' if count > 1 else ''}")
    for index in range(count):
        yield dg.DynamicOutput(None, mapping_key=str(index))


@stage_op(ins={"planned": dg.In(dg.Nothing)}, out=dg.Out(dg.Nothing))
def crop_shard(context: dg.OpExecutionContext, config: CropsConfig, md_detections: Detections,
               images: ImageManifest, storage: ArtifactStore, exports: ExportsLocation,
               image_source: ImageSource) -> None:
    """Crop one shard's images, each read once from its source, its crops written straight to the store; the
    shard's report is left in the store for ``crop_merge``. A shard run again redoes only what is missing."""
    partition, index = context.partition_key, int(context.get_mapping_key() or 0)
    count = shard_count(md_detections.md, config.shards, config.images_per_shard)
    store = storage.store()
    source = image_store(images, storage, partition, exports, image_source)
    remote = not isinstance(source, LocalStore)
    name = JOURNAL if count == 1 else f"{JOURNAL.removesuffix('.csv')}.{index}-of-{count}.csv"
    journal = Journal(storage.cache("crops", partition_folder(partition)) / name, MANIFEST_COLUMNS)
    earlier = _earlier_shard_rows(store, _shard_key(partition, index, count))
    if earlier:
        journal.append(earlier)  # a shard that finished before a sibling failed: its crops are not redone
    report = crop_images(
        shard_of(md_detections.md, index, count), source, store.child(artifact_key("crops", partition, "")), journal,
        sources=listed_sources(images.manifest), threshold=config.threshold, square=config.square,
        workers=config.workers or (TRANSFER_WORKERS if remote else None), executor=config.executor,
        max_side=config.max_side or None, max_pixels=int(config.max_megapixels * 1e6), attempts=config.attempts,
        write_manifest=False)
    store.write_bytes(_shard_key(partition, index, count), report_bytes(report))
    journal.remove()  # only now: the shard's report holds what the journal did
    context.log.info(f"shard {index + 1}/{count}: {report.crops} new, {report.reused} reused, "
                     f"{len(report.failures)} failed images, {report.seconds:.1f}s, "
                     f"{report.bytes_read / 1e6:.1f} MB read from {source.uri()}")


def _earlier_shard_rows(store: Store, key: str) -> list[dict]:
    try:
        return read_report(store.read_bytes(key)).rows
    except FileNotFoundError:
        return []


@stage_op(ins={"shards": dg.In(dg.Nothing)},
          out={"result": dg.Out(), f"crops_{FAILURE_RATE}": dg.Out(dg.Nothing)})
def crop_merge(context: dg.OpExecutionContext, config: CropsConfig, md_detections: Detections,
               images: ImageManifest, storage: ArtifactStore, exports: ExportsLocation,
               image_source: ImageSource) -> Iterator[dg.Output | dg.AssetCheckResult]:
    """The shards' reports as one ``crops`` value, the same as a one-step run: ``crops.csv``, the failure
    report, a contact sheet, and the failure_rate check."""
    partition = context.partition_key
    count = shard_count(md_detections.md, config.shards, config.images_per_shard)
    store = storage.store()
    keys = [_shard_key(partition, index, count) for index in range(count)]
    report = merge_reports(read_report(data) for data in parallel_map(store.read_bytes, keys))
    crops_store = store.child(artifact_key("crops", partition, ""))
    crops_store.write_bytes(MANIFEST, manifest_bytes(report.rows))
    left = [item.key for item in store.list(artifact_key("crops", partition, SHARDS))]  # a failed run's, too
    for _ in parallel_map(store.delete, left):
        pass
    source = image_store(images, storage, partition, exports, image_source)
    failures = _failures(report, images)
    rows = pd.DataFrame(report.rows, columns=MANIFEST_COLUMNS)
    rows = with_box_labels(rows, md_detections.labels)
    rows["label"] = rows["label"].replace("", "(unlabelled)")
    per_class = rows.groupby("label").size().rename("crops").reset_index()
    sheet = contact_sheet(rows.groupby("label")["crop"].apply(list).to_dict(), crops_store.read_bytes)
    crops_store.write_bytes(CONTACT_SHEET, sheet)
    log_failures(context.log, failures, "category", crops_store.uri("failures.csv"))
    context.log.info(f"{report.crops} new, {report.reused} reused, {len(failures)} failed images in {count} "
                     f"shard{'s' if count > 1 else ''}, {report.bytes_read / 1e6:.1f} MB read from {source.uri()}")
    value = CropManifest(read_table(manifest_bytes(report.rows)), failures)
    yield dg.Output(
        value, data_version=dg.DataVersion(value_version(value, "crops")),
        metadata={
            "num_images": report.images,
            "num_crops": len(report.rows),
            "num_new_crops": report.crops,
            "num_reused_crops": report.reused,
            "num_zero_size_skipped": report.zero_size,
            "num_failed_images": len(failures),
            "num_images_decoded": report.images_decoded,
            "num_images_region_decoded": report.images_region_decoded,
            "num_shards": count,
            "source_bytes_read": report.bytes_read,
            "crop_bytes_written": report.bytes_written,
            "dagster/row_count": len(report.rows),
            "crops_per_second": round(report.crops / report.seconds, 1) if report.crops else 0.0,
            "crops_per_class": table(per_class),
            "crop_sizes": table(size_histogram(rows)),
            "failures": table(failures),
            "contact_sheet": thumbnail_markdown(sheet, "sample crops per class"),
            "contact_sheet_path": location(crops_store.uri(CONTACT_SHEET)),
            "source": location(source.uri()),
            "path": location(crops_store.uri()),
        },
    )
    yield failure_rate_check(failures, report.images, config.max_failure_rate)


@dg.config_mapping
def _every_step(config: CropsConfig) -> dict:
    """The one ``crops`` config (``ops: {crops: {config: ...}}``, as for any asset) given to each of its steps."""
    same = {"config": config.model_dump()}
    return {"crop_plan": same, "crop_shard": same, "crop_merge": same}


@dg.graph_asset(partitions_def=exports_partitions, group_name="detections", kinds={"jpeg"},
                check_specs=[failure_rate_spec("crops")], config=_every_step)
def crops(md_detections, images):
    """Every animal box at or above the threshold cropped to ``<file>___cropNN_<detector>.jpg``, each image
    read once from its source and its crops written straight to the store; a re-run crops only what is
    missing or changed. Failed images are reported with their category. A large export fans out: one step
    per shard (a process under the multiprocess executor, a pod under k8s_job_executor), merged into one
    value identical to a one-step run."""
    shards = crop_plan(md_detections).map(
        lambda planned: crop_shard(planned=planned, md_detections=md_detections, images=images))
    value, check = crop_merge(shards=shards.collect(), md_detections=md_detections, images=images)
    return {"result": value, f"crops_{FAILURE_RATE}": check}


def _failures(report: CropReport, images: ImageManifest) -> pd.DataFrame:
    """The failed images with their category and message; one the images stage rejected keeps its category and
    reason from there rather than "not in the images manifest"."""
    failures = pd.DataFrame([{"file": file, "category": category, "error": report.errors.get(file, "")}
                             for file, category in sorted(report.failures.items())],
                            columns=["file", "category", "error"])
    verified = images.manifest.set_index("file_name")
    rejected = failures["file"].isin(verified.index[~verified["status"].isin(USABLE)])
    if rejected.any():
        earlier = verified.loc[failures.loc[rejected, "file"]]
        failures.loc[rejected, "category"] = earlier["status"].to_numpy()
        failures.loc[rejected, "error"] = ("rejected by images: " + earlier["error"].astype(str)).to_numpy()
    return failures
