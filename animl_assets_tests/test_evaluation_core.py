"""core.evaluation on hand-made outputs: scikit-learn's numbers, the reference's formats and semantics,
thresholds, target mapping, TorchScript parity."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm

from animl_assets.core.artifact_files import from_files, to_files
from animl_assets.core.ingest.sample import write_sample_crops
from animl_assets.core.ml import evaluation as ev
from animl_assets.core.ml.frames import Preprocessing, split_frame
from animl_assets.core.ml.labels import target_columns
from animl_assets.core.ml.models import build_model
from animl_assets.core.ml.portable import ONNX_OPSET, max_difference

NAMES = ["cat", "deer", "fox", "owl"]


def _outputs(n=60, labels=NAMES, seed=0, weights=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(labels), n)
    logits = rng.normal(size=(n, len(labels))) + 2.0 * np.eye(len(labels))[y]
    probs = ev.softmax(logits)
    w = np.ones(n) if weights is None else weights
    return ev.outputs_frame([f"c{i}.jpg" for i in range(n)], [labels[i] for i in y], w, probs, labels), y, probs


def test_overall_metrics_are_scikit_learns_in_percent_and_weighted_as_the_reference():
    weights = np.random.default_rng(1).uniform(0.2, 2.0, 60)
    outputs, y, probs = _outputs(weights=weights)
    probs = outputs[NAMES].to_numpy(dtype=float)
    metrics = ev.overall_metrics(outputs, NAMES)
    labels = np.arange(4)
    assert metrics["acc_top1"] == pytest.approx(100 * skm.accuracy_score(y, probs.argmax(1)))
    assert metrics["acc_top3"] == pytest.approx(100 * skm.top_k_accuracy_score(y, probs, k=3, labels=labels))
    assert metrics["loss"] == pytest.approx(skm.log_loss(y, probs, labels=labels), rel=1e-5)
    # the reference divides the weighted sums by the number of crops
    hits = (probs.argmax(1) == y).astype(float)
    assert metrics["acc_weighted_top1"] == pytest.approx(100 * (hits * weights).sum() / len(y))
    losses = -np.log(probs[np.arange(len(y)), y])
    assert metrics["loss_weighted"] == pytest.approx((losses * weights).sum() / len(y), rel=1e-5)
    assert metrics["acc_weighted_top1"] != pytest.approx(metrics["acc_top1"])


def test_two_labels_give_top2_where_the_reference_crashes_on_top3():
    outputs, y, probs = _outputs(labels=["a", "b"])
    metrics = ev.overall_metrics(outputs, ["a", "b"])
    assert metrics["acc_top3"] == 100.0
    assert metrics["acc_top1"] == pytest.approx(100 * skm.accuracy_score(y, outputs[["a", "b"]].to_numpy().argmax(1)))
    assert ev.confusion(outputs, ["a", "b"]).shape == (2, 2)


def test_label_stats_keep_the_reference_semantics_and_the_report_adds_f1_and_macro():
    outputs, y, _ = _outputs()
    absent = outputs[outputs["label"] != "owl"].copy()  # owl: no crops; may still be predicted
    stats = ev.label_stats(absent, NAMES, "test")
    assert tuple(stats.columns) == ev.LABEL_STATS_COLUMNS
    owl = stats.set_index("label").loc["owl"]
    assert np.isnan(owl["recall"]) and owl["precision"] == 0.0  # reference: recall NaN without ground truth
    report = ev.label_report(absent, NAMES, "test").set_index("label")
    pred = absent[NAMES].to_numpy().argmax(1)
    truth = absent["label"].map({n: i for i, n in enumerate(NAMES)})
    f1 = skm.f1_score(truth, pred, labels=np.arange(4), average=None, zero_division=np.nan)
    assert np.allclose(report.loc[NAMES, "f1"].to_numpy(dtype=float), f1, equal_nan=True)
    assert report.loc[ev.MACRO, "recall"] == pytest.approx(
        skm.recall_score(truth, pred, labels=[0, 1, 2], average="macro"))
    assert ev.macro_recall(absent, NAMES) == pytest.approx(report.loc[ev.MACRO, "recall"])


def test_thresholds_are_the_lowest_confidence_reaching_the_target_precision():
    # fox predictions at confidences 0.9, 0.8, 0.7, 0.6, 0.5: right, right, wrong, right, wrong
    conf = [0.9, 0.8, 0.7, 0.6, 0.5]
    truth = ["fox", "fox", "cat", "fox", "cat"]
    probs = np.array([[(1 - c) / 3, (1 - c) / 3, c, (1 - c) / 3] for c in conf])
    outputs = ev.outputs_frame([f"{i}" for i in range(5)], truth, np.ones(5), probs, ["cat", "deer", "fox", "owl"])
    found = ev.thresholds(outputs, ["cat", "deer", "fox", "owl"], target_precision=0.95)["labels"]
    assert found["fox"]["threshold"] == pytest.approx(0.8)  # above 0.8 every fox prediction is right
    assert found["fox"]["precision"] == 1.0 and found["fox"]["recall"] == pytest.approx(2 / 3)
    lenient = ev.thresholds(outputs, ["cat", "deer", "fox", "owl"], target_precision=0.75)["labels"]
    assert lenient["fox"]["threshold"] == pytest.approx(0.6)  # 3 of 4 right from 0.6 up
    assert found["cat"]["threshold"] is None  # cat is never predicted: no threshold
    table = ev.thresholds_table({"labels": found})
    assert list(table.columns) == ["label", "threshold", "precision", "recall"]


def test_target_mapping_sums_probabilities_and_sends_unmapped_labels_to_other():
    model_labels = ["red_fox", "grey_fox", "white_tailed_deer", "moose", "blank"]
    names, columns = target_columns(model_labels, ["deer", "fox"],
                                       {"fox": ["red_fox", "grey_fox"], "deer": ["white_tailed_deer"]})
    assert names == ["deer", "fox", "other"] and columns == [[2], [0, 1], [3, 4]]
    logits = torch.randn(7, 5)
    mapped = torch.softmax(ev.map_logits(logits, columns), dim=1)
    probs = torch.softmax(logits, dim=1)
    assert torch.allclose(mapped[:, 1], probs[:, 0] + probs[:, 1], atol=1e-6)
    assert torch.allclose(mapped[:, 2], probs[:, 3] + probs[:, 4], atol=1e-6)
    with pytest.raises(ValueError, match="does not have"):
        target_columns(model_labels, ["fox"], {"fox": ["arctic_fox"]})
    # without a mapping, labels match by name; a target the model lacks gets probability 0
    names, columns = target_columns(["fox", "cat"], ["deer", "fox"])
    assert names == ["deer", "fox", "other"] and columns == [[], [0], [1]]
    assert torch.softmax(ev.map_logits(torch.randn(3, 2), columns), 1)[:, 0].eq(0).all()


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory):
    sample = write_sample_crops(tmp_path_factory.mktemp("crops"), labels=3, crops_per_label_and_location=2, size=64)
    ds = pd.read_csv(sample.dataset_dir / "classification_ds.csv")
    label_index = json.loads((sample.dataset_dir / "label_index.json").read_text())
    splits = json.loads((sample.dataset_dir / "splits.json").read_text())
    return sample, ds, label_index, splits


@pytest.mark.parametrize("label_weighted", [True, False])
def test_evaluate_writes_every_split_and_standalone_models_that_agree(sample_set, label_weighted):
    sample, ds, label_index, splits = sample_set
    frame = split_frame(ds, label_index, splits, label_weighted)
    torch.manual_seed(0)
    model = build_model("resnet18", len(label_index), image_size=64)
    result, gaps = ev.evaluate(model, frame, sample.crops_dir, label_index, Preprocessing(64), torch.device("cpu"),
                               portable=label_weighted)
    assert set(gaps) == ({"torchscript", "onnx", "torch_export"} if label_weighted else {"torchscript"})
    assert all(gap < 1e-4 for gap in gaps.values())
    assert bool(result.onnx) == bool(result.exported) == label_weighted
    for split in ("train", "val", "test"):
        assert len(result.outputs(split)) == (frame["split"] == split).sum()
    if not label_weighted:
        assert (result.outputs_val["weight"] == 1).all()
        assert np.allclose(result.overall_metrics["acc_top1"], result.overall_metrics["acc_weighted_top1"])
    scripted = ev.load_script(bytes(result.compiled))
    again, names = ev.evaluate_scripted(scripted, result.names, result.outputs_test, sample.crops_dir, Preprocessing(64),
                                        torch.device("cpu"))
    assert names == result.names
    assert np.allclose(again[names].to_numpy(), result.outputs_test[names].to_numpy(), atol=1e-5)

    # stored and read back as the reference's files
    files = to_files(result, "classifier_evaluation")
    assert {"outputs_test.csv.gz", "overall_metrics.csv", "confusion_matrices.npz", "label_stats.csv",
            "ckpt_best_compiled.pt", "thresholds.json"} <= set(files)
    assert files["outputs_test.csv.gz"][:2] == b"\x1f\x8b"
    back = from_files(files.__getitem__)
    pd.testing.assert_frame_equal(back.overall_metrics, result.overall_metrics)
    assert bytes(back.compiled) == bytes(result.compiled)
    assert ({"model.onnx", "model.pt2"} <= set(files)) == label_weighted  # not exported: no empty files
    assert bytes(back.onnx) == bytes(result.onnx) and bytes(back.exported) == bytes(result.exported)


def test_parity_tells_a_compiled_model_from_another():
    model, other = build_model("resnet18", 3, image_size=64), build_model("resnet18", 3, image_size=64)
    batch = torch.rand(2, 3, 64, 64)
    for form, (_, runnable) in ev.compiled_forms(other, 64).items():
        assert max_difference(other, runnable, batch) < 1e-5, form
        assert max_difference(model, runnable, batch) > 1e-4, form


@pytest.mark.parametrize("model_name, size", [("efficientnet-lite0", 224), ("efficientnet-b0", 96),
                                              ("timm/test_convnext", 96)])
def test_onnx_and_torch_export_give_the_eager_logits_on_real_crops_for_any_batch(ena24_dir, model_name, size):
    """ONNX (opset pinned, batch dimension named and dynamic) and the torch.export program, loaded from their
    bytes, against the eager model on real ENA24 crops: Lite0 with its ImageNet weights, b0 and a timm model."""
    import onnx

    from animl_assets_tests.test_pretrained import real_crops

    torch.manual_seed(0)
    pretrained = "lite0" if model_name == "efficientnet-lite0" else False
    model = build_model(model_name, 1000, pretrained=pretrained, image_size=size).eval()
    crops, _ = real_crops(ena24_dir, Preprocessing(size))
    forms = ev.compiled_forms(model, size)
    proto = onnx.load_from_string(forms["onnx"][0])
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [ONNX_OPSET]
    assert [i.type.tensor_type.shape.dim[0].dim_param for i in proto.graph.input] == ["batch"]
    with torch.no_grad():
        eager = model(crops)
    for form, (_, runnable) in forms.items():
        for batch in (crops[:1], crops):  # one crop, then all of them: the batch is dynamic
            logits = runnable(batch).float()
            assert (logits - eager[: len(batch)]).abs().max().item() <= 1e-4, form


def test_the_file_columns_are_the_reference_evaluate_models():
    # evaluate_model.py: metrics keys 'loss', 'loss_weighted', 'acc_top{k}', 'acc_weighted_top{k}' for k in (1, 3),
    # written with the split as the index column; label_stats: split, label, precision, recall
    reference_metrics = {"loss", "loss_weighted", "acc_top1", "acc_top3", "acc_weighted_top1", "acc_weighted_top3"}
    assert ev.OVERALL_COLUMNS[0] == "split" and set(ev.OVERALL_COLUMNS[1:]) == reference_metrics
    outputs, _, _ = _outputs()
    overall, cms, stats, _ = ev.summarize({"train": outputs, "val": outputs, "test": outputs}, NAMES)
    assert tuple(overall.columns) == ev.OVERALL_COLUMNS and list(overall["split"]) == ["train", "val", "test"]
    assert tuple(stats.columns) == ("split", "label", "precision", "recall") and len(stats) == 3 * len(NAMES)
    assert sorted(cms) == ["test", "train", "val"]
    assert list(outputs.columns) == ["path", "label", "weight", *NAMES]
