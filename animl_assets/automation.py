"""What runs without anyone clicking: the sensor that evaluates the classifications' automation conditions
(they follow a new champion or a new export), a weekly retraining of the champion's recipe that skips
when no export changed since the dataset the newest classifier was trained on, and a retraining when an
export's classifications drift."""

import json
from typing import Any

import dagster as dg
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from mlflow.entities.model_registry import ModelVersion

from animl_assets.assets.dataset import READ_METADATA
from animl_assets.assets.exports import exports_partitions
from animl_assets.assets.inference import DRIFT_CHECK
from animl_assets.core.registry import registry
from animl_assets.core.registry.registry import OUTPUTS_TAG, TRAINING_CONFIG_TAG
from animl_assets.lineage import DATA_VERSION_TAG, newest_record, records
from animl_assets.resources.io_manager import INPUT_VERSION_TAG
from animl_assets.resources.tracking import MlflowTracking
from animl_assets.runs import end_dead_runs

AUTOMATION_SENSOR = "classify_on_new_champion_or_export"
RETRAIN_SCHEDULE = "weekly_retraining"
RETRAIN_CRON = "0 3 * * 1"  # Mondays 03:00 UTC


def _dataset_trained_on(instance: dg.DagsterInstance) -> Any | None:
    """The dataset record the newest trained checkpoint read, or None when nothing was trained yet. A dataset
    materialized by a retraining whose training failed is not it, so the next tick tries again."""
    checkpoint = newest_record(instance, "classifier_checkpoint")
    if checkpoint is None:
        return None
    version = (checkpoint.asset_materialization.tags or {}).get(f"{INPUT_VERSION_TAG}classification_dataset")
    for record in records(instance, "classification_dataset"):
        if (record.asset_materialization.tags or {}).get(DATA_VERSION_TAG) == version:
            return record
    return None


def exports_changed(instance: dg.DagsterInstance) -> list[str]:
    """How the exports' crops differ from what the newest trained classifier's dataset read (empty: nothing
    changed).

    Compares each export partition's newest ``crops`` data version with the ``exports_read`` lineage of the
    dataset version the newest ``classifier_checkpoint`` was trained on; a new export, re-cropped export or
    removed export counts."""
    current = {}
    for partition in instance.get_dynamic_partitions(exports_partitions.name):
        record = newest_record(instance, "crops", partition)
        if record is not None:
            current[partition] = (record.asset_materialization.tags or {}).get(DATA_VERSION_TAG)
    dataset = _dataset_trained_on(instance)
    if dataset is None:
        return [f"no classifier trained yet; {len(current)} exports have crops"] if current else []
    read_value = dataset.asset_materialization.metadata.get(READ_METADATA)
    read = {p: v["crops"] for p, v in (read_value.value if read_value else {}).items()}
    changes = [f"new export {p}" for p in sorted(current.keys() - read.keys())]
    changes += [f"export {p} re-cropped" for p in sorted(current.keys() & read.keys()) if current[p] != read[p]]
    changes += [f"export {p} no longer has crops" for p in sorted(read.keys() - current.keys())]
    return changes


def retraining_run_config(champion: ModelVersion | None) -> dict[str, Any]:
    """The champion's own training recipe (model, size, hyperparameters, and a multi-output model's outputs),
    warm-started from it; without a champion, the training config's defaults."""
    if champion is None:
        return {}
    recipe = json.loads(champion.tags.get(TRAINING_CONFIG_TAG) or "{}") or {
        "model_name": champion.tags.get("animl.model_name"), "image_size": int(champion.tags.get("animl.image_size") or 0)}
    ops: dict[str, Any] = {"classifier_checkpoint": {"config": {**recipe, "init_from": "champion"}}}
    outputs = json.loads(champion.tags.get(OUTPUTS_TAG) or "[]")
    if outputs:  # a multi-output champion: the new dataset carries the same outputs
        ops["classification_dataset"] = {"config": {"outputs": outputs}}
    return {"ops": ops}


def make_retraining_schedule(job: dg.JobDefinition | Any) -> dg.ScheduleDefinition:
    """Weekly: a new dataset version, splits and a classifier warm-started from the champion, gated as any
    training; skipped when no export changed since the newest dataset version."""

    @dg.schedule(name=RETRAIN_SCHEDULE, job=job, cron_schedule=RETRAIN_CRON, execution_timezone="UTC",
                 default_status=dg.DefaultScheduleStatus.RUNNING,
                 description="Mondays 03:00 UTC: rebuild the dataset across exports and retrain from the champion "
                             "(gated as any training); skipped when no export changed since the last dataset.")
    def weekly_retraining(context: dg.ScheduleEvaluationContext,
                          mlflow: MlflowTracking) -> dg.RunRequest | dg.SkipReason:
        changes = exports_changed(context.instance)
        if not changes:
            return dg.SkipReason("no export changed since the newest dataset version: nothing to retrain on")
        champion = registry.by_alias(mlflow.client(), registry.DEFAULT_MODEL, registry.CHAMPION)
        context.log.info(f"retraining ({'from the champion' if champion else 'from scratch'}): {changes}")
        return dg.RunRequest(run_key=f"retrain-{context.scheduled_execution_time:%Y-%m-%d}",
                             run_config=retraining_run_config(champion),
                             tags={"animl/retraining": "weekly", "animl/changes": "; ".join(changes)[:200]})

    return weekly_retraining


DRIFT_SENSOR = "retrain_on_drift"


def drifted_exports(instance: dg.DagsterInstance, after: int = 0, limit: int = 500) -> list[tuple[int, dict[str, Any]]]:
    """The failed ``drift`` checks of ``classifications`` recorded after the event id ``after``, oldest first:
    (id, the check's metadata and description)."""
    key = dg.AssetCheckKey(dg.AssetKey("classifications"), DRIFT_CHECK)
    found = []
    for record in instance.event_log_storage.get_asset_check_execution_history(
            key, limit=limit, status={AssetCheckExecutionRecordStatus.FAILED}):
        if record.id <= after or record.event is None or record.event.dagster_event is None:
            continue
        evaluation = record.event.dagster_event.event_specific_data
        found.append((record.id, {**{k: v.value for k, v in evaluation.metadata.items()},
                                  "description": evaluation.description or ""}))
    return sorted(found, key=lambda item: item[0])


def make_drift_sensor(job: dg.JobDefinition | Any) -> dg.SensorDefinition:
    """A retraining, warm-started from the champion, for each export version whose classifications drifted."""

    @dg.sensor(name=DRIFT_SENSOR, job=job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
               description="Every minute: an export whose classifications failed the drift check starts one retraining "
                           "(once per export version), its tags saying which export and why.")
    def retrain_on_drift(context: dg.SensorEvaluationContext, mlflow: MlflowTracking) -> dg.SensorResult:
        failed = drifted_exports(context.instance, int(context.cursor or 0))
        if not failed:
            return dg.SensorResult(skip_reason="no export's classifications drifted since the last look")
        champion = registry.by_alias(mlflow.client(), registry.DEFAULT_MODEL, registry.CHAMPION)
        requests = {}
        for _, found in failed:
            run_key = f"drift-{found['export']}-{found['export_version']}"
            requests[run_key] = dg.RunRequest(run_key=run_key, run_config=retraining_run_config(champion), tags={
                "animl/retraining": "drift", "animl/drift_export": found["export"],
                "animl/drift_export_version": found["export_version"], "animl/drift_model": found["model"],
                "animl/drift_reasons": found["description"][:200]})
        return dg.SensorResult(run_requests=list(requests.values()), cursor=str(failed[-1][0]))

    return retrain_on_drift


def make_automation_sensor(selection: dg.AssetSelection) -> dg.AutomationConditionSensorDefinition:
    """Evaluates the automation conditions of ``selection`` every 30 s; on from the start."""
    return dg.AutomationConditionSensorDefinition(
        AUTOMATION_SENSOR, target=selection, default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description="Classifies each new export, and every export again when the champion changes.")


DEAD_RUNS_SENSOR = "end_dead_runs"


@dg.sensor(name=DEAD_RUNS_SENSOR, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Every 30 s: a run the CLI started whose process is gone (kill -9, out of memory) is marked "
                       "failed and its pool slots freed; the daemon's run monitoring cannot see such runs.")
def end_dead_runs_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    """Ends dead CLI runs (``runs.end_dead_runs``); it requests no runs."""
    lines = end_dead_runs(context.instance)
    for line in lines:
        context.log.warning(line)
    return dg.SkipReason("; ".join(lines) or "no dead runs")
