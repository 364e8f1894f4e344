"""The one Definitions: assets, checks, jobs, sensors, and resources chosen from the environment."""

import os
import warnings

import dagster as dg

from animl_assets.assets import (
    ALL_ASSETS,
    DATASET_ASSETS,
    EMPTY_CHECKS,
    EMPTY_PER_EXPORT_ASSETS,
    EMPTY_TRAINING_ASSETS,
    PER_EXPORT_ASSETS,
    REVIEW_ACROSS_EXPORTS,
    REVIEW_ASSETS,
    TRAINING_ASSETS,
    TRAINING_CHECKS,
    make_new_exports_sensor,
    model_comparison,
)
from animl_assets.automation import (
    end_dead_runs_sensor,
    make_automation_sensor,
    make_drift_sensor,
    make_retraining_schedule,
)
from animl_assets.k8s import executor
from animl_assets.resources import build_resources
from animl_assets.settings import Settings

# Data versions on Output are beta in Dagster 1.13; the project relies on them on purpose.
warnings.filterwarnings("ignore", message="Parameter `data_version`", category=dg.BetaWarning)

INGEST_JOB = "ingest_export"
DATASET_JOB = "build_dataset"
TRAIN_JOB = "train_classifier"
COMPARE_JOB = "compare_models"
CLASSIFY_JOB = "classify_export"
RETRAIN_JOB = "retrain_classifier"
EMPTY_FRAMES_JOB = "make_empty_frames"
EMPTY_TRAIN_JOB = "train_empty_model"
EMPTY_SCORE_JOB = "score_empties"


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
    empty_jobs = [
        dg.define_asset_job(EMPTY_FRAMES_JOB, selection=dg.AssetSelection.assets(EMPTY_PER_EXPORT_ASSETS[0]),
                            description="One export's images as whole frames with their empty-or-not labels."),
        dg.define_asset_job(EMPTY_TRAIN_JOB, selection=dg.AssetSelection.assets(*EMPTY_TRAINING_ASSETS),
                            description="The empty-or-not model on whole frames: dataset, splits by location, "
                                        "training, evaluation, registration as animl-empty and its champion gate."),
        dg.define_asset_job(EMPTY_SCORE_JOB, selection=dg.AssetSelection.assets(*EMPTY_PER_EXPORT_ASSETS),
                            description="One export's images scored empty or not by the animl-empty champion, "
                                        "before any detection: set aside, or ranked for review."),
    ]
    return dg.Definitions(
        assets=ALL_ASSETS,
        asset_checks=[*TRAINING_CHECKS, *EMPTY_CHECKS],
        jobs=[ingest_job, dataset_job, train_job, compare_job, classify_job, retrain_job, *empty_jobs],
        sensors=[make_new_exports_sensor(ingest_job),
                 make_automation_sensor(dg.AssetSelection.assets(*REVIEW_ASSETS)), end_dead_runs_sensor,
                 make_drift_sensor(retrain_job)],
        schedules=[make_retraining_schedule(retrain_job)],
        resources=build_resources(settings),
        executor=executor(os.environ),
    )


defs = build_definitions()
