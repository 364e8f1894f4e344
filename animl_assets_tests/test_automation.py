"""Automation: classifications follow a new champion or export; weekly retraining skips when nothing changed;
retries and run monitoring in the instance."""

import subprocess
import sys
from datetime import datetime, timezone

import dagster as dg
import pytest

from animl_assets.assets.dataset import READ_METADATA
from animl_assets.automation import AUTOMATION_SENSOR, RETRAIN_SCHEDULE, exports_changed
from animl_assets.definitions import RETRAIN_JOB, build_definitions
from animl_assets.lineage import DATA_VERSION_TAG
from animl_assets.resources.io_manager import INPUT_VERSION_TAG
from animl_assets.settings import Settings
from animl_assets_tests.conftest import EXPORT_NAME, add_export, run_ingest

REVIEW = dg.AssetSelection.assets("classifications", "classified_detections")


@pytest.fixture()
def defs(settings) -> dg.Definitions:
    return build_definitions(settings)


def _materialized(instance: dg.DagsterInstance, asset: str, partition: str | None = None, **tags: str) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=partition, tags=tags or None))


def _exported(instance: dg.DagsterInstance, partition: str, crops_version: str = "c1") -> None:
    """An export ingested: its partition, detections and crops (with a data version) materialized."""
    instance.add_dynamic_partitions("exports", [partition])
    for asset in ("cct_export", "images", "md_detections"):
        _materialized(instance, asset, partition)
    _materialized(instance, "crops", partition, **{DATA_VERSION_TAG: crops_version})


def _classified(instance: dg.DagsterInstance, partition: str) -> None:
    for asset in ("classifications", "classified_detections"):
        _materialized(instance, asset, partition)


def _requested(defs, instance, cursor):
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=REVIEW, cursor=cursor)
    partitions = {(asset, p) for asset in ("classifications", "classified_detections")
                  for p in result.get_requested_partitions(dg.AssetKey(asset))}
    return partitions, result.cursor


def test_classifications_follow_a_new_champion_and_then_each_new_export(defs, instance):
    _exported(instance, "a")
    requested, cursor = _requested(defs, instance, None)
    assert requested == set()  # no champion yet: nothing to classify with
    requested, cursor = _requested(defs, instance, cursor)
    assert requested == set()
    _materialized(instance, "champion_model")
    requested, cursor = _requested(defs, instance, cursor)
    assert requested == {("classifications", "a"), ("classified_detections", "a")}
    _classified(instance, "a")  # what that run does
    requested, cursor = _requested(defs, instance, cursor)
    assert requested == set()  # handled: no second run for the same champion
    _exported(instance, "b")
    requested, cursor = _requested(defs, instance, cursor)
    assert requested == {("classifications", "b"), ("classified_detections", "b")}
    _classified(instance, "b")
    requested, cursor = _requested(defs, instance, cursor)
    assert requested == set()
    _materialized(instance, "champion_model")  # a new champion: every export again
    requested, _ = _requested(defs, instance, cursor)
    assert {p for _, p in requested} == {"a", "b"}


def test_the_automation_sensor_is_on_from_the_start_and_targets_the_review_assets(defs):
    sensor = defs.resolve_sensor_def(AUTOMATION_SENSOR)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert {key.path[-1] for key in sensor.asset_selection.resolve(defs.resolve_asset_graph())} == {
        "classifications", "classified_detections", "review_queue"}


def _dataset(instance: dg.DagsterInstance, crops: dict[str, str], trained: bool = True) -> None:
    """A dataset version that read these crops versions; with ``trained``, a classifier trained on it."""
    version = "d-" + "-".join(f"{p}{v}" for p, v in sorted(crops.items()))
    instance.report_runless_asset_event(dg.AssetMaterialization("classification_dataset", tags={
        DATA_VERSION_TAG: version}, metadata={
        READ_METADATA: dg.MetadataValue.json({p: {"crops": v, "cct_export": "sha"} for p, v in crops.items()})}))
    if trained:
        _materialized(instance, "classifier_checkpoint", **{f"{INPUT_VERSION_TAG}classification_dataset": version})


def _tick(defs, instance):
    schedule = defs.resolve_schedule_def(RETRAIN_SCHEDULE)
    with dg.build_schedule_context(instance=instance, resources={"mlflow": defs.resources["mlflow"]},
                                   scheduled_execution_time=datetime(2026, 11, 23, 3, tzinfo=timezone.utc)) as context:
        return schedule.evaluate_tick(context)


def test_weekly_retraining_skips_until_an_export_changes(defs, instance):
    assert exports_changed(instance) == []
    assert "no export changed" in _tick(defs, instance).skip_message
    _exported(instance, "a")
    assert exports_changed(instance) == ["no classifier trained yet; 1 exports have crops"]
    _dataset(instance, {"a": "c1"})
    assert exports_changed(instance) == []
    assert _tick(defs, instance).skip_message
    _exported(instance, "b")
    _materialized(instance, "crops", "a", **{DATA_VERSION_TAG: "c2"})
    assert exports_changed(instance) == ["new export b", "export a re-cropped"]
    [request] = _tick(defs, instance).run_requests
    assert request.run_config == {}  # no champion: the training's own defaults
    assert request.run_key == "retrain-2026-11-23"
    assert dg.validate_run_config(defs.resolve_job_def(RETRAIN_JOB), request.run_config)
    # that retraining built its dataset, then its training failed: the next tick tries again
    _dataset(instance, {"a": "c2", "b": "c1"}, trained=False)
    assert exports_changed(instance) == ["new export b", "export a re-cropped"]
    _materialized(instance, "classifier_checkpoint", **{f"{INPUT_VERSION_TAG}classification_dataset": "d-ac2-bc1"})
    assert exports_changed(instance) == []


def test_the_instance_retries_crashed_runs_frees_their_slots_and_gives_the_gpu_pool_one_slot(instance):
    assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
    assert not instance.run_retries_retry_on_asset_or_op_failure  # step failures: the steps' own RetryPolicy
    assert instance.run_monitoring_enabled
    assert instance.get_concurrency_config().pool_config.default_pool_limit == 1


def test_s3_and_mlflow_steps_retry_with_exponential_backoff():
    defs = build_definitions(Settings.from_env({}))
    for asset in ("cct_export", "images", "crops", "classifications", "registered_model"):
        for op in defs.resolve_assets_def(asset).node_def.iterate_op_defs():  # crops: each of its steps
            policy = op.retry_policy
            assert policy.max_retries >= 3 and policy.backoff == dg.Backoff.EXPONENTIAL, op.name
            assert policy.calculate_delay(3) > policy.calculate_delay(1)


def test_a_malformed_export_fails_at_once_without_retries(settings, instance, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / EXPORT_NAME).write_text("{not json")
    partition = add_export(settings, instance, folder, "bad")
    result = run_ingest(settings, instance, partition)
    assert not result.success
    assert not [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
    [failure] = result.get_step_failure_events()
    assert "is malformed" in failure.step_failure_data.error.to_string()


def _cct_export_only(settings, instance, partition):
    from animl_assets.definitions import INGEST_JOB

    return build_definitions(settings).resolve_job_def(INGEST_JOB).execute_in_process(
        partition_key=partition, instance=instance, raise_on_error=False, asset_selection=[dg.AssetKey("cct_export")])


def test_a_bug_stops_at_once_and_a_dropped_connection_is_retried(settings, instance, sample_dir, monkeypatch):
    from animl_assets.assets import exports

    partition = add_export(settings, instance, sample_dir)
    real, calls = exports.validate_cct, []

    def broken(*args, **kwargs):
        calls.append(1)
        raise KeyError("images")  # the same on every try

    monkeypatch.setattr(exports, "validate_cct", broken)
    result = _cct_export_only(settings, instance, partition)
    assert not result.success and len(calls) == 1
    assert not [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
    [failure] = result.get_step_failure_events()
    assert failure.step_failure_data.user_failure_data.description == "KeyError: 'images'"
    assert "in broken" in failure.step_failure_data.user_failure_data.metadata["traceback"].value

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ConnectionResetError("connection reset by peer")
        return real(*args, **kwargs)

    monkeypatch.setattr(exports, "validate_cct", flaky)
    result = _cct_export_only(settings, instance, partition)
    assert result.success and len(calls) == 3
    assert [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]


def test_the_daemon_ends_a_cli_run_whose_process_is_gone(defs, instance):
    from animl_assets.automation import DEAD_RUNS_SENSOR
    from animl_assets.runs import HOST_TAG, PID_TAG, process_tags

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs
    tags = {PID_TAG: str(dead.pid), HOST_TAG: process_tags()[HOST_TAG]}
    gone = instance.create_run_for_job(_one_op_job, status=dg.DagsterRunStatus.STARTED, tags=tags)
    alive = instance.create_run_for_job(_one_op_job, status=dg.DagsterRunStatus.STARTED, tags=process_tags())
    instance.event_log_storage.set_concurrency_slots("gpu", 1)
    assert instance.event_log_storage.claim_concurrency_slot("gpu", gone.run_id, "train").is_claimed
    sensor = defs.resolve_sensor_def(DEAD_RUNS_SENSOR)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    with dg.build_sensor_context(instance=instance) as context:
        skip = sensor.evaluate_tick(context).skip_message
    assert f"run {gone.run_id[:8]}" in skip and "marked failed, its pool slots freed" in skip
    assert instance.get_run_by_id(gone.run_id).status == dg.DagsterRunStatus.FAILURE
    assert instance.get_run_by_id(alive.run_id).status == dg.DagsterRunStatus.STARTED  # this process lives
    assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots == []


@dg.op
def _one_op() -> None:
    pass


@dg.job
def _one_op_job() -> None:
    _one_op()
