"""BatchOut: feature-level augmentation toward (or away from) another sample of the batch.

Paper: Subramanya, Mopuri, Babu, "BatchOut: Batch-level feature augmentation to improve
robustness to adversarial examples", ICVGIP 2018 (ACM DL 3293387; the PDF is committed in
Hrushikesh-github/Batchout-Robustness-method).  No official code exists.  Algorithm 1 / Eq. (2),
at a layer with minibatch activations x (m rows):

    r_j ~ U{0..m-1} (with replacement; may be j itself or a same-class row)
    x~_j = x_j + n * stopgrad(x_{r_j} - x_j)        for the first k rows, x~_j = x_j otherwise

so the forward value is (1 - n) x_j + n x_r while the gradient flows only through x_j (the
direction is a constant: Sec. 6.1, "the network learnt to undo the operation" without it).
Labels are not mixed.  Training only (the identity at inference); pre-ReLU insertion; k = half
the batch (Sec. 6.6; the batch order is already random, so "the first k" is a random half);
the coefficient is per layer, fixed (MNIST, App. Table 1: 0.05, 0.1, 0.1) or drawn from
U[0, n_max] per layer per step (CIFAR, App. Table 2).  Each BatchOut layer draws its own r.

Extension (unpublished student work, spec section 4.2): Hrushikesh-github/Batchout-Robustness-
method @7c138a92, ``vgg19/batchout_many/batchout_many.py`` (``Batchout_Many``: L20-35,
``x + (n * (x[r] - x)).detach()`` on all rows, r returned and reused by later calls),
``vgg19/batchout_many/random_n/batchout_many_random_n.py`` L9-19 (n drawn once per batch from
{0.3, -0.2} with p [0.6, 0.4]; {0.3, -0.2, 0} with [0.6, 0.3, 0.1] in its results ``m=9`` and
``sample_usage.py``), ``random_n/vgg_batchout_random.py`` L28-70 (the alternate placement with
one partner and one n shared by the five insertions), ``vgg19/batchout_all/
vgg_batchout_middle_all.py`` L29-85 (all middle layers) and ``torch_hooks/hook.py`` L14 (the
mutual pairing "C": ``linspace(m - 1, 0, m)``).  It perturbs every row (k = 1), lets n be
negative (which moves a row *away* from its partner: ||x~_j - x_r|| = |1 - n| ||x_j - x_r||),
and inserts at the *block outputs* of its Conv -> ReLU -> BN VGG (after the BN, so after the
activation), not before the ReLU.  Its ``_make_random`` different-class loop compares an index
with a label and never runs, so its partners are uniform over the batch.

Parameters (each option runnable; every departure from a source is one of them):

* ``layers``: ``"all"`` (default, the paper's best placement: every declared hidden layer that
  has the chosen ``position``, each with its own partner draw as in Algorithm 1) or a list whose
  entries are a layer name or a list of layer names; the layers of one list entry share one
  partner draw per step (the extension's reuse of r).  Names are the model's
  ``hidden_layers`` (:class:`methods.models.core.HiddenLayer`): ``conv1, conv2, fc1`` on
  SmallCNN; ``conv1..conv16, pool1..pool5`` on ``vgg19_bn``, where the extension's call index
  #i is the i-th entry of that list (#11 = conv9, the first 512-channel conv).  The extension's
  placements: one middle layer ``[conv9]`` (n_k); alternate ``[[conv9, conv11, pool4, conv14,
  conv16]]`` (alt_k, random_*: after #11, #13, #15, #17, #19, one partner); all middle
  ``[conv9, [conv10, conv11], [conv12, pool4], [conv13, conv14], [conv15, conv16]]`` (a fresh
  partner after #11, #12, #14, #16, #18 and reuse after #13, #15, #17, #19: nine insertions,
  where the spec's summary says eight).
* ``position``: ``"pre_activation"`` (default; the paper) hooks each layer's pre-activation
  module; ``"output"`` hooks the layer's output (the extension's block outputs; the only
  choice for a pooling layer).
* ``k``: the fraction of rows perturbed, the first ``int(k * m)`` (paper 0.5; extension 1.0).
* ``coefficient``: ``"fixed"`` (n as given), ``"uniform"`` (n * u, u ~ U[0, 1) drawn per layer
  per step, i.e. U[0, n_max]: the paper's CIFAR rule) or ``"choice"`` (one n per step from
  ``choices`` with probabilities ``probs``, shared by every layer: the extension's random
  variants).  ``n``: a number, or a mapping from layer name to number (one per inserted
  layer); not used by ``"choice"``.
* ``partner``: ``"random"`` (default: uniform with replacement over the batch, any class, as
  the paper and as the extension's code runs), ``"mutual"`` (row i with row m-1-i: the
  extension's "C"), ``"different_class"`` (uniform over the rows of another class, what the
  extension's code intended and its author reports as about 6 points worse; a row whose batch
  holds no other class is its own partner, i.e. unchanged).

Hooks are installed around this method's own training forward only (forward hooks on the
declared modules that return the replaced output) and removed afterwards, also on an
exception; each also returns its input unchanged when its module is in eval mode.  So BatchOut
is the identity in evaluation, in the per-epoch monitor and in any attack run on the model.
Every random draw (coefficients, partners) comes from ``ctx.generator`` on the CPU, in a fixed
order (choice n; then per partner group its partner draw; then per layer its uniform draw), and
is moved to the device, so a run resumes bit for bit.
"""
from __future__ import annotations

import contextlib
import enum
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import METHODS
from .base import Method

LayerSpec = Union[str, Sequence[Union[str, Sequence[str]]]]


class Position(str, enum.Enum):
    PRE_ACTIVATION = "pre_activation"   # the paper: before the ReLU
    OUTPUT = "output"                   # the extension: the block's output


class Coefficient(str, enum.Enum):
    FIXED = "fixed"       # n as given (per layer if a mapping)
    UNIFORM = "uniform"   # n * U[0, 1), per layer per step (the paper's CIFAR net)
    CHOICE = "choice"     # one n per step from `choices` with `probs` (the extension's random_*)


class Partner(str, enum.Enum):
    RANDOM = "random"                     # U{0..m-1} with replacement, any class
    MUTUAL = "mutual"                     # i <-> m-1-i (the extension's "C")
    DIFFERENT_CLASS = "different_class"   # uniform over rows with another label


E = TypeVar("E", bound=enum.Enum)


def _choice(field: str, value: Any, kind: Type[E]) -> E:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(repr(k.value) for k in kind)
        raise ValueError(f"batchout: {field} must be one of {allowed}; got {value!r}") from None


def _finite(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"batchout: {field} must be a finite number; got {value!r}")
    return float(value)


def mix(h: torch.Tensor, partner: torch.Tensor, n: float, rows: int) -> torch.Tensor:
    """Eq. (2) on the first ``rows`` rows of ``h``: ``h_j + n * stopgrad(h[partner_j] - h_j)``;
    the other rows are returned unchanged (exactly).  ``partner`` is on ``h``'s device."""
    if n == 0.0 or rows == 0:
        return h
    direction = (h[partner[:rows]] - h[:rows]).detach()
    mixed = h[:rows] + n * direction
    return mixed if rows == h.shape[0] else torch.cat([mixed, h[rows:]])


def draw_partners(rule: Partner, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Partner indices (CPU int64) for a batch with CPU labels ``y``."""
    m = int(y.shape[0])
    if rule is Partner.RANDOM:
        return torch.randint(0, m, (m,), generator=generator)
    if rule is Partner.MUTUAL:
        return torch.arange(m - 1, -1, -1)
    other = y[None, :] != y[:, None]                                   # m x m: row j's candidates
    count = other.sum(1)
    u = torch.rand(m, generator=generator, dtype=torch.float64)
    pick = torch.minimum((u * count).long(), (count - 1).clamp(min=0))  # 0-based among candidates
    rank = other.long().cumsum(1) - 1                                  # candidate rank per column
    hit = other & (rank == pick[:, None])
    return torch.where(count > 0, hit.long().argmax(1), torch.arange(m))


@dataclass(frozen=True)
class Insertion:
    """One hooked layer: its name, the module hooked, its partner group and coefficient key."""

    layer: str
    module: nn.Module
    group: int


@dataclass
class StepDraws:
    """What one step drew: the partner indices of each group and the coefficient of each layer."""

    partners: List[torch.Tensor]      # per group, CPU int64 (m,)
    coefficients: Dict[str, float]    # per layer name
    rows: int                         # rows perturbed: int(k * m)
    calls: Dict[str, int] = field(default_factory=dict)  # train-mode hook calls per layer


@METHODS.register("batchout")
class BatchOut(Method):
    name = "batchout"
    paper = ("Subramanya, Mopuri, Babu, BatchOut, ICVGIP 2018; variants of the unpublished "
             "extension Hrushikesh-github/Batchout-Robustness-method @7c138a92")

    def __init__(self, *, threat, layers: LayerSpec = "all", position: str = "pre_activation",
                 k: float = 0.5, coefficient: str = "fixed",
                 n: Union[float, Mapping[str, float], None] = 0.1,
                 choices: Optional[Sequence[float]] = None, probs: Optional[Sequence[float]] = None,
                 partner: str = "random") -> None:
        super().__init__(threat=threat)
        self.position = _choice("position", position, Position)
        self.coefficient = _choice("coefficient", coefficient, Coefficient)
        self.partner = _choice("partner", partner, Partner)
        self.k = _finite("k", k)
        if not 0.0 < self.k <= 1.0:
            raise ValueError(f"batchout: k must be in (0, 1]; got {k!r}")
        self.layers = self._check_layers(layers)
        self.n = self._check_n(n)
        self.choices, self.probs = self._check_choices(choices, probs)

    # ----------------------------------------------------------------------------- validation
    @staticmethod
    def _check_layers(layers: Any) -> Union[str, List[Union[str, List[str]]]]:
        if layers == "all":
            return "all"
        if isinstance(layers, str) or not isinstance(layers, (list, tuple)) or not layers:
            raise ValueError(f"batchout: layers must be 'all' or a non-empty list of layer names "
                             f"and lists of layer names; got {layers!r}")
        out: List[Union[str, List[str]]] = []
        seen = set()
        for i, entry in enumerate(layers):
            names = [entry] if isinstance(entry, str) else entry
            if not isinstance(names, (list, tuple)) or not names or not all(
                    isinstance(s, str) and s for s in names):
                raise ValueError(f"batchout: layers[{i}] must be a layer name or a non-empty list "
                                 f"of layer names; got {entry!r}")
            for name in names:
                if name in seen:
                    raise ValueError(f"batchout: layers[{i}]: layer {name!r} is listed twice")
                seen.add(name)
            out.append(entry if isinstance(entry, str) else list(entry))
        return out

    def _check_n(self, n: Any) -> Union[float, Dict[str, float], None]:
        if self.coefficient is Coefficient.CHOICE:
            return None if n is None else (dict(n) if isinstance(n, Mapping) else _finite("n", n))
        if isinstance(n, Mapping):
            if not n:
                raise ValueError("batchout: n must be a number or a non-empty mapping layer -> number")
            return {str(name): _finite(f"n[{name!r}]", v) for name, v in n.items()}
        return _finite("n", n)

    def _check_choices(self, choices: Any, probs: Any) -> Tuple[Optional[List[float]],
                                                                 Optional[List[float]]]:
        if self.coefficient is not Coefficient.CHOICE:
            if choices is not None or probs is not None:
                raise ValueError(f"batchout: choices and probs are only used with "
                                 f"coefficient='choice'; got coefficient={self.coefficient.value!r}")
            return None, None
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ValueError(f"batchout: coefficient='choice' needs a non-empty list choices; "
                             f"got {choices!r}")
        values = [_finite(f"choices[{i}]", c) for i, c in enumerate(choices)]
        if probs is None:
            p = [1.0 / len(values)] * len(values)
        else:
            if not isinstance(probs, (list, tuple)) or len(probs) != len(values):
                raise ValueError(f"batchout: probs must list one probability per choice "
                                 f"({len(values)}); got {probs!r}")
            p = [_finite(f"probs[{i}]", q) for i, q in enumerate(probs)]
            if min(p) < 0 or abs(sum(p) - 1.0) > 1e-6:
                raise ValueError(f"batchout: probs must be >= 0 and sum to 1; got {probs!r}")
        return values, p

    # ----------------------------------------------------------------------------- placement
    def insertions(self, model: nn.Module) -> List[Insertion]:
        """The hooked modules for ``model``, in forward order of the listed layers."""
        hidden = getattr(model, "hidden_layers", None)
        if hidden is None:
            raise TypeError(f"batchout: {type(model).__name__} is not a Backbone with hidden layers")
        by_name = {layer.name: layer for layer in hidden}
        if not by_name:
            raise ValueError(f"batchout: {type(model).__name__} declares no hidden layers (its "
                             "insertion points); declare them with Backbone.declare_layers")
        pre = self.position is Position.PRE_ACTIVATION
        if self.layers == "all":
            groups = [[layer.name] for layer in hidden if not pre or layer.pre_activation]
        else:
            groups = [[e] if isinstance(e, str) else list(e) for e in self.layers]
        out = []
        for g, names in enumerate(groups):
            for name in names:
                if name not in by_name:
                    raise ValueError(f"batchout: layers names {name!r}, which is not a hidden layer "
                                     f"of {type(model).__name__}; hidden layers: {list(by_name)}")
                layer = by_name[name]
                path = layer.pre_activation if pre else layer.output
                if path is None:
                    raise ValueError(f"batchout: layer {name!r} has no pre-activation (a pooling "
                                     "layer); use position='output' or another layer")
                out.append(Insertion(name, model.get_submodule(path), g))
        if not out:
            raise ValueError(f"batchout: no hidden layer of {type(model).__name__} has a "
                             f"{self.position.value} module; hidden layers: {list(by_name)}")
        if isinstance(self.n, dict) and self.coefficient is not Coefficient.CHOICE:
            missing = [i.layer for i in out if i.layer not in self.n]
            extra = sorted(set(self.n) - {i.layer for i in out})
            if missing or extra:
                raise ValueError(f"batchout: n must give one value per inserted layer; missing "
                                 f"{missing}, not inserted {extra}")
        return out

    # ----------------------------------------------------------------------------- randomness
    def draw(self, insertions: Sequence[Insertion], y: torch.Tensor,
             generator: torch.Generator) -> StepDraws:
        """One step's draws from ``generator`` (CPU), in the documented order."""
        m = int(y.shape[0])
        step_n = None
        if self.coefficient is Coefficient.CHOICE:
            u = torch.rand((), generator=generator, dtype=torch.float64)
            cumulative = torch.tensor(self.probs, dtype=torch.float64).cumsum(0)
            idx = min(int(torch.searchsorted(cumulative, u, right=True)), len(self.choices) - 1)
            step_n = self.choices[idx]
        labels = y.detach().cpu()
        groups = sorted({i.group for i in insertions})
        partners = {g: draw_partners(self.partner, labels, generator) for g in groups}
        coefficients: Dict[str, float] = {}
        for ins in insertions:
            if step_n is not None:
                coefficients[ins.layer] = step_n
                continue
            base = self.n[ins.layer] if isinstance(self.n, dict) else self.n
            if self.coefficient is Coefficient.UNIFORM:
                base = base * float(torch.rand((), generator=generator, dtype=torch.float64))
            coefficients[ins.layer] = float(base)
        return StepDraws(partners=[partners[g] for g in groups] if groups else [],
                         coefficients=coefficients, rows=int(self.k * m))

    @contextlib.contextmanager
    def installed(self, model: nn.Module, y: torch.Tensor,
                  generator: torch.Generator) -> Iterator[StepDraws]:
        """Draw one step and hook every insertion point for the duration of the block (one
        forward): each hook replaces its module's output by :func:`mix` once; the hooks are
        removed on exit, also on an exception."""
        insertions = self.insertions(model)
        draws = self.draw(insertions, y, generator)
        groups = sorted({i.group for i in insertions})
        device_partners: Dict[int, torch.Tensor] = {}
        calls = draws.calls

        def make_hook(ins: Insertion):
            coefficient = draws.coefficients[ins.layer]
            cpu_partner = draws.partners[groups.index(ins.group)]

            def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
                if not module.training:
                    return output
                calls[ins.layer] = calls.get(ins.layer, 0) + 1
                if calls[ins.layer] > 1:
                    raise RuntimeError(f"batchout: the module of layer {ins.layer!r} ran twice in "
                                       "one forward; an insertion point must run once")
                if output.shape[0] != cpu_partner.shape[0]:
                    raise RuntimeError(f"batchout: layer {ins.layer!r} saw {output.shape[0]} rows "
                                       f"for a batch of {cpu_partner.shape[0]}")
                if ins.group not in device_partners:
                    device_partners[ins.group] = cpu_partner.to(output.device)
                return mix(output, device_partners[ins.group], coefficient, draws.rows)

            return hook

        handles = [ins.module.register_forward_hook(make_hook(ins)) for ins in insertions]
        try:
            yield draws
        finally:
            for handle in handles:
                handle.remove()

    # ----------------------------------------------------------------------------- training
    def loss(self, model, x, y, ctx):
        with self.installed(model, y, ctx.generator) as draws:
            logits = model(x)
        missed = [layer for layer in draws.coefficients if draws.calls.get(layer) != 1]
        if missed:
            raise RuntimeError(f"batchout: layers {missed} were not reached by the training "
                               "forward (is the model in train mode, are they in its forward?)")
        values = list(draws.coefficients.values())
        ctx.stats["batchout_n"] = sum(values) / len(values) if values else 0.0
        return F.cross_entropy(logits, y)
