"""The model seam: in-model normalization, the features/head split, and the one factory.

Every network in advrepro takes images in [0, 1] and normalizes them itself, so attacks, epsilons
and projections always live in pixel space and no loader ever normalizes (STYLE.md: no
normalization outside the model).  A registered architecture is a builder

    builder(num_classes, in_channels, image_size, width, **arch_args) -> net

whose ``net`` has ``forward_features(x) -> (B, D)`` (penultimate features) and a ``head`` linear
layer with ``net(x) == net.head(net.forward_features(x))``.  :func:`build_model` validates the
arguments, calls the builder and wraps the net in :class:`NormalizedModel`.

``width`` multiplies every channel count (``max(1, round(c * width))``) so CPU tests and smoke runs
can use slim nets; ``width=1.0`` is the official architecture, parameter for parameter.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import MODELS

#: Input sizes the CIFAR-style nets accept.  Their official code pools the last feature map with a
#: fixed kernel equal to its size at 32x32 input; global average pooling is identical there and is
#: the natural extension to 28x28 (MNIST-sized) input.  Other sizes would change the architecture
#: (e.g. BB's ``fc_input_dim_scale`` for 64x64), so they are refused rather than guessed.
CIFAR_IMAGE_SIZES: Tuple[int, ...] = (28, 32)


def scale_channels(channels: int, width: float) -> int:
    """``channels`` times the width multiplier, rounded, at least 1."""
    return max(1, int(round(channels * width)))


def check_image_size(arch: str, image_size: int, allowed: Sequence[int] = CIFAR_IMAGE_SIZES) -> None:
    if image_size not in allowed:
        raise ValueError(f"model {arch!r} supports image sizes {tuple(allowed)} (square); "
                         f"got image_size={image_size}")


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C): the mean over all positions."""
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


class NormedLinear(nn.Linear):
    """Cosine classifier of LDAM-DRW (Cao et al. 2019, kaidic/LDAM-DRW ``NormedLinear``).

    ``logits = normalize(x) @ normalize(W).T`` with no bias, so every logit is in [-1, 1] (the
    LDAM loss scales them by s = 30).  Stored as an ``nn.Linear`` (weight ``(out, in)``, the
    transpose of the official ``(in, out)``) so it satisfies the ``head: nn.Linear`` contract;
    the initialisation is the official one: uniform(-1, 1), each class vector renormed to <= 1.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        with torch.no_grad():
            self.weight.uniform_(-1, 1).renorm_(2, 0, 1e-5).mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; ``mean`` and ``std`` are buffers (saved with the model)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(tuple(float(m) for m in mean), dtype=torch.float32)
        std_t = torch.as_tensor(tuple(float(s) for s in std), dtype=torch.float32)
        if mean_t.ndim != 1 or mean_t.numel() == 0:
            raise ValueError(f"mean must be a non-empty sequence of per-channel floats; got {mean!r}")
        if std_t.shape != mean_t.shape:
            raise ValueError(f"std must have one entry per channel like mean ({mean_t.numel()}); "
                             f"got {std!r}")
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive; got {std!r}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class NormalizedModel(nn.Module):
    """A registered net with its input normalization inside.

    ``forward(x)`` takes a float batch ``(B, C, H, W)`` in [0, 1] and returns logits
    ``(B, num_classes)``.  ``forward_features(x)`` returns the penultimate features ``(B, D)``
    (after normalization and the net's final pooling), and ``forward(x) == head(forward_features(x))``.
    ``spec`` records how the model was built (name, shapes, width, resolved arch args).
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float],
                 spec: Dict[str, Any] | None = None) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.spec: Dict[str, Any] = dict(spec or {})

    @property
    def head(self) -> nn.Linear:
        return self.net.head

    def __setattr__(self, name: str, value: Any) -> None:
        # ``model.head = new_linear`` replaces the net's head (nn.Module.__setattr__ would
        # otherwise register a second, shadowed module and silently keep the old head).
        if name == "head":
            setattr(self.net, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def feature_dim(self) -> int:
        return self.net.head.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _keyword_params(builder) -> Dict[str, Any]:
    """The builder's keyword-only parameters (its arch args) and their defaults."""
    return {p.name: p.default for p in inspect.signature(builder).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def arch_defaults(name: str) -> Dict[str, Any]:
    """The arch args a registered model accepts, with their defaults."""
    return _keyword_params(MODELS.get(name))


def build_model(name: str, *, num_classes: int, image_shape: Tuple[int, int, int],
                mean: Sequence[float], std: Sequence[float], width: float = 1.0,
                **arch_args: Any) -> NormalizedModel:
    """Build the registered model ``name`` for ``image_shape = (C, H, W)`` inputs in [0, 1].

    ``mean``/``std`` have one entry per input channel and are applied inside the model.
    ``arch_args`` are the builder's keyword options (see :func:`arch_defaults`); an unknown one is
    a ``TypeError`` naming it.  Parameters are created on the CPU with the default dtype.
    """
    builder = MODELS.get(name)
    accepted = _keyword_params(builder)
    unknown = sorted(set(arch_args) - set(accepted))
    if unknown:
        raise TypeError(f"model {name!r} got unknown arch_args {unknown}; "
                        f"accepted: {sorted(accepted) or 'none'}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
    try:
        in_channels, height, img_width = (int(s) for s in image_shape)
    except (TypeError, ValueError):
        raise ValueError(f"image_shape must be (C, H, W); got {image_shape!r}") from None
    if min(in_channels, height, img_width) < 1 or height != img_width:
        raise ValueError(f"image_shape must be (C, H, W) with H == W, all positive; got {image_shape!r}")
    if len(tuple(mean)) != in_channels or len(tuple(std)) != in_channels:
        raise ValueError(f"mean and std need one entry per input channel ({in_channels}); "
                         f"got mean={tuple(mean)!r}, std={tuple(std)!r}")
    if not float(width) > 0:
        raise ValueError(f"width must be > 0; got {width!r}")
    net = builder(num_classes, in_channels, height, float(width), **arch_args)
    spec = {"name": name, "num_classes": num_classes, "image_shape": (in_channels, height, img_width),
            "mean": tuple(float(m) for m in mean), "std": tuple(float(s) for s in std),
            "width": float(width), "arch_args": {**accepted, **arch_args}}
    return NormalizedModel(net, mean, std, spec)
