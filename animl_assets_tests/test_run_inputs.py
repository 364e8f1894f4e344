"""Each step reads the upstream versions of its own run: never another run's newer output, never a version
whose blocking check failed, never splits of another dataset."""

import dagster as dg
import pytest
from mlflow import MlflowClient

from animl_assets.core.ml import evaluation
from animl_assets.core.registry import tracking
from animl_assets.definitions import DATASET_JOB, TRAIN_JOB, build_definitions
from animl_assets_tests.conftest import dataset_home

QUICK = {"model_name": "efficientnet-lite0", "pretrained": "lite0", "image_size": 64, "epochs": 1, "finetune": 1,
         "batch_size": 16, "lr": 0.001, "num_workers": 0, "progress_every": 0}
ANY_MODEL_WINS = {"gate_margin": -1.0}  # both runs promote: the test is about what each registers
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def home(tmp_path_factory, built_dataset_home):
    return dataset_home(tmp_path_factory.mktemp("inputs"), built_dataset_home)


def _run(settings, dagster_home, job, selection=None, tags=None, **ops):
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        return build_definitions(settings).resolve_job_def(job).execute_in_process(
            instance=instance, raise_on_error=False, asset_selection=selection, tags=tags,
            run_config={"ops": {name: {"config": config} for name, config in ops.items()}})


def _meta(result, asset):
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        if materialization.asset_key == dg.AssetKey(asset):
            return {k: v.value for k, v in materialization.metadata.items()}
    return None


def _errors(result) -> str:
    return " | ".join(e.step_failure_data.error.to_string() for e in result.get_step_failure_events())


def test_two_trainings_at_once_each_register_their_own_checkpoint(home, monkeypatch):
    settings, dagster_home = home
    real, nested = evaluation.evaluate, {}

    def evaluate_while_another_training_runs(*args, **kwargs):
        if not nested:  # run A's evaluation: run B trains, evaluates and registers meanwhile
            nested["B"] = None
            nested["B"] = _run(settings, dagster_home, TRAIN_JOB, classifier_checkpoint=QUICK | {"seed": 1},
                               classifier_evaluation={"num_workers": 0}, registered_model=ANY_MODEL_WINS)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", evaluate_while_another_training_runs)  # what the asset calls
    first = _run(settings, dagster_home, TRAIN_JOB, classifier_checkpoint=QUICK, classifier_evaluation={"num_workers": 0},
                 registered_model=ANY_MODEL_WINS)
    second = nested["B"]
    assert first.success, _errors(first)
    assert second.success, _errors(second)
    client = MlflowClient(tracking.embedded_tracking_uri(settings.home), tracking.embedded_tracking_uri(settings.home))
    for result in (first, second):
        checkpoint = _meta(result, "classifier_checkpoint")["version"]
        version = client.get_model_version("animl-classifier", str(_meta(result, "registered_model")["model_version"]))
        assert version.tags["animl.checkpoint_version"] == checkpoint
        assert version.tags["dagster.run_id"] == result.run_id
    assert _meta(first, "classifier_checkpoint")["version"] != _meta(second, "classifier_checkpoint")["version"]


def test_a_corrupt_crop_is_left_out_and_counted_like_a_missing_one(home):
    settings, dagster_home = home
    crop = next((settings.home / "artifacts" / "crops").rglob("*___crop*.jpg"))
    original = crop.read_bytes()
    crop.write_bytes(original[: len(original) // 2])  # cut short: a loader worker would raise on it
    try:
        result = _run(settings, dagster_home, TRAIN_JOB, selection=[dg.AssetKey("classifier_checkpoint"),
                                                                    dg.AssetKey("classifier_evaluation")],
                      classifier_checkpoint=QUICK | {"num_workers": 2}, classifier_evaluation={"num_workers": 0})
    finally:
        crop.write_bytes(original)
    assert result.success, _errors(result)
    meta = _meta(result, "classifier_checkpoint")
    assert meta["num_missing_crops"] == 1 and meta["num_unreadable_crops"] == 1
    [row] = meta["missing_crops"].records
    assert row.data["problem"] == "truncated JPEG (no end marker)" and row.data["path"].endswith(crop.name)
    assert _meta(result, "classifier_evaluation")["num_missing_crops"] == 1


def test_a_version_whose_blocking_check_failed_is_never_an_input(home):
    settings, dagster_home = home
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        good = instance.get_latest_materialization_event(dg.AssetKey("classification_dataset"))
    good_version = good.asset_materialization.metadata["version"].value
    # a dataset version too small to train on: its check fails, so no training reads it
    small = _run(settings, dagster_home, DATASET_JOB, classification_dataset={"min_crops_per_label": 10_000,
                                                                              "excluded_classes": ["empty", "turkey"]})
    assert not small.success and _meta(small, "classification_dataset")["version"] != good_version
    training = _run(settings, dagster_home, TRAIN_JOB, selection=[dg.AssetKey("classifier_checkpoint")],
                    classifier_checkpoint=QUICK)
    assert training.success, _errors(training)
    assert _meta(training, "classifier_checkpoint")["dataset_version"] == good_version
    loaded = [e.event_specific_data.metadata for e in training.all_events if e.event_type_value == "LOADED_INPUT"]
    assert any(m.get("version") and m["version"].value == good_version for m in loaded)

    # a new dataset whose splits fail their check: the newest good splits are another dataset's, so no training
    bad_splits = _run(settings, dagster_home, DATASET_JOB, classification_dataset={"excluded_classes": ["empty", "fox"]},
                      splits={"val_frac": 0.02, "test_frac": 0.02, "trials": 50})
    assert not bad_splits.success and _meta(bad_splits, "splits") is not None
    refused = _run(settings, dagster_home, TRAIN_JOB, selection=[dg.AssetKey("classifier_checkpoint")],
                   classifier_checkpoint=QUICK)
    assert not refused.success and "materialize splits first" in _errors(refused)

    # a run can pin the versions it reads
    pinned = _run(settings, dagster_home, TRAIN_JOB, selection=[dg.AssetKey("classifier_checkpoint")],
                  tags={"animl/version/classification_dataset": good_version}, classifier_checkpoint=QUICK)
    assert pinned.success, _errors(pinned)
    assert _meta(pinned, "classifier_checkpoint")["dataset_version"] == good_version
