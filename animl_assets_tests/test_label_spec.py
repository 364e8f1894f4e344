import pytest

from animl_assets.core.dataset.label_spec import (
    LabelSpecError,
    csv_to_spec,
    default_label_mapping,
    parse_label_spec,
    parse_taxonomy,
    resolve_label_spec,
)

CLASSES = {("idfg", "deer"), ("idfg", "elk"), ("idfg", "turkey"), ("wcs", "white-tailed deer"),
           ("wcs", "wild turkey"), ("wcs", "crow"), ("wcs", "empty")}
TAXONOMY = """dataset_name,query,taxonomy_level,scientific_name,taxonomy_string
idfg,deer,family,cervidae,"[(1, 'family', 'cervidae', ['deer']), (2, 'class', 'mammalia', [])]"
idfg,elk,species,cervus canadensis,"[(3, 'species', 'cervus canadensis', ['elk']), (4, 'genus', 'cervus', []), (1, 'family', 'cervidae', []), (2, 'class', 'mammalia', [])]"
idfg,turkey,species,meleagris gallopavo,"[(5, 'species', 'meleagris gallopavo', []), (6, 'genus', 'meleagris', []), (7, 'class', 'aves', [])]"
wcs,white-tailed deer,species,odocoileus virginianus,"[(8, 'species', 'odocoileus virginianus', []), (1, 'family', 'cervidae', [])]"
wcs,wild turkey,species,meleagris gallopavo,species:meleagris gallopavo|genus:meleagris|class:aves
wcs,crow,species,corvus brachyrhynchos,species:corvus brachyrhynchos|genus:corvus|class:aves
"""
CSV_SPEC = """# comment lines are allowed
output_label,type,content

cervid,row,idfg|deer
cervid,datasettaxon,wcs|family|cervidae
cervid,species,cervus canadensis
cervid,max_count,50
cervid,prioritize,"[['wcs'], ['idfg']]"
bird,class,aves
!bird,genus,meleagris
!bird,row,idfg|turkey
turkey,genus,meleagris
"""


def test_csv_spec_converts_to_the_json_form():
    spec = csv_to_spec(CSV_SPEC)
    assert spec == {
        "cervid": {"dataset_labels": {"idfg": ["deer"]},
                   "taxa": [{"level": "family", "name": "cervidae", "datasets": ["wcs"]},
                            {"level": "species", "name": "cervus canadensis"}],
                   "max_count": 50, "prioritize": [["wcs"], ["idfg"]]},
        "bird": {"taxa": [{"level": "class", "name": "aves"}],
                 "exclude": {"taxa": [{"level": "genus", "name": "meleagris"}],
                             "dataset_labels": {"idfg": ["turkey"]}}},
        "turkey": {"taxa": [{"level": "genus", "name": "meleagris"}]},
    }
    assert parse_label_spec(CSV_SPEC, "csv") == spec


def test_taxa_resolve_through_the_taxonomy_and_exclusions_apply():
    mapping = resolve_label_spec(csv_to_spec(CSV_SPEC), CLASSES, parse_taxonomy(TAXONOMY))
    assert mapping == {("idfg", "deer"): "cervid", ("idfg", "elk"): "cervid", ("wcs", "white-tailed deer"): "cervid",
                       ("wcs", "crow"): "bird", ("idfg", "turkey"): "turkey", ("wcs", "wild turkey"): "turkey"}


def test_json_spec_with_dataset_labels():
    spec = parse_label_spec('{"deer": {"dataset_labels": {"idfg": ["deer", "elk"], "wcs": ["white-tailed deer"]}}}',
                            "json")
    assert resolve_label_spec(spec, CLASSES) == {("idfg", "deer"): "deer", ("idfg", "elk"): "deer",
                                                 ("wcs", "white-tailed deer"): "deer"}


@pytest.mark.parametrize("spec, message", [
    ({"deer": {"dataset_labels": {"idfg": ["moose"]}}}, "class 'moose' of dataset 'idfg' is not in the data"),
    ({"a": {"dataset_labels": {"idfg": ["deer"]}}, "b": {"dataset_labels": {"idfg": ["deer", "elk"]}}},
     "class 'deer' of dataset 'idfg' is claimed by both 'a' and 'b'"),
    ({"deer": {"taxa": [{"level": "family", "name": "cervidae"}]}}, "needs a taxonomy CSV"),
    ({"x": {"dataset_labels": {}}}, "label 'x' matches no class in the data"),
])
def test_resolution_errors_name_the_problem(spec, message):
    with pytest.raises(LabelSpecError, match=message):
        resolve_label_spec(spec, CLASSES)


def test_unmatched_taxon_is_reported():
    with pytest.raises(LabelSpecError, match="taxon genus:ursus matches no class"):
        resolve_label_spec({"bear": {"taxa": [{"level": "genus", "name": "ursus"}]}}, CLASSES, parse_taxonomy(TAXONOMY))


@pytest.mark.parametrize("text, fmt, message", [
    ("{not json", "json", "not valid JSON"),
    ("[]", "json", "non-empty object"),
    ('{"a": {"colour": "red"}}', "json", "unknown keys"),
    ('{"a": {"dataset_labels": {}, "prioritize": [["x"]]}}', "json", "'prioritize' needs 'max_count'"),
    ('{"a": {"max_count": -3}}', "json", "positive integer"),
    ("label,kind\nx,y", "csv", "output_label,type,content"),
    ("output_label,type,content\nx,row,only-one-part", "csv", "dataset|class"),
    ("output_label,type,content\nx,max_count,many", "csv", "whole number"),
    ("output_label,type,content\nx,prioritize,[[unquoted", "csv", "not a Python/JSON literal"),
])
def test_malformed_specs_raise_clear_errors(text, fmt, message):
    with pytest.raises(LabelSpecError, match=message):
        parse_label_spec(text, fmt)


def test_default_mapping_is_one_label_per_class_without_empty_or_people():
    mapping = default_label_mapping(CLASSES | {("wcs", "Human"), ("wcs", "Vehicle")})
    assert mapping[("wcs", "white-tailed deer")] == "white-tailed_deer"
    assert ("wcs", "empty") not in mapping and ("wcs", "Human") not in mapping and ("wcs", "Vehicle") not in mapping
    assert default_label_mapping({("d", "empty")}, excluded=[]) == {("d", "empty"): "empty"}
