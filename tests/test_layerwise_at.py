"""Layer-wise adversarial training (reconstruction of Chen & Zhang 2020, spec section 3.2):
the first layer's perturbation is FGSM in pixel space (through the model's normalisation), every
layer's perturbation has the row-l1 magnitude, the perturbed loss is a first-order ascent, hooks
never outlive a step, BatchNorm statistics move once, S1 uses the previous step's signs, the
combined variant attacks the input within eps, pass counts, and resume bit for bit."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import methods.algorithms  # noqa: F401
from methods.algorithms.layerwise_at import LAYER_TYPES, LayerwiseAT, unit_view
from methods.attacks import fgsm, pgd
from methods.models.core import Backbone, NormalizedModel, Stage, build_model
from methods.registry import METHODS
from methods.threat import ThreatModel
from tests.helpers import TinyNet, assert_same_training, kill_then_resume, make_ctx, run, tiny_cell


MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.3, 0.5)   # distinct per channel: catches a missing 1/std


def smallcnn(channels=3, size=10, width=0.25, seed=0):
    torch.manual_seed(seed)
    return build_model("smallcnn", num_classes=5, image_shape=(channels, size, size),
                       mean=MEAN[:channels], std=STD[:channels], width=width).train()


def batch(n=6, channels=3, size=10, classes=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, channels, size, size, generator=g),
            torch.randint(0, classes, (n,), generator=g))


def layer_outputs_and_grads(model, x, y):
    """Every conv/linear output of one clean forward (in call order) and dL/dy for each,
    computed here independently of the method (retain_grad on each output)."""
    outputs = []

    def keep(module, inputs, output):
        output.retain_grad()
        outputs.append((module, output))

    handles = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, LAYER_TYPES)]
    try:
        F.cross_entropy(model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return [(m, out.detach(), out.grad.detach()) for m, out in outputs]


def first_layer(model, x):
    """y_1(x) = conv1(normalize(x)): the first layer as a function of [0, 1] pixels."""
    return model.net.conv1(model.normalize(x))


def all_hooks(model):
    return [(name, len(m._forward_hooks), len(m._forward_pre_hooks))
            for name, m in model.named_modules()]


# ----------------------------------------------------------------- the first layer is FGSM
def test_first_conv_layer_perturbation_is_per_unit_fgsm_in_pixel_space():
    """For every unit k of the first conv (channel, position; SmallCNN's convs are valid, so every
    position is interior): R_1[k] = y_1[k](x + eps sign(d(G_k y_1[k])/dx)) - y_1[k](x), the
    unclamped pixel-space FGSM step on that unit, through the in-model normalisation (3 channels,
    three different stds).  The input gradient is taken from autograd's Jacobian here, not from
    the weights, and float32 agreement is to 1e-5."""
    model, (x, y) = smallcnn(), batch()
    eps = 0.05
    method = LayerwiseAT(threat=ThreatModel("linf", eps), first_layer="budget")
    tape = method.gradient_tape(model, x, y, make_ctx(model))
    first = tape[0]
    assert first.module is model.net.conv1 and first.reads_image
    assert not any(c.reads_image for c in tape[1:])
    (_, y1, g1), *_ = layer_outputs_and_grads(model, x, y)
    assert torch.equal(first.sign, g1.sign().to(torch.int8))
    r1 = method.perturbation(first, y1)
    for b in range(2):
        xb = x[b:b + 1]
        jac = torch.autograd.functional.jacobian(lambda v: first_layer(model, v), xb)
        jac = jac.reshape(y1[b].numel(), -1)                      # (units, pixels)
        g = g1[b].flatten()
        steps = eps * g.sign()[:, None] * jac.sign()              # one FGSM step per unit
        moved = first_layer(model, xb + steps.view(-1, *xb.shape[1:])).detach()
        units = torch.arange(g.numel())
        delta = moved.flatten(1)[units, units] - first_layer(model, xb).detach().flatten()
        assert torch.allclose(r1[b].flatten(), delta, atol=1e-5, rtol=0)
        assert (delta[g != 0].abs() > 0).all()
    # one FGSM step on the whole loss moves no unit further than its own worst case, eps_1 times
    # the unit's rowL1(W_1 / s) (units with G = 0 get R = 0, but FGSM may still move them)
    x_fgsm = x + eps * input_grad_sign(model, x, y)
    moved = (first_layer(model, x_fgsm) - first_layer(model, x)).detach()
    worst = unit_view(first.module, method.magnitude(first), y1)
    assert (moved.abs() <= worst + 1e-5).all() and not torch.allclose(moved, r1, atol=1e-3)


def input_grad_sign(model, x, y):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return g.sign()


class OneUnit(Backbone):
    """First layer with a single output unit: ``Linear(C*H*W, 1)`` on the flattened image, or a
    conv with one output channel and a kernel as large as the image (output 1 x 1 x 1)."""

    def __init__(self, kind, channels=3, size=6, classes=4, units=1):
        super().__init__()
        first = (nn.Linear(channels * size * size, units) if kind == "linear"
                 else nn.Conv2d(channels, units, size))
        self.flatten_first = kind == "linear"
        self.first, self.flat, self.act = first, nn.Flatten(), nn.Tanh()
        self.head = nn.Linear(units, classes)
        self.declare_stages(Stage("features", "act", units, 0))

    def forward_features(self, x):
        if self.flatten_first:
            return self.act(self.first(self.flat(x)))
        return self.act(self.flat(self.first(x)))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_single_unit_first_layer_is_exactly_fgsm_on_the_loss(kind):
    """Eq. (7)/(8): with one output unit sign(dL/dx) = sign(G) sign(W / s), so the first layer's
    R_1 equals y_1(x + eps sign(dL/dx)) - y_1(x): whole-input FGSM in [0, 1] pixel space
    (unclamped; the bias cancels), through a per-channel normalisation."""
    torch.manual_seed(0)
    model = NormalizedModel(OneUnit(kind), MEAN, STD).train()
    x, y = batch(n=8, size=6, classes=4)
    eps = 8 / 255
    method = LayerwiseAT(threat=ThreatModel("linf", eps), first_layer="budget")
    tape = method.gradient_tape(model, x, y, make_ctx(model))
    assert tape[0].module is model.net.first and tape[0].reads_image
    def first(v):
        z = model.normalize(v)
        return model.net.first(model.net.flat(z) if kind == "linear" else z).detach()

    y1 = first(x)
    r1 = method.perturbation(tape[0], y1)
    y1_fgsm = first(x + eps * input_grad_sign(model, x, y))
    assert r1.abs().min() > 0
    assert torch.allclose(r1, y1_fgsm - y1, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv", "smallcnn"])
def test_first_layer_input_fgsm_is_the_first_layers_response_to_input_fgsm(kind):
    """``first_layer: input_fgsm``: R_1 = y_1(fgsm(x)) - y_1(x) for any number of units (FGSM
    clamped to [0, 1], as methods.attacks.fgsm); with deep_eps_scale 0 the perturbed pass is
    the model at the FGSM image, so the loss is FGSM training's loss."""
    torch.manual_seed(0)
    if kind == "smallcnn":
        model, (x, y) = smallcnn(), batch(n=8)
        first = model.net.conv1

        def y1(v):
            return first(model.normalize(v))
    else:
        model = NormalizedModel(OneUnit(kind, units=5), MEAN, STD).train()
        x, y = batch(n=8, size=6, classes=4)
        first = model.net.first

        def y1(v):
            z = model.normalize(v)
            return first(model.net.flat(z) if kind == "linear" else z)
    eps = 0.1
    threat = ThreatModel("linf", eps)
    x_fgsm = fgsm(model, x, y, threat)
    assert (x_fgsm - x).abs().max() > 0 and (x_fgsm == 0).any() | (x_fgsm == 1).any()
    method = LayerwiseAT(threat=threat, first_layer="input_fgsm", deep_eps_scale=0.0)
    tape = method.gradient_tape(model, x, y, make_ctx(model))
    assert tape[0].module is first and tape[0].reads_image
    r1 = method.perturbation(tape[0], y1(x).detach(), model.normalize(x) if kind != "linear"
                             else model.net.flat(model.normalize(x)))
    assert torch.allclose(r1, (y1(x_fgsm) - y1(x)).detach(), atol=1e-5, rtol=0)
    loss = method.loss(model, x, y, make_ctx(model))
    expected = float(F.cross_entropy(model(x_fgsm), y).detach())
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_first_layer_none_with_no_deep_budget_is_clean_or_pgd_training():
    """``first_layer: none`` leaves the layers that read the image alone: with deep_eps_scale 0
    the loss is the clean loss, and with combine_pgd it is PGD-AT's loss on the same x_adv."""
    model, (x, y) = smallcnn(), batch(n=8)
    threat = ThreatModel("linf", 0.05)
    none = LayerwiseAT(threat=threat, first_layer="none", deep_eps_scale=0.0)
    assert float(none.loss(model, x, y, make_ctx(model)).detach()) == pytest.approx(
        float(F.cross_entropy(model(x), y).detach()), rel=1e-6)
    combined = LayerwiseAT(threat=threat, first_layer="none", deep_eps_scale=0.0,
                           combine_pgd=True, steps=3, alpha=0.02)
    pgd_at = METHODS.get("pgd_at")(threat=threat, steps=3, alpha=0.02)
    got = combined.loss(model, x, y, make_ctx(model, seed=5))
    assert float(got.detach()) == pytest.approx(
        float(pgd_at.loss(model, x, y, make_ctx(model, seed=5)).detach()), rel=1e-6)
    with_deep = LayerwiseAT(threat=threat, first_layer="none", combine_pgd=True, steps=3,
                            alpha=0.02, deep_eps_scale=0.5)
    harder = with_deep.loss(model, x, y, make_ctx(model, seed=5))
    assert float(harder.detach()) > float(got.detach())


# ----------------------------------------------------------------- magnitudes and eps_l
@pytest.mark.parametrize("budget", ["row_l1", "constant"])
@pytest.mark.parametrize("include_head", [True, False])
def test_every_layer_gets_eps_l_times_its_row_l1_per_unit(budget, include_head):
    model, (x, y) = smallcnn(), batch()
    eps, deep = 0.1, 0.3
    method = LayerwiseAT(threat=ThreatModel("linf", eps), budget=budget, deep_eps_scale=deep,
                         include_head=include_head, first_layer="budget")
    tape = method.gradient_tape(model, x, y, make_ctx(model))
    net = model.net
    expected_layers = [net.conv1, net.conv2, net.fc1] + ([net.head] if include_head else [])
    assert [c.module for c in tape] == expected_layers
    std = torch.tensor(STD).view(1, 3, 1, 1)
    row_l1 = {net.conv1: (net.conv1.weight.abs() / std).sum((1, 2, 3)),
              net.conv2: net.conv2.weight.abs().sum((1, 2, 3)),
              net.fc1: net.fc1.weight.abs().sum(1), net.head: net.head.weight.abs().sum(1)}
    outputs = {m: (out, g) for m, out, g in layer_outputs_and_grads(model, x, y)}
    for i, call in enumerate(tape):
        out, g = outputs[call.module]
        per_unit = row_l1[call.module] if budget == "row_l1" else torch.ones(out.shape[1])
        eps_l = eps if i == 0 else deep * eps
        shape = (1, -1, 1, 1) if out.dim() == 4 else (1, -1)
        expected = eps_l * per_unit.detach().view(shape) * g.sign()
        r = method.perturbation(call, out)
        assert torch.allclose(r, expected, rtol=1e-6, atol=0)
        assert torch.equal(r == 0, g == 0)


def test_the_perturbed_loss_is_a_first_order_ascent():
    """At small eps, L(perturbed) - L(clean) = sum_l sum_k eps_l rowL1_k |G_l,k| + O(eps^2)
    (every R_l points along sign(G_l); to first order the layers add up).  float64, eps 1e-4:
    the increase is positive and within 1% of the first-order prediction; at eps 0.05 the
    perturbed loss is still above the clean one."""
    model, (x, y) = smallcnn(), batch()
    model, x = model.double(), x.double()
    for eps, check_linear in ((1e-4, True), (0.05, False)):
        method = LayerwiseAT(threat=ThreatModel("linf", eps), deep_eps_scale=0.5,
                             first_layer="budget")
        ctx = make_ctx(model)
        perturbed = float(method.loss(model, x, y, ctx).detach())
        clean = float(F.cross_entropy(model(x), y).detach())
        assert ctx.stats["unperturbed_loss"] == pytest.approx(clean, rel=1e-12)
        assert perturbed > clean
        if check_linear:
            predicted = 0.0
            for i, (m, out, g) in enumerate(layer_outputs_and_grads(model, x, y)):
                w = m.weight.detach().abs()
                if i == 0:
                    w = w / model.normalize.std.view(1, -1, 1, 1)
                per_unit = w.flatten(1).sum(1)
                shape = (1, -1, 1, 1) if out.dim() == 4 else (1, -1)
                eps_l = eps if i == 0 else 0.5 * eps
                predicted += eps_l * float((per_unit.view(shape) * g.abs()).sum())
            assert perturbed - clean == pytest.approx(predicted, rel=1e-2)


# ----------------------------------------------------------------- hooks, modes, BatchNorm
def test_no_hook_outlives_a_step_and_eval_outputs_are_the_plain_models():
    model, (x, y) = smallcnn(), batch()
    reference = copy.deepcopy(model)
    ctx = make_ctx(model)
    before = all_hooks(model)
    for args in ({}, {"schedule": "previous_step", "first_layer": "budget"},
                 {"first_layer": "budget"}, {"combine_pgd": True, "steps": 2, "alpha": 0.02}):
        method = LayerwiseAT(threat=ThreatModel("linf", 0.1), **args)
        for _ in range(2):
            method.loss(model, x, y, ctx).backward()
        assert all_hooks(model) == before and model.training
    model.eval(), reference.eval()
    assert torch.equal(model(x), reference(x))   # no optimizer step, no BatchNorm: identical


def test_hooks_are_removed_when_the_perturbed_pass_raises():
    model, (x, y) = smallcnn(), batch()
    ctx = make_ctx(model)
    calls = []

    def boom(module, inputs, output):
        calls.append(1)
        if len(calls) == 2:          # the second forward: the perturbed pass
            raise RuntimeError("boom")

    model.net.head.register_forward_hook(boom)
    before = all_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        LayerwiseAT(threat=ThreatModel("linf", 0.1)).loss(model, x, y, ctx)
    assert len(calls) == 2 and all_hooks(model) == before


@pytest.mark.parametrize("gradient_pass,updates",
                         [("train_frozen_bn", 1), ("train", 2), ("eval", 1)])
def test_batchnorm_statistics_move_once_per_step_unless_asked(gradient_pass, updates):
    model = TinyNet(batchnorm=True).train()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    bn = model.body[1]
    stats = [bn.running_mean.clone(), bn.running_var.clone()]
    method = LayerwiseAT(threat=ThreatModel("linf", 0.1), gradient_pass=gradient_pass)
    method.gradient_tape(model, x, y, make_ctx(model))
    unchanged = torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert unchanged == (gradient_pass != "train")
    assert model.training
    bn.reset_running_stats()
    method.loss(model, x, y, make_ctx(model)).backward()
    assert int(bn.num_batches_tracked) == updates


def test_shared_dropout_draws_the_same_masks_in_both_passes():
    """With dropout after the first conv, the gradient pass's G is zero exactly where the
    trained pass drops units (shared masks), so every dropped unit gets R = 0."""
    torch.manual_seed(0)

    class DropNet(TinyNet):
        def __init__(self):
            super().__init__()
            self.body.insert(1, nn.Dropout(0.5))
            self.declare_stages(Stage("features", "body.5", 16, 0))

    model = DropNet().train()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    seen = []
    model.body[1].register_forward_hook(lambda m, i, out: seen.append(out.detach() == 0))
    for shared in (True, False):
        seen.clear()
        method = LayerwiseAT(threat=ThreatModel("linf", 0.1), shared_dropout=shared)
        tape = method.gradient_tape(model, x, y, make_ctx(model))
        F.cross_entropy(model(x), y)      # the next forward: the masks of the trained pass
        dropped_grad_pass, dropped_next = seen
        assert torch.equal(dropped_grad_pass, dropped_next) == shared
        assert (tape[0].sign[dropped_grad_pass] == 0).all()


# ----------------------------------------------------------------- schedule S1
def test_previous_step_uses_the_signs_of_the_previous_batch_with_the_updated_weights():
    model = smallcnn(channels=1, size=12)
    (xa, ya), (xb, yb) = batch(channels=1, size=12, seed=1), batch(channels=1, size=12, seed=2)
    eps, deep = 0.1, 0.25
    method = LayerwiseAT(threat=ThreatModel("linf", eps), schedule="previous_step",
                         deep_eps_scale=deep, first_layer="budget")
    ctx = make_ctx(model)
    ctx.optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    method.start_epoch(model, ctx)
    before = copy.deepcopy(model)
    signs_a = [g.sign() for _, _, g in layer_outputs_and_grads(before, xa, ya)]
    loss_a = method.step(model, xa, ya, ctx)
    clean_a = float(F.cross_entropy(before(xa), ya).detach())
    assert float(loss_a.detach()) == pytest.approx(clean_a, rel=1e-6), \
        "the first step of an epoch has no previous signs: unperturbed"

    def loss_with(signs):
        layers = [m for m in model.modules() if isinstance(m, LAYER_TYPES)]
        position = []

        def add(module, inputs, output):
            i = len(position)
            position.append(i)
            w = module.weight.abs()
            if i == 0:
                w = w / model.normalize.std.view(1, -1, 1, 1)
            shape = (1, -1, 1, 1) if output.dim() == 4 else (1, -1)
            eps_l = eps if i == 0 else deep * eps
            return output + eps_l * w.flatten(1).sum(1).view(shape) * signs[i]

        handles = [m.register_forward_hook(add) for m in layers]
        try:
            return float(F.cross_entropy(model(xb), yb))
        finally:
            for h in handles:
                h.remove()

    signs_b = [g.sign() for _, _, g in layer_outputs_and_grads(model, xb, yb)]
    with torch.no_grad():
        expected = loss_with(signs_a)                                  # weights after step 1
        wrong = loss_with(signs_b)
    loss_b = method.step(model, xb, yb, ctx)
    assert float(loss_b.detach()) == pytest.approx(expected, rel=1e-6)
    assert abs(expected - wrong) > 1e-3, "the test tells previous from current signs"
    with pytest.raises(RuntimeError, match="drop_last"):
        method.step(model, xb[:4], yb[:4], ctx)


# ----------------------------------------------------------------- the combined variant, passes
def test_combined_variant_trains_on_layerwise_perturbed_pgd_inputs_within_eps():
    model, (x, y) = smallcnn(), batch(n=8)
    x = x * 0.6 + 0.2
    eps, steps = 0.05, 3
    reference = copy.deepcopy(model)
    seen = []
    model.normalize.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].detach()))
    method = LayerwiseAT(threat=ThreatModel("linf", eps), combine_pgd=True, steps=steps, alpha=0.02)
    ctx = make_ctx(model, seed=7)
    method.loss(model, x, y, ctx).backward()
    x_adv = pgd(reference, x, y, ThreatModel("linf", eps), alpha=0.02, steps=steps,
                generator=torch.Generator().manual_seed(7))
    assert len(seen) == steps + 2            # PGD steps, the gradient pass, the trained pass
    assert torch.equal(seen[-1], x_adv) and torch.equal(seen[-2], x_adv)
    assert (seen[-1] - x).abs().max() <= eps + 1e-6 and (seen[-1] - x).abs().max() > eps / 2
    assert seen[-1].min() >= 0 and seen[-1].max() <= 1
    totals = ctx.counter.totals()
    assert totals["attack"] == {"forward": 8 * (steps + 1), "backward": 8 * (steps + 1)}
    assert totals["train"] == {"forward": 8, "backward": 8}


@pytest.mark.parametrize("args,attack,train", [
    ({}, (1, 1), (1, 1)),                                   # S2: 2 forward + 2 backward
    ({"schedule": "previous_step", "first_layer": "budget"}, None, (1, 1)),   # S1: one pass
    ({"clean_weight": 0.5}, (1, 1), (2, 2)),                # + the clean forward on x
])
def test_pass_counts_per_example(args, attack, train):
    model, (x, y) = smallcnn(), batch(n=8)
    ctx = make_ctx(model)
    LayerwiseAT(threat=ThreatModel("linf", 0.1), **args).loss(model, x, y, ctx).backward()
    totals = ctx.counter.totals()
    assert totals.get("attack") == (None if attack is None else
                                    {"forward": 8 * attack[0], "backward": 8 * attack[1]})
    assert totals["train"] == {"forward": 8 * train[0], "backward": 8 * train[1]}


def test_clean_weight_mixes_the_clean_loss():
    model, (x, y) = smallcnn(), batch()
    ctx = make_ctx(model)
    mixed = LayerwiseAT(threat=ThreatModel("linf", 0.1), clean_weight=0.3).loss(model, x, y, ctx)
    clean = float(F.cross_entropy(model(x), y).detach())
    assert float(mixed.detach()) == pytest.approx(0.7 * ctx.stats["perturbed_loss"] + 0.3 * clean,
                                                  rel=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"schedule": "next_step"}, "schedule must be one of"),
    ({"budget": "row_l2"}, "budget must be one of"),
    ({"gradient_pass": "frozen"}, "gradient_pass must be one of"),
    ({"clean_weight": 1.5}, "clean_weight must be in"),
    ({"deep_eps_scale": -1}, "deep_eps_scale must be >= 0"),
    ({"first_layer": "fgsm"}, "first_layer must be one of"),
    ({"first_layer": "input_fgsm", "schedule": "previous_step"}, "schedule must be 'same_batch'"),
])
def test_bad_options_are_refused_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerwiseAT(threat=ThreatModel("linf", 0.1), **kwargs)


def test_row_l1_needs_an_linf_threat():
    with pytest.raises(ValueError, match="threat.norm must be 'linf'"):
        LayerwiseAT(threat=ThreatModel("l2", 0.5))
    LayerwiseAT(threat=ThreatModel("l2", 0.5), budget="constant")


def test_the_paper_string_says_reconstruction():
    d = METHODS.get("layerwise_at")(threat=ThreatModel("linf", 0.1)).describe()
    assert "RECONSTRUCTION" in d["paper"] and "no official code" in d["paper"]


# ----------------------------------------------------------------- resume through train_cell
@pytest.mark.parametrize("args,phases", [
    ({}, {"attack": 1, "train": 1}),                                  # S2: 2 fwd + 2 bwd
    ({"schedule": "previous_step", "first_layer": "budget", "clean_weight": 0.2},
     {"train": 2}),                                                   # S1 + the clean term
])
def test_layerwise_at_resumes_bit_for_bit(args, phases, mnist5k_prepared, tmp_path):
    cell = tiny_cell("layerwise_at", args)
    straight = run(cell, mnist5k_prepared, tmp_path / "straight")
    for h in straight["history"]:
        assert h["passes"] == {p: {"forward": n * h["examples"], "backward": n * h["examples"]}
                               for p, n in phases.items()}

    # killed after the 2nd step of the 3rd epoch (epoch=2, step=1: 0-based); the helper checks
    # what the kill left and that the rerun resumed from epoch 2
    resumed = kill_then_resume(cell, mnist5k_prepared, tmp_path / "killed", epoch=2, step=1)
    assert_same_training(tmp_path / "straight", tmp_path / "killed", straight, resumed)
    assert ([h["train_loss"] for h in resumed["history"]]
            == [h["train_loss"] for h in straight["history"]])
    assert ([h["method_stats"] for h in resumed["history"]]
            == [h["method_stats"] for h in straight["history"]])
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------- recipes
def test_recipes_resolve_and_copy_the_baselines_protocols():
    """layerwise.yaml needs only mnist5k.yaml beside it; its paper recipes write out the
    protocols of the baselines they sit beside (cifar_base via pgd10_cifar, pgd40_mnist_full),
    so this catches a drift."""
    from methods.builders import build_method, build_threat
    from methods.config import load_recipes, resolve_cell

    papers = "workflow/config/papers/"
    cfg = {"recipe_files": [papers + "mnist5k.yaml", papers + "layerwise.yaml"],
           "datasets": {"mnist5k": {"source": "mnist5k"}, "cifar10": {"source": "cifar10"}},
           "archs": {"smallcnn-w0.5": {"model": "smallcnn", "width": 0.5}}}
    recipes = load_recipes(cfg)
    ours = sorted(n for n in recipes if n.startswith("layerwise"))
    assert {"layerwise_mnist", "layerwise_pgd_mnist", "layerwise_cifar", "layerwise_pgd_cifar",
            "layerwise_mnist_full", "layerwise_pgd_mnist_full"} <= set(ours)
    for name in ours:
        cell = resolve_cell(cfg, "mnist5k", "smallcnn-w0.5", name, 0, recipes)
        method = build_method(cell, build_threat(cell["threat"]))
        assert method.name == "layerwise_at" and "RECONSTRUCTION" in recipes[name]["notes"]
        assert not recipes[name].get("published", {}).get("rows")
        if method.schedule.value == "previous_step":
            assert cell["train"]["drop_last"] is True
    baselines = load_recipes({"recipe_files": [papers + "baselines.yaml",
                                               papers + "selective.yaml"]})
    for mine, theirs in (("layerwise_cifar", "pgd10_cifar"), ("layerwise_pgd_cifar", "pgd10_cifar"),
                         ("layerwise_mnist_full", "pgd40_mnist_full"),
                         ("layerwise_pgd_mnist_full", "pgd40_mnist_full"),
                         ("layerwise_mnist", "pgd40_mnist")):
        pool = recipes if theirs in recipes else baselines
        for key in ("threat", "normalization", "augmentation", "train"):
            assert recipes[mine][key] == pool[theirs][key], (mine, key)
    for mine, theirs in (("layerwise_pgd_cifar", "pgd10_cifar"),
                         ("layerwise_pgd_mnist_full", "pgd40_mnist_full")):
        args = baselines[theirs]["method_args"]
        mine_args = recipes[mine]["method_args"]
        assert {k: mine_args[k] for k in ("steps", "alpha", "attack_mode")} == args
        assert mine_args["first_layer"] == "none"   # the input is left to PGD
