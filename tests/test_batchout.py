"""BatchOut (ICVGIP 2018) and its 2021 extension's variants: the stop-gradient identity, the
geometry of a negative coefficient, k of m rows, shared partners, coefficient draws, the
insertion points of SmallCNN / VGG19-BN, identity outside its own training forward, the
recipes, and a bit-for-bit resume through the trainer."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from methods.algorithms.batchout import BatchOut, Partner, draw_partners, mix
from methods.attacks import pgd
from methods.builders import build_method, build_threat
from methods.config import REPO_ROOT, load_recipes, load_yaml, resolve_cell, resolve_evaluation
from methods.models import build_model
from methods.models.core import HiddenLayer, sequential_hidden_layers
from methods.registry import METHODS
from methods.threat import ThreatModel
from tests.helpers import TinyNet, assert_same_training, kill_then_resume, make_ctx, run, tiny_cell


THREAT = ThreatModel("linf", 0.1)
RECIPES = REPO_ROOT / "workflow" / "config" / "papers"


def smallcnn(width=0.25):
    return build_model("smallcnn", num_classes=10, image_shape=(1, 28, 28), mean=(0.1307,),
                       std=(0.3081,), width=width)


def vgg(width=0.0625, **arch):
    return build_model("vgg19_bn", num_classes=10, image_shape=(3, 32, 32), mean=(0.5,) * 3,
                       std=(0.25,) * 3, width=width, **arch)


def batchout(**kwargs):
    return BatchOut(threat=THREAT, **kwargs)


def record(model, paths):
    """Forward hooks registered now (before BatchOut's): the *unmixed* outputs of ``paths``."""
    seen = {}
    handles = [model.get_submodule(p).register_forward_hook(
        lambda mod, i, out, p=p: seen.__setitem__(p, out.detach().clone())) for p in paths]
    return seen, handles


# ------------------------------------------------------------------------------ the operation

def test_the_gradient_flows_only_through_the_sample_itself():
    """Eq. (2) with stop-gradient: d x~_j / d x_j = I and d x~_j / d x_r = 0, so the Jacobian
    of the whole mixed batch w.r.t. the batch is exactly the identity (for any partners)."""
    h = torch.randn(5, 3, dtype=torch.float64)
    partner = torch.tensor([3, 0, 4, 1, 2])
    for n, rows in ((0.3, 5), (-0.2, 5), (0.5, 2)):
        jac = torch.autograd.functional.jacobian(lambda t: mix(t, partner, n, rows), h)
        assert torch.equal(jac.reshape(15, 15), torch.eye(15, dtype=torch.float64))
        # ... while the forward value really is (1 - n) x_j + n x_r on the mixed rows
        out = mix(h, partner, n, rows)
        torch.testing.assert_close(out[:rows], (1 - n) * h[:rows] + n * h[partner[:rows]])
        assert torch.equal(out[rows:], h[rows:])


@pytest.mark.parametrize("n", [-0.2, -0.3, 0.3])
def test_the_distance_to_the_partner_scales_by_one_minus_n(n):
    """x~_j - x_r = (1 - n)(x_j - x_r): a negative n moves each row away from its partner by
    exactly the factor |1 - n| > 1, a positive one towards it."""
    h = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    partner = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    out = mix(h, partner, n, 8)
    before = (h - h[partner]).flatten(1).norm(dim=1)
    after = (out - h[partner]).flatten(1).norm(dim=1)
    torch.testing.assert_close(after, abs(1 - n) * before)
    moved = before > 0
    assert bool(((after[moved] > before[moved]) if n < 0 else (after[moved] < before[moved])).all())


def test_partner_rules():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (64,), generator=g)
    mutual = draw_partners(Partner.MUTUAL, y, g)
    assert torch.equal(mutual, torch.arange(63, -1, -1)) and torch.equal(mutual[mutual], torch.arange(64))
    diff = torch.stack([draw_partners(Partner.DIFFERENT_CLASS, y, g) for _ in range(50)])
    assert bool((y[diff] != y).all())
    # uniform over the rows of the other classes
    small = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    draws = torch.stack([draw_partners(Partner.DIFFERENT_CLASS, small, g) for _ in range(3000)])
    for j, others in ((0, [3, 4, 5, 6, 7]), (3, [0, 1, 2, 5, 6, 7]), (7, [0, 1, 2, 3, 4])):
        counts = torch.bincount(draws[:, j], minlength=8)
        assert counts[others].sum() == 3000
        assert stats.chisquare(counts[others].numpy()).pvalue > 1e-3
    alone = draw_partners(Partner.DIFFERENT_CLASS, torch.zeros(6, dtype=torch.long), g)
    assert torch.equal(alone, torch.arange(6)), "no other class in the batch: itself (unchanged)"
    # "random" is the extension's code as it runs: any class, itself included
    rand = torch.stack([draw_partners(Partner.RANDOM, y, g) for _ in range(50)])
    assert bool((y[rand] == y).any()) and bool((rand == torch.arange(64)).any())
    assert rand.min() >= 0 and rand.max() <= 63


def test_random_coefficients_follow_the_configured_probabilities():
    """random_3_-2_0: one n per step from {0.3, -0.2, 0} with p = [0.6, 0.3, 0.1], the same at
    every layer; seeded, so the same generator state gives the same sequence."""
    method = batchout(layers=[["conv1", "conv2", "fc1"]], position="output", k=1.0,
                      coefficient="choice", choices=[0.3, -0.2, 0.0], probs=[0.6, 0.3, 0.1])
    ins = method.insertions(smallcnn())
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    y = torch.zeros(4, dtype=torch.long)
    draws = [method.draw(ins, y, g) for _ in range(6000)]
    assert all(len(set(d.coefficients.values())) == 1 for d in draws)
    values = [d.coefficients["conv1"] for d in draws]
    observed = [values.count(v) for v in (0.3, -0.2, 0.0)]
    assert sum(observed) == 6000
    assert stats.chisquare(observed, [3600, 1800, 600]).pvalue > 1e-3
    g.set_state(state)
    assert [method.draw(ins, y, g).coefficients["conv1"] for _ in range(50)] == values[:50]


def test_uniform_coefficients_are_drawn_per_layer_per_step_within_their_maximum():
    """The paper's CIFAR rule: n ~ U[0, n_max], resampled per BatchOut layer (per-layer maxima)."""
    method = batchout(coefficient="uniform", n={"conv1": 0.1, "conv2": 0.1, "fc1": 0.15})
    ins = method.insertions(smallcnn())
    g = torch.Generator().manual_seed(3)
    draws = [method.draw(ins, torch.zeros(8, dtype=torch.long), g).coefficients for _ in range(2000)]
    for layer, top in (("conv1", 0.1), ("conv2", 0.1), ("fc1", 0.15)):
        v = np.array([d[layer] for d in draws])
        assert v.min() >= 0 and v.max() < top
        assert stats.kstest(v / top, "uniform").pvalue > 1e-3
    assert np.corrcoef([d["conv1"] for d in draws], [d["conv2"] for d in draws])[0, 1] < 0.1


# ------------------------------------------------------------------------------ in the model

def test_insertion_points_are_the_declared_modules():
    cnn = smallcnn()
    pre = batchout().insertions(cnn)
    assert [i.layer for i in pre] == ["conv1", "conv2", "fc1"]
    assert [i.module for i in pre] == [cnn.net.conv1, cnn.net.conv2, cnn.net.fc1]
    assert [i.group for i in pre] == [0, 1, 2], "'all': each layer draws its own partner"
    out = batchout(position="output", layers=["conv2", ["conv1", "fc1"]]).insertions(cnn)
    assert [(i.layer, i.module, i.group) for i in out] == [
        ("conv2", cnn.net.relu2, 0), ("conv1", cnn.net.relu1, 1), ("fc1", cnn.net.relu3, 1)]
    net = vgg()
    alt = batchout(position="output", layers=[["conv9", "conv11", "pool4", "conv14", "conv16"]])
    # the extension's call indices #11, #13, #15, #17, #19
    assert [i.module for i in alt.insertions(net)] == [net.net.features[i] for i in (11, 13, 15, 17, 19)]
    pre_vgg = batchout().insertions(net)
    assert len(pre_vgg) == 16 and pre_vgg[8].module is net.net.features[11].pre
    # order conv_bn_relu: the pre-activation tap sits after the BN, right before the ReLU
    block = vgg(order="conv_bn_relu").net.features[0]
    seen = []
    for name in ("bn", "pre", "relu"):
        getattr(block, name).register_forward_hook(lambda *a, n=name: seen.append(n))
    block(torch.rand(2, 3, 4, 4))
    assert seen == ["bn", "pre", "relu"]


def test_a_net_built_from_sequentials_gets_its_layers_from_its_structure():
    net = TinyNet(batchnorm=True)
    assert sequential_hidden_layers(net) == net.hidden_layers == [
        HiddenLayer("body.2", "body.2", "body.1"), HiddenLayer("body.5", "body.5", "body.4")]
    assert build_model("preactresnet18", num_classes=10, image_shape=(3, 32, 32), mean=(0.,) * 3,
                       std=(1.,) * 3, width=0.0625).hidden_layers == []
    with pytest.raises(ValueError, match="declares no hidden layers"):
        batchout().insertions(build_model("wrn", num_classes=10, image_shape=(3, 32, 32),
                                          mean=(0.,) * 3, std=(1.,) * 3, width=0.0625, depth=10))


def test_only_the_first_k_rows_change_and_by_exactly_eq_2():
    torch.manual_seed(0)
    model = smallcnn().train()
    x, y = torch.rand(10, 1, 28, 28), torch.randint(0, 10, (10,))
    method = batchout(layers=["conv2"], k=0.5, n=0.4)
    seen, handles = record(model, ["net.conv2"])
    after = {}
    with method.installed(model, y, torch.Generator().manual_seed(1)) as draws:
        model.net.conv2.register_forward_hook(lambda m, i, o: after.setdefault("o", o.detach()))
        model(x)
    for h in handles:
        h.remove()
    h, out, r = seen["net.conv2"], after["o"], draws.partners[0]
    assert draws.rows == 5
    torch.testing.assert_close(out[:5], h[:5] + 0.4 * (h[r[:5]] - h[:5]))
    assert torch.equal(out[5:], h[5:]), "rows after the first k are untouched"
    assert not torch.equal(out[:5], h[:5])


def test_the_partner_is_shared_within_a_group_and_fresh_across_groups():
    """One list entry = one partner draw reused at every layer in it (the extension's alt_k:
    r drawn at the first insertion and reused); separate entries draw separately."""
    torch.manual_seed(0)
    model = vgg().train()
    x, y = torch.rand(12, 3, 32, 32), torch.randint(0, 10, (12,))
    names = ["conv9", "conv11", "pool4"]
    paths = {name: model.hidden_layer(name).output for name in names + ["conv14"]}
    method = batchout(position="output", k=1.0, n=0.25, layers=[names, "conv14"])
    original, handles = record(model, list(paths.values()))
    mixed = {}
    with method.installed(model, y, torch.Generator().manual_seed(5)) as draws:
        for name, p in paths.items():
            model.get_submodule(p).register_forward_hook(
                lambda m, i, o, n=name: mixed.__setitem__(n, o.detach()))
        model(x)
    for h in handles:
        h.remove()
    shared, own = draws.partners
    assert not torch.equal(shared, own)
    for name, r in [*((n, shared) for n in names), ("conv14", own)]:
        h = original[paths[name]]
        torch.testing.assert_close(mixed[name], h + 0.25 * (h[r] - h))


def test_identity_in_eval_mode_and_outside_its_own_training_forward():
    torch.manual_seed(0)
    model = vgg(tied=True)
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    method = batchout(position="output", layers=[["conv9", "pool4"]], k=1.0, n=-0.3)
    model.eval()
    with torch.no_grad():
        plain = model(x)
        with method.installed(model, y, torch.Generator().manual_seed(0)) as draws:
            assert torch.equal(model(x), plain), "eval mode: BatchOut is the identity"
        assert draws.calls == {}
    # an attack run inside the hooks' lifetime in eval mode (the evaluation's mode) is unchanged
    with method.installed(model, y, torch.Generator().manual_seed(0)):
        adv = pgd(model, x, y, ThreatModel("linf", 8 / 255), alpha=2 / 255, steps=3,
                  generator=torch.Generator().manual_seed(1))
    assert torch.equal(adv, pgd(model, x, y, ThreatModel("linf", 8 / 255), alpha=2 / 255, steps=3,
                                generator=torch.Generator().manual_seed(1)))
    # a training step leaves no hook behind: afterwards every forward is the plain one
    def fresh(state):
        net = vgg(tied=True)
        net.load_state_dict(state)
        return net

    model.train()
    ctx = make_ctx(model)
    before = fresh(copy.deepcopy(model.state_dict()))
    hooks = [len(m._forward_hooks) for m in model.modules()]   # the pass counter's own hook
    loss = method.loss(model, x, y, ctx)
    assert [len(m._forward_hooks) for m in model.modules()] == hooks
    assert ctx.stats["batchout_n"] == -0.3
    plain = fresh(model.state_dict())     # same weights and BN statistics, never hooked
    with torch.no_grad():
        for mode in (True, False):
            assert torch.equal(model.train(mode)(x), plain.train(mode)(x))
        # ... and the training forward really was mixed (train-mode BN: batch statistics)
        assert not torch.allclose(loss, F.cross_entropy(before.train()(x), y))


def test_hooks_are_removed_when_the_forward_raises():
    model = smallcnn().train()
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="saw 3 rows"):
        with batchout().installed(model, y, torch.Generator().manual_seed(0)):
            model(torch.rand(3, 1, 28, 28))
    assert all(not m._forward_hooks for m in model.modules())


def test_zero_coefficient_is_plain_cross_entropy_and_attack_free():
    """n = 0 (the third choice of random_3_-2_0) trains exactly like standard training: one
    forward, one backward per example, the same loss."""
    torch.manual_seed(0)
    model = smallcnn().train()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    ctx = make_ctx(model)
    got = batchout(n=0.0).loss(model, x, y, ctx)
    torch.testing.assert_close(got, F.cross_entropy(model(x), y))
    assert ctx.counter.totals()["train"]["forward"] == 16  # this forward and ours: 8 rows each


@pytest.mark.parametrize("kwargs, field", [
    ({"position": "post"}, "position"),
    ({"k": 0.0}, "k"),
    ({"k": 1.5}, "k"),
    ({"coefficient": "gaussian"}, "coefficient"),
    ({"partner": "nearest"}, "partner"),
    ({"n": "big"}, "n"),
    ({"layers": []}, "layers"),
    ({"layers": ["conv1", ["conv1"]]}, "listed twice"),
    ({"coefficient": "choice"}, "choices"),
    ({"coefficient": "choice", "choices": [0.3, -0.2], "probs": [0.6, 0.6]}, "sum to 1"),
    ({"coefficient": "choice", "choices": [0.3, -0.2], "probs": [1.0]}, "one probability"),
    ({"choices": [0.3]}, "only used with coefficient='choice'"),
])
def test_bad_parameters_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        batchout(**kwargs)


def test_bad_placements_are_named():
    cnn = smallcnn()
    with pytest.raises(ValueError, match="'conv9'.*hidden layers"):
        batchout(layers=["conv9"]).insertions(cnn)
    with pytest.raises(ValueError, match="'pool4' has no pre-activation"):
        batchout(layers=["pool4"]).insertions(vgg())
    with pytest.raises(ValueError, match=r"missing \['fc1'\]"):
        batchout(n={"conv1": 0.1, "conv2": 0.1}).insertions(cnn)


def test_describe_records_the_declared_parameters():
    d = batchout(layers=[["conv9", "conv11"]], position="output", k=1, coefficient="choice",
                 choices=[0.3, -0.2, 0], probs=[0.6, 0.3, 0.1], partner="mutual").describe()
    assert d["layers"] == [["conv9", "conv11"]] and d["position"] == "output"
    assert d["coefficient"] == "choice" and d["choices"] == [0.3, -0.2, 0.0]
    assert d["partner"] == "mutual" and d["k"] == 1.0
    assert set(d) == {"name", "paper", "threat", *BatchOut.parameters()}
    assert METHODS.get("batchout") is BatchOut


# ------------------------------------------------------------------------------ recipes

def recipe_config():
    """batchout.yaml extends mnist5k.yaml's base, so both are loaded."""
    return {"recipe_files": ["workflow/config/papers/mnist5k.yaml",
                             "workflow/config/papers/batchout.yaml"],
            "datasets": {"mnist5k": {"source": "mnist5k"}, "cifar10": {"source": "cifar10"}},
            "archs": {"smallcnn-w0.5": {"model": "smallcnn", "width": 0.5},
                      "vgg19bn": {"model": "vgg19_bn"}, "vgg19bn-tied": {"model": "vgg19_bn", "tied": True}}}


def test_every_batchout_recipe_builds_places_its_layers_and_links_published_rows():
    import csv
    cfg = recipe_config()
    recipes = load_recipes(cfg)
    names = [n for n in load_yaml(RECIPES / "batchout.yaml")["recipes"]]
    with open(REPO_ROOT / "paper_tables/published/iada_mixup_layerwise_batchout.csv") as f:
        rows = list(csv.DictReader(f))
    models = {"smallcnn-w0.5": smallcnn(0.125), "vgg19bn": vgg()}
    for name in names:
        if name.endswith("_base"):
            continue
        arch = "smallcnn-w0.5" if "mnist" in name else "vgg19bn"
        dataset = "mnist5k" if arch.startswith("smallcnn") else "cifar10"
        cell = resolve_cell(cfg, dataset, arch, name, 0, recipes)
        method = build_method(cell, build_threat(cell["threat"]))
        resolve_evaluation(cfg, name, recipes)   # its attack specs are valid and distinct
        assert method.name == cell["method"] == ("standard" if name == "standard_vgg" else "batchout")
        if method.name == "batchout":
            assert method.insertions(models[arch]), name
        for link in [*recipes[name].get("published", {}).get("rows", []),
                     *(d["match"] for d in recipes[name].get("published", {}).get("different_protocol", []))]:
            assert any(all(r[k] == str(v) for k, v in link.items()) for r in rows), (name, link)
    r = recipes["batchout_mnist"]
    assert r["method_args"]["coefficient"] == "choice" and r["train"]["batch_size"] == 64
    alt = recipes["batchout_random_3_neg2_0"]["method_args"]
    assert alt["layers"] == [["conv9", "conv11", "pool4", "conv14", "conv16"]]
    assert alt["choices"] == [0.3, -0.2, 0.0] and alt["probs"] == [0.6, 0.3, 0.1] and alt["k"] == 1.0


# ------------------------------------------------------------------------------ resume

def test_batchout_trains_and_resumes_bit_for_bit(mnist5k_prepared, tmp_path):
    args = {"layers": [["conv1", "conv2"], "fc1"], "position": "output", "k": 0.5,
            "coefficient": "choice", "choices": [0.3, -0.2, 0.0], "probs": [0.6, 0.3, 0.1]}
    cell = tiny_cell("batchout", args)
    straight = run(cell, mnist5k_prepared, tmp_path / "straight")
    # killed after the 2nd step of the 3rd epoch (epoch=2, step=1: 0-based); the helper checks
    # what the kill left and that the rerun resumed from epoch 2
    resumed = kill_then_resume(cell, mnist5k_prepared, tmp_path / "killed", epoch=2, step=1)
    assert_same_training(tmp_path / "straight", tmp_path / "killed", straight, resumed)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]
    assert ([h["method_stats"]["batchout_n"] for h in resumed["history"]]
            == [h["method_stats"]["batchout_n"] for h in straight["history"]])
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["method"]["layers"] == [["conv1", "conv2"], "fc1"]
    # one forward and one backward per example, like standard training
    assert straight["passes"]["per_example"] == {"forward": 1.0, "backward": 1.0}
