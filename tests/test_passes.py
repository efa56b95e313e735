"""PassCounter: every forward through the network body is counted once, whichever entry point
(``model(x)``, ``forward_features`` + ``head``, ``forward_with_features``, ``functional_call``),
and every gradient that reaches the features counts one backward; broken down by batch size."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from methods.measure.passes import PassCounter, sum_passes
from methods.models import build_model
from tests.helpers import TinyMLP, TinyNet, toy_batch


def small_cnn():
    return build_model("smallcnn", num_classes=10, image_shape=(1, 8, 8), mean=(0.5,), std=(0.5,),
                       width=0.125)


MODELS = {"normalized_smallcnn": small_cnn, "tinynet": TinyNet, "tinymlp_dropout":
          lambda: TinyMLP(bn=True, dropout=0.5, classes=10)}


def batch(name, n):
    x, y = toy_batch(n)
    return (x[:, :, :4, :4], y) if name.startswith("tinymlp") else (x, y)


@pytest.fixture(params=sorted(MODELS))
def setup(request):
    torch.manual_seed(0)
    model = MODELS[request.param]().train()
    return request.param, model, PassCounter(model)


def fb(n_forward, n_backward):
    return {"forward": n_forward, "backward": n_backward}


def test_plain_forward_and_backward_count_once(setup):
    name, model, counter = setup
    x, y = batch(name, 5)
    F.cross_entropy(model(x), y).backward()
    assert counter.totals() == {"train": fb(5, 5)}


def test_forward_features_then_head_counts_once(setup):
    name, model, counter = setup
    x, y = batch(name, 5)
    h = model.forward_features(x)
    F.cross_entropy(model.head(h), y).backward()
    assert counter.totals() == {"train": fb(5, 5)}


def test_forward_with_features_counts_once(setup):
    name, model, counter = setup
    x, y = batch(name, 5)
    logits, h = model.forward_with_features(x)
    (F.cross_entropy(logits, y) + h.pow(2).mean()).backward()  # both outputs used: still one pass
    assert counter.totals() == {"train": fb(5, 5)}


def test_no_grad_forwards_count_forward_only(setup):
    name, model, counter = setup
    x, _ = batch(name, 5)
    with torch.no_grad(), counter.phase("selection"):
        model(x)
        h = model.forward_features(x)   # Selective AT's grad_cosine scores
        model.head(h)
    assert counter.totals() == {"selection": fb(10, 0)}


def test_input_gradient_counts_a_backward(setup):
    name, model, counter = setup
    x, y = batch(name, 4)
    x.requires_grad_(True)
    with counter.phase("attack"):
        (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    assert g.shape == x.shape and counter.totals() == {"attack": fb(4, 4)}


def test_functional_call_under_torch_func_is_counted(setup):
    name, model, counter = setup
    model.eval()  # no dropout randomness / BN buffer updates inside the transform
    x, y = batch(name, 3)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss_of_params(p):
        return F.cross_entropy(functional_call(model, {**p, **buffers}, (x,)), y)

    def loss_of_input(xx):
        return F.cross_entropy(functional_call(model, {**params, **buffers}, (xx,)), y)

    grads = grad(loss_of_params)(params)
    assert grads.keys() == params.keys()
    with counter.phase("attack"):
        grad(loss_of_input)(x)
    assert counter.totals() == {"train": fb(3, 3), "attack": fb(3, 3)}


def test_a_hook_replacing_a_stage_output_does_not_double_count():
    """A mixing method's hook (manifold mixup) replaces a stage output: still one pass each way."""
    torch.manual_seed(0)
    model = small_cnn().train()
    counter = PassCounter(model)
    model.stage_module("stage1").register_forward_hook(lambda m, i, out: 0.5 * (out + out.flip(0)))
    x, y = toy_batch(6)
    F.cross_entropy(model(x), y).backward()
    assert counter.totals() == {"train": fb(6, 6)}


def test_totals_by_rows_splits_by_batch_size_and_reset_clears_both():
    model = TinyNet()
    counter = PassCounter(model)
    x, y = toy_batch(8)
    with counter.phase("attack"):
        F.cross_entropy(model(x), y).backward()             # 8 rows, forward + backward
        F.cross_entropy(model(x[:3]), y[:3]).backward()     # 3 rows, forward + backward
        with torch.no_grad():
            model(x[:3])                                    # 3 rows, forward only
    with torch.no_grad():
        model(x)                                            # "train", 8 rows, forward only
    assert counter.totals_by_rows() == {"attack": {3: fb(6, 3), 8: fb(8, 8)},
                                        "train": {8: fb(8, 0)}}
    assert counter.totals() == {"attack": fb(14, 11), "train": fb(8, 0)}
    assert sum_passes(counter.totals()) == fb(22, 11)
    counter.reset()
    assert counter.totals() == {} and counter.totals_by_rows() == {}


def test_plain_module_without_stages_is_counted_at_its_output():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    counter = PassCounter(model)
    x, y = toy_batch(5)
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        model(x)
    assert counter.totals() == {"train": fb(10, 5)}


def test_detach_stops_counting_forwards():
    model = TinyNet()
    counter = PassCounter(model)
    x, _ = toy_batch(5)
    model(x)
    counter.detach()
    model(x)
    assert counter.totals() == {"train": fb(5, 0)}
