"""The online class-conditional feature covariance of ISDA (the building block of ISDA and IADA).

Official code: blackfeather-wang/ISDA-for-Deep-Networks @b66a594, ``Image classification on
CIFAR/ISDA.py``, ``EstimatorCV.update_CV`` (L12-76).  State per class c: the mean ``mu_c``
(``Ave``), the covariance ``Sigma_c`` (``CoVariance``) and the count ``N_c`` (``Amount``), all
zero at the start and never reset or decayed.  For every training batch, with the ``n_c``
(detached) features of class c in it::

    mu_hat    = mean of the batch features of class c
    Sigma_hat = (1 / n_c) sum_i (a_i - mu_hat)(a_i - mu_hat)^T          # biased (divides by n_c)
    w         = n_c / (n_c + N_c)                                        # 0 for an absent class
    Sigma_c  <- (1 - w) Sigma_c + w Sigma_hat + w (1 - w) (mu_c - mu_hat)(mu_c - mu_hat)^T
    mu_c     <- (1 - w) mu_c + w mu_hat
    N_c      <- N_c + n_c

This is the exact pooled mean and covariance of every feature of class c seen so far, with the
*population* normalisation (divide by N_c, not N_c - 1), i.e. ``torch.cov(A_c.T, correction=0)``
of the concatenation ``A_c`` of all of them (``tests/test_iada.py`` checks this on batches of
unequal class mix with classes missing from some batches).  A class absent from a batch has
``w = 0`` and is left unchanged (the code's ``weight_CV[weight_CV != weight_CV] = 0`` handles
the 0/0 of a class never seen).

Arithmetic is fp32 whatever the run's precision (features are cast and autocast is off inside
the update), as in the code.  Departures
that change no number: only the classes present in the batch are computed (the code expands every
batch to ``N x C x D`` and runs a ``C x D x N`` by ``C x N x D`` bmm over all C classes), and the
counts are int64 (the code's are fp32, identical below 2**24 examples per class); ``w`` is
computed in fp32 from them exactly as the code does.

Size: ``C * D * D`` fp32 for the covariances (plus ``C * D`` and ``C``): 163,840,000 bytes
(156.25 MiB) for CIFAR-100 on WRN-28-10 (C = 100, D = 640); 1,638,400 bytes for CIFAR-100 on
ResNet-32 (D = 64).  It is method state: the trainer writes it once per epoch inside
``state.pt`` and nowhere else.
"""
from __future__ import annotations

from typing import Dict

import torch


class ClassCovariance:
    """ISDA's ``EstimatorCV``: exact online per-class mean, covariance (divide by N) and count."""

    def __init__(self, num_classes: int, feature_dim: int,
                 device: torch.device | str = "cpu") -> None:
        if num_classes < 1 or feature_dim < 1:
            raise ValueError(f"ClassCovariance: num_classes and feature_dim must be >= 1; got "
                             f"{num_classes}, {feature_dim}")
        self.num_classes, self.feature_dim = int(num_classes), int(feature_dim)
        self.means = torch.zeros(num_classes, feature_dim, device=device)
        self.covariances = torch.zeros(num_classes, feature_dim, feature_dim, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Fold one batch of features ``(B, D)`` with labels ``(B,)`` into the estimate."""
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"ClassCovariance.update: features must be (B, {self.feature_dim}); "
                             f"got {tuple(features.shape)}")
        a = features.detach().float()
        labels = labels.to(a.device)
        with torch.autocast(device_type=a.device.type, enabled=False):   # fp32 under AMP too
            self._fold(a, labels)

    def _fold(self, a: torch.Tensor, labels: torch.Tensor) -> None:
        classes, inverse, n = torch.unique(labels, return_inverse=True, return_counts=True)
        n_f = n.float()
        onehot = torch.nn.functional.one_hot(inverse, len(classes)).float()      # (B, P)
        mu_hat = (onehot.t() @ a) / n_f[:, None]                                  # (P, D)
        centred = a - mu_hat[inverse]                                             # (B, D)
        masked = onehot.t()[:, :, None] * centred[None]                           # (P, B, D)
        sigma_hat = masked.transpose(1, 2) @ centred[None] / n_f[:, None, None]   # (P, D, D)
        seen = self.counts[classes]
        w = n_f / (n + seen).float()                                              # (P,)
        diff = self.means[classes] - mu_hat
        w2 = w[:, None, None]
        self.covariances[classes] = ((1 - w2) * self.covariances[classes] + w2 * sigma_hat
                                     + w2 * (1 - w2) * diff[:, :, None] * diff[:, None, :])
        self.means[classes] = (1 - w[:, None]) * self.means[classes] + w[:, None] * mu_hat
        self.counts[classes] = seen + n

    def nbytes(self) -> int:
        """Bytes of the state (what ``state_dict`` holds)."""
        tensors = (self.means, self.covariances, self.counts)
        return sum(t.numel() * t.element_size() for t in tensors)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"means": self.means, "covariances": self.covariances, "counts": self.counts}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        for name in ("means", "covariances", "counts"):
            mine = getattr(self, name)
            theirs = state[name]
            if tuple(theirs.shape) != tuple(mine.shape):
                raise ValueError(f"ClassCovariance: saved {name} has shape {tuple(theirs.shape)}, "
                                 f"this estimator {tuple(mine.shape)} (another dataset or model?)")
            mine.copy_(theirs)
