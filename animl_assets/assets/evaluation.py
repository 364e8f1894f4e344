"""``classifier_evaluation``: the best checkpoint on train, val and test in the reference's formats, with
TorchScript, thresholds and plots; ``model_comparison``: other models (registered versions, external
TorchScript through a target mapping) on the same test split, in one table.

PyTorch and scikit-learn (``core.ml.evaluation``) are imported when a step runs, not when the Definitions
load."""

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import dagster as dg
import pandas as pd
from PIL import Image
from pydantic import Field

from animl_assets.assets.artifacts import cached_crops, image_metadata, location, stage_asset, stop, table
from animl_assets.assets.exports import export_sequences
from animl_assets.assets.families import CLASSIFIER, ModelFamily, family_of
from animl_assets.core.artifact_files import Blob, value_version
from animl_assets.core.dataset.classification import DatasetVersion
from animl_assets.core.layout import version_folder
from animl_assets.core.ml import plots
from animl_assets.core.ml.frames import SPLITS, Preprocessing, trainable_frame
from animl_assets.core.ml.labels import label_names
from animl_assets.core.ml.open_set import DEFAULT_SCORE
from animl_assets.core.ml.recipe import Evaluation, TrainedClassifier
from animl_assets.core.registry import registry, tracking
from animl_assets.core.review.sequences import sequence_top1
from animl_assets.core.store import Store
from animl_assets.resources.storage import ArtifactStore, read_uri
from animl_assets.resources.tracking import MlflowTracking

if TYPE_CHECKING:
    import torch


class EvaluationConfig(dg.Config):
    """How the evaluation runs, and the precision per-label thresholds aim for."""

    target_precision: float = Field(default=0.95, gt=0, le=1, description="Per-label thresholds: the lowest "
                                    "confidence at which a label's predictions reach this precision on val.")
    errors_per_label: int = Field(default=4, ge=0, description="Most confident false positives and false "
                                                               "negatives shown per label.")
    batch_size: int = Field(default=64, ge=1)
    num_workers: int = Field(default=2, ge=0)
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda, ...")
    sequence_gap_s: float = Field(default=60.0, gt=0, description="Sequences: images of one camera (Animl's, "
                                  "else the location) this close in time, where the export has no seq_id.")
    portable: bool = Field(default=True, description="Also export the model to ONNX and as a torch.export "
                           "program (each checked against the eager model), registered beside TorchScript; "
                           "classifications' runtime: onnx needs it.")
    unknown_score: Literal["msp", "energy", "margin"] = Field(
        default=DEFAULT_SCORE, description="Unknowns: the score that tells crops of known classes from animals the "
        "model never saw (max softmax probability, energy or top-1 - top-2 margin; see benchmarks/open_set.py).")
    unknown_recall: float = Field(default=0.95, gt=0, le=1, description="Unknowns: the threshold keeps this share "
                                  "of the val crops (all of known classes) known; classifications flags crops below it.")


def checkpoint_family(params: dict[str, Any]) -> ModelFamily:
    """The model family a checkpoint's ``params.json`` belongs to (its ``dataset_asset``; the classifier's
    without one)."""
    return family_of(params.get("dataset_asset", CLASSIFIER.dataset))


def dataset_crops(storage: ArtifactStore, params: dict[str, Any]) -> tuple[DatasetVersion, Path]:
    """The dataset version a checkpoint was trained on (its ``params.json`` names it) and a local folder
    holding its crops (or whole frames)."""
    family = checkpoint_family(params)
    dataset = storage.load(family.dataset, version=params["dataset_version"])
    return dataset, cached_crops(storage, dataset.classification_ds["path"].astype(str).tolist(), family.images)[0]


def training_data(storage: ArtifactStore, params: dict[str, Any]) -> tuple[pd.DataFrame, Path, pd.DataFrame]:
    """The dataset and splits versions a checkpoint was trained on as ``split_frame`` rows over the crops
    that can be read (weighted as in training; no detection-confidence weights, as the reference), with the
    local crops folder and the crops left out (missing or unreadable, with why)."""
    dataset, crops_root = dataset_crops(storage, params)
    splits = storage.load(checkpoint_family(params).splits, version=params["splits_version"])
    frame, left_out = trainable_frame(dataset.classification_ds, dataset.label_index, splits, crops_root,
                                      bool(params["label_weighted"]), output_index=dataset.output_index)
    return frame, crops_root, left_out


def _error_grid(outputs: pd.DataFrame, names: list[str], crops_root: Path, per_label: int) -> bytes:
    from animl_assets.core.ml import evaluation as ev

    rows = []
    for name, found in ev.confident_errors(outputs, names, per_label).items():
        for kind, short in (("false_positives", "FP"), ("false_negatives", "FN")):
            images = []
            for path, caption in found[kind]:
                with Image.open(crops_root / path) as image:
                    images.append((image.convert("RGB"), caption))
            rows.append((f"{name}\n{short}", images))
    return plots.error_grid(rows, "most confident errors on test: false positives (FP) and negatives (FN)")


def evaluation_figures(result: Evaluation, crops_root: Path, errors_per_label: int) -> dict[str, bytes]:
    """The PNGs of an evaluation: a confusion heatmap per split, reliability curves and the error grid
    (test)."""
    names = result.names
    figures = {f"confusion_{split}.png": plots.confusion_heatmap(result.confusion_matrices[split], names,
                                                                 f"confusion matrix: {split}")
               for split in SPLITS if len(result.outputs(split))}
    test = result.outputs_test
    if len(test):
        y = test["label"].map({n: i for i, n in enumerate(names)}).to_numpy()
        figures["reliability_test.png"] = plots.reliability(y, test[names].to_numpy(), names,
                                                            "reliability on test (one vs rest)")
        figures["errors_test.png"] = _error_grid(test, names, crops_root, errors_per_label)
    return figures


def evaluate_model(context: dg.AssetExecutionContext, config: EvaluationConfig,
                   classifier_checkpoint: TrainedClassifier, storage: ArtifactStore,
                   mlflow: MlflowTracking) -> Iterator[dg.Output]:
    """The best checkpoint of the asset's family on its splits (``evaluation_asset``)."""
    from animl_assets.core.ml import evaluation as ev
    from animl_assets.core.ml.data import resolve_device
    from animl_assets.core.ml.models import model_from_checkpoint, species_model

    started = time.perf_counter()
    checkpoint = classifier_checkpoint
    params = checkpoint.params
    store: Store = storage.store()
    frame, crops_root, missing = training_data(storage, params)
    if len(missing):
        context.log.warning(f"{len(missing)} crops of the dataset are missing under {crops_root}; left out")
    label_index = checkpoint.label_index
    model = model_from_checkpoint(checkpoint.ckpt, params["model_name"], len(label_index), params["image_size"])
    try:
        result, gaps = ev.evaluate(species_model(model), frame, crops_root, label_index, Preprocessing.of(params),
                                   resolve_device(config.device), target_precision=config.target_precision,
                                   batch_size=config.batch_size, num_workers=config.num_workers,
                                   portable=config.portable, params=params, progress=context.log.info,
                                   unknown_score=config.unknown_score, unknown_recall=config.unknown_recall)
    except ValueError as err:
        raise stop(str(err)) from err
    per_output = _evaluate_outputs(result, model, frame, crops_root, checkpoint, config)
    test = result.outputs_test
    sequences = export_sequences(storage, sorted(frame["dataset"].unique()), test["path"], config.sequence_gap_s)
    known = test[test["path"].isin(sequences.keys())]
    sequence_acc = sequence_top1(known, result.names, sequences)
    family = family_of(context.asset_key.path[-1])
    version = value_version(result, family.evaluation)
    folder = version_folder(family.evaluation, version)
    figures = evaluation_figures(result, crops_root, config.errors_per_label)
    figure_metadata: dict[str, Any] = {}
    for name, png in figures.items():
        figure_metadata |= image_metadata(store, f"{folder}/{name}", png, name.removesuffix(".png"),
                                          name.removesuffix(".png").replace("_", " "))

    run_id = params.get("mlflow_run_id")
    test_summary = ev.summary_row(result.outputs_test, result.names) if len(result.outputs_test) else {}
    url = _track(mlflow, run_id, result, test_summary, sequence_acc, figures, int(checkpoint.ckpt.get("epoch", 0)),
                 version) if run_id else ""
    test_report = result.label_report[result.label_report["split"] == "test"].drop(columns="split")
    test_metrics = result.metrics("test")
    yield dg.Output(result, data_version=dg.DataVersion(version), metadata={
        **{f"test_{k}": round(v, 4) for k, v in ev.as_fractions(test_metrics).items() if v == v},
        **{f"test_{k}": round(v, 4) for k, v in test_summary.items() if k.startswith("macro") and v == v},
        **({"test_sequence_acc_top1": round(sequence_acc, 4)} if sequence_acc == sequence_acc else {}),
        **({"test_auroc": round(auroc, 4)} if (auroc := ev.binary_auroc(test, result.names)) == auroc else {}),
        "num_test_sequences": int(pd.Series(list(sequences.values())).nunique()) if sequences else 0,
        "overall_metrics": table(result.overall_metrics.round(4)),
        "per_label_test": table(test_report.round(4)),
        "thresholds_target_precision": config.target_precision,
        "labels_with_threshold": sum(e["threshold"] is not None for e in result.thresholds["labels"].values()),
        **_unknowns_metadata(result),
        **({"outputs_top1": table(per_output.round(4)),
            **{f"test_{row.output}_acc_top1": round(row.acc_top1, 4) for row in per_output.itertuples()
               if row.split == "test" and row.acc_top1 == row.acc_top1}} if len(per_output) else {}),
        **{f"{form}_max_abs_diff": float(f"{gap:.3g}") for form, gap in gaps.items()},
        **{f"num_{split}_crops": len(result.outputs(split)) for split in SPLITS},
        "num_missing_crops": len(missing),
        **figure_metadata,
        "checkpoint_version": value_version(checkpoint, family.checkpoint),
        "dataset_version": params["dataset_version"], "splits_version": params["splits_version"],
        **_model_locations(store, folder, config.portable),
        "mlflow_run_id": run_id or "",
        **({"mlflow_run": dg.MetadataValue.url(url)} if url else {}),
        "seconds": round(time.perf_counter() - started, 1),
    })


# besides the checkpoint it evaluates: the dataset and splits versions that checkpoint names, and the exports'
# sequences, read through ArtifactStore.load
def evaluation_asset(family: ModelFamily, description: str) -> dg.AssetsDefinition:
    """``evaluate_model`` as the family's evaluation asset."""
    return stage_asset(name=family.evaluation, gpu=True, group_name="evaluation" if family is CLASSIFIER else "empty",
                       kinds={"pytorch", "mlflow"}, deps=[family.dataset, family.splits, "cct_export"],
                       ins={"classifier_checkpoint": dg.AssetIn(family.checkpoint)},
                       description=description)(evaluate_model)


classifier_evaluation = evaluation_asset(CLASSIFIER, (
    "The best checkpoint on the train, val and test splits it was trained with: outputs_{split}.csv.gz, "
    "overall_metrics.csv, confusion_matrices.npz, label_stats.csv (the reference's), the TorchScript model and its "
    "ONNX and torch.export forms (each checked against the eager one), per-label F1 and thresholds, and plots, also "
    "logged to the training's MLflow run; a multi-output model's files per extra output."))


def _evaluate_outputs(result: Evaluation, model: "torch.nn.Module", frame: pd.DataFrame, crops_root: Path,
                     checkpoint: TrainedClassifier, config: EvaluationConfig) -> pd.DataFrame:
    """A multi-output model's extra outputs, evaluated into ``result`` (their files, label indices and the
    TorchScript model of every head); their top-1 per split (empty for a species-only model)."""
    from animl_assets.core.ml import evaluation as ev
    from animl_assets.core.ml.data import resolve_device
    from animl_assets.core.ml.models import MultiHead

    if not isinstance(model, MultiHead):
        return pd.DataFrame(columns=["output", "split", "crops", "acc_top1"])
    prep = Preprocessing.of(checkpoint.params)
    files, summary = ev.evaluate_outputs(model, frame, crops_root, checkpoint.output_index, prep,
                                         resolve_device(config.device), batch_size=config.batch_size,
                                         num_workers=config.num_workers)
    result.output_index, result.output_files = dict(checkpoint.output_index), files
    result.compiled_outputs = Blob(ev.script_bytes(ev.compile_model(model, prep.image_size)))
    return summary


def _track(mlflow: MlflowTracking, run_id: str, result: Evaluation, test_summary: dict[str, float],
           sequence_acc: float, figures: dict[str, bytes], epoch: int, version: str) -> str:
    """The evaluation's metrics, files and version logged to the training's MLflow run; the run's URL."""
    client = mlflow.client()
    metrics = {f"eval/{row['split']}/{k}": v for row in result.overall_metrics.to_dict("records")
               for k, v in row.items() if k != "split" and v == v}
    metrics |= {f"eval/test/{k}": v for k, v in test_summary.items() if k.startswith("macro") and v == v}
    for output in result.output_index:  # a multi-output model's extra outputs
        overall = result.output_files[f"overall_metrics_{output}.csv"]
        metrics |= {f"eval/{row['split']}/{output}/{k}": v for row in overall.to_dict("records")
                    for k, v in row.items() if k in ("acc_top1", "loss") and v == v}
    if sequence_acc == sequence_acc:
        metrics["eval/test/sequence_acc_top1"] = sequence_acc
    tracking.log_metrics(client, run_id, metrics, epoch)
    tracking.log_artifacts(client, run_id, "evaluation", {
        **figures, "overall_metrics.csv": result.overall_metrics.to_csv(index=False).encode(),
        "label_stats.csv": result.label_stats.to_csv(index=False).encode(),
        "label_report.csv": result.label_report.to_csv(index=False).encode(),
        "thresholds.json": json.dumps(result.thresholds, indent=1).encode(),
        "open_set.json": json.dumps(result.open_set, indent=1).encode(),
        **{name: frame.to_csv(index=False).encode() for name, frame in result.output_files.items()
           if name.startswith(("overall_metrics_", "label_stats_"))}})
    tracking.set_tags(client, run_id, {"animl.evaluation_version": version})
    return tracking.run_url(mlflow.uri, mlflow.ui_url, client.get_run(run_id).info.experiment_id, run_id)


def _unknowns_metadata(result: Evaluation) -> dict[str, Any]:
    """The unknowns' score, threshold and the val recall kept there; the test crops flagged at it."""
    found, test = result.open_set, result.prediction_profile
    if found.get("threshold") is None:
        return {"unknown_threshold": "none (no val crops)"}
    return {"unknown_score": found["score"], "unknown_threshold": round(found["threshold"], 4),
            "unknown_val_recall": round(found["val_recall"], 4),
            **({"test_unknown_share": round(test["unknown_share"], 4)} if test.get("unknown_share") is not None else {})}


def _model_locations(store: Store, folder: str, portable: bool) -> dict[str, Any]:
    """Where the evaluation's standalone models are, as metadata."""
    names = {"torchscript": "ckpt_best_compiled.pt", **({"onnx": "model.onnx", "torch_export": "model.pt2"}
                                                        if portable else {})}
    return {form: location(store.uri(f"{folder}/{name}")) for form, name in names.items()}


# ---- comparing with other models ----------------------------------------------------------------------------

class ExternalModel(dg.Config):
    """A TorchScript classifier from elsewhere (e.g. MegaClassifier) with its labels."""

    name: str = Field(description="What the comparison table calls it.")
    torchscript: str = Field(description="Path or s3:// URI of the TorchScript file.")
    label_index: str = Field(description="Its label_index.json ({\"0\": name, ...}), path or s3:// URI.")
    target_mapping: str = Field(default="", description="JSON {our label: [its labels]}: probabilities summed "
                                "per label, its other labels to 'other'. Empty: labels matched by name.")
    image_size: int = Field(default=224, ge=8)


class ComparisonConfig(dg.Config):
    """Which models to set beside this evaluation on its test split."""

    registered: list[str] = Field(default=["champion"], description="Versions of the registered model: "
                                  "numbers, aliases (champion, challenger) or models:/name/N URIs.")
    model_name: str = registry.DEFAULT_MODEL
    external: list[ExternalModel] = Field(default=[])
    device: str = "auto"
    batch_size: int = Field(default=64, ge=1)


def score_model(scripted: "torch.jit.ScriptModule", labels: list[str], prep: Preprocessing, outputs: pd.DataFrame,
                crops_root: Path, device: "torch.device", mapping: dict | None = None, batch_size: int = 64
                ) -> dict[str, float]:
    """Another model's comparison figures on the crops (and labels) of our ``outputs`` frame."""
    from animl_assets.core.ml import evaluation as ev

    theirs, names = ev.evaluate_scripted(scripted, labels, outputs, crops_root, prep, device, mapping,
                                         batch_size)
    return ev.summary_row(theirs, names)


def registered_scores(client: Any, tracking_uri: str, version: Any, outputs: pd.DataFrame, crops_root: Path,
                      device: "torch.device", batch_size: int = 64) -> dict[str, float]:
    """A registered version's comparison figures on our test crops (labels matched by name)."""
    from animl_assets.core.ml import evaluation as ev

    files = registry.model_files(tracking_uri, version)
    return score_model(ev.load_script(files.torchscript), label_names(files.label_index),
                       Preprocessing.of(files.preprocessing), outputs, crops_root, device, batch_size=batch_size)


def read_json(uri: str, storage: ArtifactStore) -> Any:
    """A JSON file (path or s3:// URI) given in a config; a clear failure when it cannot be read."""
    try:
        return json.loads(read_uri(uri, storage.s3))
    except (OSError, ValueError) as err:
        raise stop(f"cannot read {uri}: {err}") from err


@stage_asset(group_name="evaluation", kinds={"pytorch", "mlflow"})
def model_comparison(context: dg.AssetExecutionContext, config: ComparisonConfig,
                     classifier_evaluation: Evaluation, storage: ArtifactStore,
                     mlflow: MlflowTracking) -> dg.Output[pd.DataFrame]:
    """This evaluation's model beside registered versions and external TorchScript models (through a
    target mapping, as the reference's MegaClassifier comparison) on the same test split: one table."""
    from animl_assets.core.ml import evaluation as ev
    from animl_assets.core.ml.data import resolve_device

    ours = classifier_evaluation
    test = ours.outputs_test
    if test.empty:
        raise stop("the evaluation has no test crops to compare on")
    _, crops_root = dataset_crops(storage, ours.params)
    device = resolve_device(config.device)
    rows = [{"model": "this evaluation", "source": value_version(ours, "classifier_evaluation"),
             **ev.summary_row(test, ours.names)}]
    client = mlflow.client()
    for ref in config.registered:
        try:
            version = registry.resolve(client, config.model_name, ref)
        except ValueError as err:
            context.log.warning(f"skipped {ref}: {err}")
            continue
        rows.append({"model": f"{version.name} v{version.version} ({ref})", "source": version.source,
                     **registered_scores(client, mlflow.uri, version, test, crops_root, device, config.batch_size)})
    for external in config.external:
        try:
            scripted = ev.load_script(read_uri(external.torchscript, storage.s3))
        except (OSError, RuntimeError) as err:
            raise stop(f"cannot load TorchScript model {external.torchscript}: {err}") from err
        labels = label_names(read_json(external.label_index, storage))
        mapping = read_json(external.target_mapping, storage) if external.target_mapping else None
        try:
            scores = score_model(scripted, labels, Preprocessing(external.image_size), test, crops_root, device, mapping,
                                 config.batch_size)
        except ValueError as err:
            raise stop(f"{external.name}: {err}") from err
        rows.append({"model": external.name, "source": external.torchscript, **scores})
    comparison = pd.DataFrame(rows)
    return dg.Output(comparison, metadata={"comparison": table(comparison.round(4)),
                                           "models": len(comparison), "test_crops": len(test)})
