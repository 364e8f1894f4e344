"""The pure parts of multi-output models: annotation fields as classes, the masked per-output loss, the heads'
checkpoint layout and the class-mapping transfer."""

import math

import pandas as pd
import pytest
import torch

from animl_assets.core.artifact_files import from_files, to_files
from animl_assets.core.dataset.classification import DatasetVersion
from animl_assets.core.dataset.outputs import (
    MISSING,
    OutputSpecError,
    annotation_fields,
    crop_outputs,
    output_index,
    parse_outputs,
)
from animl_assets.core.ml.models import MultiHead, build_model, checkpoint_weights, model_from_checkpoint
from animl_assets.core.ml.training import OutputLoss
from animl_assets.core.ml.transfer import ClassMappingError, mapped_rows, parse_class_mapping


def test_counts_are_binned_flags_read_as_yes_no_and_unreadable_values_stay_missing():
    seen = {"standing": [True, False, None], "eating": [0.0, 0.6, 1], "age": ["adult", "juvenile"]}
    count, standing, eating, age = parse_outputs(["species", "count", "standing", "eating", "age"], seen=seen)
    assert count.classes == ["1", "2", "3-5", "6+"]
    assert [count.classify(v) for v in (1, "2", 4.0, "11-50", "51+", 0, None, "", "many", float("nan"))] == \
        ["1", "2", "3-5", "6+", "6+", MISSING, MISSING, MISSING, MISSING, MISSING]
    assert [standing.classify(v) for v in (True, False, "yes", "0", None)] == ["yes", "no", "yes", "no", MISSING]
    assert [eating.classify(v) for v in (0.6, 0.4, 1, 2)] == ["yes", "no", "yes", MISSING]  # volunteers' share
    assert age.kind == "category" and age.classify("Adult") == "adult"
    [mapped] = parse_outputs(["age"], values={"age": {"adult": "grown", "subadult": "grown"}})
    assert mapped.classify("SubAdult") == "grown" and mapped.classify("juvenile") == MISSING
    [custom] = parse_outputs(["count"], bins={"count": [1, 3, 10]})
    assert custom.classes == ["1-2", "3-9", "10+"] and custom.classify(12) == "10+"


def test_output_specs_that_cannot_work_are_refused_naming_each_problem():
    with pytest.raises(OutputSpecError) as err:
        parse_outputs(["count", "count", "standing"], bins={"count": [3, 1], "size": [1]})
    message = str(err.value)
    assert "named twice" in message and "'size'" in message and "increasing" in message


def test_each_crop_gets_its_images_annotation_of_its_class_and_disagreeing_ones_are_missing():
    export = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
              "categories": [{"id": 1, "name": "lion"}, {"id": 2, "name": "zebra"}],
              "annotations": [{"image_id": 1, "category_id": 1, "count": 2, "standing": True},
                              {"image_id": 1, "category_id": 2, "count": 7},
                              {"image_id": 2, "category_id": 1, "standing": True},
                              {"image_id": 2, "category_id": 1, "standing": False}]}
    specs = parse_outputs(["count", "standing"], seen={"standing": [True, False]})
    crops = pd.DataFrame({"image": ["a.jpg", "a.jpg", "b.jpg"], "dataset_class": ["lion", "zebra", "lion"]})
    out, report = crop_outputs(crops, annotation_fields(export, ["count", "standing"]), specs)
    assert list(out["count"]) == ["2", "6+", MISSING] and list(out["standing"]) == ["yes", MISSING, MISSING]
    assert report["standing"] == {"missing": 1, "conflicting": 1}
    assert output_index(out, specs) == {"count": {"0": "1", "1": "2", "2": "3-5", "3": "6+"},
                                        "standing": {"0": "no", "1": "yes"}}


def test_a_dataset_version_keeps_one_index_file_per_output_and_a_species_only_one_its_old_files():
    ds = pd.DataFrame({"path": ["a"], "dataset": ["d"], "location": ["l"], "dataset_class": ["lion"],
                       "confidence": [1.0], "label": ["lion"], "count": ["2"]})
    plain = DatasetVersion(ds.drop(columns="count"), {"0": "lion"}, {}, [])
    assert "label_index_count.json" not in to_files(plain, "classification_dataset")
    version = DatasetVersion(ds, {"0": "lion"}, {}, [], {"count": {"0": "1", "1": "2"}})
    files = to_files(version, "classification_dataset")
    assert files["label_index_count.json"].startswith(b"{")
    loaded = from_files(files.__getitem__)
    assert loaded.output_index == version.output_index and list(loaded.classification_ds["count"]) == ["2"]
    assert to_files(loaded, "classification_dataset") == files  # read back, it keeps its version


def test_the_extra_outputs_loss_leaves_missing_labels_out_and_weights_each_output():
    loss = OutputLoss(3, {"count": 4, "standing": 2}, {"count": 0.5})
    logits = torch.randn(2, 3 + 4 + 2, requires_grad=True)
    labels = torch.tensor([[0, 2, -1], [1, -1, -1]])
    per_crop = loss(logits, labels)
    expected = 0.5 * torch.nn.functional.cross_entropy(logits[:1, 3:7], torch.tensor([2]))
    assert per_crop[0].item() == pytest.approx(expected.item()) and per_crop[1].item() == 0.0
    per_crop.sum().backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0, 7:].abs().sum() == 0  # missing: no gradient
    sums = loss.sums(torch.device("cpu"))
    loss.add(sums, logits.detach(), labels)
    metrics = loss.metrics(sums)
    assert metrics["count/count"] == 1 and metrics["standing/count"] == 0 and metrics["standing/acc_top1"] == 0


def test_a_multi_head_checkpoint_keeps_the_species_model_in_the_reference_layout():
    torch.manual_seed(0)
    model = MultiHead(build_model("resnet18", 3), {"count": 4})
    weights = checkpoint_weights(model)
    assert set(weights["model"]) == set(build_model("resnet18", 3).state_dict())  # the reference loads it alone
    assert weights["outputs"] == {"count": 4}
    loaded = model_from_checkpoint(weights, "resnet18", 3).eval()
    images = torch.rand(2, 3, 64, 64)
    logits = loaded(images)
    assert logits.shape == (2, 7) and torch.allclose(logits, model.eval()(images), atol=1e-5)
    assert torch.allclose(logits[:, :3], loaded.model(images), atol=1e-5)  # the species head alone


def test_mapped_rows_merge_old_classes_keep_names_and_start_unknown_ones_at_zero():
    weight, bias = torch.randn(3, 5), torch.tensor([0.0, 1.0, 2.0])
    rows, biases, sources = mapped_rows(weight, bias, ["fox", "deer", "raccoon"], ["deer", "predator", "bird"],
                                        {"predator": ["fox", "raccoon"]})
    assert sources == {"deer": ["deer"], "predator": ["fox", "raccoon"], "bird": []}
    assert torch.equal(rows[0], weight[1]) and torch.allclose(rows[1], (weight[0] + weight[2]) / 2)
    assert biases[1].item() == pytest.approx(math.log(math.exp(0) + math.exp(2)))
    assert rows[2].abs().sum() == 0 and biases[2] == 0
    with pytest.raises(ClassMappingError, match="does not have: \\['wolf'\\]"):
        mapped_rows(weight, bias, ["fox", "deer", "raccoon"], ["predator"], {"predator": ["wolf"]})
    assert parse_class_mapping({"predator": ["fox"]}) == {"species": {"predator": ["fox"]}}
    with pytest.raises(ClassMappingError, match="neither species nor an output"):
        parse_class_mapping({"size": {"big": ["large"]}}, ["count"])


def test_a_csv_beside_the_export_gives_values_per_image_or_per_image_and_class():
    from animl_assets.core.dataset.outputs import csv_fields

    crops = pd.DataFrame({"image": ["a.jpg", "a.jpg", "b.jpg"], "dataset_class": ["lion", "zebra", "lion"]})
    per_image = csv_fields(b"file,count\na.jpg,3\nb.jpg,\n", ["count"], crops)
    [count] = parse_outputs(["count"])
    out, report = crop_outputs(crops, per_image, [count])
    assert list(out["count"]) == ["3-5", "3-5", MISSING] and report["count"]["missing"] == 1
    per_class = csv_fields(b"file,class,count\na.jpg,zebra,1\n", ["count"], crops)
    assert list(crop_outputs(crops, per_class, [count])[0]["count"]) == [MISSING, "1", MISSING]
    with pytest.raises(OutputSpecError, match="lacks the columns \\['count'\\]"):
        csv_fields(b"file,size\na.jpg,1\n", ["count"], crops)


def test_an_outputs_class_that_looks_like_a_number_reads_back_as_written():
    ds = pd.DataFrame({"path": ["a", "b"], "dataset": ["d", "d"], "location": ["l", "l"],
                       "dataset_class": ["lion", "lion"], "confidence": [1.0, 1.0], "label": ["lion", "lion"],
                       "age": ["01", ""]})
    version = DatasetVersion(ds, {"0": "lion"}, {}, [], {"age": {"0": "01"}})
    loaded = from_files(to_files(version, "classification_dataset").__getitem__)
    assert list(loaded.classification_ds["age"]) == ["01", ""]  # not 1: the class its index names
