"""`animl lineage` and `animl gc` on the demo, as a new user would run them."""

import hashlib
import json
import shutil
from pathlib import Path

import dagster as dg
import pytest

from animl_assets.cli import ensure_dagster_home, main
from animl_assets.definitions import build_definitions
from animl_assets.settings import Settings
from animl_assets_tests.conftest import quick_demo_config

# The tests share one built home (a demo takes minutes; --dist loadfile keeps them on one worker), each test
# on a fresh copy of it.


@pytest.fixture(scope="module")
def built_home(tmp_path_factory) -> tuple[Path, Path]:
    """The demo, then a second export registered, the dataset rebuilt and a model trained on it: two
    versions of the dataset, the splits and the checkpoint. Returns (home, a pristine copy of it)."""
    root = tmp_path_factory.mktemp("lineage")
    home = root / "home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANIML_HOME", str(home))
        patch.setenv("DAGSTER_HOME", "")
        assert main(["demo", "--run-config", quick_demo_config(root)]) == 0
        assert main(["sample-export", str(root / "second"), "--seed", "1"]) == 0
        assert main(["register", str(root / "second" / "sample_export.json"), "--name", "second"]) == 0
        assert main(["build-dataset"]) == 0
        small = {"model_name": "efficientnet-lite0", "pretrained": "lite0", "image_size": 32, "epochs": 1,
                 "finetune": 1, "batch_size": 32, "num_workers": 0}
        (root / "train.json").write_text(json.dumps({"ops": {"classifier_checkpoint": {"config": small}}}))
        assert main(["train", "--run-config", str(root / "train.json")]) == 0  # a model of the new version too
    shutil.copytree(home, root / "pristine", symlinks=True)
    return home, root / "pristine"


def _restore(pristine: Path, home: Path) -> None:
    """Make ``home`` a copy of ``pristine`` again, file by file in place: processes' open SQLite stores
    (MLflow keeps its engine) see the restored content rather than a deleted file."""
    for path in sorted(home.rglob("*"), reverse=True):
        twin = pristine / path.relative_to(home)
        if not twin.exists() and not twin.is_symlink():
            path.unlink() if path.is_file() or path.is_symlink() else path.rmdir()
    for twin in pristine.rglob("*"):
        path = home / twin.relative_to(pristine)
        if twin.is_dir() and not twin.is_symlink():
            path.mkdir(exist_ok=True)
        elif not twin.is_symlink():
            shutil.copyfile(twin, path)


@pytest.fixture()
def two_exports(built_home, monkeypatch, capsys) -> Path:
    """``built_home`` as it was built (gc tests remove versions), at the same path: the paths its event
    log and MLflow store hold stay true."""
    home, pristine = built_home
    _restore(pristine, home)
    monkeypatch.setenv("ANIML_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", "")
    capsys.readouterr()
    return home


def test_lineage_names_every_export_and_its_file_hash(two_exports, tmp_path, capsys):
    versions = sorted(p.name for p in (two_exports / "artifacts" / "classification_dataset").iterdir())
    assert len(versions) == 2  # the demo's and the rebuilt one, side by side
    assert main(["lineage", "splits", "--json"]) == 0
    chain = json.loads(capsys.readouterr().out)
    dataset = chain["inputs"][0]
    assert chain["asset"] == "splits" and dataset["asset"] == "classification_dataset"
    assert dataset["version"] in versions and chain["run_id"] and chain["time"]
    exports = {node["partition"]: node for node in dataset["inputs"]}
    assert set(exports) == {"sample/sample_export", "second"}
    assert exports["second"]["version"] == hashlib.sha256(
        (two_exports / "exports" / "second.json").read_bytes()).hexdigest()
    assert all(node["asset"] == "cct_export" and len(node["run_id"]) == 36 for node in exports.values())
    older = next(v for v in versions if v != dataset["version"])
    assert main(["lineage", "classification_dataset", "--version", older]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"classification_dataset {older}") and "[sample/sample_export]" in text
    assert "[second]" not in text  # the demo's dataset was built before the second export
    assert main(["lineage", "classification_dataset", "--version", "nope"]) == 2
    assert "has no version 'nope'" in capsys.readouterr().err


def test_a_checkpoint_version_leads_to_the_splits_and_dataset_it_was_trained_on(two_exports, capsys):
    assert main(["lineage", "classifier_checkpoint", "--json"]) == 0
    chain = json.loads(capsys.readouterr().out)
    inputs = {node["asset"]: node for node in chain["inputs"]}
    assert set(inputs) == {"splits", "classification_dataset"}
    assert inputs["splits"]["inputs"][0]["version"] == inputs["classification_dataset"]["version"]
    params = json.loads((two_exports / "artifacts" / "classifier_checkpoint" / chain["version"] /
                         "params.json").read_text())
    assert params["dataset_version"] == inputs["classification_dataset"]["version"]
    assert {n["partition"] for n in inputs["classification_dataset"]["inputs"]} == {"sample/sample_export", "second"}


def test_no_artifact_is_a_pickle(two_exports):
    files = [path for path in (two_exports / "artifacts").rglob("*") if path.is_file()]
    assert len(files) > 200
    for path in files:
        head = path.read_bytes()[:2]
        assert not head.startswith(b"\x80"), f"{path} looks like a pickle"
        assert path.suffix in {".json", ".csv", ".jpg", ".png", ".npz", ".pt", ".pt2", ".onnx", ".gz"}, path
        if path.suffix in (".pt", ".pt2"):  # torch.save's zip of tensors (weights_only loads), TorchScript's or
            assert head == b"PK", path  # torch.export's zip
        if path.suffix == ".onnx":  # a ModelProto: field 1, ir_version
            assert head[:1] == b"\x08", path
        if path.suffix == ".gz":  # outputs_{split}.csv.gz
            assert path.name.endswith(".csv.gz") and head == b"\x1f\x8b", path


def _forget_registered_models(home: Path) -> None:
    from mlflow import MlflowClient

    from animl_assets.core.registry.tracking import embedded_tracking_uri

    uri = embedded_tracking_uri(home)
    MlflowClient(uri, uri).delete_registered_model("animl-classifier")


def _review_lists(home: Path, margin: float, splits: list[str] | None = None, evaluation: str | None = None) -> str:
    """Materialize mislabeled_candidates with ``margin`` (over ``splits``, from the ``evaluation`` version if
    given); returns the new version."""
    ensure_dagster_home(Settings.from_env())
    job = build_definitions().resolve_implicit_global_asset_job_def()
    config = {"ops": {"mislabeled_candidates": {"config": {"margin": margin} | ({"splits": splits} if splits else {})}}}
    tags = {"animl/version/classifier_evaluation": evaluation} if evaluation else None
    with dg.DagsterInstance.get() as instance:
        assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("mislabeled_candidates")],
                                      run_config=config, tags=tags).success
        event = instance.get_latest_materialization_event(dg.AssetKey("mislabeled_candidates"))
    return event.asset_materialization.metadata["version"].value


def test_gc_keeps_the_newest_and_what_they_read(two_exports, capsys):
    datasets = two_exports / "artifacts" / "classification_dataset"
    old_reviews = len(list((two_exports / "artifacts" / "mislabeled_candidates").iterdir())) - 1
    assert main(["gc", "--keep", "1"]) == 0  # both models are registered: all they were made from stays
    out = capsys.readouterr().out  # review lists are not what a model is made from
    assert out.count("would remove") == out.count("would remove mislabeled_candidates") == old_reviews
    _forget_registered_models(two_exports)
    assert main(["gc", "--keep", "1"]) == 0
    out = capsys.readouterr().out
    # the old dataset, splits, checkpoint, evaluation and registration versions (and review lists)
    assert out.count("would remove") == 5 + old_reviews and "dry run" in out
    assert len(list(datasets.iterdir())) == 2  # a dry run removes nothing
    assert main(["gc", "--keep", "1", "--yes"]) == 0
    assert capsys.readouterr().out.count("removed") == 5 + old_reviews
    assert main(["lineage", "splits", "--json"]) == 0
    kept = json.loads(capsys.readouterr().out)["inputs"][0]["version"]
    assert [p.name for p in datasets.iterdir()] == [kept]
    assert (datasets / kept / "classification_ds.csv").is_file()
    assert main(["gc", "--keep", "1"]) == 0 and "nothing to remove" in capsys.readouterr().out


def test_gc_keeps_a_dataset_version_a_kept_splits_version_read(two_exports, capsys):
    """A newer dataset without splits yet: the older dataset stays while the newest splits needs it."""
    ensure_dagster_home(Settings.from_env())
    job = build_definitions().resolve_implicit_global_asset_job_def()
    config = {"ops": {"classification_dataset": {"config": {"excluded_classes": ["empty", "turkey"]}}}}
    with dg.DagsterInstance.get() as instance:
        assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("classification_dataset")],
                                      run_config=config).success
    _forget_registered_models(two_exports)
    assert main(["gc", "--keep", "1", "--yes"]) == 0
    out = capsys.readouterr().out
    assert out.count("removed classification_dataset") == 1 and out.count("removed splits") == 1
    remaining = {p.name for p in (two_exports / "artifacts" / "classification_dataset").iterdir()}
    assert main(["lineage", "splits", "--json"]) == 0
    read_by_splits = json.loads(capsys.readouterr().out)["inputs"][0]["version"]
    assert len(remaining) == 2 and read_by_splits in remaining  # the newest, and the one splits read


def test_gc_removes_old_review_lists_with_their_contact_sheets(two_exports, capsys):
    reviews = two_exports / "artifacts" / "mislabeled_candidates"
    before = {p.name for p in reviews.iterdir()}
    # another net, another list: which net catches another list depends on how sure the models are (a model
    # right on every crop lists none at any margin), so the older evaluation is tried too, pinned by run tag
    evaluations = [None] + [p.name for p in (two_exports / "artifacts" / "classifier_evaluation").iterdir()]
    tries = [(e, m, s) for e in evaluations for s in (["train", "val", "test"], ["test"], ["train"], ["val"])
             for m in (0.01, 0.5, 0.95)]
    for evaluation, margin, splits in tries:
        newest = _review_lists(two_exports, margin=margin, splits=splits, evaluation=evaluation)
        if newest not in before:
            break
    assert newest not in before and (reviews / newest / "contact_sheet.png").is_file()
    assert main(["lineage", "mislabeled_candidates", "--json"]) == 0
    chain = json.loads(capsys.readouterr().out)
    assert chain["version"] == newest and chain["inputs"][0]["asset"] == "classifier_evaluation"
    assert main(["gc", "--keep", "1", "--yes"]) == 0  # the models stay registered: only review lists go
    out = capsys.readouterr().out
    assert out.count("removed") == out.count("removed mislabeled_candidates") == len(before)
    assert [p.name for p in reviews.iterdir()] == [newest]
