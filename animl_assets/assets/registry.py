"""``registered_model``: an evaluated checkpoint as a new version of a named MLflow model (alias
``challenger``); the blocking ``beats_champion`` check; ``champion_model``: the alias ``champion`` moved to
a version that passed it."""

import json
from typing import Any, Iterator

import dagster as dg
import pandas as pd
from pydantic import Field

from animl_assets.assets.artifacts import stage_asset, stage_check, stop, table
from animl_assets.assets.evaluation import dataset_crops, registered_scores
from animl_assets.assets.families import CLASSIFIER, EMPTY_MODEL, ModelFamily, family_of
from animl_assets.assets.training import training_recipe
from animl_assets.core.artifact_files import torch_bytes, value_version
from animl_assets.core.ml.frames import Preprocessing
from animl_assets.core.ml.recipe import Evaluation, TrainedClassifier
from animl_assets.core.registry import registry
from animl_assets.resources.storage import ArtifactStore
from animl_assets.resources.tracking import MlflowTracking
from animl_assets.runs import in_progress

GATE_METRICS = ("acc_top1", "macro_recall")


class RegistryConfig(dg.Config):
    """Where the model is registered and what it must do to replace the champion."""

    model_name: str = Field(default="", description="The registered model's name; empty: the model family's "
                            f"({registry.DEFAULT_MODEL} for the species classifier, {EMPTY_MODEL} for the "
                            "empty-or-not model).")
    gate_margin: float = Field(default=0.0, ge=-1, le=1, description="How much a new version must beat the "
                               "champion by on the same test split, on both top-1 accuracy and macro recall "
                               "(fractions; 0: at least as good, ties go to the newer model).")


def _repair(context: dg.AssetExecutionContext, client: Any, name: str) -> None:
    """Finish or roll back what a killed registration or promotion left (``registry.repair``); an unfinished
    registration of this very run is an earlier try of this step's."""
    def abandoned(version: Any) -> bool:
        run_id = version.tags.get(registry.DAGSTER_RUN_TAG)
        return run_id == context.run.run_id or not in_progress(context.instance, run_id)

    for line in registry.repair(client, name, abandoned):
        context.log.warning(f"{name}: {line}")


def _lineage_tags(family: ModelFamily, checkpoint: TrainedClassifier, evaluation: Evaluation, exports: list[str],
                  dagster_run_id: str) -> dict[str, str]:
    params = checkpoint.params
    return {"animl.dataset_version": params["dataset_version"], "animl.splits_version": params["splits_version"],
            "animl.checkpoint_version": value_version(checkpoint, family.checkpoint),
            "animl.evaluation_version": value_version(evaluation, family.evaluation),
            "animl.exports": ",".join(exports), registry.DAGSTER_RUN_TAG: dagster_run_id,
            "animl.training_run_id": params.get("mlflow_run_id") or "", "animl.model_name": params["model_name"],
            "animl.image_size": str(params["image_size"]),
            registry.TRAINING_CONFIG_TAG: json.dumps(training_recipe(params), sort_keys=True),
            **({registry.OUTPUTS_TAG: json.dumps(["species", *params["outputs"]])} if params.get("outputs") else {})}


def register_model(context: dg.AssetExecutionContext, config: RegistryConfig,
                   classifier_evaluation: Evaluation, classifier_checkpoint: TrainedClassifier,
                   storage: ArtifactStore, mlflow: MlflowTracking) -> Iterator[dg.Output]:
    """The evaluated model of the asset's family as a new version of its registered model (``registered_asset``)."""
    from animl_assets.core.ml import evaluation as ev

    family = family_of(context.asset_key.path[-1])
    model_name = config.model_name or family.registry_name
    evaluation, checkpoint = classifier_evaluation, classifier_checkpoint
    if evaluation.params != checkpoint.params:
        raise stop(f"{family.evaluation} is not of the latest {family.checkpoint}: materialize "
                   f"{family.evaluation} first")
    dataset, crops_root = dataset_crops(storage, checkpoint.params)
    example_path = next(iter(evaluation.outputs_test["path"]), None) or dataset.classification_ds["path"].iloc[0]
    files = registry.ModelFiles(bytes(evaluation.compiled), evaluation.label_index,
                                registry.preprocessing(Preprocessing.of(checkpoint.params)), evaluation.thresholds,
                                checkpoint.params, torch_bytes(checkpoint.ckpt), bytes(evaluation.onnx),
                                bytes(evaluation.exported), evaluation.open_set, evaluation.prediction_profile,
                                bytes(evaluation.compiled_outputs), evaluation.output_index)
    client = mlflow.client()
    _repair(context, client, model_name)
    run_id = checkpoint.params.get("mlflow_run_id")
    if not run_id:
        raise stop("the checkpoint names no MLflow run (params.json mlflow_run_id): retrain it")
    exports = sorted(dataset.classification_ds["dataset"].unique())
    source = registry.log_model(client, run_id, files, (crops_root / example_path).read_bytes())
    test = ev.summary_row(evaluation.outputs_test, evaluation.names) if len(evaluation.outputs_test) else {}
    tags = _lineage_tags(family, checkpoint, evaluation, exports, context.run.run_id) | {
        f"animl.test_{k}": f"{test[k]:.4f}" for k in GATE_METRICS if k in test}
    version = registry.register(client, model_name, source, run_id, tags,
                                description=f"{checkpoint.params['model_name']} on dataset "
                                            f"{checkpoint.params['dataset_version']}")
    client.set_registered_model_alias(model_name, registry.CHALLENGER, str(version.version))
    value = registry.RegisteredVersion(model_name, str(version.version), source, run_id, config.gate_margin,
                                       {k: test.get(k) for k in GATE_METRICS},
                                       f"models:/{model_name}/{version.version}", tags)
    data_version = value_version(value, family.registered)
    client.set_model_version_tag(model_name, str(version.version), registry.REGISTERED_TAG, data_version)
    context.log.info(f"registered {model_name} version {version.version} (alias challenger)")
    yield dg.Output(value, data_version=dg.DataVersion(data_version), metadata={
        "model_name": model_name, "model_version": int(version.version),
        "model_uri": value.model_uri, "alias": registry.CHALLENGER,
        "runtimes": ", ".join(["torchscript", *(["onnx", "torch.export"] if files.onnx else [])]),
        **({"outputs": dg.MetadataValue.json(["species", *files.output_index])} if files.output_index else {}),
        **{f"test_{k}": round(v, 4) for k, v in test.items() if k in ("acc_top1", "macro_recall", "macro_f1")},
        "lineage": dg.MetadataValue.json(tags),
    })


def _comparison(new: dict[str, float], champion: dict[str, float], margin: float) -> tuple[bool, list[dict]]:
    rows, passed = [], True
    for metric in GATE_METRICS:
        theirs, ours = champion[metric], new[metric]
        ok = ours - theirs >= margin - 1e-12
        passed &= ok
        rows.append({"metric": metric, "champion": round(theirs, 4), "new": round(ours, 4),
                     "difference": round(ours - theirs, 4), "required": margin, "passed": ok})
    return passed, rows


def compare_with_champion(registered_model: registry.RegisteredVersion, classifier_evaluation: Evaluation,
                          storage: ArtifactStore, mlflow: MlflowTracking) -> dg.AssetCheckResult:
    """The gate (``gate_check``): the new version against its registered model's champion on the same test split."""
    from animl_assets.core.ml.data import resolve_device

    value, evaluation = registered_model, classifier_evaluation
    name, margin = value.name, float(value.gate_margin)
    client = mlflow.client()
    champion = registry.by_alias(client, name, registry.CHAMPION)  # raises (and is retried) when it cannot ask
    if champion is None or str(champion.version) == str(value.version):
        return dg.AssetCheckResult(passed=True, metadata={
            "reason": "no champion yet: the first version becomes champion" if champion is None
            else "this version is the champion already", "new_version": int(value.version)})
    if evaluation.outputs_test.empty:
        return dg.AssetCheckResult(passed=False, metadata={"reason": "no test crops to compare on"})
    _, crops_root = dataset_crops(storage, evaluation.params)
    # both versions run the same way on the same crops, so a tie is a tie (the stored outputs are rounded)
    device = resolve_device("auto")
    new_version = registry.resolve(client, name, str(value.version))
    new = registered_scores(client, mlflow.uri, new_version, evaluation.outputs_test, crops_root, device)
    theirs = registered_scores(client, mlflow.uri, champion, evaluation.outputs_test, crops_root, device)
    passed, rows = _comparison(new, theirs, margin)
    return dg.AssetCheckResult(passed=passed, metadata={
        "comparison": table(pd.DataFrame(rows)), "champion_version": int(champion.version),
        "new_version": int(value.version), "margin": margin, "test_crops": len(evaluation.outputs_test),
        "reason": (f"version {value.version} beats champion version {champion.version}" if passed else
                   f"version {value.version} does not beat champion version {champion.version}: it stays "
                   f"challenger"),
    })


def promote_champion(context: dg.AssetExecutionContext, registered_model: registry.RegisteredVersion,
                     mlflow: MlflowTracking) -> dg.Output[registry.Champion]:
    """The registered model's ``champion`` alias, moved to the new version (``champion_asset``)."""
    name, version = registered_model.name, registered_model.version
    client = mlflow.client()
    _repair(context, client, name)
    previous = registry.promote(client, name, version, how="gate")
    context.log.info(f"{name} version {version} is champion (was: {previous or 'none'})")
    value = registry.Champion(name, version, previous, "gate", f"models:/{name}@{registry.CHAMPION}")
    family = family_of(context.asset_key.path[-1])
    return dg.Output(value, data_version=dg.DataVersion(value_version(value, family.champion)), metadata={
        "model_name": name, "champion_version": int(version), "replaced_version": previous or "",
        "model_uri": value.model_uri})


def registered_asset(family: ModelFamily, description: str) -> dg.AssetsDefinition:
    """``register_model`` as the family's registration asset."""
    return stage_asset(name=family.registered, group_name="registry" if family is CLASSIFIER else "empty",
                       kinds={"mlflow"}, description=description,
                       ins={"classifier_evaluation": dg.AssetIn(family.evaluation),
                            "classifier_checkpoint": dg.AssetIn(family.checkpoint)})(register_model)


def gate_check(family: ModelFamily, registered: dg.AssetsDefinition) -> dg.AssetChecksDefinition:
    """The family's blocking ``beats_champion`` check on its registration asset."""
    return stage_check(asset=registered, name="beats_champion", blocking=True,
                       additional_ins={"classifier_evaluation": dg.AssetIn(family.evaluation)},
                       description="The new version beats the current champion on the same test split (top-1 and "
                                   "macro recall, by the configured margin); the first version passes. Blocks "
                                   "promotion. Fails closed: a registry that cannot be asked for the champion fails "
                                   "the check.")(compare_with_champion)


def champion_asset(family: ModelFamily) -> dg.AssetsDefinition:
    """``promote_champion`` as the family's champion asset, after its registration asset."""
    return stage_asset(name=family.champion, group_name="registry" if family is CLASSIFIER else "empty",
                       kinds={"mlflow"}, ins={"registered_model": dg.AssetIn(family.registered)},
                       description="The registered model's champion alias, moved to the new version once "
                                   "beats_champion passed (animl promote moves it by hand).")(promote_champion)


registered_model = registered_asset(CLASSIFIER, (
    "The evaluated model as a new version of the registered model (a pyfunc that predicts class probabilities for a "
    "batch of crops, with its TorchScript file, labels, preprocessing, thresholds and params), tagged with its "
    "lineage and aliased challenger until the champion gate promotes it."))
beats_champion = gate_check(CLASSIFIER, registered_model)
champion_model = champion_asset(CLASSIFIER)
