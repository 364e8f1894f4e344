"""Dagster resources: where artifacts, exports and images live, and where trainings are tracked."""

import os

import dagster as dg
from dagster_aws.s3 import S3Resource

from animl_assets.resources.io_manager import ArtifactIOManager
from animl_assets.resources.storage import (
    ArtifactStore,
    ExportsLocation,
    ImageSource,
    LocalStore,
    S3Store,
    StoreResource,
    open_store,
)
from animl_assets.resources.tracking import MlflowTracking
from animl_assets.settings import Settings, referenced_fields

__all__ = ["LocalStore", "S3Store", "StoreResource", "build_resources", "open_store"]


def build_resources(settings: Settings | None = None) -> dict[str, dg.ConfigurableResource]:
    """Local folders under ANIML_HOME by default; any location may be an s3:// URI instead.

    Without ``settings`` the resources refer to the environment variables by name (``dg.EnvVar``), read
    when a run starts; with ``settings`` (tests, embedding) they hold its values.
    """
    fields = referenced_fields(os.environ) if settings is None else settings.resource_fields()
    s3 = S3Resource(**fields["s3"])
    storage = ArtifactStore(s3=s3, **fields["storage"])
    return {
        "storage": storage,
        "io_manager": ArtifactIOManager(storage=storage),
        "exports": ExportsLocation(s3=s3, **fields["exports"]),
        "image_source": ImageSource(s3=s3, **fields["image_source"]),
        "mlflow": MlflowTracking(**fields["mlflow"]),
    }
