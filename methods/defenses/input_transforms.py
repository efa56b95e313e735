"""The input-transform defences Mixup Inference compares with, as its official code runs them
(``P2333/Mixup-Inference@6d164cba``, ``attack_resnet_baselines.py``; the README's commands give
``num_sample`` 50 for every baseline), plus the identity.

Each draw transforms every image independently (its own random parameters, drawn from the
evaluation's generator) and the defended predictor averages the softmax over ``samples`` draws
(:class:`methods.defenses.base.Defense`).  Transforms use ``torchvision.transforms.v2.functional``
on tensors, so they are differentiable and adaptive (EOT) attacks differentiate through them.

* **Gaussian noise** (``gaussian``, ``baseline == 'gaussian'``): ``x + N(0, sigma^2)`` per pixel,
  no clipping, as the code.  The code adds ``sigma = 0.05`` to inputs scaled to [-1, 1], which
  is a standard deviation of 0.025 on [0, 1] pixels: ``sigma_scale: minus1_1`` (default) reads
  ``sigma`` in those units; ``sigma_scale: unit`` reads it on [0, 1].
* **Random rotation** (``rotation``, ``baseline == 'Rotation'``, README ``-Rotation=20``):
  ``RandomRotation(20)``: an angle uniform in [-20, 20] degrees, nearest-neighbour, zero fill.
* **Xie et al. 2018** (``xie``, ``baseline == 'Xie'``, README ``-Xielower=24 -Xieupper=32``):
  a size s uniform in {24..32}, then -- as the code does -- a random s x s *crop* (``RandomCrop
  (size)``) placed at a random offset in a zero canvas (``Pad((a, b, 32-s-a, 32-s-b))``,
  a, b uniform in {0..32-s}): ``shrink: crop``, label ``Xie-CropPad``.  Xie et al.'s own method
  *resizes* the whole image to s x s (bilinear) before padding: ``shrink: resize``, label
  ``Xie-ResizePad``.
* **Guo et al. 2018** (``guo``, ``baseline == 'Guo'``, README ``-Guolower=24 -Guoupper=32``):
  a random s x s crop, s uniform in {24..32}, resized back to 32 x 32 (bilinear).

Sizes are for 32 x 32 images; for other sizes (28 x 28 MNIST) the defaults scale
proportionally: ``min_size = round(0.75 * H)`` (21 at 28) and ``max_size = H``; both can be set.

**uint8 round trip** (``uint8: true``, default): the code turns each [0, 1] image into a PIL
image (``ToPILImage``: ``mul(255).byte()``, i.e. truncation to 8 bits), transforms it in PIL and
converts back (``ToTensor``), so inputs are floored to the 8-bit grid and interpolated outputs
rounded to it.  Both are applied here with a straight-through gradient (BPDA with the identity,
Athalye et al. 2018) so adaptive attacks see through them; ``uint8: false`` keeps floats.
The Gaussian baseline stays in tensors in the code and has no round trip.
"""
from __future__ import annotations

from typing import Any, Mapping, Tuple

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2.functional import InterpolationMode

from ..registry import DEFENSES
from .base import Defense, DefenseContext

#: The official sizes are for 32 x 32 inputs: s in {24..32}.
OFFICIAL_SIZE, OFFICIAL_MIN_SIZE = 32, 24


def straight_through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the identity's gradient in the backward pass."""
    return x + (value - x).detach()


def to_uint8_grid(x: torch.Tensor) -> torch.Tensor:
    """``ToPILImage``: ``floor(255 x) / 255`` (``mul(255).byte()`` truncates), straight-through."""
    return straight_through(x, torch.floor(x * 255) / 255)


def round_to_uint8_grid(x: torch.Tensor) -> torch.Tensor:
    """A PIL image's interpolated pixels are rounded to 8 bits: ``round(255 x) / 255``."""
    return straight_through(x, torch.round(x * 255) / 255)


class InputTransform(Defense):
    """A defence that transforms the input at random, ``samples`` draws averaged."""

    def transform(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One independent draw per image of ``x`` (same shape), differentiable."""
        raise NotImplementedError

    def draws(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator, k: int,
              prepared: Any = None) -> torch.Tensor:
        """Row ``j * B + i`` of the transformed batch is draw ``j`` of image ``i``."""
        return model(self.transform(x.repeat(k, 1, 1, 1), generator)).view(k, len(x), -1)


class PerImageTransform(InputTransform):
    """Transforms applied image by image through torchvision (``uint8`` round trip optional)."""

    def transform(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        uint8 = bool(self.spec.get("uint8", False))
        if uint8:
            x = to_uint8_grid(x)
        params = self.parameters_for(x, generator)
        out = torch.cat([self.apply(x[i:i + 1], *(p[i] for p in params)) for i in range(len(x))])
        return round_to_uint8_grid(out) if uint8 else out

    def parameters_for(self, x: torch.Tensor, generator: torch.Generator) -> Tuple[torch.Tensor, ...]:
        """Every random parameter of the batch, drawn at once (CPU tensors, one row per image)."""
        raise NotImplementedError

    def apply(self, image: torch.Tensor, *params) -> torch.Tensor:
        raise NotImplementedError


def _uniform_int(low: torch.Tensor, high: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Integers uniform in ``low..high`` (inclusive, per entry) from one float64 uniform each."""
    u = torch.rand(low.shape, generator=generator, dtype=torch.float64)
    span = (high - low + 1).double()
    return low + torch.minimum((u * span).long(), (high - low))


class SizedTransform(PerImageTransform):
    """Crop/resize baselines: a size s uniform in ``min_size..max_size``."""

    def setup(self, ctx: DefenseContext) -> None:
        super().setup(ctx)
        _, height, width = ctx.image_shape
        if height != width:
            raise ValueError(f"defense {self.label!r}: square images only, got {height}x{width}")
        self.image_size = int(height)
        lo = self.spec["min_size"]
        hi = self.spec["max_size"]
        self.min_size = int(round(OFFICIAL_MIN_SIZE * height / OFFICIAL_SIZE)) if lo is None else int(lo)
        self.max_size = int(height) if hi is None else int(hi)
        if not 1 <= self.min_size <= self.max_size <= height:
            raise ValueError(f"defense {self.label!r}: sizes {self.min_size}..{self.max_size} must lie "
                             f"in 1..{height} (min_size / max_size)")

    def sizes(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return _uniform_int(torch.full((n,), self.min_size), torch.full((n,), self.max_size), generator)

    def offsets(self, sizes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Offsets uniform in ``0..H - s`` (``RandomCrop``'s and the pad's)."""
        return _uniform_int(torch.zeros_like(sizes), self.image_size - sizes, generator)

    def describe(self):
        return {**super().describe(), "min_size": self.min_size, "max_size": self.max_size}


@DEFENSES.register("gaussian")
class GaussianNoise(InputTransform):
    """``x + sigma_px * N(0, 1)`` per pixel (no clipping); ``sigma_px = sigma / 2`` under the
    official [-1, 1] scale (``sigma_scale: minus1_1``), ``sigma`` under ``unit``."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        scale = 0.5 if self.spec["sigma_scale"] == "minus1_1" else 1.0
        self.pixel_sigma = float(self.spec["sigma"]) * scale

    def transform(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        return x + self.pixel_sigma * noise.to(x.device)

    def describe(self):
        return {**super().describe(), "pixel_sigma": self.pixel_sigma}


@DEFENSES.register("rotation")
class RandomRotation(PerImageTransform):
    """``RandomRotation(degrees)``: angle uniform in [-degrees, degrees], nearest, zero fill."""

    def parameters_for(self, x, generator):
        u = torch.rand(len(x), generator=generator, dtype=torch.float64)
        return ((2 * u - 1) * float(self.spec["degrees"]),)

    def apply(self, image, angle):
        return TF.rotate(image, float(angle), interpolation=InterpolationMode.NEAREST, fill=0.0)


@DEFENSES.register("xie")
class XieResizePad(SizedTransform):
    """Xie et al.: shrink to s x s (crop as coded, or resize), then zero-pad at a random offset."""

    def parameters_for(self, x, generator):
        sizes = self.sizes(len(x), generator)
        crop_top, crop_left = self.offsets(sizes, generator), self.offsets(sizes, generator)
        pad_top, pad_left = self.offsets(sizes, generator), self.offsets(sizes, generator)
        return sizes, crop_top, crop_left, pad_top, pad_left

    def apply(self, image, size, crop_top, crop_left, pad_top, pad_left):
        s, full = int(size), self.image_size
        if self.spec["shrink"] == "crop":
            small = TF.crop(image, int(crop_top), int(crop_left), s, s)
        else:
            small = TF.resize(image, [s, s], interpolation=InterpolationMode.BILINEAR, antialias=True)
        left, top = int(pad_left), int(pad_top)
        return TF.pad(small, [left, top, full - s - left, full - s - top], fill=0.0)


@DEFENSES.register("guo")
class GuoCropRescale(SizedTransform):
    """Guo et al.: a random s x s crop resized back to full size (bilinear)."""

    def parameters_for(self, x, generator):
        sizes = self.sizes(len(x), generator)
        return sizes, self.offsets(sizes, generator), self.offsets(sizes, generator)

    def apply(self, image, size, top, left):
        s, full = int(size), self.image_size
        crop = TF.crop(image, int(top), int(left), s, s)
        return TF.resize(crop, [full, full], interpolation=InterpolationMode.BILINEAR, antialias=True)


@DEFENSES.register("identity")
class Identity(Defense):
    """No defence: the base model itself (deterministic; for checks and as a reference row)."""

    def draws(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator, k: int,
              prepared: Any = None) -> torch.Tensor:
        return model(x).unsqueeze(0).expand(k, -1, -1)
