"""The method seam: setup before state is loaded, a step that owns its update, the step
context's learning rate and precision, describe() and the seeded Beta / permutation draws."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from methods import training
from methods.algorithms.base import Method
from methods.algorithms.randomness import beta, permutation
from methods.registry import METHODS
from methods.threat import ThreatModel

from tests.helpers import assert_same_training, kill_then_resume, run, tiny_cell


class LookAheadMixup(Method):
    """A test method that needs every part of the seam: ``setup`` builds a module of its own
    (a class-mean table and an auxiliary linear probe with its own optimizer) from the data
    description; ``step`` mixes inputs with a seeded Beta lambda and permutation, takes a
    look-ahead SGD step at ``ctx.lr`` on a copy of the head, then does the trainer's update
    and a probe update: two optimizers, more than one backward, all resumable."""

    name = "lookahead_test"
    paper = "test only"

    def __init__(self, *, threat, alpha: float = 1.0) -> None:
        super().__init__(threat=threat)
        self.alpha = float(alpha)
        self.seen_setup = None
        self.lrs = []

    def setup(self, model, data, ctx):
        self.seen_setup = {"num_classes": data.num_classes, "feature_dim": data.feature_dim,
                           "counts": data.class_counts.tolist(), "device": str(ctx.device)}
        self.means = torch.zeros(data.num_classes, data.feature_dim, device=ctx.device)
        self.probe = nn.Linear(data.feature_dim, data.num_classes).to(ctx.device)
        self.probe_opt = torch.optim.SGD(self.probe.parameters(), lr=0.1, momentum=0.9)

    def step(self, model, x, y, ctx):
        lam = float(beta(self.alpha, self.alpha, ctx.generator))
        perm = permutation(len(y), ctx.generator, x.device)
        x_mix = lam * x + (1 - lam) * x[perm]
        with ctx.autocast():
            h = model.forward_features(x_mix)
            logits = model.head(h)
            loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
        # Look-ahead: one SGD step of the head at the current learning rate, not applied.
        w, b = model.head.weight, model.head.bias
        gw, gb = torch.autograd.grad(loss, (w, b), retain_graph=True)
        ahead = F.linear(h.detach(), w - ctx.lr * gw, b - ctx.lr * gb)
        self.lrs.append(ctx.lr)
        ctx.update(loss + 0.0 * ahead.sum())
        probe_loss = F.cross_entropy(self.probe(h.detach()), y)
        self.probe_opt.zero_grad()
        probe_loss.backward()
        self.probe_opt.step()
        with torch.no_grad():
            self.means.index_add_(0, y, h.detach())
        ctx.stats["lambda"] = lam
        return loss.detach()

    def state_dict(self):
        return {"means": self.means, "probe": self.probe.state_dict(),
                "probe_opt": self.probe_opt.state_dict()}

    def load_state_dict(self, state):
        self.means.copy_(state["means"])      # fails unless setup() ran first
        self.probe.load_state_dict(state["probe"])
        self.probe_opt.load_state_dict(state["probe_opt"])


@pytest.fixture
def lookahead_registered(monkeypatch):
    monkeypatch.setitem(METHODS._items, LookAheadMixup.name, LookAheadMixup)
    built = []
    original = training.build_training

    def spy(*args, **kwargs):
        parts = original(*args, **kwargs)
        built.append(parts.method)
        return parts

    monkeypatch.setattr(training, "build_training", spy)
    return built


def test_a_setup_and_step_method_trains_and_resumes_bit_for_bit(
        lookahead_registered, mnist5k_prepared, tmp_path):
    cell = tiny_cell(LookAheadMixup.name, {"alpha": 0.4})
    straight = run(cell, mnist5k_prepared, tmp_path / "straight")
    method = lookahead_registered[-1]
    assert method.seen_setup["num_classes"] == 10 and method.seen_setup["device"] == "cpu"
    assert method.seen_setup["feature_dim"] == 16          # SmallCNN width 0.125: 128 / 8
    assert sum(method.seen_setup["counts"]) == 3500
    # ctx.lr is the scheduler's learning rate at each step: cyclic from 0 upwards.
    assert method.lrs[0] == 0.0 and max(method.lrs) > 0
    assert straight["history"][0]["passes"]["train"]["forward"] > 0

    # killed after the 2nd step of the 3rd epoch (epoch=2, step=1: 0-based); the helper checks
    # what the kill left and that the rerun resumed from epoch 2
    resumed = kill_then_resume(cell, mnist5k_prepared, tmp_path / "killed", epoch=2, step=1)
    assert_same_training(tmp_path / "straight", tmp_path / "killed", straight, resumed)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]
    assert ([h["method_stats"]["lambda"] for h in resumed["history"]]
            == [h["method_stats"]["lambda"] for h in straight["history"]])
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "straight/checkpoints/state.pt", weights_only=True)["method"]
    sb = torch.load(tmp_path / "killed/checkpoints/state.pt", weights_only=True)["method"]
    assert torch.equal(sa["means"], sb["means"]) and sa["means"].abs().sum() > 0
    assert all(torch.equal(sa["probe"][k], sb["probe"][k]) for k in sa["probe"])


def test_describe_records_only_declared_parameters():
    threat = ThreatModel("linf", 0.1)
    m = LookAheadMixup(threat=threat, alpha=0.3)
    m.setup_done = object()            # internal state never reaches a result file
    d = m.describe()
    assert d == {"name": "lookahead_test", "paper": "test only",
                 "threat": {"norm": "linf", "eps": 0.1}, "alpha": 0.3}


@pytest.mark.parametrize("name", METHODS.names())
def test_every_registered_method_describes_itself_as_json(name):
    method = METHODS.get(name)(threat=ThreatModel("linf", 0.1))
    described = method.describe()
    assert set(described) == {"name", "paper", "threat", *METHODS.get(name).parameters()}
    json.dumps(described)


def test_describe_names_a_parameter_that_is_not_stored():
    class Forgetful(Method):
        name = "forgetful"

        def __init__(self, *, threat, width: int = 3) -> None:
            super().__init__(threat=threat)

    with pytest.raises(AttributeError, match="'width' is not stored"):
        Forgetful(threat=ThreatModel("linf", 0.1)).describe()


def test_beta_draws_follow_beta_and_repeat_from_the_generator_state():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    draws = beta(2.0, 0.5, g, size=4000)
    assert draws.dtype == torch.float32 and draws.shape == (4000,)
    assert ((draws >= 0) & (draws <= 1)).all()
    assert stats.kstest(draws.double().numpy(), stats.beta(2.0, 0.5).cdf).pvalue > 1e-3
    g.set_state(state)
    assert torch.equal(beta(2.0, 0.5, g, size=4000), draws)
    scalar = beta(1.0, 1.0, torch.Generator().manual_seed(1))
    assert scalar.shape == () and 0 <= float(scalar) <= 1
    with pytest.raises(ValueError, match="must be > 0"):
        beta(0.0, 1.0, g)


def test_permutation_is_a_seeded_permutation():
    a = permutation(50, torch.Generator().manual_seed(5))
    b = permutation(50, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(50))
    assert not np.array_equal(a.numpy(), np.arange(50))
