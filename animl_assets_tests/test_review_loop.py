"""The weekly loop through the Definitions: a champion flags unknowns, each classified export's drift is checked
(a drifted one starts one retraining), and a review queue's corrections change the next dataset."""

import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from animl_assets.automation import DRIFT_SENSOR
from animl_assets.core.dataset.label_spec import DEFAULT_EXCLUDED
from animl_assets.core.ingest.sample import EXPORT_NAME, write_sample_export
from animl_assets.core.layout import partition_folder
from animl_assets.core.ml import open_set
from animl_assets.core.registry import registry, tracking
from animl_assets.definitions import CLASSIFY_JOB, DATASET_JOB, RETRAIN_JOB, TRAIN_JOB, build_definitions
from animl_assets_tests.conftest import add_export, dataset_home, latest_version, run_ingest, run_job as _run
from animl_assets_tests.test_registry_assets import FAST_EVAL, SMALL, _client, _materialized

pytestmark = pytest.mark.slow
BUDGET = 10


def _classify(settings, dagster_home, partition, **classifications):
    return _run(settings, dagster_home, CLASSIFY_JOB, partition,
                classifications={"num_workers": 0, **classifications}, review_queue={"budget": BUDGET})


def _drift(result):
    [check] = [c for c in result.get_asset_check_evaluations() if c.check_name == "drift"]
    return check


@pytest.fixture(scope="module")
def loop_home(tmp_path_factory, built_dataset_home):
    """The sample export ingested, a champion trained on it, and the export classified by it."""
    settings, dagster_home = dataset_home(tmp_path_factory.mktemp("loop"), built_dataset_home)
    _run(settings, dagster_home, TRAIN_JOB, classifier_checkpoint=SMALL, classifier_evaluation=FAST_EVAL)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        [partition] = instance.get_dynamic_partitions("exports")
    return settings, dagster_home, partition, _classify(settings, dagster_home, partition)


def test_the_champion_carries_its_unknowns_threshold_and_flags_crops_in_the_output_and_md_json(loop_home):
    settings, dagster_home, partition, result = loop_home
    files = registry.model_files(tracking.embedded_tracking_uri(settings.home), registry.resolve(_client(settings), registry.DEFAULT_MODEL,
                                                                           registry.CHAMPION))
    assert files.open_set["score"] and files.open_set["threshold"] is not None
    assert files.open_set["val_recall"] >= files.open_set["target_recall"]
    assert files.prediction_profile["crops"] > 0 and abs(sum(files.prediction_profile["predicted"].values()) - 1) < 1e-6
    meta = _materialized(result, "classifications")
    output = pd.read_csv(settings.home / "artifacts" / "classifications" / partition_folder(partition) / "classifier_output.csv.gz")
    assert output.columns[-1] == "unknown" and set(output["unknown"]) <= {0, 1}
    assert meta["num_unknown"] == int(output["unknown"].sum()) < len(output) / 2  # a champion knows its own export
    [md_file] = (settings.home / "artifacts" / "classified_detections").rglob("classified_detections.json")
    md = json.loads(md_file.read_text())
    assert "unknown" in md["classification_categories"].values()


def test_an_unshifted_export_passes_the_drift_check_and_starts_nothing(loop_home):
    settings, dagster_home, partition, result = loop_home
    check = _drift(result)
    meta = {k: v.value for k, v in check.metadata.items()}
    assert check.passed and meta["measured"] and meta["export"] == partition and meta["psi"] < 0.25
    assert check.partition == partition  # the UI shows each export's own drift
    assert meta["label_shares"].startswith("![") and meta["scopes_checked"] >= 1
    defs = build_definitions(settings)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        with dg.build_sensor_context(instance=instance, resources={"mlflow": defs.resources["mlflow"]}) as context:
            assert not defs.get_sensor_def(DRIFT_SENSOR)(context).run_requests
    # the same export checked per location too, where a location has enough crops (the sample's have about 10;
    # limits this loose keep so few crops from failing the check, which would start a retraining)
    again = _drift(_classify(settings, dagster_home, partition, drift_min_crops=5, drift_max_psi=100.0,
                             drift_max_confidence_drop=1.0, drift_max_unknown_rise=1.0))
    scopes = [row.data["scope"] for row in again.metadata["drift"].records]
    assert scopes[0] == "(all)" and len(scopes) > 2 and set(scopes[1:]) <= {"ridge", "creek", "meadow", "pines",
                                                                          "quarry", "marsh", "bluff", "glade",
                                                                          "ford", "hollow"}


def test_a_shifted_export_fails_the_drift_check_and_starts_one_retraining(loop_home, tmp_path):
    settings, dagster_home, _, _ = loop_home
    folder = tmp_path / "shifted"
    write_sample_export(folder, seed=1)
    export = json.loads((folder / EXPORT_NAME).read_text())
    gone = {c["id"] for c in export["categories"] if c["name"] in ("deer", "fox", "raccoon")}
    dropped = {a["image_id"] for a in export["annotations"] if a["category_id"] in gone}
    export["annotations"] = [a for a in export["annotations"] if a["image_id"] not in dropped]
    export["images"] = [i for i in export["images"] if i["id"] not in dropped]
    (folder / EXPORT_NAME).write_text(json.dumps(export))
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        partition = add_export(settings, instance, folder, folder="shifted")
        assert run_ingest(settings, instance, partition).success
    check = _drift(_classify(settings, dagster_home, partition))
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN and "PSI" in check.description
    defs = build_definitions(settings)
    sensor = defs.get_sensor_def(DRIFT_SENSOR)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        with dg.build_sensor_context(instance=instance, resources={"mlflow": defs.resources["mlflow"]}) as context:
            first = sensor(context)
            [request] = first.run_requests
            again = sensor(dg.build_sensor_context(instance=instance, cursor=first.cursor,
                                                   resources={"mlflow": defs.resources["mlflow"]}))
    assert request.tags["animl/retraining"] == "drift" and request.tags["animl/drift_export"] == partition
    assert "PSI" in request.tags["animl/drift_reasons"] and request.run_key.startswith(f"drift-{partition}-")
    assert request.run_config["ops"]["classifier_checkpoint"]["config"]["init_from"] == "champion"
    assert dg.validate_run_config(defs.resolve_job_def(RETRAIN_JOB), request.run_config)
    assert not again.run_requests  # once: the same failure is not asked for again


def test_the_queue_keeps_its_budget_and_bursts_and_its_corrections_change_the_next_dataset(loop_home, tmp_path):
    settings, dagster_home, partition, result = loop_home
    meta = _materialized(result, "review_queue")
    folder = settings.home / "artifacts" / "review_queue" / partition_folder(partition)
    ranked = pd.read_csv(folder / "review_queue.csv", dtype={"reviewed": str}, keep_default_na=False)
    assert len(ranked) == meta["queued"] == BUDGET and meta["contact_sheet"].startswith("![")
    assert not ranked.duplicated(["sequence", "pred"]).any()
    assert ranked["pred"].nunique() == meta["classes"] == 4  # every class the champion predicts, not one burst
    md = json.loads((folder / "review_queue.md.json").read_text())
    assert [image["file"] for image in md["images"]] == list(dict.fromkeys(ranked["file"]))
    first = ranked.iloc[0]
    other = next(label for label in sorted(set(ranked["pred"])) if label != first["pred"])
    ranked.loc[0, ["reviewed", "correct_label"]] = ["x", other]
    ranked.to_csv(tmp_path / "reviewed.csv", index=False)
    rebuilt = _run(settings, dagster_home, DATASET_JOB, selection=[dg.AssetKey("classification_dataset")],
                   classification_dataset={"corrections": str(tmp_path / "reviewed.csv")})
    assert _materialized(rebuilt, "classification_dataset")["corrections"]["crops_relabeled"] >= 1
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        ds = pd.read_csv(latest_version(settings, instance, "classification_dataset") / "classification_ds.csv")
    crop = f"{partition_folder(partition)}/{first['crop']}"
    assert ds.loc[ds["path"] == crop, "label"].tolist() == [other]


def test_a_class_held_out_of_training_is_flagged_unknown_more_than_the_known_ones(loop_home):
    settings, dagster_home, partition, _ = loop_home
    _run(settings, dagster_home, RETRAIN_JOB,
         classification_dataset={"excluded_classes": [*DEFAULT_EXCLUDED, "turkey"]},
         classifier_checkpoint=SMALL | {"finetune": 0, "epochs": 3}, classifier_evaluation=FAST_EVAL,
         registered_model={"gate_margin": -1.0})
    assert "turkey" not in registry.model_files(tracking.embedded_tracking_uri(settings.home), registry.resolve(
        _client(settings), registry.DEFAULT_MODEL, registry.CHAMPION)).label_index.values()
    _classify(settings, dagster_home, partition)
    output = pd.read_csv(settings.home / "artifacts" / "classifications" / partition_folder(partition) / "classifier_output.csv.gz")
    turkey = output["path"].str.contains("turkey")
    assert turkey.any() and (~turkey).any()
    labels = [c for c in output.columns if c not in ("path", "unknown")]
    top = np.sort(output[labels].to_numpy(), axis=1)
    margin = top[:, -1] - top[:, -2]  # the champion's unknown_score (the default)
    auroc = open_set.auroc(margin[~turkey.to_numpy()], margin[turkey.to_numpy()])
    flagged, known_flagged = output.loc[turkey, "unknown"].mean(), output.loc[~turkey, "unknown"].mean()
    print(f"held-out turkey: AUROC {auroc:.3f}, flagged {flagged:.0%} against {known_flagged:.0%} of known crops")
    assert auroc > 0.75 and flagged > 2 * known_flagged  # well above chance (0.5, and the same share)
