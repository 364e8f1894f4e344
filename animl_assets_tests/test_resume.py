"""A run killed with SIGKILL halfway, then run again, does only the rest (real subprocesses)."""

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from animl_assets.core.detect.crops import JOURNAL, crop_detections
from animl_assets.core.detect.crops import MANIFEST_COLUMNS as CROP_COLUMNS
from animl_assets.core.files import Journal
from animl_assets.core.ingest.images import GOOD, MANIFEST_COLUMNS, ImageRequest, collect_images
from animl_assets.resources.storage import LocalStore

COUNT = 300

SLOW_CROPS = """
import json, sys, time
from animl_assets.core.detect import crops
encode = crops.encode_jpeg
def slow_encode(*args, **kwargs):
    time.sleep({delay})  # a slow machine: the run lasts a few seconds
    return encode(*args, **kwargs)
crops.encode_jpeg = slow_encode
"""  # a child process's preamble: crops encoded slowly enough to be killed halfway
CROP_CHILD = SLOW_CROPS.replace("{delay}", "0.01") + """
crops.crop_detections(json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3], workers=1)
"""

IMAGES_CHILD = """
import sys, time
from animl_assets.core.files import Journal
from animl_assets.core.ingest.images import MANIFEST_COLUMNS, ImageRequest, collect_images
from animl_assets.resources.storage import LocalStore
class SlowSource(LocalStore):
    def read_bytes(self, key):
        time.sleep(0.01)  # a slow network
        return super().read_bytes(key)
names = [f"img{i:04d}.jpg" for i in range({count})]
collect_images([ImageRequest(n, n, n) for n in names], SlowSource(sys.argv[1]), LocalStore(sys.argv[2]),
               workers=2, journal=Journal(sys.argv[3], MANIFEST_COLUMNS))
"""


def _images(folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    names = []
    for i in range(COUNT):
        buffer = io.BytesIO()
        Image.new("RGB", (96, 64), (i % 256, 80, 160)).save(buffer, "JPEG")
        (folder / f"img{i:04d}.jpg").write_bytes(buffer.getvalue())
        names.append(f"img{i:04d}.jpg")
    return names


def _kill_when(process: subprocess.Popen, journal: Path, rows: int, timeout_s: float = 60) -> None:
    """SIGKILL ``process`` once ``journal`` records at least ``rows`` finished rows."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if journal.is_file() and journal.read_text().count("\n") > rows:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.01)
    process.kill()
    pytest.fail(f"{journal} never reached {rows} rows")


@pytest.mark.slow
def test_crops_killed_halfway_resume_with_only_the_rest(tmp_path):
    names = _images(tmp_path / "images")
    md = {"info": {"detector": "md"}, "detection_categories": {"1": "animal"},
          "images": [{"file": n, "detections": [{"category": "1", "conf": 1.0, "bbox": [0.1, 0.1, 0.5, 0.5]}]}
                     for n in names]}
    (tmp_path / "md.json").write_text(json.dumps(md))
    crops_dir = tmp_path / "crops"
    child = subprocess.Popen([sys.executable, "-c", CROP_CHILD, str(tmp_path / "md.json"), str(tmp_path / "images"),
                              str(crops_dir)], stderr=subprocess.PIPE, text=True)
    _kill_when(child, crops_dir / JOURNAL, 50)
    assert not (crops_dir / "crops.csv").exists()  # killed before the manifest: only the journal tells
    recorded = len(Journal(crops_dir / JOURNAL, CROP_COLUMNS).read())  # a row cut by the kill is not counted
    assert 50 <= recorded < COUNT
    report = crop_detections(md, tmp_path / "images", crops_dir, workers=1)
    assert report.reused == recorded and report.crops == COUNT - recorded
    assert report.crops < COUNT - 50 and not report.failures
    assert not (crops_dir / JOURNAL).exists()
    assert crop_detections(md, tmp_path / "images", crops_dir, workers=1).reused == COUNT


@pytest.mark.slow
def test_images_killed_halfway_resume_with_only_the_rest(tmp_path):
    names = _images(tmp_path / "source")
    journal = tmp_path / "cache" / "manifest.journal.csv"
    child = subprocess.Popen([sys.executable, "-c", IMAGES_CHILD.replace("{count}", str(COUNT)),
                              str(tmp_path / "source"), str(tmp_path / "dest"), str(journal)],
                             stderr=subprocess.PIPE, text=True)
    _kill_when(child, journal, 50)
    recorded = Journal(journal, MANIFEST_COLUMNS).read()
    assert 50 <= len(recorded) < COUNT
    manifest = collect_images([ImageRequest(n, n, n) for n in names], LocalStore(tmp_path / "source"),
                              LocalStore(tmp_path / "dest"), journal=Journal(journal, MANIFEST_COLUMNS))
    assert (manifest["status"] == GOOD).all() and len(manifest) == COUNT
    assert int(manifest["fetched"].sum()) == COUNT - len(recorded)  # only the rest is fetched again
