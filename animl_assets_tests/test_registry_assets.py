"""Evaluation, registry and the champion gate through the Definitions' train job."""

import io
import json
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from animl_assets.automation import RETRAIN_SCHEDULE, exports_changed
from animl_assets.core.ml.evaluation import LABEL_STATS_COLUMNS, OVERALL_COLUMNS
from animl_assets.core.registry import registry, tracking
from animl_assets.definitions import COMPARE_JOB, DATASET_JOB, RETRAIN_JOB, TRAIN_JOB, build_definitions
from animl_assets.lineage import DATA_VERSION_TAG
from animl_assets_tests.conftest import dataset_home, latest_version

SMALL = {"model_name": "efficientnet-lite0", "pretrained": "lite0", "image_size": 64, "epochs": 2, "finetune": 2,
         "batch_size": 16, "lr": 0.001, "num_workers": 0, "progress_every": 0}
WORSE = SMALL | {"pretrained": "false", "epochs": 1, "finetune": 0, "lr": 1e-5, "label_weighted": False}
FAST_EVAL = {"num_workers": 0, "portable": False}  # the ONNX and torch.export copies: test_timm_backbones
# Each module run trains a few small models, and its tests are one story (v1 champion, a worse v2 challenger,
# promotions): they run in order on one xdist worker (--dist loadfile in pyproject.toml).
pytestmark = pytest.mark.slow


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
def registered_home(tmp_path_factory, built_dataset_home):
    """The sample export ingested, a dataset built, and the train job run once: v1, the champion."""
    settings, dagster_home = dataset_home(tmp_path_factory.mktemp("registry"), built_dataset_home)
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

    # sequence-level top-1 beside the crop-level one (the sample export has seq_id)
    assert 0 <= meta["test_sequence_acc_top1"] <= 1 and 0 < meta["num_test_sequences"] <= meta["num_test_crops"]
    for figure in ("confusion_test", "reliability_test", "errors_test"):
        assert meta[figure].startswith("![") and Path(meta[f"{figure}_path"]).stat().st_size > 5000
    client = _client(settings)
    run_id = meta["mlflow_run_id"]
    logged = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/confusion_test.png", "evaluation/reliability_test.png", "evaluation/errors_test.png",
            "evaluation/label_report.csv", "evaluation/thresholds.json"} <= logged
    assert "eval/test/acc_top1" in client.get_run(run_id).data.metrics


def test_the_champion_loads_with_pyfunc_and_predicts_the_evaluations_probabilities(registered_home, monkeypatch):
    settings, dagster_home, result = registered_home
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        folder = latest_version(settings, instance, "classifier_evaluation")
    outputs = pd.read_csv(folder / "outputs_test.csv.gz").head(6)
    names = [c for c in outputs.columns if c not in ("path", "label", "weight")]
    crops = settings.home / "artifacts" / "crops"
    uri = tracking.embedded_tracking_uri(settings.home)
    # through the environment, restored after the test (mlflow.set_tracking_uri would leave this store as
    # every later test's MLFLOW_TRACKING_URI in this worker)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    model = mlflow.pyfunc.load_model("models:/animl-classifier@champion")
    predicted = model.predict(pd.DataFrame({"image": [(crops / p).read_bytes() for p in outputs["path"]]}))
    assert list(predicted.columns) == names
    assert np.allclose(predicted.to_numpy(), outputs[names].to_numpy(), atol=1e-4)
    info = model.metadata
    assert info.signature.inputs.input_names() == ["image"] and info.signature.outputs.input_names() == names
    assert info.metadata["preprocessing"]["image_size"] == SMALL["image_size"]
    assert info.saved_input_example_info is not None


def test_the_first_version_is_champion_with_its_lineage_as_tags(registered_home):
    settings, dagster_home, result = registered_home
    assert _gate(result).passed and "first version" in _gate(result).metadata["reason"].value
    client = _client(settings)
    champion = client.get_model_version_by_alias("animl-classifier", "champion")
    training = _materialized(result, "classifier_checkpoint")
    assert champion.tags["animl.dataset_version"] == training["dataset_version"]
    assert champion.tags["animl.splits_version"] == training["splits_version"]
    assert champion.tags["animl.training_run_id"] == training["mlflow_run_id"] == champion.run_id
    assert champion.tags["animl.exports"] and champion.tags["dagster.run_id"] == result.run_id
    assert champion.tags["animl.promoted"] == "gate"
    assert _materialized(result, "champion_model")["champion_version"] == int(champion.version)


def test_weekly_retraining_reads_the_real_lineage_and_warm_starts_from_the_champion(registered_home):
    settings, dagster_home, _ = registered_home
    defs = build_definitions(settings)
    schedule = defs.resolve_schedule_def(RETRAIN_SCHEDULE)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert exports_changed(instance) == []  # the dataset read the crops' own data versions
        with dg.build_schedule_context(instance=instance, resources={"mlflow": defs.resources["mlflow"]},
                                       scheduled_execution_time=datetime.now(timezone.utc)) as context:
            assert "no export changed" in schedule.evaluate_tick(context).skip_message
            [partition] = instance.get_dynamic_partitions("exports")
            instance.report_runless_asset_event(dg.AssetMaterialization(  # the export re-cropped
                "crops", partition=partition, tags={DATA_VERSION_TAG: "recropped"}))
            [request] = schedule.evaluate_tick(context).run_requests
    config = request.run_config["ops"]["classifier_checkpoint"]["config"]
    assert config["init_from"] == "champion"
    # the champion's own recipe: a Lite0 at 64 px, not the config's default b0 (which cannot load it)
    assert {k: config[k] for k in ("model_name", "image_size", "epochs", "batch_size", "finetune")} == {
        k: SMALL[k] for k in ("model_name", "image_size", "epochs", "batch_size", "finetune")}
    assert config["lr"] == pytest.approx(SMALL["lr"])
    assert dg.validate_run_config(defs.resolve_job_def(RETRAIN_JOB), request.run_config)


def test_a_worse_model_stays_challenger_and_the_gate_says_why(registered_home):
    settings, dagster_home, _ = registered_home
    client = _client(settings)
    before = client.get_model_version_by_alias("animl-classifier", "champion").version
    result = _train_all(settings, dagster_home, WORSE)
    gate = _gate(result)
    assert not result.success and not gate.passed
    assert _materialized(result, "champion_model") is None  # blocked
    new = _materialized(result, "registered_model")["model_version"]
    assert client.get_model_version_by_alias("animl-classifier", "champion").version == before
    assert str(client.get_model_version_by_alias("animl-classifier", "challenger").version) == str(new)
    rows = {r.data["metric"]: r.data for r in gate.metadata["comparison"].value.records}
    assert set(rows) == {"acc_top1", "macro_recall"} and not all(r["passed"] for r in rows.values())
    assert "stays challenger" in gate.metadata["reason"].value

    # trained without label weighting: the evaluation's weights are all 1, weighted == plain
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        folder = latest_version(settings, instance, "classifier_evaluation")
    assert (pd.read_csv(folder / "outputs_val.csv.gz")["weight"] == 1.0).all()
    overall = pd.read_csv(folder / "overall_metrics.csv")
    assert np.allclose(overall["acc_top1"], overall["acc_weighted_top1"])


def _flaky_alias_lookups(monkeypatch, failures: int | None):
    """The registry answers the champion lookup with a 503 ``failures`` times (None: always)."""
    real, calls = MlflowClient.get_model_version_by_alias, []

    def lookup(self, name, alias):
        calls.append(alias)
        if alias == "champion" and (failures is None or calls.count("champion") <= failures):
            raise MlflowException("503 Service Unavailable", error_code=TEMPORARILY_UNAVAILABLE)
        return real(self, name, alias)

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", lookup)
    return calls


@pytest.mark.usefixtures("quick_retries")
def test_the_gate_fails_closed_when_the_registry_cannot_be_asked(registered_home, monkeypatch):
    settings, dagster_home, _ = registered_home
    client = _client(settings)
    register = [dg.AssetKey("registered_model"), dg.AssetKey("champion_model")]
    champion = client.get_model_version_by_alias("animl-classifier", "champion").version
    # one 503 on the champion lookup: the check is retried and compares as usual (the worse model stays challenger)
    calls = _flaky_alias_lookups(monkeypatch, failures=1)
    once = _run(settings, dagster_home, selection=register)
    assert calls.count("champion") >= 2 and not _gate(once).passed
    assert "does not beat" in _gate(once).metadata["reason"].value
    assert _materialized(once, "champion_model") is None
    # the registry down for good: no verdict, no promotion, and the failure says why
    calls = _flaky_alias_lookups(monkeypatch, failures=None)
    down = _run(settings, dagster_home, selection=register)
    assert not down.success and not down.get_asset_check_evaluations()
    assert _materialized(down, "champion_model") is None
    errors = [e.step_failure_data.error for e in down.get_step_failure_events()]
    assert any("could not be asked for animl-classifier@champion" in (e.cause or e).message for e in errors)
    monkeypatch.undo()
    assert client.get_model_version_by_alias("animl-classifier", "champion").version == champion
    # the CLI says so in one line too
    monkeypatch.setenv("ANIML_HOME", str(settings.home))
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    _flaky_alias_lookups(monkeypatch, failures=None)
    from animl_assets import cli

    assert cli.main(["promote", "champion"]) == 2


def test_promote_never_moves_another_models_champion(registered_home, monkeypatch, capsys):
    settings, dagster_home, _ = registered_home
    monkeypatch.setenv("ANIML_HOME", str(settings.home))
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    client = _client(settings)
    champion = client.get_model_version_by_alias("animl-classifier", "champion").version
    other = client.get_model_version("animl-classifier", "1")
    registry.register(client, "othermodel", other.source, other.run_id, {})
    from animl_assets import cli

    # a URI names its own model: promoting it moves othermodel's alias, not animl-classifier's
    assert cli.main(["promote", "models:/othermodel/1"]) == 0
    assert str(client.get_model_version_by_alias("othermodel", "champion").version) == "1"
    assert client.get_model_version_by_alias("animl-classifier", "champion").version == champion
    assert "othermodel version 1 is champion" in capsys.readouterr().out
    assert cli.main(["promote", "models:/othermodel/1", "--model", "animl-classifier"]) == 2
    assert "is a version of 'othermodel', not of --model 'animl-classifier'" in capsys.readouterr().err
    assert cli.main(["promote", "models:/othermodel/7"]) == 2
    assert "has no version 7" in capsys.readouterr().err
    assert client.get_model_version_by_alias("animl-classifier", "champion").version == champion


def test_the_gate_passes_on_a_tie_and_fails_past_its_margin(registered_home, monkeypatch):
    settings, dagster_home, _ = registered_home
    monkeypatch.setenv("ANIML_HOME", str(settings.home))
    client = _client(settings)
    register = [dg.AssetKey("registered_model"), dg.AssetKey("champion_model")]
    # re-register the latest evaluation against itself-as-champion: first make its version champion by hand
    failing = _run(settings, dagster_home, selection=register, registered_model={"gate_margin": 0.5})
    version = _materialized(failing, "registered_model")["model_version"]
    assert not _gate(failing).passed  # the champion is another model; nothing beats it by 0.5
    from animl_assets import cli

    assert cli.main(["promote", str(version), "--reason", "test"]) == 0
    promoted = client.get_model_version("animl-classifier", str(version))
    assert promoted.tags["animl.promoted"] == "hand" and promoted.tags["animl.promotion_reason"] == "test"
    assert str(client.get_model_version_by_alias("animl-classifier", "champion").version) == str(version)
    # the same evaluation registered again ties with the champion: passes with margin 0, fails with 0.01
    tie = _run(settings, dagster_home, selection=register)
    assert _gate(tie).passed and tie.success
    rows = {r.data["metric"]: r.data for r in _gate(tie).metadata["comparison"].value.records}
    assert all(abs(r["difference"]) < 1e-6 for r in rows.values())
    assert not _gate(_run(settings, dagster_home, selection=register, registered_model={"gate_margin": 0.01})).passed


def test_comparison_sets_an_external_model_through_a_target_mapping_beside_our_own(registered_home, tmp_path):
    settings, dagster_home, _ = registered_home
    client = _client(settings)  # the comparison reads both aliases, whatever the tests before left
    newest = max(int(v.version) for v in client.search_model_versions("name = 'animl-classifier'"))
    client.set_registered_model_alias("animl-classifier", "challenger", str(newest))
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        folder = latest_version(settings, instance, "classifier_evaluation")
    label_index = json.loads((folder / "label_index.json").read_text())
    # the same network under other names: ours split in two labels and one unmapped ("blank")
    theirs = {str(i): f"their_{name}" for i, name in label_index.items()}
    (tmp_path / "labels.json").write_text(json.dumps(theirs))
    (tmp_path / "mapping.json").write_text(json.dumps({name: [f"their_{name}"] for name in label_index.values()}))
    external = {"name": "renamed", "torchscript": str(folder / "ckpt_best_compiled.pt"),
                "label_index": str(tmp_path / "labels.json"), "target_mapping": str(tmp_path / "mapping.json"),
                "image_size": SMALL["image_size"]}
    broken = external | {"name": "unmapped", "target_mapping": ""}  # names match nothing: all "other"
    result = _run(settings, dagster_home, job=COMPARE_JOB, model_comparison={
        "registered": ["champion", "challenger", "models:/animl-classifier/1", "99"],
        "external": [external, broken]})
    assert result.success, [e.step_failure_data.error.to_string() for e in result.get_step_failure_events()]
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        table = pd.read_csv(latest_version(settings, instance, "model_comparison") / "model_comparison.csv")
    rows = table.set_index("model")
    assert len(rows) == 6  # ours, champion, challenger, version 1, two external; no version 99: skipped
    assert "animl-classifier v1 (models:/animl-classifier/1)" in rows.index
    ours, renamed = rows.loc["this evaluation"], rows.loc["renamed"]
    for metric in ("acc_top1", "macro_recall", "loss"):
        assert renamed[metric] == pytest.approx(ours[metric], abs=1e-4)
    assert rows.loc["unmapped", "acc_top1"] == 0.0


def test_training_can_start_from_the_champion(registered_home):
    settings, dagster_home, _ = registered_home
    result = _run(settings, dagster_home, selection=[dg.AssetKey("classifier_checkpoint")],
                  classifier_checkpoint=SMALL | {"init_from": "champion", "pretrained": "false", "epochs": 1,
                                                 "finetune": 1})
    assert result.success, [e.step_failure_data.error.to_string() for e in result.get_step_failure_events()]
    champion = _client(settings).get_model_version_by_alias("animl-classifier", "champion")
    start = torch.load(io.BytesIO(registry.model_files(tracking.embedded_tracking_uri(settings.home),
                                                       champion).checkpoint), weights_only=True)["model"]
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        trained = torch.load(latest_version(settings, instance, "classifier_checkpoint") / "ckpt_best.pt",
                             weights_only=True)["model"]
    convs = [k for k, v in start.items() if v.ndim == 4]
    # head-only fine-tuning: the backbone is the champion's, weight for weight
    assert convs and all(torch.equal(start[k], trained[k]) for k in convs)


def test_gc_keeps_what_registered_models_were_made_from(registered_home, monkeypatch, capsys):
    settings, dagster_home, _ = registered_home
    monkeypatch.setenv("ANIML_HOME", str(settings.home))
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    from animl_assets import cli

    assert cli.main(["gc", "--keep", "1"]) == 0
    printed = capsys.readouterr().out
    client = _client(settings)
    for version in client.search_model_versions("name = 'animl-classifier'"):
        for tag in ("animl.checkpoint_version", "animl.evaluation_version", "animl.dataset_version"):
            assert version.tags[tag] not in printed
    assert cli.main(["lineage", "registered_model"]) == 0
    chain = capsys.readouterr().out
    assert "classifier_evaluation" in chain and "classifier_checkpoint" in chain and "cct_export" in chain


def _partition(dagster_home):
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        [partition] = instance.get_dynamic_partitions("exports")
    return partition


def _classify(settings, dagster_home, **ops):
    from animl_assets.definitions import CLASSIFY_JOB

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        return build_definitions(settings).resolve_job_def(CLASSIFY_JOB).execute_in_process(
            instance=instance, raise_on_error=False, partition_key=_partition(dagster_home),
            run_config={"ops": {"classifications": {"config": {"num_workers": 0, "sequences": True}}} | ops})


def test_runtime_onnx_on_a_version_registered_without_onnx_stops_in_one_line_and_writes_nothing(registered_home):
    settings, dagster_home, _ = registered_home  # evaluated with portable: false (FAST_EVAL)
    before = sorted((settings.home / "artifacts").rglob("classifier_output.csv.gz"))
    result = _classify(settings, dagster_home, classifications={"config": {"num_workers": 0, "runtime": "onnx"}})
    assert not result.success
    [failure] = result.get_step_failure_events()
    message = failure.step_failure_data.error.message
    assert "has no ONNX model" in message and "runtime: torch" in message
    assert sorted((settings.home / "artifacts").rglob("classifier_output.csv.gz")) == before


def test_the_champion_classifies_an_export_into_md_json_for_timelapse_once_per_model(registered_home):
    from animl_assets.core.detect.megadetector import validate_batch_output

    settings, dagster_home, _ = registered_home
    result = _classify(settings, dagster_home, classified_detections={"config": {"label_pos": "last"}})
    assert result.success, [e.step_failure_data.error.to_string() for e in result.get_step_failure_events()]
    meta = _materialized(result, "classifications")
    champion = _client(settings).get_model_version_by_alias("animl-classifier", "champion")
    assert meta["model"] == f"animl-classifier/{champion.version}" and meta["num_failed"] == 0
    folder = settings.home / "artifacts" / "classifications"
    [export_folder] = [p for p in folder.iterdir() if p.is_dir()]
    output = pd.read_csv(export_folder / "classifier_output.csv.gz")
    assert output.columns[0] == "path" and len(output) == meta["num_classified"] > 0
    sequences = pd.read_csv(export_folder / "sequence_output.csv.gz")
    assert sequences["crops"].sum() == len(output) and {"sequence", "pred"} <= set(sequences.columns)
    [check] = [c for c in result.get_asset_check_evaluations() if c.check_name == "md_format"]
    assert check.check_name == "md_format" and check.passed
    [merged_file] = (settings.home / "artifacts" / "classified_detections").rglob("classified_detections.json")
    merged = json.loads(merged_file.read_text())
    assert validate_batch_output(merged) == []
    classified = [d for image in merged["images"] for d in image.get("detections") or [] if "classifications" in d]
    assert len(classified) == len(output) and merged["info"]["classifier"] == meta["classifier"]
    assert any(c[0].startswith("100000") for d in classified for c in d["classifications"])  # labels, last

    again = _classify(settings, dagster_home)
    assert _materialized(again, "classifications")["skipped"] is True  # same model, same crops: nothing to do
    # a new champion (the newest checkpoint evaluated, registered and promoted past any margin): classified again,
    # while one crop cannot be read: it fails alone
    promoted = _run(settings, dagster_home, selection=[dg.AssetKey("classifier_evaluation"),
                                                       dg.AssetKey("registered_model"), dg.AssetKey("champion_model")],
                    classifier_evaluation=FAST_EVAL, registered_model={"gate_margin": -1.0})
    new = _materialized(promoted, "champion_model")["champion_version"]
    assert str(new) != str(champion.version)
    crop = next((settings.home / "artifacts" / "crops").rglob("*___crop*.jpg"))
    hidden = crop.with_name("hidden.bin")
    crop.rename(hidden)
    try:
        fresh = _materialized(_classify(settings, dagster_home), "classifications")
    finally:
        hidden.rename(crop)
    assert "skipped" not in fresh and fresh["model"] == f"animl-classifier/{new}"
    assert fresh["num_failed"] == 1 and fresh["num_classified"] == meta["num_classified"] - 1
    graph = build_definitions(settings).resolve_asset_graph()
    assert dg.AssetKey("champion_model") in graph.get(dg.AssetKey("classifications")).parent_keys  # new champion: stale
    # the crop is back: the next run classifies again (not "already classified"), then there is nothing to do
    retried = _materialized(_classify(settings, dagster_home), "classifications")
    assert "skipped" not in retried and retried["num_failed"] == 0
    assert retried["num_classified"] == meta["num_classified"]
    assert _materialized(_classify(settings, dagster_home), "classifications")["skipped"] is True


def test_reviewed_corrections_change_the_next_dataset_version(registered_home, tmp_path):
    settings, dagster_home, _ = registered_home
    # the champion (modern recipe) is right on every crop: the reference recipe's model, which is not, then
    # its evaluation and the candidates it disagrees with the labels on
    result = _run(settings, dagster_home, selection=[dg.AssetKey(k) for k in (
        "classifier_checkpoint", "classifier_evaluation", "mislabeled_candidates")],
        classifier_checkpoint=SMALL | {"recipe": "reference"}, classifier_evaluation=FAST_EVAL, mislabeled_candidates={"margin": 0.01})
    meta = _materialized(result, "mislabeled_candidates")
    assert meta["num_candidates"] > 0 and meta["contact_sheet"].startswith("![")
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        candidates = pd.read_csv(latest_version(settings, instance, "mislabeled_candidates") /
                                 "mislabeled_candidates.csv")
        before = pd.read_csv(latest_version(settings, instance, "classification_dataset") / "classification_ds.csv")
    first = candidates.iloc[0]
    image = first["image"].partition("/")[2]  # as the export names it
    (tmp_path / "corrections.csv").write_text(f"file,correct_label\n{image},{first['pred']}\n")
    rebuilt = _run(settings, dagster_home, job=DATASET_JOB, selection=[dg.AssetKey("classification_dataset")],
                   classification_dataset={"corrections": str(tmp_path / "corrections.csv")})
    assert rebuilt.success
    corrections = _materialized(rebuilt, "classification_dataset")["corrections"]
    assert corrections["crops_relabeled"] >= 1 and len(corrections["files"][0]["sha256"]) == 64
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        after = pd.read_csv(latest_version(settings, instance, "classification_dataset") / "classification_ds.csv")
    row = after[after["path"] == first["path"]]
    assert row["label"].tolist() == [first["pred"]] and before.loc[before["path"] == first["path"], "label"].tolist() == [
        first["label"]]


def _fails_once(monkeypatch, method: str, alias: str):
    """``MlflowClient.<method>`` raises a 503 the first time it is called for ``alias`` (a crash mid-step)."""
    real, calls = getattr(MlflowClient, method), []

    def flaky(self, name, this_alias, *args):
        calls.append(this_alias)
        if this_alias == alias and calls.count(alias) == 1:
            raise MlflowException("503 Service Unavailable", error_code=TEMPORARILY_UNAVAILABLE)
        return real(self, name, this_alias, *args)

    monkeypatch.setattr(MlflowClient, method, flaky)


@pytest.mark.usefixtures("quick_retries")
def test_an_interrupted_registration_or_promotion_is_rolled_back_or_finished(registered_home, monkeypatch):
    settings, dagster_home, _ = registered_home
    client = _client(settings)
    register = [dg.AssetKey("registered_model"), dg.AssetKey("champion_model")]
    before = {str(v.version) for v in client.search_model_versions("name = 'animl-classifier'")}
    champion = client.get_model_version_by_alias("animl-classifier", "champion").version
    # the registration breaks after the version exists, before its alias; the retried step rolls it back
    _fails_once(monkeypatch, "set_registered_model_alias", "challenger")
    # the promotion breaks after the champion alias moved, before the challenger alias went
    _fails_once(monkeypatch, "delete_registered_model_alias", "challenger")
    result = _run(settings, dagster_home, selection=register, registered_model={"gate_margin": -1.0})
    assert result.success, [e.step_failure_data.error.to_string() for e in result.get_step_failure_events()]
    monkeypatch.undo()
    versions = {str(v.version): v for v in client.search_model_versions("name = 'animl-classifier'")}
    new = str(_materialized(result, "registered_model")["model_version"])
    assert set(versions) - before == {new}  # the half-registered version is gone: no version without a gate
    assert all(v.tags.get("animl.registered_version") for v in versions.values())
    assert client.get_model_version("animl-classifier", new).aliases == ["champion"]  # and not challenger too
    assert versions[new].tags["animl.promoted"] == "gate"
    assert versions[new].tags["animl.replaced_champion"] == str(champion)


def test_repair_finishes_a_promotion_a_kill_left_halfway(registered_home):
    settings, _, _ = registered_home
    client = _client(settings)
    champion = str(client.get_model_version_by_alias("animl-classifier", "champion").version)
    client.set_registered_model_alias("animl-classifier", "challenger", champion)
    client.delete_model_version_tag("animl-classifier", champion, "animl.promoted")
    lines = registry.repair(client, "animl-classifier", lambda version: True)
    assert any("dropped its challenger alias" in line for line in lines)
    assert any("without promotion tags" in line for line in lines)
    version = client.get_model_version("animl-classifier", champion)
    assert version.aliases == ["champion"] and version.tags["animl.promoted"] == "finished after an interruption"
    assert registry.repair(client, "animl-classifier", lambda version: True) == []
