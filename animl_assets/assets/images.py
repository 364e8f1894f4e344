"""``images``: every image an export references, fetched, verified and listed in a manifest."""

import posixpath
from pathlib import Path
from typing import Iterator

import dagster as dg
from pydantic import Field

from animl_assets.assets.artifacts import (
    local_folder,
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
from animl_assets.core.files import Journal
from animl_assets.core.ingest.cct import IMAGE_KEY_FIELDS, ExportArtifacts, export_profile
from animl_assets.core.ingest.exports import export_key_for
from animl_assets.core.ingest.images import (
    FETCH_FAILED,
    GOOD,
    MANIFEST_COLUMNS,
    MAX_PIXELS,
    STATUSES,
    ImageManifest,
    ImageRequest,
    collect_images,
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
    workers: int = Field(default=8, ge=1, le=64, description="Parallel fetches.")
    attempts: int = Field(default=3, ge=1, le=10, description="Tries per image before it is reported bad.")
    max_megapixels: float = Field(default=MAX_PIXELS / 1e6, gt=0, description="Images larger than this are "
                                  "reported bad without being decoded (decompression bombs); memory stays within "
                                  "workers x this.")
    max_failure_rate: float = Field(default=0.05, ge=0, le=1, description="The failure_rate check warns when "
                                                                           "more than this share of images fail.")


def images_folder(storage: ArtifactStore, partition: str) -> Path:
    """An export's verified images as a local folder (synced into the cache when storage is remote)."""
    return local_folder(storage.store().child(artifact_key("images", partition, "files")),
                        storage.cache("images", partition_folder(partition)))


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
    """Each referenced image copied into the artifact store if it decodes; every image in the manifest
    with its category (good, nonexistent, non_image, truncated, bad, or fetch_failed for a transport
    fault). Good images already present, or recorded by a run that was killed, are not fetched again."""
    partition = context.partition_key
    store = storage.store()
    cct = cct_export.export
    source = resolve_image_source(config, cct, partition, image_source, exports)
    manifest_key = artifact_key("images", partition, MANIFEST)
    previous = read_csv(store, manifest_key)
    already_good = ({} if previous is None else
                    {row["file_name"]: row for row in previous.to_dict("records") if row["status"] == GOOD})
    key_field = config.source_key_field or IMAGE_KEY_FIELDS[export_profile(cct)]
    requests = [ImageRequest(str(image["id"]), str(image["file_name"]), str(image.get(key_field) or image["file_name"]))
                for image in cct["images"]]
    logged = [0]

    def progress(done: int, total: int) -> None:  # about ten lines, however large the export
        if done * 10 // total > logged[0] or done == total:
            logged[0] = done * 10 // total
            context.log.info(f"{done}/{total} checked")

    context.log.info(f"{len(requests)} referenced, source {source.uri()}, keys from {key_field}")
    journal = Journal(storage.cache("images", partition_folder(partition)) / "manifest.journal.csv", MANIFEST_COLUMNS)
    manifest = collect_images(requests, source, store.child(artifact_key("images", partition, "files")),
                              already_good=already_good, workers=config.workers, attempts=config.attempts,
                              max_pixels=int(config.max_megapixels * 1e6), journal=journal, on_progress=progress)
    manifest_bytes = manifest.to_csv(index=False).encode()
    store.write_bytes(manifest_key, manifest_bytes)  # before the journal goes: what a killed run did stays known
    journal.remove()
    counts = manifest["status"].value_counts()
    failures = manifest[manifest["status"] != GOOD][["file_name", "status", "error"]]
    log_failures(context.log, failures, "status", store.uri(manifest_key))
    if counts.get(FETCH_FAILED):
        context.log.warning(f"{counts[FETCH_FAILED]} images could not be fetched ({config.attempts} attempts each, "
                            "transport errors): not marked bad, they are fetched again on the next run")
    yield dg.Output(
        ImageManifest(manifest),  # the version leaves out `fetched`: a re-run that fetched nothing is the same data
        data_version=dg.DataVersion(value_version(manifest.drop(columns="fetched"), "manifest")),
        metadata={
            **{f"num_{status}": int(counts.get(status, 0)) for status in STATUSES},
            "num_fetched": int(manifest["fetched"].sum()),
            "source_key_field": key_field,
            "num_reused": int(((manifest["status"] == GOOD) & ~manifest["fetched"].astype(bool)).sum()),
            "dagster/row_count": len(manifest),
            "dagster/column_schema": table_schema(manifest),
            "source": location(source.uri()),
            "failures": table(failures),
        },
    )
    yield failure_rate_check(failures, len(manifest), config.max_failure_rate)
