"""The one Definitions: assets, checks, jobs, sensors, and resources chosen from the environment."""

import os
import warnings
from typing import Mapping

import dagster as dg
from dagster_aws.s3 import S3Resource

from animl_assets.assets import (DATASET_ASSETS, PER_EXPORT_ASSETS, REVIEW_ACROSS_EXPORTS, REVIEW_ASSETS,
                                 TRAINING_ASSETS, TRAINING_CHECKS, make_new_exports_sensor, model_comparison)
from animl_assets.automation import end_dead_runs_sensor, make_automation_sensor, make_retraining_schedule
from animl_assets.k8s import executor
from animl_assets.resources.io_manager import ArtifactIOManager
from animl_assets.resources.storage import ArtifactStore, ExportsLocation, ImageSource
from animl_assets.resources.tracking import MlflowTracking
from animl_assets.settings import ENV_VARS, Settings

# Data versions on Output are beta in Dagster 1.13; the project relies on them on purpose.
warnings.filterwarnings("ignore", message="Parameter `data_version`", category=dg.BetaWarning)

INGEST_JOB = "ingest_export"
DATASET_JOB = "build_dataset"
TRAIN_JOB = "train_classifier"
COMPARE_JOB = "compare_models"
CLASSIFY_JOB = "classify_export"
RETRAIN_JOB = "retrain_classifier"


def _from_env(env: Mapping[str, str]) -> dict[str, dict]:
    """Resource fields as ``dg.EnvVar`` references to the variables that are set (the launchpad shows the
    variable's name, never its value); unset ones keep the resources' defaults under ANIML_HOME."""
    def refer(*names: str) -> dict:
        return {ENV_VARS[name]: dg.EnvVar(name) for name in names if env.get(name)}

    s3_fields = {"endpoint_url": next((dg.EnvVar(n) for n in ("ANIML_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
                                       if env.get(n)), None),
                 "region_name": next((dg.EnvVar(n) for n in ("AWS_REGION", "AWS_DEFAULT_REGION") if env.get(n)),
                                     "us-east-1")}
    home = refer("ANIML_HOME")
    depth = {"max_depth": dg.EnvVar.int("ANIML_EXPORTS_MAX_DEPTH")} if env.get("ANIML_EXPORTS_MAX_DEPTH") else {}
    return {"s3": s3_fields, "storage": home | refer("ANIML_STORAGE_URI"),
            "exports": home | refer("ANIML_EXPORTS_URI") | depth,
            "image_source": home | refer("ANIML_IMAGES_URI", "ANIML_ALLOWED_IMAGE_ROOTS"),
            "mlflow": home | refer("MLFLOW_TRACKING_URI", "ANIML_MLFLOW_UI_URL", "ANIML_MLFLOW_ARTIFACTS_URI")}


def build_resources(settings: Settings | None = None) -> dict[str, dg.ConfigurableResource]:
    """Local folders under ANIML_HOME by default; any location may be an s3:// URI instead.

    Without ``settings`` the resources refer to the environment variables by name (``dg.EnvVar``), read
    when a run starts; with ``settings`` (tests, embedding) they hold its values.
    """
    if settings is None:
        fields = _from_env(os.environ)
    else:
        home = {"home": str(settings.home)}
        fields = {"s3": {"endpoint_url": settings.s3_endpoint_url, "region_name": settings.s3_region},
                  "storage": home | {"uri": settings.storage_uri}, "exports": home | {"uri": settings.exports_uri, "max_depth": settings.exports_max_depth},
                  "image_source": home | {"uri": settings.images_uri, "allowed_roots": settings.allowed_image_roots},
                  "mlflow": home | {"tracking_uri": settings.mlflow_tracking_uri, "ui_url": settings.mlflow_ui_url,
                                    "artifacts_uri": settings.mlflow_artifacts_uri}}
    s3 = S3Resource(**fields["s3"])
    storage = ArtifactStore(s3=s3, **fields["storage"])
    return {
        "storage": storage,
        "io_manager": ArtifactIOManager(storage=storage),
        "exports": ExportsLocation(s3=s3, **fields["exports"]),
        "image_source": ImageSource(s3=s3, **fields["image_source"]),
        "mlflow": MlflowTracking(**fields["mlflow"]),
    }


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    """Assemble the project; resources come from ``settings``, or from the environment when not given."""
    ingest_job = dg.define_asset_job(
        INGEST_JOB, selection=dg.AssetSelection.assets(*PER_EXPORT_ASSETS),
        description="Validate one export, make its images available, detect and crop its animals.",
    )
    dataset_job = dg.define_asset_job(
        DATASET_JOB, selection=dg.AssetSelection.assets(*DATASET_ASSETS),
        description="Build one dataset version across exports and split it by location.",
    )
    train_job = dg.define_asset_job(
        TRAIN_JOB, selection=dg.AssetSelection.assets(*TRAINING_ASSETS, *REVIEW_ACROSS_EXPORTS),
        description="Train a classifier on the latest dataset version and splits (GPU-tagged; MLflow run), "
                    "evaluate it, list mislabeled candidates, register it and promote it to champion if it beats "
                    "the current one.",
    )
    classify_job = dg.define_asset_job(
        CLASSIFY_JOB, selection=dg.AssetSelection.assets(*REVIEW_ASSETS),
        description="Classify one export's crops with the champion and write its MegaDetector JSON for Timelapse.",
    )
    compare_job = dg.define_asset_job(
        COMPARE_JOB, selection=dg.AssetSelection.assets(model_comparison),
        description="Set registered versions and external TorchScript models beside the latest evaluation.",
    )
    retrain_job = dg.define_asset_job(
        RETRAIN_JOB, selection=dg.AssetSelection.assets(*DATASET_ASSETS, *TRAINING_ASSETS, *REVIEW_ACROSS_EXPORTS),
        description="A new dataset version across exports, its splits, and a classifier trained on them (from the "
                    "champion when the schedule starts it), evaluated, registered and gated.",
    )
    return dg.Definitions(
        assets=[*PER_EXPORT_ASSETS, *DATASET_ASSETS, *TRAINING_ASSETS, model_comparison, *REVIEW_ASSETS,
                *REVIEW_ACROSS_EXPORTS],
        asset_checks=TRAINING_CHECKS,
        jobs=[ingest_job, dataset_job, train_job, compare_job, classify_job, retrain_job],
        sensors=[make_new_exports_sensor(ingest_job),
                 make_automation_sensor(dg.AssetSelection.assets(*REVIEW_ASSETS)), end_dead_runs_sensor],
        schedules=[make_retraining_schedule(retrain_job)],
        resources=build_resources(settings),
        executor=executor(os.environ),
    )


defs = build_definitions()
