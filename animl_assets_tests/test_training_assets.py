"""classifier_checkpoint through the Definitions: MLflow run, artifacts, resume, GPU tags, DDP on gloo."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import torch
from efficientnet_lite_pytorch import EfficientNet as LiteEfficientNet
from mlflow import MlflowClient

from animl_assets.core.ml.recipe import LAST
from animl_assets.core.registry import tracking
from animl_assets.definitions import TRAIN_JOB, build_definitions
from animl_assets.settings import Settings
from animl_assets_tests.conftest import dataset_home, latest_version

SMALL = {"model_name": "efficientnet-lite0", "pretrained": "lite0", "image_size": 64, "epochs": 2, "finetune": 2,
         "batch_size": 16, "lr": 0.001, "num_workers": 0, "progress_every": 2}
REFERENCE_PARAMS = {"dataset_dir", "cropped_images_dir", "multilabel", "model_name", "pretrained", "finetune",
                    "label_weighted", "weight_by_detection_conf", "epochs", "batch_size", "lr", "weight_decay",
                    "num_workers", "logdir", "log_extreme_examples", "seed"}


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory, built_dataset_home):
    """A home with the sample export ingested and one dataset version and splits built."""
    return dataset_home(tmp_path_factory.mktemp("train"), built_dataset_home)


def _train(settings, dagster_home, **config):
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        result = build_definitions(settings).resolve_job_def(TRAIN_JOB).execute_in_process(
            instance=instance, raise_on_error=False, asset_selection=[dg.AssetKey("classifier_checkpoint")],
            run_config={"ops": {"classifier_checkpoint": {"config": SMALL | config}}})
        folder = latest_version(settings, instance, "classifier_checkpoint") if result.success else None
    return result, folder


def _metadata(result):
    [event] = result.get_asset_materialization_events()
    return {k: v.value for k, v in event.step_materialization_data.materialization.metadata.items()}


def test_training_leaves_a_reference_checkpoint_and_an_mlflow_run_with_params_metrics_and_datasets(trained_home):
    settings, dagster_home = trained_home
    result, folder = _train(settings, dagster_home)
    assert result.success
    meta = _metadata(result)
    assert meta["epochs_run"] == 2 and meta["num_train_crops"] > 0 and meta["num_missing_crops"] == 0
    assert "learning_curve" in meta and Path(meta["learning_curve_path"]).stat().st_size > 1000

    # the artifact: what the reference's evaluate_model.py reads
    params = json.loads((folder / "params.json").read_text())
    assert REFERENCE_PARAMS <= set(params) and params["model_name"] == "efficientnet-lite0"
    label_index = json.loads((folder / "label_index.json").read_text())
    assert sorted(label_index.values()) == ["deer", "fox", "raccoon", "turkey"]
    ckpt = torch.load(folder / "ckpt_best.pt", weights_only=True)
    assert set(ckpt) == {"epoch", "model", "val/acc", "optimizer", "weights"}  # weights: raw or ema
    model = LiteEfficientNet.from_name("efficientnet-lite0", num_classes=len(label_index))
    model.load_state_dict(ckpt["model"])
    assert Path(params["dataset_dir"], "classification_ds.csv").is_file()
    assert Path(params["splits_json"]).is_file()

    # the MLflow run
    client = MlflowClient(tracking.embedded_tracking_uri(settings.home))
    experiment = client.get_experiment_by_name("animl/efficientnet-lite0")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == meta["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.tags[tracking.DAGSTER_RUN_TAG] == result.run_id
    assert run.data.tags["animl.dataset_version"] == meta["dataset_version"]
    assert run.data.tags["animl.exports"] == "sample/sample_export"
    assert run.data.params["batch_size"] == "16" and run.data.params["image_size"] == "64"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc_top1")] == [0, 1]
    for name in ("train/loss", "val/loss", "val/acc_top3", "val/acc_weighted_top1", "lr", "train/crops_per_s"):
        assert client.get_metric_history(run.info.run_id, name), name
    inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert inputs == {"classification_dataset": meta["dataset_version"], "splits": meta["splits_version"]}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert "checkpoint/ckpt_best.pt" in artifacts and "checkpoint/params.json" in artifacts
    assert Path(settings.home, "mlartifacts").is_dir()  # the embedded store keeps artifacts under ANIML_HOME


def test_a_rerun_of_the_same_config_and_data_resumes_instead_of_training_again(trained_home):
    settings, dagster_home = trained_home
    first, _ = _train(settings, dagster_home, seed=5)
    again, _ = _train(settings, dagster_home, seed=5)
    assert _metadata(first)["resumed_from_epoch"] == -1
    meta = _metadata(again)
    assert meta["resumed_from_epoch"] == 1 and meta["epochs_run"] == 2  # history kept, no epoch retrained
    assert meta["training_key"] == _metadata(first)["training_key"]
    fresh, _ = _train(settings, dagster_home, seed=5, resume=False)
    assert _metadata(fresh)["resumed_from_epoch"] == -1


def test_a_killed_training_resumes_at_the_next_epoch(trained_home, tmp_path):
    settings, dagster_home = trained_home
    config = SMALL | {"epochs": 6, "seed": 11, "image_size": 96}
    script = tmp_path / "train.py"
    script.write_text(
        "import dagster as dg, json, sys\n"
        "from animl_assets.definitions import TRAIN_JOB, build_definitions\n"
        "from animl_assets.settings import Settings\n"
        f"settings = Settings.from_env({{'ANIML_HOME': {str(settings.home)!r}}})\n"
        f"with dg.DagsterInstance.from_config({str(dagster_home)!r}) as instance:\n"
        "    build_definitions(settings).resolve_job_def(TRAIN_JOB).execute_in_process(instance=instance,\n"
        f"        run_config={{'ops': {{'classifier_checkpoint': {{'config': json.loads({json.dumps(json.dumps(config))})}}}}}})\n")
    output = (tmp_path / "train.log").open("w")
    process = subprocess.Popen([sys.executable, str(script)], stdout=output, stderr=subprocess.STDOUT)
    training = Path(settings.storage_uri, "classifier_checkpoint", "training")
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            lasts = list(training.glob(f"*/{LAST}")) if training.is_dir() else []
            states = [torch.load(p, weights_only=True) for p in lasts]
            if any(s["epoch"] >= 1 and s["params"]["seed"] == 11 for s in states):
                break
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    output.close()
    assert any(s["params"]["seed"] == 11 for s in states), (tmp_path / "train.log").read_text()[-3000:]
    killed_at = max(s["epoch"] for s in states if s["params"]["seed"] == 11)
    assert killed_at < 5, "the training finished before it could be killed"
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:  # what run monitoring does for a lost run:
        for run in instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):  # fail it, free its
            instance.report_run_failed(run)                                                 # gpu pool slot
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
    result, _ = _train(settings, dagster_home, **{k: v for k, v in config.items() if k not in SMALL or SMALL[k] != v})
    meta = _metadata(result)
    assert meta["resumed_from_epoch"] >= killed_at and meta["epochs_run"] == 6


def test_offline_imagenet_weights_fail_the_step_with_the_cache_file_to_provide(trained_home, monkeypatch, tmp_path):
    settings, dagster_home = trained_home
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    result, _ = _train(settings, dagster_home, model_name="efficientnet-b0", pretrained="true", finetune=0)
    [failure] = result.get_step_failure_events()
    message = failure.step_failure_data.error.to_string()
    assert "efficientnet-b0-355c32eb.pth" in message and str(tmp_path / "hub" / "checkpoints") in message


def test_lite0_weights_for_another_model_fail_before_training(trained_home):
    settings, dagster_home = trained_home
    result, _ = _train(settings, dagster_home, model_name="resnet18", pretrained="lite0")
    [failure] = result.get_step_failure_events()
    assert failure.step_failure_data.error.cls_name == "Failure"  # an expected stop: one line in the CLI
    assert "Lite0's weights; model_name is resnet18" in failure.step_failure_data.error.to_string()


def test_champion_init_fails_clearly_while_there_is_no_champion(trained_home):
    settings, dagster_home = trained_home
    result, _ = _train(settings, dagster_home, init_from="champion")
    [failure] = result.get_step_failure_events()
    assert "has no champion yet" in failure.step_failure_data.error.to_string()


def test_the_asset_asks_kubernetes_for_a_gpu_and_joins_the_gpu_pool():
    defs = build_definitions(Settings.from_env({}))
    spec = defs.resolve_assets_def("classifier_checkpoint")
    node = spec.node_def
    resources = json.loads(node.tags["dagster-k8s/config"])["container_config"]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    assert node.pool == "gpu"
    assert "pytorch" in spec.specs_by_key[dg.AssetKey("classifier_checkpoint")].kinds


def test_two_gloo_processes_train_through_torchrun_into_the_same_checkpoint_format(trained_home):
    settings, dagster_home = trained_home
    result, folder = _train(settings, dagster_home, processes=2, seed=21, device="cpu")
    assert result.success, [e.step_failure_data.error.to_string() for e in result.get_step_failure_events()]
    meta = _metadata(result)
    assert meta["epochs_run"] == 2
    ckpt = torch.load(folder / "ckpt_best.pt", weights_only=True)
    assert set(ckpt) == {"epoch", "model", "val/acc", "optimizer", "weights"}  # weights: raw or ema
    training = Path(settings.storage_uri, "classifier_checkpoint", "training", meta["training_key"])
    last = torch.load(training / LAST, weights_only=True)
    assert {"scheduler", "scaler", "rng", "history"} <= set(last)
    assert not any(key.startswith("module.") for key in ckpt["model"])  # DDP's prefix is not saved
    client = MlflowClient(tracking.embedded_tracking_uri(settings.home))
    assert [m.step for m in client.get_metric_history(meta["mlflow_run_id"], "val/acc_top1")] == [0, 1]
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        logs = [e.user_message for e in instance.all_logs(result.run_id) if "on 2 processes" in e.user_message]
    assert logs, "rank 0 reports each epoch through Pipes"
