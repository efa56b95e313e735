"""Evaluation-time defences (methods.defenses): spec labels and errors, Mixup Inference against a
direct computation with the same draws, its partner rules and Combined's gate, the sampling
pool (never an evaluated image unless the official flag asks for it; clean labels on noisy
data), the input transforms, EOT-PGD against plain PGD, oblivious and adaptive modes, predicted
vs true labels, and AutoAttack 'rand' through the adapter."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import TinyNet
from methods.attack_specs import AttackSpecError
from methods.attacks import attack_labels, eot_gradient, pgd
from methods.config import ConfigError, resolve_evaluation
from methods.data import load_dataset, prepare_dataset, read_prepared
from methods.data.splits import DatasetBundle, Split
from methods.defenses import input_transforms, mixup_inference  # noqa: F401  (fill DEFENSES)
from methods.defenses.base import DefendedModel, DefenseContext, build_pool
from methods.defenses.specs import (DefenseSpecError, check_defense_attacks, check_defense_specs,
                                    defense_attack_label, defense_label, metric_key, mode_label,
                                    normalize_defense_attack, normalize_defense_autoattack,
                                    normalize_defense_spec, split_defense_attack)
from methods.defenses.evaluate import evaluate_defenses, replay_draws
from methods.eval_core import run_attack
from methods.measure import make_meter
from methods.registry import ATTACKS, DEFENSES
from methods.runtime import cpu_generator
from methods.threat import ThreatModel

CPU = torch.device("cpu")
CLASSES = 10


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def toy_split(n: int, seed: int, offset: int) -> Split:
    x = torch.randint(0, 256, (n, 1, 8, 8), generator=gen(seed), dtype=torch.uint8)
    return Split(x=x, y=torch.arange(n) % CLASSES, indices=torch.arange(n) + offset)


@pytest.fixture(scope="module")
def toy():
    """A tiny bundle (1x8x8, 10 classes; train / val / test at distinct source indices) and a
    TinyNet in eval mode."""
    torch.manual_seed(0)
    bundle = DatasetBundle("toy", toy_split(60, 0, 0), toy_split(30, 1, 100), toy_split(20, 2, 1000),
                           CLASSES, (1, 8, 8), "none")
    return bundle, TinyNet().eval()


def context(bundle, max_rows=500, evaluated=None, augmentation="none"):
    pools = {}

    def pool_for(spec):
        key = (spec["pool"], spec["pool_size"])
        if key not in pools:
            pools[key] = build_pool(bundle, spec["pool"], spec["pool_size"], augmentation, 0, CPU,
                                    None, evaluated)
        return pools[key]
    return DefenseContext(CLASSES, tuple(bundle.image_shape), CPU, max_rows, pool_for)


def make(name, bundle, **fields):
    defense = DEFENSES.get(name)({"name": name, **fields})
    defense.setup(context(bundle))
    return defense


def images(bundle):
    return bundle.test.x.float() / 255


# ----------------------------------------------------------------------------- specs

def test_labels_defaults_and_non_default_fields():
    labels = {name: defense_label({"name": name}) for name in
              ("mi_pl", "mi_ol", "mi_combined", "gaussian", "rotation", "xie", "guo", "identity")}
    assert labels == {"mi_pl": "MI-PL", "mi_ol": "MI-OL", "mi_combined": "MI-Combined",
                      "gaussian": "GaussianNoise(σ=0.05)", "rotation": "Rotation(±20°)",
                      "xie": "Xie-CropPad", "guo": "Guo-CropRescale", "identity": "Identity"}
    assert defense_label({"name": "mi_ol", "lam": 0.6}) == "MI-OL(λ=0.6)"
    assert defense_label({"name": "mi_ol", "pool": "test_split_as_official"}) == \
        "MI-OL(pool=test_split_as_official)"
    assert defense_label({"name": "xie", "shrink": "resize"}) == "Xie-ResizePad"
    assert defense_label({"name": "rotation", "degrees": 10, "uint8": False}) == "Rotation(±10°,float)"
    spec = normalize_defense_spec({"name": "mi_combined"})
    assert spec == {"name": "mi_combined", "lam_pl": 0.5, "samples_pl": 5, "lam_ol": 0.4,
                    "samples_ol": 15, "threshold": 0.2, "pool": "auto", "pool_size": 10000,
                    "pool_augmentation": "training"}
    assert normalize_defense_spec(spec) == spec
    assert normalize_defense_spec({"name": "mi_ol"})["samples"] == 30
    assert normalize_defense_spec({"name": "mi_pl"})["samples"] == 10


@pytest.mark.parametrize("specs,message", [
    ([{"name": "mi_ol", "lam": 1.5}], r"defenses\[0\].lam: must be in \(0, 1\]"),
    ([{"name": "mi_ol", "lamda": 0.5}], r"defenses\[0\]: unknown key 'lamda' for defense 'mi_ol'"),
    ([{"name": "jpeg"}], r"defenses\[0\].name: unknown defense 'jpeg'"),
    ([{"name": "mi_ol", "pool": "test"}], r"defenses\[0\].pool: expected one of"),
    ([{"name": "xie", "min_size": 30, "max_size": 20}], r"defenses\[0\].min_size: 30 is above"),
    ([{"name": "mi_ol"}, {"name": "mi_ol", "lam": 0.5}], r"defenses\[0\] and evaluation.defenses\[1\] "
                                                         r"have the same label 'MI-OL'"),
])
def test_bad_defense_specs_name_the_field(specs, message):
    with pytest.raises(DefenseSpecError, match=message):
        check_defense_specs(specs)


def test_defense_attack_entries_default_to_predicted_labels_and_both_modes():
    entry = normalize_defense_attack({"name": "pgd", "steps": 10, "alpha": "2/255"})
    assert (entry["labels"], entry["modes"], entry["eot_samples"], entry["eot_redraw"]) == \
        ("predicted", ["oblivious", "adaptive"], 20, "step")
    # the official PGD runs every step (no early stop) and starts at random in the ball
    assert (entry["early_stop"], entry["random_start"], entry["targeted_rule"]) == (False, True, None)
    assert normalize_defense_attack(entry) == entry
    targeted = normalize_defense_attack({"name": "pgd", "steps": 10, "alpha": 0.01,
                                         "targeted": "random", "modes": ["oblivious"]})
    assert targeted["labels"] == "true" and targeted["targeted_rule"] == "true_label"
    with pytest.raises(DefenseSpecError, match=r"targeted_rule: applies to targeted attacks only"):
        normalize_defense_attack({**entry, "targeted_rule": "no_target"})
    with pytest.raises(DefenseSpecError, match=r"labels: 'predicted' applies to untargeted"):
        normalize_defense_attack({**targeted, "labels": "predicted"})
    with pytest.raises(AttackSpecError, match=r"x: unknown key 'stepz'"):
        normalize_defense_attack({"name": "pgd", "stepz": 3, "alpha": 0.1}, "x")
    assert normalize_defense_attack({**entry, "modes": ["adaptive", "oblivious"]})["modes"] == \
        ["oblivious", "adaptive"]
    assert defense_attack_label(entry) == "PGD-10-1-alpha=2/255-no_early_stop"
    assert defense_attack_label({**entry, "labels": True, "early_stop": True}) == \
        "PGD-10-1-alpha=2/255-labels=true"
    assert defense_attack_label({**targeted, "targeted_rule": "no_target"}) == \
        "PGD-10-1-alpha=0.01-targeted=random-no_early_stop-no_target_rule"
    assert mode_label(entry, "adaptive", randomized=True) == "adaptive-EOT-20"
    assert mode_label({**entry, "eot_redraw": "once"}, "adaptive", True) == "adaptive-EOT-20-fixed"
    assert mode_label(entry, "adaptive", randomized=False) == "adaptive"
    assert metric_key("MI-OL", "PGD-10-1-alpha=2/255", "oblivious") == \
        "MI-OL | PGD-10-1-alpha=2/255 | oblivious"
    assert metric_key("MI-OL") == "MI-OL | clean"
    with pytest.raises(DefenseSpecError, match=r"\[0\] and evaluation.defense_attacks\[1\] both write"):
        check_defense_attacks([entry, {**entry, "modes": ["adaptive"]}])


def test_resolve_evaluation_normalizes_defenses_and_keeps_identities_without_them():
    base = {"datasets": {"d": {"source": "mnist5k"}}, "archs": {"a": {"model": "smallcnn"}},
            "recipes": {"r": {"method": "standard", "threat": {"norm": "linf", "eps": 0.1},
                              "train": {"epochs": 1}}},
            "cells": [], "evaluation": {"attacks": [{"name": "fgsm"}]}}
    plain = resolve_evaluation(base, "r")
    assert "defenses" not in plain   # no key added: existing evaluations keep their eval_hash
    config = {**base, "evaluation": {**base["evaluation"], "defenses": [{"name": "mi_ol"}],
                                     "defense_attacks": [{"name": "pgd", "steps": 2, "alpha": "1/50"}],
                                     "defense_autoattack": {"version": "rand"}}}
    spec = resolve_evaluation(config, "r")
    assert spec["defenses"][0]["samples"] == 30 and spec["defense_attacks"][0]["alpha"] == 0.02
    assert spec["defense_autoattack"]["draws"] is None and spec["eval_hash"] != plain["eval_hash"]
    bad = {**base, "evaluation": {"defenses": [{"name": "mi_ol", "lam": 0}]}}
    with pytest.raises(ConfigError, match=r"recipe 'r': evaluation.defenses\[0\].lam"):
        resolve_evaluation(bad, "r")


# ----------------------------------------------------------------------------- Mixup Inference

@pytest.mark.parametrize("name", ["mi_ol", "mi_pl"])
def test_mi_average_equals_a_direct_computation_with_the_same_draws(toy, name):
    bundle, model = toy
    d = make(name, bundle, samples=7, lam=0.6, pool_size=30)
    x = images(bundle)
    got = d.log_probs(model, x, gen(5)).exp()
    # The same draws by hand: classes, then one pool image per draw, from the same stream.
    g = gen(5)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    rows = d.partners(predicted, g, 7)
    want = torch.zeros(len(x), CLASSES)
    for k in range(7):
        for i in range(len(x)):
            mixed = 0.6 * x[i] + 0.4 * d.pool.x[rows[k, i]]
            want[i] += F.softmax(model(mixed[None])[0], dim=0) / 7
    assert torch.allclose(got, want, atol=1e-6)


def test_mi_pl_mixes_with_the_predicted_class_and_mi_ol_never_does(toy):
    bundle, _ = toy
    pl, ol = make("mi_pl", bundle), make("mi_ol", bundle)
    predicted = torch.arange(20) % CLASSES
    pl_rows = pl.partners(predicted, gen(1), 50)
    assert torch.equal(pl.pool.y[pl_rows], predicted.expand(50, -1))
    ol_rows = ol.partners(predicted, gen(1), 400)
    ol_classes = ol.pool.y[ol_rows]
    assert not (ol_classes == predicted).any()
    for i in range(len(predicted)):   # uniform over the other nine: every one appears
        assert set(ol_classes[:, i].tolist()) == set(range(CLASSES)) - {int(predicted[i])}
    # Every pool image of a class can be drawn.
    assert set(pl_rows[:, 0].tolist()) == set(torch.nonzero(pl.pool.y == predicted[0]).flatten().tolist())


def test_mi_combined_keeps_pl_below_the_threshold_and_switches_to_ol_above(toy):
    bundle, model = toy
    x = images(bundle)
    combined = make("mi_combined", bundle, pool_size=30)
    with torch.no_grad():
        got = combined.log_probs(model, x, gen(3))
        # Direct: PL (N 5, lam 0.5), the gap, then OL (N 15, lam 0.4) on the rows above it.
        g = gen(3)
        confidence, predicted = F.softmax(model(x), dim=1).max(1)
        pl = combined.pl.log_probs(model, x, g, None, predicted)
        above = (confidence - pl.exp().max(1).values) >= 0.2
        want = pl.clone()
        idx = torch.nonzero(above).flatten()
        if len(idx):
            want[idx] = combined.ol.log_probs(model, x[idx], g, None, predicted[idx])
    assert torch.equal(got, want)
    assert (combined.pl.lam, combined.pl.samples, combined.ol.lam, combined.ol.samples) == (0.5, 5, 0.4, 15)
    with torch.no_grad():
        always_pl = make("mi_combined", bundle, pool_size=30, threshold=1.0).log_probs(model, x, gen(3))
        never_pl = make("mi_combined", bundle, pool_size=30, threshold=0.0).log_probs(model, x, gen(3))
        g = gen(3)
        pl_only = combined.pl.log_probs(model, x, g, None, predicted)
    assert torch.equal(always_pl, pl_only)            # a gap is always < 1
    below = (confidence - pl_only.exp().max(1).values) < 0.0
    assert not torch.equal(never_pl[~below], pl_only[~below])


def test_mi_combined_draws_follow_the_gate(toy):
    """EOT draws of MI-Combined: the gate (one PL estimate), then draws of the chosen branch;
    with threshold 1 every input keeps PL, so they are PL's draws after the gate's numbers."""
    bundle, model = toy
    x = images(bundle)[:6]
    combined = make("mi_combined", bundle, pool_size=30, threshold=1.0)
    got = combined.draws(model, x, gen(2), 3)
    g = gen(2)
    with torch.no_grad():
        predicted = model(x).argmax(1)
        combined.pl.log_probs(model, x, g, None, predicted)       # the gate's draws
    assert torch.equal(got, combined.pl.draws(model, x, g, 3, predicted))
    xg = x.clone().requires_grad_(True)
    both = make("mi_combined", bundle, pool_size=30, threshold=0.05).draws(model, xg, gen(2), 2)
    (grad,) = torch.autograd.grad(both.sum(), xg)
    assert both.shape == (2, 6, CLASSES) and grad.abs().sum() > 0


def test_mixing_is_differentiable_through_lam(toy):
    bundle, model = toy
    d = make("mi_ol", bundle, pool_size=30)
    x = images(bundle)[:4].requires_grad_(True)
    out = d.draws(model, x, gen(0), 3)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.abs().sum() > 0 and out.shape == (3, 4, CLASSES)


# ----------------------------------------------------------------------------- pool

def test_default_pool_never_holds_an_evaluated_image_and_the_official_flag_does(mnist5k_prepared):
    root = mnist5k_prepared
    bundle = load_dataset("mnist5k", {"source": "mnist5k"}, root / "data", root / "prepared")
    evaluated = bundle.test.x
    default = build_pool(bundle, "auto", 10000, "none", 0, CPU, root / "prepared", evaluated)
    assert default.record["split"] == "val" and default.record["size"] == len(bundle.val) == 500
    assert default.record["per_class"] == [50] * 10
    assert not set(default.record["indices"]) & set(bundle.test.indices.tolist())
    assert default.record["evaluated_images_in_pool"] == 0
    official = build_pool(bundle, "test_split_as_official", 10000, "none", 0, CPU, None, evaluated)
    assert official.record["source_split"] == "test"
    assert set(official.record["indices"]) == set(bundle.test.indices.tolist())
    assert official.record["evaluated_images_in_pool"] == len(evaluated)
    small = build_pool(bundle, "train", 100, "none", 7, CPU, root / "prepared", evaluated)
    assert small.record["per_class"] == [10] * 10 and small.record["evaluated_images_in_pool"] == 0
    assert torch.equal(small.x, build_pool(bundle, "train", 100, "none", 7, CPU, root / "prepared").x)
    # sorted by class, each class's rows where start/count say
    for c in range(10):
        rows = slice(int(small.start[c]), int(small.start[c] + small.count[c]))
        assert (small.y[rows] == c).all()


def test_train_pool_uses_the_clean_labels_of_a_noisy_dataset(mnist5k_prepared, tmp_path):
    spec = {"source": "mnist5k", "val_size": 0, "label_noise": {"kind": "symmetric", "rate": 0.4}}
    prepare_dataset("noisy", spec, mnist5k_prepared / "data", tmp_path)
    bundle = load_dataset("noisy", spec, mnist5k_prepared / "data", tmp_path)
    _, arrays = read_prepared(tmp_path)
    clean = arrays["train_clean_labels"]
    assert (clean != bundle.train.y).float().mean() > 0.3        # the bundle's labels are noisy
    pool = build_pool(bundle, "auto", 400, "none", 0, CPU, tmp_path)
    assert pool.record["split"] == "train" and "clean" in pool.record["labels"]
    position = {int(s): i for i, s in enumerate(bundle.train.indices.tolist())}
    rows = [position[s] for s in pool.record["indices"]]
    assert torch.equal(pool.y, clean[rows])
    assert not torch.equal(pool.y, bundle.train.y[rows])
    with pytest.raises(ValueError, match="needs the prepared directory"):
        build_pool(bundle, "train", 400, "none", 0, CPU, None)


def test_pool_without_a_class_is_refused(toy):
    bundle, _ = toy
    with pytest.raises(ValueError, match=r"no image of class\(es\)"):
        build_pool(bundle, "val", 5, "none", 0, CPU)


# ----------------------------------------------------------------------------- input transforms

@pytest.mark.parametrize("name,fields", [("gaussian", {}), ("rotation", {}), ("xie", {}),
                                         ("xie", {"shrink": "resize"}), ("guo", {}),
                                         ("rotation", {"uint8": False})])
def test_input_transforms_are_seeded_shape_preserving_and_differentiable(toy, name, fields):
    bundle, _ = toy
    d = make(name, bundle, **fields)
    x = images(bundle)[:6]
    a, b, c = d.transform(x, gen(1)), d.transform(x, gen(1)), d.transform(x, gen(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, x)
    if d.spec.get("uint8"):
        assert torch.allclose(a * 255, (a * 255).round(), atol=1e-4)   # on the 8-bit grid
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(d.transform(xg, gen(1)).sum(), xg)
    assert grad.abs().sum() > 0


def test_transform_parameters_follow_the_official_ranges(toy):
    bundle, _ = toy
    x = torch.ones(200, 1, 8, 8)
    xie = make("xie", bundle, uint8=False)          # 8 x 8: sizes round(0.75 * 8) = 6 .. 8
    assert (xie.min_size, xie.max_size) == (6, 8)
    out = xie.transform(x, gen(0))
    filled = out.flatten(1).sum(1)                   # crop of ones, padded with zeros: s * s ones
    assert set(filled.round().long().tolist()) <= {36, 49, 64} and len(set(filled.tolist())) == 3
    gauss = make("gaussian", bundle)
    noise = gauss.transform(torch.zeros(400, 1, 8, 8), gen(0)) - 0
    assert abs(float(noise.std()) - 0.025) < 0.002    # sigma 0.05 on [-1, 1] = 0.025 on [0, 1]
    assert make("gaussian", bundle, sigma_scale="unit").pixel_sigma == 0.05
    rot = make("rotation", bundle, uint8=False)
    assert rot.parameters_for(x, gen(0))[0].abs().max() <= 20
    guo = make("guo", bundle, uint8=False)
    assert torch.equal(guo.transform(x, gen(0)), x)   # a crop of a constant image rescaled


# ----------------------------------------------------------------------------- attacks

def test_eot_pgd_equals_plain_pgd_on_a_deterministic_defense(toy):
    bundle, model = toy
    identity = make("identity", bundle)
    x, y = images(bundle), bundle.test.y
    threat = ThreatModel("linf", 0.1)
    predictor = DefendedModel(identity, model, gen(0))
    for early_stop in (False, True):
        plain = pgd(model, x, y, threat, alpha=0.02, steps=6, early_stop=early_stop, generator=gen(4))
        for samples in (1, 3):
            draws = lambda xin, k: identity.draws(model, xin, gen(9), k)
            eot = pgd(predictor, x, y, threat, alpha=0.02, steps=6, early_stop=early_stop,
                      generator=gen(4), gradient=eot_gradient(draws, samples, chunk=2))
            assert torch.equal(eot, plain), (early_stop, samples)
    # a randomized defence moves differently
    noisy = make("gaussian", bundle, sigma=0.5)
    draws = lambda xin, k: noisy.draws(model, xin, gen(9), k)
    eot = pgd(DefendedModel(noisy, model, gen(0)), x, y, threat, alpha=0.02, steps=6,
              generator=gen(4), gradient=eot_gradient(draws, 4))
    assert not torch.equal(eot, pgd(model, x, y, threat, alpha=0.02, steps=6, generator=gen(4)))
    assert float(threat.distance(eot - x).max()) <= 0.1 + 1e-6


def test_eot_gradient_averages_the_draws(toy):
    bundle, model = toy
    d = make("mi_ol", bundle, pool_size=30)
    x, y = images(bundle)[:5], bundle.test.y[:5]
    delta = torch.zeros_like(x)
    _, grad = eot_gradient(lambda xin, k: d.draws(model, xin, gen(3), k), 4, chunk=4)(x, delta, y, False)
    # by hand: the same four draws in one call
    xg = x.clone().requires_grad_(True)
    logits = d.draws(model, xg, gen(3), 4)
    loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(4), reduction="sum")
    (want,) = torch.autograd.grad(loss, xg)
    assert torch.allclose(grad, want, atol=1e-6)


def test_predicted_labels_are_the_predictors_own(toy):
    bundle, model = toy
    x, y = images(bundle), bundle.test.y
    with torch.no_grad():
        predicted = model(x).argmax(1)
    assert torch.equal(attack_labels(model, x, y, "predicted"), predicted)
    assert attack_labels(model, x, y, "true") is y
    with pytest.raises(ValueError, match="unknown policy"):
        attack_labels(model, x, y, "guess")


def run_defenses(toy, specs, attacks, aa=None, **kw):
    bundle, model = toy
    x, y = images(bundle), bundle.test.y
    metrics = {}
    records = evaluate_defenses(check_defense_specs(specs), check_defense_attacks(attacks), aa, model,
                                bundle, x, y, {"norm": "linf", "eps": 0.1}, seed=0, batch_size=8,
                                device=CPU, meter=make_meter("null"), metrics=metrics,
                                evaluated=bundle.test.x, **kw)
    return metrics, records


def test_oblivious_and_adaptive_are_recorded_with_their_modes(toy):
    attacks = [{"name": "pgd", "steps": 3, "alpha": 0.05, "eot_samples": 2},
               {"name": "pgd", "steps": 3, "alpha": 0.05, "targeted": "random", "modes": ["oblivious"]}]
    metrics, records = run_defenses(toy, [{"name": "mi_ol", "samples": 3, "pool_size": 30},
                                          {"name": "identity"}], attacks)
    mi, pgd3 = "MI-OL(N=3,pool_size=30)", "PGD-3-1-alpha=0.05-no_early_stop"
    targeted = "PGD-3-1-alpha=0.05-targeted=random-no_early_stop"
    assert list(metrics) == [
        f"{mi} | clean", f"{mi} | {pgd3} | oblivious", f"{mi} | {pgd3} | adaptive-EOT-2",
        f"{mi} | {targeted} | oblivious",
        "Identity | clean", f"Identity | {pgd3} | oblivious", f"Identity | {pgd3} | adaptive",
        f"Identity | {targeted} | oblivious"]
    adaptive = metrics[f"{mi} | {pgd3} | adaptive-EOT-2"]
    assert (adaptive["mode"], adaptive["eot_samples"], adaptive["labels"]) == ("adaptive", 2, "predicted")
    assert adaptive["defense"] == {"label": mi, "name": "mi_ol"}
    assert adaptive["attack"]["name"] == "pgd" and "modes" not in adaptive["attack"]
    assert 0 < adaptive["max_distance"] <= 0.1 + 1e-6
    oblivious = metrics[f"{mi} | {pgd3} | oblivious"]
    assert oblivious["mode"] == "oblivious" and oblivious["eot_samples"] is None
    assert metrics[f"{mi} | {targeted} | oblivious"]["targeted_rule"] == "true_label"
    for m in metrics.values():
        assert sum(m["per_class"]["correct"]) == m["correct"] and sum(m["per_class"]["total"]) == m["n"]
    # The deterministic identity: adaptive and oblivious are the same attack, to the flag.
    assert metrics[f"Identity | {pgd3} | adaptive"]["per_class"] == \
        metrics[f"Identity | {pgd3} | oblivious"]["per_class"]
    record = records[mi]
    assert record["randomized"] and record["samples"] == 3 and record["pool"]["split"] == "val"
    assert record["pool"]["evaluated_images_in_pool"] == 0 and record["autoattack"] is None
    assert not records["Identity"]["randomized"] and records["Identity"]["samples"] == 1


def test_targeted_rules_true_label_accuracy_or_no_target_reached(toy):
    """``true_label`` (the official number): right on x_adv; ``no_target``: right on the clean
    input and the target not reached.  Checked against the same x_adv by hand (identity)."""
    bundle, model = toy
    x, y = images(bundle), bundle.test.y
    attack = {"name": "pgd", "steps": 3, "alpha": 0.05, "targeted": "random", "modes": ["oblivious"]}
    metrics, _ = run_defenses(toy, [{"name": "identity"}],
                              [attack, {**attack, "targeted_rule": "no_target"}])
    spec, _ = split_defense_attack(normalize_defense_attack(attack))
    g, right, missed = cpu_generator(0), [], []
    for i in range(0, len(x), 8):
        (run,) = ATTACKS.get("pgd")(model, x[i:i + 8], y[i:i + 8], spec, ThreatModel("linf", 0.1), g)
        with torch.no_grad():
            clean, adv = model(x[i:i + 8]).argmax(1), model(run.x_adv).argmax(1)
        right.append(adv == y[i:i + 8])
        missed.append((clean == y[i:i + 8]) & (adv != run.target))
    key = "Identity | PGD-3-1-alpha=0.05-targeted=random-no_early_stop"
    assert metrics[f"{key} | oblivious"]["correct"] == int(torch.cat(right).sum())
    assert metrics[f"{key}-no_target_rule | oblivious"]["correct"] == int(torch.cat(missed).sum())


def test_identity_oblivious_with_true_labels_is_the_base_attack(toy):
    """With ``labels: true`` the oblivious attack is the base evaluation's own (same generator
    seed), so under the identity defence its flags are the base metric's; with predicted
    labels it attacks the model's predictions instead."""
    bundle, model = toy
    x, y = images(bundle), bundle.test.y
    spec = {"name": "pgd", "steps": 3, "alpha": 0.05, "restarts": 1, "random_start": True,
            "early_stop": True, "targeted": None, "norm": None, "eps": None}
    base_ok, _ = run_attack(model, spec, ThreatModel("linf", 0.1), x, y, 8, 0, "base")
    metrics, _ = run_defenses(toy, [{"name": "identity"}],
                              [{"name": "pgd", "steps": 3, "alpha": 0.05, "labels": "true",
                                "early_stop": True, "modes": ["oblivious"]},
                               {"name": "pgd", "steps": 3, "alpha": 0.05, "early_stop": True,
                                "modes": ["oblivious"]}])
    true_labels = metrics["Identity | PGD-3-1-alpha=0.05-labels=true | oblivious"]
    assert true_labels["correct"] == int(base_ok.sum())
    assert true_labels["per_class"]["correct"] == torch.bincount(y[base_ok], minlength=10).tolist()
    # predicted labels: PGD pushes away from the model's clean prediction (same seeded stream),
    # and robust still means right on x_adv w.r.t. the true label
    with torch.no_grad():
        predicted = model(x).argmax(1)
    g, right = cpu_generator(0), []
    for i in range(0, len(x), 8):
        (run,) = ATTACKS.get("pgd")(model, x[i:i + 8], predicted[i:i + 8], spec, ThreatModel("linf", 0.1), g)
        with torch.no_grad():
            right.append(model(run.x_adv).argmax(1) == y[i:i + 8])
    predicted_metric = metrics["Identity | PGD-3-1-alpha=0.05 | oblivious"]
    assert predicted_metric["labels"] == "predicted"
    assert predicted_metric["correct"] == int(torch.cat(right).sum())


def test_fixed_draws_replay_the_same_randomness(toy):
    """``eot_redraw: once`` (the official adaptive attack keeps its partners): every gradient
    call replays the draws; ``step`` draws afresh.  Both run as their own metrics."""
    bundle, model = toy
    d = make("mi_ol", bundle, samples=2, pool_size=30)
    x, y = images(bundle)[:6], bundle.test.y[:6]
    g = gen(0)
    fresh = eot_gradient(lambda xin, k: d.draws(model, xin, g, k), 3)
    fixed = replay_draws(fresh, g)
    delta = torch.zeros_like(x)
    a, b = fixed(x, delta, y, False)[1], fixed(x, delta, y, False)[1]
    assert torch.equal(a, b)
    assert not torch.equal(fresh(x, delta, y, False)[1], fresh(x, delta, y, False)[1])
    one = {"name": "pgd", "steps": 2, "alpha": 0.05, "modes": ["adaptive"], "eot_samples": 3}
    metrics, _ = run_defenses(toy, [{"name": "mi_ol", "samples": 2, "pool_size": 30}],
                              [one, {**one, "eot_redraw": "once"}])
    key = "MI-OL(N=2,pool_size=30) | PGD-2-1-alpha=0.05-no_early_stop"
    assert metrics[f"{key} | adaptive-EOT-3-fixed"]["eot_redraw"] == "once"
    assert metrics[f"{key} | adaptive-EOT-3"]["eot_redraw"] == "step"


def test_autoattack_rand_runs_against_a_randomized_defense(toy):
    bundle, model = toy
    with torch.no_grad():   # labels the model gets right, so AutoAttack has points to attack
        predicted = model(images(bundle)).argmax(1)
    test = Split(x=bundle.test.x, y=predicted, indices=bundle.test.indices)
    mine = DatasetBundle("toy", bundle.train, bundle.val, test, CLASSES, (1, 8, 8), "none")
    aa = normalize_defense_autoattack({"version": "rand", "draws": 1, "n": 10, "seed": 0,
                                       "iterations": 4, "eot_iter": 3})
    specs = [{"name": "gaussian", "sigma": 0.001, "samples": 4}, {"name": "mi_ol", "samples": 2, "pool_size": 30},
             {"name": "identity"}]
    _, records = run_defenses((mine, model), specs, [], aa)
    result = records["GaussianNoise(σ=0.001,N=4)"]["autoattack"]
    assert result["version"] == "rand" and result["attacks"] == ["apgd-ce", "apgd-dlr"]
    assert set(result["per_attack"]) >= {"clean", "apgd-ce"}         # it attacked something
    assert len(result["indices"]) == 10 and result["draws_per_forward"] == 1
    assert (result["iterations"], result["eot_iter"]) == (4, 3)
    assert result["n"] == 10 and result["acc"] <= result["per_attack"]["clean"] + 1e-9
    assert "robust_rule" in result
    assert not any("randomized defense" in w for w in result["warnings"])
    assert records["MI-OL(N=2,pool_size=30)"]["autoattack"]["n"] == 10
    assert records["Identity"]["autoattack"] is None
