"""Metadata as Dagster users expect it, checked on real materializations: a contact sheet's type with no
crops, and the warning and training-readiness checks (the demo's whole event log: test_demo_home.py)."""

import json
from pathlib import Path

import dagster as dg

from animl_assets.definitions import DATASET_JOB, build_definitions
from animl_assets_tests.conftest import add_export, run_ingest, table_rows


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
    images = checks["images:failure_rate"].metadata  # what a listing finds: missing, and empty
    assert images["failed_images"].value == 2 and images["images"].value == sample_counts["images"]
    assert {row["category"]: row["images"] for row in table_rows(images["per_category"])} == {
        "non_image": 1, "nonexistent": 1}
    crops = checks["crops:failure_rate"].metadata  # and what decoding finds, besides
    assert crops["failed_images"].value == sample_counts["broken"]
    assert crops["images"].value == sample_counts["boxed_images"]
    assert {row["category"]: row["images"] for row in table_rows(crops["per_category"])} == {
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
