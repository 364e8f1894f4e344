"""Partial JPEG decoding: the same pixels as a full decode, clear refusals, and a fallback for the rest."""

import io
import random

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from animl_assets.core.detect._jpegregion import decode_region  # CI builds it: .ci/run installs libjpeg's headers
from animl_assets.core.detect.crops import (
    crop_box,
    crop_detections,
    cut,
    decode_for_crops,
    load_rgb,
    region_decoding_available,
)
from animl_assets.core.failures import failure_category
from animl_assets_tests.images_testdata import BROKEN, VALID, corrupt_jpeg, jpeg, rgb


def full_decode(data: bytes, scale: int = 1) -> np.ndarray:
    """Pillow's decode of the whole image (libjpeg-turbo's DCT-scaled decode for scale > 1)."""
    if scale == 1:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    height, width = simplejpeg.decode_jpeg_header(data)[:2]
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_factor=scale, min_width=-(-width // scale),
                                  min_height=-(-height // scale))


def assert_regions_match(data: bytes, trials: int, seed: int, scale: int = 1) -> None:
    """Random regions, each decoded alone, equal the same pixels of a whole decode."""
    full = full_decode(data, scale)
    height, width = full.shape[:2]
    rng = random.Random(seed)
    for _ in range(trials):
        left, top = rng.randrange(width), rng.randrange(height)
        right, bottom = rng.randrange(left + 1, width + 1), rng.randrange(top + 1, height + 1)
        raw, x0, y0, region_width, region_height = decode_region(data, left, top, right, bottom, scale)
        region = np.frombuffer(raw, np.uint8).reshape(region_height, region_width, 3)
        assert x0 <= left and y0 <= top and x0 + region_width >= right and y0 + region_height == bottom
        assert np.array_equal(region[top - y0:, left - x0:right - x0], full[top:bottom, left:right]), \
            (left, top, right, bottom)


def photo(width: int, height: int) -> Image.Image:
    """Colour noise, upscaled: smooth gradients in every channel, so that chroma upsampling at a
    region's edges would show any wrong neighbour."""
    small = np.random.default_rng(width * height).integers(0, 256, (height // 6 + 2, width // 6 + 2, 3))
    return Image.fromarray(small.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)


def test_the_crop_module_uses_the_region_decoder():
    assert region_decoding_available()


def test_real_camera_trap_images_decode_by_region_exactly(ena24_dir):
    for number, path in enumerate(sorted(ena24_dir.glob("*.jpg"))):
        assert_regions_match(path.read_bytes(), trials=6, seed=number)


@pytest.mark.parametrize("subsampling", [0, 1, 2], ids=["4:4:4", "4:2:2", "4:2:0"])
@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("size", [(1021, 767), (333, 1001), (17, 9), (1, 1)])
def test_every_jpeg_layout_decodes_by_region_exactly(subsampling, progressive, size, tmp_path):
    path = tmp_path / "x.jpg"  # to a file: Pillow cannot write large progressive JPEGs into a BytesIO
    photo(*size).save(path, quality=90, subsampling=subsampling, progressive=progressive)
    assert_regions_match(path.read_bytes(), trials=12, seed=size[0])


@pytest.mark.parametrize("subsampling", [0, 1, 2], ids=["4:4:4", "4:2:2", "4:2:0"])
@pytest.mark.parametrize("scale", [2, 4, 8])
def test_dct_scaled_regions_equal_the_whole_scaled_decode(subsampling, scale):
    data = jpeg(photo(1021, 767), subsampling=subsampling)
    assert full_decode(data, scale).shape == (-(-767 // scale), -(-1021 // scale), 3)
    assert_regions_match(data, trials=10, seed=scale, scale=scale)


def test_restart_markers_and_grayscale_decode_by_region_exactly():
    assert_regions_match(jpeg(photo(700, 500), restart_marker_blocks=3), trials=20, seed=1)
    assert_regions_match(jpeg(photo(700, 500).convert("L")), trials=20, seed=2)


def test_refusals_are_value_errors_not_crashes():
    cmyk = VALID["cmyk.jpg"]()
    with pytest.raises(ValueError, match="YCbCr"):
        decode_region(cmyk, 0, 0, 8, 8)
    plain = jpeg(rgb(64, 48))
    for region in [(0, 0, 65, 10), (0, 0, 10, 49), (5, 5, 5, 10), (5, 9, 10, 9), (0, 0, 33, 10, 2)]:
        with pytest.raises(ValueError, match="region"):
            decode_region(plain, *region)
    with pytest.raises(ValueError, match="scale"):
        decode_region(plain, 0, 0, 8, 8, 3)
    for data in [b"", b"hello, not an image", plain[:300], corrupt_jpeg()]:
        with pytest.raises(ValueError, match="libjpeg"):
            decode_region(data, 0, 0, 64, 48)


BOXES = [[0.0, 0.0, 0.2, 0.5], [0.9, 0.1, 0.1, 0.3], [0.1, 0.95, 0.4, 0.05], [0.3, 0.2, 0.7, 0.8],
         [0.5, 0.5, 1 / 640, 1 / 480], [0.5, 0.5, 0.0, 0.2], [0.0, 0.0, 0.9, 1.2]]


@pytest.mark.parametrize("boxes", [BOXES[i:i + 1] for i in range(len(BOXES))] + [BOXES, BOXES[1:3]])
@pytest.mark.parametrize("square", [True, False])
def test_crops_from_a_region_equal_crops_from_the_whole_image(boxes, square):
    data = jpeg(photo(640, 480))
    decoded = decode_for_crops(data, boxes, square=square)
    pixels, crop_boxes = decoded.pixels, decoded.boxes
    assert decoded.region
    whole = load_rgb(data)
    for bbox, box in zip(boxes, crop_boxes):
        expected = crop_box(640, 480, bbox, square)
        assert (box is None) == (expected is None)
        if box is not None:
            assert np.array_equal(cut(pixels, box), cut(whole, expected)), bbox
    if boxes == BOXES[1:2]:
        assert pixels.size < whole.size / 2  # only the part the crops need was decoded


@pytest.mark.parametrize("name", ["cmyk.jpg", "exif.jpg"])
def test_other_jpegs_fall_back_to_a_whole_decode(name):
    data = VALID[name]()
    decoded = decode_for_crops(data, [[0.1, 0.1, 0.5, 0.5]])
    assert not decoded.region and np.array_equal(decoded.pixels, load_rgb(data))
    assert decoded.boxes == [crop_box(*decoded.pixels.shape[1::-1], [0.1, 0.1, 0.5, 0.5], True)]


def test_png_and_grayscale_choose_the_right_decoder():
    buffer = io.BytesIO()
    photo(64, 48).save(buffer, "PNG")
    assert not decode_for_crops(buffer.getvalue(), [[0.1, 0.1, 0.5, 0.5]]).region
    assert decode_for_crops(VALID["gray.jpg"](), [[0.1, 0.1, 0.5, 0.5]]).region



@pytest.mark.parametrize("max_side", [40, 80, 160, 1000])
def test_draft_decoding_by_region_equals_the_whole_draft_decode(max_side):
    """With max_side the region is decoded DCT-scaled, as load_rgb decodes the whole image."""
    data = jpeg(photo(1021, 767))
    boxes = [[0.3, 0.2, 0.25, 0.3], [0.7, 0.6, 0.2, 0.35]]
    decoded = decode_for_crops(data, boxes, max_side=max_side)
    whole = load_rgb(data, boxes=boxes, max_side=max_side)
    assert decoded.region and decoded.pixels.size < whole.size
    for bbox, box in zip(boxes, decoded.boxes):
        expected = crop_box(whole.shape[1], whole.shape[0], bbox, True)
        assert np.array_equal(cut(decoded.pixels, box), cut(whole, expected)), (max_side, bbox)


def test_a_truncated_jpeg_fails_even_when_its_boxes_lie_above_the_cut():
    """The rows a box needs may all be present, but the reference (Pillow) rejects the file: so do we."""
    data = jpeg(photo(640, 480))
    head = data[: len(data) * 3 // 4]
    with pytest.raises(Exception) as raised:
        decode_for_crops(head, [[0.1, 0.05, 0.2, 0.1]])
    assert failure_category(raised.value) == "truncated"


def test_crop_runs_count_region_decodes(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, make in VALID.items():
        (images / name).write_bytes(make())
    for name, (make, _) in BROKEN.items():
        (images / name).write_bytes(make())
    md = {"info": {"format_version": "1.4", "detector": "d"}, "detection_categories": {"1": "animal"},
          "images": [{"file": name, "detections": [{"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.3, 0.3]}]}
                     for name in [*VALID, *BROKEN]]}
    report = crop_detections(md, images, tmp_path / "crops", workers=2)
    assert report.failures == {name: category for name, (_, category) in BROKEN.items()}
    assert report.images_decoded == len(VALID) and report.images_region_decoded == 2  # rgb and gray
