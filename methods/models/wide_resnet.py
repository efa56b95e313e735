"""Wide ResNet (Zagoruyko & Komodakis 2016), in the two codings the reproduced papers use.

``variant="meliketoy"`` (default): N-FGSM's ``Wide_ResNet(28, 10, 0.3)``, pdejorge/N-FGSM
``architectures/wide_resnet.py``, copied from meliketoy/wide-resnet.pytorch.
  * every conv has a bias; the stride sits on the block's *second* 3x3 conv;
  * dropout after the first conv (``dropout(conv1(relu(bn1(x))))``);
  * the projection shortcut (1x1 conv with bias) takes the block's raw input ``x``;
  * final ``BatchNorm2d(momentum=0.9)`` (running stats move 90 % towards each batch) + ReLU;
  * initialisation: PyTorch defaults.  meliketoy's ``conv_init`` (xavier_uniform, gain sqrt 2, zero
    bias) is defined in the file but N-FGSM's ``train.py`` never applies it; meliketoy's own
    ``main.py`` does (``net.apply(conv_init)``).  ``conv_init=True`` reproduces the latter.
  * 36,489,290 parameters for WRN-28-10 with 10 classes.

``variant="bearpaw"``: Batch-in-Batch's ``WRN28``, Yinting-Wu/Batch-in-Batch
``defenses/models/wide_resnet.py``, from bearpaw/pytorch-classification ``models/cifar/wrn.py``.
  * no conv biases; the stride sits on the block's *first* 3x3 conv;
  * dropout before the second conv (``conv2(dropout(relu(bn2(conv1(.)))))``);
  * when the channel count changes, the 1x1 shortcut conv takes ``relu(bn1(x))``;
  * final ``BatchNorm2d`` with the default momentum 0.1;
  * init: conv ``normal(0, sqrt(2 / (k*k*out_channels)))``, BN (1, 0), linear bias 0;
  * 36,479,194 parameters for WRN-28-10 with 10 classes.

Both papers use depth 28, widen factor 10 and dropout 0.3 (N-FGSM ``--wide_resnet_dropout_rate``
default 0.3; BB ``get_model("WRN28")`` ``dropRate=0.3``), the defaults here.  Stage widths are
``16, 16k, 32k, 64k`` times ``width``; the official avgpool(8) is global average pooling.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import MODELS
from .core import Backbone, GlobalAvgPool, Stage, check_image_size, scale_channels

VARIANTS = ("meliketoy", "bearpaw")


class MeliketoyBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, dropout: float, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=True)
        self.shortcut: Optional[nn.Conv2d] = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + (x if self.shortcut is None else self.shortcut(x))


class BearpawBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, dropout: float, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(p=dropout)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        # Official: a shortcut conv iff the channel count changes (then the stride also differs
        # from 1 in every WRN); the stride test only matters for degenerate slim widths.
        self.shortcut: Optional[nn.Conv2d] = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(pre)))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(Backbone):
    """Stages: ``stage1``..``stage3`` (outputs of ``layer1``..``layer3``, reductions 1, 2, 4),
    then ``features`` (``pool``: global average pooling after the final BN + ReLU)."""

    def __init__(self, num_classes: int, in_channels: int, width: float, depth: int,
                 widen_factor: int, dropout: float, variant: str, conv_init: bool) -> None:
        super().__init__()
        meliketoy = variant == "meliketoy"
        block = MeliketoyBlock if meliketoy else BearpawBlock
        n = (depth - 4) // 6
        stages = [scale_channels(c, width)
                  for c in (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)]
        self.conv1 = nn.Conv2d(in_channels, stages[0], 3, padding=1, bias=meliketoy)
        in_planes = stages[0]
        layers = []
        for planes, stride in zip(stages[1:], (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(block(in_planes, planes, dropout, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.bn = nn.BatchNorm2d(stages[3], momentum=0.9 if meliketoy else 0.1)
        self.pool = GlobalAvgPool()
        self.head = nn.Linear(stages[3], num_classes)
        self.declare_stages(
            *(Stage(f"stage{i}", f"layer{i}", p, r)
              for i, (p, r) in enumerate(zip(stages[1:], (1, 2, 4)), start=1)),
            Stage("features", "pool", stages[3], 0))
        if meliketoy and conv_init:
            self._meliketoy_conv_init()
        elif not meliketoy:
            self._bearpaw_init()

    def _meliketoy_conv_init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight, gain=math.sqrt(2))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _bearpaw_init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.pool(F.relu(self.bn(out)))


@MODELS.register("wrn")
def wrn(num_classes: int, in_channels: int, image_size: int, width: float, *,
        depth: int = 28, widen_factor: int = 10, dropout: float = 0.3,
        variant: str = "meliketoy", conv_init: bool = False) -> WideResNet:
    """WRN-``depth``-``widen_factor``.  ``variant="meliketoy"``: N-FGSM's; ``"bearpaw"``: BB's.
    ``conv_init`` (meliketoy only) applies meliketoy's xavier init, which N-FGSM does not."""
    check_image_size("wrn", image_size)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth must be 6n+4 with n >= 1 (e.g. 28, 34); got {depth!r}")
    if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
        raise ValueError(f"widen_factor must be a positive int; got {widen_factor!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
    if conv_init and variant != "meliketoy":
        raise ValueError("conv_init=True applies only to variant='meliketoy' "
                         "(bearpaw's init is always applied)")
    return WideResNet(num_classes, in_channels, width, depth, widen_factor, float(dropout),
                      variant, bool(conv_init))
