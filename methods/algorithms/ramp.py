"""The linear epsilon warm-up ("ramp") of N-FGSM's SVHN recipe, shared by N-FGSM, FGSM-RS and PGD.

Official code: pdejorge/N-FGSM @0a9e4f0, ``train.py`` L149-156, L195, L206-211 and L250 (spec
section 3.1, "SVHN eps warm-up")::

    n_warmup_iterations = 5 * len(train_loader)
    ...                                        # per iteration, before the attack;
    epsilon = epsilon_global * min(iter_count / n_warmup_iterations, 1)   # iter_count = 0, 1, ...
    alpha   = alpha_global   * min(iter_count / n_warmup_iterations, 1)
    clip    = clip_global    * min(iter_count / n_warmup_iterations, 1)   # FGSM-RS (--clip 1)

so the factor is ``global_step / (E * S)``: exactly 0 at the first step (the first batch is
trained on clean inputs), ``1/2`` half-way, and 1 from step ``E * S`` on, where ``S`` is the
number of batches per epoch (``len(train_loader)``).  The ramp is on for every SVHN run of that
script, whatever ``--unif`` / ``--clip`` select (N-FGSM, and FGSM-RS as ``--unif 1 --clip 1``).
What each method scales by the factor is stated in its own docstring.
"""
from __future__ import annotations

from .base import StepContext


def eps_ramp(ctx: StepContext, ramp_epochs: float) -> float:
    """The factor in [0, 1] applied to eps this step; 1 when ``ramp_epochs <= 0`` (ramp off)."""
    if ramp_epochs <= 0:
        return 1.0
    return min(1.0, ctx.global_step / (ramp_epochs * ctx.steps_per_epoch))
