"""Batch-in-Batch: tLHS, the batched attack, the selection rules, N-FGSM equivalence, passes."""
from __future__ import annotations

from functools import partial

import copy
import math

import pytest
import torch
from torch import nn

from methods.algorithms.base import StepContext
from methods.algorithms.bb import BatchInBatch
from methods.algorithms.nfgsm import NFGSM
from methods.algorithms.selection import RadiusRule, select_cp
from methods.algorithms.tlhs import MIDDLE_LEVEL, tlhs_levels, tlhs_pattern
from methods.measure.passes import PassCounter
from methods.registry import METHODS
from methods.threat import ThreatModel
from tests.helpers import TinyMLP

EPS = 8 / 255
LINF = ThreatModel("linf", EPS)
SHAPE = (1, 4, 4)


TinyNet = partial(TinyMLP, classes=3)


class ScriptedModel(nn.Module):
    """Returns scripted logits for the next forwards (in order); differentiable in x."""

    def __init__(self, *scripts: torch.Tensor) -> None:
        super().__init__()
        self.scripts = list(scripts)
        self.calls = []
        self.head = nn.Linear(1, 1)

    def forward(self, x):
        self.calls.append(x.shape[0])
        logits = self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]
        assert logits.shape[0] == x.shape[0]
        return logits + 0.0 * x.flatten(1).sum(1, keepdim=True)


def make_ctx(model, epoch=0, step=0, seed=0, steps_per_epoch=10):
    return StepContext(epoch=epoch, step_in_epoch=step, steps_per_epoch=steps_per_epoch,
                       epochs=3, device=torch.device("cpu"), counter=PassCounter(model),
                       generator=torch.Generator().manual_seed(seed))


def batch(B=4, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = 0.25 + 0.5 * torch.rand((B, *SHAPE), generator=g)   # away from 0 and 1: no clamping
    y = torch.randint(0, classes, (B,), generator=g)
    return x, y


def onehot_logits(pred, classes=3):
    return 5.0 * torch.nn.functional.one_hot(pred, classes).float()


# ------------------------------------------------------------------------------------- tLHS
@pytest.mark.parametrize("m", [2, 3, 4, 5, 8])
def test_tlhs_levels_formula(m):
    r = 2 * EPS
    levels = tlhs_levels(m, r)
    expected = torch.tensor([-r + i * 2 * r / (m + 1) for i in range(1, m + 1)],
                            dtype=torch.float64)
    if m % 2:
        expected[(m - 1) // 2] = 1e-4
        assert levels[(m - 1) // 2].item() == MIDDLE_LEVEL == 1e-4
    assert torch.allclose(levels, expected, rtol=0, atol=1e-15)
    assert math.isclose(levels.abs().max().item(), r * (m - 1) / (m + 1), rel_tol=1e-12)
    assert (levels.abs() < r).all()


@pytest.mark.parametrize("m", [2, 5])
def test_tlhs_pattern_is_latin_hypercube(m):
    r = 2 * EPS
    pat = tlhs_pattern(m, (3, 8, 8), r, torch.Generator().manual_seed(1))
    assert pat.shape == (m, 3, 8, 8)
    cols = pat.view(m, -1)
    # Per pixel dimension each level appears exactly once across the m copies.
    assert torch.equal(cols.sort(dim=0).values, tlhs_levels(m, r)[:, None].expand_as(cols))
    # Permutations are independent across dimensions (not one shared shuffle).
    assert len({tuple(c.tolist()) for c in cols.t()}) > 1


def test_bb_noise_shared_within_copy_and_latin_across_copies():
    m, B = 5, 6
    model = TinyNet()
    method = BatchInBatch(threat=LINF, m=m)
    x, _ = batch(B)
    X = x.repeat(m, 1, 1, 1)
    noise, fresh = method.initial_noise(X, make_ctx(model))
    assert fresh and noise.shape == X.shape and noise.dtype == X.dtype
    per_copy = noise.view(m, B, -1)
    assert torch.equal(per_copy, per_copy[:, :1].expand_as(per_copy))   # same image within copy
    lv = tlhs_levels(m, 2 * EPS).float()
    assert torch.equal(per_copy[:, 0].sort(dim=0).values, lv[:, None].expand(m, 16))


def test_tlhs_m1_is_plain_uniform_per_sample():
    B = 64
    method = BatchInBatch(threat=LINF, m=1)
    x, _ = batch(B)
    noise, _ = method.initial_noise(x.clone(), make_ctx(TinyNet()))
    r = 2 * EPS
    assert noise.abs().max() <= r and noise.abs().max() > 0.9 * r
    assert not torch.equal(noise[0], noise[1])          # per sample, not per copy
    assert noise.unique().numel() > 0.99 * noise.numel()


# ------------------------------------------------------------------------------ regeneration
def test_tlhs_regenerated_once_per_epoch_and_resumable():
    m, B = 3, 4
    model = TinyNet()
    method = BatchInBatch(threat=LINF, m=m)
    X = batch(B)[0].repeat(m, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    ctx = lambda e, s: StepContext(e, s, 10, 3, torch.device("cpu"), PassCounter(model), gen)
    n0, f0 = method.initial_noise(X, ctx(0, 0))
    n1, f1 = method.initial_noise(X, ctx(0, 1))
    assert f0 and not f1 and torch.equal(n0, n1)
    # A smaller last batch reuses the per-copy pattern of the epoch.
    small = X.view(m, B, *SHAPE)[:, :2].reshape(m * 2, *SHAPE)
    ns, fs = method.initial_noise(small, ctx(0, 2))
    assert not fs and torch.equal(ns.view(m, 2, -1)[:, 0], n0.view(m, B, -1)[:, 0])
    # Resume mid-epoch: the saved pattern is reused, nothing is redrawn.
    resumed = BatchInBatch(threat=LINF, m=m)
    resumed.load_state_dict(copy.deepcopy(method.state_dict()))
    state = gen.get_state()
    nr, fr = resumed.initial_noise(X, ctx(0, 5))
    assert not fr and torch.equal(nr, n0) and torch.equal(gen.get_state(), state)
    n2, f2 = method.initial_noise(X, ctx(1, 0))
    assert f2 and not torch.equal(n2, n0)


def test_regenerate_per_batch_and_random_default():
    m = 3
    X = batch(4)[0].repeat(m, 1, 1, 1)
    model = TinyNet()
    ctx = make_ctx(model)
    per_batch = BatchInBatch(threat=LINF, m=m, regenerate="batch")
    a, _ = per_batch.initial_noise(X, ctx)
    b, fresh = per_batch.initial_noise(X, ctx)
    assert fresh and not torch.equal(a, b)
    rnd = BatchInBatch(threat=LINF, m=m, init="random")
    assert rnd.regenerate.value == "batch"
    a, _ = rnd.initial_noise(X, ctx)
    b, _ = rnd.initial_noise(X, ctx)
    assert not torch.equal(a, b) and a.abs().max() <= 2 * EPS
    assert not torch.equal(a.view(m, 4, -1)[0], a.view(m, 4, -1)[1])   # i.i.d., not per copy


# ------------------------------------------------------------------------------- selection
def test_gs_bg_none_pick_the_rows_their_rules_name():
    m, B = 2, 3
    x, y = torch.rand(B, *SHAPE), torch.tensor([0, 1, 2])
    Y = y.repeat(m)
    X_adv = torch.rand(m * B, *SHAPE)
    delta = torch.zeros_like(X_adv)
    adv_pred = torch.tensor([0, 0, 2, 1, 1, 0])       # wrong rows: 1, 3, 5
    wrong = adv_pred != Y                             # [F, T, F, T, F, T]
    clean_pred = torch.tensor([1, 1, 2])              # clean wrong: sample 0
    gen = torch.Generator().manual_seed(0)

    gs = BatchInBatch(threat=LINF, m=m, selection="gs")
    S, YS = gs.select(ScriptedModel(onehot_logits(adv_pred)), x, y, X_adv, Y, delta, gen)
    assert torch.equal(S, X_adv[wrong]) and torch.equal(YS, Y[wrong])

    bg = BatchInBatch(threat=LINF, m=m, selection="bg")
    fake = ScriptedModel(onehot_logits(torch.cat([adv_pred, clean_pred])))
    S, YS = bg.select(fake, x, y, X_adv, Y, delta, gen)
    assert fake.calls == [(m + 1) * B]                # one forward over adversarial + clean pool
    assert torch.equal(S, torch.cat([X_adv[wrong], x[:1]]))
    assert torch.equal(YS, torch.cat([Y[wrong], y[:1]]))

    none = BatchInBatch(threat=LINF, m=m, selection="none")
    fake = ScriptedModel(onehot_logits(adv_pred))
    S, YS = none.select(fake, x, y, X_adv, Y, delta, gen)
    assert fake.calls == [] and torch.equal(S, X_adv) and torch.equal(YS, Y)


def test_cp_one_per_sample_with_radius_rules():
    # columns: b0 two wrong copies (radii 3 and 5), b1 none wrong, b2 only copy 2 wrong.
    wrong = torch.tensor([[True, False, False], [True, False, False], [False, False, True]])
    radii = torch.tensor([[3.0, 1.0, 9.0], [5.0, 4.0, 9.0], [1.0, 2.0, 0.5]])
    gen = torch.Generator().manual_seed(0)
    mx = select_cp(wrong, radii, RadiusRule.MAX, gen)
    mn = select_cp(wrong, radii, RadiusRule.MIN, gen)
    for mask in (mx, mn):
        assert mask.sum(dim=0).tolist() == [1, 1, 1]
    assert mx[:, 0].tolist() == [False, True, False]     # largest radius among wrong copies
    assert mn[:, 0].tolist() == [True, False, False]     # smallest radius among wrong copies
    assert mx[:, 1].tolist() == mn[:, 1].tolist() == [False, True, False]  # none wrong: largest
    assert mx[:, 2].tolist() == mn[:, 2].tolist() == [False, False, True]  # the only wrong one


def test_cp_ties_are_broken_uniformly_at_random():
    m, B = 4, 2000
    wrong = torch.tensor([True, True, False, True])[:, None].expand(m, B).clone()
    radii = torch.full((m, B), 0.1)
    radii[3] = 0.1 - 1e-8                      # float-rounding difference: still a tie
    mask = select_cp(wrong, radii, RadiusRule.MAX, torch.Generator().manual_seed(3))
    counts = mask.sum(dim=1).float()
    assert counts[2] == 0 and counts.sum() == B
    expected = B / 3
    chi2 = (((counts[[0, 1, 3]] - expected) ** 2) / expected).sum()
    assert chi2 < 13.8                         # chi-square, 2 dof, p = 0.001


def test_cp_select_uses_linf_radius_of_each_copy():
    m, B = 3, 2
    x, y = torch.rand(B, *SHAPE), torch.tensor([0, 0])
    Y = y.repeat(m)
    delta = torch.zeros(m * B, *SHAPE)
    for j, row in enumerate([0, 2, 4]):        # sample 0: radii 0.01, 0.02, 0.03 (copies 0..2)
        delta[row, 0, 0, 0] = 0.01 * (j + 1)
    for j, row in enumerate([1, 3, 5]):        # sample 1: radii 0.03, 0.02, 0.01
        delta[row, 0, 1, 1] = -0.01 * (3 - j)
    X_adv = x.repeat(m, 1, 1, 1) + delta
    pred = torch.tensor([1, 1, 1, 1, 0, 0])    # s0: copies 0,1 wrong; s1: copies 0,1 wrong
    method = BatchInBatch(threat=LINF, m=m, selection="cp")
    S, YS = method.select(ScriptedModel(onehot_logits(pred)), x, y, X_adv, Y, delta,
                          torch.Generator().manual_seed(0))
    assert torch.equal(S, X_adv[[1, 2]]) and torch.equal(YS, Y[[1, 2]])  # s1 copy0, s0 copy1
    method = BatchInBatch(threat=LINF, m=m, selection="cp", cp_radius_rule="min")
    S, _ = method.select(ScriptedModel(onehot_logits(pred)), x, y, X_adv, Y, delta,
                         torch.Generator().manual_seed(0))
    assert torch.equal(S, X_adv[[0, 3]])


def test_empty_selection_returns_none_and_model_in_train_mode():
    m, B = 3, 4
    x, _ = batch(B)
    y = torch.zeros(B, dtype=torch.long)
    model = ScriptedModel(torch.tensor([[9.0, 0.0, 0.0]]).expand(m * B, 3))  # always class 0
    ctx = make_ctx(model)
    model.train()
    assert BatchInBatch(threat=LINF, m=m, selection="gs").loss(model, x, y, ctx) is None
    assert model.training and ctx.stats["bb_selected"] == 0


# ---------------------------------------------------------------------------------- attack
def test_single_step_not_projected_multi_step_projected():
    m, B = 5, 6
    torch.manual_seed(0)
    model = TinyNet()
    x, y = batch(B)
    X, Y = x.repeat(m, 1, 1, 1), y.repeat(m)
    single = BatchInBatch(threat=LINF, m=m, variant="single")
    noise, _ = single.initial_noise(X, make_ctx(model))
    d = single.attack(model, X, Y, noise)
    r = 2 * EPS
    bound = r * (m - 1) / (m + 1) + EPS
    assert d.abs().max() > EPS + 1e-6                    # beyond the eps-ball
    assert d.abs().max() <= bound + 1e-6
    assert (LINF.distance(d) <= bound + 1e-6).all()
    multi = BatchInBatch(threat=LINF, m=m, variant="multi")
    assert (multi.steps, multi.alpha, multi.radius) == (10, EPS / 4, EPS)
    noise, _ = multi.initial_noise(X, make_ctx(model))
    assert noise.abs().max() <= EPS * (m - 1) / (m + 1) + 1e-7
    d = multi.attack(model, X, Y, noise)
    assert d.abs().max() <= EPS + 1e-6 and ((X + d) >= 0).all() and ((X + d) <= 1).all()


@pytest.mark.parametrize("variant,selection,steps", [
    ("single", "gs", 1), ("single", "bg", 1), ("single", "none", 1), ("multi", "cp", 3)])
def test_one_batched_forward_per_attack_step_and_pass_counts(variant, selection, steps):
    m, B = 4, 5
    torch.manual_seed(0)
    model = TinyNet(bn=True)
    sizes, modes = [], []

    def record(mod, inputs, out):
        sizes.append(out.shape[0])
        modes.append(mod.training)

    model.register_forward_hook(record)
    x, y = batch(B)
    kw = {"steps": steps} if variant == "multi" else {}
    method = BatchInBatch(threat=LINF, m=m, variant=variant, selection=selection, **kw)
    ctx = make_ctx(model)
    model.train()
    loss = method.loss(model, x, y, ctx)
    n_sel = int(ctx.stats["bb_selected"])
    n_pool = {"gs": m * B, "cp": m * B, "bg": (m + 1) * B, "none": 0}[selection]
    expected = [m * B] * steps + ([n_pool] if n_pool else [])
    if loss is not None:
        loss.backward()
        expected.append(n_sel)
    assert sizes == expected
    # attack and selection forwards in eval mode (the default), the training forward in train.
    assert modes == [False] * (len(expected) - (loss is not None)) + [True] * (loss is not None)
    assert model.training
    t = ctx.counter.totals()
    assert t["attack"] == {"forward": steps * m * B, "backward": steps * m * B}
    assert t.get("selection", {"forward": 0, "backward": 0}) == {"forward": n_pool, "backward": 0}
    if loss is not None:
        assert t["train"] == {"forward": n_sel, "backward": n_sel}
    if selection == "cp":
        assert n_sel == B
    if selection == "none":
        assert n_sel == m * B


# ---------------------------------------------------------------------- N-FGSM equivalence
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("arch", [dict(bn=True), dict(dropout=0.3)])
def test_bb_m1_random_none_is_nfgsm(mode, arch):
    torch.manual_seed(0)
    base = TinyNet(**arch)
    x, y = batch(8)
    results = []
    for method in (NFGSM(threat=LINF, attack_mode=mode),
                   BatchInBatch(threat=LINF, m=1, init="random", selection="none",
                                variant="single", attack_mode=mode)):
        model = copy.deepcopy(base).train()
        ctx = make_ctx(model, seed=7)
        torch.manual_seed(123)                     # dropout masks
        loss = method.loss(model, x, y, ctx)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        bn = [b.clone() for b in model.buffers()]
        results.append((loss.detach(), grads, bn, ctx.generator.get_state()))
    (l0, g0, b0, s0), (l1, g1, b1, s1) = results
    assert torch.equal(l0, l1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert all(torch.equal(a, b) for a, b in zip(b0, b1))
    assert torch.equal(s0, s1)                     # same random draws consumed


# ---------------------------------------------------------------------------- registry etc.
def test_registered_with_official_defaults_and_validation():
    method = METHODS.get("bb")(threat=LINF)
    d = method.describe()
    assert d["m"] == 5 and d["variant"] == "single" and d["init"] == "tlhs"
    assert d["regenerate"] == "epoch" and d["attack_mode"] == "eval"
    assert d["cp_radius_rule"] == "max" and d["steps"] == 1 and d["alpha"] == EPS
    assert d["radius_ratio"] == 2.0 and "radius" not in d   # declared parameters only
    with pytest.raises(ValueError, match="selection"):
        BatchInBatch(threat=LINF, selection="A")
    with pytest.raises(ValueError, match="threat.norm"):
        BatchInBatch(threat=ThreatModel("l2", 0.5))
    with pytest.raises(ValueError, match="steps"):
        BatchInBatch(threat=LINF, steps=3)
    with pytest.raises(TypeError):
        BatchInBatch(threat=LINF, n_adv=5)


def test_clean_warmup_trains_on_clean_batch():
    model = TinyNet()
    x, y = batch(4)
    ctx = make_ctx(model, epoch=0)
    loss = BatchInBatch(threat=LINF, clean_warmup_epochs=1).loss(model, x, y, ctx)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(model(x), y))
    assert "attack" not in ctx.counter.totals()
