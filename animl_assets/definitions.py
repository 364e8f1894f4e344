"""The one Definitions: assets, checks, jobs, sensors, and resources chosen from the environment."""

import dagster as dg
from dagster_aws.s3 import S3Resource

from animl_assets.assets import DATASET_ASSETS, PER_EXPORT_ASSETS, make_new_exports_sensor
from animl_assets.resources.storage import StoreResource
from animl_assets.settings import Settings

INGEST_JOB = "ingest_export"
DATASET_JOB = "build_dataset"


def build_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """Local folders under ANIML_HOME by default; any location may be an s3:// URI instead."""
    s3 = S3Resource(endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region)
    return {
        "storage": StoreResource(uri=settings.storage_uri, s3=s3, cache_dir=str(settings.home / "cache")),
        "exports": StoreResource(uri=settings.exports_uri, s3=s3),
        "image_source": StoreResource(uri=settings.images_uri, s3=s3),
    }


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    """Assemble the project for ``settings`` (read from the environment when not given)."""
    settings = settings or Settings.from_env()
    ingest_job = dg.define_asset_job(
        INGEST_JOB, selection=dg.AssetSelection.assets(*PER_EXPORT_ASSETS),
        description="Validate one export, make its images available, detect and crop its animals.",
    )
    dataset_job = dg.define_asset_job(
        DATASET_JOB, selection=dg.AssetSelection.assets(*DATASET_ASSETS),
        description="Build one dataset version across exports and split it by location.",
    )
    return dg.Definitions(
        assets=[*PER_EXPORT_ASSETS, *DATASET_ASSETS],
        jobs=[ingest_job, dataset_job],
        sensors=[make_new_exports_sensor(ingest_job)],
        resources=build_resources(settings),
    )


defs = build_definitions()
