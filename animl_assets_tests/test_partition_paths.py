"""No two exports can write to one path: every partition's artifacts sit in one folder of their own."""

import csv
import io
import itertools
import json
from pathlib import Path

import pytest
from PIL import Image

from animl_assets.core.detect.crops import crop_name
from animl_assets.core.ingest.exports import partition_key_for
from animl_assets.core.layout import artifact_key, partition_folder
from animl_assets.definitions import DATASET_JOB, build_definitions
from animl_assets_tests.conftest import latest_version, run_ingest

PARTITIONS = ["a", "a/b", "a/b/c", "a/files", "files", "a.b", "a-b", "a_b", "crops.csv"]
FILES = ["x.jpg", "b/x.jpg", "files/x.jpg", "b/c/x.jpg", "manifest.csv", "crops.csv", "c/files/x.jpg"]


def test_no_two_partitions_share_a_path():
    owner: dict[str, str] = {}
    for partition, file in itertools.product(PARTITIONS, FILES):
        for key in (artifact_key("images", partition, f"files/{file}"), artifact_key("images", partition, "manifest.csv"),
                    artifact_key("crops", partition, crop_name(file, 0, "md")), artifact_key("crops", partition, "crops.csv")):
            assert owner.setdefault(key, partition) == partition, f"{key} is written by {owner[key]} and {partition}"
    folders = {partition_folder(p) for p in PARTITIONS}
    assert len(folders) == len(PARTITIONS) and all("/" not in folder for folder in folders)
    with pytest.raises(ValueError):
        partition_folder("a~b")  # not a partition key: '~' is what '/' becomes


def _jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def test_exports_whose_crop_paths_used_to_collide_keep_their_own_crops(settings, instance):
    """Export a.json with image b/x.jpg and export a/b.json with image x.jpg both wrote crops/a/b/x.jpg___crop00…"""
    exports = Path(settings.exports_uri)
    for export_key, file, species, colour in (("a.json", "b/x.jpg", "deer", (200, 0, 0)),
                                              ("a/b.json", "x.jpg", "fox", (0, 0, 200))):
        folder = (exports / export_key).parent
        (folder / file).parent.mkdir(parents=True, exist_ok=True)
        (folder / file).write_bytes(_jpeg(colour))
        (exports / export_key).write_text(json.dumps({
            "images": [{"id": 1, "file_name": file, "width": 64, "height": 48, "location": "l1"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 8, 32, 24]}],
            "categories": [{"id": 1, "name": species}]}))
        partition = partition_key_for(export_key)
        instance.add_dynamic_partitions("exports", [partition])
        assert run_ingest(settings, instance, partition).success
    job = build_definitions(settings).resolve_job_def(DATASET_JOB)
    job.execute_in_process(instance=instance, raise_on_error=False)  # splits cannot place 1 location: fine
    root = Path(settings.storage_uri)

    with (latest_version(settings, instance, "classification_dataset") / "classification_ds.csv").open() as handle:
        rows = {row["dataset"]: row for row in csv.DictReader(handle)}
    assert {name: row["label"] for name, row in rows.items()} == {"a": "deer", "a/b": "fox"}
    assert rows["a"]["path"] != rows["a/b"]["path"]
    red, blue = (Image.open(root / "crops" / rows[name]["path"]).convert("RGB").getpixel((5, 5)) for name in ("a", "a/b"))
    assert red[0] > 150 > red[2] and blue[2] > 150 > blue[0]  # each label's crop is its own export's image
