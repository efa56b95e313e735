"""Small torch functions the evaluation calls for the long-tail, noisy-label and subpopulation metrics.

They turn one pass of predictions into the counts :mod:`methods.lt_metrics` reads back from the
evaluation files (which never need the model again):

* :func:`clean_predictions` -- predicted classes and softmax probabilities in one no-grad pass
  (the prediction is the argmax of the logits, exactly as :func:`methods.eval_core.predict`);
* :func:`group_counts` -- per-group ``correct`` / ``total`` of any correctness flags (clean or
  robust), for worst-group accuracy;
* :func:`calibration_histogram` -- the reliability histogram expected calibration error is
  computed from: ``bins`` equal-width confidence bins ``(lower, upper]`` over [0, 1] (Guo et al.,
  *On Calibration of Modern Neural Networks*, ICML 2017, ``_ECELoss``: 15 bins, ``conf > lower``
  and ``conf <= upper``), each with its count, its number of correct predictions and its sum of
  confidences, so ECE = sum_b |correct_b - confidence_sum_b| / N exactly.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

CALIBRATION_BINS = 15
BINNING = "equal-width (lower, upper] bins over [0, 1] (Guo et al. 2017); confidence = max softmax probability"


@torch.no_grad()
def clean_predictions(model: nn.Module, x: torch.Tensor, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(pred, probs)``: argmax of the logits (int64, ``(N,)``) and the float32 softmax (``N x C``)."""
    preds, probs = [], []
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size]).float()
        preds.append(logits.argmax(1))
        probs.append(logits.softmax(1))
    if not preds:
        return torch.zeros(0, dtype=torch.int64, device=x.device), torch.zeros(0, 0, device=x.device)
    return torch.cat(preds), torch.cat(probs)


def group_counts(pred_correct: torch.Tensor, groups: torch.Tensor, num_groups: int) -> Dict[str, list]:
    """``{"correct": [...], "total": [...]}`` indexed by group id (``num_groups`` entries each):
    how many examples of each group were counted correct, and how many there were."""
    ok = pred_correct.detach().cpu().bool()
    g = groups.detach().cpu().long()
    if ok.shape != g.shape:
        raise ValueError(f"group_counts: {tuple(ok.shape)} flags for {tuple(g.shape)} group ids")
    if len(g) and (int(g.min()) < 0 or int(g.max()) >= num_groups):
        raise ValueError(f"group_counts: group ids outside 0..{num_groups - 1}")
    return {"correct": torch.bincount(g[ok], minlength=num_groups).tolist(),
            "total": torch.bincount(g, minlength=num_groups).tolist()}


def calibration_histogram(probs: torch.Tensor, y: torch.Tensor, bins: int = CALIBRATION_BINS,
                          pred: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """Reliability histogram of softmax outputs ``probs`` (``N x C``) against labels ``y``.

    Confidence = max probability; correct = ``pred == y`` with ``pred`` the argmax of ``probs``
    unless given (pass the logits' argmax so the counts agree with the accuracy exactly).  Bin b
    holds ``edges[b] < confidence <= edges[b+1]`` (bin 0 also holds 0), edges in float32 like
    Guo et al.'s ``torch.linspace(0, 1, bins + 1)``.  Returns ``bins``, ``binning``, ``count``,
    ``correct`` and ``confidence_sum`` (float64 sums) per bin.
    """
    if bins < 1:
        raise ValueError(f"calibration_histogram: bins must be >= 1, got {bins}")
    probs = probs.detach().float().cpu()
    y = y.detach().cpu().long()
    conf, arg = probs.max(1) if len(probs) else (torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    pred = arg if pred is None else pred.detach().cpu().long()
    edges = torch.linspace(0, 1, bins + 1)
    idx = torch.bucketize(conf, edges[1:-1], right=False)          # edges[b] < conf <= edges[b+1]
    correct = (pred == y)
    return {"bins": bins, "binning": BINNING,
            "count": torch.bincount(idx, minlength=bins).tolist(),
            "correct": torch.bincount(idx[correct], minlength=bins).tolist(),
            "confidence_sum": torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, conf.double()).tolist()}


def evaluated_groups(groups: Optional[torch.Tensor], idx: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The group ids of the evaluated test examples (``idx``: the evaluation subset, or ``None``
    for the whole split), or ``None`` for datasets without groups."""
    if groups is None:
        return None
    return groups if idx is None else groups[idx.detach().cpu()]
