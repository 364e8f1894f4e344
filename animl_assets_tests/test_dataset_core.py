import pandas as pd

from animl_assets.core.dataset.classification import (
    build_classification_dataset,
    detection_rows,
    label_index,
    match_test,
)


def crops(rows):
    """CROP_COLUMNS rows from (dataset, location, image, class, confidence)."""
    return pd.DataFrame([{"path": f"{d}/{img}___crop{i:02d}_x.jpg", "dataset": d, "location": loc, "image": img,
                          "dataset_class": cls, "confidence": conf}
                         for i, (d, loc, img, cls, conf) in enumerate(rows)])


MAPPING = {("a", "deer"): "deer", ("a", "fox"): "fox", ("b", "deer"): "deer", ("b", "doe"): "deer"}


def test_rows_are_labelled_and_everything_left_out_is_counted():
    ds, report = build_classification_dataset(crops([
        ("a", "1", "i1.jpg", "deer", 1.0), ("a", "2", "i2.jpg", "fox", 0.9), ("b", 3, "i3.jpg", "doe", 0.95),
        ("a", "1", "i4.jpg", "deer", 0.2), ("a", "", "i5.jpg", "deer", 1.0), ("a", "1", "i6.jpg", "", 1.0),
        ("a", "1", "i7.jpg", "empty", 1.0),
    ]), MAPPING, threshold=0.5)
    assert list(ds.columns) == ["path", "dataset", "location", "dataset_class", "confidence", "label"]
    assert ds["label"].tolist() == ["deer", "fox", "deer", "deer"]
    assert ds["location"].tolist() == ["1", "2", "unknown_location", "3"]
    assert report.dropped == {"detection confidence below 0.5": 1,
                              "no class in the export (detector box on an image without one label)": 1,
                              "class not in any output label (excluded)": 1}
    assert label_index(ds) == {"0": "deer", "1": "fox"}


def test_images_with_conflicting_labels_are_reported_not_guessed():
    rows = crops([("a", "1", "both.jpg", "deer", 1.0), ("a", "1", "both.jpg", "fox", 1.0),
                  ("a", "1", "one.jpg", "deer", 1.0)])
    ds, report = build_classification_dataset(rows, MAPPING)
    assert ds["path"].str.contains("one.jpg").all() and len(ds) == 1
    assert report.conflicts.to_dict("records") == [{"dataset": "a", "image": "both.jpg", "labels": "deer,fox"}]
    assert len(build_classification_dataset(rows, MAPPING, one_label_per_image=False)[0]) == 3


def test_a_box_labelled_by_its_own_annotation_keeps_its_label_beside_another_species():
    """Animl labels each box: a fox box and a deer box in one image are two labelled crops, not a conflict. An
    image-level label given to detector boxes still is one."""
    rows = crops([("a", "1", "both.jpg", "deer", 1.0), ("a", "1", "both.jpg", "fox", 1.0),
                  ("a", "1", "guess.jpg", "deer", 0.8), ("a", "1", "guess.jpg", "fox", 0.7)])
    rows["own_box"] = [True, True, False, False]
    ds, report = build_classification_dataset(rows, MAPPING)
    kept = sorted(zip(ds["path"].str.split("___").str[0], ds["label"]))
    assert kept == [("a/both.jpg", "deer"), ("a/both.jpg", "fox")]
    assert report.conflicts.to_dict("records") == [{"dataset": "a", "image": "guess.jpg", "labels": "deer,fox"}]
    assert "own_box" not in ds.columns


def test_min_locs_drops_labels_seen_at_too_few_locations():
    rows = crops([("a", "1", "1.jpg", "deer", 1), ("a", "2", "2.jpg", "deer", 1), ("b", "1", "3.jpg", "deer", 1),
                  ("a", "1", "4.jpg", "fox", 1), ("a", "1", "5.jpg", "fox", 1)])
    ds, report = build_classification_dataset(rows, MAPPING, min_locs=3)
    assert set(ds["label"]) == {"deer"}  # deer: (a,1), (a,2), (b,1); fox: only (a,1)
    assert report.dropped == {"label at fewer than 3 locations": 2}


def test_max_count_takes_prioritized_datasets_first_and_is_seeded():
    rows = crops([("a", str(i % 4), f"a{i}.jpg", "deer", 1) for i in range(20)]
                 + [("b", str(i % 4), f"b{i}.jpg", "deer", 1) for i in range(5)])
    spec = {"deer": {"max_count": 8, "prioritize": [["b"]]}}
    ds, report = build_classification_dataset(rows, MAPPING, spec=spec, seed=1)
    assert len(ds) == 8 and (ds["dataset"] == "b").sum() == 5  # all of b, then 3 of a at random
    assert report.sampled == {"deer": (25, 8)}
    again, _ = build_classification_dataset(rows, MAPPING, spec=spec, seed=1)
    other, _ = build_classification_dataset(rows, MAPPING, spec=spec, seed=2)
    assert again["path"].tolist() == ds["path"].tolist()
    assert other["path"].tolist() != ds["path"].tolist()
    few, _ = build_classification_dataset(rows, MAPPING, spec={"deer": {"max_count": 3, "prioritize": [["b"]]}})
    assert (few["dataset"] == "b").all() and len(few) == 3


def test_match_test_appends_the_earlier_test_locations():
    ds, _ = build_classification_dataset(crops([("a", "1", "x.jpg", "deer", 1), ("a", "2", "y.jpg", "fox", 1)]),
                                         MAPPING)
    earlier = pd.DataFrame({"path": ["old/p1.jpg", "old/p2.jpg", "old/p3.jpg", "a/x.jpg___crop00_x.jpg"],
                            "dataset": ["old", "old", "old", "a"], "location": ["9", "8", "9", "1"],
                            "dataset_class": ["deer", "deer", "owl", "deer"], "confidence": [1.0] * 4,
                            "label": ["deer", "deer", "owl", "deer"]})
    rows, test = match_test(ds, earlier, {"train": [["old", "8"]], "val": [], "test": [["old", 9], ["a", "1"]]})
    assert test == [("a", "1"), ("old", "9")]
    assert rows["path"].tolist() == ["a/x.jpg___crop00_x.jpg", "a/y.jpg___crop01_x.jpg", "old/p1.jpg"]


def test_detection_rows_name_crops_like_the_cropper():
    md = {"info": {"detector": "md_v5a.0.0.pt"}, "detection_categories": {"1": "animal", "2": "person"},
          "images": [{"file": "l/a.jpg", "detections": [{"category": "2", "conf": 0.9, "bbox": [0, 0, 1, 1]},
                                                       {"category": "1", "conf": 0.8, "bbox": [0, 0, 1, 1]}]}]}
    labels = pd.DataFrame({"file": ["l/a.jpg"], "detection_index": [1], "label": ["deer"]})
    rows = detection_rows(md, "exp", labels, {"l/a.jpg": "site1"})
    assert rows.to_dict("records") == [{"path": "exp/l/a.jpg___crop01_md_v5a.0.0.pt.jpg", "dataset": "exp",
                                        "location": "site1", "dataset_class": "deer", "confidence": 0.8,
                                        "image": "l/a.jpg"}]
