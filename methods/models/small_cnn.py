"""The MNIST net of Selective Adversarial Training (arXiv 2512.22069), ``MNISTNet`` in every MNIST
script of youranye/Selective-Adversarial-Training (e.g. ``Margin_based_mnist/PGD_full_datasets.py``):

    conv3x3(1 -> 32) - ReLU - conv3x3(32 -> 64) - ReLU - maxpool 2 - flatten
    - fc(9216 -> 128) - ReLU - fc(128 -> 10)

Valid (unpadded) convolutions, PyTorch default init, and **no dropout** (unlike the PyTorch MNIST
example it resembles, the Selective-AT code has no dropout layers) and no BatchNorm.  The fc input
size is derived from the image size (``64 * ((s - 4) // 2) ** 2``, 9216 at 28x28); ``width``
scales the 32/64 conv channels and the 128 hidden units.  1,199,882 parameters at 28x28, 10 classes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import MODELS
from .core import Backbone, HiddenLayer, Stage, scale_channels

MIN_IMAGE_SIZE = 6  # two valid 3x3 convs and a 2x2 max-pool leave at least one pixel


class SmallCNN(Backbone):
    """Stages: ``stage1`` (``relu1``, after conv1; valid conv: border 2), ``stage2`` (``relu2``,
    after conv2; border 4), then ``features`` (``relu3``, after fc1).  The ReLUs are separate
    parameter-free modules so each stage is one module's output.  Hidden layers (BatchOut's
    insertion points): ``conv1``, ``conv2``, ``fc1``, each with its pre-activation (the conv /
    linear output) and its output (the ReLU after it)."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: float) -> None:
        super().__init__()
        c1, c2, hidden = (scale_channels(c, width) for c in (32, 64, 128))
        side = (image_size - 4) // 2
        self.conv1 = nn.Conv2d(in_channels, c1, 3, 1)
        self.conv2 = nn.Conv2d(c1, c2, 3, 1)
        self.fc1 = nn.Linear(c2 * side * side, hidden)
        self.head = nn.Linear(hidden, num_classes)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.declare_stages(Stage("stage1", "relu1", c1, 1, border=2),
                            Stage("stage2", "relu2", c2, 1, border=4),
                            Stage("features", "relu3", hidden, 0))
        self.declare_layers(HiddenLayer("conv1", "relu1", "conv1"),
                            HiddenLayer("conv2", "relu2", "conv2"),
                            HiddenLayer("fc1", "relu3", "fc1"))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        x = torch.flatten(F.max_pool2d(x, 2), 1)
        return self.relu3(self.fc1(x))


@MODELS.register("smallcnn")
def smallcnn(num_classes: int, in_channels: int, image_size: int, width: float) -> SmallCNN:
    """Selective-AT's MNISTNet (no arch args)."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"model 'smallcnn' needs image_size >= {MIN_IMAGE_SIZE}; got {image_size}")
    return SmallCNN(num_classes, in_channels, image_size, width)
