"""What a training is and what it and its evaluation leave, with no PyTorch import (the Definitions, the
CLI and the sensors load without it): the parameters and their resume key, the backbones' names and input
sizes, the checkpoints a training keeps, and the value types ``TrainedClassifier`` and ``Evaluation``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import pandas as pd

from animl_assets.core.artifact_files import (
    Arrays,
    Blob,
    NOT_A_CHECKPOINT,
    JsonRecord,
    TorchFile,
    artifact_file,
    artifact_files,
    config_key,
    read_checkpoint,
    torch_bytes,
)
from animl_assets.core.ml.frames import INTERPOLATIONS, Preprocessing
from animl_assets.core.ml.labels import label_names
from animl_assets.core.store import Store

EFFICIENTNETS = tuple(f"efficientnet-b{i}" for i in range(8))
LITE0 = "efficientnet-lite0"
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
VALID_MODELS = (*EFFICIENTNETS, LITE0, *RESNETS)
IMAGE_SIZES = {name: size for name, size in zip(EFFICIENTNETS, (224, 240, 260, 300, 380, 456, 528, 600))}


TIMM = "timm/"  # model_name prefix: a timm architecture by name (``timm/convnext_tiny``, ``timm/resnet50.a1_in1k``)


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights could not be downloaded (e.g. offline) or loaded; the message names the file to
    provide."""


def is_timm(model_name: str) -> bool:
    return model_name.startswith(TIMM)


def timm_name(model_name: str) -> str:
    """timm's name of a ``timm/<name>`` model (architecture, optionally ``.tag`` for one set of weights)."""
    return model_name.removeprefix(TIMM)


def check_model_name(model_name: str, ask_timm: bool = True) -> str:
    """``model_name`` when it names a backbone (one of ``VALID_MODELS`` or a timm model), else ValueError.
    Without ``ask_timm`` any ``timm/<name>`` passes (timm is not imported)."""
    if model_name in VALID_MODELS:
        return model_name
    if is_timm(model_name) and timm_name(model_name):
        if not ask_timm:
            return model_name
        import timm

        if timm.is_model(timm_name(model_name)):
            return model_name
        raise ValueError(f"timm has no model {timm_name(model_name)!r} (timm {timm.__version__}; "
                         "timm.list_models() lists them)")
    raise ValueError(f"unknown model {model_name!r}: one of {', '.join(VALID_MODELS)}, or timm/<name>")


def _timm_config(model_name: str) -> Any:
    from timm.models import get_pretrained_cfg

    return get_pretrained_cfg(timm_name(model_name))


def default_image_size(model_name: str) -> int:
    """The input size the model was designed for: EfficientNet-B0…B7 224…600, a timm model its pretrained
    config's, everything else 224."""
    if is_timm(model_name):
        config = _timm_config(model_name)
        return int(config.input_size[-1]) if config is not None else 224
    return IMAGE_SIZES.get(model_name, 224)


def model_preprocessing(model_name: str, image_size: int) -> Preprocessing:
    """The input ``model_name``'s weights expect, at ``image_size``: a timm model's mean, std and
    interpolation from its pretrained config; ImageNet's mean and std and bicubic resizing for the others
    (the reference's, and what efficientnet-lite-pytorch feeds its Lite0). The crop is not cut further
    (timm's ``crop_pct``): a crop already frames its animal."""
    config = _timm_config(model_name) if is_timm(model_name) else None
    if config is None:
        return Preprocessing(image_size)
    interpolation = config.interpolation if config.interpolation in INTERPOLATIONS else "bicubic"
    return Preprocessing(image_size, tuple(config.mean), tuple(config.std), interpolation)


LAST = "last.pt"
BEST = "best.pt"


RECIPES = ("modern", "reference")
AUGMENTS = ("trivialaugment", "randaugment", "reference")


@dataclass
class TrainingParams:
    """Every knob of one training (the asset's TrainingConfig without the run-only ones).

    ``recipe``: ``reference`` is ``train_classifier.py``'s (RMSprop or SGD with step decay, its augmentation,
    plain cross-entropy) for parity runs; ``modern`` is AdamW with warm-up and cosine decay, label
    smoothing, an optional lower rate for a pretrained body than for the new head, gradient clipping, an EMA
    of the weights and TrivialAugmentWide/RandAugment with optional MixUp/CutMix. The knobs below ``patience``
    belong to ``modern``; ``reference`` ignores them."""

    model_name: str = "efficientnet-b0"
    image_size: int = 224
    epochs: int = 30
    batch_size: int = 64
    lr: float | None = None  # None: the recipe's (reference 0.016 * batch_size / 256, modern 1e-3)
    weight_decay: float | None = None  # None: the recipe's (reference 1e-5, modern 0.05)
    label_weighted: bool = True
    weight_by_detection_conf: bool = False
    finetune: int = 0
    patience: int = 8
    recipe: str = "modern"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    body_lr_scale: float = 1.0  # a pretrained body's rate relative to the head's (1: one rate)
    grad_clip: float = 1.0  # max gradient norm; 0: no clipping
    ema_decay: float = 0.998  # 0: no EMA
    augment: str = "trivialaugment"
    mixup_alpha: float = 0.0  # 0: no MixUp
    cutmix_alpha: float = 0.0  # 0: no CutMix
    seed: int = 0
    # a multi-output model: its extra outputs' class counts (from the dataset), their loss weights (1 unless
    # given) and the output whose val top-1 picks the best epoch and stops the training early
    outputs: dict[str, int] = field(default_factory=dict)
    output_weights: dict[str, float] = field(default_factory=dict)
    early_stopping_output: str = "species"
    num_workers: int = 2
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    progress_every: int = 50

    def __post_init__(self) -> None:
        if self.early_stopping_output not in ("species", *self.outputs):
            raise ValueError(f"early_stopping_output must be species or one of the outputs {list(self.outputs)}, "
                             f"not {self.early_stopping_output!r}")
        if self.outputs and (self.mixup_alpha or self.cutmix_alpha) and self.modern:
            raise ValueError("MixUp and CutMix mix the species labels only: turn them off for a multi-output model")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, not {self.recipe!r}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, not {self.augment!r}")

    @property
    def modern(self) -> bool:
        return self.recipe == "modern"

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.modern else 0.016 * self.batch_size / 256

    @property
    def decay(self) -> float:
        """The weight decay in effect."""
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.05 if self.modern else 1e-5

    @property
    def ema(self) -> bool:
        return self.modern and self.ema_decay > 0

    @property
    def preprocessing(self) -> Preprocessing:
        return model_preprocessing(self.model_name, self.image_size)


RUN_ONLY = ("num_workers", "device", "progress_every")  # how it runs, not what it learns: not in the resume key
SPECIES_ONLY = {"outputs": {}, "output_weights": {}, "early_stopping_output": "species"}  # a one-head training's


def resume_key(params: TrainingParams, dataset_version: str, splits_version: str, crops_versions: Mapping[str, str],
               init_fingerprint: str) -> str:
    """What one training learns from (its hyperparameters, data versions and starting weights): a re-run
    with the same key resumes its checkpoints."""
    learned = {k: v for k, v in asdict(params).items()  # a one-head training keeps the key it had before outputs
               if k not in RUN_ONLY and not (k in SPECIES_ONLY and v == SPECIES_ONLY[k])}
    return config_key({"params": learned, "dataset": dataset_version, "splits": splits_version,
                       "crops": dict(crops_versions), "init": init_fingerprint})


class Checkpoints:
    """Per-epoch training state in a store folder: ``last.pt`` (everything needed to resume) and ``best.pt``
    (the best-on-val model in the reference layout). Every write is atomic (the store's contract)."""

    def __init__(self, store: Store, folder: str) -> None:
        self.store, self.folder = store, folder.rstrip("/")

    def uri(self, name: str) -> str:
        return self.store.uri(f"{self.folder}/{name}")

    def save(self, name: str, state: Mapping[str, Any]) -> None:
        self.store.write_bytes(f"{self.folder}/{name}", torch_bytes(dict(state)))

    def load(self, name: str, warn: Callable[[str], None] | None = None) -> dict[str, Any] | None:
        """The state saved as ``name``, or None when there is none. One that cannot be read (a truncated
        file, say) is moved aside to ``<name>.unreadable``, ``warn`` is told, and None is returned: the
        training starts over instead of failing on it for ever."""
        key = f"{self.folder}/{name}"
        if not self.store.exists(key):
            return None
        data = self.store.read_bytes(key)
        try:
            return read_checkpoint(data)
        except NOT_A_CHECKPOINT as err:
            self.store.write_bytes(f"{key}.unreadable", data)
            self.store.delete(key)
            if warn is not None:
                warn(f"{self.uri(name)} cannot be read ({str(err).splitlines()[0][:200]}): moved to "
                     f"{name}.unreadable; starting over")
            return None


@dataclass
class FitResult:
    """What ``fit`` leaves: the best checkpoint (reference layout), every epoch's metrics, and how it ran."""

    best: dict[str, Any]
    history: list[dict[str, float]]
    stopped_early: bool
    resumed_from_epoch: int | None
    seconds: float = 0.0


@dataclass
class TrainedClassifier:
    """The trained model as the reference leaves it: the best-on-val checkpoint, ``params.json`` and
    ``label_index.json``; plus every epoch's metrics."""

    ckpt: TorchFile = field(metadata=artifact_file("ckpt_best.pt"))
    params: dict[str, Any] = field(metadata=artifact_file("params.json"))
    label_index: dict[str, str] = field(metadata=artifact_file("label_index.json"))
    history: pd.DataFrame = field(metadata=artifact_file("history.csv"))
    # a multi-output model's extra outputs: one label_index_<output>.json each, in its heads' order
    output_index: dict[str, dict[str, str]] = field(default_factory=dict,
                                                    metadata=artifact_files("label_index_{}.json"))


@dataclass
class Evaluation:
    """An evaluation's files: the reference's four (one outputs file per split), the TorchScript model, its
    ONNX and ``torch.export`` forms, the per-label report and thresholds, the label index the probability columns
    follow, the evaluated checkpoint's ``params.json`` (model, input size, dataset and splits versions), the
    unknowns' threshold (``open_set.json``) and the test predictions' profile that drift is measured against."""

    outputs_train: pd.DataFrame = field(metadata=artifact_file("outputs_train.csv.gz"))
    outputs_val: pd.DataFrame = field(metadata=artifact_file("outputs_val.csv.gz"))
    outputs_test: pd.DataFrame = field(metadata=artifact_file("outputs_test.csv.gz"))
    overall_metrics: pd.DataFrame = field(metadata=artifact_file("overall_metrics.csv"))
    confusion_matrices: Arrays = field(metadata=artifact_file("confusion_matrices.npz"))
    label_stats: pd.DataFrame = field(metadata=artifact_file("label_stats.csv"))
    label_report: pd.DataFrame = field(metadata=artifact_file("label_report.csv"))
    thresholds: dict[str, Any] = field(metadata=artifact_file("thresholds.json"))
    label_index: dict[str, str] = field(metadata=artifact_file("label_index.json"))
    compiled: Blob = field(metadata=artifact_file("ckpt_best_compiled.pt"))
    onnx: Blob = field(default=Blob(b""), metadata=artifact_file("model.onnx"))  # empty: not exported
    exported: Blob = field(default=Blob(b""), metadata=artifact_file("model.pt2"))  # torch.export program
    params: dict[str, Any] = field(default_factory=dict, metadata=artifact_file("params.json"))
    # the unknowns' score and threshold fitted on val (core.ml.open_set), and the test split's prediction profile
    # (core.ml.drift): {} in evaluations from before they existed
    open_set: dict[str, Any] = field(default_factory=dict, metadata=artifact_file("open_set.json"))
    prediction_profile: dict[str, Any] = field(default_factory=dict, metadata=artifact_file("prediction_profile.json"))
    # a multi-output model: each extra output's label index and reference files (outputs_{split}_<output>.csv.gz,
    # overall_metrics_<output>.csv, confusion_matrices_<output>.npz, label_stats_<output>.csv), and the TorchScript
    # model of every head (its logits side by side, species first) that classification runs
    output_index: dict[str, dict[str, str]] = field(default_factory=dict,
                                                    metadata=artifact_files("label_index_{}.json"))
    output_files: dict[str, Any] = field(default_factory=dict, metadata=artifact_files("{}"))
    compiled_outputs: Blob = field(default=Blob(b""), metadata=artifact_file("ckpt_best_compiled_outputs.pt"))

    def outputs(self, split: str) -> pd.DataFrame:
        return getattr(self, f"outputs_{split}")

    @property
    def names(self) -> list[str]:
        return label_names(self.label_index)

    def metrics(self, split: str) -> dict[str, float]:
        row = self.overall_metrics[self.overall_metrics["split"] == split]
        return {} if row.empty else {k: float(v) for k, v in row.iloc[0].items() if k != "split"}


@dataclass
class Classifications(JsonRecord):
    """``classifications``' value for one export: which model classified its crops (``key``: model, crops and
    mapping), the label index of the output's columns, where the outputs are, and the crops that failed."""

    key: str
    model: str
    classifier: str
    label_index: dict[str, str]
    output: str  # classifier_output.csv.gz's key in the store
    num_classified: int
    num_failed: int
    mapping: dict[str, list[str]] | None
    failures: list[dict[str, str]]
    completed: str  # ISO 8601, UTC
    sequence_output: str  # "" without per-sequence outputs
    unknown_column: str = ""  # the output's column flagging unknowns ("": the model has no unknowns' threshold)
    num_unknown: int = 0
    outputs: dict[str, str] = field(default_factory=dict)  # a multi-output model's: {output: its file's store key}
