import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from animl_assets.cli import main
from animl_assets.definitions import (
    CLASSIFY_JOB,
    COMPARE_JOB,
    DATASET_JOB,
    EMPTY_FRAMES_JOB,
    EMPTY_SCORE_JOB,
    EMPTY_TRAIN_JOB,
    INGEST_JOB,
    TRAIN_JOB,
    build_definitions,
)
from animl_assets.resources.storage import LocalStore, S3Store
from animl_assets.settings import Settings
from animl_assets_tests.conftest import REPO


def test_definitions_load_with_no_configuration(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ("ANIML_HOME", "ANIML_STORAGE_URI", "ANIML_EXPORTS_URI", "ANIML_IMAGES_URI"):
        monkeypatch.delenv(var, raising=False)
    defs = build_definitions()
    repo = defs.get_repository_def()
    assert {key.to_user_string() for key in defs.resolve_all_asset_keys()} == {
        "cct_export", "images", "md_detections", "crops", "classification_dataset", "splits", "classifier_checkpoint",
        "classifier_evaluation", "registered_model", "champion_model", "model_comparison", "classifications",
        "classified_detections", "mislabeled_candidates", "review_queue", "empty_frames", "empty_dataset",
        "empty_splits", "empty_checkpoint", "empty_evaluation", "registered_empty_model", "empty_champion",
        "empty_scores"}
    assert repo.has_job(INGEST_JOB) and repo.has_job(TRAIN_JOB) and repo.has_sensor_def("new_exports")
    assert {key.to_user_string() for key in defs.resolve_asset_graph().asset_check_keys} == {
        "cct_export:schema", "cct_export:unique_ids", "cct_export:references", "cct_export:bboxes",
        "cct_export:boxes_clipped", "cct_export:annotations_set_aside",
        "images:failure_rate", "md_detections:md_format", "crops:failure_rate",
        "classification_dataset:enough_labels_to_train", "splits:no_location_leakage",
        "splits:every_label_in_every_split", "registered_model:beats_champion", "classified_detections:md_format",
        "classifications:drift", "empty_splits:no_location_leakage", "empty_splits:every_label_in_every_split",
        "registered_empty_model:beats_champion"}
    assert repo.has_job(DATASET_JOB) and repo.has_job(COMPARE_JOB) and repo.has_job(CLASSIFY_JOB)
    assert all(repo.has_job(job) for job in (EMPTY_FRAMES_JOB, EMPTY_TRAIN_JOB, EMPTY_SCORE_JOB))
    storage = defs.resources["storage"]
    assert storage.location == str(tmp_path / ".animl" / "artifacts")
    assert isinstance(storage.store(), LocalStore)


def test_resources_name_their_environment_variables_and_describe_themselves(tmp_path, monkeypatch):
    monkeypatch.setenv("ANIML_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ANIML_STORAGE_URI", str(tmp_path / "store"))
    monkeypatch.setenv("ANIML_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("ANIML_EXPORTS_URI", raising=False)
    monkeypatch.setenv("ANIML_EXPORTS_MAX_DEPTH", "3")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    defs = build_definitions()
    tracking = defs.resources["mlflow"]
    assert tracking.tracking_uri.env_var_name == "MLFLOW_TRACKING_URI" and tracking.home.env_var_name == "ANIML_HOME"
    storage, exports = defs.resources["storage"], defs.resources["exports"]
    assert exports.max_depth.env_var_name == "ANIML_EXPORTS_MAX_DEPTH"
    # the launchpad shows {env: NAME}, never the value
    assert isinstance(storage.uri, dg.EnvVar) and storage.uri.env_var_name == "ANIML_STORAGE_URI"
    assert isinstance(exports.home, dg.EnvVar) and exports.home.env_var_name == "ANIML_HOME"
    assert storage.s3.endpoint_url.env_var_name == "ANIML_S3_ENDPOINT_URL"
    snapshot = defs.get_repository_def().get_top_level_resources()
    descriptions = {name: resource.description for name, resource in snapshot.items()}  # shown in the UI
    assert len(set(descriptions.values())) == len(descriptions) == 5 and "ANIML_STORAGE_URI" in descriptions["storage"]
    assert "MLFLOW_TRACKING_URI" in descriptions["mlflow"]
    assert "ANIML_EXPORTS_URI" in descriptions["exports"] and "ANIML_IMAGES_URI" in descriptions["image_source"]
    assert "plain files" in descriptions["io_manager"]


def test_s3_storage_is_chosen_from_the_environment(moto_endpoint, bucket):
    settings = Settings.from_env({"ANIML_STORAGE_URI": f"s3://{bucket}/runs", "ANIML_S3_ENDPOINT_URL": moto_endpoint})
    storage = build_definitions(settings).resources["storage"]
    assert storage.s3.endpoint_url == moto_endpoint
    assert isinstance(storage.store(), S3Store)


def test_workspace_loads_the_definitions_module():
    workspace = (REPO / "workspace.yaml").read_text()
    assert "module_name: animl_assets.definitions" in workspace
    module = importlib.import_module("animl_assets.definitions")  # what `dagster dev -w workspace.yaml` loads
    assert type(module.defs).__name__ == "Definitions"


def test_cli_register_copies_an_outside_export_and_materializes_it(tmp_path, monkeypatch, sample_dir, sample_counts,
                                                                  capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("ANIML_HOME", str(home))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert main(["register", str(sample_dir / "sample_export.json")]) == 0
    out = capsys.readouterr().out
    assert "registered partition 'sample_export'" in out
    assert "materialized images [sample_export]" in out and f"'num_present': {sample_counts['present'] - 1}" in out
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
    assert f"no file at {tmp_path / 'nope.json'}" in capsys.readouterr().err
    assert not (tmp_path / "home" / "exports" / "bad.json").exists()


def test_an_export_cut_off_by_animls_streaming_writer_is_one_line_and_registers_nothing(tmp_path, monkeypatch,
                                                                                          capsys):
    monkeypatch.setenv("ANIML_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    image = {"id": "proj:0a1b", "file_name": "proj/cam1/dep/proj-0a1b.jpg", "datetime": None,
             "serving_bucket_key": "original/proj:0a1b-original.jpg", "location": "cam1-default"}
    annotation = {"id": "65f0c0ffee0123456789abcd", "image_id": image["id"], "category_id": 1,
                  "sequence_level_annotation": False, "bbox": [1, 2, 30, 40], "confidence": 1, "validated": True}
    # the streaming writer's early end: the annotations list stops after an annotation's "}, "
    text = f'{{"images": [{json.dumps(image)}], "annotations": [{json.dumps(annotation)}, '
    (tmp_path / "big.json").write_text(text)
    assert main(["register", str(tmp_path / "big.json")]) == 2
    line = one_error_line(capsys, "register")
    assert "ends early" in line and "export it again" in line and "18,000 images" in line
    assert not (tmp_path / "home" / "exports" / "big.json").exists()


def test_register_says_which_export_profile_it_recognised(tmp_path, sample_dir, monkeypatch, capsys):
    monkeypatch.setenv("ANIML_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert main(["register", str(sample_dir / "sample_export.json"), "--no-run"]) == 0
    assert "export profile: coco (images are read by their file_name)" in capsys.readouterr().out
    cct = json.loads((sample_dir / "sample_export.json").read_text())
    for image in cct["images"]:
        image["serving_bucket_key"] = f"original/{image['id']}-original.jpg"
    (tmp_path / "animl.json").write_text(json.dumps(cct))
    assert main(["register", str(tmp_path / "animl.json"), "--no-run"]) == 0
    assert "export profile: animl (images are read by their serving_bucket_key)" in capsys.readouterr().out


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
    assert "--images-root and --name are for exports outside" in capsys.readouterr().err
    assert main(["register", str(other / "sample_export.json"), "--name", "other/second", "--no-run"]) == 0
    assert "registered partition 'other/second'" in capsys.readouterr().out
    assert (tmp_path / "home" / "exports" / "other" / "second.json").is_file()


def one_error_line(capsys, command: str) -> str:
    """The CLI's stderr, which must be exactly one `animl CMD: error: …` line."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"animl {command}: error: "), err
    return lines[0]


@pytest.fixture()
def fresh_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("ANIML_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", "")  # set but empty: the same as unset
    return home


def test_expected_failures_are_one_line_and_exit_2(fresh_home, capsys):
    assert main(["materialize", "nope"]) == 2
    assert "unknown partition 'nope'; known: none" in one_error_line(capsys, "materialize")
    assert main(["register", "/nonexistent.json"]) == 2
    assert one_error_line(capsys, "register").endswith("no file at /nonexistent.json")
    assert main(["build-dataset"]) == 2
    assert "no exports registered yet" in one_error_line(capsys, "build-dataset")
    assert (fresh_home / "dagster" / "dagster.yaml").resolve() == REPO / "dagster.yaml"


def test_a_failure_inside_a_run_is_one_line_and_the_known_partitions_are_listed(fresh_home, sample_dir, capsys):
    assert main(["register", str(sample_dir / "sample_export.json"), "--name", "site-a", "--no-run"]) == 0
    capsys.readouterr()
    assert main(["build-dataset"]) == 2  # registered, but nothing ingested yet: the asset's dg.Failure
    out_err = capsys.readouterr()
    assert "Traceback" not in out_err.out + out_err.err and "Stack Trace" not in out_err.out + out_err.err
    line = out_err.err.strip().splitlines()
    assert len(line) == 1 and line[0] == ("animl build-dataset: error: classification_dataset: no crops "
                                          "materialized yet for ['site-a']: materialize crops first")
    assert main(["materialize", "site"]) == 2
    assert one_error_line(capsys, "materialize").endswith("unknown partition 'site'; known: site-a")


def test_a_failed_blocking_check_is_one_line(fresh_home, sample_dir, tmp_path, capsys):
    cct = json.loads((sample_dir / "sample_export.json").read_text())
    cct["annotations"][0]["bbox"] = [600, 400, 500, 500]
    (tmp_path / "badbox.json").write_text(json.dumps(cct))
    assert main(["register", str(tmp_path / "badbox.json"), "--images-root", str(sample_dir)]) == 2
    assert one_error_line(capsys, "register").endswith("check bboxes on cct_export failed (1 problems)")


@pytest.mark.parametrize("error", [RuntimeError, KeyError])  # retried, or stopped at once: a crash either way
@pytest.mark.usefixtures("quick_retries")
def test_an_unexpected_error_keeps_its_trace(fresh_home, sample_dir, capsys, monkeypatch, error):
    import animl_assets.assets.exports as exports_assets

    def broken(cct, **options):
        raise error("an unexpected bug")

    monkeypatch.setattr(exports_assets, "validate_cct", broken)
    assert main(["register", str(sample_dir / "sample_export.json")]) == 1
    err = capsys.readouterr().err
    assert f"{error.__name__}: " in err and "an unexpected bug" in err and 'File "' in err  # the trace, with frames


def test_register_brings_the_megadetector_results_beside_the_export(fresh_home, sample_dir, tmp_path, capsys):
    shutil.copytree(sample_dir, tmp_path / "withmd")
    cct = json.loads((sample_dir / "sample_export.json").read_text())
    unboxed = [image["file_name"] for image in cct["images"] if image["file_name"].endswith("empty_000.jpg")]
    md = {"info": {"format_version": "1.3", "detector": "md_v5a.0.0.pt"}, "detection_categories": {"1": "animal"},
          "images": [{"file": file, "detections": [{"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2]}]}
                     for file in unboxed]}
    (tmp_path / "withmd" / "sample_export.json").rename(tmp_path / "withmd" / "withmd.json")
    (tmp_path / "withmd" / "withmd.md.json").write_text(json.dumps(md))
    assert main(["register", str(tmp_path / "withmd" / "withmd.json")]) == 0
    out = capsys.readouterr().out
    assert f"with the MegaDetector results beside it: {tmp_path / 'withmd' / 'withmd.md.json'}" in out
    assert (fresh_home / "exports" / "withmd.md.json").read_text() == json.dumps(md)
    instance = dg.DagsterInstance.from_config(str(fresh_home / "dagster"))
    event = instance.get_latest_materialization_event(dg.AssetKey("md_detections"))
    assert event.asset_materialization.metadata["sources"].value["ingested"] == len(unboxed)


def test_help_is_plain_text_and_names_the_environment(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "ANIML_HOME" in text and "ANIML_STORAGE_URI" in text
    assert "classification_dataset" in text and "splits" in text  # the demo's help names every stage


def test_the_instance_limits_concurrent_runs(instance):
    """dagster.yaml: a burst of new exports queues; it does not start a run per export at once."""
    settings = instance.get_concurrency_config().run_queue_config
    assert settings.max_concurrent_runs == 2


def test_boxes_overhanging_within_the_tolerance_are_clipped_and_the_tolerance_is_set_from_the_cli(
        fresh_home, sample_dir, tmp_path, capsys):
    cct = json.loads((sample_dir / "sample_export.json").read_text())
    first = next(ann for ann in cct["annotations"] if ann.get("bbox"))
    image = next(image for image in cct["images"] if image["id"] == first["image_id"])
    first["bbox"] = [image["width"] - 50, 10, 70, 40]  # 20 px past the right edge: 3% of a 640 px side
    (tmp_path / "overhang.json").write_text(json.dumps(cct))
    assert main(["register", str(tmp_path / "overhang.json"), "--images-root", str(sample_dir)]) == 0
    assert "check boxes_clipped on cct_export failed (1 problems) (warning)" in capsys.readouterr().out
    md = json.loads((fresh_home / "artifacts" / "md_detections" / "overhang" / "md_detections.json").read_text())
    box = next(d["bbox"] for i in md["images"] if i["file"] == image["file_name"] for d in i["detections"])
    assert box[0] + box[2] <= 1.0
    strict = tmp_path / "strict.yaml"
    strict.write_text("ops:\n  cct_export:\n    config:\n      bbox_overhang_tolerance: 0.01\n")
    assert main(["materialize", "overhang", "--run-config", str(strict)]) == 2
    assert one_error_line(capsys, "materialize").endswith("check bboxes on cct_export failed (1 problems)")
    strict.write_text("ops: {cct_export: {config: {no_such_option: 1}}}")
    assert main(["materialize", "overhang", "--run-config", str(strict)]) == 2
    assert "invalid run config" in one_error_line(capsys, "materialize")


@pytest.mark.slow
def test_first_commands_started_together_leave_a_working_home(tmp_path, sample_dir, monkeypatch, capsys):
    """Two `animl register … --no-run` at once on a fresh home used to leave two alembic heads (1 in 3)."""
    animl = str(Path(sys.executable).with_name("animl"))
    for trial in range(3):
        env = {**os.environ, "ANIML_HOME": str(tmp_path / f"home{trial}"), "DAGSTER_HOME": ""}
        processes = [subprocess.Popen([animl, "register", str(sample_dir / "sample_export.json"), "--no-run",
                                       "--name", f"p{i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for i in range(3)]
        results = [(process.wait(timeout=600), process.stderr.read()) for process in processes]
        assert [code for code, _ in results] == [0, 0, 0], results
        with monkeypatch.context() as patch:  # the next command, in this process: the home it finds
            patch.setenv("ANIML_HOME", env["ANIML_HOME"])
            patch.setenv("DAGSTER_HOME", "")
            code = main(["register", str(sample_dir / "sample_export.json"), "--no-run", "--name", "p3"])
        stderr = capsys.readouterr().err
        assert code == 0 and "more than one head" not in stderr, stderr
        instance = dg.DagsterInstance.from_config(str(tmp_path / f"home{trial}" / "dagster"))
        assert sorted(instance.get_dynamic_partitions("exports")) == ["p0", "p1", "p2", "p3"]


def test_the_mlflow_ui_opens_the_store_and_artifact_root_the_assets_use(fresh_home, monkeypatch, capsys):
    from animl_assets.cli import services as cli

    commands = []
    monkeypatch.setattr(cli.subprocess, "call", lambda command: commands.append(command) or 0)
    assert main(["mlflow-ui", "--port", "5001"]) == 0
    monkeypatch.setenv("ANIML_MLFLOW_ARTIFACTS_URI", "s3://bucket/mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://animl:pg-secret@db:5432/mlflow")
    assert main(["mlflow-ui"]) == 0
    assert "pg-secret" not in capsys.readouterr().out  # the announcement names the store without its password
    embedded, configured = commands
    assert embedded[embedded.index("--backend-store-uri") + 1] == f"sqlite:///{fresh_home / 'mlflow.db'}"
    assert embedded[embedded.index("--default-artifact-root") + 1] == (fresh_home / "mlartifacts").as_uri()
    assert embedded[-2:] == ["--port", "5001"]
    assert configured[configured.index("--default-artifact-root") + 1] == "s3://bucket/mlflow"
