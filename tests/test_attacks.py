"""Threat geometry and attacks: bounds, worst case over restarts, agreement with a plain PGD."""
import pytest
import torch
import torch.nn.functional as F

from methods.attacks import fgsm, pgd
from methods.threat import ThreatModel, clamp_to_image
from tests.helpers import TinyNet, toy_batch


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_project_and_ascent_stay_in_ball(norm):
    t = ThreatModel(norm, 0.5)
    x, _ = toy_batch(64)
    g = torch.Generator().manual_seed(1)
    d = t.random_start(x, generator=g)
    assert (t.distance(d) <= 0.5 + 1e-6).all()
    big = torch.randn_like(x) * 10
    assert (t.distance(t.project(big)) <= 0.5 + 1e-6).all()
    inside = t.project(big) * 0.1
    assert torch.allclose(t.project(inside), inside)  # projection leaves interior points alone
    step = t.ascent(torch.zeros_like(x), torch.randn_like(x), 0.2)
    assert torch.allclose(t.distance(step), torch.full((64,), 0.2), atol=1e-5)


def test_l2_random_start_fills_the_ball_not_the_sphere():
    t = ThreatModel("l2", 1.0)
    d = t.random_start(torch.zeros(2000, 1, 2, 1), generator=torch.Generator().manual_seed(0))
    r = t.distance(d)
    # In 2-D the radius of a uniform point has P(r < 1/2) = 1/4.
    assert abs((r < 0.5).float().mean().item() - 0.25) < 0.04


def test_clamp_to_image_keeps_images_valid():
    x = torch.tensor([[[[0.0, 1.0, 0.5]]]])
    d = torch.tensor([[[[-0.3, 0.3, 0.2]]]])
    out = x + clamp_to_image(x, d)
    assert torch.allclose(out, torch.tensor([[[[0.0, 1.0, 0.7]]]]))


def test_threat_model_rejects_bad_values():
    with pytest.raises(ValueError):
        ThreatModel("linf", -1.0)
    with pytest.raises(ValueError):
        ThreatModel("l3", 0.1)


@pytest.mark.parametrize("norm,eps,alpha", [("linf", 0.1, 0.03), ("l2", 1.0, 0.3)])
def test_pgd_output_in_ball_and_image(norm, eps, alpha):
    torch.manual_seed(0)
    model = TinyNet().eval()
    x, y = toy_batch(32)
    t = ThreatModel(norm, eps)
    x_adv = pgd(model, x, y, t, alpha=alpha, steps=5, restarts=3,
                generator=torch.Generator().manual_seed(0))
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (t.distance(x_adv - x) <= eps + 1e-6).all()
    x_f = fgsm(model, x, y, t)
    assert (t.distance(x_f - x) <= eps + 1e-6).all()


def test_pgd_worst_case_over_restarts_per_example():
    """An example counts as broken if any restart breaks it (not just the last restart)."""
    model = TinyNet().eval()
    torch.manual_seed(0)
    x, y = toy_batch(64)
    t = ThreatModel("linf", 0.05)
    preds = lambda xa: model(xa).argmax(1)
    with torch.no_grad():
        y = preds(x)  # start from correctly classified points
    many = pgd(model, x, y, t, alpha=0.01, steps=3, restarts=8,
               generator=torch.Generator().manual_seed(3))
    fooled_many = preds(many) != y
    for r in range(8):  # replay each restart alone with the same random stream
        g = torch.Generator().manual_seed(3)
        for _ in range(r):
            t.random_start(x, generator=g)
        one = pgd(model, x, y, t, alpha=0.01, steps=3, restarts=1, generator=g)
        assert not ((preds(one) != y) & ~fooled_many).any(), f"restart {r} broke an example the worst case missed"


def plain_pgd(model, x, y, eps, alpha, steps, seed):
    """A deliberately straightforward Linf PGD (Madry): random start, sign steps, projection."""
    g = torch.Generator().manual_seed(seed)
    delta = (torch.rand(x.shape, generator=g) * 2 - 1) * eps
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    for _ in range(steps):
        loss = F.cross_entropy(model(x + delta), y)
        grad, = torch.autograd.grad(loss, delta)
        delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
        delta = ((x + delta).clamp(0, 1) - x).detach().requires_grad_(True)
    return (x + delta).detach()


def test_pgd_matches_a_straightforward_pgd_on_a_trained_model():
    torch.manual_seed(0)
    model = TinyNet()
    x, _ = toy_batch(256, seed=5)
    y = (x.flatten(1)[:, :32].mean(1) > x.flatten(1)[:, 32:].mean(1)).long()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    t = ThreatModel("linf", 0.03)
    ours = pgd(model, x, y, t, alpha=0.01, steps=10, generator=torch.Generator().manual_seed(7))
    ref = plain_pgd(model, x, y, 0.03, 0.01, 10, seed=7)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
        acc_ours = (model(ours).argmax(1) == y).float().mean().item()
        acc_ref = (model(ref).argmax(1) == y).float().mean().item()
    assert clean > 0.9
    assert acc_ours < clean - 0.2, "the attack should actually hurt"
    assert abs(acc_ours - acc_ref) <= 0.03  # same random start and steps: identical up to ties


def test_early_stop_computes_only_unfooled_rows_and_keeps_fooling_deltas():
    torch.manual_seed(0)
    model = TinyNet().eval()
    x, y = toy_batch(64)
    t = ThreatModel("linf", 0.2)
    sizes = []
    handle = model.register_forward_hook(lambda m, i, o: sizes.append(o.shape[0]))
    x_adv = pgd(model, x, y, t, alpha=0.05, steps=8, early_stop=True,
                generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert sizes[0] == 64 and sizes == sorted(sizes, reverse=True) and sizes[-1] < 64
    with torch.no_grad():
        fooled_es = model(x_adv).argmax(1) != y
    assert (t.distance(x_adv - x) <= 0.2 + 1e-6).all()
    # An example fooled at some step stays fooled: early stop never gives up a success.
    plain = pgd(model, x, y, t, alpha=0.05, steps=8, early_stop=False,
                generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fooled_plain = model(plain).argmax(1) != y
    assert fooled_es.sum() >= fooled_plain.sum()
