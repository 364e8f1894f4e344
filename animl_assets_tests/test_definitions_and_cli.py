import subprocess
import sys
from pathlib import Path

import dagster as dg

from animl_assets.cli import main
from animl_assets.definitions import DATASET_JOB, INGEST_JOB, build_definitions
from animl_assets.resources.storage import LocalStore, S3Store
from animl_assets.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def test_definitions_load_with_no_configuration(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ("ANIML_HOME", "ANIML_STORAGE_URI", "ANIML_EXPORTS_URI", "ANIML_IMAGES_URI"):
        monkeypatch.delenv(var, raising=False)
    defs = build_definitions()
    repo = defs.get_repository_def()
    assert {key.to_user_string() for key in defs.resolve_all_asset_keys()} == {
        "cct_export", "images", "md_detections", "crops", "classification_dataset", "splits"}
    assert repo.has_job(INGEST_JOB) and repo.has_sensor_def("new_exports")
    assert {key.name for key in defs.resolve_asset_graph().asset_check_keys} == {
        "schema", "unique_ids", "references", "bboxes", "md_format", "no_location_leakage",
        "every_label_in_every_split"}
    assert repo.has_job(DATASET_JOB)
    storage = defs.resources["storage"]
    assert storage.uri == str(tmp_path / ".animl" / "artifacts")
    assert isinstance(storage.store(), LocalStore)


def test_s3_storage_is_chosen_from_the_environment(moto_endpoint, bucket):
    settings = Settings.from_env({"ANIML_STORAGE_URI": f"s3://{bucket}/runs", "ANIML_S3_ENDPOINT_URL": moto_endpoint})
    storage = build_definitions(settings).resources["storage"]
    assert storage.s3.endpoint_url == moto_endpoint
    assert isinstance(storage.store(), S3Store)


def test_workspace_loads_the_definitions_module():
    workspace = (REPO / "workspace.yaml").read_text()
    assert "module_name: animl_assets.definitions" in workspace
    code = "import animl_assets.definitions as d; print(type(d.defs).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "Definitions"


def test_cli_register_copies_an_outside_export_and_materializes_it(tmp_path, monkeypatch, sample_dir, sample_counts,
                                                                  capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("ANIML_HOME", str(home))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert main(["register", str(sample_dir / "sample_export.json")]) == 0
    out = capsys.readouterr().out
    assert "registered partition 'sample_export'" in out
    assert "materialized images [sample_export]" in out and f"'num_good': {sample_counts['good']}" in out
    assert (home / "exports" / "sample_export.json").is_file()
    assert (home / "artifacts" / "images" / "sample_export" / "manifest.csv").is_file()
    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    assert instance.get_dynamic_partitions("exports") == ["sample_export"]
    assert instance.get_latest_materialization_event(dg.AssetKey("images")) is not None


def test_cli_rejects_a_malformed_or_missing_export(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ANIML_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["register", str(bad)]) == 2
    assert "error: export is not valid JSON" in capsys.readouterr().err
    assert main(["register", str(tmp_path / "nope.json")]) == 2
    assert "no file at" in capsys.readouterr().err
    assert not (tmp_path / "home" / "exports" / "bad.json").exists()


def test_sample_export_command_is_deterministic(tmp_path):
    assert main(["sample-export", str(tmp_path / "a")]) == 0
    assert main(["sample-export", str(tmp_path / "b")]) == 0
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_cli_never_overwrites_a_different_export_of_the_same_name(tmp_path, monkeypatch, sample_dir, capsys):
    monkeypatch.setenv("ANIML_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert main(["register", str(sample_dir / "sample_export.json"), "--no-run"]) == 0
    assert main(["register", str(sample_dir / "sample_export.json"), "--no-run"]) == 0  # the same one again
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "sample_export.json").write_text('{"images": [], "annotations": [], "categories": []}')
    kept = (tmp_path / "home" / "exports" / "sample_export.json").read_bytes()
    assert main(["register", str(other / "sample_export.json"), "--no-run"]) == 2
    assert "another export is already registered" in capsys.readouterr().err
    assert (tmp_path / "home" / "exports" / "sample_export.json").read_bytes() == kept
    inside = tmp_path / "home" / "exports" / "sample_export.json"
    assert main(["register", str(inside), "--images-root", "/x", "--no-run"]) == 2
    assert "--images-root is for exports outside" in capsys.readouterr().err
