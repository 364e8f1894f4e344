"""``crops``: a square (or tight) JPEG crop of every animal box, with a manifest and a failure report."""

from typing import Iterator, Literal

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from animl_assets.assets.artifacts import location, stage_asset, table, thumbnail_markdown
from animl_assets.assets.checks import failure_rate_check, failure_rate_spec, log_failures
from animl_assets.assets.exports import exports_partitions
from animl_assets.assets.images import image_store
from animl_assets.core.artifact_files import value_version
from animl_assets.core.detect.contact_sheet import contact_sheet
from animl_assets.core.detect.crops import (
    JOURNAL,
    MANIFEST_COLUMNS,
    CropManifest,
    CropReport,
    crop_images,
    manifest_bytes,
)
from animl_assets.core.detect.megadetector import Detections, with_box_labels
from animl_assets.core.failures import MAX_PIXELS
from animl_assets.core.files import Journal
from animl_assets.core.ingest.images import USABLE, ImageManifest, listed_sources
from animl_assets.core.layout import artifact_key, partition_folder
from animl_assets.core.store import LocalStore
from animl_assets.core.tables import read_csv as read_table
from animl_assets.core.transfers import TRANSFER_WORKERS
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


def size_histogram(rows: pd.DataFrame) -> pd.DataFrame:
    """Crop counts by longest side in pixels."""
    sides = rows[["width", "height"]].astype(int).max(axis=1) if len(rows) else pd.Series(dtype=int)
    counts, edges = np.histogram(sides, bins=SIZE_BINS)
    return pd.DataFrame({"longest side (px)": [f"{a}–{b - 1}" for a, b in zip(edges[:-1], edges[1:])],
                         "crops": counts})


@stage_asset(partitions_def=exports_partitions, group_name="detections", kinds={"jpeg"},
             check_specs=[failure_rate_spec("crops")])
def crops(context: dg.AssetExecutionContext, config: CropsConfig, md_detections: Detections, images: ImageManifest,
          storage: ArtifactStore, exports: ExportsLocation,
          image_source: ImageSource) -> Iterator[dg.Output | dg.AssetCheckResult]:
    """Every animal box at or above the threshold cropped to ``<file>___cropNN_<detector>.jpg``, each image
    read once from its source and its crops written straight to the store; a re-run crops only what is
    missing or changed. Failed images are reported with their category."""
    partition = context.partition_key
    crops_store = storage.store().child(artifact_key("crops", partition, ""))
    source = image_store(images, storage, partition, exports, image_source)
    remote = not isinstance(source, LocalStore)
    report = crop_images(
        md_detections.md, source, crops_store,
        Journal(storage.cache("crops", partition_folder(partition)) / JOURNAL, MANIFEST_COLUMNS),
        sources=listed_sources(images.manifest), threshold=config.threshold, square=config.square,
        workers=config.workers or (TRANSFER_WORKERS if remote else None), executor=config.executor,
        max_side=config.max_side or None, max_pixels=int(config.max_megapixels * 1e6), attempts=config.attempts)
    failures = _failures(report, images)
    rows = pd.DataFrame(report.rows, columns=MANIFEST_COLUMNS)
    rows = with_box_labels(rows, md_detections.labels)
    rows["label"] = rows["label"].replace("", "(unlabelled)")
    per_class = rows.groupby("label").size().rename("crops").reset_index()
    sheet = contact_sheet(rows.groupby("label")["crop"].apply(list).to_dict(), crops_store.read_bytes)
    crops_store.write_bytes(CONTACT_SHEET, sheet)
    log_failures(context.log, failures, "category", crops_store.uri("failures.csv"))
    context.log.info(f"{report.crops} new, {report.reused} reused, {len(failures)} failed images, "
                     f"{report.seconds:.1f}s, {report.bytes_read / 1e6:.1f} MB read from {source.uri()}")
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
