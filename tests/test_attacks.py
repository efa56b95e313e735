"""Threat geometry and attacks: bounds, worst case over restarts, agreement with a plain PGD;
attack specs (defaults, labels, errors) and targeted PGD on a model whose answer is known."""
import pytest
import torch
import torch.nn.functional as F

from methods import attacks as attack_impls
from methods.attack_specs import (ATTACK_KINDS, AttackSpecError, attack_label, attack_threat,
                                  check_attack_specs, normalize_attack_spec)
from methods.attacks import fgsm, pgd
from methods.eval_core import run_attack
from methods.registry import ATTACKS, Registry
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


# ----------------------------------------------------------------------------- attack specs


def test_every_attack_spec_has_a_torch_implementation_and_registries_reject_duplicates():
    assert ATTACKS.names() == ATTACK_KINDS.names() == ["fgsm", "pgd"]
    with pytest.raises(ValueError, match="registered twice"):
        ATTACKS.register("pgd")(attack_impls.run_pgd)
    r = Registry("attack")
    r.register("x")(1)
    with pytest.raises(KeyError, match="unknown attack 'y'; registered: x"):
        r.get("y")


def test_default_config_specs_are_labelled_by_steps_restarts_and_step_size():
    assert attack_label({"name": "fgsm"}) == "FGSM"
    assert attack_label({"name": "pgd", "steps": 40, "alpha": 0.01, "restarts": 1}) == "PGD-40-1-alpha=0.01"
    assert attack_label({"name": "pgd", "steps": 40, "alpha": 0.01}) == "PGD-40-1-alpha=0.01"
    assert attack_label({"name": "pgd", "steps": 50, "alpha": "2/255", "restarts": 10}) == "PGD-50-10-alpha=2/255"


def test_labels_name_every_non_default_field_in_a_fixed_order():
    base = {"name": "pgd", "steps": 10, "alpha": 0.01}
    cases = {
        (("eps", 8 / 255),): "PGD-10-1-alpha=0.01-eps=8/255",
        (("eps", "16/255"),): "PGD-10-1-alpha=0.01-eps=16/255",
        (("eps", 0.3),): "PGD-10-1-alpha=0.01-eps=0.3",
        (("norm", "L2"), ("eps", 1)): "PGD-10-1-alpha=0.01-L2-eps=1",
        (("targeted", "least_likely"),): "PGD-10-1-alpha=0.01-targeted=least_likely",
        (("targeted", "all"), ("restarts", 3)): "PGD-10-3-alpha=0.01-targeted=all",
        (("random_start", False),): "PGD-10-1-alpha=0.01-zero_start",
        (("early_stop", False),): "PGD-10-1-alpha=0.01-no_early_stop",
        (("early_stop", False), ("targeted", "random"), ("eps", 0.5), ("norm", "linf")):
            "PGD-10-1-alpha=0.01-Linf-eps=0.5-targeted=random-no_early_stop",
        (("targeted", None), ("random_start", True), ("early_stop", True)): "PGD-10-1-alpha=0.01",
        (("alpha", 0.02),): "PGD-10-1-alpha=0.02",
    }
    for changes, label in cases.items():
        assert attack_label({**base, **dict(changes)}) == label, changes
    assert attack_label({"name": "fgsm", "eps": 0.2}) == "FGSM-eps=0.2"
    assert attack_label({"name": "fgsm", "norm": "l2", "eps": 0.5}) == "FGSM-L2-eps=0.5"
    assert "/" not in attack_label({"name": "fgsm", "eps": 0.25})


def test_normalized_specs_have_every_field_and_normalizing_is_idempotent():
    spec = normalize_attack_spec({"name": "pgd", "steps": 40, "alpha": "2/255"})
    assert spec == {"name": "pgd", "steps": 40, "restarts": 1, "alpha": 2 / 255, "norm": None,
                    "eps": None, "targeted": None, "random_start": True, "early_stop": True}
    assert normalize_attack_spec(spec) == spec
    assert normalize_attack_spec({"name": "fgsm"}) == {"name": "fgsm", "norm": None, "eps": None}
    assert attack_threat(spec, {"norm": "linf", "eps": 0.3}) == {"norm": "linf", "eps": 0.3}
    own = normalize_attack_spec({"name": "fgsm", "norm": "L2", "eps": 1.5})
    assert attack_threat(own, {"norm": "linf", "eps": 0.3}) == {"norm": "l2", "eps": 1.5}


@pytest.mark.parametrize("spec,message", [
    ({"name": "cw"}, r"attacks\[0\].name: unknown attack 'cw'; known: \['fgsm', 'pgd'\]"),
    ({"steps": 3}, r"attacks\[0\]: missing field 'name'"),
    ({"name": "pgd", "steps": 3}, r"attacks\[0\].alpha: missing"),
    ({"name": "pgd", "steps": 3, "alpha": 0.1, "stepz": 4}, r"unknown key 'stepz' for attack 'pgd'"),
    ({"name": "fgsm", "steps": 3}, r"unknown key 'steps' for attack 'fgsm'"),
    ({"name": "pgd", "steps": 0, "alpha": 0.1}, r"attacks\[0\].steps: expected an integer >= 1"),
    ({"name": "pgd", "steps": 2.5, "alpha": 0.1}, r"attacks\[0\].steps"),
    ({"name": "pgd", "steps": 2, "alpha": "fast"}, r"attacks\[0\].alpha: expected a number"),
    ({"name": "pgd", "steps": 2, "alpha": 0.1, "eps": -1}, r"attacks\[0\].eps: must be > 0"),
    ({"name": "pgd", "steps": 2, "alpha": 0.1, "targeted": "most"}, r"attacks\[0\].targeted"),
    ({"name": "pgd", "steps": 2, "alpha": 0.1, "early_stop": "yes"}, r"attacks\[0\].early_stop"),
    ({"name": "fgsm", "norm": "l3", "eps": 1}, r"attacks\[0\].norm"),
    ({"name": "fgsm", "norm": "l2"}, r"attacks\[0\].norm: 'l2' needs an eps"),
    ({"name": "pgd", "steps": 2, "alpha": 0.1, "restarts": 3, "random_start": False},
     r"attacks\[0\].restarts: 3 restarts need random_start"),
])
def test_bad_specs_raise_naming_the_field(spec, message):
    with pytest.raises(AttackSpecError, match=message):
        check_attack_specs([spec])


def test_label_clash_names_both_specs_and_eps_or_alpha_sweeps_do_not_clash():
    sweep = check_attack_specs([{"name": "pgd", "steps": 10, "alpha": 0.01},
                                {"name": "pgd", "steps": 10, "alpha": 0.01, "eps": 0.2},
                                {"name": "pgd", "steps": 10, "alpha": 0.01, "eps": 0.4},
                                {"name": "pgd", "steps": 10, "alpha": 0.02}])
    assert [attack_label(s) for s in sweep] == ["PGD-10-1-alpha=0.01", "PGD-10-1-alpha=0.01-eps=0.2",
                                                "PGD-10-1-alpha=0.01-eps=0.4", "PGD-10-1-alpha=0.02"]
    with pytest.raises(AttackSpecError,
                       match=r"evaluation.attacks\[0\] and evaluation.attacks\[2\] have the same "
                             r"label 'PGD-10-1-alpha=0.01'.*'alpha': 0.01.*'restarts': 1"):
        check_attack_specs([{"name": "pgd", "steps": 10, "alpha": 0.01}, {"name": "fgsm"},
                            {"name": "pgd", "steps": 10, "alpha": "0.01", "restarts": 1}])
    with pytest.raises(AttackSpecError, match="same label 'FGSM'"):
        check_attack_specs([{"name": "fgsm"}, {"name": "fgsm", "eps": None}])
    assert check_attack_specs(None) == []
    with pytest.raises(AttackSpecError, match="expected a list"):
        check_attack_specs({"name": "fgsm"})


# ----------------------------------------------------------------------------- targeted PGD
class ThreeClassLinear(torch.nn.Module):
    """Logits of a 2-pixel image x = (x0, x1): class 0 -> 0, class 1 -> 10 (x0 - 0.6),
    class 2 -> 10 (x1 - 0.7).  At x = (0.5, 0.5) it predicts 0 with margins 1 (class 1) and 2
    (class 2, the least likely): an Linf attack reaches class 1 iff eps > 0.1 and class 2 iff
    eps > 0.2, each by moving one pixel up."""

    def forward(self, x):
        x0, x1 = x.flatten(1)[:, 0], x.flatten(1)[:, 1]
        return torch.stack([torch.zeros_like(x0), 10 * (x0 - 0.6), 10 * (x1 - 0.7)], dim=1)


def _linear_case(n=20):
    return torch.full((n, 1, 1, 2), 0.5), torch.zeros(n, dtype=torch.long)


def _targeted(policy, eps, **extra):
    return normalize_attack_spec({"name": "pgd", "steps": 20, "alpha": 0.05, "eps": eps,
                                  "targeted": policy, **extra})


@pytest.mark.parametrize("eps,robust_ll,robust_all,robust_untargeted", [
    (0.05, True, True, True),      # nothing reachable
    (0.15, True, False, False),    # class 1 reachable, the least likely class 2 is not
    (0.25, False, False, False),   # both reachable
])
def test_targeted_pgd_success_is_reaching_the_target(eps, robust_ll, robust_all, robust_untargeted):
    model = ThreeClassLinear().eval()
    x, y = _linear_case()
    threat = ThreatModel("linf", eps)
    runs = attack_impls.run_pgd(model, x, y, _targeted("least_likely", eps), threat,
                                torch.Generator().manual_seed(0))
    assert len(runs) == 1 and (runs[0].target == 2).all()   # least likely on the clean input
    for policy, expected in (("least_likely", robust_ll), ("all", robust_all), (None, robust_untargeted)):
        ok, dist = run_attack(model, _targeted(policy, eps), threat, x, y, 8, 0, str(policy))
        assert ok.tolist() == [expected] * len(y), policy
        assert dist <= eps + 1e-6
    runs = attack_impls.run_pgd(model, x, y, _targeted("all", eps), threat, None)
    assert [r.target.tolist() for r in runs] == [[1] * 20, [2] * 20]   # (y + k) mod C
    for r in runs:
        assert (threat.distance(r.x_adv - x) <= eps + 1e-6).all()
        assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1


def test_random_targets_are_seeded_wrong_classes_and_success_is_per_target():
    model = ThreeClassLinear().eval()
    x, y = _linear_case(200)
    spec = _targeted("random", 0.15)
    threat = ThreatModel("linf", 0.15)
    a = attack_impls.run_pgd(model, x, y, spec, threat, torch.Generator().manual_seed(5))
    b = attack_impls.run_pgd(model, x, y, spec, threat, torch.Generator().manual_seed(5))
    target = a[0].target
    assert torch.equal(target, b[0].target) and torch.equal(a[0].x_adv, b[0].x_adv)
    assert set(target.tolist()) == {1, 2}            # never the true class 0, both wrong ones
    with torch.no_grad():
        pred = model(a[0].x_adv).argmax(1)
    # At eps 0.15 only class 1 is reachable: exactly the examples aimed at class 1 are fooled.
    assert torch.equal(a[0].fooled(pred, y), target == 1)
    ok, _ = run_attack(model, spec, threat, x, y, 64, 5, "random")
    assert 0 < int(ok.sum()) < len(y)


def test_a_targeted_run_counts_only_the_target_and_needs_a_right_clean_answer():
    run = attack_impls.AttackRun(torch.zeros(3, 1), target=torch.tensor([2, 2, 1]))
    y = torch.tensor([0, 0, 0])
    # Pushed to class 1 while aiming at 2 is not a success; reaching 2 is.
    assert run.fooled(torch.tensor([1, 2, 0]), y).tolist() == [False, True, False]
    assert attack_impls.AttackRun(torch.zeros(3, 1)).fooled(torch.tensor([1, 0, 0]), y).tolist() \
        == [True, False, False]
    # An example the model already gets wrong is never robust to a targeted attack.
    model = ThreeClassLinear().eval()
    x = torch.tensor([[[[0.5, 0.5]]], [[[0.9, 0.5]]]])          # the second is predicted 1
    y = torch.tensor([0, 0])
    ok, _ = run_attack(model, _targeted("least_likely", 0.05), ThreatModel("linf", 0.05), x, y,
                       8, 0, "ll")
    assert ok.tolist() == [True, False]


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_registered_attacks_respect_their_threat(norm, eps):
    torch.manual_seed(0)
    model = TinyNet().eval()
    x, y = toy_batch(16)
    threat = ThreatModel(norm, eps)
    for spec in ({"name": "fgsm", "norm": norm, "eps": eps},
                 {"name": "pgd", "steps": 3, "alpha": eps / 4, "restarts": 2, "norm": norm, "eps": eps,
                  "targeted": "all"}):
        spec = normalize_attack_spec(spec)
        runs = ATTACKS.get(spec["name"])(model, x, y, spec, threat, torch.Generator().manual_seed(0))
        assert len(runs) == (1 if spec["name"] == "fgsm" else 9)
        for r in runs:
            assert (threat.distance(r.x_adv - x) <= eps + 1e-6).all()
            assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1
