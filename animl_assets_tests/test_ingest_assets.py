"""cct_export and images materialized through the Definitions with a real DagsterInstance."""

import hashlib
import json
import logging
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from animl_assets.core.ingest.sample import BROKEN, EXPORT_NAME
from animl_assets.core.layout import partition_folder
from animl_assets.settings import Settings
from animl_assets_tests.conftest import add_export, run_ingest, table_rows


def materialization(result, asset: str):
    events = result.asset_materializations_for_node(asset)
    assert len(events) == 1, f"{asset} was not materialized"
    return {key: value.value for key, value in events[0].metadata.items()}


def manifest(settings: Settings, partition: str) -> pd.DataFrame:
    return pd.read_csv(Path(settings.storage_uri) / "images" / partition_folder(partition) / "manifest.csv", keep_default_na=False)


def test_sample_export_is_validated_and_every_image_accounted_for(settings, instance, sample_dir, sample_counts):
    partition = add_export(settings, instance, sample_dir)
    result = run_ingest(settings, instance, partition)
    assert result.success
    export_meta = materialization(result, "cct_export")
    assert export_meta["num_images"] == sample_counts["images"]
    assert export_meta["num_locations"] == sample_counts["locations"]
    assert "deer" in {row["category"] for row in table_rows(export_meta["category_by_location"])}
    checks = {e.asset_check_key.to_user_string(): e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"cct_export:schema": True, "cct_export:unique_ids": True, "cct_export:references": True,
                      "cct_export:bboxes": True, "cct_export:boxes_clipped": True,
                      "cct_export:annotations_set_aside": True, "images:failure_rate": True,
                      "md_detections:md_format": True, "crops:failure_rate": True}

    images_meta = materialization(result, "images")
    # listed, not downloaded: every file but the missing one and the empty one is present
    assert images_meta["num_present"] == sample_counts["present"] - 1 and images_meta["num_fetched"] == 0
    assert images_meta["mirrored"] is False
    assert (images_meta["num_non_image"], images_meta["num_nonexistent"]) == (1, 1)
    crops_meta = materialization(result, "crops")
    # the rest is found where each image is decoded, once: by crops
    failed = {row["file"]: row["category"] for row in table_rows(crops_meta["failures"])}
    assert failed == {"broken/missing.jpg": "nonexistent", "broken/zero_byte.jpg": "non_image",
                      "broken/not_an_image.jpg": "non_image", "broken/truncated.jpg": "truncated"}
    assert set(failed) == {f"broken/{name}.jpg" for name in BROKEN}
    assert crops_meta["source_bytes_read"] < sum(path.stat().st_size for path in sample_dir.rglob("*.jpg"))
    table = manifest(settings, partition)
    assert len(table) == sample_counts["images"]
    assert not (Path(settings.storage_uri) / "images" / partition_folder(partition) / "files").exists()
    assert (Path(settings.storage_uri) / "cct_export" / partition_folder(partition) / "export.json").read_bytes() == \
        (sample_dir / EXPORT_NAME).read_bytes()


MIRROR = {"ops": {"images": {"config": {"mirror": True}}}}


def test_the_opt_in_mirror_copies_every_good_image_and_crops_read_the_copies(settings, instance, sample_dir,
                                                                           sample_counts):
    partition = add_export(settings, instance, sample_dir)
    result = run_ingest(settings, instance, partition, MIRROR)
    assert result.success
    images_meta = materialization(result, "images")
    assert images_meta["mirrored"] is True and images_meta["num_good"] == sample_counts["good"]
    assert images_meta["num_fetched"] == sample_counts["present"]
    assert (images_meta["num_non_image"], images_meta["num_truncated"], images_meta["num_nonexistent"]) == (2, 1, 1)
    for name in BROKEN:
        assert f"broken/{name}.jpg" in {row["file_name"] for row in table_rows(images_meta["failures"])}
    table = manifest(settings, partition)
    files = Path(settings.storage_uri) / "images" / partition_folder(partition) / "files"
    for row in table[table["status"] == "good"].itertuples():  # no good image lost, byte for byte
        assert (files / row.file_name).read_bytes() == (sample_dir / row.file_name).read_bytes()
    crops_meta = materialization(result, "crops")
    assert crops_meta["source"] == str(files) and crops_meta["num_crops"] == sample_counts["crops"]


def test_rerun_fetches_nothing_already_verified(settings, instance, sample_dir, sample_counts):
    partition = add_export(settings, instance, sample_dir)
    assert run_ingest(settings, instance, partition, MIRROR).success
    second = run_ingest(settings, instance, partition, MIRROR)
    meta = materialization(second, "images")
    assert meta["num_good"] == meta["num_reused"] == sample_counts["good"]
    assert meta["num_fetched"] == sample_counts["broken"] - 1  # only the broken-but-present files, again


def test_rerun_reads_no_image_for_crops_it_has(settings, instance, sample_dir, sample_counts):
    partition = add_export(settings, instance, sample_dir)
    first = run_ingest(settings, instance, partition)
    assert materialization(first, "crops")["source_bytes_read"] > 0
    again = materialization(run_ingest(settings, instance, partition), "crops")
    assert again["num_reused_crops"] == sample_counts["crops"] and again["num_new_crops"] == 0
    # the broken files are read again (they may have been fixed); no good image is
    broken = sum((sample_dir / "broken" / f"{name}.jpg").stat().st_size for name in BROKEN if name != "missing")
    assert again["source_bytes_read"] <= broken and again["crop_bytes_written"] == 0


def test_an_edited_export_gets_a_new_data_version(settings, instance, sample_dir):
    partition = add_export(settings, instance, sample_dir)
    export = Path(settings.exports_uri) / "sample" / EXPORT_NAME

    def version() -> str:
        assert run_ingest(settings, instance, partition).success
        record = instance.get_latest_data_version_record(dg.AssetKey("cct_export"), partition_key=partition)
        return record.asset_materialization.tags["dagster/data_version"]

    first, again = version(), version()
    cct = json.loads(export.read_text())
    cct["info"]["edited"] = True
    export.write_text(json.dumps(cct))
    assert first == again == hashlib.sha256((sample_dir / EXPORT_NAME).read_bytes()).hexdigest()
    assert version() == hashlib.sha256(export.read_bytes()).hexdigest() != first


def write_export(settings: Settings, instance, cct, name="bad") -> str:
    exports = Path(settings.exports_uri)
    exports.mkdir(parents=True, exist_ok=True)
    (exports / f"{name}.json").write_text(cct if isinstance(cct, str) else json.dumps(cct))
    instance.add_dynamic_partitions("exports", [name])
    return name


def test_malformed_json_fails_with_a_clear_error(settings, instance):
    partition = write_export(settings, instance, '{"images": [')
    result = run_ingest(settings, instance, partition)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "is malformed: export is not valid JSON" in failure.event_specific_data.error.message
    assert not result.asset_materializations_for_node("images")


def test_dangling_references_block_images(settings, instance, tmp_path):
    cct = {"images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
           "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [0, 0, 20, 5]}],
           "categories": [{"id": 0, "name": "empty"}]}
    partition = write_export(settings, instance, cct)
    result = run_ingest(settings, instance, partition)
    assert not result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not checks["references"].passed and checks["references"].metadata["problems"].value == 2
    assert checks["schema"].passed and checks["bboxes"].passed  # image 2 is unknown: no box to check
    assert "annotation 1 points at missing image 2" in [
        row["problem"] for row in table_rows(checks["references"].metadata["examples"])]
    assert result.asset_materializations_for_node("cct_export")
    assert not result.asset_materializations_for_node("images")  # the blocking check held it back


def test_path_traversal_in_export_is_rejected_and_nothing_escapes(settings, instance, tmp_path):
    images_root = tmp_path / "images"
    images_root.mkdir()
    (tmp_path / "secret.jpg").write_bytes(b"must never be copied")
    cct = {"images": [{"id": 1, "file_name": "../secret.jpg"}, {"id": 2, "file_name": "/etc/hostname"},
                      {"id": 3, "file_name": "C:/x.jpg"}],
           "annotations": [], "categories": [{"id": 0, "name": "empty"}]}
    partition = write_export(settings, instance, cct)
    result = run_ingest(settings, instance, partition,
                        {"ops": {"images": {"config": {"images_root": str(images_root)}}}})
    assert result.success
    meta = materialization(result, "images")
    assert meta["num_bad"] == 3 and meta["num_good"] == 0
    table = manifest(settings, partition)
    assert table["error"].str.startswith("rejected").all()
    written = list((Path(settings.storage_uri) / "images").rglob("*.jpg"))
    assert written == []


@pytest.mark.slow
def test_everything_on_s3_with_animl_serving_keys(moto_endpoint, s3_client, bucket, tmp_path, instance, sample_dir,
                                                  sample_counts):
    """Exports, artifacts and images all in S3 (moto over HTTP); images found by serving_bucket_key."""
    cct = json.loads((sample_dir / EXPORT_NAME).read_text())
    for image in cct["images"]:
        image["serving_bucket_key"] = f"serving/{image['id']}.jpg"
        path = sample_dir / image["file_name"]
        if path.exists():
            s3_client.put_object(Bucket=bucket, Key=f"images/{image['serving_bucket_key']}", Body=path.read_bytes())
    s3_client.put_object(Bucket=bucket, Key="exports/animl/project1.json", Body=json.dumps(cct).encode())
    settings = Settings.from_env({
        "ANIML_HOME": str(tmp_path / "home"), "ANIML_STORAGE_URI": f"s3://{bucket}/artifacts",
        "ANIML_EXPORTS_URI": f"s3://{bucket}/exports", "ANIML_IMAGES_URI": f"s3://{bucket}/images",
        "ANIML_S3_ENDPOINT_URL": moto_endpoint,
    })
    instance.add_dynamic_partitions("exports", ["animl/project1"])
    result = run_ingest(settings, instance, "animl/project1", {"ops": {"images": {"config": {"workers": 4}}}})
    assert result.success
    assert materialization(result, "cct_export")["profile"] == "animl"
    meta = materialization(result, "images")
    assert meta["source_key_field"] == "serving_bucket_key"  # recognised as an Animl export: no config needed
    assert meta["num_present"] == sample_counts["present"] - 1 and meta["num_nonexistent"] == 1
    assert meta["source"] == f"s3://{bucket}/images" and isinstance(meta["source"], str)
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="artifacts/images/")
    assert "artifacts/images/animl~project1/manifest.csv" in [item["Key"] for item in listed["Contents"]]
    assert not [item["Key"] for item in listed["Contents"] if "/files/" in item["Key"]]  # no copy of an image
    body = s3_client.get_object(Bucket=bucket, Key="artifacts/images/animl~project1/manifest.csv")["Body"].read()
    assert body.startswith(b"image_id,file_name,status")
    # detections and crops on S3 too: the crops are published under the artifacts prefix
    assert materialization(result, "crops")["num_crops"] == sample_counts["crops"]
    crops = s3_client.list_objects_v2(Bucket=bucket, Prefix="artifacts/crops/animl~project1/", MaxKeys=1000)
    keys = [item["Key"].removeprefix("artifacts/crops/animl~project1/") for item in crops["Contents"]]
    assert {"crops.csv", "failures.csv", "contact_sheet.png"} <= set(keys)
    assert sum(key.endswith("_cct_to_md.jpg") for key in keys) == sample_counts["crops"]
    rerun = run_ingest(settings, instance, "animl/project1",
                       {"ops": {"images": {"config": {"source_key_field": "serving_bucket_key"}}}})
    assert materialization(rerun, "crops")["num_reused_crops"] == sample_counts["crops"]
    assert materialization(rerun, "crops")["crop_bytes_written"] == 0  # no crop image goes up again


def test_thousands_of_failed_images_log_a_bounded_number_of_lines(settings, instance):
    """One warning per failed image flooded the event log (57 MB at 60k); now one summary, the list in the manifest."""
    count = 2_000
    partition = write_export(settings, instance, {
        "images": [{"id": i, "file_name": f"cam/{i:05d}.jpg", "location": "x"} for i in range(count)],
        "annotations": [], "categories": []}, name="missing")
    result = run_ingest(settings, instance, partition)
    assert result.success
    logs = instance.all_logs(result.run_id)
    warnings = [entry for entry in logs if entry.level >= logging.WARNING and entry.step_key == "images"]
    assert len(warnings) == 1 and f"{count} images failed ({count} nonexistent)" in warnings[0].user_message
    assert len(logs) < 100
    assert (manifest(settings, partition)["status"] == "nonexistent").sum() == count


def test_annotations_with_unusable_boxes_are_set_aside_and_the_export_still_ingests(settings, instance, sample_dir,
                                                                                   sample_counts, tmp_path):
    source = tmp_path / "with_bad_boxes"
    shutil.copytree(sample_dir, source)
    cct = json.loads((source / EXPORT_NAME).read_text())
    boxed = next(a for a in cct["annotations"] if a.get("bbox"))
    cct["annotations"] += [{**boxed, "id": "null-box", "bbox": [None, None, None, None]},  # Animl: no image size
                           {**boxed, "id": "flat-box", "bbox": [5, 5, 0, 12]}]
    (source / EXPORT_NAME).write_text(json.dumps(cct))
    result = run_ingest(settings, instance, add_export(settings, instance, source))
    assert result.success
    meta = materialization(result, "cct_export")
    assert meta["num_annotations_set_aside"] == 2 and meta["annotations_set_aside"] == {
        "null box (the image had no size when it was exported)": 1, "box without area": 1}
    check = next(e for e in result.get_asset_check_evaluations() if e.check_name == "annotations_set_aside")
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN and check.metadata["problems"].value == 2
    [validation] = Path(settings.storage_uri, "cct_export").rglob("validation.json")
    assert [line.split(":")[0] for line in json.loads(validation.read_text())["annotations_set_aside"]] == [
        "annotation null-box", "annotation flat-box"]
    # neither became a detection or a crop
    assert materialization(result, "crops")["num_crops"] == sample_counts["crops"]
