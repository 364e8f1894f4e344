"""An image archive on S3 (moto over HTTP): each needed image read once, nothing mirrored, transfers concurrent,
a killed crop run resumed from where it stopped."""

import csv
import io
import json
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from dagster_aws.s3 import S3Resource
from PIL import Image

from animl_assets.core.detect import detector
from animl_assets.core.detect.crops import JOURNAL, MANIFEST_COLUMNS, crop_detections, crop_images
from animl_assets.core.files import Journal
from animl_assets.core.ingest.sample import EXPORT_NAME
from animl_assets.core.store import LocalStore
from animl_assets.core.transfers import cache_files, parallel_map
from animl_assets.resources.storage import S3Requests, open_store
from animl_assets.settings import Settings
from animl_assets_tests.conftest import bucket_objects, run_ingest, table_rows
from animl_assets_tests.test_resume import SLOW_CROPS, _kill_when


def test_parallel_map_keeps_the_order_and_bounds_what_is_in_flight():
    running, most, started = [0], [0], []
    lock = threading.Lock()

    def slow(item: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            started.append(item)
        time.sleep(0.002 * (item % 5))
        with lock:
            running[0] -= 1
        return item * 2

    results = []
    for value in parallel_map(slow, iter(range(200)), workers=4):
        results.append(value)
        assert len(started) <= len(results) + 2 * 4  # never more than 2 x workers submitted ahead
    assert results == [i * 2 for i in range(200)] and 1 < most[0] <= 4


class CountingStore(LocalStore):
    def __init__(self, root) -> None:
        super().__init__(root)
        self.reads: list[str] = []

    def read_bytes(self, key: str) -> bytes:
        self.reads.append(key)
        return super().read_bytes(key)


def test_the_crop_cache_fetches_only_what_it_lacks(tmp_path):
    store = CountingStore(tmp_path / "store")
    for name in ("a/1.jpg", "a/2.jpg", "b/3.jpg"):
        store.write_bytes(name, name.encode() * 10)
    cache = tmp_path / "cache"
    first = cache_files(store, ["a/1.jpg", "a/2.jpg", "gone.jpg"], cache)
    assert (first.fetched, first.reused, first.bytes) == (2, 0, 140)  # a missing key is left to the reader
    assert (cache / "a/1.jpg").read_bytes() == b"a/1.jpg" * 10 and not (cache / "b").exists()
    store.reads.clear()
    (cache / "a/2.jpg").write_bytes(b"stale")  # another size than the store's: fetched again
    again = cache_files(store, ["a/1.jpg", "a/2.jpg", "b/3.jpg"], cache,
                        sizes={"a/1.jpg": 70, "a/2.jpg": 70, "b/3.jpg": 70})
    assert sorted(store.reads) == ["a/2.jpg", "b/3.jpg"] and (again.fetched, again.reused) == (2, 1)


def test_the_detector_streams_a_remote_archive_a_chunk_at_a_time(moto_endpoint, s3_client, bucket, tmp_path,
                                                                   monkeypatch):
    """The megadetector package's batch call stands in (its weights cannot be downloaded offline): it sees each
    chunk's images on local disk, and none is left there after."""
    names = [f"cam/{i}.jpg" for i in range(5)]
    for name in names:
        s3_client.put_object(Bucket=bucket, Key=f"archive/{name}", Body=b"jpeg " + name.encode())
    seen: list[list[str]] = []
    folders: list[Path] = []

    def load_and_run_detector_batch(model_file, image_file_names, quiet, confidence_threshold):
        seen.append([Path(path).read_bytes().decode() for path in image_file_names if Path(path).exists()])
        folders.append(Path(image_file_names[0]).parents[1])
        return [{"file": path, "detections": []} for path in image_file_names]

    module = types.ModuleType("megadetector.detection.run_detector_batch")
    module.load_and_run_detector_batch = load_and_run_detector_batch
    for name in ("megadetector", "megadetector.detection"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(detector, "CHUNK", 2)
    weights = tmp_path / "md_v5a.0.0.pt"
    weights.write_bytes(b"weights")
    store = open_store(f"s3://{bucket}/archive", S3Resource(endpoint_url=moto_endpoint))
    md = detector.run_megadetector(weights, store, [*names, "cam/missing.jpg"])
    assert [len(chunk) for chunk in seen] == [2, 2, 1] and sum(seen, []) == [f"jpeg {n}" for n in names]
    assert [image["file"] for image in md["images"]] == [*names, "cam/missing.jpg"]
    assert not any(folder.exists() for folder in folders)  # each chunk deleted after detection


def _upload(s3_client, bucket: str, prefix: str, folder: Path) -> dict[str, int]:
    sizes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = path.relative_to(folder).as_posix()
            s3_client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=path.read_bytes())
            sizes[key] = path.stat().st_size
    return sizes


@pytest.mark.slow
def test_an_archive_on_s3_is_read_once_per_boxed_image_and_never_copied(moto_endpoint, s3_client, bucket, tmp_path,
                                                                         instance, sample_dir):
    archive = f"{bucket}-archive"
    s3_client.create_bucket(Bucket=archive)
    sizes = _upload(s3_client, archive, "images", sample_dir)
    settings = Settings.from_env({
        "ANIML_HOME": str(tmp_path / "home"), "ANIML_STORAGE_URI": f"s3://{bucket}/artifacts",
        "ANIML_EXPORTS_URI": f"s3://{archive}/images", "ANIML_S3_ENDPOINT_URL": moto_endpoint})
    instance.add_dynamic_partitions("exports", ["sample_export"])
    with S3Requests(prefix_depth=9) as requests:
        result = run_ingest(settings, instance, "sample_export")
    assert result.success
    cct = json.loads((sample_dir / EXPORT_NAME).read_text())
    files = {image["id"]: image["file_name"] for image in cct["images"]}
    boxed = {files[a["image_id"]] for a in cct["annotations"] if a.get("bbox")}
    listed = {row["file_name"]: row for row in table_rows(
        result.asset_materializations_for_node("images")[0].metadata["failures"])}
    needed = {file for file in boxed if file not in listed}  # boxed, and present with a size
    gets = {file: requests.count("GetObject", f"{archive}/images/{file}") for file in files.values()}
    assert {file for file, n in gets.items() if n} == needed and set(gets.values()) == {0, 1}  # once each, or not
    assert all(requests.count("HeadObject", f"{archive}/images/{file}") == 1 for file in files.values())
    assert requests.count("GetObject(ranged)", f"{archive}/images/") == 0  # the export has every size
    read = sum(requests.bytes_got[f"{archive}/images/{file}"] for file in needed)
    assert read == sum(sizes[file] for file in needed)
    from_archive = sum(n for where, n in requests.bytes_got.items() if where.startswith(f"{archive}/"))
    assert from_archive - read <= 2 * sizes[EXPORT_NAME]  # besides: the export, read by cct_export
    stored = bucket_objects(s3_client, bucket)
    assert not [key for key in stored if "/files/" in key]
    assert sum(len(data) for key, data in stored.items() if key.endswith(".jpg")) < 0.5 * sum(sizes.values())
    crops = result.asset_materializations_for_node("crops")[0].metadata
    assert crops["source_bytes_read"].value == read and crops["crop_bytes_written"].value > 0
    home = tmp_path / "home"
    on_disk = sum(path.stat().st_size for path in home.rglob("*") if path.is_file() and "dagster" not in path.parts)
    assert on_disk < 0.1 * sum(sizes.values())  # no image, no crop kept on the worker's disk


CHILD = SLOW_CROPS.replace("{delay}", "0.02") + """
from dagster_aws.s3 import S3Resource
from animl_assets.core.files import Journal
from animl_assets.resources.storage import open_store
md, endpoint, source, dest, journal = sys.argv[1:]
s3 = S3Resource(endpoint_url=endpoint)
crops.crop_images(json.load(open(md)), open_store(source, s3), open_store(dest, s3),
                  Journal(journal, crops.MANIFEST_COLUMNS), workers=2)
"""
COUNT = 120


@pytest.mark.slow
def test_crops_killed_on_s3_resume_reading_only_the_images_left(moto_endpoint, s3_client, bucket, tmp_path):
    names = []
    for i in range(COUNT):
        buffer = io.BytesIO()
        Image.new("RGB", (160, 120), (i * 2 % 256, 90, 40)).save(buffer, "JPEG")
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "images" / f"img{i:03d}.jpg").write_bytes(buffer.getvalue())
        s3_client.put_object(Bucket=bucket, Key=f"archive/img{i:03d}.jpg", Body=buffer.getvalue())
        names.append(f"img{i:03d}.jpg")
    md = {"info": {"detector": "md"}, "detection_categories": {"1": "animal"},
          "images": [{"file": n, "detections": [{"category": "1", "conf": 1.0, "bbox": [0.1, 0.1, 0.5, 0.5]}]}
                     for n in names]}
    (tmp_path / "md.json").write_text(json.dumps(md))
    journal = tmp_path / "cache" / JOURNAL
    source, dest = f"s3://{bucket}/archive", f"s3://{bucket}/crops"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "md.json"), moto_endpoint, source, dest,
                              str(journal)], stderr=subprocess.PIPE, text=True)
    _kill_when(child, journal, 30)
    recorded = len(Journal(journal, MANIFEST_COLUMNS).read())
    assert 30 <= recorded < COUNT
    s3 = S3Resource(endpoint_url=moto_endpoint)
    with S3Requests(prefix_depth=1) as requests:
        report = crop_images(md, open_store(source, s3), open_store(dest, s3), Journal(journal, MANIFEST_COLUMNS))
    assert report.reused == recorded and report.crops == COUNT - recorded and not report.failures
    assert requests.count("GetObject", f"{bucket}/archive") == COUNT - recorded  # only the rest read again
    assert not journal.exists()
    reference = crop_detections(md, tmp_path / "images", tmp_path / "local")
    assert reference.crops == COUNT
    on_s3 = {key.removeprefix("crops/"): data for key, data in bucket_objects(s3_client, bucket).items()
             if key.startswith("crops/")}
    local = {path.name: path.read_bytes() for path in (tmp_path / "local").iterdir() if path.name != JOURNAL}
    assert on_s3.keys() == local.keys()
    assert all(on_s3[name] == data for name, data in local.items() if name.endswith(".jpg"))  # byte for byte

    def rows(data: bytes) -> list[dict]:  # the source's mtime is S3's upload time there, the file's here
        return [{k: v for k, v in row.items() if k != "source_mtime_ns"}
                for row in csv.DictReader(io.StringIO(data.decode()))]

    assert rows(on_s3["crops.csv"]) == rows(local["crops.csv"])  # the same manifest as one uninterrupted run
