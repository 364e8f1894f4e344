import copy
import json

import pytest

from animl_assets.core.ingest.cct import (
    UNKNOWN_LOCATION,
    CCTFormatError,
    as_ingested,
    category_location_table,
    load_cct,
    summarize_cct,
    validate_cct,
)

GOOD = {
    "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80, "location": 7},
               {"id": "b", "file_name": "b.jpg", "width": 100, "height": 80}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 90, 70]},
                    {"id": 2, "image_id": "b", "category_id": 0}],
    "categories": [{"id": 0, "name": "empty"}, {"id": 1, "name": "deer"}],
}


def problems(cct):
    return {name: items for name, items in validate_cct(cct).problems.items() if items}


def test_valid_export_passes_every_check():
    assert validate_cct(GOOD).ok
    assert summarize_cct(GOOD) == {"images": 2, "annotations": 2, "categories": 2, "locations": 2}


@pytest.mark.parametrize("data, message", [
    (b'{"images": [', "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"\xff\xfe\x00", "not"),
    (b"", "not valid JSON"),
])
def test_unreadable_exports_raise_a_clear_error(data, message):
    with pytest.raises(CCTFormatError, match=message):
        load_cct(data)


def test_an_export_that_ends_early_says_it_was_cut_off_and_how_to_get_a_whole_one():
    # the images, then the annotations up to one's closing "}, ": where a streaming writer stopped
    cut = (f'{{"images": {json.dumps(GOOD["images"])},\n "annotations": [\n'
           + "".join(json.dumps(annotation) + ", " for annotation in GOOD["annotations"]))
    last_line = cut.count("\n") + 1
    with pytest.raises(CCTFormatError, match="ends early.*cut off.*export it again") as raised:
        load_cct(cut.encode())
    assert f"line {last_line}," in str(raised.value)  # where the file stops
    for broken_inside in ("{not json", '{"images": []} trailing'):  # a fault before the end is not "ends early"
        with pytest.raises(CCTFormatError, match="not valid JSON") as raised:
            load_cct(broken_inside)
        assert "ends early" not in str(raised.value)
    with pytest.raises(CCTFormatError, match="the file is empty"):
        load_cct(b"  \n")


def test_missing_and_mistyped_keys_fail_schema():
    cct = {"images": {"not": "a list"}, "categories": [{"id": 1}],
           "annotations": [{"id": 1, "image_id": None, "category_id": 1, "bbox": [1, 2]}]}
    found = problems(cct)["schema"]
    assert "'images' must be a list, not dict" in found
    assert any("categories[0]: 'name'" in p for p in found)
    assert any("annotations[0]: 'image_id'" in p for p in found)
    assert "missing top-level key 'annotations'" in problems({"images": [], "categories": []})["schema"]


def test_duplicate_ids_and_file_names_are_reported():
    cct = copy.deepcopy(GOOD)
    cct["images"].append({"id": 1, "file_name": "a.jpg", "width": 5, "height": 5})
    cct["categories"].append({"id": 2, "name": "deer"})
    found = problems(cct)["unique_ids"]
    assert "images.id '1' occurs 2 times" in found
    assert "images.file_name 'a.jpg' occurs 2 times" in found
    assert "categories.name 'deer' occurs 2 times" in found


def test_file_names_that_name_one_file_are_duplicates():
    """`sub/x.jpg`, `./sub/x.jpg` and `sub//x.jpg` are written to one place: one image, three labels."""
    cct = {"images": [{"id": i, "file_name": name} for i, name in enumerate(["sub/x.jpg", "./sub/x.jpg", "sub//x.jpg",
                                                                            "sub\\y.jpg", "sub/y.jpg", "z.jpg"])],
           "annotations": [], "categories": []}
    found = problems(cct)["unique_ids"]
    assert found == ["images.file_name 'sub/x.jpg' occurs 3 times (as 'sub/x.jpg', './sub/x.jpg', 'sub//x.jpg')",
                     "images.file_name 'sub/y.jpg' occurs 2 times (as 'sub\\\\y.jpg', 'sub/y.jpg')"]


def test_dangling_references_are_reported():
    cct = copy.deepcopy(GOOD)
    cct["annotations"].append({"id": 3, "image_id": 99, "category_id": 5})
    found = problems(cct)
    assert set(found) == {"references"}
    assert found["references"] == ["annotation 3 points at missing image 99",
                                   "annotation 3 points at missing category 5"]


@pytest.mark.parametrize("bbox, ok, clipped", [
    ([0, 0, 100, 80], True, False), ([0.5, 0.5, 100, 80], True, True),  # overhangs by rounding: clipped
    ([10, 10, 95, 10], True, True), ([-3, 0, 10, 10], True, True),  # 5 px and 3 px of a 100 px side: clipped
    ([10, 10, 96, 10], False, False), ([10, 75, 10, 10], False, False),  # 6 px and 5 px: over 5% of the side
    ([100, 0, 4, 4], False, False),  # starts outside
])
def test_boxes_must_lie_inside_their_image_or_overhang_within_the_tolerance(bbox, ok, clipped):
    cct = copy.deepcopy(GOOD)
    cct["annotations"][0]["bbox"] = bbox
    report = validate_cct(cct)
    assert (not report.problems["bboxes"]) is ok and bool(report.clipped) is clipped
    assert report.set_aside == {}


@pytest.mark.parametrize("bbox, reason", [
    ([None, None, None, None], "null box"), ([1, 2], "malformed box"), (["1", 2, 3, 4], "malformed box"),
    ("0 0 5 5", "malformed box"), ([0, 0, -1, 5], "box without area"), ([0, 0, 0, 5], "box without area"),
])
def test_an_unusable_box_sets_its_annotation_aside_without_failing_the_export(bbox, reason):
    cct = copy.deepcopy(GOOD)
    cct["annotations"].append({"id": "bad", "image_id": 1, "category_id": 1, "bbox": bbox})
    report = validate_cct(cct)
    assert report.ok and report.set_aside.keys() == {"bad"} and report.set_aside["bad"].startswith(reason)
    assert report.set_aside_by_reason() == {report.set_aside["bad"]: 1}
    assert report.record()["annotations_set_aside"] == [f"annotation bad: {report.set_aside['bad']}"]
    kept = as_ingested(cct, report)
    assert [ann["id"] for ann in kept["annotations"]] == [1, 2] and len(cct["annotations"]) == 3  # a copy
    assert as_ingested(GOOD, validate_cct(GOOD)) is GOOD


def test_reviewers_names_are_not_ingested():
    cct = copy.deepcopy(GOOD)
    cct["annotations"][0] |= {"validated": True, "validated_by": "ranger@example.org"}
    ingested = as_ingested(cct, validate_cct(cct))
    assert "ranger@example.org" not in json.dumps(ingested) and ingested["annotations"][0]["validated"] is True
    assert cct["annotations"][0]["validated_by"] == "ranger@example.org"  # the export itself is left as it is


def test_the_overhang_tolerance_is_configurable():
    cct = copy.deepcopy(GOOD)
    cct["annotations"][0]["bbox"] = [10, 10, 95, 10]
    assert validate_cct(cct, bbox_tolerance=0.01).problems["bboxes"]
    assert validate_cct(cct, bbox_tolerance=0.2).clipped


def test_category_by_location_table_counts_annotations():
    table = category_location_table(GOOD)
    assert table.loc["deer", "7"] == 1
    assert table.loc["empty", UNKNOWN_LOCATION] == 1


def test_sample_export_is_valid(sample_dir):
    cct = load_cct((sample_dir / "sample_export.json").read_bytes())
    assert validate_cct(cct).ok
    summary = summarize_cct(cct)
    assert summary["categories"] == 5 and summary["locations"] >= 4
    assert json.loads((sample_dir / "sample_export.json").read_text())["info"]["seed"] == 0
