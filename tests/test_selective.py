"""Selective AT: selection probabilities, PGD on the selected rows only, passes, the BN bug."""
from __future__ import annotations

from functools import partial


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import methods.algorithms.selective as selective_mod
from methods.algorithms.base import StepContext
from methods.algorithms.pgd_at import PGDAT
from methods.algorithms.selective import (SelectiveAT, grad_cosine_scores,
                                          grad_norm_probabilities, margin_probabilities)
from methods.measure.passes import PassCounter, sum_passes
from methods.registry import METHODS
from methods.threat import ThreatModel
from tests.helpers import TinyMLP

EPS = 8 / 255
LINF = ThreatModel("linf", EPS)
SHAPE = (1, 4, 4)


TinyNet = partial(TinyMLP, classes=4)


class ScriptedModel(nn.Module):
    """Returns fixed logits for a batch of B rows (clean forward of the whole batch)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.head = nn.Identity()

    def forward(self, x):
        return self.logits[: x.shape[0]] + 0.0 * x.flatten(1).sum(1, keepdim=True)


def make_ctx(model, epoch=5, step=0, seed=0, steps_per_epoch=10):
    return StepContext(epoch=epoch, step_in_epoch=step, steps_per_epoch=steps_per_epoch,
                       epochs=30, device=torch.device("cpu"), counter=PassCounter(model),
                       generator=torch.Generator().manual_seed(seed))


def batch(B=8, seed=0, classes=4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((B, *SHAPE), generator=g), torch.randint(0, classes, (B,), generator=g)


# ------------------------------------------------------------------------------ probabilities
def test_margin_probabilities_formula():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 2.5], [1.0, 1.0, 0.0], [0.0, 0.0, 9.0]])
    y = torch.tensor([0, 1, 0, 1])
    margins = torch.tensor([2.0, -0.5, 0.0, -9.0])
    w = 1.0 / (margins.abs() + 1e-6)
    assert torch.allclose(margin_probabilities(logits, y), w / w.sum())


def test_margin_sampling_matches_the_probabilities_empirically():
    B = 4
    logits = torch.tensor([[2.0, 0.0], [0.5, 0.0], [1.0, 0.0], [0.0, 0.25]])
    y = torch.tensor([0, 0, 0, 0])
    p = margin_probabilities(logits, y)                   # margins 2, .5, 1, -.25
    method = SelectiveAT(threat=LINF, rho=1 / B)          # k = 1: a single categorical draw
    model = ScriptedModel(logits)
    x = torch.rand(B, *SHAPE)
    assert torch.allclose(method.selection_scores(model, x, y), p)
    ctx = make_ctx(model)
    n = 3000
    counts = torch.zeros(B)
    for _ in range(n):
        counts[method.select(model, x, y, ctx)] += 1
    chi2 = (((counts - n * p) ** 2) / (n * p)).sum()
    assert chi2 < 16.3                                    # chi-square, 3 dof, p = 0.001


def test_grad_norm_against_autograd_of_logits():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    norms = []
    for i in range(6):
        z = logits[i:i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(z, y[i:i + 1]), z)
        norms.append(g.norm() + 1e-6)
    w = torch.stack(norms)
    assert torch.allclose(grad_norm_probabilities(logits, y), w / w.sum(), atol=1e-7)


def test_grad_cosine_against_per_sample_head_weight_gradients():
    torch.manual_seed(0)
    model = TinyNet().eval()
    x, y = batch(8)
    grads = []
    for i in range(8):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        (g,) = torch.autograd.grad(loss, model.head.weight)
        grads.append(g.flatten())
    G = torch.stack(grads)
    expected = F.cosine_similarity(G, G.mean(0, keepdim=True), dim=1)
    with torch.no_grad():
        h = model.forward_features(x)
        got = grad_cosine_scores(h, model.head(h), y)
    assert torch.allclose(got, expected, atol=1e-5)
    method = SelectiveAT(threat=LINF, selection="grad_cosine", rho=0.5, tau=0.0)
    ctx = make_ctx(model)
    idx = method.select(model, x, y, ctx)
    assert set(idx.tolist()) == set(expected.topk(4).indices.tolist())
    assert ctx.stats["selective_cosine_above_tau"] == float((expected > 0).sum())
    strict = SelectiveAT(threat=LINF, selection="grad_cosine", rho=0.5, tau=0.99,
                         fill_to_k=False)
    assert strict.select(model, x, y, make_ctx(model)).numel() == int((expected > 0.99).sum())


def test_warmup_and_random_use_uniform_subsets_without_a_selection_forward():
    model = TinyNet()
    x, y = batch(8)
    for method, epoch in [(SelectiveAT(threat=LINF, warmup_epochs=2), 1),
                          (SelectiveAT(threat=LINF, selection="random"), 50)]:
        ctx = make_ctx(model, epoch=epoch, seed=3)
        idx = method.select(model, x, y, ctx)
        assert torch.equal(idx, torch.randperm(8, generator=torch.Generator().manual_seed(3))[:2])
        assert ctx.counter.totals() == {}
    ctx = make_ctx(model, epoch=2)
    SelectiveAT(threat=LINF, warmup_epochs=2).select(model, x, y, ctx)
    assert ctx.counter.totals()["train"] == {"forward": 8, "backward": 0}  # caller books phase


# ---------------------------------------------------------------------------- the step
def test_pgd_runs_on_selected_rows_only(monkeypatch):
    calls = []
    real = selective_mod.pgd

    def spy(model, x, y, threat, **kw):
        calls.append((x.clone(), y.clone(), kw))
        return real(model, x, y, threat, **kw)

    monkeypatch.setattr(selective_mod, "pgd", spy)
    torch.manual_seed(0)
    model = TinyNet()
    x, y = batch(8)
    method = SelectiveAT(threat=LINF, steps=10, alpha=2 / 255)
    ctx = make_ctx(model, seed=1)
    idx = method.select(model, x, y, make_ctx(model, seed=1))
    method.loss(model, x, y, ctx)
    (xs, ys, kw), = calls
    assert torch.equal(xs, x[idx]) and torch.equal(ys, y[idx])
    assert kw["steps"] == 10 and kw["alpha"] == 2 / 255


def test_loss_is_adversarial_plus_weighted_clean_term():
    torch.manual_seed(0)
    model = TinyNet()
    x, y = batch(8)
    loss = SelectiveAT(threat=LINF, steps=2).loss(model, x, y, make_ctx(model, seed=4))
    ref = SelectiveAT(threat=LINF, steps=2)
    ctx = make_ctx(model, seed=4)
    idx = ref.select(model, x, y, ctx)
    x_adv = selective_mod.pgd(model, x[idx], y[idx], LINF, alpha=0.01, steps=2,
                              generator=ctx.generator)
    expected = F.cross_entropy(model(x_adv), y[idx]) + 0.2 * F.cross_entropy(model(x), y)
    assert torch.allclose(loss, expected)
    no_clean = SelectiveAT(threat=LINF, selection="random", clean_term=False, steps=2)
    ctx = make_ctx(model, seed=4)
    loss = no_clean.loss(model, x, y, ctx)
    assert ctx.counter.totals()["train"]["forward"] == 2          # adversarial subset only


def test_full_pgd_reference_and_skipping_the_zero_clean_term():
    torch.manual_seed(0)
    model = TinyNet()
    x, y = batch(8)
    full = SelectiveAT(threat=LINF, rho=1.0, lambda_clean=0.0, warmup_epochs=2, steps=2)
    ctx = make_ctx(model)
    full.loss(model, x, y, ctx)
    assert ctx.stats["selective_k"] == 8
    assert ctx.counter.totals()["train"]["forward"] == 16         # as coded: clean forward too
    skip = SelectiveAT(threat=LINF, rho=1.0, lambda_clean=0.0, steps=2,
                       skip_zero_clean_term=True)
    ctx = make_ctx(model)
    skip.loss(model, x, y, ctx)
    assert ctx.counter.totals()["train"]["forward"] == 8


def test_pass_counts_and_cost_relative_to_full_pgd10():
    B, steps = 16, 10
    k = 4
    torch.manual_seed(0)
    model = TinyNet(bn=True)
    x, y = batch(B)
    ctx = make_ctx(model)
    model.train()
    SelectiveAT(threat=LINF, steps=steps, alpha=2 / 255).loss(model, x, y, ctx).backward()
    t = ctx.counter.totals()
    assert t["attack"] == {"forward": steps * k, "backward": steps * k}
    assert t["selection"] == {"forward": B, "backward": 0}
    assert t["train"] == {"forward": k + B, "backward": k + B}
    assert model.training
    pgd_ctx = make_ctx(model)
    PGDAT(threat=LINF, steps=steps).loss(model, x, y, pgd_ctx).backward()
    sel, ref = sum_passes(t), sum_passes(pgd_ctx.counter.totals())
    ratio = (sel["forward"] + sel["backward"]) / (ref["forward"] + ref["backward"])
    assert ratio <= 0.40, ratio


# ---------------------------------------------------------------------------- the BN bug
def _bn_modes(model):
    seen = []

    def record(mod, inputs, out):
        seen.append(mod.training)

    model.body[2].register_forward_hook(record)
    return seen


@pytest.mark.parametrize("bug", [False, True])
def test_bn_eval_bug_freezes_running_stats(bug):
    torch.manual_seed(0)
    model = TinyNet(bn=True).train()
    seen = _bn_modes(model)
    x, y = batch(16)
    method = SelectiveAT(threat=LINF, steps=2, warmup_epochs=2, bn_eval_bug=bug)
    before = model.body[2].running_mean.clone()
    ctx = make_ctx(model, epoch=2, step=3)
    method.loss(model, x, y, ctx).backward()
    changed = not torch.equal(before, model.body[2].running_mean)
    assert changed is (not bug)
    assert model.training                                   # returned in train mode
    # selection forward in eval; attack (2 steps), adversarial and clean forwards:
    assert seen == [False] + [bug is False] * 4
    assert ctx.stats["selective_bn_eval_bug"] == float(bug)
    if bug:
        assert ctx.stats["selective_bn_eval_bug_start_step"] == 2 * 10 + 3
        resumed = SelectiveAT(threat=LINF, steps=2, bn_eval_bug=True)
        resumed.load_state_dict(method.state_dict())
        seen.clear()
        resumed.loss(model, x, y, make_ctx(model, epoch=0))  # even in warm-up: stays eval
        assert seen == [False] * 4


def test_bn_eval_bug_during_warmup_and_random_starts_at_first_evaluate():
    torch.manual_seed(0)
    model = TinyNet(bn=True, dropout=0.5).train()
    x, y = batch(16)
    warm = SelectiveAT(threat=LINF, steps=1, warmup_epochs=20, bn_eval_bug=True)
    ctx = make_ctx(model, epoch=19)
    warm.loss(model, x, y, ctx)
    assert ctx.stats["selective_bn_eval_bug"] == 0.0
    rnd = SelectiveAT(threat=LINF, selection="random", steps=1, bn_eval_bug=True)
    ctx = make_ctx(model, epoch=20, step=4)
    before = model.body[2].running_mean.clone()
    torch.manual_seed(1)
    loss = rnd.loss(model, x, y, ctx)
    assert ctx.stats["selective_bn_eval_bug_start_step"] == 200
    assert torch.equal(before, model.body[2].running_mean)
    # dropout is off in the training forward too: the loss is reproducible under any seed.
    torch.manual_seed(2)
    again = SelectiveAT(threat=LINF, selection="random", steps=1, bn_eval_bug=True)
    assert torch.allclose(again.loss(model, x, y, make_ctx(model, epoch=20, step=4)), loss)


def test_registered_with_mnist_defaults():
    d = METHODS.get("selective")(threat=ThreatModel("linf", 0.3)).describe()
    assert (d["selection"], d["rho"], d["lambda_clean"], d["warmup_epochs"]) == \
        ("margin", 0.25, 0.2, 2)
    assert (d["steps"], d["alpha"], d["clean_term"], d["bn_eval_bug"]) == (40, 0.01, True, False)
    with pytest.raises(ValueError, match="selection"):
        SelectiveAT(threat=LINF, selection="gradient")
