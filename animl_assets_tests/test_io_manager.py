"""The artifact IO manager: plain files that round-trip, immutable versions, downstream reads the newest."""

import dataclasses
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch
from dagster_aws.s3 import S3Resource

from animl_assets.core.artifact_files import Arrays, TorchFile, artifact_file, content_version, from_files, to_files
from animl_assets.core.dataset.classification import DatasetVersion
from animl_assets.core.registry.registry import Champion, RegisteredVersion
from animl_assets.definitions import DATASET_JOB, build_definitions
from animl_assets.resources.io_manager import ArtifactIOManager
from animl_assets.resources.storage import ArtifactStore
from animl_assets_tests.conftest import add_export, latest_version, run_ingest


@dataclass
class Pair:
    table: pd.DataFrame = field(metadata=artifact_file("table.csv"))
    meta: dict = field(metadata=artifact_file("meta.json"))


VALUES = {
    "frame": pd.DataFrame({"location": ["001", "1e3"], "n": [1, 2]}),
    "mapping": {"0": "deer", "1": "fox"},
    "pairs": [["a", "001"], ["b", "1"]],
    "array": np.arange(6).reshape(2, 3),
    "arrays": Arrays(train=np.eye(2), test=np.zeros((2, 2), dtype=np.int64)),
    "set": Pair(pd.DataFrame({"path": ["x"], "label": ["deer"]}), {"v": 1}),
    "checkpoint": TorchFile({"epoch": 3, "val/acc": 0.9, "model": {"fc.weight": torch.ones(2, 3)}}),
}


def same(a, b) -> bool:
    if isinstance(a, pd.DataFrame):
        return a.equals(b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b) and a.dtype == b.dtype
    if isinstance(a, dict) and a and isinstance(next(iter(a.values())), np.ndarray):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, TorchFile):
        return a.keys() == b.keys() and a["epoch"] == b["epoch"] and torch.equal(a["model"]["fc.weight"],
                                                                                  b["model"]["fc.weight"])
    if isinstance(a, Pair):
        return same(a.table, b.table) and a.meta == b.meta
    return a == b


@pytest.mark.parametrize("name", VALUES)
def test_values_round_trip_as_plain_files(name):
    files = to_files(VALUES[name], "out")
    assert not any(data.startswith(b"\x80") for data in files.values())  # no bare pickle anywhere
    loaded = from_files(files.__getitem__)
    assert type(loaded) is type(VALUES[name]) and same(VALUES[name], loaded)
    assert content_version(files) == content_version(to_files(VALUES[name], "out"))


def test_ids_stay_strings_and_other_classes_are_refused():
    loaded = from_files(to_files(VALUES["frame"], "t").__getitem__)
    assert loaded["location"].tolist() == ["001", "1e3"]
    files = to_files(VALUES["set"], "s")
    files["artifacts.json"] = files["artifacts.json"].replace(b"test_io_manager:Pair", b"os:system")
    with pytest.raises(ValueError, match="refusing"):
        from_files(files.__getitem__)


def test_a_record_is_one_json_file_with_the_dicts_version_and_an_older_dict_loads_into_it():
    """registered_model, champion_model and classifications were dicts: their records keep the file and the
    version, and what an older home stored as a dict is read back as the record."""
    record = RegisteredVersion("animl-classifier", "3", "runs:/r/model", "r", 0.0,
                               {"acc_top1": 0.9, "macro_recall": None},
                               "models:/animl-classifier/3", {"animl.exports": "a,b"})
    files, older = to_files(record, "registered_model"), to_files(dataclasses.asdict(record), "registered_model")
    assert files["registered_model.json"] == older["registered_model.json"]
    assert content_version(files) == content_version(older)
    assert from_files(files.__getitem__) == record
    assert from_files(older.__getitem__) == dataclasses.asdict(record)  # no class asked for: the plain dict
    assert from_files(older.__getitem__, expected=RegisteredVersion) == record
    assert from_files(to_files({"rows": 1}, "x").__getitem__, expected=Pair) == {"rows": 1}  # records only
    index = files["artifacts.json"]
    for elsewhere in (b"not_loaded_here:RegisteredVersion", b"os:system"):  # a reader without the class: JSON
        files["artifacts.json"] = index.replace(b"animl_assets.core.registry.registry:RegisteredVersion", elsewhere)
        assert from_files(files.__getitem__) == dataclasses.asdict(record)


def _round_trip_through_dagster(storage: ArtifactStore, instance) -> None:
    @dg.asset
    def upstream() -> Pair:
        return VALUES["set"]

    @dg.asset
    def downstream(upstream: Pair) -> dict:
        assert same(VALUES["set"], upstream)
        return {"rows": len(upstream.table)}

    result = dg.materialize([upstream, downstream], instance=instance,
                            resources={"io_manager": ArtifactIOManager(storage=storage)})
    assert result.success
    version = result.asset_materializations_for_node("upstream")[0].metadata["version"].value
    assert from_files(lambda name: storage.store().read_bytes(f"upstream/{version}/{name}")).meta == {"v": 1}


def test_io_manager_on_a_local_folder(tmp_path, instance):
    _round_trip_through_dagster(ArtifactStore(uri=str(tmp_path / "artifacts")), instance)


def test_a_dict_an_older_home_stored_reaches_a_record_input_as_the_record(tmp_path, instance):
    stored = {"name": "m", "version": "2", "replaced": None, "how": "gate", "model_uri": "models:/m@champion"}

    @dg.asset(name="champion_model")
    def older() -> dict:  # what champion_model returned before it had a class
        return stored

    @dg.asset(deps=[], ins={"champion_model": dg.AssetIn()})
    def reader(champion_model: Champion) -> None:
        assert champion_model == Champion(**stored)

    resources = {"io_manager": ArtifactIOManager(storage=ArtifactStore(uri=str(tmp_path / "artifacts")))}
    assert dg.materialize([older], instance=instance, resources=resources).success
    assert dg.materialize([older.to_source_asset(), reader], instance=instance, resources=resources,
                          selection=[reader]).success


def test_io_manager_on_s3(moto_endpoint, bucket, instance):
    _round_trip_through_dagster(ArtifactStore(uri=f"s3://{bucket}/artifacts", s3=S3Resource(endpoint_url=moto_endpoint)),
                                instance)


def test_two_dataset_versions_stay_side_by_side_and_splits_reads_the_newest(settings, instance, sample_dir):
    partition = add_export(settings, instance, sample_dir)
    assert run_ingest(settings, instance, partition).success
    job = build_definitions(settings).resolve_job_def(DATASET_JOB)
    assert job.execute_in_process(instance=instance).success
    first = latest_version(settings, instance, "classification_dataset")
    first_csv = (first / "classification_ds.csv").read_bytes()
    config = {"ops": {"classification_dataset": {"config": {"excluded_classes": ["empty", "turkey"]}}}}
    second_run = job.execute_in_process(instance=instance, run_config=config)
    second = latest_version(settings, instance, "classification_dataset")
    assert second != first and (first / "classification_ds.csv").read_bytes() == first_csv  # never replaced
    assert "turkey" not in pd.read_csv(second / "classification_ds.csv")["label"].tolist()
    splits = json.loads((latest_version(settings, instance, "splits") / "splits.json").read_text())
    ds = pd.read_csv(second / "classification_ds.csv", dtype=str)
    assert {tuple(pair) for split in splits.values() for pair in split} == set(zip(ds["dataset"], ds["location"]))
    # the splits materialization records the dataset version it read, which is the newest one
    materialization = second_run.asset_materializations_for_node("splits")[0]
    assert materialization.tags["dagster/input_data_version/classification_dataset"] == second.name
    again = job.execute_in_process(instance=instance, run_config=config)  # same data: same version folder
    assert latest_version(settings, instance, "classification_dataset") == second and again.success
    assert sorted(p.name for p in (Path(settings.storage_uri) / "classification_dataset").iterdir()) == sorted(
        [first.name, second.name])


def test_splits_before_any_dataset_names_what_to_materialize(settings, instance):
    job = build_definitions(settings).resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("splits")], raise_on_error=False)
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "classification_dataset is not materialized yet: materialize classification_dataset first" in \
        str(failure.event_specific_data.error.to_string())
    assert isinstance(DatasetVersion.__dataclass_fields__["classification_ds"].metadata["file"], str)


def test_a_changed_export_makes_the_dataset_stale(settings, instance, sample_dir):
    """Per-export assets report content data versions, so the UI marks what was built from the old export."""
    from dagster._core.definitions.data_version import StaleStatus
    from dagster._utils.test.data_versions import get_stale_status_resolver  # what the UI computes

    from animl_assets.assets import DATASET_ASSETS, PER_EXPORT_ASSETS

    partition = add_export(settings, instance, sample_dir)
    assert run_ingest(settings, instance, partition).success
    job = build_definitions(settings).resolve_job_def(DATASET_JOB)
    assert job.execute_in_process(instance=instance).success

    def status(asset: str) -> StaleStatus:
        resolver = get_stale_status_resolver(instance, [*PER_EXPORT_ASSETS, *DATASET_ASSETS])
        return resolver.get_status(dg.AssetKey(asset))

    assert status("classification_dataset") == status("splits") == StaleStatus.FRESH
    assert run_ingest(settings, instance, partition).success  # the same export again: nothing changes
    assert status("classification_dataset") == StaleStatus.FRESH
    export = Path(settings.exports_uri) / "sample" / "sample_export.json"
    cct = json.loads(export.read_text())
    cct["annotations"][0]["bbox"][2] -= 10  # one box edited
    export.write_text(json.dumps(cct))
    assert run_ingest(settings, instance, partition).success
    assert status("classification_dataset") == StaleStatus.STALE


def test_partitioned_values_load_one_at_a_time_or_as_a_dict_across_partitions(tmp_path, instance):
    parts = dg.StaticPartitionsDefinition(["site/a", "site/b"])
    storage = ArtifactStore(uri=str(tmp_path / "artifacts"))

    @dg.asset(partitions_def=parts)
    def per_export(context: dg.AssetExecutionContext) -> pd.DataFrame:
        return pd.DataFrame({"location": ["001" if context.partition_key == "site/a" else "1"]})

    @dg.asset(partitions_def=parts)
    def same_partition(per_export: pd.DataFrame) -> list:
        return per_export["location"].tolist()

    @dg.asset
    def across(per_export: dict) -> dict:
        return {partition: frame["location"].tolist() for partition, frame in per_export.items()}

    resources = {"io_manager": ArtifactIOManager(storage=storage)}
    for key in parts.get_partition_keys():
        assert dg.materialize([per_export, same_partition], partition_key=key, instance=instance,
                              resources=resources).success
    assert dg.materialize([per_export, across], selection=[across], instance=instance, resources=resources).success
    root = tmp_path / "artifacts"
    assert (root / "per_export" / "site~a" / "per_export.csv").read_text() == "location\n001\n"
    assert json.loads((root / "same_partition" / "site~b" / "same_partition.json").read_text()) == ["1"]
    version = next((root / "across").iterdir())
    assert json.loads((version / "across.json").read_text()) == {"site/a": ["001"], "site/b": ["1"]}


def test_splits_is_tested_with_its_input_given_directly(tmp_path):
    """No ingest needed: the asset takes a dataset version (and reads its export's sequences from the store)
    and returns splits plus its checks."""
    from animl_assets.assets.dataset import SplitsConfig, splits
    from animl_assets.core.ingest.cct import ExportArtifacts
    from animl_assets.core.layout import asset_folder

    ds = pd.DataFrame({"path": [f"e/{i}.jpg___crop00_md.jpg" for i in range(60)], "dataset": "e",
                       "location": [f"{i % 20:03d}" for i in range(60)], "dataset_class": "x", "confidence": 1.0,
                       "label": ["deer", "fox"] * 30})
    storage = ArtifactStore(uri=str(tmp_path / "artifacts"))
    images = [{"id": i, "file_name": f"{i}.jpg", "location": f"{i % 20:03d}", "seq_id": "burst" if i < 2 else ""}
              for i in range(60)]  # images 0 and 1, at locations 000 and 001, are one burst
    for name, data in to_files(ExportArtifacts({"images": images}, {}, {}), "cct_export").items():
        storage.store().write_bytes(f"{asset_folder('cct_export', partition='e')}/{name}", data)
    version = DatasetVersion(ds, {"0": "deer", "1": "fox"}, {}, [])
    output, *checks = list(splits(config=SplitsConfig(trials=200), classification_dataset=version, storage=storage))
    placed = {location: name for name, split in output.value.items() for _, location in split}
    assert sorted(placed) == sorted(f"{i:03d}" for i in range(20)) and all(check.passed for check in checks)
    assert placed["000"] == placed["001"] and output.metadata["linked_locations"].value == [[["e", "000"], ["e", "001"]]]
    assert output.data_version.value == content_version(to_files(output.value, "splits"))


def test_md_detections_is_tested_with_its_inputs_given_directly(tmp_path):
    from animl_assets.assets.detections import DetectionsConfig, md_detections
    from animl_assets.core.ingest.cct import ExportArtifacts
    from animl_assets.core.ingest.images import ImageManifest
    from animl_assets.resources.storage import ExportsLocation, ImageSource

    export = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 50},
                         {"id": 2, "file_name": "b.jpg"}],
              "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
                              {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50]}],
              "categories": [{"id": 1, "name": "deer"}]}
    manifest = pd.DataFrame({"file_name": ["a.jpg", "b.jpg"], "status": ["good", "good"], "width": [100, 200],
                             "height": [50, 100], "orientation": [1, 1]})
    context = dg.build_asset_context(partition_key="site")
    output, check = list(md_detections(
        context=context, config=DetectionsConfig(), cct_export=ExportArtifacts(export, {}, {"sha256": "x"}),
        images=ImageManifest(manifest), storage=ArtifactStore(uri=str(tmp_path / "a")),
        exports=ExportsLocation(uri=str(tmp_path / "exports")), image_source=ImageSource()))
    boxes = {image["file"]: image["detections"][0]["bbox"] for image in output.value.md["images"]}
    assert boxes == {"a.jpg": [0.1, 0.2, 0.2, 0.4], "b.jpg": [0.0, 0.0, 0.25, 0.5]}  # b's size from the manifest
    assert output.value.labels["label"].tolist() == ["deer", "deer"] and check.passed


class _Executes:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_a_checkpoint_that_would_run_pickled_code_is_refused(capsys):
    files = to_files(TorchFile({"epoch": 1}), "ckpt")
    buffer = io.BytesIO()
    torch.save({"epoch": 1, "payload": _Executes()}, buffer)
    files["ckpt.pt"] = buffer.getvalue()
    with pytest.raises(Exception, match="(?i)weights only|weights_only|unsupported"):
        from_files(files.__getitem__)
    assert "pickled code ran" not in capsys.readouterr().out
