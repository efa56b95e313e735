"""ISDA: Implicit Semantic Data Augmentation (Wang et al., NeurIPS 2019, arXiv:1909.12220; the
journal version is TPAMI 2021).  The building block of IADA (``iada.py``, ``meta_iada.py``) and
a baseline of the IADA paper.

Official code: blackfeather-wang/ISDA-for-Deep-Networks @b66a594, ``Image classification on
CIFAR/ISDA.py`` (``EstimatorCV`` L5-76, ``ISDALoss.isda_aug`` L90-125, ``ISDALoss.forward``
L127-139) and ``train.py`` (ratio L432, configurations L108-198).  Every part is **verified**
against that code:

* features ``a = model.forward_features(x)`` and logits ``z = head(a) = W a + b``;
* the class-conditional covariance estimator (:class:`~.feature_stats.ClassCovariance`,
  ``EstimatorCV``) is updated with this batch's detached features **before** the loss;
* augmented logits, the closed form of the expected CE over ``a~ ~ N(a, lambda Sigma_y)``
  after Jensen's inequality::

      z~_ij = z_ij + (lambda / 2) (w_j - w_{y_i})^T Sigma_{y_i} (w_j - w_{y_i})     (0 at j = y_i)

  with ``Sigma`` detached (gradients reach W through the quadratic term and the backbone
  through z), and the loss is the mean cross-entropy of ``z~``;
* ``lambda = lambda0 * epoch / epochs`` (0-based epoch, so 0 in the first epoch), lambda0 = 0.5;
* the estimator, the augmented logits and their CE are fp32 under AMP too (the code has no AMP).

The quadratic term is computed per class present in the batch (``(P, C, D)`` tensors) instead of
the code's ``cv_matrix[labels]`` (``(B, D, D)``: 210 MB for WRN-28-10 at batch 128); same
numbers.  The head must be a plain ``nn.Linear`` (logits linear in the features): a cosine head
such as ResNet-32's ``normed_head`` is refused in :meth:`setup`.

State (:meth:`state_dict`): the estimator's means ``(C, D)``, covariances ``(C, D, D)`` and
counts ``(C,)``, fp32 -- 156.25 MiB for CIFAR-100 on WRN-28-10 (100 x 640 x 640 x 4 bytes),
written by the trainer once per epoch in ``state.pt`` and nowhere else.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import METHODS
from .base import Method
from .feature_stats import ClassCovariance


def linear_head(model: nn.Module, method: str) -> nn.Linear:
    """``model.head`` if its logits are linear in the features (exactly ``nn.Linear``); else a
    ``ValueError`` naming the method and the head (subclasses such as ``NormedLinear``, whose
    logits are cosines, are refused)."""
    head = getattr(model, "head", None)
    if type(head) is not nn.Linear:
        raise ValueError(
            f"method {method!r}: the closed-form ISDA/IADA logits need a head whose logits are "
            f"linear in the features (a plain nn.Linear, z = W a + b); this model's head is "
            f"{type(head).__name__} (e.g. resnet32 with normed_head: true, LDAM's cosine "
            f"classifier); use a linear head (normed_head: false)")
    return head


def class_blocks(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(classes, inverse)``: the sorted classes present in ``labels`` and each row's position
    among them."""
    classes, inverse = torch.unique(labels, return_inverse=True)
    return classes, inverse


def weight_differences(weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``dW[p, j] = w_j - w_{classes[p]}``, shape ``(P, C, D)``."""
    return weight.unsqueeze(0) - weight[classes].unsqueeze(1)


def covariance_term(weight: torch.Tensor, covariances: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """``(w_j - w_{y_i})^T Sigma_{y_i} (w_j - w_{y_i})`` for every row i and class j, ``(B, C)``
    (exactly 0 at j = y_i).  ``covariances`` is used as given (pass it detached)."""
    classes, inverse = class_blocks(labels)
    dw = weight_differences(weight, classes)                                  # (P, C, D)
    quad = ((dw @ covariances[classes].to(dw.dtype)) * dw).sum(-1)            # (P, C)
    return quad[inverse]


def isda_logits(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                covariances: torch.Tensor, ratio: float) -> torch.Tensor:
    """ISDA's augmented logits ``z + (ratio / 2) * covariance_term`` (``isda_aug``)."""
    return logits + 0.5 * ratio * covariance_term(weight, covariances, labels)


def full_precision(device: torch.device):
    """Autocast off: the augmented logits and their CE are computed in fp32 under AMP too (the
    official code has no AMP; its quadratic term is fp32)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def linear_ramp(weight: float, epoch: int, epochs: int) -> float:
    """ISDA's ``ratio = lambda_0 * (epoch / epochs)`` (``train.py`` L432)."""
    return float(weight) * epoch / max(1, epochs)


@METHODS.register("isda")
class ISDA(Method):
    """Implicit semantic data augmentation; see the module docstring (all verified)."""

    name = "isda"
    paper = ("Wang et al., Implicit Semantic Data Augmentation for Deep Networks, NeurIPS 2019 "
             "(arXiv:1909.12220); blackfeather-wang/ISDA-for-Deep-Networks @b66a594")

    def __init__(self, *, threat, lambda0: float = 0.5) -> None:
        super().__init__(threat=threat)
        if not float(lambda0) >= 0:
            raise ValueError(f"isda: lambda0 must be >= 0; got {lambda0!r}")
        self.lambda0 = float(lambda0)
        self.estimator: ClassCovariance | None = None

    def setup(self, model, data, ctx) -> None:
        linear_head(model, self.name)
        self.estimator = ClassCovariance(data.num_classes, data.feature_dim, ctx.device)

    def loss(self, model, x, y, ctx):
        if self.estimator is None:
            raise RuntimeError("isda: setup() was not called (the estimator is built there)")
        logits, features = model.forward_with_features(x)
        self.estimator.update(features, y)               # before the loss, as ISDALoss.forward
        ratio = linear_ramp(self.lambda0, ctx.epoch, ctx.epochs)
        with full_precision(logits.device):
            aug = isda_logits(logits.float(), y, model.head.weight.float(),
                              self.estimator.covariances, ratio)
            loss = F.cross_entropy(aug, y)
        ctx.stats["isda_lambda"] = ratio
        return loss

    def state_dict(self) -> Dict[str, Any]:
        return {"estimator": self.estimator.state_dict() if self.estimator is not None else None}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.estimator is None:
            raise RuntimeError("isda: load_state_dict before setup()")
        self.estimator.load_state_dict(state["estimator"])
