"""``images``: every image an export references, listed in a manifest with its status (copied only on request)."""

import posixpath
from typing import Iterator

import dagster as dg
import pandas as pd
from pydantic import Field

from animl_assets.assets.artifacts import (
    location,
    read_csv,
    stage_asset,
    stop,
    table,
    table_schema,
)
from animl_assets.assets.checks import failure_rate_check, failure_rate_spec, log_failures
from animl_assets.assets.exports import exports_partitions
from animl_assets.core.artifact_files import value_version
from animl_assets.core.detect.megadetector import sizes_needed
from animl_assets.core.files import Journal
from animl_assets.core.ingest.cct import IMAGE_KEY_FIELDS, ExportArtifacts, export_profile
from animl_assets.core.ingest.exports import export_key_for
from animl_assets.core.ingest.images import (
    FETCH_FAILED,
    GOOD,
    MANIFEST_COLUMNS,
    MAX_PIXELS,
    STATUSES,
    USABLE,
    ImageManifest,
    ImageRequest,
    collect_images,
    list_images,
)
from animl_assets.core.layout import artifact_key, partition_folder
from animl_assets.core.paths import is_under, redact_credentials
from animl_assets.core.store import Store
from animl_assets.resources.storage import ArtifactStore, ExportsLocation, ImageSource, open_store

IMAGES_ROOT_INFO_KEY = "animl_images_root"
MANIFEST = "manifest.csv"


class ImagesConfig(dg.Config):
    """Where an export's images come from and how hard to try."""

    images_root: str = Field(
        default="",
        description="Local folder or s3://bucket/prefix the export's image keys are relative to. Empty: the "
                    "export's info.animl_images_root, else the image_source resource, else the export's folder.",
    )
    source_key_field: str = Field(
        default="",
        description="Image field holding the key in the images root; images without it fall back to file_name. "
                    "Empty: by the export's profile (Animl exports: serving_bucket_key; others: file_name).",
    )
    mirror: bool = Field(default=False, description="Opt-in: copy every referenced image that decodes into the "
                         "artifact store (images/<export>/files/), each verified by a full decode. Off: images are "
                         "only listed (existence, size and time from one HEAD each), and crops reads each image it "
                         "needs from its source once; an archive is never duplicated.")
    workers: int = Field(default=16, ge=1, le=64, description="Parallel requests (HEADs, or fetches when mirroring).")
    attempts: int = Field(default=3, ge=1, le=10, description="Tries per image before it is reported bad.")
    max_megapixels: float = Field(default=MAX_PIXELS / 1e6, gt=0, description="Images larger than this are "
                                  "reported bad without being decoded (decompression bombs); memory stays within "
                                  "workers x this.")
    max_failure_rate: float = Field(default=0.05, ge=0, le=1, description="The failure_rate check warns when "
                                                                           "more than this share of images fail.")


def image_store(manifest: ImageManifest, storage: ArtifactStore, partition: str, exports: ExportsLocation,
                image_source: ImageSource) -> Store:
    """Where the crops step reads an export's images: the source the manifest recorded, or its copies in the
    artifact store when they were mirrored (a manifest from before sources were recorded: mirrored)."""
    if not manifest.source or manifest.source.get("mirrored"):
        return storage.store().child(artifact_key("images", partition, "files"))
    return open_store(manifest.source["uri"], exports.s3 or image_source.s3)


def resolve_image_source(config: ImagesConfig, cct: dict, partition: str, image_source: ImageSource,
                         exports: ExportsLocation) -> Store:
    """The store the export's image keys are relative to, by the precedence ImagesConfig describes. A root
    the export names itself (``info.animl_images_root``) must lie under one of the allowed roots."""
    export_folder = posixpath.dirname(export_key_for(partition))
    exports_store = exports.store()
    folder_store = exports_store.child(export_folder) if export_folder else exports_store
    info = cct.get("info") if isinstance(cct.get("info"), dict) else {}
    named = info.get(IMAGES_ROOT_INFO_KEY)
    if named and not config.images_root:
        allowed = image_source.allowed(folder_store.uri())
        if not isinstance(named, str) or not any(is_under(named, root) for root in allowed):
            raise stop(
                description=f"the export names {IMAGES_ROOT_INFO_KEY} {redact_credentials(str(named))!r}, which is "
                            f"not under an allowed root ({', '.join(allowed)}): refused. An operator can allow it "
                            "with ANIML_ALLOWED_IMAGE_ROOTS, `animl register --images-root`, or the images asset's "
                            "images_root config.",
                metadata={"images_root": str(named), "allowed_roots": dg.MetadataValue.json(allowed)})
    root = config.images_root or named or image_source.location
    return open_store(root, exports.s3 or image_source.s3) if root else folder_store


@stage_asset(partitions_def=exports_partitions, group_name="ingest", kinds={"jpeg"},
             check_specs=[failure_rate_spec("images")])
def images(context: dg.AssetExecutionContext, config: ImagesConfig, cct_export: ExportArtifacts,
           storage: ArtifactStore, exports: ExportsLocation,
           image_source: ImageSource) -> Iterator[dg.Output | dg.AssetCheckResult]:
    """Every referenced image listed with its status: ``present`` in the source (one HEAD each, nothing
    downloaded: crops reads each image it needs once), or ``nonexistent``, ``non_image``, ``bad``, or
    ``fetch_failed`` for a transport fault. With ``mirror`` (opt-in) each image is also copied into the
    artifact store if it decodes (good, non_image, truncated, bad), and good copies already there, or
    recorded by a run that was killed, are not fetched again."""
    partition = context.partition_key
    store = storage.store()
    cct = cct_export.export
    source = resolve_image_source(config, cct, partition, image_source, exports)
    key_field = config.source_key_field or IMAGE_KEY_FIELDS[export_profile(cct)]
    requests = [ImageRequest(str(image["id"]), str(image["file_name"]), str(image.get(key_field) or image["file_name"]))
                for image in cct["images"]]
    context.log.info(f"{len(requests)} referenced, source {source.uri()}, keys from {key_field}"
                     f"{', mirrored into the artifact store' if config.mirror else ''}")
    if config.mirror:
        manifest = _mirror(context, config, requests, source, storage, partition)
        recorded = {"uri": store.uri(artifact_key("images", partition, "files")), "mirrored": True}
    else:
        manifest = list_images(requests, source, probe=sizes_needed(cct), workers=config.workers,
                               attempts=config.attempts, max_pixels=int(config.max_megapixels * 1e6))
        recorded = {"uri": source.uri(), "mirrored": False}
        store.write_bytes(artifact_key("images", partition, MANIFEST), manifest.to_csv(index=False).encode())
    manifest_key = artifact_key("images", partition, MANIFEST)
    counts = manifest["status"].value_counts()
    failures = manifest[~manifest["status"].isin(USABLE)][["file_name", "status", "error"]]
    log_failures(context.log, failures, "status", store.uri(manifest_key))
    if counts.get(FETCH_FAILED):
        context.log.warning(f"{counts[FETCH_FAILED]} images could not be reached ({config.attempts} attempts each, "
                            "transport errors): not marked bad, they are tried again on the next run")
    value = ImageManifest(manifest, recorded)
    yield dg.Output(  # the version leaves out `fetched`: a re-run that fetched nothing is the same data
        value, data_version=dg.DataVersion(value_version(ImageManifest(manifest.drop(columns="fetched"), recorded),
                                                         "manifest")),
        metadata={
            **{f"num_{status}": int(counts.get(status, 0)) for status in STATUSES},
            "num_fetched": int(manifest["fetched"].sum()),
            "mirrored": config.mirror,
            "source_key_field": key_field,
            "num_reused": int(((manifest["status"] == GOOD) & ~manifest["fetched"].astype(bool)).sum()),
            "dagster/row_count": len(manifest),
            "dagster/column_schema": table_schema(manifest),
            "source": location(source.uri()),
            "failures": table(failures),
        },
    )
    yield failure_rate_check(failures, len(manifest), config.max_failure_rate)


def _mirror(context: dg.AssetExecutionContext, config: ImagesConfig, requests: list[ImageRequest], source: Store,
            storage: ArtifactStore, partition: str) -> pd.DataFrame:
    """The opt-in copy: each image fetched, fully decoded and, when good, written under images/<export>/files/."""
    store = storage.store()
    previous = read_csv(store, artifact_key("images", partition, MANIFEST))
    already_good = ({} if previous is None else
                    {row["file_name"]: row for row in previous.to_dict("records") if row["status"] == GOOD})
    logged = [0]

    def progress(done: int, total: int) -> None:  # about ten lines, however large the export
        if done * 10 // total > logged[0] or done == total:
            logged[0] = done * 10 // total
            context.log.info(f"{done}/{total} checked")

    journal = Journal(storage.cache("images", partition_folder(partition)) / "manifest.journal.csv", MANIFEST_COLUMNS)
    manifest = collect_images(requests, source, store.child(artifact_key("images", partition, "files")),
                              already_good=already_good, workers=config.workers, attempts=config.attempts,
                              max_pixels=int(config.max_megapixels * 1e6), journal=journal, on_progress=progress)
    store.write_bytes(artifact_key("images", partition, MANIFEST), manifest.to_csv(index=False).encode())
    journal.remove()  # only now: the manifest holds what a killed run did
    return manifest
