import shutil
import subprocess
import sys

import pytest
from PIL import Image

from animl_assets.core.ingest.images import GOOD, NONEXISTENT, ImageRequest, collect_images, verify_image
from animl_assets.resources.storage import LocalStore
from animl_assets_tests.images_testdata import BROKEN, VALID


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_oddities_are_good(name):
    check = verify_image(VALID[name]())
    assert check.status == GOOD, check.error
    assert check.mode == {"rgb.jpg": "RGB", "cmyk.jpg": "CMYK", "gray.jpg": "L", "exif.jpg": "RGB"}[name]


def test_exif_orientation_is_recorded():
    check = verify_image(VALID["exif.jpg"]())
    assert (check.width, check.height, check.orientation) == (48, 64, 6)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_files_get_their_category(name):
    data, expected = BROKEN[name]
    check = verify_image(data())
    assert check.status == expected
    assert check.error


def test_real_camera_trap_jpegs_are_good(ena24_dir):
    for path in sorted(ena24_dir.glob("*.jpg"))[:5]:
        check = verify_image(path.read_bytes())
        assert check.status == GOOD and check.width >= 1920


def make_source(tmp_path):
    source = LocalStore(tmp_path / "source")
    for name, make in VALID.items():
        source.write_bytes(f"cam/{name}", make())
    for name, (make, _) in BROKEN.items():
        source.write_bytes(f"cam/{name}", make())
    return source


def requests_for(names):
    return [ImageRequest(str(i), name, name) for i, name in enumerate(names)]


def test_collect_keeps_every_good_image_and_reports_every_failure(tmp_path):
    source, dest = make_source(tmp_path), LocalStore(tmp_path / "dest")
    names = [f"cam/{n}" for n in (*VALID, *BROKEN)] + ["cam/missing.jpg", "../outside.jpg", "/abs.jpg"]
    manifest = collect_images(requests_for(names), source, dest, workers=3)
    status = dict(zip(manifest["file_name"], manifest["status"]))
    assert len(manifest) == len(names)  # nothing dropped silently
    for name in VALID:
        assert status[f"cam/{name}"] == GOOD
        assert dest.read_bytes(f"cam/{name}") == source.read_bytes(f"cam/{name}")
    for name, (_, expected) in BROKEN.items():
        assert status[f"cam/{name}"] == expected
        assert not dest.exists(f"cam/{name}")
    assert status["cam/missing.jpg"] == NONEXISTENT
    rejected = manifest[manifest["file_name"].isin(["../outside.jpg", "/abs.jpg"])]
    assert (rejected["status"] == "bad").all() and rejected["error"].str.startswith("rejected").all()
    assert not (tmp_path / "outside.jpg").exists()
    assert sorted(f.key for f in dest.list()) == sorted(f"cam/{n}" for n in VALID)


def test_rerun_reuses_verified_images_without_fetching(tmp_path):
    source, dest = make_source(tmp_path), LocalStore(tmp_path / "dest")
    names = [f"cam/{n}" for n in VALID]
    first = collect_images(requests_for(names), source, dest)
    earlier = {row["file_name"]: row for row in first.to_dict("records")}

    class CountingStore(LocalStore):
        reads = 0

        def read_bytes(self, key):
            CountingStore.reads += 1
            return super().read_bytes(key)

    counting = CountingStore(source.root)
    second = collect_images(requests_for(names), counting, dest, already_good=earlier)
    assert CountingStore.reads == 0
    assert (second["status"] == GOOD).all() and not second["fetched"].any()
    assert second["width"].tolist() == first["width"].tolist()
    # an image removed from the destination (or changed in size) is fetched again
    dest.delete("cam/rgb.jpg")
    third = collect_images(requests_for(names), counting, dest, already_good=earlier)
    assert CountingStore.reads == 1 and dest.exists("cam/rgb.jpg")
    assert third.set_index("file_name").loc["cam/rgb.jpg", "fetched"]


def test_transient_fetch_errors_are_retried_then_reported(tmp_path):
    source, dest = make_source(tmp_path), LocalStore(tmp_path / "dest")

    class Flaky(LocalStore):
        failures = {"cam/rgb.jpg": 2, "cam/gray.jpg": 5}

        def read_bytes(self, key):
            if self.failures.get(key, 0) > 0:
                self.failures[key] -= 1
                raise ConnectionError("connection reset")
            return super().read_bytes(key)

    manifest = collect_images(requests_for(["cam/rgb.jpg", "cam/gray.jpg"]), Flaky(source.root), dest,
                              attempts=3, backoff_s=0)
    assert manifest["status"].tolist() == [GOOD, "fetch_failed"]  # the transport's fault, not the image's
    assert "fetch failed after 3 attempts: ConnectionError: connection reset" in manifest["error"].iloc[1]
    again = collect_images(requests_for(["cam/rgb.jpg", "cam/gray.jpg"]), source, dest, attempts=3, backoff_s=0,
                           already_good={r["file_name"]: r for r in manifest.to_dict("records") if r["status"] == GOOD})
    assert again["status"].tolist() == [GOOD, GOOD] and again["fetched"].tolist() == [False, True]


BOMB_CHECK = """
import resource, sys
from pathlib import Path
from animl_assets.core.ingest.images import ImageRequest, collect_images
from animl_assets.resources.storage import LocalStore
source, dest = LocalStore(sys.argv[1]), LocalStore(sys.argv[2])
names = sorted(p.name for p in Path(sys.argv[1]).iterdir())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
manifest = collect_images([ImageRequest(n, n, n) for n in names], source, dest, workers=2)
print(",".join(manifest["status"]), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.slow
def test_decompression_bombs_are_bad_without_being_decoded(tmp_path):
    """8 PNGs of 12,000 x 12,000 (a few hundred KB each) took 4.4 GB to check; now none is decoded."""
    bombs = tmp_path / "bombs"
    bombs.mkdir()
    Image.new("L", (12_000, 12_000)).save(bombs / "bomb0.png", optimize=True)
    for i in range(1, 8):
        shutil.copyfile(bombs / "bomb0.png", bombs / f"bomb{i}.png")
    assert (bombs / "bomb0.png").stat().st_size < 1_000_000
    run = subprocess.run([sys.executable, "-c", BOMB_CHECK, str(bombs), str(tmp_path / "dest")],
                         capture_output=True, text=True, check=True)
    statuses, growth_mb = run.stdout.split()
    assert statuses.split(",") == ["bad"] * 8
    assert int(growth_mb) < 100, f"peak RSS grew by {growth_mb} MB"  # one decoded bomb alone is 144 MB
    check = verify_image((bombs / "bomb0.png").read_bytes())
    assert check.status == "bad" and "over the cap of 50 (max_megapixels)" in check.error
    assert verify_image((bombs / "bomb0.png").read_bytes(), max_pixels=200_000_000).status == "good"  # cap raised
