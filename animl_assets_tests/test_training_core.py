"""core.training and core.models: learning, weighting, fine-tuning, early stopping, resume, formats."""

import json
import math

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
from animl_assets.core.ml.training import (
    EpochSampler,
    evaluate_checkpoint,
    fit,
    init_model,
    make_loaders,
    make_optimizer,
    warmup_cosine,
)
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
    result = fit(model, loaders, params, checkpoints, CPU, resume=resume, on_epoch=on_epoch,
                 pretrained_body=params.model_name.endswith("lite0"))
    return result, checkpoints, model


def test_a_short_run_learns_far_above_chance(crop_set, tmp_path):
    result, _, _ = _train(crop_set, tmp_path, epochs=5, image_size=64, lr=None)
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


@pytest.mark.parametrize(("num_workers", "recipe"), [(0, "modern"), (2, "modern"), (0, "reference")])
def test_resume_after_a_crash_continues_at_the_next_epoch_with_the_same_final_weights(crop_set, tmp_path, num_workers,
                                                                                     recipe):
    uninterrupted, _, _ = _train(crop_set, tmp_path / "a", epochs=3, num_workers=num_workers, recipe=recipe)

    def crash(metrics):
        if metrics["epoch"] == 1:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        _train(crop_set, tmp_path / "b", epochs=3, on_epoch=crash, num_workers=num_workers, recipe=recipe)
    seen = []
    resumed, checkpoints, _ = _train(crop_set, tmp_path / "b", epochs=3, on_epoch=seen.append,
                                         num_workers=num_workers, recipe=recipe)
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
    if recipe == "modern":  # the EMA and the per-batch schedule resume where they were too
        for key, value in last_a["ema"].items():
            assert torch.equal(value, last_b["ema"][key]), key
        assert last_a["scheduler"]["last_epoch"] == last_b["scheduler"]["last_epoch"] > 3
    restarted, _, _ = _train(crop_set, tmp_path / "b", epochs=3, resume=False, recipe=recipe)
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


@pytest.mark.parametrize("recipe", ["reference", "modern"])
def test_checkpoints_are_in_the_reference_layout_and_load_into_efficientnet_pytorch(crop_set, tmp_path, recipe):
    result, checkpoints, _ = _train(crop_set, tmp_path, epochs=1, model_name="efficientnet-b0", image_size=32,
                                    recipe=recipe)
    best = read_checkpoint((tmp_path / "store" / "training" / "run" / BEST).read_bytes())
    reference_keys = {"epoch", "model", "val/acc", "optimizer"}
    if recipe == "reference":
        assert set(best) == reference_keys
    else:  # the better of the raw weights and their EMA is the model, and says which it is
        assert set(best) == reference_keys | {"weights"} and best["weights"] in ("raw", "ema")
        metrics = result.history[0]
        chosen = "val_ema" if best["weights"] == "ema" else "val"
        assert best["val/acc"] == 100 * max(metrics["val/acc_top1"], metrics["val_ema/acc_top1"]) \
            == 100 * metrics[f"{chosen}/acc_top1"]
    assert isinstance(best["epoch"], int) and 0 <= best["val/acc"] <= 100
    # what the reference's evaluate_model.py does: build the named model, load_state_dict(ckpt["model"])
    reference = EfficientNet.from_name("efficientnet-b0", num_classes=4)
    reference.load_state_dict(best["model"])  # strict
    last = checkpoints.load(LAST)
    assert {"epoch", "model", "val/acc", "optimizer", "scheduler", "scaler", "rng"} <= set(last)
    assert ("ema" in last) == (recipe == "modern")


def test_full_fine_tuning_with_the_modern_recipe_stays_finite_and_matches_head_only(crop_set, tmp_path):
    """Every layer trained from the first epoch: the reference's RMSprop at its rate blows the loss up on the
    sample (val loss 20 to 55 here); the modern recipe's rates for body and head keep it finite."""
    sample, ds, label_index, splits = crop_set
    frame = split_frame(ds, label_index, splits, True)
    settings = dict(image_size=64, epochs=4, lr=None)
    full, _, _ = _train(crop_set, tmp_path / "full", **settings)
    head_only, _, _ = _train(crop_set, tmp_path / "head", finetune=4, **settings)
    assert all(math.isfinite(m[key]) for m in full.history for key in ("train/loss", "val/loss", "val_ema/loss"))
    params = TrainingParams(model_name="efficientnet-lite0", image_size=64, num_workers=0)
    test = {name: evaluate_checkpoint(result.best, frame, sample.crops_dir, len(label_index), params)["acc_top1"]
            for name, result in (("full", full), ("head", head_only))}
    assert test["full"] >= test["head"] - 1e-9 and test["full"] >= 0.75, test
    assert full.history[-1]["val/loss"] < full.history[0]["val/loss"]


def test_modern_optimizer_warms_each_group_up_from_its_start_then_decays_by_cosine():
    model = build_model("efficientnet-lite0", 4, pretrained="lite0")
    params = TrainingParams(model_name="efficientnet-lite0", epochs=10, finetune=2, warmup_epochs=1, lr=1e-3,
                            body_lr_scale=0.1)
    optimizer, scheduler, per_batch = make_optimizer(model, params, CPU, steps_per_epoch=5, pretrained_body=True)
    assert per_batch and isinstance(optimizer, torch.optim.AdamW)
    groups = optimizer.param_groups
    head_ids = {id(p) for p in head(model).parameters()}
    is_head = [all(id(p) in head_ids for p in g["params"]) for g in groups]
    assert [g["initial_lr"] for g in groups] == [1e-3 if h else 1e-4 for h in is_head]
    assert all(g["weight_decay"] == (0.05 if g["params"][0].ndim > 1 else 0.0) for g in groups)  # no decay on norms
    lrs = []
    for _ in range(50):
        lrs.append([g["lr"] for g in groups])
        optimizer.step()  # no gradients: nothing moves
        scheduler.step()
    head_lr = [step[is_head.index(True)] for step in lrs]
    body_lr = [step[is_head.index(False)] for step in lrs]
    assert head_lr[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])  # one epoch of warm-up
    assert body_lr[:10] == [0.0] * 10 and body_lr[10:15] == pytest.approx([2e-5, 4e-5, 6e-5, 8e-5, 1e-4])
    assert all(a >= b for a, b in zip(head_lr[4:], head_lr[5:])) and 1e-5 < head_lr[-1] < 1.2e-5
    assert warmup_cosine(0, 1, 11)(11) == pytest.approx(0.01)


def test_mixup_and_cutmix_train_on_soft_targets(crop_set, tmp_path):
    result, _, _ = _train(crop_set, tmp_path, epochs=1, mixup_alpha=0.2, cutmix_alpha=1.0, augment="randaugment")
    assert math.isfinite(result.history[0]["train/loss"]) and result.history[0]["train/count"] > 0
    with pytest.raises(ValueError, match="recipe must be one of"):
        TrainingParams(recipe="fancy")


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


def test_a_modern_training_without_a_val_split_keeps_the_raw_weights(crop_set, tmp_path):
    """No val crops: the train metrics stand in for val, there is no EMA score, and best.pt keeps the raw
    weights (choosing between raw and EMA must not need val_ema metrics)."""
    sample, ds, label_index, splits = crop_set
    no_val = {"train": splits["train"] + splits["val"], "val": [], "test": splits["test"]}
    result, _, _ = _train((sample, ds, label_index, no_val), tmp_path, epochs=1)
    assert "val_ema/loss" not in result.history[0] and result.best["weights"] == "raw"
