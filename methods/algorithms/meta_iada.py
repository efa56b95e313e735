"""Meta-IADA: the IADA loss with a per-sample epsilon from a meta-learned perturbation network.

Zhou, Ye, Lee, Xie, Zhang, *Boosting Model Resilience via Implicit Adversarial Data
Augmentation*, IJCAI 2024, arXiv:2404.16307.  **No official code is public**: this follows the
reconstruction in ``../shared/specs/iada_mixup_layerwise_batchout.md`` sections 1.3-1.4 and 6,
whose skeleton is the first author's own code for two sibling methods, Meta-CALA
(xiaolingzhou98/CALA @d13017d, ``Meta-CALA/train.py``, ``meta.py``, ``model.py``) and CAAT
(xiaolingzhou98/CAAT @9186f6d, ``utils.py``), both following Meta-Weight-Net.  The IADA loss
itself is :func:`~.iada.iada_logits` (see ``iada.py`` for what is verified there).

Verified (paper text quoted by third parties): a perturbation network maps K = 15 training
characteristics of each sample to its perturbation strategy eps_i used in the IADA loss; it is
trained by meta-learning on a small unbiased meta set of ten images per class; beta = 1, alpha
from {0.1, ..., 1}; (seed summary) Adam with lr 1e-3.

Reconstructed / assumed (spec 1.4 and 6), each a named option where a choice exists:

* **Perturbation network** (Meta-CALA ``MLP`` pattern): ``BatchNorm1d(15) -> Linear(15, hidden)
  -> ReLU -> (Linear(hidden, hidden) -> ReLU) x (layers - 1) -> Linear(hidden, 1)``, hidden =
  100, layers = 1, PyTorch default init, always in train mode (batch statistics) as in the
  sibling codes.  The output is **signed**: ``output="tanh"`` (default) eps = eps_max tanh(o),
  eps_max = 1; ``output="clamp"``: eps = clamp(o, -eps_max, eps_max) (the author's commented-out
  ``clamp(x, -5, 5)`` is ``eps_max: 5``).  Adam(lr ``meta_lr`` = 1e-3, weight decay
  ``meta_weight_decay`` = 1e-4, Meta-Weight-Net's noisy-label value).
* **The 15 characteristics** (the paper's list was not read; spec 1.4), per sample, computed
  from the logits of the step's own forward (detached unless ``characteristics_grad``):
  1 CE loss; 2 label logit z_y; 3 label probability p_y; 4 ||e_y - p||_2; 5 probability margin
  p_y - max_{j != y} p_j; 6 negative entropy sum_j p_j log p_j; 7 class proportion pi_y of the
  training split; 8 last epoch's mean CE loss of class y (CAAT ``last_epoch_ave_loss``: the
  per-class mean of characteristic 1 over the previous epoch's steps, sum / (count + 1e-6) as
  coded, so 0 for a class without a step; 5.0 until the first epoch ends, as CAAT initialises
  it -- CAAT's own code never updates it (it rebinds a local), a bug whose evident intent is
  followed here); 9-14 characteristics 1-6 minus their value in the
  previous epoch (Meta-CALA's "sequence extension"; buffers start at 1.0 as coded); 15 training
  progress epoch / epochs.  Note: the network's first layer is BatchNorm with batch statistics,
  so a characteristic that is the same for the whole batch (15 always, 7-8 in a one-class
  batch) is normalised to 0 and carries no information -- a property of this reconstruction.
  ``history`` says what "previous value" is: ``"sample"`` the same training example in the
  previous epoch (default, Meta-CALA's per-index buffers; it uses every row's training-set
  index, ``ctx.indices``, which the trainer's loader passes); ``"class"`` (an option, for callers
  without indices) the mean of that characteristic over the sample's class in the previous
  epoch.  ``characteristics_grad=True`` keeps the
  characteristics' graph to the look-ahead parameters in the pseudo step as Meta-CALA's code
  does (its ``weight_feature`` takes undetached ``pseudo_outputs``); the spec detaches them.
* **Meta step** every ``meta_interval`` steps (``(step_in_epoch + 1) % meta_interval == 0``;
  20 = Meta-CALA's default and the spec's, 1 = Meta-Weight-Net), before the real update:
  1. look-ahead forward of a copy theta' of the classifier (train mode; the real BatchNorm
     buffers are not touched: clones are passed), characteristics, eps = P_phi(c), the IADA loss
     with the current Sigma (detached, not updated by the pseudo step) and alpha_t;
  2. theta'' = one update of theta' with g = grad_theta L, ``lookahead="optimizer"`` (default):
     the real optimizer's own rule with its current lr, state and hyperparameters (Meta-CALA's
     ``MetaSGD.meta_step`` for SGD: weight decay, momentum buffer, dampening, Nesterov; the
     analogous Adam step for Adam); ``lookahead="sgd"``: theta - lr g (Meta-Weight-Net);
  3. meta loss = plain mean CE of theta'' on a meta batch (``meta_batch_size`` = 100, drawn
     without replacement from the balanced clean meta split -- the val split of a long-tail or
     ``label_noise.meta_per_class`` dataset -- reshuffled when fewer than a batch remain, as a
     ``drop_last`` DataLoader; ``meta_augmentation`` as for training batches);
  4. one Adam step of phi on d(meta loss)/d phi.
  The look-ahead is written with ``torch.func``: ``functional_call`` swaps theta', theta'' and
  the BatchNorm buffers into the model, ``grad`` gives g (as a function of phi) and
  ``grad_and_value`` differentiates the meta loss through it -- no hand-copied network.
  It runs in fp32 whatever the run's precision.  Its passes are booked to the phase ``"meta"``:
  the look-ahead forward and backward of the B training rows and the meta forward and backward
  of the M meta rows (the second-order pass back through the look-ahead reaches phi through
  the logits and the backward graph, never the features tensor again, so it is not a separate
  sample-pass at the features stage and is not booked; it costs about one more backward over B
  rows).
* **Real step**: forward, characteristics and eps (no grad), estimator update, IADA loss,
  ``ctx.update`` (the trainer's update); then the characteristics 1-6 and the loss are recorded
  for the next epoch's history.

State (checkpointed, resumes bit for bit): the covariance estimator, the perturbation network
and its Adam state, the history buffers and the meta batch order; randomness only from
``ctx.generator`` (network init, meta batch order and augmentation).
"""
from __future__ import annotations

import enum
import math
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value

from ..data import augment_batch
from ..data.transforms import AUGMENTATIONS
from ..registry import METHODS
from .base import Method
from .feature_stats import ClassCovariance
from .iada import ALPHA_RAMPS, AlphaRamp, Shift, enum_arg, iada_logits
from .isda import full_precision, linear_head

#: The 15 characteristics, in the order the perturbation network reads them.
CHARACTERISTICS = (
    "ce_loss", "label_logit", "label_prob", "grad_norm", "prob_margin", "neg_entropy",
    "class_rate", "class_loss_last_epoch",
    "ce_loss_change", "label_logit_change", "label_prob_change", "grad_norm_change",
    "prob_margin_change", "neg_entropy_change",
    "progress",
)
NUM_BASE = 6                  # characteristics 1-6 (and their history, 9-14)
HISTORY_INIT = 1.0            # Meta-CALA: torch.ones([...]) for every *_last buffer
CLASS_LOSS_INIT = 5.0         # CAAT: loss_tensor_last = torch.ones([10]) * 5
CLASS_LOSS_TINY = 1e-6        # CAAT: loss_total / (class_total + 1e-6)


class Output(str, enum.Enum):
    TANH = "tanh"
    CLAMP = "clamp"


class Lookahead(str, enum.Enum):
    OPTIMIZER = "optimizer"
    SGD = "sgd"


class History(str, enum.Enum):
    CLASS = "class"
    SAMPLE = "sample"


# ----------------------------------------------------------------------------- characteristics
def base_characteristics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Characteristics 1-6 ``(B, 6)`` from logits, as Meta-CALA's ``weight_feature`` computes
    them: CE, label logit, label probability, ||onehot - p||, p_y - max_{j != y} p_j,
    sum_j p_j log p_j."""
    logp = logits.log_softmax(dim=1)
    p = logp.exp()
    own = F.one_hot(labels, logits.shape[1]).bool()
    ce = -logp.gather(1, labels[:, None]).squeeze(1)
    label_logit = logits.gather(1, labels[:, None]).squeeze(1)
    label_prob = p.gather(1, labels[:, None]).squeeze(1)
    grad_norm = (own.to(p.dtype) - p).norm(dim=1)
    other_max = torch.where(own, torch.full_like(p, -1.0), p).amax(dim=1)
    margin = label_prob - other_max
    neg_entropy = (p * logp).sum(dim=1)
    return torch.stack([ce, label_logit, label_prob, grad_norm, margin, neg_entropy], dim=1)


def characteristics(logits: torch.Tensor, labels: torch.Tensor, class_rate: torch.Tensor,
                    class_loss_last: torch.Tensor, previous: torch.Tensor,
                    progress: float) -> torch.Tensor:
    """The 15 characteristics ``(B, 15)`` in :data:`CHARACTERISTICS` order; ``previous (B, 6)``
    holds each row's previous-epoch values of characteristics 1-6."""
    base = base_characteristics(logits, labels)
    n = len(labels)
    return torch.cat([base, class_rate[labels][:, None], class_loss_last[labels][:, None],
                      base - previous, torch.full((n, 1), float(progress), dtype=base.dtype,
                                                  device=base.device)], dim=1)


class ClassHistory:
    """``history="class"``: previous value = the class mean of the previous epoch."""

    def __init__(self, num_classes: int, num_samples: int, device) -> None:
        self.last = torch.full((num_classes, NUM_BASE), HISTORY_INIT, device=device)
        self.sum = torch.zeros(num_classes, NUM_BASE, device=device)
        self.count = torch.zeros(num_classes, device=device)

    def previous(self, labels, indices) -> torch.Tensor:
        return self.last[labels]

    def record(self, values, labels, indices) -> None:
        self.sum.index_add_(0, labels, values)
        self.count.index_add_(0, labels, torch.ones_like(labels, dtype=self.count.dtype))

    def roll(self) -> None:
        seen = self.count > 0     # a class unseen in the epoch keeps its value, like a buffer
        self.last[seen] = self.sum[seen] / self.count[seen][:, None]
        self.sum.zero_()
        self.count.zero_()

    def state_dict(self):
        return {"last": self.last, "sum": self.sum, "count": self.count}


class SampleHistory:
    """``history="sample"``: previous value = the same example's value in the previous epoch
    (Meta-CALA's ``*_tensor_last`` / ``*_tensor_current`` buffers, rolled every epoch)."""

    def __init__(self, num_classes: int, num_samples: int, device) -> None:
        self.last = torch.full((num_samples, NUM_BASE), HISTORY_INIT, device=device)
        self.current = torch.full((num_samples, NUM_BASE), HISTORY_INIT, device=device)

    @staticmethod
    def _need(indices):
        if indices is None:
            raise ValueError("method 'meta_iada': history='sample' needs every row's training-set "
                             "index (ctx.indices), which this caller does not pass; use "
                             "history='class'")
        return indices

    def previous(self, labels, indices) -> torch.Tensor:
        return self.last[self._need(indices)]

    def record(self, values, labels, indices) -> None:
        self.current[self._need(indices)] = values

    def roll(self) -> None:
        self.last.copy_(self.current)

    def state_dict(self):
        return {"last": self.last, "current": self.current}


HISTORIES: Dict[History, Callable[..., Any]] = {History.CLASS: ClassHistory,
                                                History.SAMPLE: SampleHistory}


def load_tensors(target: Dict[str, torch.Tensor], saved: Dict[str, torch.Tensor],
                 what: str) -> None:
    for name, mine in target.items():
        theirs = saved[name]
        if tuple(theirs.shape) != tuple(mine.shape):
            raise ValueError(f"meta_iada: saved {what}.{name} has shape {tuple(theirs.shape)}, "
                             f"expected {tuple(mine.shape)}")
        mine.copy_(theirs)


# ----------------------------------------------------------------------------- networks
class PerturbationNet(nn.Module):
    """BN(K) -> Linear(K, h) -> ReLU -> (Linear(h, h) -> ReLU) x (layers - 1) -> Linear(h, 1);
    returns the raw output ``(B,)`` (the output map is applied by the method)."""

    def __init__(self, in_size: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_size)
        blocks = [nn.Linear(in_size, hidden), nn.ReLU()]
        for _ in range(layers - 1):
            blocks += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.hidden = nn.Sequential(*blocks)
        self.out = nn.Linear(hidden, 1)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(self.bn(c))).squeeze(1)


class LogitsAndFeatures(nn.Module):
    """``model.forward_with_features`` as a module, so ``functional_call`` can run it with
    swapped parameters (keys are the model's own, prefixed ``model.``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_with_features(x)


OUTPUT_MAPS: Dict[Output, Callable[[torch.Tensor, float], torch.Tensor]] = {
    Output.TANH: lambda o, m: m * torch.tanh(o),
    Output.CLAMP: lambda o, m: o.clamp(-m, m),
}


# ----------------------------------------------------------------------------- look-ahead rules
def _sqrt_nonneg(v: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not NaN) derivative where v == 0."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(),
                       torch.zeros_like(v))


def sgd_lookahead(param, g, group, state, lr):
    """Meta-CALA ``MetaSGD.meta_step``: torch SGD's update as a differentiable function."""
    if group.get("maximize"):
        raise ValueError("meta_iada: lookahead of an SGD with maximize=True is not supported")
    d = g + group["weight_decay"] * param if group["weight_decay"] else g
    momentum = group["momentum"]
    if momentum:
        buf = state.get("momentum_buffer")
        b = d if buf is None else momentum * buf + (1 - group["dampening"]) * d
        d = d + momentum * b if group["nesterov"] else b
    return param - lr * d


def adam_lookahead(param, g, group, state, lr):
    """torch Adam's update (L2 weight decay, bias corrections, no amsgrad) as a function."""
    if group.get("amsgrad") or group.get("maximize") or group.get("decoupled_weight_decay"):
        raise ValueError("meta_iada: lookahead of Adam supports amsgrad=False, maximize=False, "
                         "decoupled_weight_decay=False only")
    beta1, beta2 = group["betas"]
    d = g + group["weight_decay"] * param if group["weight_decay"] else g
    step = float(state["step"]) + 1 if "step" in state else 1.0
    m = beta1 * state["exp_avg"] + (1 - beta1) * d if "exp_avg" in state else (1 - beta1) * d
    v = (beta2 * state["exp_avg_sq"] + (1 - beta2) * d * d if "exp_avg_sq" in state
         else (1 - beta2) * d * d)
    denom = _sqrt_nonneg(v) / math.sqrt(1 - beta2 ** step) + group["eps"]
    return param - (lr / (1 - beta1 ** step)) * m / denom


#: The ``lookahead="optimizer"`` rule for each optimizer class the trainer can build.
OPTIMIZER_RULES: Dict[type, Callable[..., torch.Tensor]] = {torch.optim.SGD: sgd_lookahead,
                                                            torch.optim.Adam: adam_lookahead}


def lookahead_params(theta: Dict[str, torch.Tensor], grads: Dict[str, torch.Tensor],
                     params: Dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                     lr: float, rule: Lookahead) -> Dict[str, torch.Tensor]:
    """theta'' for every parameter: ``rule="sgd"`` theta - lr g; ``"optimizer"`` the
    optimizer's own update at its current state (``params`` maps names to the real parameters,
    whose optimizer state and param group are read)."""
    if rule is Lookahead.SGD:
        return {n: theta[n] - lr * grads[n] for n in theta}
    fn = OPTIMIZER_RULES.get(type(optimizer))
    if fn is None:
        raise ValueError(f"meta_iada: lookahead='optimizer' supports "
                         f"{[c.__name__ for c in OPTIMIZER_RULES]}; the run uses "
                         f"{type(optimizer).__name__} (use lookahead='sgd')")
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return {n: fn(theta[n], grads[n], group_of[id(params[n])],
                  optimizer.state.get(params[n], {}), group_of[id(params[n])]["lr"])
            for n in theta}


# ----------------------------------------------------------------------------- meta batches
class MetaBatches:
    """Batches of ``batch_size`` from the meta split without replacement, reshuffled (from the
    method's generator) when fewer than a batch remain -- a ``drop_last`` shuffled loader."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, augmentation: str,
                 device) -> None:
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.augmentation, self.device = batch_size, augmentation, device
        self.order = torch.zeros(0, dtype=torch.int64)
        self.position = torch.zeros((), dtype=torch.int64)

    def next(self, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        if int(self.position) + self.batch_size > len(self.order):
            self.order = torch.randperm(len(self.y), generator=generator)
            self.position.zero_()
        start = int(self.position)
        idx = self.order[start:start + self.batch_size].to(self.device)
        self.position += self.batch_size
        x = self.x[idx].float().div_(255)
        return augment_batch(x, self.augmentation, generator), self.y[idx]

    def state_dict(self):
        return {"order": self.order, "position": self.position}

    def load_state_dict(self, state) -> None:
        self.order = state["order"].clone()
        self.position = state["position"].clone()


# ----------------------------------------------------------------------------- the method
@METHODS.register("meta_iada")
class MetaIADA(Method):
    """Meta-IADA; see the module docstring for the step, the options and what is verified."""

    name = "meta_iada"
    paper = ("Zhou et al., Boosting Model Resilience via Implicit Adversarial Data Augmentation, "
             "IJCAI 2024 (arXiv:2404.16307); no public code: reconstruction (ISDA parts verified "
             "against its code; shift term, 15 characteristics, perturbation net and meta step "
             "reconstructed from the author's Meta-CALA/CAAT code)")

    def __init__(self, *, threat, alpha: float = 0.5, beta: float = 1.0, shift: str = "pair",
                 alpha_ramp: str = "linear", output: str = "tanh", eps_max: float = 1.0,
                 hidden: int = 100, layers: int = 1, meta_lr: float = 1e-3,
                 meta_weight_decay: float = 1e-4, meta_interval: int = 20,
                 meta_batch_size: int = 100, meta_augmentation: str = "none",
                 lookahead: str = "optimizer", history: str = "sample",
                 characteristics_grad: bool = False) -> None:
        super().__init__(threat=threat)
        self.alpha, self.beta, self.eps_max = float(alpha), float(beta), float(eps_max)
        self.meta_lr, self.meta_weight_decay = float(meta_lr), float(meta_weight_decay)
        for field, value, least in (("hidden", hidden, 1), ("layers", layers, 1),
                                    ("meta_interval", meta_interval, 1),
                                    ("meta_batch_size", meta_batch_size, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"method 'meta_iada': {field} must be an int >= {least}; "
                                 f"got {value!r}")
        if not self.alpha >= 0 or not self.eps_max > 0:
            raise ValueError(f"method 'meta_iada': alpha must be >= 0 and eps_max > 0; got "
                             f"alpha={alpha!r}, eps_max={eps_max!r}")
        if meta_augmentation not in AUGMENTATIONS:
            raise ValueError(f"method 'meta_iada': meta_augmentation={meta_augmentation!r}; "
                             f"choose one of {list(AUGMENTATIONS)}")
        if not isinstance(characteristics_grad, bool):
            raise ValueError(f"method 'meta_iada': characteristics_grad must be true or false; "
                             f"got {characteristics_grad!r}")
        self.hidden, self.layers = hidden, layers
        self.meta_interval, self.meta_batch_size = meta_interval, meta_batch_size
        self.meta_augmentation = meta_augmentation
        self.characteristics_grad = characteristics_grad
        self.shift = enum_arg(Shift, shift, self.name, "shift")
        self.alpha_ramp = enum_arg(AlphaRamp, alpha_ramp, self.name, "alpha_ramp")
        self.output = enum_arg(Output, output, self.name, "output")
        self.lookahead = enum_arg(Lookahead, lookahead, self.name, "lookahead")
        self.history = enum_arg(History, history, self.name, "history")
        self.ready = False

    # -- setup and state
    def setup(self, model, data, ctx) -> None:
        linear_head(model, self.name)
        if data.meta is None or len(data.meta.y) == 0:
            raise ValueError("method 'meta_iada' needs a meta split: a dataset with long_tail "
                             "(meta_per_class > 0) or label_noise.meta_per_class, or val_size > 0")
        if len(data.meta.y) < self.meta_batch_size:
            raise ValueError(f"method 'meta_iada': meta_batch_size={self.meta_batch_size} is "
                             f"larger than the meta split ({len(data.meta.y)} images)")
        dev = ctx.device
        self.estimator = ClassCovariance(data.num_classes, data.feature_dim, dev)
        counts = data.class_counts.double()
        self.class_rate = (counts / counts.sum()).float().to(dev)
        self.class_loss_last = torch.full((data.num_classes,), CLASS_LOSS_INIT, device=dev)
        self.class_loss_sum = torch.zeros(data.num_classes, device=dev)
        self.class_loss_count = torch.zeros(data.num_classes, device=dev)
        self.records = HISTORIES[self.history](data.num_classes, int(data.class_counts.sum()), dev)
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=ctx.generator))
        with torch.random.fork_rng(devices=[]):   # the init draws leave the global RNG alone
            torch.manual_seed(seed)
            self.pnet = PerturbationNet(len(CHARACTERISTICS), self.hidden, self.layers).to(dev)
        self.pnet.train()
        self.meta_optimizer = torch.optim.Adam(self.pnet.parameters(), lr=self.meta_lr,
                                               weight_decay=self.meta_weight_decay)
        self.meta_batches = MetaBatches(data.meta.x, data.meta.y, self.meta_batch_size,
                                        self.meta_augmentation, dev)
        self.wrapped = LogitsAndFeatures(model)
        self.head_weight = next(n for n, p in model.named_parameters() if p is model.head.weight)
        self.ready = True

    def _history_tensors(self) -> Dict[str, torch.Tensor]:
        return {"class_loss_last": self.class_loss_last, "class_loss_sum": self.class_loss_sum,
                "class_loss_count": self.class_loss_count}

    def state_dict(self) -> Dict[str, Any]:
        if not self.ready:
            return {}
        return {"estimator": self.estimator.state_dict(), "pnet": self.pnet.state_dict(),
                "meta_optimizer": self.meta_optimizer.state_dict(),
                "class_loss": self._history_tensors(), "history": self.records.state_dict(),
                "meta_batches": self.meta_batches.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not self.ready:
            raise RuntimeError("meta_iada: load_state_dict before setup()")
        self.estimator.load_state_dict(state["estimator"])
        self.pnet.load_state_dict(state["pnet"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        load_tensors(self._history_tensors(), state["class_loss"], "class_loss")
        load_tensors(self.records.state_dict(), state["history"], "history")
        self.meta_batches.load_state_dict(state["meta_batches"])

    def start_epoch(self, model, ctx) -> None:
        """Roll the previous epoch's records into the 'last epoch' characteristics (8, 9-14)."""
        if ctx.epoch == 0:
            return
        self.class_loss_last.copy_(self.class_loss_sum / (self.class_loss_count + CLASS_LOSS_TINY))
        self.class_loss_sum.zero_()
        self.class_loss_count.zero_()
        self.records.roll()

    # -- the step
    def epsilon(self, raw: torch.Tensor) -> torch.Tensor:
        return OUTPUT_MAPS[self.output](raw, self.eps_max)

    def _characteristics(self, logits, y, previous, ctx) -> torch.Tensor:
        return characteristics(logits, y, self.class_rate, self.class_loss_last, previous,
                               ctx.epoch / max(1, ctx.epochs))

    def meta_update(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    previous: torch.Tensor, ctx) -> float:
        """One meta step (module docstring, steps 1-4); returns the meta loss.  The model's
        parameters and buffers are left as they were."""
        x_meta, y_meta = self.meta_batches.next(ctx.generator)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        theta = {n: p.detach() for n, p in params.items()}
        frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        phi = {n: p.detach() for n, p in self.pnet.named_parameters()}
        pnet_buffers = {n: b.detach().clone() for n, b in self.pnet.named_buffers()}
        sigma = self.estimator.covariances
        alpha_t = ALPHA_RAMPS[self.alpha_ramp](self.alpha, ctx.epoch, ctx.epochs)
        lr = ctx.lr

        def forward(weights, bufs, inputs):
            named = {f"model.{n}": t for n, t in {**weights, **frozen, **bufs}.items()}
            return functional_call(self.wrapped, named, (inputs,))

        def train_loss(weights, bufs, phi_, pbufs):
            logits, features = forward(weights, bufs, x)
            logits, features = logits.float(), features.float()
            source = logits if self.characteristics_grad else logits.detach()
            c = self._characteristics(source, y, previous, ctx)
            eps = self.epsilon(functional_call(self.pnet, (phi_, pbufs), (c,)))
            aug = iada_logits(logits, features, y, weights[self.head_weight].float(), sigma, eps,
                              alpha=alpha_t, beta=self.beta, shift=self.shift)
            return F.cross_entropy(aug, y)

        def meta_loss(phi_, pbufs, bufs):
            g = grad(train_loss)(theta, bufs, phi_, pbufs)
            ahead = lookahead_params(theta, g, params, ctx.optimizer, lr, self.lookahead)
            logits, _ = forward(ahead, bufs, x_meta)
            return F.cross_entropy(logits.float(), y_meta)

        grads, value = grad_and_value(meta_loss)(phi, pnet_buffers, buffers)
        self.meta_optimizer.zero_grad(set_to_none=True)
        for n, p in self.pnet.named_parameters():
            p.grad = grads[n].detach()
        self.meta_optimizer.step()
        return float(value)

    def step(self, model, x, y, ctx):
        if not self.ready:
            raise RuntimeError("meta_iada: setup() was not called")
        indices = ctx.indices
        previous = self.records.previous(y, indices)
        if (ctx.step_in_epoch + 1) % self.meta_interval == 0:
            with ctx.counter.phase("meta"):
                ctx.stats["meta_loss"] = self.meta_update(model, x, y, previous, ctx)
            ctx.stats["meta_steps"] = 1.0
        alpha_t = ALPHA_RAMPS[self.alpha_ramp](self.alpha, ctx.epoch, ctx.epochs)
        with ctx.autocast():
            logits, features = model.forward_with_features(x)
            logits = logits.float()
            with torch.no_grad(), full_precision(logits.device):
                c = self._characteristics(logits.detach(), y, previous, ctx)
                eps = self.epsilon(self.pnet(c))
            self.estimator.update(features, y)          # before the loss (ISDA order)
            with full_precision(logits.device):
                aug = iada_logits(logits, features.float(), y, model.head.weight.float(),
                                  self.estimator.covariances, eps, alpha=alpha_t,
                                  beta=self.beta, shift=self.shift)
                loss = F.cross_entropy(aug, y)
        ctx.update(loss)
        with torch.no_grad():
            self.records.record(c[:, :NUM_BASE], y, indices)
            self.class_loss_sum.index_add_(0, y, c[:, 0])
            self.class_loss_count.index_add_(0, y, torch.ones_like(c[:, 0]))
        ctx.stats["eps_mean"] = float(eps.mean())
        ctx.stats["eps_abs_mean"] = float(eps.abs().mean())
        ctx.stats["adversarial_fraction"] = float((eps > 0).float().mean())
        ctx.stats["iada_alpha"] = alpha_t
        return loss.detach()
