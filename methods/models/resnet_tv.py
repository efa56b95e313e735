"""The CIFAR-10 ResNet-18 of Selective Adversarial Training (arXiv 2512.22069).

youranye/Selective-Adversarial-Training ``margin_based_cifar_10/*.py`` ``ResNet18_CIFAR10``:
``torchvision.models.resnet18(num_classes=10)`` (no pretrained weights) with ``conv1`` replaced by
a 3x3 / stride 1 / pad 1 conv (no bias) and ``maxpool`` by ``Identity``.  The replacement conv1 is
created after torchvision's init loop, so it keeps PyTorch's default init while every other conv
has torchvision's kaiming_normal (fan_out); this is reproduced.  The torchvision net is kept as
``self.model`` like the official wrapper; ``head`` is its ``fc``.  11,173,962 parameters (10 classes).

For ``width != 1`` the four stages, ``bn1`` and ``fc`` are rebuilt with scaled channels through
torchvision's own ``ResNet._make_layer`` (same blocks, same init as torchvision applies).
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock

from ..registry import MODELS
from .core import Backbone, Stage, check_image_size, scale_channels

RESNET18_PLANES = (64, 128, 256, 512)


def _torchvision_init(module: nn.Module) -> None:
    """The init torchvision's ``ResNet.__init__`` applies (zero_init_residual=False)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class TorchvisionResNet18(Backbone):
    """Stages: ``stage1``..``stage4`` (outputs of ``model.layer1``..``model.layer4``, reductions
    1, 2, 4, 8), then ``features`` (``flatten``, an ``nn.Flatten`` after ``model.avgpool``)."""

    def __init__(self, num_classes: int, in_channels: int, width: float) -> None:
        super().__init__()
        net = resnet18(weights=None, num_classes=num_classes)
        planes = [scale_channels(c, width) for c in RESNET18_PLANES]
        if tuple(planes) != RESNET18_PLANES:
            net.bn1 = nn.BatchNorm2d(planes[0])
            net.inplanes = planes[0]  # read by _make_layer
            for i, (p, stride) in enumerate(zip(planes, (1, 2, 2, 2)), start=1):
                layer = net._make_layer(BasicBlock, p, 2, stride=stride)
                _torchvision_init(layer)
                setattr(net, f"layer{i}", layer)
            net.fc = nn.Linear(planes[3], num_classes)
        net.conv1 = nn.Conv2d(in_channels, planes[0], kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.model = net
        self.flatten = nn.Flatten(1)  # parameter-free: the features stage is a module output
        self.declare_stages(
            *(Stage(f"stage{i}", f"model.layer{i}", p, r)
              for i, (p, r) in enumerate(zip(planes, (1, 2, 4, 8)), start=1)),
            Stage("features", "flatten", planes[3], 0))

    @property
    def head(self) -> nn.Linear:
        return self.model.fc

    def __setattr__(self, name: str, value: object) -> None:
        if name == "head":  # the head lives in the torchvision net as ``fc``
            self.model.fc = value
        else:
            super().__setattr__(name, value)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
        return self.flatten(m.avgpool(x))


@MODELS.register("resnet18_sat")
def resnet18_sat(num_classes: int, in_channels: int, image_size: int,
                 width: float) -> TorchvisionResNet18:
    """Selective-AT's CIFAR ResNet-18 (torchvision resnet18, 3x3 stem, no max-pool); no arch args."""
    check_image_size("resnet18_sat", image_size)
    return TorchvisionResNet18(num_classes, in_channels, width)
