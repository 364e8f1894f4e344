"""An export cannot choose to read images from anywhere: roots it names must lie under allowed roots."""

import json
from pathlib import Path

import dagster as dg
import pytest

from animl_assets.cli import main
from animl_assets.core.paths import is_under
from animl_assets.settings import Settings
from animl_assets_tests.conftest import run_ingest


@pytest.mark.parametrize("location, root, inside", [
    ("/data/a", "/data", True), ("/data", "/data", True), ("/data2", "/data", False), ("/", "/data", False),
    ("/data/../etc", "/data", False), ("s3://b/p/q", "s3://b/p", True), ("s3://b/pq", "s3://b/p", False),
    ("s3://other/p", "s3://b", False), ("s3://b/x", "s3://b", True), ("/data", "s3://b", False),
])
def test_is_under(location, root, inside):
    assert is_under(location, root) is inside


def hostile_export(settings: Settings, instance, root: str, file_name: str = "etc/passwd") -> str:
    folder = Path(settings.exports_uri)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evil.json").write_text(json.dumps({
        "info": {"animl_images_root": root},
        "images": [{"id": 1, "file_name": file_name}], "annotations": [], "categories": []}))
    instance.add_dynamic_partitions("exports", ["evil"])
    return "evil"


@pytest.mark.parametrize("root", ["/", "s3://another-bucket/secrets"])
def test_an_export_naming_a_root_outside_the_allowed_ones_is_refused(settings, instance, root):
    partition = hostile_export(settings, instance, root)
    result = run_ingest(settings, instance, partition)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "images" and "not under an allowed root" in failure.event_specific_data.error.message
    assert not list((Path(settings.storage_uri) / "images").rglob("passwd"))  # nothing was read or copied


def test_an_operator_allows_a_root(tmp_path, instance, sample_dir, sample_counts):
    settings = Settings.from_env({"ANIML_HOME": str(tmp_path / "home"), "ANIML_ALLOWED_IMAGE_ROOTS": f"/nowhere,{sample_dir}"})
    cct = json.loads((sample_dir / "sample_export.json").read_text())
    cct["info"]["animl_images_root"] = str(sample_dir)
    folder = Path(settings.exports_uri)
    folder.mkdir(parents=True)
    (folder / "allowed.json").write_text(json.dumps(cct))
    instance.add_dynamic_partitions("exports", ["allowed"])
    result = run_ingest(settings, instance, "allowed")
    assert result.success
    images = result.asset_materializations_for_node("images")[0].metadata
    assert images["num_present"].value == sample_counts["present"] - 1  # all but missing and zero-byte
    assert images["source"].value.startswith(str(sample_dir))


def test_animl_register_trusts_the_root_it_records(tmp_path, monkeypatch, sample_dir, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("ANIML_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", "")
    assert main(["register", str(sample_dir / "sample_export.json")]) == 0  # images beside the original
    assert (home / "registered_image_roots.txt").read_text().splitlines() == [str(sample_dir)]
    # the same root written into an export dropped by someone else is allowed too; "/" still is not
    evil = home / "exports" / "evil.json"
    evil.write_text(json.dumps({"info": {"animl_images_root": "/"}, "images": [{"id": 1, "file_name": "etc/passwd"}],
                                "annotations": [], "categories": []}))
    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    instance.add_dynamic_partitions("exports", ["evil"])
    capsys.readouterr()
    assert main(["materialize", "evil"]) == 2
    assert "is not under an allowed root" in capsys.readouterr().err
