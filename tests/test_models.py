"""Fast CPU tests for ``methods.models``: every registered architecture gets the generic checks
through ``MODELS.names()``; the official-architecture facts are pinned per model below."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from methods.models import (FEATURES_STAGE, INPUT_STAGE, Backbone, NormedLinear, Stage,
                            arch_defaults, build_model)
from methods.registry import MODELS

SLIM = 0.0625
SHAPES = [(3, 32, 32), (1, 28, 28)]
MEAN = {3: (0.4914, 0.4822, 0.4465), 1: (0.1307,)}
STD = {3: (0.2471, 0.2435, 0.2616), 1: (0.3081,)}

# Parameter counts at width=1.0, computed once by instantiating the official definitions and
# summing p.numel() (their state dicts were also loaded into these nets and gave the same logits):
#   preactresnet18 final_bn=True : pdejorge/N-FGSM architectures/preact_resnet.py PreActResNet18
#                                  (= locuslab/fast_adversarial CIFAR10/preact_resnet.py)
#   preactresnet18 final_bn=False: Yinting-Wu/Batch-in-Batch defenses/models/preact_resnet.py
#                                  PreActResNet(PreActBlock, [2,2,2,2], fc_input_dim_scale=1)
#   wrn meliketoy                : pdejorge/N-FGSM architectures/wide_resnet.py Wide_ResNet(28,10,0.3)
#   wrn bearpaw                  : Batch-in-Batch defenses/models/wide_resnet.py WideResNet(28, 10, 0.3)
#   resnet32                     : kaidic/LDAM-DRW models/resnet_cifar.py resnet32(use_norm=False/True)
#   resnet18_sat                 : Selective-AT ResNet18_CIFAR10 (torchvision resnet18, 3x3 conv1)
#   smallcnn                     : Selective-AT MNISTNet (28x28x1 input)
#   vgg19_bn tied=True           : Hrushikesh-github/Batchout-Robustness-method vgg19/standard/
#                                  vgg_change.py VGG() (weight-tied, Conv-ReLU-BN; vgg.py is the
#                                  same with Conv-BN-ReLU); their state dicts loaded into ours
#                                  (order conv_relu_bn / conv_bn_relu) give identical logits in
#                                  train and eval mode
#   vgg19_bn tied=False          : the same net with 16 independent convs (the usual CIFAR VGG19)
# Keys: (name, image_shape, arch_args as sorted tuple) -> {num_classes: count}.
C32, M28 = (3, 32, 32), (1, 28, 28)
EXPECTED_PARAMS = {
    ("preactresnet18", C32, ()): {10: 11_172_170, 100: 11_218_340},
    ("preactresnet18", C32, (("final_bn", False),)): {10: 11_171_146, 100: 11_217_316},
    ("wrn", C32, ()): {10: 36_489_290, 100: 36_546_980},
    ("wrn", C32, (("variant", "bearpaw"),)): {10: 36_479_194, 100: 36_536_884},
    ("resnet32", C32, ()): {10: 464_154, 100: 470_004},
    ("resnet32", C32, (("normed_head", True),)): {10: 464_144, 100: 469_904},
    ("resnet18_sat", C32, ()): {10: 11_173_962, 100: 11_220_132},
    ("smallcnn", M28, ()): {10: 1_199_882},
    ("vgg19_bn", C32, ()): {10: 20_040_522, 100: 20_086_692},
    ("vgg19_bn", C32, (("tied", True),)): {10: 4_694_346, 100: 4_740_516},
}


#: Arch args that keep the stage tests fast (the stage list does not depend on depth).
FAST_ARGS = {"wrn": {"depth": 10}}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(name, shape=(3, 32, 32), num_classes=10, width=SLIM, **arch_args):
    c = shape[0]
    return build_model(name, num_classes=num_classes, image_shape=shape, mean=MEAN[c], std=STD[c],
                       width=width, **arch_args)


def has_bn(model):
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.fixture(autouse=True)
def _seed_and_threads():
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny nets: threads only add contention on shared CPUs
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", MODELS.names())
def test_forward_contract(name, shape):
    model = build(name, shape, num_classes=7).eval()
    x = torch.rand(2, *shape)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        assert logits.shape == (2, 7)
        assert feats.ndim == 2 and feats.shape == (2, model.feature_dim)
        assert isinstance(model.head, nn.Linear)
        torch.testing.assert_close(model.head(feats), logits)
        torch.testing.assert_close(model.net(model.normalize(x)), logits)
    assert torch.isfinite(logits).all()
    model.train()
    model(x).sum().backward()  # gradients flow through the whole net
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", MODELS.names())
def test_normalization_is_inside(name):
    mean, std = (0.3, 0.5, 0.7), (0.2, 0.25, 0.4)
    model = build_model(name, num_classes=5, image_shape=(3, 32, 32), mean=mean, std=std,
                        width=SLIM).eval()
    x = torch.rand(2, 3, 32, 32)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - m) / s))
    sd = model.state_dict()
    torch.testing.assert_close(sd["normalize.mean"].flatten(), torch.tensor(mean))
    torch.testing.assert_close(sd["normalize.std"].flatten(), torch.tensor(std))


@pytest.mark.parametrize("name", MODELS.names())
def test_train_eval_modes(name):
    model = build(name)
    x = torch.rand(4, 3, 32, 32)
    if not has_bn(model):
        has_dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
        if not has_dropout:
            with torch.no_grad():
                torch.testing.assert_close(model.train()(x), model.eval()(x))
        return
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    before = [bn.running_mean.clone() for bn in bns]
    with torch.no_grad():
        model.eval()(x)
    assert all(torch.equal(b, bn.running_mean) for b, bn in zip(before, bns)), "eval updated BN"
    with torch.no_grad():
        single_eval = model(x[:1])
        torch.testing.assert_close(model(x)[:1], single_eval)  # eval: per-sample, batch-independent
        model.train()(x)
    assert any(not torch.equal(b, bn.running_mean) for b, bn in zip(before, bns)), "train froze BN"
    model.train()
    for m in model.modules():  # isolate BN from dropout
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    with torch.no_grad():
        assert not torch.allclose(model(x)[:1], model(x[:1]))  # train: batch statistics


@pytest.mark.parametrize("name", MODELS.names())
def test_head_can_be_replaced(name):
    model = build(name)
    new = nn.Linear(model.feature_dim, 3)
    model.head = new
    assert model.head is new and model(torch.rand(2, 3, 32, 32)).shape == (2, 3)
    assert sum(k.endswith("weight") and v.shape == new.weight.shape
               for k, v in model.state_dict().items()) == 1


@pytest.mark.parametrize("name", MODELS.names())
def test_width_shrinks_parameters(name):
    counts = [n_params(build(name, width=w)) for w in (SLIM, 0.25, 0.5)]
    assert counts[0] < counts[1] < counts[2]


@pytest.mark.parametrize("key", sorted(EXPECTED_PARAMS, key=str), ids=str)
def test_official_parameter_counts(key):
    name, shape, args = key
    for num_classes, expected in EXPECTED_PARAMS[key].items():
        model = build(name, shape, num_classes=num_classes, width=1.0, **dict(args))
        assert n_params(model) == expected, (key, num_classes)


def test_every_model_has_an_official_count():
    assert {name for name, _, _ in EXPECTED_PARAMS} == set(MODELS.names())


@pytest.mark.parametrize("name", MODELS.names())
def test_unknown_arch_arg_is_named(name):
    with pytest.raises(TypeError, match="bogus_option"):
        build(name, bogus_option=1)


@pytest.mark.parametrize("name, args, field", [
    ("wrn", {"depth": 27}, "depth"),
    ("wrn", {"widen_factor": 0}, "widen_factor"),
    ("wrn", {"dropout": 1.5}, "dropout"),
    ("wrn", {"variant": "zagoruyko"}, "variant"),
    ("wrn", {"variant": "bearpaw", "conv_init": True}, "conv_init"),
    ("preactresnet18", {"final_bn": "yes"}, "final_bn"),
    ("preactresnet18", {"preact_shortcut": 1}, "preact_shortcut"),
    ("resnet32", {"normed_head": "no"}, "normed_head"),
    ("vgg19_bn", {"order": "bn_first"}, "order"),
    ("vgg19_bn", {"tied": "yes"}, "tied"),
])
def test_bad_arch_values_are_named(name, args, field):
    with pytest.raises(ValueError, match=field):
        build(name, **args)


def test_bad_shapes_and_stats():
    with pytest.raises(ValueError, match="image size"):
        build("wrn", (3, 64, 64))
    with pytest.raises(ValueError, match="H == W"):
        build_model("smallcnn", num_classes=10, image_shape=(1, 28, 30), mean=(0.,), std=(1.,))
    with pytest.raises(ValueError, match="one entry per input channel"):
        build_model("smallcnn", num_classes=10, image_shape=(1, 28, 28), mean=(0., 0., 0.),
                    std=(1., 1., 1.))
    with pytest.raises(ValueError, match="std must be positive"):
        build_model("smallcnn", num_classes=10, image_shape=(1, 28, 28), mean=(0.,), std=(0.,))
    with pytest.raises(ValueError, match="width"):
        build("smallcnn", width=0)
    with pytest.raises(KeyError, match="registered"):
        build("resnet9000")


@pytest.mark.parametrize("name", MODELS.names())
def test_building_never_touches_cuda(name, monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("CUDA touched while building a model")
    monkeypatch.setattr(torch.cuda, "_lazy_init", boom)
    monkeypatch.setattr(torch.cuda, "is_available", boom)
    model = build(name)
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])


def test_spec_records_resolved_arch_args():
    model = build("wrn", depth=16)
    assert model.spec["name"] == "wrn" and model.spec["width"] == SLIM
    assert model.spec["arch_args"] == {**arch_defaults("wrn"), "depth": 16}
    assert arch_defaults("wrn")["dropout"] == 0.3  # N-FGSM and BB both use 0.3


# --- stages: declared, observed, used -------------------------------------------------------

def fast(name, shape=(3, 32, 32)):
    return build(name, shape, num_classes=7, width=0.125, **FAST_ARGS.get(name, {})).eval()


@pytest.mark.parametrize("name", MODELS.names())
def test_stage_list_is_declared(name):
    model = fast(name)
    info = model.feature_info
    names = model.stage_names()
    assert names == [s.name for s in info] and len(set(names)) == len(names) >= 3
    assert info[0] == Stage(INPUT_STAGE, "normalize", 3, 1)
    assert model.stage_module(INPUT_STAGE) is model.normalize
    assert info[-1].name == FEATURES_STAGE and info[-1].reduction == 0
    assert info[-1].channels == model.feature_dim
    assert all(s.module.startswith("net.") for s in info[1:])
    modules = [model.stage_module(n) for n in names]
    assert len({id(m) for m in modules}) == len(modules)
    assert all(not list(m.parameters()) for m in (modules[0], modules[-1])), \
        "input/features stage modules must be parameter-free"
    assert [s.name for s in model.net.feature_info] == names[1:]
    with pytest.raises(KeyError, match="stage1"):
        model.stage_module("no_such_stage")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", MODELS.names())
def test_stage_hooks_see_declared_shapes(name, shape):
    model = fast(name, shape)
    seen = {}

    def recorder(stage):
        return lambda mod, inputs, out: seen.setdefault(stage, []).append(tuple(out.shape))

    for s in model.feature_info:
        model.stage_module(s.name).register_forward_hook(recorder(s.name))
    with torch.no_grad():
        model(torch.rand(2, *shape))
    declared = {s.name: [(2, *s.output_shape(shape))] for s in model.feature_info}
    assert seen == declared  # every stage seen exactly once, with its declared shape


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", MODELS.names())
def test_forward_with_features_is_the_plain_forward(name, shape):
    model = fast(name, shape)
    calls = []
    model.stage_module(FEATURES_STAGE).register_forward_hook(lambda *a: calls.append(1))
    x = torch.rand(3, *shape)
    with torch.no_grad():
        logits, feats = model.forward_with_features(x)
        assert len(calls) == 1  # one forward
        assert torch.equal(logits, model(x)) and torch.equal(feats, model.forward_features(x))
    assert feats.shape == (3, model.feature_dim)


@pytest.mark.parametrize("name", MODELS.names())
def test_replacing_a_stage_output_changes_the_logits(name):
    model = fast(name)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
    for stage in model.stage_names():
        handle = model.stage_module(stage).register_forward_hook(
            lambda mod, inputs, out: torch.rand_like(out) + 1.0)
        with torch.no_grad():
            replaced = model(x)
        handle.remove()
        assert not torch.allclose(replaced, plain), f"stage {stage!r} output is not used"
    with torch.no_grad():
        assert torch.equal(model(x), plain)


@pytest.mark.parametrize("name", MODELS.names())
def test_stage_modules_add_no_state(name):
    """The parameter-free stage modules (pools, ReLUs, Flatten) carry no state_dict entries."""
    model = fast(name)
    for stage in model.stage_names()[1:]:
        module = model.stage_module(stage)
        if not list(module.children()):
            assert module.state_dict() == {}, stage


def test_stage_output_shape_convention():
    assert Stage("s", "m", 8, 1).output_shape((3, 28, 28)) == (8, 28, 28)
    assert Stage("s", "m", 8, 2).output_shape((3, 28, 28)) == (8, 14, 14)
    assert Stage("s", "m", 8, 8).output_shape((3, 28, 28)) == (8, 4, 4)   # 28 -> 14 -> 7 -> 4
    assert Stage("s", "m", 8, 4).output_shape((3, 32, 32)) == (8, 8, 8)
    assert Stage("s", "m", 8, 1, border=4).output_shape((1, 28, 28)) == (8, 24, 24)
    assert Stage("features", "m", 16, 0).output_shape((3, 32, 32)) == (16,)
    for bad in ({"channels": 0}, {"reduction": -1}, {"border": -2}, {"name": ""}, {"module": ""}):
        with pytest.raises(ValueError):
            Stage(**{"name": "s", "module": "m", "channels": 4, "reduction": 1, **bad})


class _Undeclared(Backbone):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.Flatten(1)
        self.head = nn.Linear(4, 2)

    def forward_features(self, x):
        return self.pool(x)


def test_backbone_requires_and_checks_its_stage_declaration():
    net = _Undeclared()
    with pytest.raises(TypeError, match="declares no stages"):
        net.feature_info
    with pytest.raises(ValueError, match="features"):
        net.declare_stages(Stage("stage1", "pool", 4, 0))
    with pytest.raises(ValueError, match="duplicate"):
        net.declare_stages(Stage("features", "pool", 4, 0), Stage("features", "pool", 4, 0))
    with pytest.raises(ValueError, match="input"):
        net.declare_stages(Stage("a", "pool", 4, 1), Stage("input", "pool", 4, 1),
                           Stage("features", "pool", 4, 0))
    with pytest.raises(AttributeError, match="nope"):
        net.declare_stages(Stage("features", "nope", 4, 0))
    net.declare_stages(Stage("features", "pool", 4, 0))
    x = torch.rand(3, 4)
    assert torch.equal(net(x), net.head(net.pool(x)))
    logits, feats = net.forward_with_features(x)
    assert torch.equal(logits, net(x)) and torch.equal(feats, x)


# --- per-architecture facts of the official codes ------------------------------------------

def test_preactresnet_variants():
    nfgsm, bb = build("preactresnet18"), build("preactresnet18", final_bn=False)
    assert nfgsm.net.bn is not None and bb.net.bn is None
    assert not nfgsm.net.layer2[0].preact_shortcut and bb.net.layer2[0].preact_shortcut


def test_wrn_variants():
    mel, bear = build("wrn"), build("wrn", variant="bearpaw")
    assert mel.net.bn.momentum == 0.9 and bear.net.bn.momentum == 0.1
    mel_convs = [m for m in mel.net.modules() if isinstance(m, nn.Conv2d)]
    bear_convs = [m for m in bear.net.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None for c in mel_convs) and all(c.bias is None for c in bear_convs)
    assert mel.net.layer2[0].conv2.stride == (2, 2) and bear.net.layer2[0].conv1.stride == (2, 2)
    assert torch.count_nonzero(bear.head.bias) == 0
    xav = build("wrn", conv_init=True)
    assert all(torch.count_nonzero(m.bias) == 0 for m in xav.modules() if isinstance(m, nn.Conv2d))


def test_wrn_dropout_only_in_train():
    model = build("wrn", depth=10, dropout=0.3)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x), model(x))
        model.train()
        assert not torch.allclose(model(x), model(x))


def test_resnet32_normed_head():
    model = build("resnet32", normed_head=True).eval()
    assert isinstance(model.head, NormedLinear) and model.head.bias is None
    with torch.no_grad():
        logits = model(torch.rand(4, 3, 32, 32))
    assert logits.abs().max() <= 1.0 + 1e-5


def test_resnet18_sat_matches_torchvision_layout():
    from torchvision.models import resnet18
    reference = resnet18(weights=None, num_classes=10)
    model = build("resnet18_sat", width=1.0)
    ours = {k[len("net.model."):]: v.shape for k, v in model.state_dict().items()
            if k.startswith("net.model.")}
    theirs = {k: v.shape for k, v in reference.state_dict().items()}
    assert ours.keys() == theirs.keys()
    assert {k for k in ours if ours[k] != theirs[k]} == {"conv1.weight"}
    assert ours["conv1.weight"] == (64, 3, 3, 3)
    assert isinstance(model.net.model.maxpool, nn.Identity) and model.head is model.net.model.fc


def test_vgg19_bn_layout_order_and_tying():
    """Conv -> ReLU -> BN by default (the Batchout nets), Conv -> BN -> ReLU as the option; with
    ``tied=True`` conv6-8 share one conv+BN and conv10-16 another, exactly the extension's
    ``features8`` / ``features11``; every other conv, and every conv when untied, is its own."""
    for tied in (False, True):
        model = build("vgg19_bn", tied=tied)
        convs = {layer.name: model.get_submodule(layer.output) for layer in model.hidden_layers
                 if layer.name.startswith("conv")}
        assert list(convs) == [f"conv{i}" for i in range(1, 17)]
        groups = {}
        for name, block in convs.items():
            groups.setdefault(id(block.conv), []).append(name)
            assert block.bn is convs[groups[id(block.conv)][0]].bn  # BN tied with its conv
        expected = ([[f"conv{i}"] for i in range(1, 17)] if not tied else
                    [["conv1"], ["conv2"], ["conv3"], ["conv4"], ["conv5"],
                     ["conv6", "conv7", "conv8"], ["conv9"], [f"conv{i}" for i in range(10, 17)]])
        assert sorted(groups.values()) == sorted(expected)
        assert len({id(b) for b in convs.values()}) == 16, "one block (and tap) per position"
    x = torch.rand(2, 3, 32, 32)
    for order, expected in (("conv_relu_bn", ["conv", "relu", "bn"]),
                            ("conv_bn_relu", ["conv", "bn", "relu"])):
        block = build("vgg19_bn", order=order).net.features[0]
        seen = []
        for name in ("conv", "bn", "relu"):
            getattr(block, name).register_forward_hook(lambda *a, n=name: seen.append(n))
        block(torch.rand(2, 3, 8, 8))
        assert seen == expected, order
    head = build("vgg19_bn", width=1.0).head
    assert head.in_features == 512 and not head.bias.detach().any()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("tied", [False, True])
def test_vgg19_bn_hidden_layers_fire_once_with_their_shapes(shape, tied):
    """21 hidden layers (16 convs, 5 pools) in forward order; each pre-activation tap and each
    output module runs once per forward even when its weights are tied (and 28x28 input keeps
    a 1x1 map before the classifier: ceil-mode pooling)."""
    model = fast("vgg19_bn", shape) if not tied else build("vgg19_bn", shape, width=0.125, tied=True)
    layers = model.hidden_layers
    assert [layer.name for layer in layers][:6] == ["conv1", "conv2", "pool1", "conv3", "conv4", "pool2"]
    assert len(layers) == 21 and sum(layer.pre_activation is None for layer in layers) == 5
    seen = []
    for layer in layers:
        for kind, path in (("pre", layer.pre_activation), ("out", layer.output)):
            if path is not None:
                model.get_submodule(path).register_forward_hook(
                    lambda mod, i, out, n=layer.name, k=kind: seen.append((n, k, tuple(out.shape))))
    with torch.no_grad():
        model(torch.rand(2, *shape))
    assert len(seen) == 16 * 2 + 5 and len(set((n, k) for n, k, _ in seen)) == len(seen)
    side = shape[1]
    sides = {1: side}
    for r in (2, 4, 8, 16, 32):
        sides[r] = -(-sides[r // 2] // 2)
    assert [s for n, k, s in seen if n == "pool5"] == [(2, 64, 1, 1)]  # width 0.125
    assert dict(((n, k), s) for n, k, s in seen)[("conv1", "pre")] == (2, 8, side, side)
    assert dict(((n, k), s) for n, k, s in seen)[("conv9", "out")] == (2, 64, sides[8], sides[8])
