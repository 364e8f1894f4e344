"""Thin asset definitions, one module per stage."""

from animl_assets.assets.crops import crops
from animl_assets.assets.dataset import classification_dataset, splits
from animl_assets.assets.detections import md_detections
from animl_assets.assets.empty import EMPTY_CHECKS, EMPTY_PER_EXPORT_ASSETS, EMPTY_TRAINING_ASSETS, empty_frames
from animl_assets.assets.evaluation import classifier_evaluation, model_comparison
from animl_assets.assets.exports import cct_export, exports_partitions, make_new_exports_sensor
from animl_assets.assets.images import images
from animl_assets.assets.inference import (
    classifications,
    classified_detections,
    mislabeled_candidates,
    review_queue,
)
from animl_assets.assets.registry import beats_champion, champion_model, registered_model
from animl_assets.assets.training import classifier_checkpoint

PER_EXPORT_ASSETS = [cct_export, images, md_detections, crops]
DATASET_ASSETS = [classification_dataset, splits]
TRAINING_ASSETS = [classifier_checkpoint, classifier_evaluation, registered_model, champion_model]
TRAINING_CHECKS = [beats_champion]
REVIEW_ASSETS = [classifications, classified_detections, review_queue]
REVIEW_ACROSS_EXPORTS = [mislabeled_candidates]
ALL_ASSETS = [*PER_EXPORT_ASSETS, *DATASET_ASSETS, *TRAINING_ASSETS, model_comparison, *REVIEW_ASSETS,
              *REVIEW_ACROSS_EXPORTS, *EMPTY_PER_EXPORT_ASSETS, *EMPTY_TRAINING_ASSETS]

__all__ = ["ALL_ASSETS", "DATASET_ASSETS", "EMPTY_CHECKS", "EMPTY_PER_EXPORT_ASSETS", "EMPTY_TRAINING_ASSETS",
           "empty_frames", "PER_EXPORT_ASSETS", "REVIEW_ASSETS", "TRAINING_ASSETS", "TRAINING_CHECKS",
           "REVIEW_ACROSS_EXPORTS", "beats_champion", "classifications", "classified_detections",
           "mislabeled_candidates", "review_queue",
           "cct_export", "champion_model", "classification_dataset", "classifier_checkpoint",
           "classifier_evaluation", "crops", "model_comparison", "registered_model",
           "exports_partitions", "images", "make_new_exports_sensor", "md_detections", "splits"]
