"""The four baselines against their specs: perturbation geometry, attack mode, pass counts, and
the SVHN eps ramp shared by N-FGSM, FGSM-RS and PGD-AT."""
import pytest
import torch
import torch.nn.functional as F

import methods.algorithms  # noqa: F401
from methods.attacks import input_gradient, pgd
from methods.algorithms.base import ModelMode, attack_mode
from methods.algorithms.ramp import eps_ramp
from methods.measure.passes import PassCounter, sum_passes
from methods.registry import METHODS
from methods.threat import ThreatModel, clamp_to_image
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


# --------------------------------------------------------------- the SVHN eps ramp (ramp.py)
RAMPED = ["nfgsm", "fgsm_rs", "pgd_at"]


def test_eps_ramp_is_zero_at_the_first_step_linear_and_one_after_its_epochs():
    """N-FGSM train.py: factor = min(iter_count / (5 * len(train_loader)), 1), iter_count from 0."""
    model = TinyNet()
    factors = [eps_ramp(make_ctx(model, epoch=g // 10, step=g % 10, steps_per_epoch=10), 5)
               for g in range(70)]
    assert factors[0] == 0.0
    assert factors[25] == 0.5
    assert factors == [min(1.0, g / 50) for g in range(70)]
    assert factors[50:] == [1.0] * 20
    assert eps_ramp(make_ctx(model, epoch=0, step=0), 0) == 1.0   # 0 epochs: no ramp


@pytest.mark.parametrize("name", RAMPED)
@pytest.mark.parametrize("epoch,step,factor", [(0, 0, 0.0), (1, 5, 0.3), (4, 9, 0.98),
                                               (5, 0, 1.0), (9, 3, 1.0)])
def test_each_method_reports_the_ramped_eps(name, epoch, step, factor):
    x, y = toy_batch(8)
    model = TinyNet().train()
    ctx = make_ctx(model, epoch=epoch, step=step, steps_per_epoch=10, epochs=10)
    METHODS.get(name)(threat=ThreatModel("linf", EPS), eps_ramp_epochs=5).loss(model, x, y, ctx)
    assert ctx.stats["eps"] == pytest.approx(EPS * factor, abs=1e-12)
    ctx = make_ctx(model, epoch=epoch, step=step, steps_per_epoch=10, epochs=10)
    METHODS.get(name)(threat=ThreatModel("linf", EPS)).loss(model, x, y, ctx)
    assert ctx.stats["eps"] == EPS, "ramp off: eps unchanged"


@pytest.mark.parametrize("name", RAMPED)
def test_the_first_ramped_step_trains_on_clean_inputs_and_later_ones_stay_in_the_ramped_ball(name):
    x, y = toy_batch(64)
    x = x * 0.5 + 0.25
    threat = ThreatModel("linf", EPS)
    method = METHODS.get(name)(threat=threat, eps_ramp_epochs=5)
    model = Spy(TinyNet()).train()
    method.loss(model, x, y, make_ctx(model, epoch=0, step=0, steps_per_epoch=10))
    assert torch.equal(model.seen[-1][0], x)
    method.loss(model, x, y, make_ctx(model, epoch=1, step=0, steps_per_epoch=10))  # factor 1/5
    radius = (method.k + 1) * EPS / 5 if name == "nfgsm" else EPS / 5
    delta = model.seen[-1][0] - x
    assert delta.abs().max() <= radius + 1e-6 and delta.abs().max() > 0.5 * EPS / 5


def test_fgsm_rs_ramps_start_step_and_projection_together():
    """N-FGSM train.py with --unif 1 --clip 1 ramps epsilon, alpha and clip by one factor."""
    x, y = toy_batch(16)
    model = TinyNet().train()
    got = METHODS.get("fgsm_rs")(threat=ThreatModel("linf", EPS), eps_ramp_epochs=5).loss(
        model, x, y, make_ctx(model, epoch=2, step=5, steps_per_epoch=10, seed=3))
    small = ThreatModel("linf", EPS * 0.5)
    expected = _fgsm_rs_reference(model, x, y, small, 1.25, seed=3)
    assert torch.equal(got, expected)


def test_pgd_at_ramps_eps_but_keeps_its_absolute_step(monkeypatch):
    """GradAlign's SVHN PGD (the official PGD-on-SVHN code): eps ramped, pgd_alpha_train fixed."""
    import methods.algorithms.pgd_at as pgd_at_module
    calls = []
    real = pgd_at_module.pgd

    def spy(model, x, y, threat, **kw):
        calls.append((threat.eps, kw["alpha"], kw["steps"]))
        return real(model, x, y, threat, **kw)

    monkeypatch.setattr(pgd_at_module, "pgd", spy)
    x, y = toy_batch(8)
    model = TinyNet().train()
    METHODS.get("pgd_at")(threat=ThreatModel("linf", EPS), steps=3, alpha=2 / 255,
                          eps_ramp_epochs=5).loss(model, x, y, make_ctx(model, epoch=1, step=0))
    assert calls == [(pytest.approx(EPS / 5), 2 / 255, 3)]


def _fgsm_rs_reference(model, x, y, threat, alpha_ratio, seed):
    """FGSM-RS's loss exactly as written before the ramp existed (locuslab train_fgsm.py)."""
    g = torch.Generator().manual_seed(seed)
    delta = clamp_to_image(x, threat.random_start(x, generator=g))
    grad = input_gradient(model, x, delta, y)
    delta = threat.ascent(delta, grad, alpha_ratio * threat.eps)
    delta = clamp_to_image(x, threat.project(delta))
    return F.cross_entropy(model(x + delta.detach()), y)


@pytest.mark.parametrize("ramp_epochs,epoch", [(0, 0), (0, 3), (5, 5), (5, 9)])
def test_fgsm_rs_and_pgd_at_without_an_active_ramp_are_bit_for_bit_the_unramped_step(ramp_epochs,
                                                                                    epoch):
    """Ramp off (0 epochs) or over (factor 1): the same numbers as the pre-ramp code."""
    x, y = toy_batch(16)
    threat = ThreatModel("linf", EPS)
    model = TinyNet(batchnorm=True).train()
    ctx = make_ctx(model, epoch=epoch, step=0, steps_per_epoch=10, epochs=10, seed=7)
    got = METHODS.get("fgsm_rs")(threat=threat, eps_ramp_epochs=ramp_epochs).loss(model, x, y, ctx)
    assert torch.equal(got, _fgsm_rs_reference(model, x, y, threat, 1.25, seed=7))

    ctx = make_ctx(model, epoch=epoch, step=0, steps_per_epoch=10, epochs=10, seed=7)
    got = METHODS.get("pgd_at")(threat=threat, steps=4, alpha=2 / 255,
                                eps_ramp_epochs=ramp_epochs).loss(model, x, y, ctx)
    x_adv = pgd(model, x, y, threat, alpha=2 / 255, steps=4,
                generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, F.cross_entropy(model(x_adv), y))


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


def _set_up(name, model, x, y):
    """A registered method built and set up through the seam, as the trainer does."""
    from methods.algorithms.base import MethodData, SetupContext
    from methods.data import Split
    from methods.runtime import Precision

    meta_x, _ = toy_batch(100, size=8, seed=1)     # 10 per class, like the IADA meta set
    meta = Split((meta_x * 255).to(torch.uint8), torch.arange(100) % 10, torch.arange(100))
    data = MethodData(num_classes=10, image_shape=(1, 8, 8), feature_dim=model.feature_dim,
                      class_counts=torch.bincount(y, minlength=10), meta=meta,
                      device=torch.device("cpu"))
    method = METHODS.get(name)(threat=ThreatModel("linf", EPS))
    method.setup(model, data, SetupContext(device=torch.device("cpu"),
                                           generator=torch.Generator().manual_seed(0),
                                           epochs=2, steps_per_epoch=10, precision=Precision.FP32))
    return method


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_steps_with_a_finite_loss_and_leaves_train_mode(name):
    """Every registered method, through setup and step as the trainer calls them, on a real
    registered model (stages declared): a finite loss, an update, train mode afterwards."""
    from methods.models import build_model

    x, y = toy_batch(16)
    torch.manual_seed(0)
    model = build_model("smallcnn", num_classes=10, image_shape=(1, 8, 8), mean=(0.5,),
                        std=(0.5,), width=0.25).train()
    ctx = make_ctx(model)
    ctx.optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ctx.indices = torch.arange(len(y))          # the trainer's loader passes dataset positions
    method = _set_up(name, model, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    method.start_epoch(model, ctx)
    loss = method.step(model, x, y, ctx)
    assert model.training
    if loss is not None:
        assert torch.isfinite(loss)
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
