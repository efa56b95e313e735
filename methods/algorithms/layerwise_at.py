"""Layer-wise Adversarial Training, Chen & Zhang, "Layer-wise Adversarial Training Approach to
Improve Adversarial Robustness", IJCNN 2020.

**A RECONSTRUCTION: no official code exists.**  Only the abstract, the images of the paper's
equations (7)-(9) and a third party's description of the training loop could be read (spec
section 3.1; no arXiv version, no repository), and no published number could be found (spec
section 5).  What follows is spec section 3.2's reconstruction; every point the paper leaves
open is a named option below, and the ``paper`` string recorded in every result says
"RECONSTRUCTION".

The perturbation.  Every ``nn.Conv2d`` / ``nn.Linear`` (found by module type, so the 1x1
shortcut convs of residual nets count; in forward order, as the hooks fire) gets an additive
perturbation on its output ``y_l = W_l h_{l-1} + b_l``, i.e. *before* any BatchNorm or ReLU that
follows it (the paper does not say; eq. (7)-(9) perturb the conv/linear output)::

    R_l = eps_l * rowL1(W_l) (.) sign(G_l),     G_l = dL/dy_l,
    rowL1(W_l)_k = sum_i |W_l[k, i]|            (conv: sum over in_channels x kh x kw),

broadcast over the batch and the spatial positions: unit k of ``y_l`` moves by the largest amount
an Linf perturbation of size eps_l on the layer's input ``h_{l-1}`` could move it, in the
direction that increases the loss (eq. (7)/(8): ``w . (eps sign(dL/dx)) = eps |w| sign(dL/dy)``).
``include_head`` (default true: "all layers") says whether the classifier is perturbed too
(then each logit moves by ``eps_l ||w_k||_1`` against the label).

The first layer and FGSM, in [0, 1] pixel space.  The model normalises inside (``z = (x - mu) /
s`` per channel), so the first layer sees ``z``, and an input step ``delta`` with
``||delta||_inf <= eps`` moves ``y_1 = W_1 * z + b_1`` by ``W_1 * (delta / s)`` (the bias
cancels).  Two readings of "the layer perturbation is equivalent to the adversarial manipulation
of network inputs", and a third option (``first_layer``; a layer reads the image when its input
is, or is a view of, the output of the model's ``input`` stage):

* ``input_fgsm`` (default without ``combine_pgd``): ``R_1 = W_1 * (delta_fgsm / s) =
  y_1(x_fgsm) - y_1(x)`` with ``x_fgsm = clamp(x + eps sign(dL/dx), 0, 1)``, the FGSM image of
  ``methods.attacks.fgsm`` (``sign(dL/dx)`` comes free from the gradient pass, which
  back-propagates to the input).  This is the left side of eq. (7), ``w_1 . r`` with ``r = eps
  sign(dL/dx)``: the first layer's output is exactly its output at the FGSM image, for any
  number of units, so with ``deep_eps_scale: 0`` the method *is* FGSM training (no random
  start).  Computed as ``layer.forward(input + delta / s) - output``.
* ``budget``: the first layer gets the budget rule like every other layer, with the pixel budget
  mapped through the normalisation: ``R_1[k] = eps sum_{c,i,j} |W_1[k,c,i,j]| / s_c sign(G_k)``.
  This is the right side of eq. (7)/(8).  For each unit k it equals
  ``y_1[k](x + eps sign(d(G_k y_1[k]) / dx)) - y_1[k](x)``: the FGSM step on that unit alone
  (input gradient ``G_k W_1[k] / s``, ``s > 0``), unclamped.  The two readings agree when layer 1
  has a single output unit (then ``sign(dL/dx) = sign(G) sign(W_1 / s)``; the step in eq. (7));
  with many units every unit gets its own worst case at once, which no single input perturbation
  achieves, so it bounds FGSM's effect from above (``|y_1(x_fgsm) - y_1(x)| <= eps rowL1(W_1 /
  s)``).  At the zero-padded border of a padded conv the true per-unit worst case sums only the
  taps inside the image, so there the broadcast rowL1 (spec 3.2) is larger still; valid convs
  (SmallCNN) and interior positions are exact.  Measured on MNIST-5k (SmallCNN width 0.5, eps
  0.1): after 150 clean Adam steps the loss under this first-layer perturbation alone is 3.57
  against 0.40 under input FGSM, and training with it stays at chance (10% validation accuracy,
  loss 2.30) even with no deeper perturbation (3 epochs) and with ``deep_eps_scale`` 0.25 (10
  epochs).  Hence the default is ``input_fgsm`` [departure from spec 3.2's uniform formula,
  named].
* ``none`` (default with ``combine_pgd``): layers that read the image are not perturbed; the
  input is left to PGD (input PGD-AT for the input, the layer-wise perturbation for the hidden
  layers), or, without ``combine_pgd``, only the hidden layers are trained against.  With
  ``combine_pgd``, ``input_fgsm`` would add an FGSM step taken from ``x_adv`` (an effective
  input up to 2 eps from ``x``); measured on MNIST-5k (PGD-10, eps 0.1, 10 epochs) that stayed
  at chance, while ``none`` reached 92.2% clean / 81.6% PGD-40 on the test split.

Options (``method_args``), every one runnable:

* ``schedule``: ``same_batch`` (default, spec "S2", "layer-wise FGSM"): a clean forward/backward
  on the batch gives every ``G_l`` (no optimizer step; booked to the ``attack`` phase), then a
  second forward adds every (detached) ``R_l`` through forward hooks and the loss of that pass is
  trained on: 2 forward + 2 backward sample-passes per example.  ``previous_step`` (spec "S1",
  "R is updated in the backward pass", as Sankaranarayanan et al. 2018): one forward/backward per
  step; the signs captured in step t's backward are used (with the weights after step t's update)
  in step t + 1 (they are dL/dy of that step's own, perturbed, pass).  Caveats: those signs
  belong to the *previous batch's* examples; the shapes must match, so it needs equal batches
  (``train.drop_last: true``; another batch size is refused with an error); the first step of
  every epoch has no previous signs and trains on the unperturbed pass (so no per-example
  tensors cross a checkpoint, and resume is exact); it needs ``first_layer: budget`` or
  ``none`` (the input gradient of another batch means nothing).
* ``budget``: ``row_l1`` (default, the formula above) or ``constant`` (``R_l = eps_l sign(G_l)``,
  the spec's simpler ablation).
* ``deep_eps_scale``: ``eps_l = deep_eps_scale * threat.eps`` for every layer that does not read
  the image.  [ASSUMPTION] The paper's eps_l are unknown.  The spec recommends one eps for all
  layers, or "a smaller eps_l (e.g. 0.01-0.03 x the layer's activation std) until clean accuracy
  drop <= 5 pp".  The row-l1 budget grows like the fan-in n (``rowL1 ~ n E|w|``) while a unit's
  natural spread grows like sqrt(n), so a box of eps_l on every layer's input is far stronger than
  the same eps on the image.  The default 0.003 is the largest of {0.03, 0.01, 0.003} that meets
  the spec's own criterion on the embedded default (MNIST-5k, SmallCNN width 0.5, eps 0.1,
  ``first_layer: input_fgsm``): 0.003 gave 94.3% clean accuracy on the test split after 10
  epochs (standard training: 94.5%), 0.01 gave 50.0%, and 0.03 stayed at chance for 3 epochs.
  A CIFAR/WRN value is not calibrated (``layerwise_cifar_ablate`` sweeps it).  1.0 is the spec's
  single-eps reading.
* ``include_head``: perturb the classifier's logits too (default true).
* ``combine_pgd`` (default false): PGD-AT on the input first (``steps``, ``alpha`` absolute in
  [0, 1] units, random start, projection, in ``attack_mode``; as ``pgd_at``), then the layer-wise
  perturbation on top of ``x_adv`` (gradient pass and perturbed pass at ``x_adv``):
  ``loss = CE(layer-wise-perturbed(x_adv))``, the paper's best variant (spec 3.2); the input
  stays within eps of ``x`` and, by default (``first_layer: none``), the layers that read it get
  no further perturbation.
* ``clean_weight`` (default 0): ``loss = (1 - w) CE(perturbed) + w CE(model(x))`` with a separate
  clean train-mode forward on the natural images (the paper does not say whether it mixes).
* ``gradient_pass`` (``same_batch`` only): how the gradient pass treats the model.
  ``train_frozen_bn`` (default): train mode (batch statistics, dropout), so ``G_l`` is the
  gradient of the very function the second pass computes, with every buffer (BatchNorm running
  mean / var / count) saved before and restored after, so the running statistics move once per
  step, on the trained pass, as in every other method.  ``train``: the same without restoring
  (BatchNorm statistics updated twice per step).  ``eval``: eval mode (running statistics, no
  dropout).
* ``shared_dropout`` (default true; train-mode gradient pass only): torch's global RNG (CPU and
  the device's) is rewound after the gradient pass, so the trained pass draws the same dropout
  masks and ``G_l`` is zero exactly where the trained pass drops units.  False: fresh masks.

Hooks live only inside the passes that need them and are removed in ``finally`` blocks, so after
a step (or an exception in one) the model has no hook of this method and its eval-mode output is
the plain model's.  ``G_l`` is read by tensor hooks on each layer output (correct even if a later
op works in place).  Randomness: PGD's start from ``ctx.generator`` (checkpointed); dropout from
torch's global RNG (checkpointed by the trainer); the perturbation itself is deterministic.
Under fp16 the gradient pass scales its loss by the GradScaler's scale (signs only; no
underflow).  Untested here: ``torch.compile`` (hooks on submodules of a compiled model).

Where the reconstruction may differ from the paper (spec 3.2 "Unknown"): the eps_l of every
layer (``deep_eps_scale``), the schedule (``schedule``) and epochs, whether the perturbation sits
before or after BatchNorm / ReLU (here: before, on the conv/linear output), whether clean and
perturbed losses are mixed (``clean_weight``), whether the head is perturbed (``include_head``),
the first layer's reading of eq. (7) (``first_layer``), how BatchNorm and dropout are treated in
the gradient pass (``gradient_pass``, ``shared_dropout``), the per-layer budget's form
(``budget``) and its value at padded borders.
"""
from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Type, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import pgd
from ..models.core import INPUT_STAGE
from ..registry import METHODS
from ..threat import Norm
from .base import Method, ModelMode, attack_mode

#: The layers that are perturbed, found by module type.
LAYER_TYPES: Tuple[Type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


class Schedule(str, enum.Enum):
    SAME_BATCH = "same_batch"          # spec S2: clean gradient pass, then the perturbed pass
    PREVIOUS_STEP = "previous_step"    # spec S1: the previous step's signs, one pass per step


class Budget(str, enum.Enum):
    ROW_L1 = "row_l1"                  # eps_l * rowL1(W_l) per unit
    CONSTANT = "constant"              # eps_l per unit


class FirstLayer(str, enum.Enum):
    BUDGET = "budget"                  # the budget rule, like every layer (per-unit FGSM)
    INPUT_FGSM = "input_fgsm"          # exactly the first layer's response to input FGSM
    NONE = "none"                      # no perturbation on layers that read the image


class GradientPass(str, enum.Enum):
    TRAIN_FROZEN_BN = "train_frozen_bn"
    TRAIN = "train"
    EVAL = "eval"


#: gradient pass -> (model mode during it, restore every buffer afterwards)
GRADIENT_PASSES: Dict[GradientPass, Tuple[ModelMode, bool]] = {
    GradientPass.TRAIN_FROZEN_BN: (ModelMode.TRAIN, True),
    GradientPass.TRAIN: (ModelMode.TRAIN, False),
    GradientPass.EVAL: (ModelMode.EVAL, False),
}

E = TypeVar("E", bound=enum.Enum)


def _choice(field: str, value: Any, kind: Type[E]) -> E:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(repr(k.value) for k in kind)
        raise ValueError(f"layerwise_at: {field} must be one of {allowed}, got {value!r}") from None


# ----------------------------------------------------------------------------- per-unit budgets
def _conv_input_scale(module: nn.Conv2d, scale: torch.Tensor) -> torch.Tensor:
    """Per-input-channel ``scale`` (in_channels,) laid out like the weight (out, in/g, 1, 1)."""
    groups = module.groups
    per_group = scale.view(groups, module.in_channels // groups)
    return per_group.repeat_interleave(module.out_channels // groups, dim=0)[:, :, None, None]


def _linear_input_scale(module: nn.Linear, scale: torch.Tensor) -> torch.Tensor:
    return scale.view(1, module.in_features)


def _conv_input_step(delta: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return delta * scale.view(1, -1, 1, 1)


def _linear_input_step(delta: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return delta.flatten(1) * scale.view(1, -1)


@dataclass(frozen=True)
class Layout:
    """How a layer type lays out its units and inputs: ``weight_scale(module, scale)`` puts a
    per-input scale in the weight's shape, ``unit_axis`` is the output axis of its units, and
    ``input_step(delta, scale)`` maps a pixel-space image step to the layer's input."""

    weight_scale: Callable[[Any, torch.Tensor], torch.Tensor]
    unit_axis: int
    input_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


LAYOUTS: Dict[Type[nn.Module], Layout] = {
    nn.Conv2d: Layout(_conv_input_scale, 1, _conv_input_step),
    nn.Linear: Layout(_linear_input_scale, -1, _linear_input_step),
}


def _layout(module: nn.Module) -> Layout:
    for kind, layout in LAYOUTS.items():
        if isinstance(module, kind):
            return layout
    raise TypeError(f"layerwise_at: no budget layout for {type(module).__name__}")


def row_l1(module: nn.Module, input_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """``sum_i |W[k, i] * input_scale[i]|`` per output unit k, shape (out,): the largest change of
    unit k under an Linf input perturbation of size 1 in the units the scale maps from."""
    w = module.weight.detach().abs()
    if input_scale is not None:
        w = w * _layout(module).weight_scale(module, input_scale.to(w.dtype))
    return w.flatten(1).sum(dim=1)


def constant(module: nn.Module, input_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """1 per output unit (``budget: constant``)."""
    return torch.ones(module.weight.shape[0], device=module.weight.device,
                      dtype=module.weight.dtype)


BUDGETS: Dict[Budget, Callable[[nn.Module, Optional[torch.Tensor]], torch.Tensor]] = {
    Budget.ROW_L1: row_l1,
    Budget.CONSTANT: constant,
}


def unit_view(module: nn.Module, per_unit: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``per_unit`` (out,) shaped to broadcast over ``output`` (batch and spatial positions)."""
    axis = _layout(module).unit_axis % output.dim()
    shape = [1] * output.dim()
    shape[axis] = -1
    return per_unit.view(shape)


# ----------------------------------------------------------------------------- the layer tape
@dataclass
class LayerCall:
    """One call of a perturbed layer in a forward: the module, the scale from the image's pixel
    units to the layer's input (``1 / std`` per input channel or feature) if the layer reads the
    image, else ``None``, the sign of dL/dy (int8, filled in by the backward) and, for
    ``first_layer: input_fgsm``, the pixel-space FGSM step of the image it reads."""

    module: nn.Module
    input_scale: Optional[torch.Tensor]
    sign: Optional[torch.Tensor] = None
    input_delta: Optional[torch.Tensor] = None

    @property
    def reads_image(self) -> bool:
        return self.input_scale is not None


def perturbed_layers(model: nn.Module, include_head: bool) -> List[nn.Module]:
    """Every conv / linear module of ``model`` (the head only if ``include_head``)."""
    head = getattr(model, "head", None)
    return [m for m in model.modules()
            if isinstance(m, LAYER_TYPES) and (include_head or m is not head)]


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a is b) or (a.numel() == b.numel() and a.dtype == b.dtype
                        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                        and a.storage_offset() == b.storage_offset() and b.is_contiguous())


class _ImageWatch:
    """The tensors that hold the image as a first layer sees it, with their pixel-unit scales:
    the model's input (scale 1) and the output of its ``input`` (normalisation) stage, whose
    scale is ``1 / std`` per channel."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.images: List[Tuple[torch.Tensor, torch.Tensor]] = [
            (x, torch.ones(x.shape[1], device=x.device, dtype=x.dtype))]
        self.handle = None
        names = getattr(model, "stage_names", None)
        if callable(names) and INPUT_STAGE in names():
            normalize = model.stage_module(INPUT_STAGE)
            std = getattr(normalize, "std", None)
            inv = (torch.ones(x.shape[1], device=x.device) if std is None
                   else 1.0 / std.detach().flatten())
            self.handle = normalize.register_forward_hook(
                lambda m, i, out: self.images.append((out, inv.to(out.dtype))))

    def scale_for(self, module: nn.Module, inp: torch.Tensor) -> Optional[torch.Tensor]:
        """The layer input's per-channel (conv) or per-feature (linear) pixel-unit scale, or
        ``None`` if the input is not the image."""
        for image, channel_scale in reversed(self.images):
            if not _same_storage(inp, image):
                continue
            if isinstance(module, nn.Linear):   # a flat view of (B, C, H, W): channel-major
                return channel_scale.repeat_interleave(image[0].numel() // image.shape[1])
            return channel_scale
        return None

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def _store_sign(call: LayerCall) -> Callable[[torch.Tensor], None]:
    def hook(grad: torch.Tensor) -> None:
        call.sign = torch.nan_to_num(grad.detach().sign(), nan=0.0).to(torch.int8)
    return hook


@contextlib.contextmanager
def record_layers(model: nn.Module, layers: List[nn.Module], x: torch.Tensor,
                  calls: Optional[List[LayerCall]] = None,
                  perturbation: Optional[Callable[..., torch.Tensor]] = None,
                  capture: bool = True) -> Iterator[List[LayerCall]]:
    """Within the block, every call of a layer in ``layers`` is appended to the yielded list (in
    forward order); with ``capture``, a tensor hook on the call's output stores ``sign(dL/dy)``
    on it when a backward passes (a tensor hook sees the gradient of the layer's own output even
    if a later op works in place).  ``perturbation(i, module, input, y)``, if given, returns what
    call ``i``'s output becomes.  Every hook is removed on exit, exception or not."""
    tape: List[LayerCall] = [] if calls is None else calls
    watch = _ImageWatch(model, x)
    handles = []

    def on_layer(module: nn.Module, inputs, output: torch.Tensor):
        index = len(tape)
        call = LayerCall(module, watch.scale_for(module, inputs[0]))
        tape.append(call)
        if capture and output.requires_grad:
            output.register_hook(_store_sign(call))
        return None if perturbation is None else perturbation(index, module, inputs[0], output)

    try:
        for layer in layers:
            handles.append(layer.register_forward_hook(on_layer))
        yield tape
    finally:
        for handle in handles:
            handle.remove()
        watch.remove()


@contextlib.contextmanager
def restored_buffers(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Save every buffer (BatchNorm running statistics and counts) and restore it on exit."""
    saved = [(b, b.detach().clone()) for b in model.buffers()] if enabled else []
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


@contextlib.contextmanager
def rewound_rng(device: torch.device, enabled: bool) -> Iterator[None]:
    """Rewind torch's global RNG (CPU, and the CUDA device's) to its state at entry, on exit."""
    if not enabled:
        yield
        return
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


# ----------------------------------------------------------------------------- the method
@METHODS.register("layerwise_at")
class LayerwiseAT(Method):
    """Layer-wise adversarial training (reconstruction; see the module docstring)."""

    name = "layerwise_at"
    paper = ("Chen & Zhang. Layer-wise Adversarial Training Approach to Improve Adversarial "
             "Robustness. IJCNN 2020. RECONSTRUCTION: no official code exists; the perturbation, "
             "schedule and budgets are spec 3.2's reconstruction (see method_args)")

    def __init__(self, *, threat, schedule: str = "same_batch", budget: str = "row_l1",
                 first_layer: Optional[str] = None, deep_eps_scale: float = 0.003,
                 include_head: bool = True,
                 combine_pgd: bool = False, steps: int = 10, alpha: float = 2 / 255,
                 attack_mode: str = "train", clean_weight: float = 0.0,
                 gradient_pass: str = "train_frozen_bn", shared_dropout: bool = True) -> None:
        super().__init__(threat=threat)
        self.schedule = _choice("schedule", schedule, Schedule)
        self.budget = _choice("budget", budget, Budget)
        if self.budget is Budget.ROW_L1 and threat.norm is not Norm.LINF:
            raise ValueError("layerwise_at: budget 'row_l1' is the worst case of an Linf input "
                             f"perturbation; threat.norm must be 'linf', got {threat.norm.value!r}")
        if not float(deep_eps_scale) >= 0:
            raise ValueError(f"layerwise_at: deep_eps_scale must be >= 0, got {deep_eps_scale!r}")
        self.deep_eps_scale = float(deep_eps_scale)
        self.include_head = bool(include_head)
        self.combine_pgd = bool(combine_pgd)
        default_first = FirstLayer.NONE if self.combine_pgd else FirstLayer.INPUT_FGSM
        self.first_layer = (default_first if first_layer is None
                            else _choice("first_layer", first_layer, FirstLayer))
        if self.first_layer is FirstLayer.INPUT_FGSM and self.schedule is Schedule.PREVIOUS_STEP:
            raise ValueError("layerwise_at: first_layer 'input_fgsm' needs the batch's own input "
                             "gradient, so schedule must be 'same_batch' (or set first_layer: "
                             "'budget' or 'none'), got schedule 'previous_step'")
        if int(steps) < 1 or not float(alpha) > 0:
            raise ValueError(f"layerwise_at: steps must be >= 1 and alpha > 0, "
                             f"got steps={steps!r}, alpha={alpha!r}")
        self.steps = int(steps)
        self.alpha = float(alpha)
        self.attack_mode = _choice("attack_mode", attack_mode, ModelMode)
        if not 0.0 <= float(clean_weight) <= 1.0:
            raise ValueError(f"layerwise_at: clean_weight must be in [0, 1], got {clean_weight!r}")
        self.clean_weight = float(clean_weight)
        self.gradient_pass = _choice("gradient_pass", gradient_pass, GradientPass)
        self.shared_dropout = bool(shared_dropout)
        self._previous: Optional[List[LayerCall]] = None   # previous_step: last step's tape

    # -- the per-layer perturbation
    def layer_eps(self, call: LayerCall) -> float:
        """eps_l: the threat's eps for a layer that reads the image, else deep_eps_scale * eps."""
        return self.threat.eps * (1.0 if call.reads_image else self.deep_eps_scale)

    def magnitude(self, call: LayerCall) -> torch.Tensor:
        """``eps_l * budget`` per output unit, shape (out,), from the layer's current weights."""
        return self.layer_eps(call) * BUDGETS[self.budget](call.module, call.input_scale)

    def perturbation(self, call: LayerCall, output: torch.Tensor,
                     inp: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``R_l`` for one recorded call, shaped like ``output`` (zero where dL/dy was 0).
        ``inp`` (the layer's input) is needed only for ``first_layer: input_fgsm``."""
        if call.reads_image and self.first_layer is FirstLayer.NONE:
            return torch.zeros_like(output)
        if call.input_delta is not None:      # first_layer: input_fgsm, bias-free response
            if inp is None:
                raise ValueError("layerwise_at: first_layer 'input_fgsm' needs the layer input")
            step = _layout(call.module).input_step(call.input_delta, call.input_scale)
            return call.module.forward(inp + step.reshape(inp.shape).to(inp.dtype)) - output
        if call.sign is None:      # no gradient reached this output
            return torch.zeros_like(output)
        if call.sign.shape != output.shape:
            raise RuntimeError(
                f"layerwise_at: {type(call.module).__name__} output of shape "
                f"{tuple(output.shape)} but its recorded gradient sign has shape "
                f"{tuple(call.sign.shape)}; schedule='previous_step' needs every batch the same "
                "size (set train.drop_last: true)")
        magnitude = unit_view(call.module, self.magnitude(call), output)
        return magnitude.to(output.dtype) * call.sign.to(output.dtype)

    def _applier(self, tape: List[LayerCall]):
        def apply(index: int, module: nn.Module, inp: torch.Tensor,
                  output: torch.Tensor) -> torch.Tensor:
            if index >= len(tape) or tape[index].module is not module:
                raise RuntimeError(
                    f"layerwise_at: layer call {index} ({type(module).__name__}) does not match "
                    f"the pass the gradients came from ({len(tape)} calls); the forward's layer "
                    "order changed")
            return output + self.perturbation(tape[index], output, inp)
        return apply

    def gradient_tape(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx) -> List[LayerCall]:
        """The ``same_batch`` gradient pass: one clean forward and one backward (to the input,
        so no parameter gradient is computed or accumulated) recording ``sign(G_l)`` for every
        layer call, and for ``first_layer: input_fgsm`` the FGSM step ``clamp(x + eps
        sign(dL/dx)) - x`` on the layers that read the image; the model's mode, buffers and
        (optionally) the global RNG as ``gradient_pass`` / ``shared_dropout`` say."""
        mode, restore = GRADIENT_PASSES[self.gradient_pass]
        layers = perturbed_layers(model, self.include_head)
        x_in = x.detach().requires_grad_(True)
        with attack_mode(model, mode), restored_buffers(model, restore), \
                rewound_rng(x.device, self.shared_dropout and mode is ModelMode.TRAIN), \
                record_layers(model, layers, x_in) as tape:
            loss = F.cross_entropy(model(x_in), y)
            scale = ctx.scaler.get_scale() if ctx.scaler is not None else 1.0  # fp16: no underflow
            (grad,) = torch.autograd.grad(loss * scale, x_in)   # before buffers are restored
        ctx.stats["unperturbed_loss"] = float(loss.detach())
        if self.first_layer is FirstLayer.INPUT_FGSM:
            x_fgsm = (x + self.threat.eps * grad.sign()).clamp(0, 1)
            delta = (x_fgsm - x).detach()
            for call in tape:
                if call.reads_image:
                    call.input_delta = delta
        return tape

    # -- the step
    def start_epoch(self, model, ctx):
        self._previous = None    # previous_step: every epoch starts with an unperturbed step

    def loss(self, model, x, y, ctx):
        x_in = x
        if self.combine_pgd:
            with attack_mode(model, self.attack_mode), ctx.counter.phase("attack"):
                x_in = pgd(model, x, y, self.threat, alpha=self.alpha, steps=self.steps,
                           generator=ctx.generator)
        if self.schedule is Schedule.SAME_BATCH:
            with ctx.counter.phase("attack"):
                tape = self.gradient_tape(model, x_in, y, ctx)
            with record_layers(model, perturbed_layers(model, self.include_head), x_in,
                               perturbation=self._applier(tape), capture=False):
                loss = F.cross_entropy(model(x_in), y)
        else:
            tape = self._previous
            self._previous = []      # filled with this step's signs by the trainer's backward
            applier = None if tape is None else self._applier(tape)
            with record_layers(model, perturbed_layers(model, self.include_head), x_in,
                               calls=self._previous, perturbation=applier):
                loss = F.cross_entropy(model(x_in), y)
            if tape is not None and len(self._previous) != len(tape):
                raise RuntimeError(f"layerwise_at: {len(self._previous)} layer calls in this "
                                   f"forward but {len(tape)} in the previous step's")
        ctx.stats["perturbed_loss"] = float(loss.detach())
        if self.clean_weight > 0:
            loss = ((1 - self.clean_weight) * loss
                    + self.clean_weight * F.cross_entropy(model(x), y))
        return loss
