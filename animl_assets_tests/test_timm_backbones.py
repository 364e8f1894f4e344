"""timm backbones by name (``model_name: timm/<name>``): built by timm, weights loaded by timm's own code from
a local file (offline) or the Hugging Face hub, preprocessing from the model's config, and through the
Definitions from training to classifications."""

import json
from pathlib import Path

import dagster as dg
import huggingface_hub.constants
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

from animl_assets.core.ml.frames import MEANS, STDS, Preprocessing
from animl_assets.core.ml.models import build_model, head, lite0_timm_state_dict, load_weights
from animl_assets.core.ml.recipe import (
    PretrainedWeightsUnavailable,
    check_model_name,
    default_image_size,
    model_preprocessing,
)
from animl_assets.definitions import CLASSIFY_JOB, TRAIN_JOB, build_definitions
from animl_assets_tests.conftest import dataset_home, latest_version
from animl_assets_tests.test_pretrained import real_crops, top5_found
from animl_assets_tests.test_registry_assets import _materialized


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """No hub requests (this machine has no route to it; unset, each attempt retries for ~45 s)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _weights_file(folder, name: str, suffix: str) -> tuple[torch.nn.Module, str]:
    """A timm model with its ImageNet head, as timm builds it, and its state dict saved as ``suffix``."""
    torch.manual_seed(3)
    source = timm.create_model(name, pretrained=False).eval()
    path = folder / f"{name}{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    return source, str(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_local_weights_file_gives_timms_own_logits_and_a_new_head_for_other_labels(tmp_path, suffix):
    source, path = _weights_file(tmp_path, "test_convnext", suffix)
    batch = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ours = build_model("timm/test_convnext", 1000, pretrained=path).eval()
    with torch.no_grad():
        assert (ours(batch) - source(batch)).abs().max().item() <= 1e-5

    five = build_model("timm/test_convnext", 5, pretrained=path, finetune=True)
    body = {k: v for k, v in source.state_dict().items() if not k.startswith("head.fc.")}
    assert all(torch.equal(five.state_dict()[k], v) for k, v in body.items())
    assert head(five).out_features == 5
    assert {n for n, p in five.named_parameters() if p.requires_grad} == {"head.fc.weight", "head.fc.bias"}


def test_a_checkpoint_of_the_same_labels_keeps_its_head_and_of_other_labels_gets_a_new_one():
    trained = build_model("timm/test_convnext", 4)
    assert load_weights(build_model("timm/test_convnext", 4), trained.state_dict()) is True
    fresh = build_model("timm/test_convnext", 3)
    assert load_weights(fresh, trained.state_dict()) is False
    assert head(fresh).out_features == 3
    again = build_model("timm/test_convnext", 4, pretrained={"model": trained.state_dict(), "epoch": 1})
    assert torch.equal(head(again).weight, head(trained).weight)


def test_offline_without_a_file_is_one_line_naming_the_file_to_provide():
    with pytest.raises(PretrainedWeightsUnavailable) as raised:
        build_model("timm/convnext_tiny", 4, pretrained=True)
    message = str(raised.value)
    assert "\n" not in message and len(message) < 500
    assert "timm/convnext_tiny.in12k_ft_in1k" in message and "model.safetensors" in message
    assert "pretrained: /path/to/model.safetensors" in message


def test_a_weights_file_that_does_not_fit_is_a_clear_error(tmp_path):
    _, path = _weights_file(tmp_path, "test_efficientnet", ".safetensors")
    with pytest.raises(PretrainedWeightsUnavailable, match="timm cannot load timm/test_convnext's weights"):
        build_model("timm/test_convnext", 4, pretrained=path)
    with pytest.raises(ValueError, match="loaded by timm"):
        build_model("efficientnet-b0", 4, pretrained=path)


def test_unknown_names_are_refused_with_how_to_list_them():
    assert check_model_name("timm/convnext_tiny.fb_in22k") == "timm/convnext_tiny.fb_in22k"
    with pytest.raises(ValueError, match=r"timm has no model 'convnext_teeny'.*list_models"):
        check_model_name("timm/convnext_teeny")
    with pytest.raises(ValueError, match="or timm/<name>"):
        check_model_name("convnext_tiny")


def test_size_mean_std_and_interpolation_come_from_the_models_own_config():
    assert default_image_size("timm/tf_efficientnetv2_s") == 300 and default_image_size("timm/efficientnet_b3") == 288
    assert model_preprocessing("timm/tf_efficientnetv2_s", 300) == Preprocessing(300, (0.5,) * 3, (0.5,) * 3)
    assert model_preprocessing("timm/convnext_tiny", 224) == Preprocessing(224, MEANS, STDS, "bicubic")
    assert model_preprocessing("efficientnet-lite0", 128) == Preprocessing(128)  # as efficientnet-lite-pytorch
    assert model_preprocessing("efficientnet-b0", 224) == Preprocessing(224)
    # params.json and preprocessing.json written before these fields existed: the ImageNet values of then
    assert Preprocessing.of({"image_size": 96}) == Preprocessing(96, MEANS, STDS, "bicubic")
    assert Preprocessing.of(model_preprocessing("timm/tf_efficientnetv2_s", 300).record()).mean == (0.5,) * 3


def test_packaged_lite0_loads_as_timms_tf_lite0_and_ranks_real_animals_in_its_top_five(tmp_path, ena24_dir):
    path = tmp_path / "tf_efficientnet_lite0.safetensors"
    save_file(lite0_timm_state_dict(), str(path))
    ours = build_model("timm/tf_efficientnet_lite0", 1000, pretrained=str(path)).eval()
    lite0 = build_model("efficientnet-lite0", 1000, pretrained="lite0").eval()
    batch = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(batch) - lite0(batch)).abs().max().item() <= 1e-5
    crops, labels = real_crops(ena24_dir, model_preprocessing("timm/tf_efficientnet_lite0", 224))
    assert sum(top5_found(ours, crops, labels)) >= 8


# ---- through the Definitions ----------------------------------------------------------------------------

TIMM_TRAINING = {"model_name": "timm/test_convnext", "image_size": 64, "epochs": 2, "finetune": 1,
                 "batch_size": 16, "num_workers": 0, "progress_every": 0}


def _run(settings, dagster_home, job, partition=None, **ops):
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        result = build_definitions(settings).resolve_job_def(job).execute_in_process(
            instance=instance, raise_on_error=False, partition_key=partition,
            run_config={"ops": {name: {"config": config} for name, config in ops.items()}})
    assert result.success, [e.step_failure_data.error.to_string() for e in result.get_step_failure_events()]
    return result


@pytest.mark.slow
def test_a_timm_backbone_from_a_local_file_trains_registers_and_classifies_on_torch_and_onnx(
        tmp_path_factory, built_dataset_home):
    settings, dagster_home = dataset_home(tmp_path_factory.mktemp("timm"), built_dataset_home)
    torch.manual_seed(0)
    weights = tmp_path_factory.mktemp("weights") / "test_convnext.safetensors"
    save_file(timm.create_model("test_convnext", pretrained=False).state_dict(), str(weights))
    trained = _run(settings, dagster_home, TRAIN_JOB,
                   classifier_checkpoint=TIMM_TRAINING | {"pretrained": str(weights)},
                   classifier_evaluation={"num_workers": 0})
    evaluated = _materialized(trained, "classifier_evaluation")
    assert max(evaluated[f"{form}_max_abs_diff"] for form in ("torchscript", "onnx", "torch_export")) <= 1e-4
    assert _materialized(trained, "registered_model")["runtimes"] == "torchscript, onnx, torch.export"
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        params = json.loads((latest_version(settings, instance, "classifier_checkpoint") / "params.json").read_text())
        evaluation = latest_version(settings, instance, "classifier_evaluation")
        [partition] = instance.get_dynamic_partitions("exports")
    assert params["model_name"] == "timm/test_convnext" and params["pretrained"] == str(weights)
    assert (params["mean"], params["std"], params["interpolation"]) == ([0.5] * 3, [0.5] * 3, "bicubic")

    from mlflow import MlflowClient

    from animl_assets.core.registry import registry, tracking

    uri = tracking.embedded_tracking_uri(settings.home)
    champion = MlflowClient(uri, uri).get_model_version_by_alias(registry.DEFAULT_MODEL, registry.CHAMPION)
    files = registry.model_files(uri, champion)
    assert files.preprocessing["mean"] == [0.5] * 3 and files.preprocessing["image_size"] == 64
    assert files.onnx and files.exported  # registered beside TorchScript

    # the champion classifies the export as the evaluation saw its crops: the same probabilities, which
    # ImageNet's mean and std in place of the model's own would change
    _run(settings, dagster_home, CLASSIFY_JOB, partition, classifications={"num_workers": 0})
    [output_file] = (settings.home / "artifacts" / "classifications").rglob("classifier_output.csv.gz")
    output = pd.read_csv(output_file).set_index("path")
    test = pd.read_csv(evaluation / "outputs_test.csv.gz")
    test = test.set_index(test["path"].str.split("/", n=1).str[1])  # the dataset's paths: <export>/<crop>
    names = [c for c in test.columns if c not in ("path", "label", "weight")]
    assert len(test) > 0 and set(test.index) <= set(output.index)
    assert (output.loc[test.index, names] - test[names]).abs().max().max() < 1e-4

    # and on ONNX Runtime, from the registered ONNX model: the same probabilities
    onnx_run = _run(settings, dagster_home, CLASSIFY_JOB, partition, classifications={"num_workers": 0,
                                                                                      "runtime": "onnx"})
    assert _materialized(onnx_run, "classifications")["runtime"] == "onnx"
    on_onnx = pd.read_csv(output_file).set_index("path")
    assert len(on_onnx) == len(output) and (on_onnx[names] - output[names]).abs().max().max() < 1e-4


def test_a_weights_file_in_s3_is_copied_to_the_cache_for_timm_and_a_checkpoint_keeps_its_head(
        tmp_path, moto_endpoint, s3_client, bucket):
    from dagster_aws.s3 import S3Resource

    from animl_assets.assets.training import TrainingConfig, _pretrained_weights
    from animl_assets.resources.storage import ArtifactStore

    source, path = _weights_file(tmp_path, "test_convnext", ".safetensors")
    s3_client.upload_file(path, bucket, "weights/test_convnext.safetensors")
    storage = ArtifactStore(uri=f"s3://{bucket}/artifacts", home=str(tmp_path / "home"),
                            s3=S3Resource(endpoint_url=moto_endpoint))
    config = TrainingConfig(model_name="timm/test_convnext", pretrained=f"s3://{bucket}/weights/test_convnext.safetensors")
    local, fingerprint = _pretrained_weights(config, storage)
    assert isinstance(local, str) and local.startswith(str(tmp_path / "home")) and len(fingerprint) == 64
    assert _pretrained_weights(config, storage) == (local, fingerprint)  # the same copy, the same key
    model = build_model("timm/test_convnext", 1000, pretrained=local).eval()
    batch = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (model(batch) - source(batch)).abs().max().item() <= 1e-5

    # this project's checkpoint of a timm model is a checkpoint, not a weights file: its head is kept
    trained = build_model("timm/test_convnext", 4)
    torch.save({"epoch": 3, "model": trained.state_dict()}, tmp_path / "ckpt_best.pt")
    weights, _ = _pretrained_weights(TrainingConfig(model_name="timm/test_convnext", pretrained=str(tmp_path / "ckpt_best.pt")),
                                  storage)
    assert torch.equal(head(build_model("timm/test_convnext", 4, pretrained=weights)).weight, head(trained).weight)


def test_a_weights_file_named_in_capitals_loads_and_one_that_is_not_a_weights_file_is_a_clear_stop(tmp_path):
    from animl_assets.assets.training import TrainingConfig, _pretrained_weights
    from animl_assets.resources.storage import ArtifactStore

    source, path = _weights_file(tmp_path, "test_convnext", ".safetensors")
    shouted = tmp_path / "TEST_CONVNEXT.SAFETENSORS"
    shouted.write_bytes(Path(path).read_bytes())
    storage = ArtifactStore(uri=str(tmp_path / "artifacts"), home=str(tmp_path / "home"))
    local, _ = _pretrained_weights(TrainingConfig(model_name="timm/test_convnext", pretrained=str(shouted)), storage)
    model = build_model("timm/test_convnext", 1000, pretrained=local).eval()
    batch = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (model(batch) - source(batch)).abs().max().item() <= 1e-5

    junk = tmp_path / "weights.pth"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    for model_name in ("timm/test_convnext", "efficientnet-b0"):
        with pytest.raises(dg.Failure, match="weights.pth' cannot be read"):
            _pretrained_weights(TrainingConfig(model_name=model_name, pretrained=str(junk)), storage)
