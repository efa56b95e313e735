"""The four baselines against their specs: perturbation geometry, attack mode, pass counts."""
import pytest
import torch
import torch.nn.functional as F

import methods.algorithms  # noqa: F401
from methods.algorithms.base import ModelMode, attack_mode
from methods.measure.passes import PassCounter, sum_passes
from methods.registry import METHODS
from methods.threat import ThreatModel
from tests.helpers import TinyNet, make_ctx, toy_batch

EPS = 8 / 255


class Spy(torch.nn.Module):
    """Wraps a model and records every input it sees and the mode it was in."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        self.seen.append((x.detach().clone(), self.training))
        return self.inner(x)


def perturbation_used_for_training(method, x, y):
    model = Spy(TinyNet(batchnorm=True)).train()
    method.loss(model, x, y, make_ctx(model))
    return model.seen[-1][0] - x, model.seen


def test_nfgsm_does_not_project_but_fgsm_rs_does():
    x, y = toy_batch(256)
    x = x * 0.5 + 0.25  # keep away from the image borders so clamping does not hide the radius
    threat = ThreatModel("linf", EPS)
    d_n, _ = perturbation_used_for_training(METHODS.get("nfgsm")(threat=threat), x, y)
    d_f, _ = perturbation_used_for_training(METHODS.get("fgsm_rs")(threat=threat), x, y)
    assert d_n.abs().max() > 1.5 * EPS, "N-FGSM must not be projected onto the eps-ball"
    assert d_n.abs().max() <= 3 * EPS + 1e-6, "N-FGSM radius is at most (k + 1) eps"
    assert d_f.abs().max() <= EPS + 1e-6, "FGSM-RS projects onto the eps-ball"
    assert (x + d_n).min() >= 0 and (x + d_n).max() <= 1


def test_nfgsm_step_is_eta_plus_alpha_sign_grad():
    torch.manual_seed(0)
    x, y = toy_batch(8)
    threat = ThreatModel("linf", EPS)
    model = TinyNet().train()
    ctx = make_ctx(model, seed=4)
    eta = threat.random_start(x, radius=2 * EPS, generator=torch.Generator().manual_seed(4))
    eta = (x + eta).clamp(0, 1) - x
    eta.requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x + eta), y), eta)
    expected = F.cross_entropy(model((x + eta + EPS * grad.sign()).clamp(0, 1)), y)
    got = METHODS.get("nfgsm")(threat=threat).loss(model, x, y, ctx)
    assert torch.allclose(got, expected, atol=1e-6)


def test_nfgsm_eps_ramp_is_linear_over_the_first_epochs():
    m = METHODS.get("nfgsm")(threat=ThreatModel("linf", EPS), eps_ramp_epochs=5)
    model = TinyNet()
    assert m.ramp(make_ctx(model, epoch=0, step=0, steps_per_epoch=10)) == pytest.approx(1 / 50)
    assert m.ramp(make_ctx(model, epoch=2, step=4, steps_per_epoch=10)) == pytest.approx(25 / 50)
    assert m.ramp(make_ctx(model, epoch=7, step=0, steps_per_epoch=10)) == 1.0


@pytest.mark.parametrize("name,expected_mode", [("nfgsm", True), ("fgsm_rs", True), ("pgd_at", True)])
def test_training_attacks_run_in_train_mode_by_default_and_eval_on_request(name, expected_mode):
    x, y = toy_batch(8)
    threat = ThreatModel("linf", EPS)
    _, seen = perturbation_used_for_training(METHODS.get(name)(threat=threat), x, y)
    assert all(mode == expected_mode for _, mode in seen)
    _, seen = perturbation_used_for_training(METHODS.get(name)(threat=threat, attack_mode="eval"), x, y)
    assert [mode for _, mode in seen[:-1]] == [False] * (len(seen) - 1)
    assert seen[-1][1] is True, "the training forward runs in train mode"


def test_pgd_at_stays_in_ball_and_counts_its_passes():
    x, y = toy_batch(16)
    threat = ThreatModel("linf", EPS)
    model = TinyNet().train()
    ctx = make_ctx(model)
    loss = METHODS.get("pgd_at")(threat=threat, steps=7).loss(model, x, y, ctx)
    loss.backward()
    totals = ctx.counter.totals()
    assert totals["attack"] == {"forward": 7 * 16, "backward": 7 * 16}
    assert totals["train"] == {"forward": 16, "backward": 16}
    assert sum_passes(totals) == {"forward": 8 * 16, "backward": 8 * 16}


def test_pass_counter_books_no_grad_forwards_as_forward_only():
    model = TinyNet()
    counter = PassCounter(model)
    x, y = toy_batch(5)
    with torch.no_grad(), counter.phase("selection"):
        model(x)
    F.cross_entropy(model(x), y).backward()
    assert counter.totals() == {"selection": {"forward": 5, "backward": 0},
                                "train": {"forward": 5, "backward": 5}}
    counter.detach()
    model(x)
    assert counter.totals()["train"]["forward"] == 5


def test_attack_mode_restores_previous_mode():
    model = TinyNet().train()
    with attack_mode(model, ModelMode.EVAL):
        assert not model.training
    assert model.training


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_rejects_unknown_parameters_and_describes_itself(name):
    with pytest.raises(TypeError):
        METHODS.get(name)(threat=ThreatModel("linf", EPS), not_a_parameter=1)
    d = METHODS.get(name)(threat=ThreatModel("linf", EPS)).describe()
    assert d["name"] == name and d["paper"] and d["threat"]["eps"] == EPS


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_returns_a_finite_loss_and_leaves_train_mode(name):
    x, y = toy_batch(16)
    model = TinyNet(batchnorm=True).train()
    ctx = make_ctx(model)
    m = METHODS.get(name)(threat=ThreatModel("linf", EPS))
    m.start_epoch(model, ctx)
    loss = m.loss(model, x, y, ctx)
    assert model.training
    if loss is not None:
        assert torch.isfinite(loss)
        loss.backward()
