"""The empty-or-not model through the Definitions: whole frames labelled from the export, trained, evaluated,
registered under its own name and gated, then scoring a new export's images before any detection or crop."""

import json

import dagster as dg
import pandas as pd
import pytest
from PIL import Image

from animl_assets.assets.families import EMPTY_MODEL
from animl_assets.core.dataset.empty import EMPTY, NOT_EMPTY, frame_labels
from animl_assets.core.ingest.sample import write_sample_export
from animl_assets.core.layout import partition_folder
from animl_assets.core.registry import registry, tracking
from animl_assets.definitions import EMPTY_FRAMES_JOB, EMPTY_SCORE_JOB, EMPTY_TRAIN_JOB, INGEST_JOB
from animl_assets.settings import Settings
from animl_assets_tests.conftest import REPO, add_export, latest_version, run_job as _run
from animl_assets_tests.test_registry_assets import FAST_EVAL, SMALL, _client, _materialized

pytestmark = pytest.mark.slow
IMAGES = [dg.AssetKey("cct_export"), dg.AssetKey("images")]  # no detector, no crops


def _export(settings, dagster_home, root, folder, **sample):
    write_sample_export(root / folder, **sample)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        partition = add_export(settings, instance, root / folder, folder=folder)
    _run(settings, dagster_home, INGEST_JOB, partition, selection=IMAGES)
    return partition


@pytest.fixture(scope="module")
def empty_home(tmp_path_factory):
    """A home whose sample export (three empty frames per location) has whole frames and an empty-or-not champion."""
    root = tmp_path_factory.mktemp("empty")
    settings = Settings.from_env({"ANIML_HOME": str(root / "animl")})
    dagster_home = root / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_bytes((REPO / "dagster.yaml").read_bytes())
    partition = _export(settings, dagster_home, root, "sample", empties_per_location=3)
    frames = _run(settings, dagster_home, EMPTY_FRAMES_JOB, partition)
    train = _run(settings, dagster_home, EMPTY_TRAIN_JOB, empty_checkpoint=SMALL | {"epochs": 3, "finetune": 1},
                 empty_evaluation=FAST_EVAL)
    return settings, dagster_home, root, partition, frames, train


def test_frames_are_whole_upright_images_labelled_from_the_export_and_bad_files_are_reported(empty_home):
    settings, dagster_home, root, partition, frames, _ = empty_home
    meta = _materialized(frames, "empty_frames")
    manifest = pd.read_csv(next((settings.home / "artifacts" / "empty_frames").rglob("manifest.csv")),
                           dtype=str, keep_default_na=False).set_index("file")
    assert meta["num_empty"] == 30 and meta["num_not_empty"] > 80 and meta["num_failed"] >= 1
    assert manifest.loc["ridge/empty_002.jpg", "label"] == EMPTY and manifest.loc["ridge/fox_000.jpg", "label"] == NOT_EMPTY
    assert manifest.loc["broken/truncated.jpg", "status"] == "failed"  # reported, not a failed run
    folder = settings.home / "artifacts" / "empty_frames" / partition_folder(partition)
    with Image.open(folder / manifest.loc["odd/exif_rotated.jpg", "frame"]) as rotated, \
            Image.open(folder / manifest.loc["odd/cmyk.jpg", "frame"]) as cmyk:
        assert rotated.size == (256, 256) and cmyk.mode == "RGB"


def test_labels_follow_animl_empties_reviewed_boxes_and_leave_unannotated_images_out():
    export = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in "abcdef"],
              "categories": [{"id": 0, "name": "empty"}, {"id": 1, "name": "fox"}, {"id": 2, "name": "person"}],
              "annotations": [{"image_id": "a", "category_id": 0, "bbox": [0, 0, 10, 10]},
                              {"image_id": "b", "category_id": 1, "bbox": [1, 1, 2, 2]},
                              {"image_id": "c", "category_id": 2, "bbox": [1, 1, 2, 2]},
                              {"image_id": "d", "category_id": 1, "validated": False},
                              {"image_id": "e", "category_id": 0}, {"image_id": "e", "category_id": 1}]}
    labels = frame_labels(export).set_index("file")["label"].to_dict()
    assert labels == {"a.jpg": EMPTY, "b.jpg": NOT_EMPTY, "c.jpg": NOT_EMPTY, "d.jpg": "", "e.jpg": NOT_EMPTY,
                      "f.jpg": ""}
    assert frame_labels(export, reviewed_only=False).set_index("file").loc["d.jpg", "label"] == NOT_EMPTY


def test_the_model_trains_on_frames_and_is_registered_and_gated_under_its_own_name(empty_home):
    settings, dagster_home, _, _, _, train = empty_home
    evaluation = _materialized(train, "empty_evaluation")
    assert evaluation["test_auroc"] >= 0.9 and evaluation["num_test_crops"] > 0
    registered = _materialized(train, "registered_empty_model")
    assert registered["model_name"] == EMPTY_MODEL and registered["model_version"] == 1
    assert _materialized(train, "empty_champion")["champion_version"] == 1
    client = _client(settings)
    champion = registry.resolve(client, EMPTY_MODEL, registry.CHAMPION)
    files = registry.model_files(tracking.embedded_tracking_uri(settings.home), champion)
    assert files.label_index == {"0": EMPTY, "1": NOT_EMPTY} and files.params["dataset_asset"] == "empty_dataset"
    with pytest.raises(ValueError):  # the species classifier's registry is untouched
        registry.resolve(client, registry.DEFAULT_MODEL, registry.CHAMPION)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        splits = json.loads((latest_version(settings, instance, "empty_splits") / "empty_splits.json").read_text())
    assert {len(splits[s]) > 0 for s in ("train", "val", "test")} == {True}
    [check] = [c for c in train.get_asset_check_evaluations() if c.asset_key == dg.AssetKey("registered_empty_model")]
    assert check.check_name == "beats_champion" and check.passed


def test_a_new_export_is_scored_before_detection_and_its_empties_ranked_first(empty_home):
    settings, dagster_home, root, *_ = empty_home
    new = _export(settings, dagster_home, root, "new", seed=5, empties_per_location=2)
    result = _run(settings, dagster_home, EMPTY_SCORE_JOB, new, empty_scores={"num_workers": 0, "set_aside": 0.5})
    meta = _materialized(result, "empty_scores")
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert instance.get_latest_materialization_event(dg.AssetKey("md_detections")) is None  # no detector ran
        scores = pd.read_csv(next((settings.home / "artifacts" / "empty_scores").rglob("empty_scores.csv")),
                             dtype={"export_label": str}, keep_default_na=False)
    assert list(scores.columns) == ["file", "p_empty", "set_aside", "rank", "export_label"]
    assert scores["p_empty"].is_monotonic_decreasing and list(scores["rank"]) == list(range(1, len(scores) + 1))
    assert meta["auroc_against_export_labels"] >= 0.9
    top = scores.head(20)  # the export's 20 empties
    assert (top["export_label"] == EMPTY).mean() >= 0.8
    set_aside = scores[scores["set_aside"]]
    assert meta["num_set_aside"] == len(set_aside) > 0 and (set_aside["export_label"] == EMPTY).mean() >= 0.8


def test_an_animl_export_gives_its_empties_and_its_reviewed_boxes(tmp_path):
    from animl_assets.core.ingest.sample_animl import write_animl_export

    export = json.loads(write_animl_export(tmp_path).path.read_text())
    labels = frame_labels(export)
    names = {c["id"]: c["name"] for c in export["categories"]}
    by_image: dict = {}
    for ann in export["annotations"]:
        if ann.get("validated") is not False:
            by_image.setdefault(ann["image_id"], set()).add(names[ann["category_id"]])
    files = {image["id"]: image["file_name"] for image in export["images"]}
    expected = {files[i]: NOT_EMPTY if found - {"empty"} else EMPTY for i, found in by_image.items()}
    got = labels[labels["label"] != ""].set_index("file")["label"].to_dict()
    assert got == expected and EMPTY in got.values() and NOT_EMPTY in got.values()
    assert len(labels) == len(export["images"])  # images with no reviewed label stay, unlabelled


def test_the_commands_refuse_what_they_cannot_do_in_one_line(tmp_path, monkeypatch, capsys):
    from animl_assets.cli import main

    monkeypatch.setenv("ANIML_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", "")
    for command, expected in ((["train-empty"], "no exports registered yet"),
                              (["score-empties", "nope"], "unknown partition 'nope'")):
        assert main(command) == 2
        stderr = capsys.readouterr().err
        assert expected in stderr and len(stderr.strip().splitlines()) == 1, stderr
