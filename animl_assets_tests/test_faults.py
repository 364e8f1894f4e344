"""The CLI under faults: a training killed with SIGKILL, an MLflow server that is not there, config out of
its bounds. Each through real `animl` processes on one ingested home."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from mlflow import MlflowClient

from animl_assets.core.registry import tracking
from animl_assets_tests.conftest import dataset_home, free_port

ANIML = str(Path(sys.executable).with_name("animl"))
SLOW_ENOUGH = ("ops: {classifier_checkpoint: {config: {model_name: efficientnet-lite0, pretrained: lite0, "
               "image_size: 96, epochs: 3, finetune: 0, patience: 10, batch_size: 16, lr: 0.001, num_workers: 2, "
               "progress_every: 0}}, classifier_evaluation: {config: {num_workers: 0, portable: false}}}")
pytestmark = pytest.mark.slow


def cli_home(tmp_path_factory, built_dataset_home) -> tuple:
    """(settings, DAGSTER_HOME, a scratch folder with train.yaml, the env for `animl`) on a copy of the run's
    ingested home."""
    root = tmp_path_factory.mktemp("faults")
    settings, dagster_home = dataset_home(root, built_dataset_home)
    (root / "train.yaml").write_text(SLOW_ENOUGH)
    env = {**os.environ, "ANIML_HOME": str(settings.home), "DAGSTER_HOME": str(dagster_home),
           "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return settings, dagster_home, root, env


@pytest.fixture(scope="module")
def home(tmp_path_factory, built_dataset_home):
    return cli_home(tmp_path_factory, built_dataset_home)


def _animl(env, *args, timeout=600):
    started = time.monotonic()
    done = subprocess.run([ANIML, *args], env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - started


def _training_past_its_first_epoch(env, root, log: Path) -> subprocess.Popen:
    """``animl train`` in its own process group, once it has logged its first epoch (two more to go)."""
    with log.open("w") as out:
        training = subprocess.Popen([ANIML, "train", "--run-config", str(root / "train.yaml")], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while "epoch 1/3" not in log.read_text() and training.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert training.poll() is None, log.read_text()
    return training


def test_a_killed_training_neither_wedges_the_home_nor_loses_its_mlflow_run(home):
    settings, dagster_home, root, env = home
    log = root / "killed.log"
    victim = _training_past_its_first_epoch(env, root, log)
    os.killpg(victim.pid, signal.SIGKILL)  # the run process and its loader workers, mid-training
    victim.wait()
    [mlflow_run] = re.findall(r"MLflow run (\w+) \(new\)", log.read_text())

    # the dead run is found, failed and its gpu slot freed; its MLflow run is an orphan until resumed
    listed, _ = _animl(env, "orphans")
    assert listed.returncode == 0, listed.stderr
    assert "died without ending: marked failed, its pool slots freed" in listed.stdout
    assert f"orphan MLflow run {mlflow_run}" in listed.stdout
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        [dead] = instance.get_runs(filters=dg.RunsFilter(job_name="train_classifier"))
        assert dead.status == dg.DagsterRunStatus.FAILURE
        assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots == []

    resumed, seconds = _animl(env, "train", "--run-config", str(root / "train.yaml"), timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"MLflow run {mlflow_run} (continued)" in resumed.stdout  # the same MLflow run, not a new one
    client = MlflowClient(tracking.embedded_tracking_uri(settings.home), tracking.embedded_tracking_uri(settings.home))
    run = client.get_run(mlflow_run)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(mlflow_run, "val/acc_top1")) == [0, 1, 2]
    again, _ = _animl(env, "orphans")
    assert "no orphan MLflow runs" in again.stdout


@dg.op
def _train() -> None:
    pass


@dg.job
def _holder_job() -> None:
    _train()


def test_a_run_waiting_for_the_gpu_says_so_and_stops_on_sigterm(home):
    settings, dagster_home, root, env = home
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        # a run in progress elsewhere (the UI's, another machine's) holds the gpu pool's one slot
        holder = instance.create_run_for_job(_holder_job, status=dg.DagsterRunStatus.STARTED)
        assert instance.event_log_storage.claim_concurrency_slot("gpu", holder.run_id, "train").is_claimed
    log = root / "waiting.log"
    with log.open("w") as out:
        waiting = subprocess.Popen([ANIML, "train", "--run-config", str(root / "train.yaml")], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while "waiting for the gpu pool" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"waiting for the gpu pool, held by run {holder.run_id[:8]}" in log.read_text()
    waiting.send_signal(signal.SIGTERM)
    assert waiting.wait(timeout=30) == 130 and "animl train: stopped" in log.read_text()
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        instance.event_log_storage.free_concurrency_slots_for_run(holder.run_id)
        instance.report_run_failed(instance.get_run_by_id(holder.run_id))
        assert [r.job_name for r in instance.get_runs(filters=dg.RunsFilter(job_name="train_classifier"))
                if r.status == dg.DagsterRunStatus.STARTED] == []  # nothing ran


def test_an_unreachable_tracking_server_fails_in_one_line_within_a_minute(home):
    _, _, root, env = home
    gone = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    for args in (("train", "--run-config", str(root / "train.yaml")), ("promote", "1")):
        done, seconds = _animl(gone, *args, timeout=120)
        assert done.returncode == 2 and seconds < 60, (seconds, done.stdout, done.stderr)
        [line] = done.stderr.strip().splitlines()
        assert "does not answer" in line and "MLFLOW_TRACKING_URI" in line and "Traceback" not in done.stdout


def test_config_out_of_its_bounds_is_one_line_before_any_run(home):
    _, dagster_home, root, env = home
    (root / "bad.yaml").write_text("ops: {classifier_checkpoint: {config: {epochs: 0, lr: -0.1, batch_size: 0}}}")
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        runs = len(instance.get_runs())
    done, _ = _animl(env, "train", "--run-config", str(root / "bad.yaml"))
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    for field in ("epochs", "lr", "batch_size"):
        assert f"classifier_checkpoint.{field}: input should be greater than or equal to" in line
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert len(instance.get_runs()) == runs
