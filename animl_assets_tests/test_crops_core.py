"""Crops: reference geometry, pixel identity with the reference's Pillow code, naming, awkward inputs."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

from animl_assets.core.detect.crops import (
    MANIFEST,
    _draft_factor,
    crop_box,
    crop_detections,
    crop_name,
    cut,
    detector_tag,
    load_rgb,
)
from animl_assets.core.ingest.sample import BROKEN as BROKEN_SAMPLE
from animl_assets_tests.images_testdata import BROKEN, jpeg


def reference_crop(img: Image.Image, bbox, square) -> Image.Image | None:
    """crop_detections.py's save_crop, as the oracle (Pillow crop + ImageOps.pad): the image it saves."""
    img_w, img_h = img.size
    xmin, ymin = int(bbox[0] * img_w), int(bbox[1] * img_h)
    box_w, box_h = int(bbox[2] * img_w), int(bbox[3] * img_h)
    if square:
        box_size = max(box_w, box_h)
        xmin = max(0, min(xmin - int((box_size - box_w) / 2), img_w - box_w))
        ymin = max(0, min(ymin - int((box_size - box_h) / 2), img_h - box_h))
        box_w, box_h = min(img_w, box_size), min(img_h, box_size)
    if box_w == 0 or box_h == 0:
        return None
    crop = img.crop(box=[xmin, ymin, xmin + box_w, ymin + box_h])
    if square and box_w != box_h:
        crop = ImageOps.pad(crop, size=(box_size, box_size), color=0)
    return crop


def noise(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


EDGE_BOXES = [
    [0.0, 0.0, 0.2, 0.5],          # top-left corner, tall
    [0.9, 0.1, 0.1, 0.3],          # right border, tall: the square reaches past the image
    [0.1, 0.95, 0.4, 0.05],        # bottom border, wide
    [0.45, 0.0, 0.1, 0.05],        # top border
    [0.0, 0.0, 1.0, 1.0],          # the whole image
    [0.3, 0.2, 0.7, 0.8],          # reaches the bottom-right corner
    [0.5, 0.5, 1 / 640, 1 / 480],  # 1 px
    [0.5, 0.5, 0.0, 0.2],          # zero width
    [0.2, 0.3, 0.33333, 0.1234],   # fractional
    [0.0, 0.0, 0.9, 1.2],          # beyond the image (invalid, still identical to the reference)
]


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (97, 61)])
@pytest.mark.parametrize("square", [True, False])
def test_geometry_and_pixels_equal_the_reference(size, square):
    image = noise(*size)
    pixels = np.asarray(image)
    for bbox in EDGE_BOXES:
        expected = reference_crop(image, bbox, square)
        expected = None if expected is None else np.asarray(expected)
        box = crop_box(*size, bbox, square)
        if int(bbox[2] * size[0]) == 0 or int(bbox[3] * size[1]) == 0:
            assert box is None, bbox  # zero-size boxes are skipped (the reference squares them)
            continue
        if expected is None:
            assert box is None, bbox
            continue
        ours = cut(pixels, box)
        assert ours.shape == expected.shape, (bbox, ours.shape, expected.shape)
        assert np.array_equal(ours, expected), bbox


def test_square_crop_formula_on_a_border():
    box = crop_box(100, 100, [0.9, 0.1, 0.1, 0.4], square=True)
    # s = 40; x0 = max(0, min(90 - 15, 100 - 10)) = 75; side clipped to min(100, 40)
    assert (box.left, box.top, box.width, box.height, box.side) == (75, 10, 40, 40, 40)
    assert crop_box(100, 100, [0.5, 0.5, 0.0, 0.2], square=True) is None


def test_names_follow_the_design():
    assert crop_name("loc1/a.jpg", 3, "md_v5a.0.0.pt") == "loc1/a.jpg___crop03_md_v5a.0.0.pt.jpg"
    assert detector_tag("/weights/My Detector:v2") == "My_Detector_v2"
    assert detector_tag("") == "detector"


def test_decoding_matches_pillow_and_applies_exif(ena24_dir):
    data = (ena24_dir / "2480.jpg").read_bytes()
    assert np.array_equal(load_rgb(data), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    upright = noise(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = Image.open(io.BytesIO(jpeg(upright.transpose(Image.Transpose.ROTATE_90), exif=exif, quality=100)))
    assert load_rgb(jpeg(upright.transpose(Image.Transpose.ROTATE_90), exif=exif)).shape == (48, 64, 3)
    assert np.array_equal(load_rgb(jpeg(upright.transpose(Image.Transpose.ROTATE_90), exif=exif, quality=100)),
                          np.asarray(ImageOps.exif_transpose(rotated).convert("RGB")))


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "RGBA", "I;16", "LA"])
def test_every_mode_becomes_rgb(mode):
    base = noise(32, 24)
    if mode == "I;16":
        image = Image.fromarray((np.asarray(base)[..., 0].astype(np.uint16) * 257))
        fmt = "PNG"
    else:
        image = base.convert(mode)
        fmt = "JPEG" if mode in ("CMYK", "L") else "PNG"
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    pixels = load_rgb(buffer.getvalue())
    assert pixels.shape == (24, 32, 3) and pixels.dtype == np.uint8
    if mode == "I;16":  # scaled to 8 bits, not clipped to white
        assert np.array_equal(pixels[..., 0], np.asarray(base)[..., 0])


def md_for(files_boxes, detector="md_v5a.0.0.pt"):
    return {"info": {"format_version": "1.4", "detector": detector},
            "detection_categories": {"1": "animal", "2": "person"},
            "images": [{"file": f, "detections": [{"category": c, "conf": p, "bbox": b} for c, p, b in boxes]}
                       for f, boxes in files_boxes.items()]}


@pytest.fixture()
def workdir(tmp_path):
    images = tmp_path / "images"
    (images / "loc").mkdir(parents=True)
    noise(640, 480, 1).save(images / "loc" / "a.jpg")
    noise(480, 640, 2).save(images / "loc" / "b.jpg")
    for name, (make, _) in BROKEN.items():
        (images / name).write_bytes(make())
    return images, tmp_path / "crops"


def test_threshold_and_category_keep_detection_indices(workdir):
    images, crops = workdir
    md = md_for({"loc/a.jpg": [("1", 0.9, [0.1, 0.1, 0.2, 0.2]), ("1", 0.1, [0.5, 0.5, 0.2, 0.2]),
                               ("2", 0.99, [0.0, 0.0, 0.5, 0.5]), ("1", 0.8, [0.6, 0.6, 0.3, 0.3])]})
    report = crop_detections(md, images, crops, threshold=0.5, workers=1)
    made = sorted(p.name for p in (crops / "loc").iterdir())
    assert made == ["a.jpg___crop00_md_v5a.0.0.pt.jpg", "a.jpg___crop03_md_v5a.0.0.pt.jpg"]
    assert report.crops == 2 and report.images == 1 and not report.failures


def test_a_corrupt_image_in_the_middle_is_reported_not_fatal(workdir):
    images, crops = workdir
    box = [("1", 0.9, [0.1, 0.1, 0.3, 0.3])]
    files = {"loc/a.jpg": box, **{name: box for name in BROKEN}, "gone.jpg": box, "loc/b.jpg": box,
             "../escape.jpg": box}
    report = crop_detections(md_for(files), images, crops, workers=2)
    assert report.crops == 2 and report.images == len(files)
    expected = {name: category for name, (_, category) in BROKEN.items()}
    assert report.failures == {**expected, "gone.jpg": "nonexistent", "../escape.jpg": "bad"}
    assert all(report.errors[name] for name in report.failures)
    assert (crops / "loc" / "b.jpg___crop00_md_v5a.0.0.pt.jpg").is_file()


def test_rerun_does_nothing_and_changes_are_recropped(workdir):
    images, crops = workdir
    md = md_for({"loc/a.jpg": [("1", 0.9, [0.1, 0.1, 0.3, 0.3])], "loc/b.jpg": [("1", 0.9, [0.2, 0.2, 0.3, 0.1])]})
    first = crop_detections(md, images, crops, workers=1)
    manifest = (crops / MANIFEST).read_text()
    crop_a = crops / "loc" / "a.jpg___crop00_md_v5a.0.0.pt.jpg"
    stamp = crop_a.stat().st_mtime_ns
    second = crop_detections(md, images, crops, workers=2)
    assert (second.crops, second.reused, second.images_decoded) == (0, 2, 0)
    assert crop_a.stat().st_mtime_ns == stamp and (crops / MANIFEST).read_text() == manifest
    # a changed source image, a moved box and a deleted crop are each redone; nothing else
    noise(640, 480, 9).save(images / "loc" / "a.jpg")
    md["images"][1]["detections"][0]["bbox"] = [0.25, 0.2, 0.3, 0.1]
    third = crop_detections(md, images, crops, workers=1)
    assert (third.crops, third.reused) == (2, 0)
    (crops / "loc" / "b.jpg___crop00_md_v5a.0.0.pt.jpg").unlink()
    fourth = crop_detections(md, images, crops, workers=1)
    assert (fourth.crops, fourth.reused, fourth.images_decoded) == (1, 1, 1)
    assert first.crops == 2


@pytest.mark.parametrize("bbox", [[0.9, 0.1, 0.1, 0.4], [0.0, 0.0, 0.9, 1.2], [0.2, 0.3, 0.1, 0.2]],
                         ids=["square", "padded", "small"])
@pytest.mark.parametrize("square", [True, False], ids=["square", "tight"])
def test_crops_on_disk_are_the_reference_bytes(workdir, bbox, square):
    """Byte for byte what crop_detections.py writes: Pillow's crop keeps the source's JPEG comment
    (camera traps write their trigger data there), a padded crop is a new image without it."""
    images, crops = workdir
    noise(640, 480, 3).save(images / "loc" / "c.jpg", comment=b"Trg: M 3/10\rTmp: 21 C")
    crop_detections(md_for({"loc/c.jpg": [("1", 0.9, bbox)]}), images, crops, workers=1, square=square)
    expected = io.BytesIO()
    with Image.open(images / "loc" / "c.jpg") as source:
        reference_crop(source, bbox, square).save(expected, "JPEG")
    assert (crops / "loc" / "c.jpg___crop00_md_v5a.0.0.pt.jpg").read_bytes() == expected.getvalue()


def test_real_camera_trap_images_crop_in_parallel(ena24_dir, tmp_path):
    md = json.loads((ena24_dir / "md_annotations.json").read_text())
    report = crop_detections(md, ena24_dir, tmp_path / "crops", workers=2)
    assert report.crops == sum(len(i["detections"]) for i in md["images"]) and not report.failures
    for row in report.rows:
        with Image.open(tmp_path / "crops" / row["crop"]) as crop:
            assert crop.mode == "RGB" and crop.width == crop.height
    assert os.path.getsize(tmp_path / "crops" / MANIFEST) > 0
    shutil.rmtree(tmp_path / "crops")


def test_process_workers_give_the_same_crops(workdir, tmp_path):
    images, crops = workdir
    md = md_for({"loc/a.jpg": [("1", 0.9, [0.1, 0.1, 0.3, 0.3])], "loc/b.jpg": [("1", 0.9, [0.6, 0.2, 0.3, 0.1])],
                 "zero.jpg": [("1", 0.9, [0.1, 0.1, 0.3, 0.3])]})
    threads = crop_detections(md, images, crops, workers=2)
    processes = crop_detections(md, images, tmp_path / "by_process", workers=2, executor="processes")
    assert processes.failures == threads.failures == {"zero.jpg": "non_image"}
    for row in threads.rows:
        assert (crops / row["crop"]).read_bytes() == (tmp_path / "by_process" / row["crop"]).read_bytes()
    with pytest.raises(ValueError, match="executor"):
        crop_detections(md, images, tmp_path / "x", workers=2, executor="fibers")


def test_draft_factor_keeps_every_crop_at_least_max_side():
    boxes = [(0.1, 0.1, 0.3, 0.3), (0.5, 0.5, 0.2, 0.1)]  # smallest crop side: 0.2 * 2048 = 409 px
    assert _draft_factor((2048, 1536), boxes, 224) == 1
    assert _draft_factor((2048, 1536), boxes, 100) == 4
    assert _draft_factor((2048, 1536), boxes, 50) == 8
    assert _draft_factor((2048, 1536), boxes, None) == 1


def test_max_side_decodes_scaled_and_shrinks_crops(ena24_dir, tmp_path):
    md = json.loads((ena24_dir / "md_annotations.json").read_text())
    md["images"] = md["images"][:4]
    full = crop_detections(md, ena24_dir, tmp_path / "full", workers=1)
    small = crop_detections(md, ena24_dir, tmp_path / "small", workers=1, max_side=128)
    for row_full, row_small in zip(full.rows, small.rows):
        assert max(int(row_small["width"]), int(row_small["height"])) == 128
        assert int(row_full["width"]) > 128
        with Image.open(tmp_path / "full" / row_full["crop"]) as a, Image.open(tmp_path / "small" / row_small["crop"]) as b:
            thumbs = [np.asarray(x.resize((32, 32), Image.Resampling.BOX), dtype=np.int16) for x in (a, b)]
            assert np.abs(thumbs[0] - thumbs[1]).mean() < 6  # the same content, only smaller
    # changing max_side is a change: everything is cropped again
    again = crop_detections(md, ena24_dir, tmp_path / "small", workers=1, max_side=64)
    assert again.crops == small.crops and again.reused == 0


def test_crop_module_starts_light():
    code = "import sys, animl_assets.core.detect.crops; print(sorted({'torch', 'dagster'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_core_api_is_importable_from_the_package(sample_dir, sample_counts, tmp_path):
    from animl_assets.core import cct_to_md, load_cct, validate_batch_output
    from animl_assets.core import crop_detections as api_crop

    md = cct_to_md(load_cct((sample_dir / "sample_export.json").read_bytes()))
    assert validate_batch_output(md) == []
    report = api_crop(md, sample_dir, tmp_path / "c", threshold=0.0, square=True, workers=None)
    assert report.crops == sample_counts["crops"] and set(report.failures) == {f"broken/{n}.jpg" for n in BROKEN_SAMPLE}
    assert report.failures["broken/missing.jpg"] == "nonexistent"


def test_an_image_over_the_pixel_cap_fails_as_bad_without_being_decoded(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (4000, 3000)).save(images / "big.png")
    md = {"info": {"detector": "x"}, "detection_categories": {"1": "animal"},
          "images": [{"file": "big.png", "detections": [{"category": "1", "conf": 1.0, "bbox": [0, 0, 0.5, 0.5]}]}]}
    report = crop_detections(md, images, tmp_path / "crops", workers=1, max_pixels=10_000_000)
    assert report.failures == {"big.png": "bad"} and "over the cap of 10" in report.errors["big.png"]
    assert report.images_decoded == 0
    assert crop_detections(md, images, tmp_path / "crops", workers=1).crops == 1  # 12 MP: under the default
