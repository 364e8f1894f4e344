"""core.training and core.models: learning, weighting, fine-tuning, early stopping, resume, formats."""

import json

import pandas as pd
import pytest
import torch
from efficientnet_pytorch import EfficientNet

from animl_assets.core.ingest.sample import write_sample_crops
from animl_assets.core.artifact_files import read_checkpoint
from animl_assets.core.ml.frames import split_frame
from animl_assets.core.ml.models import build_model, head, state_dict_of
from animl_assets.core.ml.recipe import (
    BEST,
    LAST,
    Checkpoints,
    PretrainedWeightsUnavailable,
    TrainingParams,
    default_image_size,
)
from animl_assets.core.ml.training import EpochSampler, fit, init_model, make_loaders
from animl_assets.core.registry import tracking
from animl_assets.resources.storage import LocalStore

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def crop_set(tmp_path_factory):
    sample = write_sample_crops(tmp_path_factory.mktemp("crops"), size=64)
    ds = pd.read_csv(sample.dataset_dir / "classification_ds.csv")
    label_index = json.loads((sample.dataset_dir / "label_index.json").read_text())
    splits = json.loads((sample.dataset_dir / "splits.json").read_text())
    return sample, ds, label_index, splits


def _train(crop_set, tmp_path, labels=None, on_epoch=None, resume=True, **overrides):
    sample, ds, label_index, splits = crop_set
    if labels is not None:
        ds = ds[ds["label"].isin(labels)]
        label_index = {str(i): name for i, name in enumerate(sorted(labels))}
    settings = dict(model_name="efficientnet-lite0", image_size=48, epochs=3, batch_size=16, lr=3e-4,
                    num_workers=0, seed=1)
    params = TrainingParams(**(settings | overrides))
    frame = split_frame(ds, label_index, splits, params.label_weighted)
    loaders = make_loaders(frame, sample.crops_dir, params, CPU)
    model = init_model(params, len(label_index), pretrained="lite0" if params.model_name.endswith("lite0") else False)
    checkpoints = Checkpoints(LocalStore(tmp_path / "store"), "training/run")
    result = fit(model, loaders, params, checkpoints, CPU, resume=resume, on_epoch=on_epoch)
    return result, checkpoints, model


def test_a_short_run_learns_far_above_chance(crop_set, tmp_path):
    result, _, _ = _train(crop_set, tmp_path, epochs=5, image_size=64)
    assert max(epoch["val/acc_top1"] for epoch in result.history) >= 0.75  # chance: 0.25
    assert result.best["val/acc"] == 100 * max(epoch["val/acc_top1"] for epoch in result.history)


def test_label_weights_balance_each_split_and_the_sampler_draws_labels_evenly(crop_set):
    _, ds, label_index, splits = crop_set
    skewed = pd.concat([ds, *[ds[ds["label"] == "deer"]] * 5], ignore_index=True)  # deer 6x as common
    frame = split_frame(skewed, label_index, splits, label_weighted=True)
    for split, rows in frame.groupby("split"):
        per_label = rows.groupby("label")["weight"].sum()
        assert per_label.round(6).nunique() == 1, split
        assert rows["weight"].sum() == pytest.approx(len(rows))
    train = frame[frame["split"] == "train"].reset_index(drop=True)
    sampler = EpochSampler(len(train), torch.tensor(train["weight"].to_numpy()), seed=0)
    drawn = pd.Series([train["label"][i] for epoch in range(20) for i, _ in (sampler.set_epoch(epoch) or sampler)])
    shares = drawn.value_counts(normalize=True)
    assert shares.max() - shares.min() < 0.05
    unweighted = split_frame(skewed, label_index, splits, label_weighted=False)
    assert (unweighted["weight"] == 1).all()


def test_detection_confidence_weights_training_rows_through_the_calibration(crop_set):
    _, ds, label_index, splits = crop_set
    ds = ds.assign(confidence=0.5)
    calibration = {"x": [0.0, 1.0], "y": [0.0, 0.2]}
    frame = split_frame(ds, label_index, splits, label_weighted=False, weight_by_detection_conf=True,
                        calibration=calibration)
    assert frame.loc[frame["split"] == "train", "weight"].to_numpy() == pytest.approx(0.1)
    assert (frame.loc[frame["split"] != "train", "weight"] == 1).all()


def test_the_sampler_is_a_function_of_seed_and_epoch_and_shards_by_rank():
    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(2)
    first = list(sampler)  # (index, augmentation seed) pairs
    assert sorted(i for i, _ in first) == list(range(10)) and list(sampler) == first
    assert len({seed for _, seed in first}) == 10
    sampler.set_epoch(3)
    assert [i for i, _ in sampler] != [i for i, _ in first]
    ranks = [EpochSampler(10, seed=3, rank=r, world_size=3) for r in range(3)]
    for shard in ranks:
        shard.set_epoch(2)
    dealt = [[i for i, _ in shard] for shard in ranks]
    assert all(len(shard) == 4 for shard in dealt) and set(sum(dealt, [])) == set(range(10))


def test_finetune_trains_only_the_head_and_keeps_batch_norm_statistics(crop_set, tmp_path):
    model = build_model("efficientnet-lite0", 4, pretrained="lite0", finetune=True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"_fc.weight", "_fc.bias"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result, checkpoints, _ = _train(crop_set, tmp_path, epochs=1, finetune=1)
    after = result.best["model"]
    lite0 = build_model("efficientnet-lite0", 4, pretrained="lite0")
    for key, value in lite0.state_dict().items():
        if not key.startswith("_fc."):
            assert torch.equal(after[key], value), key  # frozen body, BN running stats included
    assert not torch.equal(after["_fc.weight"], before["_fc.weight"])
    unfrozen, _, _ = _train(crop_set, tmp_path / "2", epochs=2, finetune=1)
    assert not torch.equal(unfrozen.best["model"]["_conv_stem.weight"], lite0.state_dict()["_conv_stem.weight"]) \
        or unfrozen.best["epoch"] == 0


def test_early_stopping_stops_after_patience_epochs_without_improvement(crop_set, tmp_path):
    result, checkpoints, _ = _train(crop_set, tmp_path, epochs=10, patience=2, lr=0.0, finetune=10)  # frozen
    assert result.stopped_early and len(result.history) == 3  # epoch 0 best, 1 and 2 no better
    assert checkpoints.load(LAST)["stopped"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_after_a_crash_continues_at_the_next_epoch_with_the_same_final_weights(crop_set, tmp_path, num_workers):
    uninterrupted, _, _ = _train(crop_set, tmp_path / "a", epochs=3, num_workers=num_workers)

    def crash(metrics):
        if metrics["epoch"] == 1:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        _train(crop_set, tmp_path / "b", epochs=3, on_epoch=crash, num_workers=num_workers)
    seen = []
    resumed, checkpoints, _ = _train(crop_set, tmp_path / "b", epochs=3, on_epoch=seen.append, num_workers=num_workers)
    assert resumed.resumed_from_epoch == 1 and [m["epoch"] for m in seen] == [2]
    assert [m["epoch"] for m in resumed.history] == [0, 1, 2]
    last_a = read_checkpoint(tmp_path.joinpath("a", "store", "training", "run", LAST).read_bytes())
    last_b = checkpoints.load(LAST)
    for key, value in last_a["model"].items():  # tensor by tensor, with loader workers too
        assert torch.equal(value, last_b["model"][key]), key
    for key, value in last_a["optimizer"]["state"].items():
        assert all(torch.equal(v, last_b["optimizer"]["state"][key][k]) for k, v in value.items() if torch.is_tensor(v))
    for key, value in uninterrupted.best["model"].items():
        assert torch.equal(value, resumed.best["model"][key]), key
    restarted, _, _ = _train(crop_set, tmp_path / "b", epochs=3, resume=False)
    assert restarted.resumed_from_epoch is None and len(restarted.history) == 3


def test_a_truncated_last_checkpoint_is_set_aside_and_the_training_starts_over(crop_set, tmp_path):
    _, checkpoints, _ = _train(crop_set, tmp_path, epochs=1)
    last = tmp_path / "store" / "training" / "run" / LAST
    last.write_bytes(last.read_bytes()[:1000])  # the disk filled up mid-write of an older, non-atomic copy
    said = []
    sample, ds, label_index, splits = crop_set
    params = TrainingParams(model_name="efficientnet-lite0", image_size=48, epochs=1, batch_size=16, num_workers=0)
    loaders = make_loaders(split_frame(ds, label_index, splits, True), sample.crops_dir, params, CPU)
    result = fit(init_model(params, len(label_index), pretrained="lite0"), loaders, params, checkpoints, CPU,
                 progress=said.append)
    assert result.resumed_from_epoch is None and len(result.history) == 1
    assert any(f"{last} cannot be read" in line and "last.pt.unreadable" in line for line in said)
    assert last.with_name("last.pt.unreadable").stat().st_size == 1000 and checkpoints.load(LAST) is not None


def test_checkpoints_are_in_the_reference_layout_and_load_into_efficientnet_pytorch(crop_set, tmp_path):
    result, checkpoints, _ = _train(crop_set, tmp_path, epochs=1, model_name="efficientnet-b0", image_size=32)
    best = read_checkpoint((tmp_path / "store" / "training" / "run" / BEST).read_bytes())
    assert set(best) == {"epoch", "model", "val/acc", "optimizer"}
    assert isinstance(best["epoch"], int) and 0 <= best["val/acc"] <= 100
    # what the reference's evaluate_model.py does: build the named model, load_state_dict(ckpt["model"])
    reference = EfficientNet.from_name("efficientnet-b0", num_classes=4)
    reference.load_state_dict(best["model"])  # strict
    last = checkpoints.load(LAST)
    assert {"epoch", "model", "val/acc", "optimizer", "scheduler", "scaler", "rng"} <= set(last)


def test_a_megaclassifier_state_dict_loads_with_a_new_head_when_labels_differ():
    source = EfficientNet.from_name("efficientnet-b0", num_classes=7)
    bare = {f"module.{k}": v for k, v in source.state_dict().items()}  # saved from DataParallel
    model = build_model("efficientnet-b0", 4, pretrained=bare)
    assert head(model).out_features == 4
    assert torch.equal(model.state_dict()["_conv_stem.weight"], source.state_dict()["_conv_stem.weight"])
    same = build_model("efficientnet-b0", 7, pretrained={"model": source.state_dict(), "epoch": 3})
    assert torch.equal(same.state_dict()["_fc.weight"], source.state_dict()["_fc.weight"])
    with pytest.raises(ValueError, match="does not fit"):
        build_model("resnet18", 4, pretrained=bare)
    with pytest.raises(ValueError, match="not a checkpoint"):
        state_dict_of({"epoch": 1})


def test_two_labels_and_no_label_weighting_train_where_the_reference_crashes(crop_set, tmp_path):
    result, _, _ = _train(crop_set, tmp_path, labels=["deer", "fox"], epochs=1, label_weighted=False)
    metrics = result.history[0]
    assert metrics["val/acc_top3"] == 1.0  # top-min(3, labels) with two labels
    assert metrics["val/acc_weighted_top1"] == pytest.approx(metrics["val/acc_top1"])


@pytest.mark.parametrize("model_name", ["efficientnet-b0", "resnet18"])
def test_offline_imagenet_weights_fail_with_the_file_to_put_in_the_cache(model_name, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")  # nothing listens there: any download fails at once
    with pytest.raises(PretrainedWeightsUnavailable, match=str(tmp_path / "hub" / "checkpoints")):
        build_model(model_name, 4, pretrained=True)


def test_default_image_sizes_follow_efficientnet():
    assert [default_image_size(f"efficientnet-b{i}") for i in range(8)] == [224, 240, 260, 300, 380, 456, 528, 600]
    assert default_image_size("resnet50") == default_image_size("efficientnet-lite0") == 224


def test_a_reexecuted_dagster_run_continues_its_mlflow_run(tmp_path):
    client = tracking.open_client(tracking.embedded_tracking_uri(tmp_path), tmp_path)
    experiment = tracking.experiment_id(client, "animl/test", (tmp_path / "artifacts").as_uri())
    first, reopened = tracking.find_or_start_run(client, experiment, "root-run", "name", {"animl.exports": "a"})
    assert not reopened
    tracking.log_params(client, first, {"lr": 0.1})
    client.set_terminated(first, status="FAILED")
    again, reopened = tracking.find_or_start_run(client, experiment, "root-run", "name", {})
    assert again == first and reopened and client.get_run(first).info.status == "RUNNING"
    tracking.log_params(client, again, {"lr": 0.1, "epochs": 3})  # params already logged are not re-logged
    assert client.get_run(first).data.params == {"lr": "0.1", "epochs": "3"}
    other, _ = tracking.find_or_start_run(client, experiment, "another-run", "name", {})
    assert other != first


def test_crops_that_cannot_be_trained_on_are_found_from_their_first_and_last_bytes(tmp_path):
    import io as _io

    from PIL import Image as _Image

    from animl_assets.core.ml.frames import crop_problem, readable_crops

    jpeg, png = _io.BytesIO(), _io.BytesIO()
    _Image.new("RGB", (32, 32), (10, 200, 30)).save(jpeg, "JPEG")
    _Image.new("RGB", (32, 32), (10, 200, 30)).save(png, "PNG")
    files = {"ok.jpg": jpeg.getvalue(), "ok.png": png.getvalue(), "cut.jpg": jpeg.getvalue()[:-40],
             "cut.png": png.getvalue()[:-20], "empty.jpg": b"", "text.jpg": b"<html>403 Forbidden</html>"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    found = {name: crop_problem(tmp_path / name) for name in [*files, "gone.jpg"]}
    assert found == {"ok.jpg": None, "ok.png": None, "cut.jpg": "truncated JPEG (no end marker)",
                     "cut.png": "truncated PNG (no IEND chunk)", "empty.jpg": "empty file",
                     "text.jpg": "not a JPEG or PNG", "gone.jpg": "missing"}
    ds = pd.DataFrame({"path": list(found), "dataset": "d", "label": "fox"})
    usable, left_out = readable_crops(ds, tmp_path)
    assert ds.loc[usable, "path"].tolist() == ["ok.jpg", "ok.png"] and len(left_out) == 5
