"""Evaluation, registry and the champion gate through the Definitions' train job."""

import io
import json
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from animl_assets.core import tracking
from animl_assets.core.evaluation import LABEL_STATS_COLUMNS, OVERALL_COLUMNS
from animl_assets.definitions import COMPARE_JOB, DATASET_JOB, TRAIN_JOB, build_definitions
from animl_assets.settings import Settings
from animl_assets_tests.conftest import REPO, add_export, latest_version, run_ingest

SMALL = {"model_name": "efficientnet-lite0", "pretrained": "lite0", "image_size": 64, "epochs": 2, "finetune": 2,
         "batch_size": 16, "lr": 0.001, "num_workers": 0, "progress_every": 0}
WORSE = SMALL | {"pretrained": "false", "epochs": 1, "finetune": 0, "lr": 1e-5, "label_weighted": False}
FAST_EVAL = {"num_workers": 0}


def _run(settings, dagster_home, job=TRAIN_JOB, selection=None, **ops):
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        return build_definitions(settings).resolve_job_def(job).execute_in_process(
            instance=instance, raise_on_error=False, asset_selection=selection,
            run_config={"ops": {name: {"config": config} for name, config in ops.items()}})


def _train_all(settings, dagster_home, training, **ops):
    return _run(settings, dagster_home, classifier_checkpoint=training, classifier_evaluation=FAST_EVAL, **ops)


def _materialized(result, asset):
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        if materialization.asset_key == dg.AssetKey(asset):
            return {k: v.value for k, v in materialization.metadata.items()}
    return None


def _gate(result):
    [check] = [c for c in result.get_asset_check_evaluations() if c.check_name == "beats_champion"]
    return check


@pytest.fixture(scope="module")
def registered_home(tmp_path_factory, sample_dir):
    """The sample export ingested, a dataset built, and the train job run once: v1, the champion."""
    root = tmp_path_factory.mktemp("registry")
    settings = Settings.from_env({"ANIML_HOME": str(root / "animl")})
    dagster_home = root / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_bytes((REPO / "dagster.yaml").read_bytes())
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        partition = add_export(settings, instance, sample_dir)
        assert run_ingest(settings, instance, partition).success
        assert build_definitions(settings).resolve_job_def(DATASET_JOB).execute_in_process(instance=instance).success
    result = _train_all(settings, dagster_home, SMALL)
    assert result.success, [e.step_failure_data.error.to_string() for e in result.get_step_failure_events()]
    return settings, dagster_home, result


def _client(settings):
    return MlflowClient(tracking.embedded_tracking_uri(settings.home), tracking.embedded_tracking_uri(settings.home))


def test_the_evaluation_writes_the_reference_files_torchscript_and_plots(registered_home):
    settings, dagster_home, result = registered_home
    meta = _materialized(result, "classifier_evaluation")
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        folder = latest_version(settings, instance, "classifier_evaluation")
    label_index = json.loads((folder / "label_index.json").read_text())
    names = [label_index[str(i)] for i in range(len(label_index))]
    for split in ("train", "val", "test"):
        outputs = pd.read_csv(folder / f"outputs_{split}.csv.gz")
        assert list(outputs.columns) == ["path", "label", "weight", *names]
        assert len(outputs) == meta[f"num_{split}_crops"] > 0
        assert np.allclose(outputs[names].sum(axis=1), 1, atol=1e-5)
    overall = pd.read_csv(folder / "overall_metrics.csv")
    assert tuple(overall.columns) == OVERALL_COLUMNS and list(overall["split"]) == ["train", "val", "test"]
    assert tuple(pd.read_csv(folder / "label_stats.csv").columns) == LABEL_STATS_COLUMNS
    with np.load(folder / "confusion_matrices.npz") as cms:
        assert sorted(cms.files) == ["test", "train", "val"] and cms["test"].shape == (len(names),) * 2
        assert cms["test"].sum() == meta["num_test_crops"]
    thresholds = json.loads((folder / "thresholds.json").read_text())
    assert set(thresholds["labels"]) == set(names) and thresholds["target_precision"] == 0.95

    # the TorchScript file stands alone and agrees with outputs_test
    scripted = torch.jit.load(folder / "ckpt_best_compiled.pt")
    assert meta["torchscript_max_abs_diff"] < 1e-4
    assert isinstance(scripted, torch.jit.ScriptModule)

    for figure in ("confusion_test", "reliability_test", "errors_test"):
        assert meta[figure].startswith("![") and Path(meta[f"{figure}_path"]).stat().st_size > 5000
    client = _client(settings)
    run_id = meta["mlflow_run_id"]
    logged = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/confusion_test.png", "evaluation/reliability_test.png", "evaluation/errors_test.png",
            "evaluation/label_report.csv", "evaluation/thresholds.json"} <= logged
    assert "eval/test/acc_top1" in client.get_run(run_id).data.metrics
