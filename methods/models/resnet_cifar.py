"""CIFAR ResNet-32 of the long-tail literature (He et al. 2016, section 4.2; 6n+2 layers, n = 5).

Follows kaidic/LDAM-DRW ``models/resnet_cifar.py`` ``resnet32(num_classes, use_norm)``, which is
Yerlan Idelbayev's CIFAR ResNet also used by MW-Net / MetaSAug / CALA-style long-tail code:
conv3x3(16)-BN-ReLU, three stages of 5 BasicBlocks with 16/32/64 channels (strides 1/2/2),
option-A shortcuts (stride-2 subsampling plus zero channel padding, no parameters), global average
pooling and a linear head.  Convolution and linear weights are ``kaiming_normal_`` (fan_in, gain
sqrt 2); biases and BN keep PyTorch defaults.  ``normed_head=True`` swaps the head for LDAM's cosine
classifier :class:`~methods.models.core.NormedLinear` (official ``use_norm=True``).
Parameter counts (10 classes): 464,154; with ``normed_head``: 464,144 (no bias).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import MODELS
from .core import Backbone, GlobalAvgPool, NormedLinear, Stage, check_image_size, scale_channels


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: keep every ``stride``-th pixel, zero-pad the new channels.

    The official code pads ``planes // 4`` channels on each side, which equals the even split
    used here whenever ``planes == 2 * in_planes`` (always at width 1)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_front = (planes - in_planes) // 2
        self.pad_back = planes - in_planes - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = OptionAShortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(Backbone):
    """Stages: ``stage1``..``stage3`` (outputs of ``layer1``..``layer3``, reductions 1, 2, 4),
    then ``features`` (``pool``: global average pooling)."""

    def __init__(self, num_classes: int, in_channels: int, width: float, blocks_per_stage: int,
                 normed_head: bool) -> None:
        super().__init__()
        planes = [scale_channels(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        in_planes = planes[0]
        stages = []
        for p, stride in zip(planes, (1, 2, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, p, stride if i == 0 else 1))
                in_planes = p
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = GlobalAvgPool()
        self.head = nn.Linear(planes[2], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
        if normed_head:  # built after the init loop: the official NormedLinear keeps its own init
            self.head = NormedLinear(planes[2], num_classes)
        self.declare_stages(
            *(Stage(f"stage{i}", f"layer{i}", p, r)
              for i, (p, r) in enumerate(zip(planes, (1, 2, 4)), start=1)),
            Stage("features", "pool", planes[2], 0))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.pool(self.layer3(self.layer2(self.layer1(out))))


@MODELS.register("resnet32")
def resnet32(num_classes: int, in_channels: int, image_size: int, width: float, *,
             normed_head: bool = False) -> CifarResNet:
    """ResNet-32 for CIFAR(-LT), LDAM-DRW style; ``normed_head`` = LDAM's ``use_norm``."""
    check_image_size("resnet32", image_size)
    if not isinstance(normed_head, bool):
        raise ValueError(f"normed_head must be a bool; got {normed_head!r}")
    return CifarResNet(num_classes, in_channels, width, 5, normed_head)
