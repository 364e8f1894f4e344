"""``classifier_checkpoint``: a species classifier trained on one dataset version and its splits, tracked in
MLflow, resumable after a crash, on a GPU when there is one and on several through torchrun (DDP).

PyTorch is imported when a step runs (``models``, ``training``), not when the Definitions load."""

import hashlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import dagster as dg
import pandas as pd
from pydantic import Field, field_validator

from animl_assets.assets.artifacts import (
    cached_crops,
    image_metadata,
    location,
    stage_asset,
    stop,
    table,
)
from animl_assets.assets.families import CLASSIFIER, EMPTY_MODEL, ModelFamily, family_of
from animl_assets.core.artifact_files import (
    NOT_A_CHECKPOINT,
    TorchFile,
    config_key,
    read_checkpoint,
    torch_bytes,
    value_version,
)
from animl_assets.core.dataset.classification import DatasetVersion
from animl_assets.core.files import atomic_write
from animl_assets.core.layout import training_folder, version_file, version_folder
from animl_assets.core.ml.frames import trainable_frame
from animl_assets.core.ml.plots import learning_curve
from animl_assets.core.ml.recipe import (
    BEST,
    LAST,
    AUGMENTS,
    RECIPES,
    RUN_ONLY,
    VALID_MODELS,
    Checkpoints,
    FitResult,
    PretrainedWeightsUnavailable,
    TrainedClassifier,
    TrainingParams,
    check_model_name,
    default_image_size,
    is_timm,
    resume_key,
)
from animl_assets.core.paths import redact_credentials
from animl_assets.core.registry import registry, tracking
from animl_assets.core.store import Store
from animl_assets.resources.io_manager import read_from
from animl_assets.resources.storage import ArtifactStore, read_uri
from animl_assets.resources.tracking import MlflowTracking
from animl_assets.runs import in_progress
from animl_assets.train_worker import WorkerSpec

LEARNING_CURVE = "learning_curve.png"


class TrainingConfig(dg.Config):
    """Hyperparameters of one training (the reference ``train_classifier.py``'s, plus resume and DDP)."""

    model_name: str = Field(default="efficientnet-b0", description="EfficientNet B0-B7 (efficientnet-pytorch), "
                            f"efficientnet-lite0, a torchvision ResNet ({', '.join(VALID_MODELS)}), or timm/<name> "
                            "(any timm model, e.g. timm/convnext_tiny, timm/tf_efficientnetv2_s).")
    pretrained: str = Field(default="false", description="false; true (ImageNet weights: downloads, or torch's hub "
                                                         "cache offline; timm models from the Hugging Face hub); lite0 "
                                                         "(packaged Lite0 weights, offline); or a path or s3:// URI: a "
                                                         "checkpoint (reference ckpt_N.pt or a bare state dict) or, for "
                                                         "timm, a weights file (.safetensors or .pth, loaded by timm); "
                                                         "the head is replaced when labels differ.")
    init_from: Literal["", "champion"] = Field(default="", description="champion: start from the registry's "
                                                                       "current champion model (its checkpoint; "
                                                                       "the head is replaced when labels differ).")
    registry_name: str = Field(default="", description="The registered model init_from reads; empty: the model "
                               f"family's ({registry.DEFAULT_MODEL} for the species classifier, {EMPTY_MODEL} for "
                               "the empty-or-not model).")
    class_mapping: str = Field(default="", description="init_from: champion: a class-mapping JSON (path or s3:// URI), "
                               "{new_class: [old classes]} for the species or {species: {...}, <output>: {...}}: "
                               "each new class's head row starts from its old classes' (Panthera's "
                               "-class_mapping_json). Classes it does not name keep the old class of the same name.")
    image_size: int = Field(default=0, ge=0, description="Input size; 0: the model's (b0 224 ... b7 600, others 224).")
    epochs: int = Field(default=30, ge=1)
    batch_size: int = Field(default=64, ge=1)
    recipe: Literal[RECIPES] = Field(default="modern", description="modern: AdamW, warm-up and cosine decay, "
                                     "label smoothing, an optional lower body rate, gradient clipping, an EMA of the weights, "
                                     "TrivialAugmentWide/RandAugment, optional MixUp/CutMix. reference: "
                                     "train_classifier.py's RMSprop/SGD, step decay and augmentation (parity runs; "
                                     "it ignores the modern-only fields).")
    lr: float = Field(default=0.0, ge=0, le=1, description="Learning rate (the head's under modern); 0: the recipe's "
                      "(modern 1e-3, reference 0.016 * batch_size / 256).")
    weight_decay: Optional[float] = Field(default=None, ge=0, le=1, description="None: the recipe's (modern "
                                                                                "0.05, reference 1e-5).")
    warmup_epochs: float = Field(default=1.0, ge=0, le=100, description="modern: linear warm-up, in epochs, of "
                                                                          "each group from when it starts training.")
    label_smoothing: float = Field(default=0.1, ge=0, lt=1, description="modern: cross-entropy label smoothing.")
    body_lr_scale: float = Field(default=1.0, gt=0, le=1, description="modern: a pretrained body's rate as a "
                                                                          "fraction of the head's (1: one rate).")
    grad_clip: float = Field(default=1.0, ge=0, description="modern: max gradient norm (0: no clipping).")
    ema_decay: float = Field(default=0.998, ge=0, lt=1, description="modern: EMA of the weights, validated and "
                                                                      "kept beside the raw ones (0: none).")
    augment: Literal[AUGMENTS] = Field(default="trivialaugment", description="modern: trivialaugment, "
                                       "randaugment or reference (after a random resized crop and flip).")
    mixup_alpha: float = Field(default=0.0, ge=0, le=10, description="modern: MixUp's Beta alpha (0: off).")
    cutmix_alpha: float = Field(default=0.0, ge=0, le=10, description="modern: CutMix's Beta alpha (0: off).")
    label_weighted: bool = Field(default=True, description="Sample training crops with weights 1/label count.")
    weight_by_detection_conf: bool = Field(default=False, description="Weight training crops by detection conf.")
    detection_calibration: str = Field(default="", description="Isotonic calibration .npz (x, y) for the conf.")
    finetune: int = Field(default=0, ge=0, description="Train only the head for this many first epochs.")
    patience: int = Field(default=8, ge=1, description="Stop when val top-1 has not improved for this many epochs.")
    seed: int = 0
    num_workers: int = Field(default=2, ge=0, description="Data-loading processes per training process.")
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    amp: bool = Field(default=True, description="bf16 autocast on CUDA (fp16 with a grad scaler where bf16 is missing).")
    resume: bool = Field(default=True, description="Continue from the last complete epoch of the same config and data.")
    processes: int = Field(default=1, ge=1, description="Training processes (torchrun, DDP): one per GPU.")
    progress_every: int = Field(default=50, ge=0, description="A progress line every N batches (0: none).")
    output_weights: dict[str, float] = Field(default={}, description="A multi-output dataset (its outputs): each "
                                             "extra output's weight in the loss (1 unless given; species 1).")
    early_stopping_output: str = Field(default="species", description="The output whose val top-1 keeps the best "
                                       "epoch and stops the training early: species or an extra output.")

    @field_validator("model_name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        return check_model_name(name, ask_timm=False)  # timm (and torch) load when the step runs

    def params(self) -> TrainingParams:
        return TrainingParams(
            model_name=self.model_name, image_size=self.image_size or default_image_size(self.model_name),
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr or None, weight_decay=self.weight_decay,
            label_weighted=self.label_weighted, weight_by_detection_conf=self.weight_by_detection_conf,
            finetune=self.finetune, patience=self.patience, seed=self.seed, num_workers=self.num_workers,
            device=self.device, amp=self.amp, progress_every=self.progress_every,
            **{name: getattr(self, name) for name in MODERN_FIELDS})

    def params_for(self, output_index: dict[str, dict[str, str]]) -> TrainingParams:
        """The parameters for a dataset with these extra outputs (its ``output_index``)."""
        unknown = sorted(set(self.output_weights) - set(output_index))
        if unknown:
            raise ValueError(f"output_weights name outputs the dataset does not have: {unknown}")
        return replace(self.params(), outputs={name: len(index) for name, index in output_index.items()},
                       output_weights=dict(self.output_weights), early_stopping_output=self.early_stopping_output)


MODERN_FIELDS = ("recipe", "warmup_epochs", "label_smoothing", "body_lr_scale", "grad_clip", "ema_decay", "augment",
                 "mixup_alpha", "cutmix_alpha")
NOT_RECIPE = (*RUN_ONLY, "init_from", "registry_name", "resume", "processes", "pretrained", "detection_calibration")


def training_recipe(params: dict[str, Any]) -> dict[str, Any]:
    """The TrainingConfig values a checkpoint's ``params.json`` records about what it learns (model, size,
    hyperparameters): the config that trains such a model again."""
    return {k: params[k] for k in TrainingConfig.model_fields if k in params and k not in NOT_RECIPE}


def _champion_checkpoint(config: TrainingConfig, family: ModelFamily, storage: ArtifactStore, mlflow: MlflowTracking,
                         dataset: DatasetVersion) -> tuple[Any, str, dict[str, Any]]:
    """The registry champion's checkpoint with its heads rewritten for the dataset's classes, by name and through
    the class mapping (``core.ml.transfer``); its fingerprint; and where each class's head row starts from."""
    from animl_assets.core.ml.transfer import ClassMappingError, parse_class_mapping, transfer_checkpoint

    client, name = mlflow.client(), config.registry_name or family.registry_name
    champion = registry.by_alias(client, name, registry.CHAMPION)
    if champion is None:
        raise stop(f"init_from: champion, but {name!r} has no champion yet: train from "
                   "pretrained weights first (the first registered version becomes champion)")
    files = registry.model_files(mlflow.uri, champion)
    if files.params.get("model_name") != config.model_name:
        raise stop(f"the champion (version {champion.version}) is a {files.params.get('model_name')}; "
                   f"model_name is {config.model_name}")
    fingerprint = f"champion:{champion.version}:{hashlib.sha256(files.checkpoint).hexdigest()}"
    try:
        mapping = parse_class_mapping(json.loads(read_uri(config.class_mapping, storage.s3)),
                                      list(dataset.output_index)) if config.class_mapping else {}
        weights, sources = transfer_checkpoint(
            read_checkpoint(files.checkpoint), config.model_name, config.params().image_size, files.label_index,
            dataset.label_index, files.output_index, dataset.output_index, mapping)
    except (ClassMappingError, json.JSONDecodeError, OSError) as err:
        raise stop(f"class_mapping {config.class_mapping}: {err}") from err
    return weights, fingerprint + (f":mapping:{config_key(mapping)}" if mapping else ""), sources


def _initial_weights(config: TrainingConfig, storage: ArtifactStore, mlflow: MlflowTracking | None,
                     family: ModelFamily = CLASSIFIER, dataset: DatasetVersion | None = None
                     ) -> tuple[Any, str, dict[str, Any]]:
    """What the model starts from, a fingerprint of it for the resume key and, from a champion (for ``dataset``'s
    classes), where each class's head row starts from."""
    if config.init_from == "champion" and mlflow is not None and dataset is not None:
        return _champion_checkpoint(config, family, storage, mlflow, dataset)
    if config.class_mapping:
        raise stop("class_mapping maps a champion's classes: it needs init_from: champion")
    return (*_pretrained_weights(config, storage), {})


def _pretrained_weights(config: TrainingConfig, storage: ArtifactStore) -> tuple[Any, str]:
    """The ``pretrained`` weights, and their fingerprint."""
    choice = config.pretrained.strip()
    if choice.lower() in ("", "false"):
        return False, "none"
    if choice.lower() == "lite0" and config.model_name != "efficientnet-lite0":
        raise stop(f"pretrained: lite0 is EfficientNet-Lite0's weights; model_name is {config.model_name}")
    if choice.lower() in ("true", "lite0"):
        return (True if choice.lower() == "true" else "lite0"), choice.lower()
    try:
        data = read_uri(choice, storage.s3)
        fingerprint = hashlib.sha256(data).hexdigest()
        weights = None if choice.lower().endswith(".safetensors") else read_checkpoint(data)
    except (OSError, *NOT_A_CHECKPOINT) as err:
        raise stop(f"pretrained checkpoint {choice!r} cannot be read: {err}") from err
    if is_timm(config.model_name) and not (isinstance(weights, dict) and "model" in weights):
        return _weights_file(choice, data, fingerprint, storage), fingerprint  # timm's own loading code
    if weights is None:
        raise stop(f"{choice} is a .safetensors weights file: timm loads those (model_name timm/<name>)")
    return weights, fingerprint


def _weights_file(uri: str, data: bytes, fingerprint: str, storage: ArtifactStore) -> str:
    """A local path to a weights file timm loads: the file itself, or a copy (of one in S3, or of one whose
    suffix is not in the lower case timm tells ``.safetensors`` by)."""
    suffix = Path(uri).suffix
    if not uri.startswith("s3://") and suffix == suffix.lower():
        return str(Path(uri).expanduser().absolute())
    path = storage.cache("weights") / f"{fingerprint}{suffix.lower()}"
    if not path.is_file():
        atomic_write(path, data)
    return str(path)


def _calibration(config: TrainingConfig, storage: ArtifactStore) -> dict | None:
    if not config.detection_calibration:
        return None
    import io

    import numpy as np

    with np.load(io.BytesIO(read_uri(config.detection_calibration, storage.s3))) as npz:
        return {"x": npz["x"], "y": npz["y"]}


def reference_params(params: TrainingParams, pretrained: str, dataset_dir: str, splits_uri: str, crops_dir: str,
                     logdir: str, extra: dict[str, Any]) -> dict[str, Any]:
    """``params.json`` with every key the reference's ``train_classifier.py`` writes (its ``evaluate_model.py``
    reads them), then this project's additions."""
    return {"dataset_dir": dataset_dir, "cropped_images_dir": crops_dir, "multilabel": False,
            "model_name": params.model_name, "pretrained": pretrained, "finetune": params.finetune,
            "label_weighted": params.label_weighted, "weight_by_detection_conf": params.weight_by_detection_conf,
            "epochs": params.epochs, "batch_size": params.batch_size, "lr": params.learning_rate,
            "weight_decay": params.decay, "num_workers": params.num_workers, "logdir": logdir,
            "log_extreme_examples": 0, "seed": params.seed,
            "image_size": params.image_size, "patience": params.patience, "amp": params.amp,
            "splits_json": splits_uri, **{name: getattr(params, name) for name in MODERN_FIELDS},
            **({"outputs": params.outputs, "output_weights": params.output_weights,
                "early_stopping_output": params.early_stopping_output} if params.outputs else {}),
            **params.preprocessing.record(), **extra}


def _epoch_line(metrics: dict[str, float], epochs: int, seconds_per_epoch: float) -> str:
    left = (epochs - metrics["epoch"] - 1) * seconds_per_epoch
    return (f"epoch {metrics['epoch'] + 1}/{epochs}: train loss {metrics['train/loss']:.4f} top-1 "
            f"{metrics['train/acc_top1']:.3f} | val loss {metrics['val/loss']:.4f} top-1 {metrics['val/acc_top1']:.3f} "
            f"(best epoch {metrics['best_epoch'] + 1}) | lr {metrics['lr']:.2e} | "
            f"{metrics['train/crops_per_s']:.1f} crops/s | ETA {left / 60:.1f} min")


def _run_distributed(context: dg.AssetExecutionContext, config: TrainingConfig, spec: WorkerSpec,
                     frame: pd.DataFrame, init: Any, checkpoints: Checkpoints) -> FitResult:
    """Train with ``torchrun`` (one process per GPU, DDP) through Dagster Pipes; read the result back from
    the checkpoints rank 0 wrote."""
    with tempfile.TemporaryDirectory(prefix="animl-ddp-") as folder:
        spec.frame_csv = str(Path(folder) / "frame.csv")
        frame.to_csv(spec.frame_csv, index=False)
        if isinstance(init, (bool, str)):
            spec.init = init
        else:  # loaded weights: handed over as a file
            spec.init_path = str(Path(folder) / "init.pt")
            Path(spec.init_path).write_bytes(torch_bytes(init))
        spec.write(Path(folder) / "spec.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={config.processes}", "-m", "animl_assets.train_worker",
                   str(Path(folder) / "spec.json")]
        dg.PipesSubprocessClient().run(command=command, context=context).get_results()
    last, best = checkpoints.load(LAST), checkpoints.load(BEST)
    if last is None or best is None:
        raise stop(f"the distributed training left no checkpoint at {checkpoints.uri('')}")
    return FitResult(best=best, history=list(last["history"]), stopped_early=bool(last.get("stopped")),
                     resumed_from_epoch=None)


@dataclass
class TrainingInputs:
    """One training, checked: its parameters, the frame it trains on and what was left out of it."""

    params: TrainingParams
    family: ModelFamily
    dataset_version: str
    splits_version: str
    partitions: list[str]
    crops_root: Path
    frame: pd.DataFrame
    missing: pd.DataFrame  # path, dataset, label, problem
    cache: dict[str, Any]  # what the local crop cache holds (empty when the store is local)

    @property
    def counts(self) -> dict[str, int]:
        return {split: int(n) for split, n in self.frame.groupby("split").size().items()}


def _training_inputs(context: dg.AssetExecutionContext, config: TrainingConfig, family: ModelFamily,
                     dataset: DatasetVersion, splits: dict[str, list[list[str]]], storage: ArtifactStore
                     ) -> TrainingInputs:
    """The dataset framed by split (readable crops only), or a stop when the splits belong to another dataset
    or leave train or val empty."""
    try:
        check_model_name(config.model_name)
        params = config.params_for(dataset.output_index)
    except ValueError as err:
        raise stop(str(err)) from err
    ds = dataset.classification_ds
    dataset_version, splits_version = value_version(dataset, family.dataset), value_version(splits, family.splits)
    made_from = read_from(context.instance, family.splits, splits_version, family.dataset)
    if made_from and dataset_version not in made_from:
        raise stop(f"{family.splits} {splits_version} were made from {family.dataset} {sorted(made_from)[0]}, not "
                   f"from {dataset_version}, the dataset this training reads: materialize {family.splits} first")
    partitions = sorted(ds["dataset"].unique())
    crops_root, cache = cached_crops(storage, ds["path"].astype(str).tolist(), family.images)
    try:
        frame, missing = trainable_frame(ds, dataset.label_index, splits, crops_root, params.label_weighted,
                                         params.weight_by_detection_conf, _calibration(config, storage),
                                         dataset.output_index)
    except ValueError as err:
        raise stop(f"the dataset cannot be trained on: {err}") from err
    if len(missing):
        counts = missing["problem"].value_counts().to_dict()
        context.log.warning(f"{len(missing)} crops of the dataset under {crops_root} are left out: {counts}")
    inputs = TrainingInputs(params, family, dataset_version, splits_version, partitions, crops_root, frame, missing,
                            cache)
    if not inputs.counts.get("train") or not inputs.counts.get("val"):
        raise stop(f"training needs crops in train and val; the splits hold {inputs.counts}")
    return inputs


def _log_inputs(client: Any, run_id: str, config: TrainingConfig, inputs: TrainingInputs, dataset: DatasetVersion,
                store: Store, checkpoints: Checkpoints, dagster_run_id: str,
                transferred: dict[str, Any] | None = None) -> dict[str, Any]:
    """``params.json`` of this training, logged to its MLflow run with the dataset and splits as inputs."""
    family = inputs.family
    dataset_uri = store.uri(version_folder(family.dataset, inputs.dataset_version))
    splits_uri = store.uri(version_file(family.splits, inputs.splits_version, f"{family.splits}.json"))
    versions = {"dataset_version": inputs.dataset_version, "splits_version": inputs.splits_version,
                "init_from": config.init_from, "dagster_run_id": dagster_run_id, "mlflow_run_id": run_id,
                **({"class_mapping": config.class_mapping, "transferred_from": transferred} if transferred else {}),
                **({"dataset_asset": family.dataset} if family is not CLASSIFIER else {})}
    params_json = reference_params(inputs.params, config.pretrained, dataset_uri, splits_uri, str(inputs.crops_root),
                                   checkpoints.uri(""), versions)
    tracking.log_params(client, run_id, {k: v for k, v in params_json.items()
                                         if k not in ("dagster_run_id", "mlflow_run_id", "transferred_from")})
    tracking.log_dataset(client, run_id, family.dataset, inputs.dataset_version, dataset_uri,
                         {"num_rows": len(dataset.classification_ds), "num_labels": len(dataset.label_index)})
    tracking.log_dataset(client, run_id, family.splits, inputs.splits_version, splits_uri,
                         {"crops_per_split": inputs.counts})
    return params_json


def _fit(context: dg.AssetExecutionContext, config: TrainingConfig, inputs: TrainingInputs, num_classes: int,
         init: Any, checkpoints: Checkpoints, storage: ArtifactStore, mlflow: MlflowTracking, client: Any,
         run_id: str) -> FitResult:
    """Train in this process, or in ``config.processes`` under torchrun; each epoch logged to MLflow."""
    from animl_assets.core.ml.training import train_classifier

    params = inputs.params
    if config.processes > 1:
        spec = WorkerSpec("", str(inputs.crops_root), num_classes, params, storage.store().uri(""), checkpoints.folder,
                          config.resume, s3={name: getattr(storage.s3, name) for name in type(storage.s3).model_fields}
                          if storage.s3 else None,
                          mlflow={"tracking_uri": mlflow.uri, "home": mlflow.home, "run_id": run_id})
        return _run_distributed(context, config, spec, inputs.frame, init, checkpoints)
    started, epoch_seconds = time.perf_counter(), []

    def on_epoch(metrics: dict[str, float]) -> None:
        epoch_seconds.append(time.perf_counter() - started - sum(epoch_seconds))
        tracking.log_metrics(client, run_id, {k: v for k, v in metrics.items() if k != "epoch"}, metrics["epoch"])
        context.log.info(_epoch_line(metrics, params.epochs, sum(epoch_seconds) / len(epoch_seconds)))

    try:
        return train_classifier(inputs.frame, inputs.crops_root, num_classes, params, checkpoints, init=init,
                                resume=config.resume, on_epoch=on_epoch, progress=context.log.info)
    except PretrainedWeightsUnavailable as err:
        raise stop(str(err)) from err


def train_checkpoint(context: dg.AssetExecutionContext, config: TrainingConfig, crops: dict[str, Any],
                     classification_dataset: DatasetVersion, splits: dict[str, list[list[str]]], storage: ArtifactStore,
                     mlflow: MlflowTracking) -> Iterator[dg.Output]:
    """A model of the asset's family trained on one dataset version with its splits (``checkpoint_asset``);
    ``crops``: the family's per-export files (crops, or whole frames)."""
    from animl_assets.core.ml.training import evaluate_checkpoint

    store, started = storage.store(), time.perf_counter()
    family = family_of(context.asset_key.path[-1])
    inputs = _training_inputs(context, config, family, classification_dataset, splits, storage)
    params = inputs.params
    label_index = classification_dataset.label_index
    init, init_fingerprint, transferred = _initial_weights(config, storage, mlflow, family, classification_dataset)
    key = resume_key(params, inputs.dataset_version, inputs.splits_version,
                     {p: value_version(crops[p], family.images) for p in inputs.partitions if p in crops},
                     init_fingerprint)
    checkpoints = Checkpoints(store, training_folder(key))
    client = mlflow.client()
    experiment_name = f"{family.experiment}/{params.model_name}"
    experiment = tracking.experiment_id(client, experiment_name, mlflow.artifact_root)
    lineage_tags = {"dagster.asset": family.checkpoint, "animl.dataset_version": inputs.dataset_version,
                    "animl.splits_version": inputs.splits_version, "animl.exports": ",".join(inputs.partitions),
                    tracking.TRAINING_KEY_TAG: key}
    # a re-execution (e.g. after a lost pod) has a new run id but the same root: it continues the same MLflow run
    resumes = (lambda run: not in_progress(context.instance, run.data.tags.get(tracking.DAGSTER_RUN_TAG)))
    with tracking.training_run(client, experiment, context.run.root_run_id or context.run.run_id,
                               f"{params.model_name}-{inputs.dataset_version[:8]}", lineage_tags,
                               resumes=resumes if config.resume else None) as (run_id, reopened):
        params_json = _log_inputs(client, run_id, config, inputs, classification_dataset, store, checkpoints,
                                  context.run.run_id, transferred)
        context.log.info(f"MLflow run {run_id} ({'continued' if reopened else 'new'}) in experiment "
                         f"{experiment_name}; checkpoints at {checkpoints.uri('')}")
        result = _fit(context, config, inputs, len(label_index), init, checkpoints, storage, mlflow, client, run_id)
        test = evaluate_checkpoint(result.best, inputs.frame, inputs.crops_root, len(label_index), params)
        best_epoch = int(result.best["epoch"])
        tracking.log_metrics(client, run_id, {"best/val_acc_top1": result.best["val/acc"] / 100,
                                              "best/epoch": best_epoch,
                                              **{f"test/{k}": v for k, v in test.items() if k != "count"}}, best_epoch)
        value = TrainedClassifier(TorchFile(result.best), params_json, label_index, pd.DataFrame(result.history),
                                  classification_dataset.output_index)
        version = value_version(value, family.checkpoint)
        curve = learning_curve(result.history, best_epoch)
        tracking.log_artifacts(client, run_id, "checkpoint", {
            "ckpt_best.pt": torch_bytes(result.best), "params.json": json.dumps(params_json, indent=1).encode(),
            "label_index.json": json.dumps(label_index, indent=1).encode(), LEARNING_CURVE: curve})
        tracking.set_tags(client, run_id, {"animl.checkpoint_version": version})
    url = tracking.run_url(mlflow.uri, mlflow.ui_url, experiment, run_id)
    yield dg.Output(value, data_version=dg.DataVersion(version), metadata={
        **_checkpoint_metadata(params, result, test, inputs, store, version, curve),
        "training_key": key, "seconds": round(time.perf_counter() - started, 1), **inputs.cache,
        "mlflow_run_id": run_id, "mlflow_experiment": experiment_name,
        "mlflow_tracking_uri": redact_credentials(mlflow.uri),
        **({"mlflow_run": dg.MetadataValue.url(url)} if url else {}),
    })


def _checkpoint_metadata(params: TrainingParams, result: FitResult, test: dict[str, float], inputs: TrainingInputs,
                         store: Store, version: str, curve: bytes) -> dict[str, Any]:
    """The checkpoint's metadata in the event log: the training's figures, its history and what it left out."""
    history, missing = pd.DataFrame(result.history), inputs.missing
    folder = version_folder(inputs.family.checkpoint, version)
    return {
        "model_name": params.model_name, "image_size": params.image_size,
        "best_epoch": int(result.best["epoch"]), "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": -1 if result.resumed_from_epoch is None else result.resumed_from_epoch,
        "val_acc_top1": round(result.best["val/acc"] / 100, 4),
        **{f"test_{k}": round(v, 4) for k, v in test.items() if k.startswith(("acc", "loss"))},
        **{f"test_{k.replace('/', '_')}": round(v, 4) for k, v in test.items()  # extra outputs' (output/acc_top1)
           if "/" in k and k.endswith(("acc_top1", "loss"))},
        "train_crops_per_s": round(float(history["train/crops_per_s"].mean()), 1),
        **{f"num_{split}_crops": n for split, n in inputs.counts.items()},
        "num_missing_crops": len(missing), "missing_crops": table(missing),
        "num_unreadable_crops": int((missing["problem"] != "missing").sum()),
        "history": table(history[[c for c in history.columns if c == "epoch" or c.endswith(("loss", "acc_top1"))]]
                         .round(4)),
        **image_metadata(store, f"{folder}/{LEARNING_CURVE}", curve, "learning_curve", "learning curve"),
        "dataset_version": inputs.dataset_version, "splits_version": inputs.splits_version,
        "checkpoint": location(store.uri(f"{folder}/ckpt_best.pt")),
        "last_epoch_val_acc_top1": round(result.history[-1]["val/acc_top1"], 4),
    }



def checkpoint_asset(family: ModelFamily, description: str) -> dg.AssetsDefinition:
    """``train_checkpoint`` as the family's checkpoint asset, reading the family's files, dataset and splits."""
    return stage_asset(name=family.checkpoint, gpu=True, group_name="training" if family is CLASSIFIER else "empty",
                       kinds={"pytorch", "mlflow"}, pool="gpu", description=description,
                       ins={"crops": dg.AssetIn(family.images), "classification_dataset": dg.AssetIn(family.dataset),
                            "splits": dg.AssetIn(family.splits)})(train_checkpoint)


classifier_checkpoint = checkpoint_asset(CLASSIFIER, (
    "An EfficientNet, ResNet or timm model trained on the crops of one dataset version with its splits: the "
    "best-on-val checkpoint (reference layout) with params.json and label_index.json. Every epoch is checkpointed; "
    "a re-materialization of the same config and data resumes. One MLflow run per materialization."))
