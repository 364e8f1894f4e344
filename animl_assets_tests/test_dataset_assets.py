"""classification_dataset and splits materialized through the Definitions after the per-export job."""

import csv
import json
import logging
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from animl_assets.core.layout import partition_folder
from animl_assets.definitions import DATASET_JOB, build_definitions
from animl_assets_tests.conftest import add_export, latest_version, run_ingest, table_rows
from animl_assets_tests.test_ingest_assets import materialization


def run_dataset(settings, instance, run_config=None):
    return build_definitions(settings).resolve_job_def(DATASET_JOB).execute_in_process(
        instance=instance, run_config=run_config or {}, raise_on_error=False)


def config(dataset=None, splits=None):
    ops = {}
    if dataset:
        ops["classification_dataset"] = {"config": dataset}
    if splits:
        ops["splits"] = {"config": splits}
    return {"ops": ops}


@pytest.fixture()
def ingested(settings, instance, sample_dir):
    partition = add_export(settings, instance, sample_dir)
    assert run_ingest(settings, instance, partition).success
    return partition


def test_dataset_and_splits_from_the_sample_export(settings, instance, ingested, sample_counts):
    result = run_dataset(settings, instance)
    assert result.success
    root = Path(settings.storage_uri)
    ds = pd.read_csv(latest_version(settings, instance, "classification_dataset") / "classification_ds.csv", keep_default_na=False)
    assert list(ds.columns) == ["path", "dataset", "location", "dataset_class", "confidence", "label"]
    assert len(ds) == sample_counts["crops"] and set(ds["dataset"]) == {ingested}
    assert set(ds["label"]) == {"deer", "fox", "raccoon", "turkey"}  # "empty" left out by default
    assert (ds["confidence"] == 1.0).all()
    for path in ds["path"]:
        assert (root / "crops" / path).is_file()
    index = json.loads((latest_version(settings, instance, "classification_dataset") / "label_index.json").read_text())
    assert index == {"0": "deer", "1": "fox", "2": "raccoon", "3": "turkey"}
    meta = materialization(result, "classification_dataset")
    assert meta["num_locations"] == sample_counts["locations"] and "data:image/jpeg;base64," in meta["sample_grid"]

    splits = json.loads((latest_version(settings, instance, "splits") / "splits.json").read_text())
    assert set(splits) == {"train", "val", "test"} and all(splits.values())
    placed = [tuple(loc) for name in splits for loc in splits[name]]
    assert len(placed) == len(set(placed)) == sample_counts["locations"]
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"enough_labels_to_train": True, "no_location_leakage": True, "every_label_in_every_split": True}
    split_meta = materialization(result, "splits")
    deer = [row for row in table_rows(split_meta["crops_per_label_and_split"]) if row["label"] == "deer"]
    assert len(deer) == 1 and all(deer[0][split] > 0 for split in ("train", "val", "test"))


def test_csv_label_spec_groups_classes(settings, instance, ingested, tmp_path):
    spec = tmp_path / "spec.csv"
    spec.write_text(f"output_label,type,content\nmammal,row,{ingested}|deer\nmammal,row,{ingested}|fox\n"
                    f"mammal,row,{ingested}|raccoon\nbird,row,{ingested}|turkey\nmammal,max_count,30\n")
    result = run_dataset(settings, instance, config({"label_spec": str(spec), "seed": 3},
                                                    {"method": "smallest_first"}))
    assert result.success
    ds = pd.read_csv(latest_version(settings, instance, "classification_dataset") / "classification_ds.csv")
    assert set(ds["label"]) == {"mammal", "bird"} and (ds["label"] == "mammal").sum() == 30
    meta = materialization(result, "classification_dataset")
    assert meta["left_out"] == {"over max_count": meta["sampled"]["mammal"]["before"] - 30}


def test_bad_label_spec_fails_with_the_reason(settings, instance, ingested, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"deer": {"dataset_labels": {ingested: ["deer", "moose"]}}}))
    result = run_dataset(settings, instance, config({"label_spec": str(spec)}))
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert f"class 'moose' of dataset '{ingested}' is not in the data" in failure.event_specific_data.error.message


def test_labels_that_cannot_reach_every_split_fail_the_blocking_check(settings, instance, ingested):
    result = run_dataset(settings, instance, config(splits={"val_frac": 0.02, "test_frac": 0.02, "trials": 50}))
    check = next(e for e in result.get_asset_check_evaluations() if e.check_name == "every_label_in_every_split")
    assert not check.passed
    reasons = check.metadata["labels_that_cannot_be_placed"].value
    assert set(reasons) == {"deer", "fox", "raccoon", "turkey"}
    for reason in reasons.values():  # 2% of 10 locations rounds to none; test keeps what train leaves
        assert reason.startswith("missing from val") and "got no location at all (too few locations" in reason


def test_match_test_keeps_the_earlier_test_split(settings, instance, ingested, tmp_path):
    assert run_dataset(settings, instance).success
    earlier_csv, earlier_splits = tmp_path / "earlier.csv", tmp_path / "earlier_splits.json"
    earlier_csv.write_bytes((latest_version(settings, instance, "classification_dataset") / "classification_ds.csv").read_bytes())
    earlier_splits.write_bytes((latest_version(settings, instance, "splits") / "splits.json").read_bytes())
    earlier_test = json.loads(earlier_splits.read_text())["test"]
    result = run_dataset(settings, instance, config(
        {"match_test_csv": str(earlier_csv), "match_test_splits": str(earlier_splits)}, {"seed": 5}))
    assert result.success
    assert json.loads((latest_version(settings, instance, "splits") / "splits.json").read_text())["test"] == sorted(earlier_test)
    assert materialization(result, "classification_dataset")["match_test_locations"] == len(earlier_test)


def test_dataset_needs_crops_first(settings, instance):
    instance.add_dynamic_partitions("exports", ["never_ingested"])
    result = run_dataset(settings, instance)
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "materialize crops first" in failure.event_specific_data.error.message


def test_location_strings_survive_the_whole_chain(settings, instance, sample_dir, tmp_path):
    """Locations that CSV readers turn into numbers, NaN or booleans come back exactly as the export spells them."""
    tricky = ["001", "1", "1e3", "01", "0", "1.0", "-0", "+1", "1E3", "0.10"]  # all numbers to a CSV reader
    source = tmp_path / "tricky"
    shutil.copytree(sample_dir, source)
    cct = json.loads((source / "sample_export.json").read_text())
    rename = dict(zip(sorted({image["location"] for image in cct["images"]}), tricky))
    for image in cct["images"]:
        image["location"] = rename[image["location"]]
    (source / "sample_export.json").write_text(json.dumps(cct))
    partition = add_export(settings, instance, source)
    assert run_ingest(settings, instance, partition).success
    job = build_definitions(settings).resolve_job_def(DATASET_JOB)
    assert job.execute_in_process(instance=instance).success
    with (latest_version(settings, instance, "classification_dataset") / "classification_ds.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["location"] for row in rows} == set(tricky)
    splits = json.loads((latest_version(settings, instance, "splits") / "splits.json").read_text())
    placed = [tuple(pair) for split in splits.values() for pair in split]
    assert sorted(placed) == sorted({(row["dataset"], row["location"]) for row in rows})
    assert {location for _, location in placed} == set(tricky)


def _failure(result) -> str:
    return " ".join(e.step_failure_data.error.message for e in result.get_step_failure_events())


def test_corrections_name_their_export_and_never_invent_labels(settings, instance, sample_dir, tmp_path):
    # two exports of the same cameras: every file name is in both
    first, second = (add_export(settings, instance, sample_dir, folder) for folder in ("north", "south"))
    assert run_ingest(settings, instance, first).success and run_ingest(settings, instance, second).success
    bare = tmp_path / "bare.csv"
    bare.write_text("file,correct_label\nridge/deer_000.jpg,fox\n")
    refused = run_dataset(settings, instance, config({"corrections": str(bare)}))
    assert not refused.success and "matches images of 2 exports" in _failure(refused)
    assert instance.get_latest_materialization_event(dg.AssetKey("classification_dataset")) is None

    named = tmp_path / "named.csv"
    named.write_text(f"dataset,file,correct_label\n{second},ridge/deer_000.jpg, Fox\n"
                     + "".join(f"{second},nowhere/{i}.jpg,fox\n" for i in range(5000)))
    timelapse = tmp_path / "timelapse.csv"  # Timelapse's file for the first export's folder
    timelapse.write_text("File,RelativePath,mislabeled,correct_class\ndeer_001.jpg,ridge,true,raccoon\n")
    result = run_dataset(settings, instance, config({"corrections": str(named),
                                                     "export_corrections": {first: str(timelapse)}}))
    assert result.success, _failure(result)
    ds = pd.read_csv(latest_version(settings, instance, "classification_dataset") / "classification_ds.csv")
    labels = dict(zip(ds["path"].str.split("___").str[0], ds["label"]))
    north, south = (next(p for p in labels if p.startswith(f"{name}") and p.endswith("ridge/deer_000.jpg"))
                    for name in ("north", "south"))
    assert labels[north] == "deer" and labels[south] == "fox"  # ' Fox' read as the dataset's 'fox'
    assert labels[next(p for p in labels if p.startswith("north") and p.endswith("ridge/deer_001.jpg"))] == "raccoon"
    assert labels[next(p for p in labels if p.startswith("south") and p.endswith("ridge/deer_001.jpg"))] == "deer"
    meta = materialization(result, "classification_dataset")
    summary = meta["corrections"]
    assert summary["num_unmatched"] == 5000 and len(summary["unmatched_first"]) == 20
    assert len(json.dumps(summary)) < 10_000  # the event log holds a summary; the artifact holds every row
    unmatched = pd.read_csv(latest_version(settings, instance, "classification_dataset") / "corrections_unmatched.csv")
    assert len(unmatched) == 5000

    typo = tmp_path / "typo.csv"
    typo.write_text(f"dataset,file,correct_label\n{second},ridge/deer_000.jpg,dear\n")
    refused = run_dataset(settings, instance, config({"corrections": str(typo)}))
    assert not refused.success and "'dear' (did you mean 'deer'?)" in _failure(refused)
    allowed = run_dataset(settings, instance, config({"corrections": str(typo), "allow_new_labels": True,
                                                      "min_crops_per_label": 1}))
    assert "dear" in pd.read_csv(latest_version(settings, instance, "classification_dataset") /
                                 "classification_ds.csv")["label"].tolist(), _failure(allowed)


def test_a_label_with_a_comma_is_refused_when_the_dataset_is_built(settings, instance, ingested, tmp_path):
    spec = tmp_path / "spec.json"  # classification_ds.csv joins a crop's labels with commas: "a,b" reads as two
    spec.write_text(json.dumps({"deer,fox": {"dataset_labels": {ingested: ["deer", "fox"]}},
                                "turkey": {"dataset_labels": {ingested: ["turkey"]}}}))
    result = run_dataset(settings, instance, config({"label_spec": str(spec)}))
    assert not result.success and "labels with a comma cannot be written" in _failure(result)
    assert "'deer,fox'" in _failure(result)
    assert instance.get_latest_materialization_event(dg.AssetKey("classification_dataset")) is None


def test_only_reviewed_boxes_are_ground_truth_unless_asked_and_no_reviewer_is_kept(settings, instance, sample_dir,
                                                                                  tmp_path):
    """Animl's "include non-reviewed objects": a model's guesses (validated: false) beside reviewed labels, each
    reviewed one naming its reviewer (validated_by, often an e-mail address)."""
    source = tmp_path / "with_guesses"
    shutil.copytree(sample_dir, source)
    cct = json.loads((source / "sample_export.json").read_text())
    files = {image["id"]: image["file_name"] for image in cct["images"]}
    fox = next(c["id"] for c in cct["categories"] if c["name"] == "fox")
    guesses = [a for a in cct["annotations"] if a["category_id"] == fox and not files[a["image_id"]].startswith(
        "broken/")][:3]
    for ann in cct["annotations"]:
        ann |= {"validated": True, "validated_by": "ranger@example.org"}
    for ann in guesses:
        ann |= {"validated": False, "validated_by": "Not Reviewed"}
    (source / "sample_export.json").write_text(json.dumps(cct))
    partition = add_export(settings, instance, source)
    assert run_ingest(settings, instance, partition).success

    everything = run_dataset(settings, instance, config({"ground_truth": "all"}))
    assert everything.success and materialization(everything, "classification_dataset")["num_unreviewed_left_out"] == 0
    all_rows = pd.read_csv(latest_version(settings, instance, "classification_dataset") / "classification_ds.csv")
    reviewed = run_dataset(settings, instance)  # the default
    meta = materialization(reviewed, "classification_dataset")
    assert meta["num_unreviewed_left_out"] == 3 and meta["unreviewed_left_out"] == {partition: {"fox": 3}}
    rows = pd.read_csv(latest_version(settings, instance, "classification_dataset") / "classification_ds.csv")
    guessed = {files[a["image_id"]] for a in guesses}
    left_out = set(all_rows["path"]) - set(rows["path"])
    assert len(all_rows) - len(rows) == len(left_out) == 3
    assert all(path.split("/", 1)[1].startswith(tuple(guessed)) for path in left_out)
    # the reviewer's address reached no artifact and no event
    stored = [p.read_bytes() for p in Path(settings.storage_uri).rglob("*") if p.is_file()]
    assert not any(b"ranger@example.org" in data for data in stored)
    events = "\n".join(str(e) for run in instance.get_runs() for e in instance.all_logs(run.run_id))
    assert "ranger@example.org" not in events


def test_categories_match_by_name_across_exports_and_case_variants_merge_with_a_warning(settings, instance,
                                                                                       ingested, sample_dir, tmp_path):
    """Animl numbers categories by their place in today's label list: ids shift between exports of a project,
    and users type names freely (``Fox``, `` raccoon``)."""
    alone = run_dataset(settings, instance, config({"exports": [ingested]}))
    assert alone.success and materialization(alone, "classification_dataset")["merged_class_names"] == {}
    one_index = json.loads((latest_version(settings, instance, "classification_dataset") / "label_index.json")
                           .read_text())
    source = tmp_path / "later"
    shutil.copytree(sample_dir, source)
    cct = json.loads((source / "sample_export.json").read_text())
    shifted = {c["id"]: (c["id"] + 3) % len(cct["categories"]) for c in cct["categories"]}  # every id moves
    renamed = {"fox": "Fox", "raccoon": " raccoon"}
    cct["categories"] = [{"id": shifted[c["id"]], "name": renamed.get(c["name"], c["name"])} for c in cct["categories"]]
    for ann in cct["annotations"]:
        ann["category_id"] = shifted[ann["category_id"]]
    (source / "sample_export.json").write_text(json.dumps(cct))
    assert run_ingest(settings, instance, add_export(settings, instance, source, folder="later")).success

    both = run_dataset(settings, instance)
    assert both.success
    meta = materialization(both, "classification_dataset")
    assert meta["num_datasets"] == 2
    assert meta["merged_class_names"] == {"fox": ["Fox", "fox"], "raccoon": [" raccoon", "raccoon"]}
    index = json.loads((latest_version(settings, instance, "classification_dataset") / "label_index.json").read_text())
    assert index == one_index  # one label per species, whatever its id or spelling in each export
    warnings = [e.message for e in instance.all_logs(both.run_id) if e.level == logging.WARNING]
    assert any("differ only in case or spacing" in message and "'Fox'" in message for message in warnings)


def test_an_image_with_a_box_of_each_of_two_species_gives_a_crop_of_each(settings, instance, sample_dir, tmp_path):
    source = tmp_path / "two_species"
    shutil.copytree(sample_dir, source)
    cct = json.loads((source / "sample_export.json").read_text())
    names = {c["name"]: c["id"] for c in cct["categories"]}
    images = {image["id"]: image for image in cct["images"]}
    deer = next(a for a in cct["annotations"] if a["category_id"] == names["deer"] and a.get("bbox")
                and not images[a["image_id"]]["file_name"].startswith("broken/")
                and sum(b["image_id"] == a["image_id"] for b in cct["annotations"]) == 1)
    image = images[deer["image_id"]]
    cct["annotations"].append({"id": "fox-beside", "image_id": image["id"], "category_id": names["fox"],
                               "bbox": [image["width"] - 120, image["height"] - 100, 100, 80]})
    (source / "sample_export.json").write_text(json.dumps(cct))
    partition = add_export(settings, instance, source)
    assert run_ingest(settings, instance, partition).success
    result = run_dataset(settings, instance)
    assert result.success
    assert table_rows(materialization(result, "classification_dataset")["conflicting_images"]) == []
    rows = pd.read_csv(latest_version(settings, instance, "classification_dataset") / "classification_ds.csv")
    mine = rows[rows["path"].str.startswith(f"{partition_folder(partition)}/{image['file_name']}___")]
    assert sorted(mine["label"]) == ["deer", "fox"]
