"""Fast CPU tests of methods.autoattack_adapter: tiny models, 8 images of 1x8x8, 10 classes.

The margin model is linear with one live logit: class 0 scores f(x) = w.x + b0 with w in {-1, 1}^64,
class 1 scores 0, classes k = 2..9 score -10 - k.  With x in [0.4, 0.6]^64 the box never binds below
eps = 0.4 (Linf), so the exact distance to the decision boundary is f(x) / ||w||_1 in Linf and
f(x) / ||w||_2 in L2: AutoAttack must leave every point robust below the smallest margin and break
every point above the largest.
"""
from __future__ import annotations

import ast
import json
import logging

import pytest
import torch
from torch import nn

import pyautoattack
from pyautoattack import checks as aa_checks
from pyautoattack.state import EvaluationState

from methods import autoattack_adapter

from methods.autoattack_adapter import (ATTACK_NAMES, PINNED_VERSION, AutoAttackCheckError,
                                        AutoAttackResult, run_autoattack)
from methods.threat import ThreatModel

N, SHAPE, N_CLASSES = 8, (1, 8, 8), 10
D = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core box: a second intra-op thread only adds contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def images(seed: int = 0, lo: float = 0.4, hi: float = 0.6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(N, *SHAPE, generator=g)


def margin_model(x: torch.Tensor, min_margin_linf: float = 0.01):
    """Model, labels and per-point exact boundary distances {'linf': ..., 'l2': ...}."""
    g = torch.Generator().manual_seed(1)
    w = torch.randint(0, 2, (D,), generator=g).float() * 2 - 1
    score = x.flatten(1) @ w
    b0 = -score.min() + min_margin_linf * w.abs().sum()
    lin = nn.Linear(D, N_CLASSES)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0] = w
        lin.bias.copy_(-10.0 - torch.arange(N_CLASSES))  # distinct, or DLR's ratio is flat
        lin.bias[0] = b0
        lin.bias[1] = 0.0
    model = nn.Sequential(nn.Flatten(), lin).eval()
    f = score + b0
    return model, torch.zeros(N, dtype=torch.long), {"linf": f / w.abs().sum(), "l2": f / w.norm()}


class Constant(nn.Module):
    """Ignores its input (the 0 * x keeps x in the graph so gradients exist, and are zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.arange(N_CLASSES, dtype=torch.float))

    def forward(self, x):
        return self.bias.expand(x.shape[0], -1) + 0 * x.flatten(1).sum(1, keepdim=True)


class Noisy(nn.Module):
    """A randomized defense: Gaussian noise on the logits at every call."""

    def __init__(self, model: nn.Module, sigma: float = 0.5) -> None:
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x):
        out = self.model(x)
        return out + self.sigma * torch.randn_like(out)


class Dynamic(nn.Module):
    """A 'dynamic defense': takes an input gradient inside its forward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            g = torch.autograd.grad(self.model(xx).sum(), xx)[0]
        return self.model(x) + 0 * g.sum()


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(D, 16), nn.ReLU(), nn.Dropout(0.5),
                         nn.BatchNorm1d(16), nn.Linear(16, N_CLASSES))


def check_result(res: AutoAttackResult, model, x, y, norm: str, eps: float) -> None:
    assert res.x_adv.shape == x.shape
    assert res.robust.shape == (N,) and res.robust.dtype == torch.bool
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert ThreatModel(norm, eps).distance(res.x_adv - x).max() <= eps + 1e-6
    with torch.no_grad():
        assert torch.equal(res.robust, model(res.x_adv).argmax(1) == y)
    assert res.robust_accuracy == pytest.approx(res.robust.float().mean().item())
    assert res.package == "pyautoattack" and res.package_version == PINNED_VERSION
    json.dumps(res.to_dict())


# ----------------------------------------------------------------------------- known margins

@pytest.mark.parametrize("norm, version, attacks", [
    ("linf", "standard", None),                        # the one full standard run (~4 CPU s)
    ("l2", "custom", ["apgd-ce", "apgd-t", "fab-t"]),  # standard minus Square's 5000 queries
])
def test_no_point_is_broken_below_the_margin(norm, version, attacks):
    x = images()
    model, y, dist = margin_model(x)
    eps = 0.5 * dist[norm].min().item()
    res = run_autoattack(model, x, y, norm=norm, eps=eps, version=version, attacks=attacks, seed=0)
    check_result(res, model, x, y, norm, eps)
    assert res.robust.all() and res.robust_accuracy == 1.0
    run = ["apgd-ce", "apgd-t", "fab-t", "square"] if attacks is None else attacks
    assert res.attacks == run and res.version == version
    assert res.per_attack == {"clean": 1.0, **{a: 1.0 for a in run}}
    assert torch.equal(res.x_adv, x)
    assert res.warnings == []


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_standard_breaks_every_point_above_the_margin(norm):
    x = images()
    model, y, dist = margin_model(x)
    eps = 2.0 * dist[norm].max().item()
    # the minimal perturbation moves every pixel by f / ||w||_1 (both norms): inside the box
    assert 2.0 * dist["linf"].max() < 0.4
    res = run_autoattack(model, x, y, norm=norm, eps=eps, seed=0)
    check_result(res, model, x, y, norm, eps)
    assert res.robust_accuracy == 0.0 and not res.robust.any()
    # AutoAttack stops once nothing is robust: later attacks are not in its report
    assert res.per_attack == {"clean": 1.0, "apgd-ce": 0.0}
    d = res.to_dict()
    assert d["norm"] == norm and d["eps"] == eps and d["n_examples"] == N
    assert "x_adv" not in d and "robust" not in d


def test_constant_model_keeps_its_clean_accuracy_and_zero_gradients_are_reported():
    x = images(lo=0.0, hi=1.0)
    model = Constant().eval()
    y = torch.tensor([9, 9, 9, 9, 0, 1, 2, 3])  # the model always says 9: clean accuracy 1/2
    res = run_autoattack(model, x, y, norm="linf", eps=8 / 255, version="custom",
                         attacks=["apgd-ce", "apgd-t"], seed=0)
    check_result(res, model, x, y, "linf", 8 / 255)
    assert res.robust.tolist() == [True] * 4 + [False] * 4
    assert res.robust_accuracy == 0.5
    assert set(res.per_attack.values()) == {0.5}
    assert torch.equal(res.x_adv, x)
    assert any("zero gradient" in w for w in res.warnings)
    assert len(res.warnings) == len(set(res.warnings))  # APGD-T warns once per target: deduped


# ----------------------------------------------------------------------------- mode, seeds

def test_eval_mode_for_the_run_and_every_module_mode_restored():
    model = small_net()
    x = images(lo=0.0, hi=1.0)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    model.train()
    model[4].eval()  # a mixed-mode model must stay mixed
    before = [m.training for m in model.modules()]
    seen = []
    model.register_forward_pre_hook(
        lambda m, inp: seen.append(any(s.training for s in m.modules())))
    res = run_autoattack(model, x, y, norm="linf", eps=4 / 255, version="custom",
                         attacks=["apgd-ce"], seed=0)
    assert seen and not any(seen)
    assert [m.training for m in model.modules()] == before
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    # dropout was off, so the package saw a deterministic model
    assert not any("randomized" in w for w in res.warnings)
    check_result(res, model.eval(), x, y, "linf", 4 / 255)


def test_same_seed_same_result_and_caller_rng_untouched():
    x = images()
    base, y, dist = margin_model(x)
    model = Noisy(base, sigma=0.5)  # randomness inside the model as well as in the attack
    eps = dist["linf"].median().item()
    kwargs = dict(norm="linf", eps=eps, version="custom", attacks=["apgd-ce"])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = run_autoattack(model, x, y, seed=7, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)  # the caller's RNG state must not matter, only ``seed``
    b = run_autoattack(model, x, y, seed=7, **kwargs)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.robust, b.robust)
    assert a.per_attack == b.per_attack and a.seed == 7


# ----------------------------------------------------------------------------- warnings

def test_probability_outputs_are_captured_not_printed(caplog, capsys, tmp_path):
    x = images(lo=0.0, hi=1.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, N_CLASSES), nn.Softmax(dim=1)).eval()
    y = torch.zeros(N, dtype=torch.long)
    log_path = tmp_path / "aa.log"
    with caplog.at_level(logging.DEBUG):
        res = run_autoattack(model, x, y, norm="linf", eps=2 / 255, version="custom",
                             attacks=["apgd-ce"], log_path=log_path)
    assert any("probability distribution" in w for w in res.warnings)
    # the package's own records did not reach the root handlers; the adapter re-logs warnings
    assert not [r for r in caplog.records if r.name == "auto-attack"]
    assert any(r.name == "methods.autoattack_adapter" and "probability distribution" in r.message
               for r in caplog.records)
    out = capsys.readouterr()
    assert "probability" not in out.out + out.err
    text = log_path.read_text()
    assert "probability distribution" in text and "robust accuracy after APGD-CE" in text
    assert logging.getLogger("auto-attack").propagate


def test_randomized_model_warns_and_rand_version_runs():
    x = images()
    base, y, dist = margin_model(x)
    model = Noisy(base, sigma=0.5)
    res = run_autoattack(model, x, y, norm="linf", eps=0.01, version="custom",
                         attacks=["apgd-ce"], seed=0)
    assert any("randomized defense" in w for w in res.warnings)
    rand = run_autoattack(model, x, y, norm="linf", eps=2.0 * dist["linf"].max().item(),
                          version="rand", seed=0)
    assert rand.attacks == ["apgd-ce", "apgd-dlr"]
    assert not any("randomized defense" in w for w in rand.warnings)  # rand skips that check
    assert rand.robust_accuracy == 0.0


def test_dynamic_check_is_judged_per_run():
    x = images()
    base, y, _ = margin_model(x)
    kwargs = dict(norm="linf", eps=0.001, version="custom", attacks=["apgd-ce"])
    dyn = run_autoattack(Dynamic(base), x, y, **kwargs)
    assert any("dynamic defense" in w for w in dyn.warnings)
    plain = run_autoattack(base, x, y, **kwargs)  # the package's counts would leak into this run
    assert not any("dynamic defense" in w for w in plain.warnings)
    assert not any(aa_checks.funcs.values())


# ----------------------------------------------------------------------------- own checks

def _fake_run(x_adv_of, report=None):
    def run(self, x, y, /, *, batch_size=250, state_path=None):
        if report is not None:
            aa_checks.check_square_sr(dict(report), logger=self.logger)
        return x_adv_of(x), y

    return run


def test_robust_is_recomputed_not_taken_from_the_package(monkeypatch):
    x = images()
    model, y, dist = margin_model(x)
    eps = 2.0 * dist["linf"].max().item()
    w = model[1].weight[0].detach()
    # an x_adv that fools every point while the package claims nothing was broken
    fooled = lambda x_: (x_ - eps * w.sign().view(1, *SHAPE)).clamp(0, 1)
    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation",
                        _fake_run(fooled, report={"clean": 1.0, "apgd-ce": 1.0}))
    res = run_autoattack(model, x, y, norm="linf", eps=eps, version="custom", attacks=["apgd-ce"])
    assert not res.robust.any() and res.robust_accuracy == 0.0
    assert res.per_attack == {"clean": 1.0, "apgd-ce": 1.0}
    assert any(w_.startswith("adapter:") for w_ in res.warnings)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_output_outside_the_eps_ball_raises(monkeypatch, norm):
    x = images()
    model, y, _ = margin_model(x)
    eps = 0.05
    step = (eps if norm == "linf" else eps / D ** 0.5) * 1.01
    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation",
                        _fake_run(lambda x_: x_ + step))
    with pytest.raises(AutoAttackCheckError, match="ball"):
        run_autoattack(model, x, y, norm=norm, eps=eps)


def test_output_outside_the_box_raises(monkeypatch):
    x = images(lo=0.0, hi=1.0)
    model, y, _ = margin_model(x)
    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation",
                        _fake_run(lambda x_: x_ * 0 + 1.001))
    with pytest.raises(AutoAttackCheckError, match=r"\[0, 1\]"):
        run_autoattack(model, x, y, norm="linf", eps=0.5)


# ----------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_inputs_outside_the_unit_box_raise(bad):
    x = images()
    model, y, _ = margin_model(x)
    x[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="x "):
        run_autoattack(model, x, y, norm="linf", eps=0.1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(norm="l1"), "norm"),
    (dict(eps=0.0), "eps"),
    (dict(eps=float("inf")), "eps"),
    (dict(version="fast"), "version"),
    (dict(attacks=["apgd-ce"]), "custom"),
    (dict(version="custom"), "attacks"),
    (dict(version="custom", attacks=["pgd"]), "unknown attacks"),
    (dict(batch_size=0), "batch_size"),
    (dict(seed=None), "seed"),
])
def test_bad_arguments_raise(kwargs, match):
    x = images()
    model, y, _ = margin_model(x)
    args = dict(norm="linf", eps=0.1) | kwargs
    with pytest.raises(ValueError, match=match):
        run_autoattack(model, x, y, **args)


def test_bad_shapes_raise():
    x = images()
    model, y, _ = margin_model(x)
    with pytest.raises(ValueError, match="y must"):
        run_autoattack(model, x, y[:-1], norm="linf", eps=0.1)
    with pytest.raises(ValueError, match="y must"):
        run_autoattack(model, x, y.float(), norm="linf", eps=0.1)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        run_autoattack(model, x.flatten(1), y, norm="linf", eps=0.1)


def test_attack_names_come_from_the_package():
    assert set(ATTACK_NAMES) == {"apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"}


# ----------------------------------------------------------------------------- resuming

class Killed(BaseException):
    """Stands for a kill (not an ``Exception``, so nothing can swallow it)."""


def _repaired_from_disk(monkeypatch):
    """The package writes its state's ``_attacks_to_run`` (a set) through ``json.dump(...,
    default=str)``, so it reads back as the set's repr and never equals the run's attacks;
    repair that on reading, to reach the code path behind it."""
    read = EvaluationState.from_disk.__func__

    def from_disk(cls, path):
        state = read(cls, path)
        state._attacks_to_run = set(ast.literal_eval(state._attacks_to_run))
        return state

    monkeypatch.setattr(EvaluationState, "from_disk", classmethod(from_disk))


@pytest.mark.parametrize("case", ["later success", "final return"])
def test_the_package_resume_path_leaves_y_adv_unbound(tmp_path, monkeypatch, case):
    """Why the adapter never hands the package a restored state (pinned 0.2.0): a state whose
    robust flags are already set skips the branch that assigns ``y_adv``, so the resumed run
    dies with ``UnboundLocalError`` at its first success, or at its final return when nothing is
    left to attack."""
    x = images()
    model, y, dist = margin_model(x)
    eps = 2.0 * dist["linf"].max().item()            # APGD-T breaks every point it is given
    attacks = ["apgd-ce", "apgd-t"]
    path = tmp_path / "state.json"
    state = EvaluationState(set(attacks), path=path)
    state.add_run_attack("apgd-ce")
    state.clean_accuracy = 1.0
    # later success: every point still robust; final return: none left (APGD-CE broke them all)
    state.robust_flags = torch.full((N,), case == "later success")
    adversary = lambda: pyautoattack.AutoAttack(model, attacks=attacks, version="custom",
                                                eps=eps, seed=0)
    with pytest.raises(ValueError, match="different set of attacks"):
        adversary().run_standard_evaluation(x, y, state_path=path)   # the set round trip
    _repaired_from_disk(monkeypatch)
    with pytest.raises(UnboundLocalError, match="y_adv") as err:
        adversary().run_standard_evaluation(x, y, state_path=path)
    failing_line = err.traceback[-1].statement.lines[0].strip()
    assert failing_line.startswith("y_adv[non_robust_lin_idcs] =" if case == "later success"
                                   else "return x_adv, y_adv")


def package_spy(monkeypatch, kill_at=None):
    """Record which attack and how many points each call of the package gets; die at call
    ``kill_at`` (1-based)."""
    calls = []
    run = pyautoattack.AutoAttack.run_standard_evaluation

    def spy(self, x, y, **kwargs):
        calls.append((tuple(self.attacks_to_run), len(x)))
        if len(calls) == kill_at:
            raise Killed(f"killed in package call {kill_at}")
        return run(self, x, y, **kwargs)

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", spy)
    return calls


def same_result(a: AutoAttackResult, b: AutoAttackResult) -> None:
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.robust, b.robust)
    assert a.per_attack == b.per_attack and a.warnings == b.warnings


def test_the_batch_by_batch_run_is_the_package_run(tmp_path, monkeypatch):
    """With ``state_path`` the package runs one sub-attack batch at a time; for a deterministic
    model that is its single call bit for bit (flags, x_adv, per-attack accuracies, warnings),
    and a finished state returns without calling the package."""
    model = small_net().eval()
    x = images(lo=0.0, hi=1.0)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % N_CLASSES                      # one clean error
    kwargs = dict(norm="linf", eps=0.05, version="custom", attacks=["apgd-ce", "apgd-t"],
                  seed=0, batch_size=3, iterations=10)
    one = run_autoattack(model, x, y, **kwargs)
    assert one.per_attack["clean"] > one.per_attack["apgd-ce"] > 0   # a real comparison
    done = []
    calls = package_spy(monkeypatch)
    batched = run_autoattack(model, x, y, state_path=tmp_path / "aa.pt",
                             on_attack_done=lambda *a: done.append(a), **kwargs)
    same_result(one, batched)
    robust_after = [round(one.per_attack[a] * N) for a in ("apgd-ce", "apgd-t")]
    assert done == [("apgd-ce", robust_after[0], "run"), ("apgd-t", robust_after[1], "run")]
    assert [n for _, n in calls] == [3, 3, 1, *([3] * (robust_after[0] // 3)),
                                     *([robust_after[0] % 3] if robust_after[0] % 3 else [])]
    monkeypatch.undo()
    calls = package_spy(monkeypatch, kill_at=1)
    again = run_autoattack(model, x, y, state_path=tmp_path / "aa.pt",
                           on_attack_done=lambda *a: done.append(a), **kwargs)
    same_result(one, again)
    assert calls == [] and [s for _, _, s in done[2:]] == ["restored", "restored"]
    monkeypatch.undo()
    # The package's checks and APGD's zero-gradient warnings come out the same too.
    constant, y = Constant().eval(), torch.tensor([9, 9, 9, 9, 0, 1, 2, 3])
    plain = run_autoattack(constant, x, y, **kwargs)
    assert any("zero gradient" in w for w in plain.warnings)
    same_result(plain, run_autoattack(constant, x, y, state_path=tmp_path / "c.pt", **kwargs))


@pytest.mark.parametrize("case", ["later success", "nothing more broken", "all done"])
def test_a_killed_run_resumes_from_its_state_with_the_flags_set(tmp_path, monkeypatch, case):
    """The package's failing case through the adapter: a state whose flags are already set (some
    points broken before the kill).  Killed in APGD-CE's second batch (the resumed run breaks
    more points), in APGD-T's first batch after APGD-CE broke half (the resumed run breaks
    nothing and returns), or after the last batch (nothing left to run): each resumed run
    calls the package only for the batches not yet done and returns the uninterrupted result."""
    x = images()
    model, y, dist = margin_model(x)
    eps = (dist["linf"].median() if case == "nothing more broken" else 2.0 * dist["linf"].max()).item()
    kwargs = dict(norm="linf", eps=eps, version="custom", attacks=["apgd-ce", "apgd-t"],
                  seed=0, batch_size=3, iterations=20)
    whole = run_autoattack(model, x, y, **kwargs)
    path = tmp_path / "aa.pt"
    if case == "all done":
        predict = autoattack_adapter._predict

        def dying_predict(*args):      # the state is complete when the final check runs
            raise Killed("killed after the last batch")
        monkeypatch.setattr(autoattack_adapter, "_predict", dying_predict)
        package_spy(monkeypatch)
    else:
        package_spy(monkeypatch, kill_at=2 if case == "later success" else 4)
    with pytest.raises(Killed):
        run_autoattack(model, x, y, state_path=path, **kwargs)
    state = torch.load(path, weights_only=True)
    assert state["robust"].sum() < N                    # flags already set: points broken
    monkeypatch.undo()

    calls = package_spy(monkeypatch)
    resumed = run_autoattack(model, x, y, state_path=path, **kwargs)
    same_result(whole, resumed)
    if case == "later success":
        assert whole.per_attack == {"clean": 1.0, "apgd-ce": 0.0}
        assert calls == [(("apgd-ce",), 3), (("apgd-ce",), 2)]     # batches 2 and 3
    elif case == "nothing more broken":
        assert whole.per_attack == {"clean": 1.0, "apgd-ce": 0.5, "apgd-t": 0.5}
        assert calls == [(("apgd-t",), 3), (("apgd-t",), 1)]       # APGD-T again, from batch 1
        assert torch.equal(resumed.robust, dist["linf"] > eps)
    else:
        assert calls == []


def test_a_state_of_another_run_is_not_used(tmp_path):
    x = images()
    model, y, dist = margin_model(x)
    path = tmp_path / "aa.pt"
    kwargs = dict(norm="linf", version="custom", attacks=["apgd-ce"], seed=0, batch_size=4)
    low = run_autoattack(model, x, y, eps=0.5 * dist["linf"].min().item(), state_path=path,
                         **kwargs)
    assert low.robust.all()
    high = run_autoattack(model, x, y, eps=2.0 * dist["linf"].max().item(), state_path=path,
                          **kwargs)
    assert not high.robust.any()                    # not the finished low-eps state
    assert torch.load(path, weights_only=True)["key"]["eps"] == high.eps


def test_attack_budget_reads_the_package_settings():
    standard = autoattack_adapter.attack_budget("standard")
    assert standard == {"apgd-ce": 100.0, "apgd-t": 900.0, "fab-t": 900.0, "square": 5000 / 3}
    assert autoattack_adapter.attack_budget("rand") == {"apgd-ce": 2000.0, "apgd-dlr": 2000.0}
    assert autoattack_adapter.attack_budget("custom", ["apgd-ce"], iterations=10) == {"apgd-ce": 50.0}
