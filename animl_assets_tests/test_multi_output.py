"""Panthera's multi-output models through the Definitions: a sample export whose annotations carry counts and
behaviour flags (some missing) trains one backbone with a head per output, is evaluated per head, registered and
gated on its species head, and classifies every head into the output files and the MD JSON."""

import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch

from animl_assets.automation import retraining_run_config
from animl_assets.core.artifact_files import read_checkpoint
from animl_assets.core.ingest.sample import write_sample_export
from animl_assets.core.layout import partition_folder
from animl_assets.core.ml.models import build_model
from animl_assets.core.registry import registry, tracking
from animl_assets.core.review.merge import crop_source
from animl_assets.definitions import CLASSIFY_JOB, DATASET_JOB, INGEST_JOB, TRAIN_JOB, build_definitions
from animl_assets.settings import Settings
from animl_assets_tests.conftest import REPO, add_export, latest_version, run_job as _run
from animl_assets_tests.test_registry_assets import FAST_EVAL, SMALL, _client, _materialized

pytestmark = pytest.mark.slow
OUTPUTS = ["species", "count", "standing", "resting", "moving", "eating", "interacting", "young_present"]
EXTRA = OUTPUTS[1:]


@pytest.fixture(scope="module")
def multi_home(tmp_path_factory):
    """A home with the behaviours sample export ingested, a multi-output dataset, and a champion trained on it."""
    root = tmp_path_factory.mktemp("multi")
    write_sample_export(root / "export", behaviours=True)
    settings = Settings.from_env({"ANIML_HOME": str(root / "animl")})
    dagster_home = root / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_bytes((REPO / "dagster.yaml").read_bytes())
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        partition = add_export(settings, instance, root / "export")
    _run(settings, dagster_home, INGEST_JOB, partition)
    dataset = _run(settings, dagster_home, DATASET_JOB, classification_dataset={"outputs": OUTPUTS})
    train = _run(settings, dagster_home, TRAIN_JOB, classifier_checkpoint=SMALL | {"epochs": 3, "finetune": 1,
                                                                                   "output_weights": {"count": 0.5}},
                 classifier_evaluation=FAST_EVAL)
    return settings, dagster_home, partition, dataset, train


def test_the_dataset_has_a_column_and_an_index_per_output_with_missing_values_left_missing(multi_home):
    settings, dagster_home, _, dataset, _ = multi_home
    meta = _materialized(dataset, "classification_dataset")
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        folder = latest_version(settings, instance, "classification_dataset")
    ds = pd.read_csv(folder / "classification_ds.csv", dtype=str, keep_default_na=False)
    assert list(ds.columns) == ["path", "dataset", "location", "dataset_class", "confidence", "label", *EXTRA]
    assert json.loads((folder / "label_index_count.json").read_text()) == {"0": "1", "1": "2", "2": "3-5", "3": "6+"}
    for flag in EXTRA[1:]:
        assert json.loads((folder / f"label_index_{flag}.json").read_text()) == {"0": "no", "1": "yes"}
        assert set(ds[flag]) == {"", "no", "yes"}  # some missing: neither a class nor dropped
    assert set(ds["count"]) == {"", "1", "2"}
    export = json.loads(next((settings.home / "exports").rglob("sample_export.json")).read_text())
    written = {a["image_id"]: a for a in export["annotations"] if a.get("bbox") and "standing" in a
               and a["standing"] is not None}
    images = {i["id"]: i["file_name"] for i in export["images"]}
    truth = {images[i]: "yes" if a["standing"] else "no" for i, a in written.items()}
    read = {crop_source(p.split("/", 1)[1])[0]: v for p, v in zip(ds["path"], ds["standing"]) if v}
    assert read and all(truth[file] == value for file, value in read.items())  # each crop gets its image's value
    assert set(meta["outputs"]) == set(OUTPUTS)
    assert all(n["missing"] > 0 for n in next(iter(meta["outputs_missing"].values())).values())


def test_one_backbone_trains_a_head_per_output_and_its_checkpoint_loads_in_the_reference_layout(multi_home):
    settings, dagster_home, *_, train = multi_home
    meta = _materialized(train, "classifier_checkpoint")
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        folder = latest_version(settings, instance, "classifier_checkpoint")
    ckpt = read_checkpoint(folder / "ckpt_best.pt")
    assert ckpt["outputs"] == {"count": 4, **{flag: 2 for flag in EXTRA[1:]}}
    species = build_model("efficientnet-lite0", 4)
    species.load_state_dict(ckpt["model"])  # strict: the species model alone, as the reference loads it
    assert set(ckpt["heads"]) == {f"{name}.{p}" for name in EXTRA for p in ("weight", "bias")}
    params = json.loads((folder / "params.json").read_text())
    assert params["outputs"] == ckpt["outputs"] and params["output_weights"] == {"count": 0.5}
    history = pd.read_csv(folder / "history.csv")
    for name in EXTRA:
        assert history[f"val/{name}/count"].iloc[0] > 0 and history[f"train/{name}/loss"].notna().all()
    assert 0 <= meta["test_standing_acc_top1"] <= 1


def test_the_evaluation_writes_the_reference_files_per_output_and_the_gate_reads_the_species_head(multi_home):
    settings, dagster_home, partition, _, train = multi_home
    meta = _materialized(train, "classifier_evaluation")
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        folder = latest_version(settings, instance, "classifier_evaluation")
    assert (folder / "outputs_test.csv.gz").is_file() and (folder / "overall_metrics.csv").is_file()
    for name in EXTRA:
        for split in ("train", "val", "test"):
            outputs = pd.read_csv(folder / f"outputs_{split}_{name}.csv.gz", dtype={"label": str})
            classes = json.loads((folder / f"label_index_{name}.json").read_text()).values()
            assert list(outputs.columns) == ["path", "label", "weight", *classes]
            assert set(outputs["label"]) <= set(classes)  # missing values are left out, not a class
        overall = pd.read_csv(folder / f"overall_metrics_{name}.csv")
        assert list(overall["split"]) == ["train", "val", "test"]
        with np.load(folder / f"confusion_matrices_{name}.npz") as cms:
            assert cms["test"].shape == (len(classes), len(classes))
        assert set(pd.read_csv(folder / f"label_stats_{name}.csv")["label"].astype(str)) <= set(classes)
    # standing is drawn from the box's shape: the model learns it from the crops
    standing = pd.read_csv(folder / "overall_metrics_standing.csv").set_index("split")
    assert meta["test_standing_acc_top1"] == pytest.approx(standing.loc["test", "acc_top1"] / 100, abs=1e-4)
    registered = _materialized(train, "registered_model")
    assert registered["outputs"] == OUTPUTS
    client = _client(settings)
    champion = registry.resolve(client, registry.DEFAULT_MODEL, registry.CHAMPION)
    files = registry.model_files(tracking.embedded_tracking_uri(settings.home), champion)
    assert set(files.output_index) == set(EXTRA) and files.outputs_torchscript
    assert champion.tags["animl.test_acc_top1"] == f"{_materialized(train, 'classifier_evaluation')['test_acc_top1']:.4f}"
    # the weekly or drift retraining builds its dataset with the champion's outputs, and trains its recipe
    ops = retraining_run_config(champion)["ops"]
    assert ops["classification_dataset"]["config"]["outputs"] == OUTPUTS
    assert ops["classifier_checkpoint"]["config"]["output_weights"] == {"count": 0.5}


def test_classification_writes_every_head_and_the_md_json_carries_them(multi_home):
    settings, dagster_home, partition, *_ = multi_home
    result = _run(settings, dagster_home, CLASSIFY_JOB, partition, classifications={"num_workers": 0})
    meta = _materialized(result, "classifications")
    folder = settings.home / "artifacts" / "classifications" / partition_folder(partition)
    species = pd.read_csv(folder / "classifier_output.csv.gz")
    assert set(meta["outputs"]) == set(EXTRA)
    for name in EXTRA:
        rows = pd.read_csv(folder / f"classifier_output_{name}.csv.gz")
        assert list(rows["path"]) == list(species["path"])
        assert (rows.drop(columns="path").sum(axis=1) - 1).abs().max() < 1e-4
    [md_file] = (settings.home / "artifacts" / "classified_detections").rglob("classified_detections.json")
    md = json.loads(md_file.read_text())
    assert set(md["info"]["classifier_outputs"]) == set(EXTRA)
    detections = [d for image in md["images"] for d in image.get("detections") or [] if d.get("classifications")]
    assert detections and all(set(d["outputs"]) == set(EXTRA) for d in detections)
    count = next(d["outputs"]["count"] for d in detections)
    assert count[0] in {"1", "2", "3-5", "6+"} and 0 < count[1] <= 1
    assert _materialized(result, "classified_detections")["num_detections_with_outputs"] == len(detections)


def _transfer(settings, dagster_home, **config):
    _run(settings, dagster_home, TRAIN_JOB, selection=[dg.AssetKey("classifier_checkpoint")],
         classifier_checkpoint=SMALL | {"init_from": "champion", "pretrained": "false", "epochs": 1, "finetune": 1,
                                        "lr": 1e-7, **config})
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        folder = latest_version(settings, instance, "classifier_checkpoint")
    params = json.loads((folder / "params.json").read_text())
    return read_checkpoint(folder / "ckpt_best.pt"), params, pd.read_csv(folder / "history.csv").iloc[0]


def test_a_transfer_with_a_class_mapping_starts_other_exports_classes_from_the_champions(multi_home, tmp_path):
    settings, dagster_home, *_ = multi_home
    write_sample_export(tmp_path / "second", seed=1, behaviours=True)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        second = add_export(settings, instance, tmp_path / "second", folder="second")
    _run(settings, dagster_home, INGEST_JOB, second)
    merged = {"ungulate": ["deer"], "predator": ["fox", "raccoon"], "bird": ["turkey"]}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({new: {"dataset_labels": {second: old}} for new, old in merged.items()}))
    _run(settings, dagster_home, DATASET_JOB, classification_dataset={
        "outputs": OUTPUTS, "exports": [second], "label_spec": str(spec), "output_bins": {"count": [1, 2, 3]}})
    mapping = tmp_path / "class_mapping.json"
    mapping.write_text(json.dumps({"species": merged, "count": {"3+": ["3-5", "6+"]}}))
    mapped, params, mapped_epoch = _transfer(settings, dagster_home, class_mapping=str(mapping))
    assert params["transferred_from"]["species"] == {"bird": ["turkey"], "predator": ["fox", "raccoon"],
                                                     "ungulate": ["deer"]}
    # count's bins are 1, 2, 3+ here: 1 and 2 keep the old rows of their name, 3+ merges 3-5 and 6+
    assert params["transferred_from"]["count"] == {"1": ["1"], "2": ["2"], "3+": ["3-5", "6+"]}
    assert mapped["outputs"]["count"] == 3
    champion = registry.model_files(tracking.embedded_tracking_uri(settings.home), registry.resolve(
        _client(settings), registry.DEFAULT_MODEL, registry.CHAMPION))
    old = read_checkpoint(champion.checkpoint)
    old_labels = [champion.label_index[str(i)] for i in range(len(champion.label_index))]
    rows = [old_labels.index("fox"), old_labels.index("raccoon")]
    # predator (index 1 of bird, predator, ungulate) starts from the mean of fox's and raccoon's rows; lr 1e-7
    # leaves it there
    assert torch.allclose(mapped["model"]["_fc.weight"][1], old["model"]["_fc.weight"][rows].mean(0), atol=1e-4)
    assert torch.allclose(mapped["heads"]["standing.weight"], old["heads"]["standing.weight"], atol=1e-4)
    # the champion's knowledge carries over: before any real training (lr 1e-7) the mapped model is confident and
    # right on val; without the mapping the new classes start from zero rows, at chance's loss (ln 3)
    unmapped, _, unmapped_epoch = _transfer(settings, dagster_home)
    assert mapped["val/acc"] >= 75 and mapped_epoch["val/loss"] < 0.5
    assert unmapped_epoch["val/loss"] == pytest.approx(np.log(3), abs=0.01)


def test_outputs_can_come_from_a_csv_beside_the_export(multi_home, tmp_path):
    settings, dagster_home, partition, *_ = multi_home
    export = json.loads(next((settings.home / "exports" / "sample").rglob("sample_export.json")).read_text())
    files = sorted(image["file_name"] for image in export["images"] if image["file_name"].startswith("ridge/"))
    counts = tmp_path / "counts.csv"
    pd.DataFrame({"file": files, "count": [12 if "fox" in f else "" for f in files]}).to_csv(counts, index=False)
    result = _run(settings, dagster_home, DATASET_JOB, classification_dataset={
        "outputs": ["species", "count"], "exports": [partition], "outputs_csv": {partition: str(counts)}})
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        folder = latest_version(settings, instance, "classification_dataset")
    ds = pd.read_csv(folder / "classification_ds.csv", dtype=str, keep_default_na=False)
    assert list(ds.columns)[-1] == "count"
    foxes = ds["path"].str.contains("/ridge/fox_")
    assert foxes.any() and set(ds.loc[foxes, "count"]) == {"6+"} and set(ds.loc[~foxes, "count"]) == {""}
    assert _materialized(result, "classification_dataset")["outputs"] == ["species", "count"]
    missing = tmp_path / "bad.csv"
    missing.write_text("file,size\nridge/fox_000.jpg,3\n")
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        failed = build_definitions(settings).resolve_job_def(DATASET_JOB).execute_in_process(
            instance=instance, raise_on_error=False, run_config={"ops": {"classification_dataset": {"config": {
                "outputs": ["species", "count"], "outputs_csv": {partition: str(missing)}}}}})
    [failure] = failed.get_step_failure_events()
    assert "lacks the columns ['count']" in failure.step_failure_data.error.to_string()
