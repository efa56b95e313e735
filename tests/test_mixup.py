"""The mixing methods (issue 9): mixup (one lambda per batch, and the Mixup-Inference per-example
variant), Manifold Mixup (mixing at exactly the drawn stage, stages drawn uniformly, BCE on
softmax) and Interpolated AT (PGD on the unmixed batch in eval mode, the average of two mixup
losses), each against a direct computation with the same seeded draws; pass counts; the
recipes; and kill-and-resume bit for bit through the trainer."""
from __future__ import annotations

import copy
import csv
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import methods.algorithms  # noqa: F401
from methods.algorithms.mixing import LOSSES, Mix, MixedTargets, StageMix, mixed_at
from methods.algorithms.randomness import beta
from methods.attacks import pgd
from methods.builders import build_method, build_threat
from methods.config import REPO_ROOT, load_recipes, resolve_cell
from methods.models.core import Backbone, NormalizedModel, Stage
from methods.registry import METHODS
from methods.threat import ThreatModel
from tests.helpers import TinyNet, assert_same_training, kill_then_resume, make_ctx, run, tiny_cell


EPS = 8 / 255
LINF = ThreatModel("linf", EPS)


class Spy(nn.Module):
    """Wraps a model and records every input it sees and the mode it was in."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        self.seen.append((x.detach().clone(), self.training))
        return self.inner(x)


class SeqNet(Backbone):
    """Every stage's output is consumed by a module (``body.0`` takes the input, ``body.2``
    stage1, ``body.4`` stage2, ``head`` the features), so a forward pre-hook on the consumer sees
    the stage's value after any replacement and a forward hook on the stage module before it."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        norm = [nn.BatchNorm2d(3)] if bn else []
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), *norm,
                                  nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(4 * 6 * 6, 8), nn.ReLU())
        self.head = nn.Linear(8, 5)
        o = len(norm)
        self.declare_stages(Stage("stage1", "body.1", 3, 1), Stage("stage2", f"body.{3 + o}", 4, 1),
                            Stage("features", f"body.{6 + o}", 8, 0))
        self.consumers = {"stage1": f"body.{2}", "stage2": f"body.{4 + o}", "features": "head"}

    def forward_features(self, x):
        return self.body(x)


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def seq_model(bn=False, seed=0):
    torch.manual_seed(seed)
    net = SeqNet(bn)
    model = NormalizedModel(net, mean=(0.3,), std=(0.7,))
    consumers = {"input": "net.body.0", **{k: f"net.{v}" for k, v in net.consumers.items()}}
    return model.train(), consumers


def batch(n=6, seed=0, classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 6, 6, generator=g), torch.randint(0, classes, (n,), generator=g)


def twin(ctx):
    """A generator in the same state as ``ctx.generator``: the method's draws, reproduced."""
    g = torch.Generator()
    g.set_state(ctx.generator.get_state())
    return g


def one_hot(y, c=5):
    return F.one_hot(y, c).float()


# ------------------------------------------------------------------------------------- mixup

def test_mixup_mixes_the_batch_with_one_lambda_and_loss_is_the_two_label_ce():
    torch.manual_seed(0)
    model = Spy(TinyNet(num_classes=5, size=6)).train()
    x, y = batch()
    ctx = make_ctx(model, seed=4)
    g = twin(ctx)
    loss = METHODS.get("mixup")(threat=LINF).loss(model, x, y, ctx)
    lam = beta(1.0, 1.0, g)                       # mixup-cifar10: lambda first, then randperm
    perm = torch.randperm(len(y), generator=g)
    x_mix = lam * x + (1 - lam) * x[perm]
    assert torch.equal(model.seen[-1][0], x_mix) and 0 < float(lam) < 1
    assert not torch.equal(perm, torch.arange(len(y)))
    logits = model.inner(x_mix)
    by_hand = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    assert torch.equal(loss, by_hand)
    # ... which is the soft-label CE against the mixed one-hot target
    target = lam * one_hot(y) + (1 - lam) * one_hot(y[perm])
    soft = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(loss, soft, rtol=1e-6, atol=1e-7)
    ctx2 = make_ctx(model, seed=4)
    soft_loss = METHODS.get("mixup")(threat=LINF, criterion="soft_ce").loss(model, x, y, ctx2)
    assert torch.equal(soft_loss, soft)
    assert ctx.stats["lambda"] == pytest.approx(float(lam))


def test_per_sample_variant_uses_two_permutations_and_a_lambda_per_example():
    torch.manual_seed(0)
    model = Spy(TinyNet(num_classes=5, size=6)).train()
    x, y = batch(n=8)
    ctx = make_ctx(model, seed=1)
    g = twin(ctx)
    method = METHODS.get("mixup")(threat=LINF, variant="per_sample", criterion="soft_ce")
    loss = method.loss(model, x, y, ctx)
    p1 = torch.randperm(8, generator=g)           # Mixup-Inference: rp1, rp2, then the lambdas
    p2 = torch.randperm(8, generator=g)
    lam = beta(1.0, 1.0, g, size=8)
    x_mix = lam.view(-1, 1, 1, 1) * x[p1] + (1 - lam.view(-1, 1, 1, 1)) * x[p2]
    assert torch.equal(model.seen[-1][0], x_mix)
    assert lam.unique().numel() == 8 and not torch.equal(p1, p2)
    target = lam[:, None] * one_hot(y[p1]) + (1 - lam[:, None]) * one_hot(y[p2])
    logits = model.inner(x_mix)
    assert torch.allclose(loss, -(target * F.log_softmax(logits, 1)).sum(1).mean(), rtol=1e-6)
    # The two-label CE with per-example weights is the same loss.
    two_label = (lam * F.cross_entropy(logits, y[p1], reduction="none")
                 + (1 - lam) * F.cross_entropy(logits, y[p2], reduction="none")).mean()
    assert torch.allclose(LOSSES["ce"](logits, MixedTargets(y[p1], y[p2], lam, 5)), two_label)
    assert torch.allclose(two_label, loss, rtol=1e-6)


def test_alpha_zero_is_clean_training_and_draws_nothing():
    torch.manual_seed(0)
    model = TinyNet(num_classes=5, size=6).train()
    x, y = batch()
    ctx = make_ctx(model)
    state = ctx.generator.get_state()
    loss = METHODS.get("mixup")(threat=LINF, alpha=0).loss(model, x, y, ctx)
    assert torch.equal(loss, F.cross_entropy(model(x), y))
    assert torch.equal(ctx.generator.get_state(), state)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="method_args.variant"):
        METHODS.get("mixup")(threat=LINF, variant="per_pixel")
    with pytest.raises(ValueError, match="method_args.criterion"):
        METHODS.get("manifold_mixup")(threat=LINF, criterion="mse")
    with pytest.raises(ValueError, match="method_args.alpha"):
        METHODS.get("mixup")(threat=LINF, alpha=-1)
    with pytest.raises(ValueError, match="method_args.stages"):
        METHODS.get("manifold_mixup")(threat=LINF, stages="stage1")
    with pytest.raises(ValueError, match="method_args.attack_labels"):
        METHODS.get("iat")(threat=LINF, attack_labels=True)
    with pytest.raises(ValueError, match=r"method_args.stages.*stage9"):
        METHODS.get("manifold_mixup")(threat=LINF, stages=["input", "stage9"]).setup(
            seq_model()[0], None, None)


# ---------------------------------------------------------------------------- losses, directly

def test_bce_on_softmax_is_the_mean_over_all_entries_of_the_binary_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g) * 3
    y_a, y_b = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    lam = torch.tensor(0.3)
    t = lam * one_hot(y_a) + (1 - lam) * one_hot(y_b)
    p = torch.softmax(logits, 1)
    direct = -(t * p.log() + (1 - t) * (1 - p).log()).mean()    # nn.BCELoss(): mean over B x C
    got = LOSSES["bce_softmax"](logits, MixedTargets(y_a, y_b, lam, 5))
    assert torch.allclose(got, direct, rtol=1e-6)
    # unmixed: the repo's vanilla loss against the one-hot label
    plain = LOSSES["bce_softmax"](logits, MixedTargets.plain(y_a, 5))
    t = one_hot(y_a)
    assert torch.allclose(plain, -(t * p.log() + (1 - t) * (1 - p).log()).mean(), rtol=1e-6)


# --------------------------------------------------------------------------- manifold mixup

STAGES = ["input", "stage1", "stage2"]


def record(model, consumers, names):
    """Forward hooks on the stage modules (the value before any replacement: they are
    registered first) and forward pre-hooks on their consumers (the value used downstream)."""
    before, after, handles = {}, {}, []
    for name in names:
        handles.append(model.stage_module(name).register_forward_hook(
            lambda m, i, o, name=name: before.__setitem__(name, o.detach().clone())))
        handles.append(model.get_submodule(consumers[name]).register_forward_pre_hook(
            lambda m, i, name=name: after.__setitem__(name, i[0].detach().clone())))
    return before, after, handles


def test_manifold_mixup_mixes_at_exactly_the_drawn_stage_and_removes_its_hook():
    model, consumers = seq_model()
    names = ["input", "stage1", "stage2", "features"]
    x, y = batch(n=6)
    with torch.no_grad():
        ref, _, handles = record(model, consumers, names)
        model(x)                                   # the unmixed forward
        for h in handles:
            h.remove()
    method = METHODS.get("manifold_mixup")(threat=LINF)
    method.setup(model, None, None)
    drawn = set()
    for seed in range(12):
        ctx = make_ctx(model, seed=seed)
        hooks = hook_count(model)
        before, after, handles = record(model, consumers, names)
        g = twin(ctx)
        loss = method.loss(model, x, y, ctx)
        for h in handles:
            h.remove()
        assert hook_count(model) == hooks, "the mixing hook was left behind"
        k = int(torch.randint(3, (), generator=g))   # the repo: layer, then lambda, then perm
        lam = beta(2.0, 2.0, g)
        perm = torch.randperm(6, generator=g)
        stage = STAGES[k]
        drawn.add(stage)
        assert ctx.stats[f"mixed_at_{stage}"] == 1.0 and ctx.stats["lambda"] == float(lam)
        for earlier in STAGES[:k]:                   # unmixed before the drawn stage
            assert torch.equal(before[earlier], ref[earlier])
            assert torch.equal(after[earlier], ref[earlier])
        h = before[stage]                            # the drawn stage's own output is unmixed ...
        assert torch.equal(h, ref[stage])
        assert torch.equal(after[stage], lam * h + (1 - lam) * h[perm])   # ... and replaced
        for later in names[k + 1:]:
            assert not torch.allclose(before[later], ref[later])
        # the loss: BCE on softmax against the mixed one-hot target
        target = lam * one_hot(y) + (1 - lam) * one_hot(y[perm])
        p = torch.softmax(model.head(after["features"]), 1)
        assert torch.allclose(loss, -(target * p.log() + (1 - target) * (1 - p).log()).mean(),
                              rtol=1e-6)
    assert drawn == set(STAGES)


def test_manifold_mixup_draws_its_stages_uniformly():
    model, _ = seq_model()
    x, y = batch(n=2)
    ctx = make_ctx(model, seed=7)
    counts = Counter()
    method = METHODS.get("manifold_mixup")(threat=LINF)
    with torch.no_grad():
        for _ in range(300):
            ctx.stats = {}
            method.loss(model, x, y, ctx)
            counts.update(k for k in ctx.stats if k.startswith("mixed_at_"))
    # 100 expected per stage, sd 8.2: a 4-sd band
    assert set(counts) == {f"mixed_at_{s}" for s in STAGES}
    assert all(67 <= n <= 133 for n in counts.values()), counts
    only = METHODS.get("manifold_mixup")(threat=LINF, stages=["stage2", "features"])
    seen = set()
    with torch.no_grad():
        for _ in range(20):
            ctx.stats = {}
            only.loss(model, x, y, ctx)
            seen.update(k for k in ctx.stats if k.startswith("mixed_at_"))
    assert seen == {"mixed_at_stage2", "mixed_at_features"}


def test_the_mixing_hook_is_removed_when_the_forward_fails():
    model, _ = seq_model()
    x, _ = batch()
    mix = Mix(torch.tensor(0.5), None, torch.arange(6).flip(0))
    with pytest.raises(RuntimeError, match="boom"):
        with mixed_at(model, [StageMix("stage1", mix)]):
            assert hook_count(model) == 1
            raise RuntimeError("boom")
    assert hook_count(model) == 0
    rows = Mix(torch.tensor(0.5), None, torch.tensor([2, 0, 1]))
    with mixed_at(model, [StageMix("stage1", rows, start=2, rows=3)]), torch.no_grad():
        out_rows = model(x)
    with torch.no_grad():
        plain = model(x)
    assert torch.equal(out_rows[:2], plain[:2]) and torch.equal(out_rows[5:], plain[5:])
    assert not torch.allclose(out_rows[2:5], plain[2:5])


def test_input_mixup_in_manifold_mixup_equals_mixup_on_the_images():
    """Mixing the normalised input (the "input" stage) is mixing the [0, 1] images."""
    model, _ = seq_model()
    x, y = batch()
    a = METHODS.get("manifold_mixup")(threat=LINF, alpha=1.0, stages=["input"], criterion="ce")
    b = METHODS.get("mixup")(threat=LINF, alpha=1.0)
    ctx_a, ctx_b = make_ctx(model, seed=3), make_ctx(model, seed=3)
    torch.randint(1, (), generator=ctx_b.generator)      # the stage draw manifold mixup makes
    assert torch.allclose(a.loss(model, x, y, ctx_a), b.loss(model, x, y, ctx_b), rtol=1e-5)


# ------------------------------------------------------------------------- interpolated AT

def iat_reference(model, x, y, ctx, steps, alpha, labels=None):
    """IAT by hand on a copy of the model: eval-mode PGD on the unmixed batch, then one lambda
    and permutation for the clean half, one for the adversarial half, 0.5 each."""
    ref = copy.deepcopy(model)
    g = twin(ctx)
    ref.eval()
    with torch.no_grad():
        target = ref(x).argmax(1) if labels == "predicted" else y
    x_adv = pgd(ref, x, target, LINF, alpha=alpha, steps=steps, generator=g)
    ref.train()
    losses, mixed = [], []
    for inputs in (x, x_adv):
        lam = beta(1.0, 1.0, g)
        perm = torch.randperm(len(y), generator=g)
        xm = lam * inputs + (1 - lam) * inputs[perm]
        logits = ref(xm)
        losses.append(lam * F.cross_entropy(logits, y)
                      + (1 - lam) * F.cross_entropy(logits, y[perm]))
        mixed.append(xm)
    return (1 - 0.5) * losses[0] + 0.5 * losses[1], x_adv, mixed


@pytest.mark.parametrize("labels", ["labels", "predicted"])
def test_iat_attacks_the_unmixed_batch_in_eval_mode_and_averages_two_mixup_losses(labels):
    torch.manual_seed(0)
    model = Spy(TinyNet(num_classes=5, size=6, batchnorm=True)).train()
    x, y = batch(n=8)
    ctx = make_ctx(model, seed=2)
    expected, x_adv, mixed = iat_reference(model, x, y, ctx, steps=3, alpha=2 / 255, labels=labels)
    loss = METHODS.get("iat")(threat=LINF, steps=3, attack_labels=labels).loss(model, x, y, ctx)
    assert torch.equal(loss, expected)
    attack, train = model.seen[:-2], model.seen[-2:]
    assert len(attack) == 3 + (labels == "predicted")
    assert all(not training for _, training in attack)                  # eval mode
    for seen, _ in attack:                                              # the unmixed batch
        assert (seen - x).abs().max() <= EPS + 1e-6
    if labels == "predicted":
        assert torch.equal(attack[0][0], x)
    assert all(training for _, training in train) and model.training
    assert torch.equal(train[0][0], mixed[0]) and torch.equal(train[1][0], mixed[1])
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > EPS / 2


def test_iat_attack_mode_train_is_an_option():
    model = Spy(TinyNet(num_classes=5, size=6, batchnorm=True)).train()
    x, y = batch(n=8)
    METHODS.get("iat")(threat=LINF, steps=2, attack_mode="train").loss(model, x, y, make_ctx(model))
    assert all(training for _, training in model.seen)


@pytest.mark.parametrize("labels,extra", [("labels", 0), ("predicted", 1)])
def test_iat_books_its_attack_and_training_passes(labels, extra):
    model, _ = seq_model(bn=True)
    x, y = batch(n=8)
    ctx = make_ctx(model)
    method = METHODS.get("iat")(threat=LINF, steps=4, attack_labels=labels)
    method.loss(model, x, y, ctx).backward()
    assert ctx.counter.totals() == {"attack": {"forward": (4 + extra) * 8, "backward": 4 * 8},
                                    "train": {"forward": 16, "backward": 16}}


@pytest.mark.parametrize("mixing", ["input", "manifold"])
def test_iat_joint_forward_mixes_each_half_on_its_own(mixing):
    """Without BatchNorm the joint forward of both halves equals two forwards; with BatchNorm it
    differs (statistics over 2B rows), which is why it is an option."""
    x, y = batch(n=8)
    for bn, same in ((False, True), (True, False)):
        model, _ = seq_model(bn=bn)
        losses = {}
        for forward in ("separate", "joint"):
            ctx = make_ctx(model, seed=5)
            hooks = hook_count(model)
            m = METHODS.get("iat")(threat=LINF, steps=2, mixing=mixing, forward=forward,
                                   variant="per_sample", criterion="soft_ce")
            losses[forward] = m.loss(model, x, y, ctx)
            assert model.training and hook_count(model) == hooks
        assert torch.allclose(losses["separate"], losses["joint"], rtol=1e-5) == same, (bn, losses)


def test_iat_manifold_draws_a_stage_per_half():
    model, _ = seq_model()
    x, y = batch(n=4)
    method = METHODS.get("iat")(threat=LINF, steps=1, mixing="manifold", mixup_alpha=2.0)
    method.setup(model, None, None)
    counts = Counter()
    for seed in range(40):
        ctx = make_ctx(model, seed=seed)
        method.loss(model, x, y, ctx)
        assert sum(v for k, v in ctx.stats.items() if k.startswith("mixed_at_")) == 1.0
        counts.update({k: v for k, v in ctx.stats.items() if k.startswith("mixed_at_")})
    assert set(counts) == {f"mixed_at_{s}" for s in STAGES}


# ----------------------------------------------------------------------------------- recipes

def test_mixup_recipes_resolve_build_and_link_existing_rows():
    files = ["workflow/config/papers/mnist5k.yaml", "workflow/config/papers/mixup.yaml"]
    cfg = {"recipe_files": files,
           "datasets": {"mnist5k": {"source": "mnist5k"}, "cifar10": {"source": "cifar10"}},
           "archs": {"smallcnn-w0.5": {"model": "smallcnn", "width": 0.5},
                     "prn18-bb": {"model": "preactresnet18", "final_bn": False}}}
    recipes = load_recipes(cfg)
    with open(REPO_ROOT / "paper_tables/published/iada_mixup_layerwise_batchout.csv") as f:
        rows = list(csv.DictReader(f))
    mine = yaml.safe_load(open(REPO_ROOT / files[1]))["recipes"]
    built = set()
    for name in mine:
        if name.endswith("_base"):
            continue
        dataset, arch = (("mnist5k", "smallcnn-w0.5") if name.endswith("_mnist")
                         else ("cifar10", "prn18-bb"))
        cell = resolve_cell(cfg, dataset, arch, name, 0, recipes)
        built.add(build_method(cell, build_threat(cell["threat"])).name)
        pub = recipes[name].get("published") or {}
        links = pub.get("rows", []) + [e["match"] for e in pub.get("different_protocol", [])]
        for link in links:
            assert any(all(r[k] == str(v) for k, v in link.items()) for r in rows), (name, link)
    assert built == {"mixup", "manifold_mixup", "iat"}
    assert {"mixup_mnist", "manifold_mixup_mnist", "iat_mnist"} <= set(mine)
    iat = recipes["iat_mnist"]
    assert iat["threat"]["eps"] == 0.1 and iat["train"]["epochs"] == 10
    assert iat["method_args"]["steps"] * iat["method_args"]["alpha"] == pytest.approx(0.25)
    assert recipes["mm_input_cifar"]["method_args"]["stages"] == ["input"]


# ------------------------------------------------------------------------------------ resume

RESUMABLE = [
    ("mixup", {}),
    ("mixup", {"variant": "per_sample", "criterion": "soft_ce"}),
    ("manifold_mixup", {}),
    ("iat", {"steps": 2, "alpha": 0.1}),
    ("iat", {"steps": 2, "alpha": 0.1, "mixing": "manifold", "forward": "joint",
             "variant": "per_sample", "attack_labels": "predicted", "criterion": "bce_softmax"}),
]


@pytest.mark.parametrize("method,args", RESUMABLE,
                         ids=[f"{m}-{'-'.join(map(str, a.values())) or 'default'}"
                              for m, a in RESUMABLE])
def test_killed_run_resumes_bit_for_bit(method, args, mnist5k_prepared, tmp_path):
    cell = tiny_cell(method, args)
    straight = run(cell, mnist5k_prepared, tmp_path / "straight")
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
    passes = straight["history"][0]["passes"]
    if method == "iat":
        assert passes["attack"]["backward"] > 0
    else:
        assert "attack" not in passes
