import numpy as np
import pandas as pd
import pytest

from animl_assets.core.dataset.splits import check_splits, make_splits, split_score, split_table


def dataset(spec):
    """Rows from {(dataset, location): {label: crops}}."""
    rows = [(d, loc, label) for (d, loc), labels in spec.items() for label, n in labels.items() for _ in range(n)]
    return pd.DataFrame(rows, columns=["dataset", "location", "label"])


def reference_score(ds, splits, val_frac, test_frac):
    """create_classification_dataset.py's per-trial scoring, restated with pandas as the oracle."""
    targets = {"train": 1 - val_frac - test_frac, "val": val_frac, "test": test_frac}
    ds = ds.assign(dataset_location=ds["dataset"] + "/" + ds["location"].astype(str))
    counts = ds.groupby(["label", "dataset_location"]).size().unstack("label", fill_value=0)
    label_count, loc_count = counts.sum(), (counts > 0).sum()
    score = 0.0
    for split, locs in splits.items():
        split_df = counts.loc[[f"{d}/{loc}" for d, loc in locs]]
        score += 2 * ((split_df.sum() / label_count - targets[split]) ** 2).sum()
        score += (((split_df > 0).sum() / loc_count - targets[split]) ** 2).sum()
    return score


def skewed(seed=0, locations=12, labels=6):
    rng = np.random.default_rng(seed)
    return dataset({("d", f"l{i}"): {f"c{k}": int(rng.integers(0, 30)) for k in range(labels) if rng.random() < 0.7}
                    for i in range(locations)})


def test_score_equals_the_reference_objective():
    ds = skewed()
    rng = np.random.default_rng(3)
    locs = sorted(set(zip(ds["dataset"], ds["location"])))
    for _ in range(5):
        order = rng.permutation(len(locs))
        splits = {"train": [list(locs[i]) for i in order[:8]], "val": [list(locs[i]) for i in order[8:10]],
                  "test": [list(locs[i]) for i in order[10:]]}
        assert split_score(ds, splits, val_frac=0.2, test_frac=0.15) == pytest.approx(
            reference_score(ds, splits, 0.2, 0.15), rel=1e-5)


def test_random_finds_the_perfect_split_when_there_is_one():
    ds = dataset({("d", f"l{i}"): {"deer": 10, "fox": 10} for i in range(10)})
    splits = make_splits(ds, val_frac=0.1, test_frac=0.1, seed=0, trials=500)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [8, 1, 1]
    assert split_score(ds, splits, val_frac=0.1, test_frac=0.1) == pytest.approx(0, abs=1e-9)


def test_random_is_seeded_and_beats_single_trials():
    ds = skewed(1, locations=30)
    first = make_splits(ds, val_frac=0.15, test_frac=0.15, seed=7, trials=2000)
    assert make_splits(ds, val_frac=0.15, test_frac=0.15, seed=7, trials=2000) == first
    assert make_splits(ds, val_frac=0.15, test_frac=0.15, seed=8, trials=2000) != first
    best = split_score(ds, first, val_frac=0.15, test_frac=0.15)
    singles = [split_score(ds, make_splits(ds, val_frac=0.15, test_frac=0.15, seed=s, trials=1),
                           val_frac=0.15, test_frac=0.15) for s in range(20)]
    assert best <= min(singles)
    leaks, missing = check_splits(ds, first)
    assert leaks == []


def test_smallest_first_walks_each_labels_locations_smallest_up():
    ds = dataset({("d", "r1"): {"rare": 2}, ("d", "r2"): {"rare": 3}, ("d", "r3"): {"rare": 5},
                  **{("d", f"c{i}"): {"common": 10 + i} for i in range(10)}})
    splits = make_splits(ds, val_frac=0.2, test_frac=0.2, method="smallest_first")
    # rare (10 crops) first: r1 fills test (2 >= 2), r2 val (3 >= 2), r3 train; then common (145 crops,
    # 29 for each of test and val): c0+c1+c2 = 33 to test, c3+c4 = 27 < 29 so c5 to val too, the rest train
    assert splits["test"] == [["d", "c0"], ["d", "c1"], ["d", "c2"], ["d", "r1"]]
    assert splits["val"] == [["d", "c3"], ["d", "c4"], ["d", "c5"], ["d", "r2"]]
    assert sorted(map(tuple, splits["train"])) == sorted([("d", "r3")] + [("d", f"c{i}") for i in range(6, 10)])


def test_smallest_first_takes_prioritized_datasets_first():
    ds = dataset({("big", "b1"): {"owl": 1}, ("big", "b2"): {"owl": 9}, ("pri", "p1"): {"owl": 20},
                  ("pri", "p2"): {"owl": 30}})
    splits = make_splits(ds, val_frac=0.2, test_frac=0.2, method="smallest_first", prioritize={"owl": ["pri"]})
    assert splits["test"] == [["pri", "p1"]] and splits["val"] == [["pri", "p2"]]


def test_integer_and_string_locations_and_fixed_test_locations():
    ds = pd.DataFrame({"dataset": ["a"] * 6 + ["b"] * 2, "location": [1, 1, 2, 3, 4, 5, "x", "x"],
                       "label": ["deer"] * 8})
    ds["location"] = ds["location"].astype(str)
    splits = make_splits(ds, val_frac=0.3, test_frac=0.0, seed=0, test_locations=[["b", "x"]], trials=50)
    assert splits["test"] == [["b", "x"]]
    assert sorted(map(tuple, splits["train"] + splits["val"])) == [("a", str(i)) for i in range(1, 6)]
    with pytest.raises(ValueError, match="test_frac must be 0"):
        make_splits(ds, val_frac=0.3, test_frac=0.1, test_locations=[["b", "x"]])
    with pytest.raises(ValueError, match="method"):
        make_splits(ds, val_frac=0.3, test_frac=0.1, method="alphabetical")


def test_checks_catch_leaks_and_name_labels_that_cannot_be_placed():
    ds = dataset({("d", "1"): {"deer": 3, "fox": 1, "owl": 1}, ("d", "2"): {"deer": 3, "fox": 1, "owl": 1},
                  ("d", "3"): {"deer": 3, "owl": 1}, ("d", "4"): {"deer": 2}})
    leaky = {"train": [["d", "1"], ["d", "3"]], "val": [["d", "1"]], "test": [["d", "2"]]}
    leaks, _ = check_splits(ds, leaky)
    assert leaks == ["location ('d', '1') is in both train and val", "location ('d', '4') has crops but no split"]
    split = {"train": [["d", "1"], ["d", "2"]], "val": [["d", "3"]], "test": [["d", "4"]]}
    leaks, missing = check_splits(ds, split)
    assert leaks == []
    assert missing == {"fox": "missing from val, test: only 2 location(s), fewer than the 3 splits",
                       "owl": "missing from test: the chosen split put none of its locations there"}
    _, only_train = check_splits(ds, {"train": split["train"] + split["val"] + split["test"], "val": [], "test": []})
    assert only_train["deer"] == ("missing from val, test: val and test got no location at all "
                                  "(too few locations for the requested fractions)")
    two_way = {"train": split["train"] + split["val"], "val": [], "test": split["test"]}
    assert check_splits(ds, two_way, expected=("train", "test"))[1] == {
        "fox": "missing from test: the chosen split put none of its locations there",
        "owl": "missing from test: the chosen split put none of its locations there"}
    table = split_table(ds, split)
    assert table.loc["deer"].tolist() == [6, 3, 2] and table.loc["fox"].tolist() == [2, 0, 0]


def test_split_api_is_exposed_by_the_core_package():
    from animl_assets.core import make_splits as api_make_splits
    from animl_assets.core import split_score as api_split_score

    ds = dataset({("d", f"l{i}"): {"deer": 5, "fox": 5} for i in range(10)})
    splits = api_make_splits(ds, val_frac=0.1, test_frac=0.1, method="random", seed=0, trials=100)
    assert api_split_score(ds, splits, val_frac=0.1, test_frac=0.1) == pytest.approx(0, abs=1e-9)


def test_locations_that_share_a_burst_go_to_one_split():
    """A burst written under two locations (a deployment that starts mid-burst) must not straddle splits."""
    from animl_assets.core.dataset.splits import linked_locations

    rows = [{"path": f"e/{loc}/{label}{i}.jpg___crop00_m.jpg", "dataset": "e", "location": loc, "label": label}
            for loc in ("cam1-default", "Dry Lake", "Fraser's Point", "Bob's Knoll", "Lower Creek", "Pelican Bay")
            for label in ("fox", "deer") for i in range(4)]
    ds = pd.DataFrame(rows)
    sequence_of = {"e/cam1-default/fox0.jpg___crop00_m.jpg": "e|gap:cam1:1",
                   "e/Dry Lake/fox0.jpg___crop00_m.jpg": "e|gap:cam1:1",  # the same burst, two locations
                   "e/Pelican Bay/fox0.jpg___crop00_m.jpg": "e|gap:cam6:1"}
    linked = linked_locations(ds, sequence_of)
    assert linked == [[("e", "Dry Lake"), ("e", "cam1-default")]]
    for seed in range(12):
        result = make_splits(ds, val_frac=0.2, test_frac=0.2, seed=seed, trials=50, linked=linked)
        where = {tuple(loc): name for name, locs in result.items() for loc in locs}
        assert where[("e", "Dry Lake")] == where[("e", "cam1-default")]
        assert sorted(where) == sorted(set(zip(ds["dataset"], ds["location"])))  # every location, once
    seeds_apart = [seed for seed in range(12) if len({name for name, locs in make_splits(
        ds, val_frac=0.2, test_frac=0.2, seed=seed, trials=50).items()
        for loc in locs if loc[1] in ("Dry Lake", "cam1-default")}) > 1]
    assert seeds_apart  # without the link, some seeds do split the burst
    fixed = make_splits(ds, val_frac=0.25, test_frac=0, test_locations=[["e", "Dry Lake"]], linked=linked)
    assert ["e", "cam1-default"] in fixed["test"] and ["e", "Dry Lake"] in fixed["test"]
