"""Metadata as Dagster users expect it, checked on real materializations: typed tables, paths, row counts,
small inline previews (the full images are artifacts), and the warning and training-readiness checks."""

import json
from pathlib import Path

import dagster as dg
import pytest

from animl_assets.assets.artifacts import THUMBNAIL_BYTES
from animl_assets.cli import main
from animl_assets.definitions import DATASET_JOB, build_definitions
from animl_assets_tests.conftest import add_export, run_ingest, table_rows

PATH_KEYS = {"path", "manifest", "source", "contact_sheet_path", "sample_grid_path"}
TABLE_KEYS = {"category_by_location", "failures", "crops_per_class", "crop_sizes", "crops_per_label",
              "conflicting_images", "crops_per_label_and_split"}
ROW_COUNTED = {"cct_export", "images", "md_detections", "crops", "classification_dataset"}


def materializations(instance: dg.DagsterInstance) -> list[dg.AssetMaterialization]:
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey("crops")), limit=1)
    assert records.records, "nothing was materialized"
    events = []
    for key in instance.get_asset_keys():
        result = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=100)
        events += [record.asset_materialization for record in result.records]
    return events


@pytest.fixture()
def demo_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("ANIML_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", "")
    assert main(["demo"]) == 0
    return home


def test_the_demo_event_log_holds_typed_metadata_and_no_large_images(demo_home):
    instance = dg.DagsterInstance.from_config(str(demo_home / "dagster"))
    events = materializations(instance)
    assert {event.asset_key.to_user_string() for event in events} >= ROW_COUNTED | {"splits"}
    for event in events:
        asset = event.asset_key.to_user_string()
        metadata = event.metadata
        for key, value in metadata.items():
            assert len(json.dumps(dg.serialize_value(value))) < THUMBNAIL_BYTES + 2_000, f"{asset}.{key} is large"
            if key in PATH_KEYS:
                assert isinstance(value, dg.PathMetadataValue), f"{asset}.{key} is {type(value).__name__}"
                assert Path(value.path).exists()
            if key in TABLE_KEYS:
                assert isinstance(value, dg.TableMetadataValue) and value.schema.columns, f"{asset}.{key}"
        if asset in ROW_COUNTED:
            assert isinstance(metadata["dagster/row_count"], dg.IntMetadataValue) and metadata["dagster/row_count"].value > 0
    crops = next(event for event in events if event.asset_key == dg.AssetKey("crops"))
    preview = crops.metadata["contact_sheet"]
    assert isinstance(preview, dg.MarkdownMetadataValue) and len(preview.value) <= THUMBNAIL_BYTES
    full = Path(crops.metadata["contact_sheet_path"].path)
    assert full.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and full.stat().st_size > THUMBNAIL_BYTES  # kept whole
    assert crops.metadata["dagster/row_count"].value == crops.metadata["num_crops"].value
    model = next(event for event in events if event.asset_key == dg.AssetKey("classifier_checkpoint"))
    assert model.metadata["test_acc_top1"].value >= 0.9  # the demo's model clearly learns the sample export
    assert isinstance(model.metadata["learning_curve"], dg.MarkdownMetadataValue)
    assert model.metadata["mlflow_run_id"].value and model.metadata["epochs_run"].value >= 1
    # the demo ends with a registered champion whose evaluation plots are in the UI and in MLflow
    evaluation = next(event for event in events if event.asset_key == dg.AssetKey("classifier_evaluation"))
    for figure in ("confusion_test", "confusion_val", "reliability_test", "errors_test"):
        assert isinstance(evaluation.metadata[figure], dg.MarkdownMetadataValue)
    champion = next(event for event in events if event.asset_key == dg.AssetKey("champion_model"))
    assert champion.metadata["champion_version"].value == 1
    from mlflow import MlflowClient

    from animl_assets.core.tracking import embedded_tracking_uri

    uri = embedded_tracking_uri(demo_home)
    version = MlflowClient(uri, uri).get_model_version_by_alias("animl-classifier", "champion")
    logged = {a.path for a in MlflowClient(uri, uri).list_artifacts(version.run_id, "evaluation")}
    assert "evaluation/confusion_test.png" in logged and "evaluation/errors_test.png" in logged
    # ... and classifies the sample export with it into MegaDetector JSON that validates
    from animl_assets.core.megadetector import validate_batch_output

    [merged] = (demo_home / "artifacts" / "classified_detections").rglob("classified_detections.json")
    merged = json.loads(merged.read_text())
    assert validate_batch_output(merged) == [] and merged["info"]["classifier"] == "animl-classifier v1"
    assert sum("classifications" in d for image in merged["images"] for d in image.get("detections") or []) > 0
    images = next(event for event in events if event.asset_key == dg.AssetKey("images"))
    assert [column.name for column in images.metadata["dagster/column_schema"].schema.columns][:3] == [
        "image_id", "file_name", "status"]


def test_contact_sheet_keeps_its_type_when_an_export_has_no_crops(settings, instance, sample_dir, tmp_path):
    partition = add_export(settings, instance, sample_dir)
    first = run_ingest(settings, instance, partition)
    cct = json.loads((sample_dir / "sample_export.json").read_text())
    cct["annotations"] = []  # an export of empty frames: nothing to crop
    folder = Path(settings.exports_uri) / "empty"
    folder.mkdir()
    (folder / "sample_export.json").write_text(json.dumps(cct))
    instance.add_dynamic_partitions("exports", ["empty/sample_export"])
    second = run_ingest(settings, instance, "empty/sample_export",
                        {"ops": {"images": {"config": {"images_root": str(sample_dir)}}}})
    assert first.success and second.success
    sheets = [result.asset_materializations_for_node("crops")[0].metadata for result in (first, second)]
    assert [type(meta["contact_sheet"]) for meta in sheets] == [dg.MarkdownMetadataValue] * 2
    assert [type(meta["contact_sheet_path"]) for meta in sheets] == [dg.PathMetadataValue] * 2
    assert sheets[1]["num_crops"].value == 0 and Path(sheets[1]["contact_sheet_path"].path).is_file()


def test_failure_rate_checks_warn_without_stopping_the_run(settings, instance, sample_dir, sample_counts):
    partition = add_export(settings, instance, sample_dir)
    strict = {"ops": {"images": {"config": {"max_failure_rate": 0.01}},
                      "crops": {"config": {"max_failure_rate": 0.01}}}}
    result = run_ingest(settings, instance, partition, strict)
    assert result.success  # a warning, not a stop
    checks = {e.asset_check_key.to_user_string(): e for e in result.get_asset_check_evaluations()}
    for name in ("images:failure_rate", "crops:failure_rate"):
        assert not checks[name].passed and checks[name].severity == dg.AssetCheckSeverity.WARN
    images = checks["images:failure_rate"].metadata
    assert images["failed_images"].value == sample_counts["broken"] and images["images"].value == sample_counts["images"]
    assert {row["category"]: row["images"] for row in table_rows(images["per_category"])} == {
        "non_image": 2, "truncated": 1, "nonexistent": 1}
    default = run_ingest(settings, instance, partition).get_asset_check_evaluations()
    assert all(e.passed for e in default if e.check_name == "failure_rate")  # default 5%: 4 of 97 fail


def test_a_dataset_without_two_trainable_labels_stops_before_the_splits(settings, instance, sample_dir):
    partition = add_export(settings, instance, sample_dir)
    assert run_ingest(settings, instance, partition).success
    job = build_definitions(settings).resolve_job_def(DATASET_JOB)
    config = {"ops": {"classification_dataset": {"config": {"min_crops_per_label": 1000}}}}
    result = job.execute_in_process(instance=instance, run_config=config, raise_on_error=False)
    check = result.get_asset_check_evaluations()[0]
    assert check.check_name == "enough_labels_to_train" and not check.passed
    assert check.metadata["labels_with_enough_crops"].value == 0
    assert not result.asset_materializations_for_node("splits")
