"""Unknowns, drift and the review queue: the core functions on made-up outputs."""

import io

import numpy as np
import pandas as pd
import pytest

from animl_assets.core.ml import drift, open_set
from animl_assets.core.review import queue
from animl_assets.core.review.corrections import read_corrections

LABELS = ["deer", "fox", "raccoon"]


def _logits(rng, n, label, sharp):
    logits = rng.normal(0, 1, (n, len(LABELS)))
    if label is not None:
        logits[:, label] += sharp
    return logits


def test_each_score_ranks_confident_crops_as_known_and_the_threshold_keeps_the_target_recall():
    rng = np.random.default_rng(0)
    known = np.vstack([_logits(rng, 200, i, 6.0) for i in range(3)])
    unknown = _logits(rng, 200, None, 0)
    for score in open_set.SCORES:
        found = open_set.fit(known[:300], score, target_recall=0.9)
        assert found["score"] == score and found["val_crops"] == 300
        assert 0.9 <= found["val_recall"] < 0.92  # the quantile keeps the target share of val known
        held_in = open_set.is_unknown(known[300:], found).mean()
        flagged = open_set.is_unknown(unknown, found).mean()
        assert held_in < 0.2 and flagged > 0.6, (score, held_in, flagged)
        auroc = open_set.auroc(open_set.known_score(known, score), open_set.known_score(unknown, score))
        assert auroc > 0.9, (score, auroc)
    assert open_set.auroc(np.ones(3), np.ones(3)) == 0.5  # a score that cannot tell: chance
    with pytest.raises(ValueError, match="open-set score"):
        open_set.known_score(known, "entropy")


def test_without_val_crops_there_is_no_threshold_and_nothing_is_flagged():
    found = open_set.fit(np.zeros((0, 3)))
    assert found["threshold"] is None
    assert not open_set.is_unknown(np.zeros((4, 3)), found).any()
    assert not open_set.is_unknown(np.zeros((4, 3)), {}).any()
    assert open_set.unknown_column(["deer", "unknown"]) == "unknown_"


def _outputs(preds, confidence=0.9, unknown=None, prefix="cam"):
    rows = []
    for i, pred in enumerate(preds):
        probs = {name: (confidence if name == pred else (1 - confidence) / 2) for name in LABELS}
        rows.append({"path": f"{prefix}{i % 2}/img{i:04d}.jpg___crop00_md.jpg", **probs})
    frame = pd.DataFrame(rows)
    frame["unknown"] = 0.0 if unknown is None else unknown
    return frame


def test_psi_is_zero_for_the_same_shares_and_large_for_a_missing_class():
    even = {name: 1 / 3 for name in LABELS}
    assert drift.psi(even, even) == 0
    assert 0 < drift.psi(even, {"deer": 0.4, "fox": 0.3, "raccoon": 0.3}) < 0.1
    assert drift.psi(even, {"deer": 0.5, "fox": 0.5}) > 1


def test_drift_table_flags_a_shifted_export_overall_and_per_camera_but_not_an_unshifted_one():
    reference = drift.profile(_outputs(LABELS * 40)[LABELS].to_numpy(), np.zeros(120, bool), LABELS)
    cameras = lambda frame: {p: p.split("/")[0] for p in frame["path"]}  # noqa: E731
    same = _outputs(LABELS * 30)
    table = drift.drift_table(same, LABELS, "unknown", cameras(same), reference)
    assert list(table["scope"]) == [drift.ALL, "cam0", "cam1"] and not table["drifted"].any()
    shifted = _outputs(["deer", "fox"] * 45)
    table = drift.drift_table(shifted, LABELS, "unknown", cameras(shifted), reference)
    assert table["drifted"].all() and "PSI" in table.loc[0, "reasons"]
    unsure = _outputs(LABELS * 30, confidence=0.5, unknown=[1.0] * 45 + [0.0] * 45)
    [reasons] = drift.drift_table(unsure, LABELS, "unknown", {}, reference)["reasons"]
    assert "mean confidence" in reasons and "unknowns" in reasons
    few = drift.drift_table(same, LABELS, None, cameras(same), reference, drift.DriftLimits(min_crops=46))
    assert list(few["scope"]) == [drift.ALL]  # no camera has 46 crops


def _crops(rows):
    frame = pd.DataFrame(rows, columns=["crop", "pred", "confidence", "margin", "unknown", "export_label"])
    return frame.assign(priority=1 - frame["margin"] + frame["unknown"], reasons="")


def test_crop_priorities_put_unknowns_and_disagreements_first():
    outputs = _outputs(["deer", "fox", "raccoon", "deer"], unknown=[0, 1, 0, 0])
    outputs.loc[3, LABELS] = [0.45, 0.44, 0.11]  # unsure
    labels = {outputs.loc[2, "path"]: "Fox"}  # the export disagrees with raccoon
    found = queue.crop_priorities(outputs, LABELS, "unknown", labels)
    order = found.sort_values("priority", ascending=False)["crop"].tolist()
    assert order[:2] == [outputs.loc[1, "path"], outputs.loc[2, "path"]] and order[2] == outputs.loc[3, "path"]
    assert "unknown" in found.loc[1, "reasons"] and "export says Fox" in found.loc[2, "reasons"]
    agreeing = queue.crop_priorities(outputs, LABELS, "unknown", {outputs.loc[0, "path"]: "DEER"})
    assert "export says" not in agreeing.loc[0, "reasons"]  # case and spacing are not disagreement


def test_the_queue_keeps_its_budget_one_crop_per_agreeing_burst_and_spreads_over_classes():
    rows, sequence_of = [], {}
    for burst in range(20):  # 20 bursts of 5 deer crops, all very unsure: they would fill any plain ranking
        for k in range(5):
            crop = f"a/burst{burst}_{k}.jpg___crop00_md.jpg"
            rows.append((crop, "deer", 0.4, 0.01 * k, False, ""))
            sequence_of[crop] = f"s{burst}"
    for i in range(10):  # confident foxes and raccoons, alone
        rows += [(f"b/fox{i}.jpg___crop00_md.jpg", "fox", 0.9, 0.8, False, ""),
                 (f"b/rac{i}.jpg___crop00_md.jpg", "raccoon", 0.9, 0.8, False, "")]
    split = "a/split.jpg___crop00_md.jpg", "a/split.jpg___crop01_md.jpg"  # one burst, two predictions
    rows += [(split[0], "deer", 0.5, 0.1, False, ""), (split[1], "fox", 0.5, 0.1, False, "")]
    sequence_of |= {split[0]: "sx", split[1]: "sx"}
    cameras = {"a/burst0_0.jpg": "A"}
    ranked = queue.review_queue(_crops(rows), 9, sequence_of, cameras)
    assert len(ranked) == 9
    assert not ranked[ranked["sequence"] != ""].duplicated(["sequence", "pred"]).any()
    assert ranked["sequence"].str.startswith("s").sum() == ranked["sequence"][ranked["sequence"].str.startswith("s")].nunique() + 1
    assert set(split) <= set(ranked["crop"])  # a burst that disagrees with itself: one crop per prediction
    assert "burst disagrees with itself" in ranked.loc[ranked["crop"] == split[0], "reasons"].item()
    assert set(ranked["pred"]) == {"deer", "fox", "raccoon"}  # not nine bursts of deer
    assert ranked["crop"].str.startswith("a/burst").sum() < 9
    assert len(queue.review_queue(_crops(rows), 500, sequence_of, cameras)) == 20 + 20 + 2  # one per burst
    md = {"info": {}, "images": [{"file": f"a/burst{b}_0.jpg", "detections": []} for b in range(20)]}
    assert [i["file"] for i in queue.queue_md(md, ["a/burst3_0.jpg", "x.jpg", "a/burst3_0.jpg"])["images"]] == [
        "a/burst3_0.jpg"]


def test_a_reviewed_queue_is_a_corrections_file_where_only_reviewed_rows_count():
    ranked = queue.review_queue(_crops([("a/x.jpg___crop00_md.jpg", "deer", 0.5, 0.1, False, ""),
                                        ("a/y.jpg___crop00_md.jpg", "fox", 0.5, 0.2, False, "")]), 10, {}, {})
    csv = queue.queue_file(ranked, "site/2024")
    assert list(csv.columns) == queue.QUEUE_COLUMNS and list(csv["rank"]) == [1, 2]
    csv.loc[0, ["reviewed", "correct_label"]] = ["x", "raccoon"]
    buffer = io.StringIO()
    csv.to_csv(buffer, index=False)
    corrections = read_corrections(buffer.getvalue().encode())
    assert corrections.to_dict("records") == [{"dataset": "site/2024", "file": "a/x.jpg", "correct_label": "raccoon"}]


def test_the_queue_takes_each_label_in_turn_and_within_a_label_each_camera():
    rows, cameras = [], {}
    for label, urgency in (("deer", 0.0), ("fox", 0.3), ("raccoon", 0.6)):
        for camera in "ABC":
            for k in range(3):
                crop = f"{camera}/{label}{k}.jpg___crop00_md.jpg"
                rows.append((crop, label, 0.5, urgency + 0.01 * k, False, ""))
                cameras[crop.rpartition("___")[0]] = camera
    ranked = queue.review_queue(_crops(rows), 6, {}, cameras)
    assert list(ranked["pred"]) == ["deer", "fox", "raccoon"] * 2  # the most urgent label first, each in turn
    assert ranked.groupby("pred")["camera"].nunique().eq(2).all()  # a label's second crop: another camera


def test_reasons_are_counted_by_kind():
    reasons = pd.Series(["unknown, export says Fox, margin 0.10", "margin 0.20, burst disagrees with itself", ""])
    assert queue.reason_counts(reasons) == {"unknown": 1, "export says": 1, "margin": 2,
                                            "burst disagrees with itself": 1}


def test_an_export_without_crops_has_not_drifted_and_queues_nothing():
    reference = drift.profile(_outputs(LABELS * 10)[LABELS].to_numpy(), np.zeros(30, bool), LABELS)
    empty = pd.DataFrame(columns=["path", *LABELS, "unknown"])
    [row] = drift.drift_table(empty, LABELS, "unknown", {}, reference).to_dict("records")
    assert row["crops"] == 0 and not row["drifted"] and row["reasons"] == "no crops to compare"
    ranked = queue.review_queue(queue.crop_priorities(empty, LABELS, "unknown", {}), 10, {}, {})
    assert ranked.empty and queue.queue_file(ranked, "x").empty
