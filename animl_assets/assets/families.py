"""Model families: the species classifier (trained on crops) and the empty-or-not model (trained on whole
frames) are made by the same training, evaluation, registration and gate code; a family names the assets it
reads and writes and the model it registers."""

from __future__ import annotations

from dataclasses import dataclass

from animl_assets.core.registry import registry

EMPTY_MODEL = "animl-empty"


@dataclass(frozen=True)
class ModelFamily:
    """The assets one kind of model is made of, its registered model and its MLflow experiments' prefix."""

    images: str  # the per-export files it trains on: crops or whole frames (also their folder in the store)
    dataset: str
    splits: str
    checkpoint: str
    evaluation: str
    registered: str
    champion: str
    registry_name: str
    experiment: str


CLASSIFIER = ModelFamily("crops", "classification_dataset", "splits", "classifier_checkpoint", "classifier_evaluation",
                         "registered_model", "champion_model", registry.DEFAULT_MODEL, "animl")
EMPTY = ModelFamily("empty_frames", "empty_dataset", "empty_splits", "empty_checkpoint", "empty_evaluation",
                    "registered_empty_model", "empty_champion", EMPTY_MODEL, "animl-empty")
FAMILIES = (CLASSIFIER, EMPTY)


def family_of(asset: str) -> ModelFamily:
    """The family an asset (by name) belongs to."""
    return next(f for f in FAMILIES if asset in (f.images, f.dataset, f.splits, f.checkpoint, f.evaluation,
                                                  f.registered, f.champion))
