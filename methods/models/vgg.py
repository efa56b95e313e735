"""VGG19 with BatchNorm for CIFAR, the network of the Batchout extension's experiments
(Hrushikesh-github/Batchout-Robustness-method @7c138a92: ``vgg19/standard/vgg.py`` and
``vgg_change.py``; the Batchout nets ``vgg19/batchout_many/random_n/vgg_batchout_random.py`` and
``vgg19/batchout_all/vgg_batchout_middle_all.py`` build the same ``VGG`` with Batchout calls).

Layers (``features.0`` .. ``features.20``, in forward order; the extension's call index ``#i``
in its code comments is ``features.i``):

    conv1 conv2 pool1 | conv3 conv4 pool2 | conv5 conv6 conv7 conv8 pool3 |
    conv9 conv10 conv11 conv12 pool4 | conv13 conv14 conv15 conv16 pool5 | flatten | fc

channels 64, 64 | 128, 128 | 256 x 4 | 512 x 4 | 512 x 4; every conv is 3x3, padding 1, with a
bias, followed by BatchNorm2d and ReLU; every pool is MaxPool2d(2, 2); the classifier is one
``nn.Linear(512, num_classes)`` on the flattened 1x1x512 map (the extension's ``classifier``).
Initialisation as ``_initialize_weights``: conv ``kaiming_normal_(fan_out, relu)`` with zero
bias, BN weight 1 and bias 0, linear ``normal_(0, 0.01)`` with zero bias.

Arch args:

* ``order``: ``"conv_relu_bn"`` (default) is the order of every Batchout net of the extension and
  of its ``vgg_change.py`` (Conv -> ReLU -> BN: BatchNorm *after* the activation);
  ``"conv_bn_relu"`` is the usual order (torchvision; the extension's ``standard/vgg.py``).
* ``tied``: ``False`` (default) gives 16 independent conv layers (the clean VGG19-BN the spec
  recommends, section 4.2).  ``True`` reproduces the extension's weight tying, where one module
  object is called at several depths: ``conv6``, ``conv7`` and ``conv8`` share one Conv2d and
  one BatchNorm2d (the code's ``features8``), and ``conv10`` .. ``conv16`` (seven layers, across
  pool4) share another (``features11``); conv1-5 and conv9 are their own.  Shared BatchNorms are
  called (and, in training, update their running statistics) once per use, as in the code.  The
  shared modules are registered under every position that uses them (so the ``state_dict`` keys
  are the same in both modes and a tied tensor appears under each of its positions);
  ``parameters()`` yields each once.

Pooling uses ``ceil_mode=True``: identical at 32x32 (every map side is even: 32, 16, 8, 4, 2,
1), and at 28x28 it gives 28, 14, 7, 4, 2, 1, so the classifier again sees 1x1x512 (with floor
pooling a 28x28 input would vanish before pool5).  ``width`` scales every channel count.

Parameter counts (10 / 100 classes, width 1, either order): untied 20,040,522 / 20,086,692
(the common "VGG19" of CIFAR codes); tied 4,694,346 / 4,740,516 (the extension's ``VGG()``,
counted by instantiating it).

Stages: ``stage1`` .. ``stage5`` are the pool outputs (reductions 2, 4, 8, 16, 32), then
``features`` (``flatten``).  Hidden layers (:class:`~.core.HiddenLayer`, BatchOut's insertion
points): ``conv1`` .. ``conv16`` and ``pool1`` .. ``pool5`` in forward order; a conv layer's
output is its block (after ReLU and BN in either order) and its pre-activation is a
parameter-free ``nn.Identity`` tap on the tensor entering the ReLU (the conv output for
``conv_relu_bn``, the BN output for ``conv_bn_relu``); a pool has no pre-activation.  Taps and
blocks are per position, so each is called once per forward even when weights are tied.
"""
from __future__ import annotations

import enum
from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from ..registry import MODELS
from .core import Backbone, HiddenLayer, Stage, check_image_size, scale_channels

#: VGG19's plan: conv channels, "M" for a 2x2 max-pool.
VGG19_PLAN: Tuple[Union[int, str], ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                          512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
#: ``tied=True``: conv layer number (1-based) -> the conv layer whose modules it reuses
#: (the extension's ``features8`` is conv6-8, ``features11`` is conv10-16).
TIED_TO = {7: 6, 8: 6, **{i: 10 for i in range(11, 17)}}


class Order(str, enum.Enum):
    CONV_RELU_BN = "conv_relu_bn"   # the extension's Batchout nets (BN after the ReLU)
    CONV_BN_RELU = "conv_bn_relu"   # torchvision / the extension's standard/vgg.py


class ConvBlock(nn.Module):
    """One conv layer position: conv3x3 -> [BN] -> ``pre`` tap -> ReLU -> [BN].

    ``pre`` (an ``nn.Identity``) sees the tensor entering the ReLU, so a forward hook on it can
    replace the pre-activation; the block's own output is the layer's output.  ``conv`` and
    ``bn`` may be shared with other blocks (``tied=True``)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, order: Order) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.pre = nn.Identity()
        self.relu = nn.ReLU()
        self.order = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.order is Order.CONV_RELU_BN:
            return self.bn(self.relu(self.pre(x)))
        return self.relu(self.pre(self.bn(x)))


class VGG19BN(Backbone):
    def __init__(self, num_classes: int, in_channels: int, width: float, order: Order,
                 tied: bool) -> None:
        super().__init__()
        blocks: List[nn.Module] = []
        stages: List[Stage] = []
        layers: List[HiddenLayer] = []
        convs: dict = {}
        channels, conv_i, pool_i = in_channels, 0, 0
        for item in VGG19_PLAN:
            pos = len(blocks)
            if item == "M":
                pool_i += 1
                blocks.append(nn.MaxPool2d(2, 2, ceil_mode=True))
                stages.append(Stage(f"stage{pool_i}", f"features.{pos}", channels, 2 ** pool_i))
                layers.append(HiddenLayer(f"pool{pool_i}", f"features.{pos}"))
                continue
            conv_i += 1
            out = scale_channels(int(item), width)
            source: Optional[int] = TIED_TO.get(conv_i) if tied else None
            if source is None:
                conv = nn.Conv2d(channels, out, kernel_size=3, padding=1)
                bn = nn.BatchNorm2d(out)
            else:
                conv, bn = convs[source]
            convs[conv_i] = (conv, bn)
            blocks.append(ConvBlock(conv, bn, order))
            layers.append(HiddenLayer(f"conv{conv_i}", f"features.{pos}", f"features.{pos}.pre"))
            channels = out
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten(1)
        self.head = nn.Linear(channels, num_classes)
        self.order, self.tied = order, tied
        self._initialize_weights()
        self.declare_stages(*stages, Stage("features", "flatten", channels, 0))
        self.declare_layers(*layers)

    def _initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.features(x))


@MODELS.register("vgg19_bn")
def vgg19_bn(num_classes: int, in_channels: int, image_size: int, width: float, *,
             order: str = "conv_relu_bn", tied: bool = False) -> VGG19BN:
    """VGG19-BN for 28x28 / 32x32 inputs.  ``order``: ``"conv_relu_bn"`` (the Batchout
    extension's, default) or ``"conv_bn_relu"``; ``tied``: the extension's weight tying (see the
    module docstring)."""
    check_image_size("vgg19_bn", image_size)
    try:
        order_ = Order(order)
    except ValueError:
        raise ValueError(f"order must be one of {[o.value for o in Order]}; got {order!r}") from None
    if not isinstance(tied, bool):
        raise ValueError(f"tied must be a bool; got {tied!r}")
    return VGG19BN(num_classes, in_channels, width, order_, tied)
