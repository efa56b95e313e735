"""PreActResNet-18 (He et al. 2016, "Identity Mappings in Deep Residual Networks") for CIFAR.

Two official variants are used by the papers reproduced here; they have the same convolutions but
differ in two places:

=====================  ==========================================  ====================================
                       N-FGSM / FGSM-RS (``final_bn=True``)        Batch-in-Batch (``final_bn=False``)
=====================  ==========================================  ====================================
source                 pdejorge/N-FGSM ``architectures/            Yinting-Wu/Batch-in-Batch
                       preact_resnet.py`` = locuslab/fast_         ``defenses/models/preact_resnet.py``
                       adversarial ``CIFAR10/preact_resnet.py``    (kuangliu/pytorch-cifar style)
after the last stage   BatchNorm2d(512) + ReLU, then avgpool(4)    avgpool(4) directly
projection shortcut    1x1 conv on the block's raw input ``x``     1x1 conv on ``relu(bn1(x))``
=====================  ==========================================  ====================================

``preact_shortcut`` defaults to ``not final_bn`` so that one flag selects a whole variant; set it
explicitly to mix.  Both codes use PyTorch's default initialisation.  The official pooling
``avg_pool2d(out, 4)`` on the 4x4 map is global average pooling, used here (also for 28x28 input).
Parameter counts (10 classes): 11,172,170 with the final BN (N-FGSM), 11,171,146 without (BB).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import MODELS
from .core import Backbone, GlobalAvgPool, Stage, check_image_size, scale_channels


class PreActBlock(nn.Module):
    """bn-relu-conv3x3(stride)-bn-relu-conv3x3 plus a shortcut (identity or 1x1 conv)."""

    def __init__(self, in_planes: int, planes: int, stride: int, preact_shortcut: bool) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: Optional[nn.Conv2d] = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        self.preact_shortcut = preact_shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        if self.shortcut is None:
            residual = x
        else:
            residual = self.shortcut(out if self.preact_shortcut else x)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + residual


class PreActResNet18(Backbone):
    """Stages: ``stage1``..``stage4`` (outputs of ``layer1``..``layer4``, reductions 1, 2, 4, 8),
    then ``features`` (``pool``: global average pooling, after the final BN + ReLU if any)."""

    def __init__(self, num_classes: int, in_channels: int, width: float, final_bn: bool,
                 preact_shortcut: bool) -> None:
        super().__init__()
        planes = [scale_channels(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, stride=1, padding=1, bias=False)
        in_planes = planes[0]
        stages = []
        for p, stride in zip(planes, (1, 2, 2, 2)):
            stages.append(nn.Sequential(PreActBlock(in_planes, p, stride, preact_shortcut),
                                        PreActBlock(p, p, 1, preact_shortcut)))
            in_planes = p
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(planes[3]) if final_bn else None
        self.pool = GlobalAvgPool()
        self.head = nn.Linear(planes[3], num_classes)
        self.declare_stages(
            *(Stage(f"stage{i}", f"layer{i}", p, r)
              for i, (p, r) in enumerate(zip(planes, (1, 2, 4, 8)), start=1)),
            Stage("features", "pool", planes[3], 0))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        if self.bn is not None:
            out = F.relu(self.bn(out))
        return self.pool(out)


@MODELS.register("preactresnet18")
def preactresnet18(num_classes: int, in_channels: int, image_size: int, width: float, *,
                   final_bn: bool = True, preact_shortcut: Optional[bool] = None) -> PreActResNet18:
    """PreActResNet-18.  ``final_bn=True`` (default): N-FGSM's / locuslab FGSM-RS's net.
    ``final_bn=False``: Batch-in-Batch's ``PRN18`` (kuangliu style).  See the module docstring."""
    check_image_size("preactresnet18", image_size)
    if not isinstance(final_bn, bool):
        raise ValueError(f"final_bn must be a bool; got {final_bn!r}")
    if preact_shortcut is None:
        preact_shortcut = not final_bn
    elif not isinstance(preact_shortcut, bool):
        raise ValueError(f"preact_shortcut must be a bool or None; got {preact_shortcut!r}")
    return PreActResNet18(num_classes, in_channels, width, final_bn, preact_shortcut)
