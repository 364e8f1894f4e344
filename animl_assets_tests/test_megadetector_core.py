import json
import sys
import types

import pytest

from animl_assets.core.detect.detector import DetectorUnavailable, run_megadetector
from animl_assets.core.detect.megadetector import (
    animal_category,
    box_labels,
    cct_to_md,
    images_without_boxes,
    merge_detections,
    upgrade_batch_output,
    validate_batch_output,
)

CCT = {
    "images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 100},
               {"id": 2, "file_name": "b.jpg", "width": 50, "height": 50},
               {"id": 3, "file_name": "c.jpg"}, {"id": 4, "file_name": "d.jpg"}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 10, 100, 50]},
                    {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 200, 100]},
                    {"id": 3, "image_id": 2, "category_id": 0},
                    {"id": 4, "image_id": 3, "category_id": 1, "bbox": [5, 5, 10, 10]},
                    {"id": 5, "image_id": 4, "category_id": 1}],
    "categories": [{"id": 0, "name": "empty"}, {"id": 1, "name": "deer"}, {"id": 2, "name": "Human"}],
}
OLD_MD = {  # format 1.1, with a 'group' category, a failure and max_detection_conf
    "info": {"format_version": "1.1", "detector": "megadetector_v3"},
    "detection_categories": {"1": "animal", "2": "person", "3": "group", "4": "vehicle"},
    "images": [
        {"file": "b.jpg", "max_detection_conf": 0.9,
         "detections": [{"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.5, 0.5]},
                        {"category": "3", "conf": 0.4, "bbox": [0.0, 0.0, 1.0, 1.0]}]},
        {"file": "a.jpg", "max_detection_conf": 0.7, "detections": [{"category": "1", "conf": 0.7,
                                                                     "bbox": [0.5, 0.5, 0.1, 0.1]}]},
        {"file": "x.jpg", "failure": "Failure image access"},
    ],
}


def test_cct_to_md_normalizes_boxes_and_maps_people():
    md = cct_to_md(CCT, image_sizes={"c.jpg": (100, 50)})
    assert md["info"]["format_version"] == "1.4" and md["info"]["detector"] == "cct_to_md"
    assert md["detection_categories"] == {"1": "animal", "2": "person", "3": "vehicle"}
    first = md["images"][0]
    assert first["file"] == "a.jpg"
    assert first["detections"] == [{"category": "1", "conf": 1.0, "bbox": [0.1, 0.1, 0.5, 0.5]},
                                   {"category": "2", "conf": 1.0, "bbox": [0.0, 0.0, 1.0, 1.0]}]
    assert md["images"][1] == {"file": "c.jpg", "detections": [{"category": "1", "conf": 1.0,
                                                                "bbox": [0.05, 0.1, 0.1, 0.2]}]}
    assert [i["file"] for i in md["images"]] == ["a.jpg", "c.jpg"]  # only images with boxes
    assert images_without_boxes(CCT) == ["b.jpg", "d.jpg"]
    assert validate_batch_output(md) == []


def test_unknown_image_size_becomes_a_failure_entry():
    md = cct_to_md(CCT)
    assert md["images"][1] == {"file": "c.jpg", "failure": "image size unknown: cannot normalize boxes"}
    assert validate_batch_output(md) == []


def test_old_format_is_valid_and_upgraded():
    assert validate_batch_output(OLD_MD) == []
    new = upgrade_batch_output(OLD_MD)
    assert new["info"]["format_version"] == "1.4"
    assert "max_detection_conf" not in new["images"][0]
    assert new["images"][2] == {"file": "x.jpg", "failure": "Failure image access", "detections": None}
    assert new["detection_categories"]["3"] == "group"
    assert validate_batch_output(new) == [] and OLD_MD["info"]["format_version"] == "1.1"


@pytest.mark.parametrize("change, message", [
    (lambda md: md["info"].update(format_version="1.0"), "must be 1.1 or later"),
    (lambda md: md["detection_categories"].update({"x": "thing"}), "not a string int"),
    (lambda md: md["images"][0]["detections"][0].update(category=1), "not a string id"),
    (lambda md: md["images"][0]["detections"][0].update(bbox=[0.8, 0.1, 0.5, 0.5]), "not within 0-1"),
    (lambda md: md["images"][0]["detections"][0].update(conf=1.5), "must be a number in [0, 1]"),
    (lambda md: md["images"][2].update(detections=[{"category": "1", "conf": 0.5, "bbox": [0, 0, 1, 1]}]),
     "both a failure and detections"),
    (lambda md: md["images"].append({"file": "a.jpg", "detections": []}), "listed twice"),
    (lambda md: md["images"][1].pop("detections"), "needs a 'detections' list or a 'failure'"),
])
def test_validation_names_each_problem(change, message):
    md = upgrade_batch_output(OLD_MD)
    change(md)
    assert any(message in problem for problem in validate_batch_output(md)), validate_batch_output(md)


def test_classifications_must_be_sorted_and_known():
    md = upgrade_batch_output(OLD_MD)
    md["classification_categories"] = {"0": "deer", "1": "fox"}
    det = md["images"][0]["detections"][0]
    det["classifications"] = [["0", 0.2], ["1", 0.7]]
    assert any("not sorted" in p for p in validate_batch_output(md))
    det["classifications"] = [["1", 0.7], ["0", 0.2]]
    assert validate_batch_output(md) == []
    det["classifications"] = [["7", 0.7]]
    assert any("classification_categories" in p for p in validate_batch_output(md))


def test_export_boxes_win_over_detector_boxes_and_labels_follow():
    truth = cct_to_md(CCT, image_sizes={"c.jpg": (100, 50)})
    merged = merge_detections(truth, upgrade_batch_output(OLD_MD))
    by_file = {image["file"]: image for image in merged["images"]}
    assert sorted(by_file) == ["a.jpg", "b.jpg", "c.jpg", "x.jpg"]
    assert by_file["a.jpg"]["detections"][0]["conf"] == 1.0  # the export's box, not the detector's 0.7
    assert by_file["b.jpg"]["detections"][0]["conf"] == 0.9
    # the v3 file's "3: group, 4: vehicle" are renumbered onto the current table
    assert merged["detection_categories"] == {"1": "animal", "2": "person", "3": "vehicle", "4": "group"}
    assert [d["category"] for d in by_file["b.jpg"]["detections"]] == ["1", "4"]
    assert animal_category(merged) == "1"
    assert validate_batch_output(merged) == []
    labels = box_labels(CCT, merged)
    rows = {(r.file, r.detection_index): (r.label, r.source) for r in labels.itertuples()}
    assert rows[("a.jpg", 0)] == ("deer", "ground_truth") and rows[("a.jpg", 1)] == ("Human", "ground_truth")
    assert rows[("b.jpg", 0)] == ("empty", "detector")  # the image-level label of b.jpg
    renamed = merge_detections(truth, {**OLD_MD, "detection_categories": {"1": "animal", "3": "bird"}})
    assert renamed["detection_categories"]["4"] == "bird"


def test_detector_needs_weights_and_the_extra(tmp_path, monkeypatch):
    with pytest.raises(DetectorUnavailable, match="weights not found at .*md_v5a.0.0.pt"):
        run_megadetector(tmp_path / "md_v5a.0.0.pt", tmp_path, ["a.jpg"])
    with pytest.raises(DetectorUnavailable, match=r"\(not set\)"):
        run_megadetector("", tmp_path, ["a.jpg"])
    weights = tmp_path / "md_v5a.0.0.pt"
    weights.write_bytes(b"weights")
    monkeypatch.setitem(sys.modules, "megadetector", None)  # the extra is not installed
    with pytest.raises(DetectorUnavailable, match=r"pip install 'animl-assets\[detector\]'"):
        run_megadetector(weights, tmp_path, ["a.jpg"])


def test_detector_results_become_batch_output(tmp_path, monkeypatch):
    """The megadetector package's batch call stands in here (its weights cannot be downloaded offline)."""
    calls = {}

    def load_and_run_detector_batch(model_file, image_file_names, quiet, confidence_threshold):
        calls.update(model=model_file, files=image_file_names, threshold=confidence_threshold)
        return [{"file": image_file_names[0], "detections": [{"category": "1", "conf": 0.8, "bbox": [0, 0, .5, .5]}]},
                {"file": image_file_names[1], "failure": "Failure image access"}]

    module = types.ModuleType("megadetector.detection.run_detector_batch")
    module.load_and_run_detector_batch = load_and_run_detector_batch
    for name in ("megadetector", "megadetector.detection"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    weights = tmp_path / "md_v5a.0.0.pt"
    weights.write_bytes(b"weights")
    md = run_megadetector(weights, tmp_path, ["x/a.jpg", "b.jpg"], threshold=0.1)
    assert calls == {"model": str(weights), "files": [str(tmp_path / "x/a.jpg"), str(tmp_path / "b.jpg")],
                     "threshold": 0.1}
    assert md["info"]["detector"] == "md_v5a.0.0.pt"
    assert md["images"][0]["file"] == "x/a.jpg" and md["images"][1]["detections"] is None
    assert validate_batch_output(md) == []
    json.dumps(md)


def test_shared_md_file_is_valid(ena24_dir):
    md = json.loads((ena24_dir / "md_annotations.json").read_text())
    assert validate_batch_output(md) == []


def test_cct_to_md_clips_boxes_that_overhang_their_image():
    cct = {"images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 100}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [-10, 80, 50, 39]}],
           "categories": [{"id": 1, "name": "deer"}]}
    md = cct_to_md(cct)
    assert md["images"][0]["detections"][0]["bbox"] == [0.0, 0.8, 0.2, 0.2]
    assert validate_batch_output(md) == []


def test_an_empty_box_is_no_detection_and_its_image_is_empty_not_one_to_detect_on():
    """Animl writes "empty" as category 0 with a full-frame box; an image can also hold an animal box beside it."""
    cct = {"images": [{"id": "p:1", "file_name": "p/cam1/d/p-1.jpg", "width": 64, "height": 48},
                      {"id": "p:2", "file_name": "p/cam1/d/p-2.jpg", "width": 64, "height": 48},
                      {"id": "p:3", "file_name": "p/cam2/d/p-3.jpg", "width": 64, "height": 48}],
           "annotations": [{"id": "a1", "image_id": "p:1", "category_id": 0, "bbox": [0, 0, 64, 48]},
                           {"id": "a2", "image_id": "p:2", "category_id": 0, "bbox": [0, 0, 64, 48]},
                           {"id": "a3", "image_id": "p:2", "category_id": 3, "bbox": [8, 8, 16, 16]}],
           "categories": [{"id": 0, "name": "empty"}, {"id": 3, "name": "Mule Deer"}]}
    md = cct_to_md(cct)
    by_file = {image["file"]: image for image in md["images"]}
    assert by_file["p/cam1/d/p-1.jpg"]["detections"] == []  # MegaDetector's way of saying: nothing here
    assert [d["bbox"] for d in by_file["p/cam1/d/p-2.jpg"]["detections"]] == [[0.125, 8 / 48, 0.25, 16 / 48]]
    assert images_without_boxes(cct) == ["p/cam2/d/p-3.jpg"]  # the empty one is not sent to a detector
    assert validate_batch_output(md) == []
    # the export's "empty" wins over a detector's boxes for the same image
    detector = {"info": {"format_version": "1.4"}, "detection_categories": {"1": "animal"},
                "images": [{"file": "p/cam1/d/p-1.jpg", "detections": [{"category": "1", "conf": 0.8,
                                                                       "bbox": [0.1, 0.1, 0.2, 0.2]}]}]}
    merged = {image["file"]: image for image in merge_detections(md, detector)["images"]}
    assert merged["p/cam1/d/p-1.jpg"]["detections"] == []
    assert list(box_labels(cct, md)["label"]) == ["Mule Deer"]


def test_image_level_empty_labels_keep_their_meaning():
    """LILA-style: an ``empty`` annotation without a box leaves its image to the detector, as before."""
    assert "b.jpg" in images_without_boxes(CCT) and "b.jpg" not in {i["file"] for i in cct_to_md(CCT)["images"]}


def test_image_level_labels_of_detector_boxes_follow_what_a_person_reviewed():
    """A detector box labelled by its image: a reviewed label wins over a model's guess, and an image whose
    labels are all unreviewed gives unreviewed boxes (left out of the dataset by default)."""
    from animl_assets.core.detect.megadetector import unreviewed_boxes

    cct = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in ("guess", "both", "person", "boxed")],
           "annotations": [{"id": 1, "image_id": "guess", "category_id": 1, "validated": False},
                           {"id": 2, "image_id": "both", "category_id": 1, "validated": False},
                           {"id": 3, "image_id": "both", "category_id": 2, "validated": True},
                           {"id": 4, "image_id": "person", "category_id": 2},  # an older export: no field
                           {"id": 5, "image_id": "boxed", "category_id": 2, "bbox": [1, 1, 5, 5], "validated": False}],
           "categories": [{"id": 1, "name": "fox"}, {"id": 2, "name": "skunk"}]}
    detection = {"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2]}
    md = {"info": {}, "detection_categories": {"1": "animal"},
          "images": [{"file": f"{i}.jpg", "detections": [detection, detection]} for i in ("guess", "both", "person")]}
    labels = box_labels(cct, md).set_index(["file", "detection_index"])["label"]
    assert labels[("guess.jpg", 0)] == "fox" and labels[("both.jpg", 1)] == "skunk" and labels[("person.jpg", 0)] == "skunk"
    unreviewed = unreviewed_boxes(cct, md)
    assert sorted(zip(unreviewed["file"], unreviewed["detection_index"])) == [
        ("boxed.jpg", 0), ("guess.jpg", 0), ("guess.jpg", 1)]
    assert unreviewed_boxes(cct)["file"].tolist() == ["boxed.jpg"]  # without detector output: the export's boxes
