"""core.inference and core.review on hand-made models and outputs: streamed classification with a target
mapping, the MD JSON merge, mislabeled candidates and corrections."""

import gzip
import tracemalloc
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from animl_assets.core.detect.megadetector import validate_batch_output
from animl_assets.core.ml.data import eval_resize, eval_transform, normalize
from animl_assets.core.ml.frames import Preprocessing
from animl_assets.core.ml.inference import Classifier, classify, decode_on, encoded_tensor
from animl_assets.core.review import candidates
from animl_assets.core.review import corrections as cr
from animl_assets.core.review import merge as rv


class ColourModel(torch.nn.Module):
    """Logits from the mean of each colour channel: red, green and blue crops are told apart."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20 * x.mean(dim=(2, 3))


def _crops(folder, n, size=40):
    colours = [(230, 20, 20), (20, 230, 20), (20, 20, 230)]
    paths = []
    for i in range(n):
        path = f"cam/img{i:05d}.jpg___crop00_md.jpg"
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size, size), colours[i % 3]).save(folder / path, quality=95)
        paths.append(path)
    return paths


def _read(path):
    with gzip.open(path, "rt") as f:
        return pd.read_csv(f)


def test_classify_streams_the_reference_csv_and_reports_a_broken_crop(tmp_path):
    paths = _crops(tmp_path, 9)
    (tmp_path / "cam" / "broken.jpg___crop00_md.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    model = Classifier(torch.jit.script(ColourModel()), ["red", "green", "blue"], Preprocessing(32), "v1")
    report = classify(model, tmp_path, [*paths, "cam/broken.jpg___crop00_md.jpg", "cam/missing.jpg"],
                      tmp_path / "out.csv.gz", batch_size=4, workers=0)
    out = _read(tmp_path / "out.csv.gz")
    assert list(out.columns) == ["path", "red", "green", "blue"] and list(out["path"]) == paths
    assert list(out[["red", "green", "blue"]].to_numpy().argmax(1)) == [0, 1, 2] * 3
    assert np.allclose(out[["red", "green", "blue"]].sum(axis=1), 1, atol=1e-5)
    assert report.classified == 9 and [p for p, _ in report.failures] == ["cam/broken.jpg___crop00_md.jpg",
                                                                         "cam/missing.jpg"]


@pytest.mark.parametrize("mean, std", [(None, None), ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))])
def test_classify_feeds_the_model_what_evaluation_feeds_it(tmp_path, mean, std):
    """uint8 crops from the loader, normalized on the device: the same input as ``eval_transform`` (the
    evaluation's), with the classifier's own mean and std when it has them."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(60, 40), (40, 70), (33, 33)]):
        paths.append(f"cam/noise{i}.png")
        (tmp_path / "cam").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / paths[-1])
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    stats = {} if mean is None else {"mean": mean, "std": std}
    transform = eval_transform(Preprocessing(24)) if mean is None else v2.Compose([eval_resize(24), normalize(mean, std)])
    with torch.no_grad():
        inputs = torch.stack([transform(Image.open(tmp_path / p).convert("RGB")) for p in paths])
        expected = torch.softmax(net(inputs), dim=1).numpy()
    classify(Classifier(net, ["a", "b", "c", "d"], Preprocessing(24, **stats), "v1"), tmp_path, paths, tmp_path / "out.csv",
             batch_size=2, workers=0)
    assert np.allclose(pd.read_csv(tmp_path / "out.csv")[["a", "b", "c", "d"]], expected, rtol=1e-5, atol=1e-6)


def _mixed_crops(folder) -> dict[str, str]:
    """Crops of every kind the loader meets, with the error each should get ("" when it decodes)."""
    yy, xx = np.mgrid[0:90, 0:130]
    smooth = Image.fromarray(np.stack([xx * 2 % 256, yy * 3 % 256, (xx + yy) % 256], -1).astype(np.uint8))
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 50, 3), dtype=np.uint8))
    (folder / "cam").mkdir(parents=True, exist_ok=True)
    kinds = {"cam/rgb.jpg": smooth, "cam/noise.jpg": noise, "cam/gray.jpg": smooth.convert("L"),
             "cam/cmyk.jpg": smooth.convert("CMYK"), "cam/crop.png": smooth}
    for path, image in kinds.items():
        image.save(folder / path, quality=90)
    (folder / "cam/truncated.jpg").write_bytes((folder / "cam/rgb.jpg").read_bytes()[:300])
    (folder / "cam/zero.jpg").write_bytes(b"")
    (folder / "cam/garbage.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return {**dict.fromkeys(kinds, ""), "cam/truncated.jpg": "Truncated", "cam/zero.jpg": "empty",
            "cam/garbage.jpg": "cannot identify", "cam/missing.jpg": "No such file"}


def test_decoding_on_the_device_gives_the_loaders_pixels_and_reports_the_same_crops(tmp_path):
    """decode="device" (the GPU path: bytes from the loader, decode_jpeg on the device, PIL for what it
    refuses), run here on the CPU: the loader path's pixels within one level, the same failures."""
    expected = _mixed_crops(tmp_path)
    paths = list(expected)
    encoded = [encoded_tensor((tmp_path / p).read_bytes()) for p in paths if (tmp_path / p).is_file()]
    batch, errors = decode_on(torch.device("cpu"), encoded, 32)
    decoded = [p for p in paths if not expected[p]]
    assert [bool(e) for e in errors] == [bool(expected[p]) for p in paths if (tmp_path / p).is_file()]
    for path, pixels in zip(decoded, batch):
        reference = eval_resize(32)(Image.open(tmp_path / path).convert("RGB"))
        assert (pixels.int() - reference.int()).abs().max() <= 1, path
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    model = Classifier(net, ["a", "b", "c"], Preprocessing(32), "v1")
    reports = {decode: classify(model, tmp_path, paths, tmp_path / f"{decode}.csv", batch_size=3, workers=0,
                                decode=decode) for decode in ("loader", "device")}
    for report in reports.values():
        assert {path: error for path, error in report.failures}.keys() == {p for p in paths if expected[p]}
        assert all(expected[path] in error for path, error in report.failures), report.failures
    by_loader, on_device = (pd.read_csv(tmp_path / f"{d}.csv", index_col="path") for d in ("loader", "device"))
    assert list(on_device.index) == decoded == list(by_loader.index)
    assert np.allclose(on_device, by_loader, atol=2e-3)


def test_a_target_mapping_sums_probabilities_and_sends_the_rest_to_other(tmp_path):
    paths = _crops(tmp_path, 6)
    model = Classifier(ColourModel(), ["red", "green", "blue"], Preprocessing(32), "v1")
    classify(model, tmp_path, paths, tmp_path / "plain.csv.gz", workers=0)
    classify(model, tmp_path, paths, tmp_path / "mapped.csv.gz", workers=0, mapping={"warm": ["red"], "cold": ["blue"]})
    plain, mapped = _read(tmp_path / "plain.csv.gz"), _read(tmp_path / "mapped.csv.gz")
    assert list(mapped.columns) == ["path", "warm", "cold", "other"]
    assert np.allclose(mapped["warm"], plain["red"], atol=1e-5)
    assert np.allclose(mapped["other"], plain["green"], atol=1e-5)  # unmapped: other
    classify(model, tmp_path, paths, tmp_path / "both.csv.gz", workers=0, mapping={"rgb": ["red", "green"]})
    assert np.allclose(_read(tmp_path / "both.csv.gz")["rgb"], plain["red"] + plain["green"], atol=1e-5)


def test_memory_stays_flat_as_the_export_grows(tmp_path):
    model = Classifier(ColourModel(), ["red", "green", "blue"], Preprocessing(16), "v1")
    peaks = []
    for n in (200, 1600):
        folder = tmp_path / str(n)
        paths = _crops(folder, n, size=16)
        tracemalloc.start()
        classify(model, folder, paths, folder / "out.csv.gz", batch_size=50, workers=0)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.5 * peaks[0] + 200_000  # 8x the crops, about the same peak


MD = {"info": {"format_version": "1.4", "detector": "md"}, "detection_categories": {"1": "animal", "2": "person"},
      "images": [{"file": "cam/a.jpg", "detections": [
          {"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2]},
          {"category": "1", "conf": 0.05, "bbox": [0.5, 0.5, 0.2, 0.2]},  # below the crop threshold: no crop
          {"category": "1", "conf": 0.8, "bbox": [0.3, 0.3, 0.2, 0.2]}]},
                 {"file": "cam/b.jpg", "failure": "corrupt"}]}


def test_the_merged_json_is_valid_sorted_rounded_and_thresholded():
    outputs = pd.DataFrame({"path": ["cam/a.jpg___crop00_md.jpg", "cam/a.jpg___crop02_md.jpg", "cam/z.jpg___crop00_md.jpg"],
                            "deer": [0.123456, 0.05, 0.5], "fox": [0.8, 0.9, 0.5], "owl": [0.076544, 0.05, 0.0]})
    when = datetime(2026, 11, 23, 10, 30, 5, tzinfo=timezone.utc)
    merged, unmatched = rv.merge_classifications(MD, outputs, ["deer", "fox", "owl"], "animl v1", threshold=0.1,
                                                 completed=when)
    assert validate_batch_output(merged) == [] and unmatched == ["cam/z.jpg___crop00_md.jpg"]
    detections = merged["images"][0]["detections"]
    assert detections[0]["classifications"] == [["1", 0.8], ["0", 0.1235]]  # sorted, rounded, owl < 0.1 omitted
    assert "classifications" not in detections[1]  # kept in place, not classified
    assert detections[2]["classifications"] == [["1", 0.9]]
    assert merged["classification_categories"] == {"0": "deer", "1": "fox", "2": "owl"}
    assert merged["info"]["classifier"] == "animl v1"
    assert merged["info"]["classification_completion_time"] == "2026-11-23 10:30:05"  # the reference dropped the time
    assert "classifications" not in MD["images"][0]["detections"][0]  # the input is left alone


def test_ground_truth_labels_and_relative_confidence_follow_the_reference():
    outputs = pd.DataFrame({"path": ["cam/a.jpg___crop00_md.jpg"], "deer": [0.7], "fox": [0.2], "owl": [0.1]})
    truth = {"cam/a.jpg___crop00_md.jpg": "fox"}
    merged, _ = rv.merge_classifications(MD, outputs, ["deer", "fox", "owl"], "m", threshold=0.0, ground_truth=truth,
                                         label_pos="first", relative_conf=True)
    classes = merged["images"][0]["detections"][0]["classifications"]
    assert classes[0] == ["1000001", 1.0]  # the label first
    assert classes[1:] == [["0", 0.5], ["1", 0.0], ["2", 0.0]]  # margins over the label's 0.2, floored at 0
    assert merged["classification_categories"]["1000001"] == "label: fox"
    assert validate_batch_output(merged) == []
    last, _ = rv.merge_classifications(MD, outputs, ["deer", "fox", "owl"], "m", ground_truth=truth, label_pos="last")
    assert last["images"][0]["detections"][0]["classifications"][-1] == ["1000001", 1.0]
    assert validate_batch_output(last) == []
    with pytest.raises(ValueError, match="ground-truth"):
        rv.merge_classifications(MD, outputs, ["deer", "fox", "owl"], "m", relative_conf=True)


def test_mislabeled_candidates_are_crops_beaten_by_the_margin():
    outputs = pd.DataFrame({"path": ["d/a.jpg___crop00_m.jpg", "d/b.jpg___crop00_m.jpg", "d/c.jpg___crop01_m.jpg"],
                            "label": ["fox", "fox", "deer"], "weight": 1.0,
                            "deer": [0.97, 0.6, 0.99], "fox": [0.01, 0.4, 0.01], "owl": [0.02, 0.0, 0.0]})
    found = candidates.mislabeled_candidates(outputs, ["deer", "fox", "owl"], margin=0.95)
    assert list(found["path"]) == ["d/a.jpg___crop00_m.jpg"]  # b: only 0.2 ahead; c: labelled as predicted
    assert found.iloc[0][["image", "pred"]].tolist() == ["d/a.jpg", "deer"]
    assert len(candidates.mislabeled_candidates(outputs, ["deer", "fox", "owl"], margin=0.1)) == 2


def test_a_timelapse_corrections_csv_relabels_and_drops():
    timelapse = (b"File,RelativePath,DateTime,DeleteFlag,mislabeled,correct_class\n"
                 b"fox_1.jpg,ridge\\cam1,2020-01-01,false,true,deer\n"
                 b"fox_2.jpg,ridge\\cam1,2020-01-01,false,false,deer\n"  # not flagged: ignored
                 b"owl.jpg,,2020-01-01,false,TRUE,\n")  # flagged without a class: dropped
    corrections = cr.read_corrections(timelapse)
    assert corrections.to_dict("records") == [{"dataset": "", "file": "ridge/cam1/fox_1.jpg", "correct_label": "deer"},
                                              {"dataset": "", "file": "owl.jpg", "correct_label": ""}]
    ds = pd.DataFrame({"path": ["exp/ridge/cam1/fox_1.jpg___crop00_md.jpg", "exp/ridge/cam1/fox_1.jpg___crop01_md.jpg",
                                "exp/ridge/cam1/fox_2.jpg___crop00_md.jpg", "exp/owl.jpg___crop00_md.jpg",
                                "exp/deer.jpg___crop00_md.jpg"],
                       "dataset": "site/exp", "location": "ridge", "dataset_class": "fox", "confidence": 1.0,
                       "label": ["fox", "fox", "fox", "owl", "deer"]})
    fixed, report = cr.apply_corrections(ds, corrections, {"site/exp": "exp"})
    assert list(fixed["label"]) == ["deer", "deer", "fox", "deer"] and len(fixed) == 4
    assert report["crops_relabeled"] == 2 and report["crops_dropped"] == 1 and report["unmatched"].empty
    plain = cr.read_corrections(b"file,correct_label\nsite/exp/ridge/cam1/fox_2.jpg,deer\nnowhere.jpg,fox\n")
    fixed, report = cr.apply_corrections(ds, plain, {"site/exp": "exp"})
    assert list(fixed["label"]) == ["fox", "fox", "deer", "owl", "deer"]
    assert report["unmatched"]["file"].tolist() == ["nowhere.jpg"]
    with pytest.raises(ValueError, match="corrections file"):
        cr.read_corrections(b"a,b\n1,2\n")
    empty, report = cr.apply_corrections(ds.iloc[:0], plain, {"site/exp": "exp"})  # no crops left: no KeyError
    assert empty.empty and report["unmatched"]["file"].tolist() == ["site/exp/ridge/cam1/fox_2.jpg", "nowhere.jpg"]


def _two_exports_sharing_file_names() -> pd.DataFrame:
    paths = ["a/ridge/deer_000.jpg___crop00_md.jpg", "b/ridge/deer_000.jpg___crop00_md.jpg",
             "a/ridge/deer_001.jpg___crop00_md.jpg", "b/ridge/deer_001.jpg___crop00_md.jpg"]
    return pd.DataFrame({"path": paths, "dataset": ["a", "b", "a", "b"], "location": "ridge", "dataset_class": "deer",
                         "confidence": 1.0, "label": ["deer", "deer", "deer", "fox"]})


def test_a_correction_relabels_only_the_export_it_names():
    ds, folders = _two_exports_sharing_file_names(), {"a": "a", "b": "b"}
    bare = cr.read_corrections(b"file,correct_label\nridge/deer_000.jpg,fox\n")
    with pytest.raises(cr.CorrectionsError, match="matches images of 2 exports .a, b.: name its export"):
        cr.apply_corrections(ds, bare, folders)
    named = cr.read_corrections(b"dataset,file,correct_label\nb,ridge/deer_000.jpg,fox\n")
    fixed, report = cr.apply_corrections(ds, named, folders)
    assert fixed["label"].tolist() == ["deer", "fox", "deer", "fox"] and report["crops_relabeled"] == 1
    prefixed = cr.read_corrections(b"file,correct_label\na/ridge/deer_001.jpg,fox\n")
    assert cr.apply_corrections(ds, prefixed, folders)[0]["label"].tolist() == ["deer", "deer", "fox", "fox"]
    # a Timelapse file is one export's: read for that export, it touches no other
    timelapse = b"File,RelativePath,mislabeled,correct_class\ndeer_001.jpg,ridge,true,fox\n"
    fixed, _ = cr.apply_corrections(ds, cr.read_corrections(timelapse, dataset="a"), folders)
    assert fixed["label"].tolist() == ["deer", "deer", "fox", "fox"]


def test_corrections_never_invent_labels_or_pick_a_winner_silently():
    ds, folders = _two_exports_sharing_file_names(), {"a": "a", "b": "b"}
    typo = cr.read_corrections(b"dataset,file,correct_label\na,ridge/deer_000.jpg,dear\n")
    with pytest.raises(cr.CorrectionsError, match="labels not in the dataset .*'dear' .did you mean 'deer'"):
        cr.apply_corrections(ds, typo, folders)
    assert cr.apply_corrections(ds, typo, folders, allow_new_labels=True)[0]["label"].iloc[0] == "dear"
    cased = cr.read_corrections(b"dataset,file,correct_label\na,ridge/deer_000.jpg, Fox\n")
    fixed, report = cr.apply_corrections(ds, cased, folders)
    assert fixed["label"].iloc[0] == "fox" and report["warnings"] == ["'Fox' read as the dataset's label 'fox'"]
    clash = cr.read_corrections(b"dataset,file,correct_label\na,ridge/deer_000.jpg,fox\na,ridge/deer_000.jpg,deer\n")
    with pytest.raises(cr.CorrectionsError, match="correct crop 'a/ridge/deer_000.jpg___crop00_md.jpg' to 'fox' "
                                                  "and 'deer'"):
        cr.apply_corrections(ds, clash, folders)
    same_twice = cr.read_corrections(b"dataset,file,correct_label\na,ridge/deer_000.jpg,fox\na,ridge/deer_000.jpg,fox\n")
    assert len(same_twice) == 1 and cr.apply_corrections(ds, same_twice, folders)[1]["crops_relabeled"] == 1
    comma = cr.read_corrections(b'dataset,file,correct_label\na,ridge/deer_000.jpg,"fox,deer"\n')
    with pytest.raises(cr.CorrectionsError, match="has a comma"):
        cr.apply_corrections(ds, comma, folders, allow_new_labels=True)


def test_sequences_come_from_seq_id_or_from_time_gaps_at_one_location(tmp_path):
    from animl_assets.core.review.sequences import aggregate, aggregate_csv, sequence_ids, sequence_top1

    images = [{"file_name": "a1.jpg", "seq_id": "s1", "location": "x", "datetime": "2024-01-01 00:00:00"},
              {"file_name": "a2.jpg", "seq_id": "s1", "location": "x", "datetime": "2024-01-01 05:00:00"},
              {"file_name": "b1.jpg", "location": "y", "datetime": "2024-01-01 00:00:00"},
              {"file_name": "b2.jpg", "location": "y", "datetime": "2024-01-01 00:00:50"},
              {"file_name": "b3.jpg", "location": "y", "datetime": "2024-01-01 00:01:40"},  # 50 s after b2
              {"file_name": "b4.jpg", "location": "y", "datetime": "2024-01-01 00:10:00"},
              {"file_name": "c1.jpg", "location": "z", "datetime": "2024-01-01 00:00:10"},  # another location
              {"file_name": "d1.jpg", "location": "y"}]  # no time: alone
    ids = sequence_ids(images, gap_s=60)
    assert ids["a1.jpg"] == ids["a2.jpg"] == "seq:s1"  # the export's seq_id wins over the 5 h gap
    assert ids["b1.jpg"] == ids["b2.jpg"] == ids["b3.jpg"] != ids["b4.jpg"]
    assert ids["c1.jpg"] not in (ids["b1.jpg"], ids["b4.jpg"]) and ids["d1.jpg"] == "image:d1.jpg"
    assert sequence_ids(images, gap_s=30)["b2.jpg"] != sequence_ids(images, gap_s=30)["b1.jpg"]

    outputs = pd.DataFrame({"path": ["b1.jpg___crop00_m.jpg", "b2.jpg___crop00_m.jpg", "b3.jpg___crop00_m.jpg",
                                     "b4.jpg___crop00_m.jpg"],
                            "label": ["fox", "fox", "fox", "deer"], "deer": [0.6, 0.3, 0.2, 0.9], "fox": [0.4, 0.7, 0.8, 0.1]})
    of = {p: ids[p.split("___")[0]] for p in outputs["path"]}
    per = aggregate(outputs, ["deer", "fox"], of).set_index("sequence")
    burst = per.loc[ids["b1.jpg"]]
    assert burst["crops"] == 3 and burst["fox"] == pytest.approx(0.6333, abs=1e-4) and burst["pred"] == "fox"
    assert sequence_top1(outputs, ["deer", "fox"], of) == 1.0  # b1 alone is wrong; its burst is right
    outputs.drop(columns="label").to_csv(tmp_path / "out.csv", index=False)
    streamed = aggregate_csv(str(tmp_path / "out.csv"), ["deer", "fox"], of, chunksize=2).set_index("sequence")
    assert np.allclose(streamed.loc[per.index, ["deer", "fox"]].to_numpy(), per[["deer", "fox"]].to_numpy())


def test_animl_bursts_come_from_the_camera_and_the_instant_whatever_the_offset():
    """Animl writes no seq_id: the camera is file_name's second segment and times mix offsets, Z, ms and null."""
    from animl_assets.core.review.sequences import image_times, sequence_ids

    def image(camera: str, name: str, when: str | None, location: str = "Fraser's Point") -> dict:
        return {"file_name": f"proj/{camera}/frasers_point/{name}.jpg", "location": location, "datetime": when,
                "serving_bucket_key": f"original/{name}-original.jpg"}

    images = [image("camA", "a1", "2025-11-02T01:59:59.000-07:00"),  # daylight saving ends between a1 and a2
              image("camA", "a2", "2025-11-02T01:00:00.500-08:00"),  # 1.5 s later, an hour "earlier" on the clock
              image("camA", "a3", "2025-11-02T09:00:02.250Z"),  # the same burst written in UTC
              image("camA", "a4", "2025-11-02T01:30:00.000-08:00"),  # half an hour later: a new burst
              image("camB", "b1", "2025-11-02T01:59:59.000-07:00"),  # another camera at the same site and time
              image("camA", "n1", None)]
    assert image_times([i["datetime"] for i in images]).dt.tz is not None
    ids = sequence_ids(images, gap_s=60)
    assert ids["proj/camA/frasers_point/a1.jpg"] == ids["proj/camA/frasers_point/a2.jpg"] \
        == ids["proj/camA/frasers_point/a3.jpg"] == "gap:camA:1"
    assert ids["proj/camA/frasers_point/a4.jpg"] == "gap:camA:2"
    assert ids["proj/camB/frasers_point/b1.jpg"] == "gap:camB:1"
    assert ids["proj/camA/frasers_point/n1.jpg"] == "image:proj/camA/frasers_point/n1.jpg"
