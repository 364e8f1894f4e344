"""Crops fanned out: shards as their own steps (processes under the multiprocess executor), merged into the same
crops as one step, byte for byte."""

import os
from pathlib import Path

import dagster as dg
import pytest

from animl_assets.core.detect.crops import CropReport, merge_reports, read_report, report_bytes, shard_count, shard_of
from animl_assets.core.layout import partition_folder
from animl_assets.definitions import INGEST_JOB, build_definitions
from animl_assets.settings import Settings
from animl_assets_tests.conftest import add_export, run_ingest

MD = {"info": {"detector": "md"}, "detection_categories": {"1": "animal"},
      "images": [{"file": f"{i}.jpg", "detections": [{"category": "1", "conf": 1.0, "bbox": [0, 0, .5, .5]}] * (i % 3)}
                 for i in range(11)]}


def test_shards_are_disjoint_ordered_and_together_every_image_with_a_box():
    boxed = [image["file"] for image in MD["images"] if image["detections"]]
    for count in (1, 2, 3, 7):
        parts = [[image["file"] for image in shard_of(MD, index, count)["images"]] for index in range(count)]
        assert sum(parts, []) == boxed and max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard_count(MD, 0, 3) == 3 and shard_count(MD, 0, 1000) == 1 and shard_count(MD, 5, 1) == 5


def test_shard_reports_merge_into_one():
    first = CropReport(images=2, crops=3, bytes_read=10, seconds=1.5, failures={"a.jpg": "bad"},
                       errors={"a.jpg": "x"}, rows=[{"crop": "b"}])
    second = read_report(report_bytes(CropReport(images=1, crops=1, bytes_read=5, seconds=2.0, rows=[{"crop": "a"}])))
    merged = merge_reports([first, second])
    assert (merged.images, merged.crops, merged.bytes_read, merged.seconds) == (3, 4, 15, 2.0)
    assert merged.failures == {"a.jpg": "bad"} and [row["crop"] for row in merged.rows] == ["b", "a"]


def ingest_job() -> dg.JobDefinition:
    """The ingest job as a subprocess of the multiprocess executor rebuilds it: settings from the environment."""
    return build_definitions().resolve_job_def(INGEST_JOB)


def crops_folder(home: Path, partition: str) -> dict[str, bytes]:
    folder = home / "artifacts" / "crops" / partition_folder(partition)
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*")
            if path.is_file() and not path.name.startswith(".")}


@pytest.mark.slow
def test_two_shards_under_the_multiprocess_executor_make_the_crops_of_one_step(tmp_path, instance, sample_dir,
                                                                               monkeypatch):
    config = {"images": {"config": {"images_root": str(sample_dir)}}}
    one = Settings.from_env({"ANIML_HOME": str(tmp_path / "one")})
    partition = add_export(one, instance, sample_dir)
    single = run_ingest(one, instance, partition, {"ops": config})
    assert single.success
    assert single.asset_materializations_for_node("crops")[0].metadata["num_shards"].value == 1

    monkeypatch.setenv("ANIML_HOME", str(tmp_path / "two"))
    monkeypatch.delenv("ANIML_STORAGE_URI", raising=False)
    two = Settings.from_env(dict(os.environ))
    add_export(two, instance, sample_dir)
    run_config = {"ops": {**config, "crops": {"config": {"shards": 2}}},
                  "execution": {"config": {"multiprocess": {"max_concurrent": 2}}}}
    with dg.execute_job(dg.reconstructable(ingest_job), instance, run_config=run_config,
                        tags={"dagster/partition": partition}) as fanned:
        assert fanned.success
        steps = {event.step_key: event.pid for event in fanned.all_events if event.event_type_value == "STEP_START"}
        meta = fanned.asset_materializations_for_node("crops")[0].metadata
    assert {"crops.crop_plan", "crops.crop_shard[0]", "crops.crop_shard[1]", "crops.crop_merge"} <= set(steps)
    assert steps["crops.crop_shard[0]"] != steps["crops.crop_shard[1]"]  # each shard its own process
    assert meta["num_shards"].value == 2
    expected = single.asset_materializations_for_node("crops")[0].metadata
    assert meta["num_crops"].value == expected["num_crops"].value > 0
    one_step, sharded = crops_folder(tmp_path / "one", partition), crops_folder(tmp_path / "two", partition)
    assert not [name for name in sharded if name.startswith("shards/")]  # the shards' reports are merged away
    jpegs = {name for name in one_step if name.endswith(".jpg")}
    assert len(jpegs) == expected["num_crops"].value
    for name in [*jpegs, "crops.csv", "failures.csv"]:
        assert sharded[name] == one_step[name], name  # the same crops and manifest, byte for byte
