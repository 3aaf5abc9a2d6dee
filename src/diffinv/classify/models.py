"""Classifier architectures: torchvision's maintained definitions, given a small-image stem when needed.

The paper trains on 32 px (CIFAR) and small medical images. ImageNet stems (7x7 stride-2 conv plus
max-pool) throw away 4x of the resolution before the first block, so for small images the first
downsampling layers are set to stride 1 - the "CIFAR-style" variants used throughout the
literature - while every block stays torchvision's own code. ``timm:NAME`` builds any timm model
(for larger images), when timm is installed. :data:`ARCHITECTURES` is the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from diffinv.config import ConfigError
from diffinv.errors import UserError
from diffinv.registry import Registry

STEMS = ("auto", "cifar", "imagenet")
# Below this side length, "auto" picks the small-image stem.
SMALL_IMAGE = 64


class ModelConfigError(UserError, ValueError):
    """The architecture cannot be built as asked; the message says what to do."""


def _torchvision():
    try:
        from torchvision import models
    except ImportError as exc:
        raise ModelConfigError("the classifiers need torchvision: pip install torchvision (matching your torch)") from exc
    return models


def _resnet(name: str) -> Callable[[int, int, bool], nn.Module]:
    def build(num_classes: int, image_size: int, small: bool) -> nn.Module:
        net = getattr(_torchvision(), name)(num_classes=num_classes)
        if small:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        return net
    return build


def _vgg16(num_classes: int, image_size: int, small: bool) -> nn.Module:
    # Batch-norm VGG as trained on CIFAR; the 4096-wide ImageNet head (120M weights) is replaced by one
    # linear layer on globally pooled features, which is how CIFAR VGG-16 is defined.
    net = _torchvision().vgg16_bn(num_classes=num_classes)
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    net.classifier = nn.Linear(512, num_classes)
    if small and image_size < 32:
        # Five 2x2 max-pools need >= 32 px; on smaller images drop the last ones.
        pools = [i for i, m in enumerate(net.features) if isinstance(m, nn.MaxPool2d)]
        for i in pools[max(1, _halvings(image_size)):]:
            net.features[i] = nn.Identity()
    return net


def _first_conv_stride_one(name: str) -> Callable[[int, int, bool], nn.Module]:
    def build(num_classes: int, image_size: int, small: bool) -> nn.Module:
        net = getattr(_torchvision(), name)(num_classes=num_classes)
        if small:
            net.features[0][0].stride = (1, 1)
        return net
    return build


def _shufflenetv2(num_classes: int, image_size: int, small: bool) -> nn.Module:
    net = _torchvision().shufflenet_v2_x1_0(num_classes=num_classes)
    if small:
        net.conv1[0].stride = (1, 1)
        net.maxpool = nn.Identity()
    return net


class SmallConvNet(nn.Module):
    """Three conv-BN-ReLU blocks and a linear head (~0.1M weights): a CPU-quick classifier for tiny images.

    Not one of the paper's six; the CPU demo trains many of these in its 5-minute budget.
    """

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        layers, c_in = [], 3
        for c_out, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# name -> builder(num_classes, image_size, small_stem): a new architecture is one entry here (plus its test).
ARCHITECTURES: Registry[Callable[[int, int, bool], nn.Module]] = Registry("architecture", ConfigError)
ARCHITECTURES.add("resnet18", _resnet("resnet18"))
ARCHITECTURES.add("resnet50", _resnet("resnet50"))
ARCHITECTURES.add("vgg16", _vgg16)
ARCHITECTURES.add("mobilenetv2", _first_conv_stride_one("mobilenet_v2"))
ARCHITECTURES.add("efficientnet-b0", _first_conv_stride_one("efficientnet_b0"))
ARCHITECTURES.add("shufflenetv2", _shufflenetv2)
ARCHITECTURES.add("small-cnn", lambda num_classes, image_size, small: SmallConvNet(num_classes))


def check_arch(arch: str) -> None:
    """A clear error for an architecture that is neither registered nor ``timm:<name>``."""
    if arch not in ARCHITECTURES and not arch.startswith(("timm:", "torchvision:")):
        raise ConfigError(f"arch must be one of {', '.join(ARCHITECTURES.names())}, timm:<name> or torchvision:<name>; got {arch!r}")


def build_model(arch: str, num_classes: int, image_size: int, stem: str = "auto") -> nn.Module:
    """A freshly initialised classifier mapping [B, 3, S, S] images to [B, num_classes] logits.

    ``arch`` is one of :data:`ARCHITECTURES`, ``timm:<name>`` or ``torchvision:<name>``. ``stem`` ``auto`` uses the small-image
    stem when ``image_size`` < 64.
    """
    if stem not in STEMS:
        raise ModelConfigError(f"stem must be one of {', '.join(STEMS)}; got {stem!r}")
    if arch.startswith("timm:"):
        return _timm_model(arch[len("timm:"):], num_classes)
    if arch.startswith("torchvision:"):
        return _torchvision_model(arch[len("torchvision:"):], num_classes)
    if arch not in ARCHITECTURES:
        raise ModelConfigError(f"unknown architecture {arch!r}; use one of {', '.join(ARCHITECTURES.names())} or timm:<name>")
    return ARCHITECTURES[arch](num_classes, image_size, stem == "cifar" or (stem == "auto" and image_size < SMALL_IMAGE))


def _halvings(size: int) -> int:
    n = 0
    while size >= 2:
        size //= 2
        n += 1
    return n


def _timm_model(name: str, num_classes: int) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise ModelConfigError(f"timm:{name} needs timm: pip install 'diffusion-inversion[timm]'") from exc
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    except RuntimeError as exc:  # timm raises RuntimeError("Unknown model ...")
        raise ModelConfigError(f"timm cannot build {name!r}: {exc}") from exc


def _torchvision_model(name: str, num_classes: int) -> nn.Module:
    """torchvision's own model as published (ImageNet stem), so its published weights fit with --pretrained."""
    try:
        return _torchvision().get_model(name, weights=None, num_classes=num_classes)
    except ValueError as exc:  # "Unknown model"
        raise ModelConfigError(f"torchvision has no model {name!r} (e.g. resnet50, vit_b_16, convnext_tiny)") from exc


def classification_head(net: nn.Module) -> nn.Module:
    """The module that maps features to logits (timm's ``get_classifier``, else ``fc`` / ``classifier`` / ``head``)."""
    head = cast(Any, net).get_classifier() if hasattr(net, "get_classifier") else next(
        (getattr(net, a) for a in ("fc", "classifier", "head") if isinstance(getattr(net, a, None), nn.Module)), None)
    if head is None:
        raise ModelConfigError(f"cannot find the classification head of {type(net).__name__}")
    return head


def penultimate(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``net`` on ``x`` [B, 3, S, S]; returns (features [B, F] that enter the head, logits [B, C]).

    The features are caught by a hook on the classification head, so no architecture needs a
    second forward definition. The quality metrics embed images in this space.
    """
    head = classification_head(net)
    caught: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, inputs: caught.append(inputs[0].flatten(1)))
    try:
        logits = net(x)
    finally:
        hook.remove()
    return caught[0], logits


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A classifier saved by ``diffinv train`` (``model.safetensors``) and its metadata (classes, resolution, mean, std)."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw = f.metadata()
        weights = {k: f.get_tensor(k) for k in f.keys()}
    meta = {"arch": raw["arch"], "stem": raw["stem"], "classes": json.loads(raw["classes"]),
            "resolution": int(raw["resolution"]), "mean": torch.tensor(json.loads(raw["mean"])),
            "std": torch.tensor(json.loads(raw["std"]))}
    model = build_model(meta["arch"], len(meta["classes"]), meta["resolution"], meta["stem"])
    model.load_state_dict(weights)
    return model.to(device).eval(), meta
