"""ISDA, IADA and Meta-IADA: the online covariance estimator against torch.cov, the augmented
logits against a per-pair computation (both shift forms), Jensen's bound against Monte Carlo,
the look-ahead rules against the real optimizers, the meta step (hypergradient, untouched
classifier, pass counts under torch.func), refused heads, recipes, and kill-and-resume."""
import copy
import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import methods.algorithms  # noqa: F401
from methods import training
from methods.algorithms.base import MethodData, SetupContext, StepContext
from methods.algorithms.feature_stats import ClassCovariance
from methods.algorithms.iada import class_prior_epsilon, iada_logits
from methods.algorithms.isda import isda_logits
from methods.algorithms.meta_iada import (CHARACTERISTICS, OPTIMIZER_RULES, Lookahead,
                                          base_characteristics, lookahead_params)
from methods.builders import build_method, build_threat
from methods.config import REPO_ROOT, load_recipes, load_yaml, resolve_cell
from methods.data import prepare_dataset
from methods.data.splits import Split
from methods.measure.passes import PassCounter
from methods.models import build_model
from methods.registry import METHODS
from methods.runtime import Precision
from methods.threat import ThreatModel
from tests.helpers import TinyNet, assert_same_training, kill_then_resume, rehash, run, tiny_cell


THREAT = ThreatModel("linf", 0.1)
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- helpers
def spd(c, d, generator, scale=1.0):
    """c random symmetric positive definite d x d matrices."""
    a = torch.randn(c, d, d, generator=generator, dtype=torch.float64)
    return (scale * (a @ a.transpose(1, 2) / d + 0.1 * torch.eye(d, dtype=torch.float64))).float()


def method_data(num_classes=10, feature_dim=16, counts=None, meta_n=40, image=(1, 8, 8)):
    g = torch.Generator().manual_seed(11)
    meta = Split(x=(torch.rand(meta_n, *image, generator=g) * 255).to(torch.uint8),
                 y=torch.arange(num_classes).repeat(meta_n // num_classes),
                 indices=torch.arange(meta_n))
    counts = torch.tensor(counts if counts is not None else [50, 30, 20, 10, 8, 6, 4, 3, 2, 1])
    return MethodData(num_classes=num_classes, image_shape=image, feature_dim=feature_dim,
                      class_counts=counts, meta=meta, device=CPU)


def setup(method, model, data=None, epochs=2, seed=0):
    method.setup(model, data or method_data(), SetupContext(
        device=CPU, generator=torch.Generator().manual_seed(seed), epochs=epochs,
        steps_per_epoch=3, precision=Precision.FP32))
    return method


def step_ctx(model, optimizer, epoch=1, step=0, epochs=2, counter=None, seed=0, rows=16):
    """A step context like the trainer's, whose batch holds training examples 0..rows-1."""
    return StepContext(epoch=epoch, step_in_epoch=step, steps_per_epoch=3, epochs=epochs,
                       device=CPU, counter=counter or PassCounter(model),
                       generator=torch.Generator().manual_seed(seed), optimizer=optimizer,
                       indices=torch.arange(rows))


def batch(n=16, classes=10, image=(1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *image, generator=g), torch.randint(0, classes, (n,), generator=g)


# ----------------------------------------------------------------------------- the estimator
def test_covariance_estimator_is_the_pooled_covariance_of_everything_seen():
    """After every batch (unequal class mixes, classes missing from some batches, a class seen
    once), each class's mean and covariance equal those of the concatenation of all its features
    so far, with the code's normalisation: divide by N (torch.cov correction=0), not N - 1."""
    g = torch.Generator().manual_seed(0)
    est = ClassCovariance(num_classes=5, feature_dim=4)
    labels_per_batch = [torch.tensor([0, 0, 0, 1, 1, 2, 0]),          # 3 and 4 absent
                        torch.tensor([1] * 9 + [2]),                    # 2 seen once here
                        torch.tensor([3]),                              # one example only
                        torch.tensor([0, 3, 3, 1, 0, 2, 2, 2, 0, 0, 3, 1, 1])]
    seen = {c: [] for c in range(5)}
    for labels in labels_per_batch:
        feats = torch.randn(len(labels), 4, generator=g) * 3 + labels[:, None].float()
        est.update(feats, labels)
        for f, c in zip(feats, labels.tolist()):
            seen[c].append(f)
        for c in range(5):
            if not seen[c]:
                assert est.counts[c] == 0 and not est.means[c].any() and not est.covariances[c].any()
                continue
            stacked = torch.stack(seen[c]).double()
            assert est.counts[c] == len(seen[c])
            torch.testing.assert_close(est.means[c].double(), stacked.mean(0), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(est.covariances[c].double(),
                                       torch.cov(stacked.T, correction=0).reshape(4, 4),
                                       atol=1e-5, rtol=1e-5)
    assert est.nbytes() == 5 * 4 * 4 * 4 + 5 * 4 * 4 + 5 * 8


def test_estimator_is_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(3)
    feats, labels = torch.randn(30, 6, generator=g), torch.randint(0, 3, (30,), generator=g)
    plain, amp = ClassCovariance(3, 6), ClassCovariance(3, 6)
    plain.update(feats, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp.update(feats, labels)
    assert amp.covariances.dtype == torch.float32
    assert torch.equal(amp.covariances, plain.covariances) and torch.equal(amp.means, plain.means)


def test_estimator_state_size_for_cifar100_wrn28_10():
    # 100 classes x 640 x 640 fp32 covariances = 163,840,000 bytes (156.25 MiB)
    assert 100 * 640 * 640 * 4 == 163_840_000
    est = ClassCovariance(num_classes=100, feature_dim=64)          # ResNet-32's D (1.6 MB)
    assert est.covariances.dtype == torch.float32
    assert est.nbytes() == 100 * 64 * 64 * 4 + 100 * 64 * 4 + 100 * 8


# ----------------------------------------------------------------------------- augmented logits
def direct_logits(z, a, y, W, sigma, eps, alpha, beta, shift):
    """The IADA/ISDA logits one (i, j) pair at a time."""
    out = z.clone().double()
    W, a, sigma, z = W.double(), a.double(), sigma.double(), z.double()
    for i in range(len(y)):
        yi = int(y[i])
        p = z[i].softmax(0)
        g = sum(p[k] * (W[k] - W[yi]) for k in range(W.shape[0]))
        d = g / (g.norm() + 1e-12)
        for j in range(W.shape[0]):
            dw = W[j] - W[yi]
            quad = dw @ sigma[yi] @ dw
            s = float(eps[i]) * (dw.norm() if shift == "pair" else dw @ d)
            out[i, j] = z[i, j] + (beta * s if j != yi else 0.0) + 0.5 * alpha * quad
    return out


@pytest.mark.parametrize("shift", ["pair", "gradient"])
def test_iada_logits_equal_a_direct_per_pair_computation(shift):
    g = torch.Generator().manual_seed(1)
    B, C, D = 9, 6, 5
    z, a = torch.randn(B, C, generator=g), torch.randn(B, D, generator=g)
    y = torch.tensor([0, 2, 2, 5, 1, 0, 3, 2, 5])                     # class 4 absent
    W, sigma = torch.randn(C, D, generator=g), spd(C, D, g)
    eps = torch.randn(B, generator=g)                                 # both signs
    got = iada_logits(z, a, y, W, sigma, eps, alpha=0.7, beta=1.3, shift=shift)
    torch.testing.assert_close(got.double(), direct_logits(z, a, y, W, sigma, eps, 0.7, 1.3, shift),
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(got.gather(1, y[:, None]), z.gather(1, y[:, None]))  # j = y unchanged
    # ISDA is the beta = 0 case, and its gradients are finite at the j = y pairs.
    torch.testing.assert_close(isda_logits(z, y, W, sigma, 0.7),
                               iada_logits(z, a, y, W, sigma, eps, alpha=0.7, beta=0.0, shift=shift))
    Wg = W.clone().requires_grad_()
    F.cross_entropy(iada_logits(z, a, y, Wg, sigma, eps, alpha=0.7, beta=1.0, shift=shift), y).backward()
    assert torch.isfinite(Wg.grad).all()


def mc_and_closed_form(scale, shift, eps_value, samples=4000, seed=2):
    """Per-sample Monte-Carlo CE over a~ ~ N(a + delta, alpha * scale * Sigma_y) (delta the
    form-B shift of norm |eps|) and the closed-form IADA loss, both (B,)."""
    g = torch.Generator().manual_seed(seed)
    B, C, D, alpha = 6, 4, 3, 0.8
    a, y = torch.randn(B, D, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1, 0])
    W, b = torch.randn(C, D, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)
    sigma = spd(C, D, g).double() * scale
    eps = torch.full((B,), float(eps_value), dtype=torch.float64)
    z = a @ W.T + b
    p = z.softmax(1)
    grad_a = p @ W - W[y]
    delta = eps[:, None] * grad_a / (grad_a.norm(dim=1, keepdim=True) + 1e-12)
    chol = torch.linalg.cholesky(alpha * sigma[y])                    # (B, D, D)
    xi = torch.randn(samples, B, D, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    a_tilde = a + delta + torch.einsum("bde,sbe->sbd", chol, xi)
    ce = F.cross_entropy((a_tilde @ W.T + b).reshape(-1, C), y.repeat(samples), reduction="none")
    ce = ce.reshape(samples, B)
    closed = F.cross_entropy(iada_logits(z, a, y, W, sigma, eps, alpha=alpha, beta=1.0, shift=shift),
                             y, reduction="none")
    return ce.mean(0), ce.std(0) / math.sqrt(samples), closed


@pytest.mark.parametrize("shift,eps", [("gradient", 0.0), ("gradient", 0.7), ("gradient", -0.7),
                                       ("pair", 0.7)])
def test_closed_form_upper_bounds_monte_carlo_and_meets_it_as_the_covariance_shrinks(shift, eps):
    """Jensen: CE(z~) >= E CE(W a~ + b) for the Gaussian augmentation (eps = 0 is ISDA).  Form A
    (pair) with eps >= 0 bounds it for every shift of norm <= eps, the form-B one included.  As
    Sigma -> 0 the gap closes (exactly, for form B and ISDA; form A keeps its worst-case margin)."""
    gaps = []
    for scale in (1.0, 0.1, 0.01):
        mc, se, closed = mc_and_closed_form(scale, shift, eps)
        assert (closed >= mc - 4 * se).all(), (scale, closed, mc)
        gaps.append(float((closed - mc).mean()))
    assert gaps[0] > gaps[1] > gaps[2] >= -1e-3
    if shift == "gradient":
        assert gaps[2] < 0.02 * gaps[0] + 1e-3


# ----------------------------------------------------------------------------- ISDA / IADA methods
def test_isda_updates_the_estimator_before_its_loss_and_ramps_lambda():
    torch.manual_seed(0)
    model = TinyNet()
    m = setup(METHODS.get("isda")(threat=THREAT, lambda0=0.5), model, epochs=4)
    x, y = batch()
    ctx = step_ctx(model, None, epoch=2, epochs=4)
    loss = m.loss(model, x, y, ctx)
    logits, feats = model.forward_with_features(x)
    fresh = ClassCovariance(10, 16)
    fresh.update(feats, y)                               # the covariance of this very batch
    ratio = 0.5 * 2 / 4
    expected = F.cross_entropy(isda_logits(logits, y, model.head.weight, fresh.covariances, ratio), y)
    torch.testing.assert_close(loss, expected)
    assert ctx.stats["isda_lambda"] == ratio
    assert torch.equal(m.estimator.counts, torch.bincount(y, minlength=10))


def test_class_prior_epsilon_gives_the_tail_epsilon_and_scales_as_pi_to_minus_a_quarter():
    counts = torch.tensor([400, 100, 25, 0])
    eps = class_prior_epsilon(counts, 0.8)
    assert eps[2] == pytest.approx(0.8) and eps[3] == pytest.approx(0.8)
    assert eps[0] / eps[2] == pytest.approx((400 / 25) ** -0.25)
    model = TinyNet(num_classes=4)
    m = setup(METHODS.get("iada")(threat=THREAT, epsilon_mode="class_prior", epsilon=0.8), model,
              method_data(num_classes=4, counts=[400, 100, 25, 0], meta_n=8))
    torch.testing.assert_close(m.class_epsilon, eps)


@pytest.mark.parametrize("name", ["isda", "iada", "meta_iada"])
def test_heads_whose_logits_are_not_linear_in_the_features_are_refused(name):
    model = build_model("resnet32", num_classes=10, image_shape=(3, 32, 32), mean=(0, 0, 0),
                        std=(1, 1, 1), width=0.125, normed_head=True)
    with pytest.raises(ValueError, match=f"method '{name}'.*NormedLinear.*normed_head"):
        setup(METHODS.get(name)(threat=THREAT), model, method_data(feature_dim=8, image=(3, 32, 32)))
    other = TinyNet()
    other.head = nn.Sequential(nn.Linear(16, 10))
    with pytest.raises(ValueError, match="Sequential"):
        setup(METHODS.get(name)(threat=THREAT), other)


@pytest.mark.parametrize("name,field,value", [("iada", "shift", "sideways"),
                                              ("meta_iada", "output", "sigmoid"),
                                              ("meta_iada", "lookahead", "adam"),
                                              ("meta_iada", "meta_interval", 0)])
def test_bad_options_name_the_field_and_value(name, field, value):
    with pytest.raises(ValueError, match=f"{field}.*{value!r}"):
        METHODS.get(name)(threat=THREAT, **{field: value})


# ----------------------------------------------------------------------------- characteristics
def test_the_15_characteristics_on_a_hand_computed_example():
    assert len(CHARACTERISTICS) == 15
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    y = torch.tensor([0, 2])
    p = logits.softmax(1)
    got = base_characteristics(logits, y)
    expected = torch.stack([
        -p[[0, 1], [0, 2]].log(),
        torch.tensor([2.0, 0.0]),
        p[[0, 1], [0, 2]],
        torch.stack([(torch.tensor([1., 0, 0]) - p[0]).norm(), (torch.tensor([0., 0, 1]) - p[1]).norm()]),
        torch.stack([p[0, 0] - p[0, 1], p[1, 2] - p[1, 1]]),
        (p * p.log()).sum(1)], dim=1)
    torch.testing.assert_close(got, expected)


def test_history_rolls_class_means_and_the_class_loss_at_the_epoch_boundary():
    torch.manual_seed(0)
    model = TinyNet(batchnorm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    m = setup(METHODS.get("meta_iada")(threat=THREAT, history="class", meta_interval=100,
                                             meta_batch_size=20), model)
    x, _ = batch(20, seed=3)
    y = torch.arange(20) % 8                                                   # 8 and 9 absent
    assert torch.equal(m.records.previous(y, None), torch.ones(20, 6))         # as coded: ones
    assert torch.equal(m.class_loss_last, torch.full((10,), 5.0))              # CAAT: 5
    with torch.no_grad():
        logits_before = model(x)
    m.step(model, x, y, step_ctx(model, opt, epoch=0))
    base = base_characteristics(logits_before, y)
    m.start_epoch(model, step_ctx(model, opt, epoch=1))
    for c in y.unique().tolist():
        rows = y == c
        torch.testing.assert_close(m.records.previous(y[rows][:1], None)[0], base[rows].mean(0))
        torch.testing.assert_close(m.class_loss_last[c], base[rows, 0].sum() / (rows.sum() + 1e-6))
    absent = [c for c in range(10) if c not in y.tolist()]
    assert absent and all(m.class_loss_last[c] == 0.0 for c in absent)        # CAAT: 0 / 1e-6
    assert all(torch.equal(m.records.last[c], torch.ones(6)) for c in absent)  # buffers kept


def test_sample_history_needs_indices_and_uses_them():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    m = setup(METHODS.get("meta_iada")(threat=THREAT, history="sample", meta_interval=100,
                                       meta_batch_size=20), model)
    x, y = batch(8)
    without = step_ctx(model, opt, epoch=0)
    without.indices = None
    with pytest.raises(ValueError, match="history='sample' needs.*ctx.indices"):
        m.step(model, x, y, without)
    ctx = step_ctx(model, opt, epoch=0)
    ctx.indices = torch.tensor([5, 0, 7, 100, 3, 2, 1, 131])
    with torch.no_grad():
        base = base_characteristics(model(x), y)
    m.step(model, x, y, ctx)
    m.start_epoch(model, step_ctx(model, opt, epoch=1))
    torch.testing.assert_close(m.records.previous(y, ctx.indices), base)
    assert torch.equal(m.records.last[4], torch.ones(6))                     # unseen example


# ----------------------------------------------------------------------------- look-ahead and meta step
@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.3),
    lambda p: torch.optim.SGD(p, lr=0.1),
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4),
])
@pytest.mark.parametrize("steps_before", [0, 2])
def test_optimizer_lookahead_equals_the_optimizers_own_step(make, steps_before):
    torch.manual_seed(0)
    model = TinyNet(batchnorm=True)
    opt = make(model.parameters())
    x, y = batch(12)
    for _ in range(steps_before):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    params = dict(model.named_parameters())
    theta = {n: p.detach().clone() for n, p in params.items()}
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    ahead = lookahead_params(theta, grads, params, opt, opt.param_groups[0]["lr"], Lookahead.OPTIMIZER)
    for n, p in params.items():
        p.grad = grads[n].clone()
    opt.step()
    for n, p in params.items():
        torch.testing.assert_close(ahead[n], p.detach(), atol=1e-6, rtol=1e-5)
    assert set(OPTIMIZER_RULES) == {torch.optim.SGD, torch.optim.Adam}


def reference_hypergradient(m, model, x, y, x_meta, y_meta, previous, ctx, lookahead):
    """d meta-loss / d phi written with torch.autograd (create_graph) and a hand-rolled
    look-ahead, independently of the method's torch.func code."""
    from torch.func import functional_call
    names = [n for n, _ in model.named_parameters()]
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    phi = [p.detach().clone().requires_grad_() for p in m.pnet.parameters()]
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    pbufs = {n: b.clone() for n, b in m.pnet.named_buffers()}
    pnames = [n for n, _ in m.pnet.named_parameters()]
    logits, feats = functional_call(m.wrapped, {**{f"model.{n}": t for n, t in zip(names, theta)},
                                                **{f"model.{n}": b for n, b in bufs.items()}}, (x,))
    from methods.algorithms.meta_iada import characteristics
    c = characteristics(logits.detach(), y, m.class_rate, m.class_loss_last, previous,
                        ctx.epoch / ctx.epochs)
    eps = m.eps_max * torch.tanh(functional_call(m.pnet, {**dict(zip(pnames, phi)), **pbufs}, (c,)))
    alpha_t = m.alpha * ctx.epoch / ctx.epochs
    W = theta[names.index(m.head_weight)]
    loss = F.cross_entropy(iada_logits(logits, feats, y, W, m.estimator.covariances, eps,
                                       alpha=alpha_t, beta=m.beta, shift=m.shift), y)
    gs = torch.autograd.grad(loss, theta, create_graph=True)
    ahead = lookahead_params(dict(zip(names, theta)), dict(zip(names, gs)),
                             dict(model.named_parameters()), ctx.optimizer, ctx.lr, lookahead)
    meta_logits, _ = functional_call(m.wrapped, {**{f"model.{n}": t for n, t in ahead.items()},
                                                 **{f"model.{n}": b for n, b in bufs.items()}}, (x_meta,))
    return torch.autograd.grad(F.cross_entropy(meta_logits, y_meta), phi)


@pytest.mark.parametrize("lookahead", ["optimizer", "sgd"])
def test_meta_step_changes_only_the_perturbation_net_by_the_right_hypergradient(lookahead):
    torch.manual_seed(0)
    model = TinyNet(batchnorm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    m = setup(METHODS.get("meta_iada")(threat=THREAT, meta_interval=1, meta_batch_size=20,
                                       lookahead=lookahead), model)
    x, y = batch(16, seed=4)
    m.step(model, x, y, step_ctx(model, opt, epoch=1, step=5))   # no meta step; momentum exists
    m.estimator.update(torch.randn(64, 16), torch.arange(10).repeat(7)[:64])
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = copy.deepcopy(opt.state_dict())
    pnet_before = {k: v.clone() for k, v in m.pnet.state_dict().items()}
    grads_before = [p.grad.clone() for p in model.parameters()]
    ctx = step_ctx(model, opt, epoch=1)
    previous = m.records.previous(y, ctx.indices)
    gen_state = ctx.generator.get_state()
    x_meta, y_meta = copy.deepcopy(m.meta_batches).next(ctx.generator)
    ctx.generator.set_state(gen_state)
    torch.manual_seed(5)
    expected = reference_hypergradient(m, model, x, y, x_meta, y_meta, previous, ctx,
                                       Lookahead(lookahead))
    meta_loss = m.meta_update(model, x, y, previous, ctx)
    assert math.isfinite(meta_loss)
    for (n, p), e in zip(m.pnet.named_parameters(), expected):
        torch.testing.assert_close(p.grad, e, atol=1e-6, rtol=1e-4)
    after = model.state_dict()
    assert all(torch.equal(model_before[k], after[k]) for k in after), "classifier touched"
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads_before))
    assert str(opt.state_dict()) == str(opt_before)
    assert any(not torch.equal(pnet_before[k], v) for k, v in m.pnet.state_dict().items()
               if k.endswith("weight") or k.endswith("bias"))


def test_pass_counting_sees_the_meta_steps_forwards_and_backwards_under_torch_func():
    torch.manual_seed(0)
    model = TinyNet(batchnorm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    m = setup(METHODS.get("meta_iada")(threat=THREAT, meta_interval=2, meta_batch_size=20), model)
    counter = PassCounter(model)
    x, y = batch(16)
    m.step(model, x, y, step_ctx(model, opt, step=0, counter=counter))      # no meta step
    assert counter.totals() == {"train": {"forward": 16, "backward": 16}}
    counter.reset()
    ctx = step_ctx(model, opt, step=1, counter=counter)
    m.step(model, x, y, ctx)                                                 # meta step
    assert ctx.stats["meta_steps"] == 1.0
    assert counter.totals_by_rows() == {
        "meta": {16: {"forward": 16, "backward": 16}, 20: {"forward": 20, "backward": 20}},
        "train": {16: {"forward": 16, "backward": 16}}}


# ----------------------------------------------------------------------------- recipes
def recipes():
    cfg = {"recipe_files": ["workflow/config/papers/mnist5k.yaml", "workflow/config/papers/iada.yaml"]}
    return cfg, load_recipes(cfg)


def test_every_iada_recipe_builds_its_method_and_the_families_share_one_training_recipe():
    cfg, rec = recipes()
    cfg = {**cfg, "datasets": {"d": {"source": "cifar100", "long_tail": {"imbalance_factor": 100}}},
           "archs": {"a": {"model": "resnet32"}}}
    mine = [n for n in rec if n in load_yaml(REPO_ROOT / "workflow/config/papers/iada.yaml")["recipes"]]
    assert mine
    for name in mine:
        cell = resolve_cell(cfg, "d", "a", name, 0, rec)
        assert build_method(cell, build_threat(cell["threat"])).name == cell["method"]
    lt = {n: rec[n] for n in ("ce_iada_cifar", "mixup_iada_cifar", "isda_iada_cifar", "iada_cifar",
                              "meta_iada_cifar")}
    assert len({str(r["train"]) for r in lt.values()}) == 1       # same recipe, method aside
    train = rec["meta_iada_cifar"]["train"]
    assert train["epochs"] == 200 and train["schedule"] == {"name": "multistep",
                                                           "milestones": [160, 180], "gamma": 0.01}
    assert rec["meta_iada_cifar"]["method_args"]["meta_interval"] == 20
    wrn = rec["isda_wrn_cifar"]["train"]     # train.py calls adjust_learning_rate(epoch + 1)
    assert wrn["schedule"]["milestones"] == [59, 119, 159, 199] and wrn["epochs"] == 240
    mnist = {n: rec[n] for n in ("standard_mnist", "isda_mnist", "iada_mnist", "meta_iada_mnist")}
    assert len({str(r["train"]) for r in mnist.values()}) == 1


def test_the_published_meta_iada_row_is_linked_and_exists():
    _, rec = recipes()
    rows = rec["meta_iada_cifar"]["published"]["rows"]
    with open(REPO_ROOT / "paper_tables/published/iada_mixup_layerwise_batchout.csv") as f:
        table = list(csv.DictReader(f))
    hits = [r for r in table if all(r[k] == v for w in rows for k, v in w.items())]
    assert [h["value"] for h in hits] == ["52.18"]
    assert "seed summary, unverified" in rec["meta_iada_cifar"]["notes"]
    variants = [n for n in rec if n.startswith("meta_iada_cifar_")]
    assert "meta_iada_cifar_alpha-a01" in variants and "meta_iada_cifar_gradient" in variants
    assert rec["meta_iada_cifar_alpha-a01"]["method_args"]["alpha"] == 0.1
    for name in variants:                      # the seed's number belongs to the default only
        assert rec[name]["published"]["rows"] == [], name
        assert "seed summary" not in rec[name]["notes"], name


# ----------------------------------------------------------------------------- kill and resume
@pytest.fixture(scope="module")
def mnist5k_lt_prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist5k_lt")
    spec = {"source": "mnist5k", "long_tail": {"imbalance_factor": 10, "meta_per_class": 10}}
    prepare_dataset("mnist5k-lt10", spec, root / "data", root / "prepared")
    return root, spec


def lt_cell(method, args, spec):
    cell = tiny_cell(method, args)
    cell["dataset"] = {"name": "mnist5k-lt10", **spec}
    cell["train"]["optimizer"]["weight_decay"] = 5e-4
    return rehash(cell)


@pytest.mark.parametrize("method,args", [
    ("isda", {}),
    ("iada", {"shift": "gradient", "epsilon_mode": "class_prior"}),
    ("meta_iada", {"meta_interval": 2, "meta_batch_size": 30, "hidden": 8}),
])
def test_killed_run_resumes_bit_for_bit_and_writes_method_state_once_per_epoch(
        method, args, mnist5k_lt_prepared, tmp_path, monkeypatch):
    root, spec = mnist5k_lt_prepared
    cell = lt_cell(method, args, spec)
    saves = []
    real_save = training._save

    def counting_save(path, obj):
        saves.append((path.name, "method" in obj))
        real_save(path, obj)

    monkeypatch.setattr(training, "_save", counting_save)
    straight = run(cell, root, tmp_path / "straight")
    epochs = cell["train"]["epochs"]
    assert saves == [("state.pt", True)] * epochs + [("best.pt", False), ("last.pt", False)]
    assert sorted(p.name for p in (tmp_path / "straight/checkpoints").iterdir()) == [
        "best.pt", "last.pt", "state.pt"]
    if method == "meta_iada":
        per_epoch = straight["history"][0]["passes"]
        assert per_epoch["meta"] == {"forward": 32 + 30, "backward": 32 + 30}   # 1 meta step of 3
        assert straight["method"]["history"] == "sample"   # the trainer passes dataset positions

    # killed after the 2nd step of the 3rd epoch (epoch=2, step=1: 0-based); the helper checks
    # what the kill left and that the rerun resumed from epoch 2
    resumed = kill_then_resume(cell, root, tmp_path / "killed", epoch=2, step=1)
    assert_same_training(tmp_path / "straight", tmp_path / "killed", straight, resumed)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]
    assert ([h["method_stats"] for h in resumed["history"]]
            == [h["method_stats"] for h in straight["history"]])
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "straight/checkpoints/state.pt", weights_only=True)["method"]
    sb = torch.load(tmp_path / "killed/checkpoints/state.pt", weights_only=True)["method"]
    flat_a, flat_b = flatten(sa), flatten(sb)
    assert flat_a.keys() == flat_b.keys()
    assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), [
        k for k in flat_a if not torch.equal(flat_a[k], flat_b[k])]
    assert sa["estimator"]["counts"].sum() == 3 * 3 * 32          # every training row, once
    assert sa["estimator"]["covariances"].abs().sum() > 0


def flatten(state, prefix=""):
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = torch.tensor(v)
    return out
