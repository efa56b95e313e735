"""Selective Adversarial Training, "Scaling Adversarial Training via Data Selection",
arXiv:2512.22069; official code youranye/Selective-Adversarial-Training @0fe5c8a2
(``PGD_chosen_0.25dataset.py``, ``PGD_grad_match_0.25dataset.py``, ``PGD_random_025dataset.py``,
``margin_based_cifar_10/PGD_{chosen_0.25,random_0.25,full}cifar.py``).

Per step (spec sections 5.2-5.5), for a batch of B samples and k = int(rho * B):

1. Select k rows (``selection``):
   ``'margin'`` (``PGD_chosen_0.25dataset.py`` L51-73, L109-115): during warm-up
   (``ctx.epoch < warmup_epochs``) ``randperm(B)[:k]``; afterwards a no-grad eval-mode forward,
   margin = z_y - max_{c != y} z_c, w = 1 / (|margin| + 1e-6), p = w / sum(w),
   ``multinomial(p, k, replacement=False)``.
   ``'grad_norm'``, gradient matching AS CODED (``PGD_grad_match_0.25dataset.py`` L54-79,
   L115-121): same warm-up; p proportional to ||softmax(z) - onehot(y)||_2 + 1e-6, with the
   forward in the model's current (train) mode, as coded; multinomial without replacement.
   ``'grad_cosine'``, gradient matching AS THE PAPER DESCRIBES IT (spec 5.3, [ASSUMPTION]): the
   exact per-sample gradient of the head weights g_i = vec((p_i - e_{y_i}) h_i^T), with
   h = ``model.forward_features(x)``, its cosine s_i to the batch mean gradient, and the rows with
   s_i > ``tau`` kept, the top-k by s_i if more than k pass, filled up to k with the next-highest
   s_i if fewer pass (so with ``fill_to_k`` the set is the top-k and ``tau`` only changes the
   reported count).  Same warm-up; eval-mode no-grad forward, like the margin rule.
   ``'random'`` (``PGD_random_025dataset.py`` L72-75; CIFAR ``PGD_random_0.25cifar.py``
   L102-103): ``randperm(B)[:k]`` at every step, no warm-up.
2. PGD on the selected rows only (uniform random start in the eps-ball, ``steps`` sign steps of
   ``alpha``, projection and [0, 1] clamp after each step; ``pgd_attack`` L31-45), in
   ``attack_mode`` (train, as the code runs it before the BN bug).
3. ``loss = CE(model(x_adv), y[idx]) + lambda_clean * CE(model(x), y)``, both mean-reduced, the
   clean term on the full batch and computed after the adversarial forward (L128-134).
   ``clean_term=False`` is the MNIST random baseline (loss on the adversarial subset only).

Full-PGD reference: ``rho=1.0, lambda_clean=0.0`` with ``warmup_epochs=2`` is
``PGD_full_cifar.py`` (its "selection" is a multinomial draw of all B rows, i.e. the whole
batch); the code still runs the zero-weighted clean forward (which updates BN statistics in
train mode), and so do we unless ``skip_zero_clean_term=True``.  The MNIST full reference
(``PGD_full_datasets.py``) is plain PGD-AT: use ``pgd_at``.

``bn_eval_bug`` (spec 5.8): the CIFAR scripts' ``compute_margin`` and ``evaluate`` call
``model.eval()`` and never restore train mode, so from the first eval-mode selection forward
(margin; also grad_cosine here) or the first ``evaluate`` (after every ``eval_every_epochs``-th
epoch) on, the model trains in eval mode: the attack, the adversarial and the clean forwards use
BN running statistics (never updated again) and no dropout.  With the flag on we run the whole
step in eval mode from then on (the trainer's ``model.train()`` around steps cannot undo it) and
report ``selective_bn_eval_bug`` and the global step it started at in ``ctx.stats``.
With the flag off (default) the model is put back in train mode after every selection forward.

Departures: randomness comes from ``ctx.generator`` (the code uses torch's global RNG); if
k == 0 (a batch smaller than 1 / rho) the adversarial term is dropped (the code would take the
mean of an empty CE, NaN) and the step returns ``None`` when there is no clean term either.
"""
from __future__ import annotations

import enum
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from ..attacks import pgd
from ..registry import METHODS
from .base import Method, ModelMode, attack_mode

MARGIN_EPS = 1e-6        # margin_to_prob(eps=1e-6)
GRAD_NORM_EPS = 1e-6     # gradrep_to_prob(eps=1e-6)
COSINE_DELTA = 1e-12     # the paper's delta in cos = <g, g_full> / (|g| |g_full| + delta)


class SelectionRule(str, enum.Enum):
    MARGIN = "margin"
    GRAD_NORM = "grad_norm"
    GRAD_COSINE = "grad_cosine"
    RANDOM = "random"


def margin_probabilities(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """p_i proportional to 1 / (|z_y - max_{c != y} z_c| + 1e-6) (``compute_margin``)."""
    rows = torch.arange(len(y), device=logits.device)
    correct = logits[rows, y]
    others = logits.clone()
    others[rows, y] = -float("inf")
    margin = correct - others.amax(dim=1)
    w = 1.0 / (margin.abs() + MARGIN_EPS)
    return w / w.sum()


def logit_gradients(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dCE/dlogits per sample: softmax(z) - onehot(y), shape (B, C)."""
    g = F.softmax(logits, dim=1)
    return g - F.one_hot(y, logits.shape[1]).to(g.dtype)


def grad_norm_probabilities(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """p_i proportional to ||softmax(z_i) - onehot(y_i)||_2 + 1e-6 (``gradrep_to_prob``)."""
    w = logit_gradients(logits, y).norm(p=2, dim=1) + GRAD_NORM_EPS
    return w / w.sum()


def grad_cosine_scores(features: torch.Tensor, logits: torch.Tensor,
                       y: torch.Tensor) -> torch.Tensor:
    """cos(g_i, mean_j g_j), shape (B,), where g_i = vec((p_i - e_{y_i}) h_i^T) is sample i's
    gradient of CE w.r.t. the head weights (closed form; the head bias is not included)."""
    G = logit_gradients(logits, y).double()                 # (B, C)
    H = features.flatten(1).double()                        # (B, D)
    g_mean = G.t() @ H / G.shape[0]                         # (C, D) = mean_i G_i h_i^T
    dots = ((G @ g_mean) * H).sum(dim=1)                    # <g_i, g_mean>
    norms = G.norm(dim=1) * H.norm(dim=1) * g_mean.norm()
    return (dots / (norms + COSINE_DELTA)).to(features.dtype)


@METHODS.register("selective")
class SelectiveAT(Method):
    """Selective adversarial training; see the module docstring for the exact step.

    Defaults are the MNIST scripts' (rho 0.25, lambda 0.2, warm-up 2, PGD-40 x 0.01); the CIFAR
    recipes set ``warmup_epochs=20, steps=10, alpha=2/255`` (and ``bn_eval_bug`` for the faithful
    run).  ``alpha`` is absolute, in [0, 1] pixel units.
    """

    name = "selective"
    paper = "Scaling Adversarial Training via Data Selection. arXiv:2512.22069"

    def __init__(self, *, threat, selection: str = "margin", rho: float = 0.25,
                 lambda_clean: float = 0.2, warmup_epochs: int = 2, steps: int = 40,
                 alpha: float = 0.01, clean_term: bool = True, tau: float = 0.0,
                 fill_to_k: bool = True, attack_mode: str = "train",
                 bn_eval_bug: bool = False, eval_every_epochs: int = 20,
                 skip_zero_clean_term: bool = False) -> None:
        super().__init__(threat=threat)
        try:
            self.selection = SelectionRule(selection)
        except ValueError:
            allowed = ", ".join(repr(r.value) for r in SelectionRule)
            raise ValueError(f"selective: selection must be one of {allowed}, "
                             f"got {selection!r}") from None
        if not 0.0 < float(rho) <= 1.0:
            raise ValueError(f"selective: rho must be in (0, 1], got {rho!r}")
        try:
            self.attack_mode = ModelMode(attack_mode)
        except ValueError:
            raise ValueError(f"selective: attack_mode must be 'train' or 'eval', "
                             f"got {attack_mode!r}") from None
        if int(steps) < 0 or int(eval_every_epochs) < 1:
            raise ValueError(f"selective: steps must be >= 0 and eval_every_epochs >= 1, "
                             f"got {steps!r}, {eval_every_epochs!r}")
        self.rho = float(rho)
        self.lambda_clean = float(lambda_clean)
        self.warmup_epochs = int(warmup_epochs)
        self.steps = int(steps)
        self.alpha = float(alpha)
        self.clean_term = bool(clean_term)
        self.tau = float(tau)
        self.fill_to_k = bool(fill_to_k)
        self.bn_eval_bug = bool(bn_eval_bug)
        self.eval_every_epochs = int(eval_every_epochs)
        self.skip_zero_clean_term = bool(skip_zero_clean_term)
        self._bug_start: Optional[int] = None   # global step at which eval-mode training began

    # ----------------------------------------------------------------------------- selection
    def num_selected(self, batch_size: int) -> int:
        return int(batch_size * self.rho)

    def _in_warmup(self, ctx) -> bool:
        return self.selection is SelectionRule.RANDOM or ctx.epoch < self.warmup_epochs

    def _selection_mode(self, model) -> ModelMode:
        if self._bug_start is not None:
            return ModelMode.EVAL
        if self.selection is SelectionRule.GRAD_NORM:   # as coded: the current (train) mode
            return ModelMode.TRAIN if model.training else ModelMode.EVAL
        return ModelMode.EVAL

    def selection_scores(self, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """After warm-up: the sampling probabilities (margin, grad_norm) or the cosine scores
        (grad_cosine) of the B rows, from one no-grad forward in the rule's mode."""
        with attack_mode(model, self._selection_mode(model)), torch.no_grad():
            if self.selection is SelectionRule.GRAD_COSINE:
                h = model.forward_features(x)
                return grad_cosine_scores(h, model.head(h), y)
            logits = model(x)
        if self.selection is SelectionRule.MARGIN:
            return margin_probabilities(logits, y)
        return grad_norm_probabilities(logits, y)

    def select(self, model, x: torch.Tensor, y: torch.Tensor, ctx) -> torch.Tensor:
        """Indices (into the batch) of the rows to perturb."""
        B, k = x.shape[0], self.num_selected(x.shape[0])
        if self._in_warmup(ctx):
            return torch.randperm(B, generator=ctx.generator)[:k].to(x.device)
        leaves_eval = self._selection_mode(model) is ModelMode.EVAL
        scores = self.selection_scores(model, x, y)
        if self.bn_eval_bug and self._bug_start is None and leaves_eval:
            self._bug_start = ctx.global_step   # compute_margin left the model in eval mode
        if self.selection is SelectionRule.GRAD_COSINE:
            order = torch.argsort(scores, descending=True, stable=True)
            passed = int((scores > self.tau).sum())
            ctx.stats["selective_cosine_above_tau"] = float(passed)
            return order[:k if self.fill_to_k else min(k, passed)]
        if k == 0:
            return torch.zeros(0, dtype=torch.long, device=x.device)
        idx = torch.multinomial(scores.detach().cpu().double(), k, replacement=False,
                                generator=ctx.generator)
        return idx.to(x.device)

    # ----------------------------------------------------------------------------- step
    def loss(self, model, x, y, ctx):
        if (self.bn_eval_bug and self._bug_start is None
                and ctx.epoch >= self.eval_every_epochs):
            # evaluate() after epoch eval_every_epochs - 1 left the model in eval mode.
            self._bug_start = ctx.epoch * ctx.steps_per_epoch
        with ctx.counter.phase("selection"):
            idx = self.select(model, x, y, ctx)
        buggy = self._bug_start is not None
        train_mode = ModelMode.EVAL if buggy else ModelMode.TRAIN
        x_sel, y_sel = x[idx], y[idx]
        terms = []
        if idx.numel() > 0:
            with attack_mode(model, ModelMode.EVAL if buggy else self.attack_mode), \
                    ctx.counter.phase("attack"):
                x_adv = pgd(model, x_sel, y_sel, self.threat, alpha=self.alpha,
                            steps=self.steps, generator=ctx.generator)
        with attack_mode(model, train_mode):
            if idx.numel() > 0:
                terms.append(F.cross_entropy(model(x_adv), y_sel))
            if self.clean_term and not (self.skip_zero_clean_term and self.lambda_clean == 0):
                terms.append(self.lambda_clean * F.cross_entropy(model(x), y))
        ctx.stats["selective_k"] = float(idx.numel())
        ctx.stats["selective_bn_eval_bug"] = float(buggy)
        if buggy:
            ctx.stats["selective_bn_eval_bug_start_step"] = float(self._bug_start)
        if not terms:
            return None
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    # ----------------------------------------------------------------------------- resume
    def state_dict(self) -> Dict[str, Any]:
        return {"bn_eval_bug_start": self._bug_start}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._bug_start = state.get("bn_eval_bug_start")
