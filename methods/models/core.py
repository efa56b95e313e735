"""The model seam: in-model normalization, the features/head split, named stages, the one factory.

Every network in advrepro takes images in [0, 1] and normalizes them itself, so attacks, epsilons
and projections always live in pixel space and no loader ever normalizes (STYLE.md: no
normalization outside the model).  A registered architecture is a builder

    builder(num_classes, in_channels, image_size, width, **arch_args) -> net

whose ``net`` is a :class:`Backbone`: it implements ``forward_features(x) -> (B, D)`` (penultimate
features), has a ``head`` linear layer, inherits ``net(x) == net.head(net.forward_features(x))``,
and declares its ordered hidden :class:`Stage` s (like timm's ``feature_info``).
:func:`build_model` validates the arguments, calls the builder and wraps the net in
:class:`NormalizedModel`, whose stages are ``"input"`` (the output of ``normalize``), the net's own
stages (``"stage1"``, ``"stage2"``, ... after each residual stage / conv block) and ``"features"``
(the penultimate features entering the head).

A stage is the *output of one submodule*, called exactly once per forward and used downstream,
so a forward hook on ``model.stage_module(name)`` sees that tensor and a hook that returns a
replacement changes everything after it (manifold mixup, BatchOut); the pass counter counts
forwards and backwards at the ``"features"`` stage.  Where a net would pool or activate
functionally, it calls a parameter-free module instead (:class:`GlobalAvgPool`, ``nn.ReLU``,
``nn.Flatten``): same numbers, same ``state_dict`` keys and parameter counts.

A net may also declare its ordered *hidden layers* (:class:`HiddenLayer`): for each
conv/linear layer (or pooling step) the module whose output is the layer's output and, where the
layer has an activation, the module whose output is the pre-activation tensor entering it.
Feature-level augmentations that act inside a layer (BatchOut, before the ReLU or at the
layer output) hook these; :attr:`Backbone.hidden_layers` derives them for a net built from
``nn.Sequential`` blocks that declares none (see there).

``width`` multiplies every channel count (``max(1, round(c * width))``) so CPU tests and smoke runs
can use slim nets; ``width=1.0`` is the official architecture, parameter for parameter.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import MODELS

#: Input sizes the CIFAR-style nets accept.  Their official code pools the last feature map with a
#: fixed kernel equal to its size at 32x32 input; global average pooling is identical there and is
#: the natural extension to 28x28 (MNIST-sized) input.  Other sizes would change the architecture
#: (e.g. BB's ``fc_input_dim_scale`` for 64x64), so they are refused rather than guessed.
CIFAR_IMAGE_SIZES: Tuple[int, ...] = (28, 32)

#: The first stage of every :class:`NormalizedModel`: the normalized input.
INPUT_STAGE = "input"
#: The last stage of every :class:`Backbone`: the penultimate features entering the head.
FEATURES_STAGE = "features"


def scale_channels(channels: int, width: float) -> int:
    """``channels`` times the width multiplier, rounded, at least 1."""
    return max(1, int(round(channels * width)))


def check_image_size(arch: str, image_size: int, allowed: Sequence[int] = CIFAR_IMAGE_SIZES) -> None:
    if image_size not in allowed:
        raise ValueError(f"model {arch!r} supports image sizes {tuple(allowed)} (square); "
                         f"got image_size={image_size}")


@dataclass(frozen=True)
class Stage:
    """One named hidden tensor of a model: the forward output of the submodule at ``module``.

    ``module`` is a dotted submodule path relative to the model that lists the stage (for a
    :class:`NormalizedModel`, e.g. ``"net.layer1"``; the wrapper prefixes the net's own paths).
    ``channels`` is the tensor's channel count (the width for a flat stage).  ``reduction`` is the
    spatial downsampling factor relative to the input, or ``0`` for a flat ``(B, channels)`` stage
    (``"features"`` always is).  ``border`` is the number of pixels per side length lost to valid
    (unpadded) convolutions before any downsampling (SmallCNN; 0 for padded nets).  The declared
    shape for a ``(C, H, W)`` image is :meth:`output_shape`: ``(channels, ceil((H - border) / r),
    ceil((W - border) / r))`` (padded stride-2 convs and stride-2 subsampling round up, e.g.
    28 -> 14 -> 7 -> 4), or ``(channels,)`` when ``reduction == 0``.
    """

    name: str
    module: str
    channels: int
    reduction: int
    border: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.name, str) and self.name):
            raise ValueError(f"stage name must be a non-empty str; got {self.name!r}")
        if not (isinstance(self.module, str) and self.module):
            raise ValueError(f"stage {self.name!r}: module must be a dotted path; got {self.module!r}")
        for field, least in (("channels", 1), ("reduction", 0), ("border", 0)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"stage {self.name!r}: {field} must be an int >= {least}; "
                                 f"got {value!r}")

    def output_shape(self, image_shape: Sequence[int]) -> Tuple[int, ...]:
        """The stage tensor's shape without the batch dimension, for ``(C, H, W)`` input."""
        if self.reduction == 0:
            return (self.channels,)
        _, height, width = (int(s) for s in image_shape)
        return (self.channels,
                math.ceil((height - self.border) / self.reduction),
                math.ceil((width - self.border) / self.reduction))


@dataclass(frozen=True)
class HiddenLayer:
    """One hidden layer of a net, in forward order, with the modules a hook reads or replaces.

    ``output`` is the dotted path of the module whose forward output is the layer's output (what
    the next layer reads: after the activation, and after BatchNorm where BN follows it).
    ``pre_activation`` is the path of the module whose output is the tensor entering the
    layer's activation (a conv/linear or BN output, or a parameter-free ``nn.Identity`` tap placed
    there), or ``None`` for a layer without one (pooling).  Each module must be called exactly
    once per forward (a tap, not a weight-tied module called at several depths).
    """

    name: str
    output: str
    pre_activation: Optional[str] = None

    def __post_init__(self) -> None:
        if not (isinstance(self.name, str) and self.name):
            raise ValueError(f"hidden layer name must be a non-empty str; got {self.name!r}")
        for field in ("output", "pre_activation"):
            value = getattr(self, field)
            if field == "pre_activation" and value is None:
                continue
            if not (isinstance(value, str) and value):
                raise ValueError(f"hidden layer {self.name!r}: {field} must be a dotted module "
                                 f"path; got {value!r}")

    def prefixed(self, prefix: str) -> "HiddenLayer":
        """The same layer seen from a parent module that holds the net at ``prefix``."""
        pre = None if self.pre_activation is None else prefix + self.pre_activation
        return replace(self, output=prefix + self.output, pre_activation=pre)


def sequential_hidden_layers(net: nn.Module) -> List[HiddenLayer]:
    """Hidden layers read off a net's structure: every ``nn.ReLU`` that is a child of an
    ``nn.Sequential`` is a layer (named by its module path) whose output is the ReLU and whose
    pre-activation is the Sequential's child right before it.  Nets that activate functionally
    (``F.relu``) or outside Sequentials yield none and must declare theirs."""
    layers = []
    for path, module in net.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for i, (child_name, child) in enumerate(children):
            if isinstance(child, nn.ReLU) and i > 0:
                prefix = f"{path}." if path else ""
                layers.append(HiddenLayer(f"{prefix}{child_name}", f"{prefix}{child_name}",
                                          f"{prefix}{children[i - 1][0]}"))
    return layers


class GlobalAvgPool(nn.Module):
    """(B, C, H, W) -> (B, C): the mean over all positions (a module, so it can be a stage)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class Backbone(nn.Module):
    """Base of every registered net: ``forward(x) = head(forward_features(x))`` and named stages.

    A subclass implements ``forward_features(x) -> (B, D)``, has ``self.head`` (an ``nn.Linear``
    with ``in_features == D``) and, at the end of ``__init__``, calls :meth:`declare_stages` with
    its ordered stages: one after each residual stage / conv block, then ``"features"``, the
    ``(B, D)`` tensor ``forward_features`` returns (``reduction=0``).  Each stage's module must be
    called exactly once per forward, and its output must be the tensor used downstream.
    """

    head: nn.Linear

    def declare_stages(self, *stages: Stage) -> None:
        """Record the ordered stages (checked: unique names, resolvable modules, ``"input"``
        only first, ``"features"`` last and flat)."""
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"{type(self).__name__}: duplicate stage names in {names}")
        if not stages or names[-1] != FEATURES_STAGE or stages[-1].reduction != 0:
            raise ValueError(f"{type(self).__name__}: the last stage must be a flat "
                             f"{FEATURES_STAGE!r} stage (reduction=0); got {names}")
        if INPUT_STAGE in names[1:]:
            raise ValueError(f"{type(self).__name__}: {INPUT_STAGE!r} may only be the first stage")
        for s in stages:
            self.get_submodule(s.module)  # AttributeError naming the path on a typo
        self._stages = tuple(stages)

    @property
    def feature_info(self) -> List[Stage]:
        """The declared stages, in forward order."""
        stages = getattr(self, "_stages", None)
        if stages is None:
            raise TypeError(f"{type(self).__name__} declares no stages; call "
                            f"self.declare_stages(...) at the end of __init__")
        return list(stages)

    def stage_names(self) -> List[str]:
        return [s.name for s in self.feature_info]

    def stage(self, name: str) -> Stage:
        """The :class:`Stage` called ``name``; a ``KeyError`` listing the names on a miss."""
        for s in self.feature_info:
            if s.name == name:
                return s
        raise KeyError(f"{type(self).__name__} has no stage {name!r}; stages: {self.stage_names()}")

    def stage_module(self, name: str) -> nn.Module:
        """The submodule whose forward output is stage ``name`` (hook it to read or replace it)."""
        return self.get_submodule(self.stage(name).module)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward_features")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def forward_with_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(logits, features)`` from one forward; equal to ``(self(x), self.forward_features(x))``.
        (Module hooks on the model itself do not fire: it calls the parts, not ``self``.)"""
        features = self.forward_features(x)
        return self.head(features), features

    def declare_layers(self, *layers: HiddenLayer) -> None:
        """Record the ordered hidden layers (checked: unique names, resolvable modules)."""
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names):
            raise ValueError(f"{type(self).__name__}: duplicate hidden layer names in {names}")
        for layer in layers:
            for path in (layer.output, layer.pre_activation):
                if path is not None:
                    self.get_submodule(path)  # AttributeError naming the path on a typo
        self._hidden_layers = tuple(layers)

    @property
    def hidden_layers(self) -> List[HiddenLayer]:
        """The declared hidden layers in forward order; for a net that declares none, those
        :func:`sequential_hidden_layers` reads off its ``nn.Sequential`` blocks (possibly none)."""
        declared = getattr(self, "_hidden_layers", None)
        return list(declared) if declared is not None else sequential_hidden_layers(self)

    def hidden_layer(self, name: str) -> HiddenLayer:
        """The :class:`HiddenLayer` called ``name``; a ``KeyError`` listing the names on a miss."""
        layers = self.hidden_layers
        for layer in layers:
            if layer.name == name:
                return layer
        raise KeyError(f"{type(self).__name__} has no hidden layer {name!r}; hidden layers: "
                       f"{[layer.name for layer in layers]}")


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


class NormalizedModel(Backbone):
    """A registered :class:`Backbone` with its input normalization inside.

    ``forward(x)`` takes a float batch ``(B, C, H, W)`` in [0, 1] and returns logits
    ``(B, num_classes)``.  ``forward_features(x)`` returns the penultimate features ``(B, D)``
    (after normalization and the net's final pooling), and ``forward(x) == head(forward_features(x))``;
    ``forward_with_features(x)`` returns both from one forward.  ``feature_info`` is
    ``[Stage("input", "normalize", C, 1)]`` followed by the net's stages with ``"net."``-prefixed
    module paths, so ``stage_module(name)`` is a submodule of this model.
    ``spec`` records how the model was built (name, shapes, width, resolved arch args).
    """

    def __init__(self, net: Backbone, mean: Sequence[float], std: Sequence[float],
                 spec: Dict[str, Any] | None = None) -> None:
        super().__init__()
        if not isinstance(net, Backbone):
            raise TypeError(f"NormalizedModel wraps a Backbone; got {type(net).__name__}")
        self.normalize = Normalize(mean, std)
        self.net = net
        self.spec: Dict[str, Any] = dict(spec or {})
        self.declare_stages(Stage(INPUT_STAGE, "normalize", int(self.normalize.mean.shape[1]), 1),
                            *(replace(s, module=f"net.{s.module}") for s in net.feature_info))

    @property
    def head(self) -> nn.Linear:
        return self.net.head

    @property
    def hidden_layers(self) -> List[HiddenLayer]:
        """The net's hidden layers, with ``"net."``-prefixed module paths."""
        return [layer.prefixed("net.") for layer in self.net.hidden_layers]

    def __setattr__(self, name: str, value: Any) -> None:
        # ``model.head = new_linear`` replaces the net's head (nn.Module.__setattr__ would
        # otherwise register a second, shadowed module and silently keep the old head).
        if name == "head":
            setattr(self.net, name, value)
        else:
            super().__setattr__(name, value)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(self.normalize(x))


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
