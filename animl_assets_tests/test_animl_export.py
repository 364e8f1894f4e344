"""An export written the way the Animl web app writes one (``animl sample-export --format animl``), through the
Definitions: found by serving_bucket_key with no config, a null box set aside, no empty cropped, only reviewed
boxes as ground truth, per-box labels, names merged across case, bursts rebuilt from camera and time."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from animl_assets.cli import main
from animl_assets.core.ingest.exports import partition_key_for
from animl_assets.core.ingest.sample_animl import (
    ANIML_EXPORT_NAME,
    ARCHIVE,
    LATE_DEPLOYMENT,
    REVIEWER,
    write_animl_export,
)
from animl_assets.core.review.sequences import sequence_ids
from animl_assets.definitions import DATASET_JOB, build_definitions
from animl_assets.settings import Settings
from animl_assets_tests.conftest import REPO, run_ingest
from animl_assets_tests.test_definitions_and_cli import one_error_line
from animl_assets_tests.test_ingest_assets import materialization

ANIMAL_CATEGORIES = {"animal", "unknown", "person", "vehicle"}


class AnimlHome:
    """One Dagster instance and home holding the sample Animl export, ingested."""

    def __init__(self, root: Path) -> None:
        self.source = root / "download"
        write_animl_export(self.source)
        self.export = json.loads((self.source / ANIML_EXPORT_NAME).read_text())
        self.settings = Settings.from_env({"ANIML_HOME": str(root / "home")})
        (root / "dagster").mkdir()
        shutil.copyfile(REPO / "dagster.yaml", root / "dagster" / "dagster.yaml")
        self.instance = dg.DagsterInstance.from_config(str(root / "dagster"))
        self.partition = self.add(self.export, "project")
        self.ingest = run_ingest(self.settings, self.instance, self.partition, self.images_config())

    def add(self, export: dict, folder: str) -> str:
        """Put ``export`` in the exports location (the images stay in the download's archive); register it."""
        target = Path(self.settings.exports_uri) / folder / ANIML_EXPORT_NAME
        target.parent.mkdir(parents=True)
        target.write_text(json.dumps(export))
        partition = partition_key_for(f"{folder}/{ANIML_EXPORT_NAME}")
        self.instance.add_dynamic_partitions("exports", [partition])
        return partition

    def images_config(self) -> dict:
        return {"ops": {"images": {"config": {"images_root": str(self.source / ARCHIVE)}}}}

    def dataset(self, exports: list[str], **dataset_config):
        config = {"exports": exports, **dataset_config}
        return build_definitions(self.settings).resolve_job_def(DATASET_JOB).execute_in_process(
            instance=self.instance, raise_on_error=False,
            run_config={"ops": {"classification_dataset": {"config": config}}})


@pytest.fixture(scope="module")
def animl(tmp_path_factory) -> AnimlHome:
    home = AnimlHome(tmp_path_factory.mktemp("animl_export"))
    yield home
    home.instance.dispose()


@pytest.fixture(scope="module")
def reviewed(animl):
    """The default dataset and splits (ground_truth: reviewed) over the one export."""
    result = animl.dataset([animl.partition])
    assert result.success
    return result


def categories(export: dict) -> dict[int, str]:
    return {c["id"]: c["name"] for c in export["categories"]}


def boxes_of(export: dict, *, reviewed: bool | None = None) -> list[dict]:
    """The export's annotations of animals with a usable box (not empty, not null)."""
    names = categories(export)
    return [a for a in export["annotations"] if names[a["category_id"]] != "empty" and None not in a["bbox"]
            and (reviewed is None or a["validated"] is reviewed)]


def test_the_export_is_written_as_animl_writes_one(animl):
    export = animl.export
    assert list(export) == ["images", "annotations", "categories", "info"]
    assert export["categories"][0] == {"id": 0, "name": "empty"}
    assert all(":" in image["id"] and image["serving_bucket_key"].startswith("original/") for image in export["images"])
    assert not any("seq_id" in image for image in export["images"])
    offsets = {image["datetime"][-6:] for image in export["images"] if image["datetime"]}
    assert {"-07:00", "-08:00"} <= offsets and any(o.endswith("Z") for o in offsets)
    assert any(a["bbox"] == [None] * 4 for a in export["annotations"])
    assert {a["validated"] for a in export["annotations"]} == {True, False}
    again = write_animl_export(animl.source.parent / "again")
    assert again.path.read_bytes() == (animl.source / ANIML_EXPORT_NAME).read_bytes()  # deterministic


def test_an_animl_export_ingests_with_no_config_beyond_where_its_archive_is(animl):
    result = animl.ingest
    assert result.success
    export_meta = materialization(result, "cct_export")
    assert export_meta["profile"] == "animl"
    assert export_meta["annotations_set_aside"] == {"null box (the image had no size when it was exported)": 1}
    images = materialization(result, "images")
    assert images["source_key_field"] == "serving_bucket_key"
    assert images["num_present"] == len(animl.export["images"]) and images["num_nonexistent"] == 0
    assert images["mirrored"] is False and materialization(result, "crops")["num_failed_images"] == 0


def test_no_empty_is_a_detection_or_a_crop(animl):
    names = categories(animl.export)
    empty_images = {a["image_id"] for a in animl.export["annotations"] if names[a["category_id"]] == "empty"}
    files = {image["id"]: image["file_name"] for image in animl.export["images"]}
    md = animl.ingest.output_for_node("md_detections").md
    detections = {image["file"]: image["detections"] for image in md["images"]}
    assert empty_images and all(detections[files[i]] == [] for i in empty_images)
    assert materialization(animl.ingest, "md_detections")["num_empty_images"] == len(empty_images)
    crops = animl.ingest.output_for_node("crops").manifest
    assert len(crops) == len(boxes_of(animl.export))  # every animal box, nothing for an empty
    assert not set(crops["file"]) & {files[i] for i in empty_images}


def test_only_reviewed_boxes_are_ground_truth_unless_asked(animl, reviewed):
    ds = reviewed.output_for_node("classification_dataset").classification_ds
    assert len(ds) == len(boxes_of(animl.export, reviewed=True))
    names = categories(animl.export)
    guesses = Counter(names[a["category_id"]] for a in boxes_of(animl.export, reviewed=False))
    meta = materialization(reviewed, "classification_dataset")
    assert meta["unreviewed_left_out"] == {animl.partition: dict(guesses)}
    assert "animal" not in set(ds["label"])
    everything = animl.dataset([animl.partition], ground_truth="all", excluded_classes=[])
    assert everything.success
    all_ds = everything.output_for_node("classification_dataset").classification_ds
    assert len(all_ds) == len(boxes_of(animl.export))
    assert Counter(all_ds["dataset_class"])["fox"] == Counter(ds["dataset_class"])["fox"] + guesses["fox"]


def test_a_two_species_image_gives_a_crop_of_each(animl, reviewed):
    names = categories(animl.export)
    per_image = {}
    for a in boxes_of(animl.export, reviewed=True):
        per_image.setdefault(a["image_id"], set()).add(names[a["category_id"]])
    mixed = [image for image, labels in per_image.items() if len(labels) > 1]
    assert len(mixed) == 2
    files = {image["id"]: image["file_name"] for image in animl.export["images"]}
    ds = reviewed.output_for_node("classification_dataset").classification_ds
    for image in mixed:
        crops = ds[ds["path"].str.contains(files[image], regex=False)]
        assert sorted(crops["label"]) == sorted(per_image[image])
    assert materialization(reviewed, "classification_dataset")["num_crops"] == len(ds)


def test_case_variants_are_one_label_with_a_warning(animl, reviewed):
    dataset = reviewed.output_for_node("classification_dataset")
    assert materialization(reviewed, "classification_dataset")["merged_class_names"] == {
        "mule_deer": ["Mule Deer", "mule deer"]}
    assert sorted(dataset.label_index.values()) == ["fox", "mule_deer", "raccoon", "wild_turkey"]
    warnings = [e.user_message for e in animl.instance.all_logs(reviewed.run_id)
                if e.level >= 30 and e.step_key == "classification_dataset"]
    assert any("Mule Deer" in line and "mule deer" in line for line in warnings)


def test_free_text_locations_and_bursts_reach_splits_json(animl, reviewed):
    splits = reviewed.output_for_node("splits")
    placed = {tuple(pair): name for name, pairs in splits.items() for pair in pairs}
    assert (animl.partition, "Fraser's Point") in placed  # the apostrophe kept, as Animl wrote it
    # the late deployment's first burst lies under two locations: they are linked and share a split
    late = (animl.partition, f"{LATE_DEPLOYMENT}-default")
    linked = materialization(reviewed, "splits")["linked_locations"]
    assert linked == [[[animl.partition, "Dry Lake"], list(late)]]
    assert placed[late] == placed[(animl.partition, "Dry Lake")]
    stored = list(Path(animl.settings.storage_uri, "splits").rglob("splits.json"))
    assert any([animl.partition, "Fraser's Point"] in sum(json.loads(p.read_text()).values(), []) for p in stored)


def test_sequences_are_rebuilt_from_camera_and_time(animl):
    ids = sequence_ids(animl.export["images"])
    by_sequence = Counter(ids.values())
    # a burst across the end of daylight saving (01:59:59 -07:00, then 01:00:00.500 -08:00) is one sequence
    dst = [image["file_name"] for image in animl.export["images"]
           if (image["datetime"] or "").startswith("2025-11-02T01:")]
    assert len(dst) == 3 and len({ids[f] for f in dst}) == 1
    # two cameras at one site, bursts of three: never mixed
    fraser = [image for image in animl.export["images"] if image["location"] == "Fraser's Point"]
    for file in (image["file_name"] for image in fraser):
        camera = file.split("/")[1]
        assert all(other.split("/")[1] == camera for other, seq in ids.items() if seq == ids[file])
    assert max(by_sequence.values()) == 3


def test_shuffled_category_ids_across_exports_give_one_label_index(animl, reviewed):
    """A second export of the same project: its label list changed, so every category id moved."""
    second = json.loads(json.dumps(animl.export))
    names = categories(second)
    new_ids = {old: new for old, new in zip(sorted(names), [0, *reversed(sorted(names)[1:])])}
    second["categories"] = sorted(({"id": new_ids[c["id"]], "name": c["name"]} for c in second["categories"]),
                                  key=lambda c: c["id"])
    for annotation in second["annotations"]:
        annotation["category_id"] = new_ids[annotation["category_id"]]
    partition = animl.add(second, "project_again")
    assert run_ingest(animl.settings, animl.instance, partition, animl.images_config()).success
    both = animl.dataset([animl.partition, partition])
    assert both.success
    dataset = both.output_for_node("classification_dataset")
    one = reviewed.output_for_node("classification_dataset")
    assert dataset.label_index == one.label_index
    per_label = dataset.classification_ds.groupby(["dataset", "label"]).size().unstack(0)
    assert (per_label[animl.partition] == per_label[partition]).all()


def test_the_reviewers_address_reaches_no_artifact_and_no_event(animl, reviewed):
    artifacts = [p for p in Path(animl.settings.storage_uri).rglob("*") if p.is_file()]
    assert artifacts and not [p for p in artifacts if REVIEWER.encode() in p.read_bytes()]
    events = [e for e in animl.instance.all_logs(animl.ingest.run_id) + animl.instance.all_logs(reviewed.run_id)]
    assert not [e for e in events if REVIEWER in str(e.dagster_event or "") + e.user_message]


def test_a_cut_off_animl_export_is_one_line(tmp_path, monkeypatch, capsys):
    """Animl's streaming writer (over 18,000 images) can end the file after an annotation's '}, '."""
    monkeypatch.setenv("ANIML_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    write_animl_export(tmp_path / "download")
    text = (tmp_path / "download" / ANIML_EXPORT_NAME).read_text()
    cut = tmp_path / "cut.json"
    cut.write_text(text[: text.index("\n  },", text.index('"annotations"')) + len("\n  },")])
    assert main(["register", str(cut), "--no-run"]) == 2
    line = one_error_line(capsys, "register")
    assert "ends early" in line and "export it again" in line


def walkthrough_commands() -> list[str]:
    """The README's "From an Animl export to a champion model" commands, comments dropped."""
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- animl-walkthrough")[1].split("<!-- /animl-walkthrough -->")[0]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("animl ")]


@pytest.mark.slow
def test_the_readme_walkthrough_goes_from_an_animl_export_to_a_champion(tmp_path):
    """The README's commands as a user types them, in a fresh home (a shorter training than the README's)."""
    (tmp_path / "train.yaml").write_text(json.dumps({"ops": {"classifier_checkpoint": {"config": {
        "model_name": "efficientnet-lite0", "pretrained": "lite0", "image_size": 64, "epochs": 2, "finetune": 2,
        "batch_size": 16, "num_workers": 0, "progress_every": 0}}}}))
    (tmp_path / "classify.yaml").write_text(json.dumps({"ops": {"classifications": {"config": {
        "sequences": True, "num_workers": 0}}}}))
    env = {**os.environ, "ANIML_HOME": str(tmp_path / "home"), "DAGSTER_HOME": ""}
    outputs = []
    for command in walkthrough_commands():
        args = command.replace("~/animl-demo", str(tmp_path / "animl-demo")).split()
        done = subprocess.run([str(Path(sys.executable).with_name("animl")), *args[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
    assert [c.split()[1] for c in walkthrough_commands()] == ["sample-export", "register", "build-dataset", "train",
                                                             "classify"]
    assert "export profile: animl" in outputs[1] and "registered partition 'animl_export'" in outputs[1]
    assert "is champion (was: none)" in outputs[3]
    export = json.loads((tmp_path / "animl-demo" / ANIML_EXPORT_NAME).read_text())
    [sequences] = (tmp_path / "home" / "artifacts" / "classifications").rglob("sequence_output.csv.gz")
    per_sequence = pd.read_csv(sequences)
    dst = [image["file_name"] for image in export["images"] if (image["datetime"] or "").startswith("2025-11-02T01:")]
    burst = per_sequence[per_sequence["sequence"] == sequence_ids(export["images"])[dst[0]]]
    assert burst["crops"].tolist() == [3]  # the burst across the end of daylight saving is one sequence
    assert per_sequence["crops"].sum() == len(boxes_of(export))
    # the reviewer's address is in the registered export only: not in artifacts, the event log or MLflow
    home = tmp_path / "home"
    written = [p for p in home.rglob("*") if p.is_file() and not p.is_relative_to(home / "exports")]
    assert {"mlflow.db", "export.json"} <= {p.name for p in written}
    assert [p for p in written if REVIEWER.encode() in p.read_bytes()] == []


def test_register_reads_an_animl_export_from_animl_images_uri_or_says_where_to_point(tmp_path, monkeypatch, capsys):
    """With ANIML_IMAGES_URI (Animl's serving bucket) set, register records no images root of its own, so the
    images are read there; with neither it nor --images-root, it says how to point at the bucket."""
    monkeypatch.setenv("ANIML_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    sample = write_animl_export(tmp_path / "download")
    monkeypatch.delenv("ANIML_IMAGES_URI", raising=False)
    assert main(["register", str(sample.path), "--name", "pointless", "--no-run"]) == 0
    out = capsys.readouterr().out
    assert f"images under: {tmp_path / 'download'}" in out and "ANIML_IMAGES_URI (e.g. s3://animl-images-serving-prod)" in out
    monkeypatch.setenv("ANIML_IMAGES_URI", str(tmp_path / "download" / ARCHIVE))
    assert main(["register", str(sample.path)]) == 0
    out = capsys.readouterr().out
    assert f"images under: {tmp_path / 'download' / ARCHIVE} (ANIML_IMAGES_URI)" in out and "give --images-root" not in out
    registered = json.loads((tmp_path / "home" / "exports" / ANIML_EXPORT_NAME).read_text())
    assert "animl_images_root" not in registered["info"]
    assert f"images: {sample.images} referenced, source {tmp_path / 'download' / ARCHIVE}" in out
    assert "'num_present': %d, 'num_nonexistent': 0" % sample.images in out
