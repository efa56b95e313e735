"""Small models and data shared by the tests (no files, no network)."""
from __future__ import annotations

import torch
from torch import nn

from methods.models.core import Backbone, Stage


class TinyNet(Backbone):
    """A small conv net with the project's model interface (a :class:`Backbone`: forward_features,
    head, stages ``stage1`` (after the conv block) and ``features``; no ``input`` stage, since the
    bare net has no normalization module)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, size: int = 8,
                 batchnorm: bool = False) -> None:
        super().__init__()
        layers = [nn.Conv2d(in_channels, 4, 3, padding=1)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(4))
        layers += [nn.ReLU(), nn.Flatten(), nn.Linear(4 * size * size, 16), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(16, num_classes)
        conv_relu = 1 + int(batchnorm)  # index of the ReLU after the conv (and BN)
        self.declare_stages(Stage("stage1", f"body.{conv_relu}", 4, 1),
                            Stage("features", f"body.{len(layers) - 1}", 16, 0))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TinyMLP(Backbone):
    """A 16-input MLP with the model interface (a :class:`Backbone` whose only stage is
    ``features``, the body's last module); optional BatchNorm and Dropout (1x4x4 inputs)."""

    def __init__(self, bn: bool = False, dropout: float = 0.0, classes: int = 3) -> None:
        super().__init__()
        layers = [nn.Flatten(), nn.Linear(16, 12)]
        if bn:
            layers.append(nn.BatchNorm1d(12))
        layers.append(nn.ReLU())
        if dropout:
            layers.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(12, classes)
        self.declare_stages(Stage("features", f"body.{len(layers) - 1}", 12, 0))

    def forward_features(self, x):
        return self.body(x)


def toy_batch(n: int = 16, channels: int = 1, size: int = 8, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def make_ctx(model, epoch: int = 0, step: int = 0, steps_per_epoch: int = 10, epochs: int = 2,
             seed: int = 0):
    from methods.algorithms.base import StepContext
    from methods.measure.passes import PassCounter

    return StepContext(epoch=epoch, step_in_epoch=step, steps_per_epoch=steps_per_epoch,
                       epochs=epochs, device=torch.device("cpu"), counter=PassCounter(model),
                       generator=torch.Generator().manual_seed(seed))
