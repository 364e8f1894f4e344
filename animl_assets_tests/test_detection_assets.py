"""md_detections and crops materialized through the Definitions on the sample export."""

import json
import shutil
from pathlib import Path

import pandas as pd

from animl_assets.core.detect.megadetector import cct_to_md, validate_batch_output
from animl_assets.core.ingest.sample import EXPORT_NAME
from animl_assets.core.layout import partition_folder
from animl_assets_tests.conftest import add_export, run_ingest, table_rows
from animl_assets_tests.test_ingest_assets import materialization


def artifacts(settings, asset, partition) -> Path:
    return Path(settings.storage_uri) / asset / partition_folder(partition)


def test_sample_export_is_detected_and_cropped(settings, instance, sample_dir, sample_counts):
    partition = add_export(settings, instance, sample_dir)
    result = run_ingest(settings, instance, partition)
    assert result.success
    md = json.loads((artifacts(settings, "md_detections", partition) / "md_detections.json").read_text())
    assert validate_batch_output(md) == [] and md["info"]["detector"] == "cct_to_md"
    meta = materialization(result, "md_detections")
    assert meta["num_images"] == sample_counts["boxed_images"] and meta["num_detections"] == sample_counts["boxes"]
    assert meta["num_images_without_boxes"] == sample_counts["unboxed_images"]
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["md_format"]

    crops = materialization(result, "crops")
    assert crops["num_crops"] == sample_counts["crops"] and crops["num_failed_images"] == sample_counts["broken"]
    for name, category in [("zero_byte", "non_image"), ("truncated", "truncated"), ("not_an_image", "non_image"),
                           ("missing", "nonexistent")]:
        assert {"file": f"broken/{name}.jpg", "category": category}.items() <= next(
            row for row in table_rows(crops["failures"]) if row["file"] == f"broken/{name}.jpg").items()
    assert "deer" in {row["label"] for row in table_rows(crops["crops_per_class"])}
    assert "data:image/jpeg;base64," in crops["contact_sheet"]
    # every good image decodes only the region its crops need, but for the CMYK and EXIF-rotated ones
    assert crops["num_images_decoded"] == sample_counts["boxed_images"] - sample_counts["broken"]
    assert crops["num_images_region_decoded"] == crops["num_images_decoded"] - 2
    folder = artifacts(settings, "crops", partition)
    manifest = pd.read_csv(folder / "crops.csv")
    assert len(manifest) == sample_counts["crops"] and (folder / "contact_sheet.png").is_file()
    for crop in manifest["crop"]:
        assert crop.endswith("_cct_to_md.jpg") and (folder / crop).is_file()
    # the EXIF-rotated frame is cropped upright: same crop as the plain frame drawn the same way
    assert (folder / "odd/exif_rotated.jpg___crop00_cct_to_md.jpg").is_file()

    again = run_ingest(settings, instance, partition)
    rerun = materialization(again, "crops")
    assert rerun["num_new_crops"] == 0 and rerun["num_reused_crops"] == sample_counts["crops"]


def test_megadetector_results_beside_the_export_are_merged(settings, instance, sample_dir, sample_counts):
    partition = add_export(settings, instance, sample_dir)
    old_format = {
        "info": {"format_version": "1.2", "detector": "megadetector_v3.pb"},
        "detection_categories": {"1": "animal", "2": "person", "3": "group", "4": "vehicle"},
        "images": [{"file": "creek/empty_000.jpg", "max_detection_conf": 0.6,
                    "detections": [{"category": "1", "conf": 0.6, "bbox": [0.2, 0.2, 0.3, 0.3]},
                                   {"category": "3", "conf": 0.3, "bbox": [0.0, 0.0, 0.5, 0.5]}]},
                   {"file": "creek/deer_000.jpg", "detections": [{"category": "1", "conf": 0.9,
                                                                  "bbox": [0.1, 0.1, 0.1, 0.1]}]},
                   {"file": "ridge/empty_000.jpg", "failure": "Failure image access"}],
    }
    (Path(settings.exports_uri) / f"{partition}.md.json").write_text(json.dumps(old_format))
    result = run_ingest(settings, instance, partition, {"ops": {"crops": {"config": {"threshold": 0.5}}}})
    assert result.success
    md = json.loads((artifacts(settings, "md_detections", partition) / "md_detections.json").read_text())
    by_file = {image["file"]: image for image in md["images"]}
    assert by_file["creek/empty_000.jpg"]["detections"][1]["category"] == "4"  # group, renumbered
    assert by_file["creek/deer_000.jpg"]["detections"][0]["conf"] == 1.0  # the export's box wins
    assert by_file["ridge/empty_000.jpg"]["failure"] == "Failure image access"
    assert md["info"]["detector"] == "megadetector_v3.pb"
    meta = materialization(result, "md_detections")
    assert meta["num_images"] == sample_counts["boxed_images"] + 2  # two empty frames gained an entry
    assert meta["sources"] == {"export boxes": sample_counts["boxed_images"], "ingested": 3}
    crops = pd.read_csv(artifacts(settings, "crops", partition) / "crops.csv")
    detector_crops = crops[crops["file"] == "creek/empty_000.jpg"]
    assert detector_crops["crop"].tolist() == ["creek/empty_000.jpg___crop00_megadetector_v3.pb.jpg"]
    assert {"label": "empty", "crops": 1} in table_rows(materialization(result, "crops")["crops_per_class"])


def test_broken_detector_results_block_the_crops(settings, instance, sample_dir):
    partition = add_export(settings, instance, sample_dir)
    bad = {"info": {"format_version": "1.4", "detector": "x"}, "detection_categories": {"1": "animal"},
           "images": [{"file": "creek/empty_000.jpg",
                       "detections": [{"category": "1", "conf": 0.9, "bbox": [0.8, 0.1, 0.5, 0.5]}]}]}
    (Path(settings.exports_uri) / f"{partition}.md.json").write_text(json.dumps(bad))
    result = run_ingest(settings, instance, partition)
    assert not result.success
    check = next(e for e in result.get_asset_check_evaluations() if e.check_name == "md_format")
    assert not check.passed and any("not within 0-1" in row["problem"] for row in table_rows(check.metadata["examples"]))
    assert not result.asset_materializations_for_node("crops")


def test_running_the_detector_without_weights_says_what_to_do(settings, instance, sample_dir):
    partition = add_export(settings, instance, sample_dir)
    result = run_ingest(settings, instance, partition, {"ops": {"md_detections": {"config": {
        "run_detector": True, "detector_weights": "/nowhere/md_v5a.0.0.pt"}}}})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.message
    assert "MegaDetector weights not found at /nowhere/md_v5a.0.0.pt" in message and "detector_weights" in message


def test_malformed_detector_results_fail_with_the_file_named(settings, instance, sample_dir):
    partition = add_export(settings, instance, sample_dir)
    (Path(settings.exports_uri) / f"{partition}.md.json").write_text('{"images": [')
    result = run_ingest(settings, instance, partition)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert f"{partition}.md.json are not valid JSON" in failure.event_specific_data.error.message
    assert failure.step_key == "md_detections" and not result.asset_materializations_for_node("crops")


def test_out_of_order_materialization_names_the_missing_upstream(settings, instance, sample_dir):
    """md_detections before images used to stop with `TypeError: 'NoneType' object is not subscriptable`."""
    import dagster as dg

    from animl_assets.definitions import build_definitions

    partition = add_export(settings, instance, sample_dir)
    job = build_definitions(settings).resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(partition_key=partition, instance=instance, raise_on_error=False,
                                    asset_selection=[dg.AssetKey("cct_export"), dg.AssetKey("md_detections")])
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "md_detections"
    assert failure.event_specific_data.error.cls_name == "Failure"
    assert ("images is not materialized for partition 'sample/sample_export': materialize images first"
            in failure.event_specific_data.error.message)


def test_full_frame_empty_boxes_are_empty_images_never_crops(settings, instance, sample_dir, sample_counts, tmp_path):
    """Animl's "empty": category 0 with a box over the whole frame. No detection, no crop, no detector run."""
    source = tmp_path / "animl_empties"
    shutil.copytree(sample_dir, source)
    cct = json.loads((source / EXPORT_NAME).read_text())
    sizes = {image["id"]: (image["width"], image["height"]) for image in cct["images"] if "width" in image}
    empties = [ann for ann in cct["annotations"] if ann["category_id"] == 0 and ann["image_id"] in sizes]
    assert empties
    for ann in empties:
        ann["bbox"] = [0, 0, *sizes[ann["image_id"]]]
    (source / EXPORT_NAME).write_text(json.dumps(cct))
    partition = add_export(settings, instance, source)
    result = run_ingest(settings, instance, partition)
    assert result.success
    meta = materialization(result, "md_detections")
    assert meta["num_empty_images"] == len(empties) and meta["num_detections"] == sample_counts["boxes"]
    assert meta["num_images_without_boxes"] == sample_counts["unboxed_images"] - len(empties)
    crops = materialization(result, "crops")
    assert crops["num_crops"] == sample_counts["crops"]
    assert "empty" not in {row["label"] for row in table_rows(crops["crops_per_class"])}
    md = json.loads((artifacts(settings, "md_detections", partition) / "md_detections.json").read_text())
    files = {image["id"]: image["file_name"] for image in cct["images"]}
    listed = {image["file"]: image for image in md["images"]}
    assert all(listed[files[ann["image_id"]]]["detections"] == [] for ann in empties)


def test_images_without_width_and_height_get_their_size_from_the_file(settings, instance, sample_dir, sample_counts,
                                                                     tmp_path):
    """Older Animl images carry no width/height: a box on one is normalized by the size in the file's header
    (read by the images step), not dropped, and gives the same detection as with the size in the export."""
    source = tmp_path / "sizeless"
    shutil.copytree(sample_dir, source)
    cct = json.loads((source / EXPORT_NAME).read_text())
    sized = cct_to_md(cct)
    for image in cct["images"]:
        image.pop("width"), image.pop("height")
    (source / EXPORT_NAME).write_text(json.dumps(cct))
    partition = add_export(settings, instance, source, folder="sizeless")
    result = run_ingest(settings, instance, partition)
    assert result.success
    md = json.loads((artifacts(settings, "md_detections", partition) / "md_detections.json").read_text())
    readable = {image["file"]: image for image in md["images"] if "failure" not in image}
    expected = {image["file"]: image for image in sized["images"] if image["file"] in readable}
    # broken files have no header, but for the truncated one: its header is whole, its pixels fail in crops
    assert len(readable) == sample_counts["boxed_images"] - sample_counts["broken"] + 1
    assert materialization(result, "images")["num_fetched"] == 0  # headers only: 64 KiB ranged reads
    for file, image in expected.items():
        assert image["detections"] == readable[file]["detections"], file
    assert materialization(result, "crops")["num_crops"] == sample_counts["crops"]
