"""Robust evaluation of one trained checkpoint.  Evaluation never trusts the training code.

* The model is rebuilt from the cell config, loaded from a named checkpoint (``last`` or
  ``best``) and forced into eval mode; BatchNorm buffers are hashed before and after and must
  not change.
* Attacks are named specs (:mod:`methods.attack_specs`), run through
  :data:`methods.registry.ATTACKS`; each may set its own ``eps`` / ``norm`` (default: the
  evaluation's threat), so one evaluation can sweep eps.  Every adversarial batch is checked
  against *that attack's* threat: inputs and adversarial images in [0, 1] and
  ``distance(x_adv - x) <= eps + 1e-6``.
* Robustness is decided here from the model's own predictions: untargeted, an example is robust
  if the prediction on every adversarial batch is still right; targeted, if it is right on the
  clean input and no adversarial batch reaches its target (policy ``all``: no target at all).
* Every accuracy (clean, each attack, AutoAttack, PGD on the AutoAttack subset) comes with a
  95% Clopper-Pearson (exact binomial) interval and per-class counts
  ``per_class: {correct: [...], total: [...]}`` indexed by class id (length = number of
  classes), so tail and worst-class accuracies can be computed from the files.
* PGD is run with the configured steps / step size / restarts (per-example worst case over
  restarts, :func:`methods.attacks.pgd`).  AutoAttack runs only through the pinned reference
  package (:mod:`methods.autoattack_adapter`) on a seeded, class-stratified subset of the test
  split whose indices are recorded; PGD (``compare_pgd``, same spec format, at AutoAttack's
  threat) is also run on that same subset so the two can be compared example for example (PGD
  should never be below AutoAttack's accuracy).
* Evaluation-time defences (``evaluation.defenses``, :mod:`methods.defenses`) wrap the model
  into a defended predictor (Mixup Inference, the input-transform baselines).  For each defence
  the result holds ``"<defence> | clean"`` and, for every ``evaluation.defense_attacks`` entry
  and mode, ``"<defence> | <attack> | <mode>"`` in ``metrics`` (each with its ``defense`` block,
  ``mode``, attack spec, threat and largest perturbation), and ``defenses[<label>]``: the spec,
  label, whether it is randomized, its draws, its sampling pool (split, per-class counts, source
  indices, how many evaluated images it holds) and its AutoAttack.  The base model's metrics are
  unchanged.  Modes (:func:`evaluate_defenses`):

  - **oblivious**: the attack is crafted on the base model (as the paper), then the defended
    predictor classifies ``x_adv``; one ``x_adv`` per attack serves every defence;
  - **adaptive**: the attack is crafted against the defended predictor, its step direction
    averaged over ``eot_samples`` draws of the defence's randomness (EOT,
    :func:`methods.attacks.eot_gradient`), differentiating through the defence; restarts and
    predicted labels are scored by the defended predictor itself.

  Untargeted attacks push away from the attacked predictor's prediction on the clean input by
  default (``labels: predicted``, as the official code; ``true`` as an option); robustness is
  judged against the true label: the defended prediction on ``x_adv`` is right (targeted attacks
  too, as the official code counts them, ``targeted_rule: true_label``; ``no_target`` applies
  the base model's rule: right on the clean input and no target reached).
  AutoAttack (``evaluation.defense_autoattack``, version ``rand`` by default) runs against every
  randomized defence on the same stratified subset as the plain AutoAttack; an example counts as
  robust only if both the adapter's recomputed flag and the defended predictor (its own draws,
  seeded) on AutoAttack's ``x_adv`` are right.  Every random draw of a defence comes from a CPU
  generator seeded from the evaluation seed and the metric key
  (:func:`methods.defenses.base.derive_seed`).
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from scipy.stats import binomtest
from torch import nn

from . import attacks  # noqa: F401  (fills ATTACKS)
from .attack_specs import attack_label, attack_threat, check_attack_specs, normalize_attack_spec
from .attacks import attack_labels, eot_gradient
from .builders import build_cell_model, build_threat, load_weights, to_float
from .data import load_dataset
from .eval_extras import calibration_histogram, clean_predictions, evaluated_groups, group_counts
from .defenses import input_transforms, mixup_inference  # noqa: F401  (fill DEFENSES)
from .defenses.base import DefendedModel, Defense, DefenseContext, build_pool, derive_seed
from .defenses.specs import (check_defense_attacks, check_defense_specs, defense_attack_label,
                             effective_eot_samples, metric_key, mode_label,
                             normalize_defense_autoattack, split_defense_attack)
from .measure import make_meter
from .registry import ATTACKS, DEFENSES
from .results import provenance, read_result, write_result
from .runtime import cpu_generator, pick_device, seed_everything, set_threads
from .subsets import stratified_subset
from .threat import ThreatModel

TOLERANCE = 1e-6


def accuracy_ci(correct: int, total: int) -> Dict[str, Any]:
    """Accuracy with its exact 95% binomial (Clopper-Pearson) interval."""
    if total == 0:
        return {"acc": None, "ci95": [None, None], "correct": 0, "n": 0}
    ci = binomtest(correct, total).proportion_ci(confidence_level=0.95, method="exact")
    return {"acc": correct / total, "ci95": [float(ci.low), float(ci.high)],
            "correct": int(correct), "n": int(total)}


def per_class_counts(ok: torch.Tensor, y: torch.Tensor, num_classes: int) -> Dict[str, list]:
    """``{"correct": [...], "total": [...]}``: per class id, how many examples of that class
    were counted correct (``ok``) and how many there were; both lists have ``num_classes``
    entries and sum to the accuracy's ``correct`` and ``n``."""
    y = y.detach().cpu().long()
    ok = ok.detach().cpu().bool()
    return {"correct": torch.bincount(y[ok], minlength=num_classes).tolist(),
            "total": torch.bincount(y, minlength=num_classes).tolist()}


def accuracy_record(ok: torch.Tensor, y: torch.Tensor, num_classes: int) -> Dict[str, Any]:
    """:func:`accuracy_ci` of the flags ``ok`` plus their :func:`per_class_counts`."""
    return {**accuracy_ci(int(ok.sum()), len(ok)), "per_class": per_class_counts(ok, y, num_classes)}


def buffers_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, buf in sorted(model.named_buffers()):
        h.update(name.encode())
        h.update(buf.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_adversarial(x: torch.Tensor, x_adv: torch.Tensor, threat: ThreatModel, what: str) -> float:
    """Raise unless x_adv is a valid image within the threat model; return the max distance."""
    if x_adv.min() < 0 or x_adv.max() > 1:
        raise AssertionError(f"{what}: adversarial images leave [0, 1]")
    dist = float(threat.distance(x_adv - x).max()) if len(x) else 0.0
    if dist > threat.eps + TOLERANCE:
        raise AssertionError(f"{what}: perturbation {dist:.8f} exceeds eps {threat.eps}")
    return dist


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def run_attack(model: nn.Module, spec: Dict[str, Any], threat: ThreatModel, x: torch.Tensor,
               y: torch.Tensor, batch_size: int, seed: int, what: str) -> Tuple[torch.Tensor, float]:
    """Robust flags (bool, (N,)) of ``x, y`` under a normalized attack spec, and the largest
    perturbation seen.  Batches of ``batch_size`` share one generator seeded with ``seed``;
    every adversarial batch is checked against ``threat`` (:func:`check_adversarial`)."""
    implementation = ATTACKS.get(spec["name"])
    generator = cpu_generator(seed)
    flags, worst = [], 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        runs = implementation(model, xb, yb, spec, threat, generator)
        ok = torch.ones(len(yb), dtype=torch.bool, device=yb.device)
        if any(run.target is not None for run in runs):
            ok &= predict(model, xb, batch_size) == yb   # targeted: robust needs a right answer
        for run in runs:
            worst = max(worst, check_adversarial(xb, run.x_adv, threat, what))
            ok &= ~run.fooled(predict(model, run.x_adv, batch_size), yb)
        flags.append(ok)
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool), worst


def _window_name(label: str) -> str:
    """Measurement windows are '/'-joined paths: ``eps=8/255`` becomes ``eps=8|255`` there."""
    return label.replace("/", "|")


def _threat_dict(threat: ThreatModel) -> Dict[str, Any]:
    return {"norm": threat.norm.value, "eps": threat.eps}


def evaluate_cell(train_result_path: Path, evaluation: Dict[str, Any], checkpoint: str,
                  data_dir: Path, prepared_dir: Path, result_path: Path, *,
                  device: Optional[str] = None, threads: Optional[int] = None,
                  meter_backend: Optional[str] = None) -> Dict[str, Any]:
    """Evaluate one checkpoint of a trained cell under an evaluation identity.

    ``evaluation`` comes from the workflow config (:func:`methods.config.resolve_evaluation`),
    never from ``train.json``, so a new attack or subset applies to an existing model without
    retraining; the model is rebuilt from the training identity recorded in ``train.json``.
    Its attacks are normalized and checked here too (:func:`check_attack_specs`), so a wrong
    spec fails before any model is loaded.  ``metrics`` holds ``clean`` and one entry per
    attack label with the normalized spec (``attack``), the threat it used (``threat``) and
    the largest perturbation (``max_distance``), then the defences' entries
    (:func:`evaluate_defenses`; defence specs are checked before any model is loaded too).
    """
    started = time.time()
    ecfg = evaluation
    if "eval_hash" not in ecfg:
        raise ValueError("evaluation: missing eval_hash (resolve it with methods.config.resolve_evaluation)")
    specs = check_attack_specs(ecfg.get("attacks"), "evaluation.attacks")
    defense_specs = check_defense_specs(ecfg.get("defenses"), "evaluation.defenses")
    defense_attacks = check_defense_attacks(ecfg.get("defense_attacks"), "evaluation.defense_attacks")
    defense_aa = normalize_defense_autoattack(ecfg.get("defense_autoattack"))
    aa_spec = ecfg.get("autoattack")
    compare_pgd = None
    if aa_spec and aa_spec.get("enabled", True) and aa_spec.get("compare_pgd"):
        compare_pgd = normalize_attack_spec(aa_spec["compare_pgd"], "evaluation.autoattack.compare_pgd")
    train_record = read_result(train_result_path, "train_result.schema.json")
    cell = train_record["cell"]
    set_threads(threads)
    device = pick_device(device)
    seed = int(ecfg.get("seed", 0))
    seed_everything(seed)
    meter = make_meter(meter_backend or "auto", device=device)

    dataset_spec = {k: v for k, v in cell["dataset"].items() if k != "name"}
    bundle = load_dataset(cell["dataset"]["name"], dataset_spec, Path(data_dir), Path(prepared_dir))
    classes = int(bundle.num_classes)
    model = build_cell_model(cell, bundle).to(device)
    ckpt_info = train_record["checkpoints"][checkpoint]
    epoch = load_weights(Path(ckpt_info["file"]), model)
    model.eval()
    digest_before = buffers_digest(model)
    base_threat = _threat_dict(build_threat(ecfg.get("threat", cell["threat"])))
    threat = build_threat(base_threat)
    if compare_pgd and attack_threat(compare_pgd, base_threat) != base_threat:
        raise ValueError(f"evaluation.autoattack.compare_pgd: norm/eps "
                         f"{attack_threat(compare_pgd, base_threat)} differ from AutoAttack's "
                         f"{base_threat}; the comparison needs the same threat (leave them unset)")
    bs = int(ecfg.get("batch_size", 500))

    x_all, y_all = to_float(bundle.test.x, device), bundle.test.y.to(device)
    evaluated = bundle.test.x
    n_eval = ecfg.get("n")
    idx = None
    if n_eval:
        idx = stratified_subset(bundle.test.y, int(n_eval), seed)
        evaluated = bundle.test.x[idx]
        x_all, y_all = x_all[idx.to(device)], y_all[idx.to(device)]
    # Group ids (subpopulation-shift datasets) of the evaluated examples, or None.
    g_all = evaluated_groups(bundle.test.groups, idx)
    if g_all is not None:
        g_all = g_all.to(device)

    def with_groups(record: Dict[str, Any], ok: torch.Tensor) -> Dict[str, Any]:
        if g_all is not None:
            record["per_group"] = group_counts(ok, g_all, bundle.num_groups)
        return record
    if x_all.min() < 0 or x_all.max() > 1:
        raise AssertionError("test inputs leave [0, 1]")

    metrics: Dict[str, Any] = {}
    with meter.window("run"), meter.window("evaluate"):
        with meter.window("clean"):
            pred, probs = clean_predictions(model, x_all, bs)
            ok = pred == y_all
            metrics["clean"] = with_groups({**accuracy_record(ok, y_all, classes),
                                            "calibration": calibration_histogram(probs, y_all, pred=pred)},
                                           ok)
        for spec in specs:
            label = attack_label(spec)
            used = attack_threat(spec, base_threat)
            with meter.window(_window_name(label)):
                ok, dist = run_attack(model, spec, build_threat(used), x_all, y_all, bs, seed, label)
            metrics[label] = with_groups({**accuracy_record(ok, y_all, classes), "attack": spec,
                                          "threat": used, "max_distance": dist}, ok)
        aa = _autoattack_block(aa_spec, compare_pgd, model, bundle, threat, seed, bs, device,
                               meter)
        defenses = None
        if defense_specs:
            augmentation = cell.get("augmentation", "none")
            if augmentation == "default":
                augmentation = bundle.default_augmentation
            defenses = evaluate_defenses(
                defense_specs, defense_attacks, defense_aa, model, bundle, x_all, y_all,
                base_threat, seed=seed, batch_size=bs, device=device, meter=meter,
                metrics=metrics, prepared_dir=Path(prepared_dir), evaluated=evaluated,
                pool_augmentation=augmentation, autoattack=aa_spec)
    if model.training:
        raise AssertionError("model left eval mode during evaluation")
    if buffers_digest(model) != digest_before:
        raise AssertionError("evaluation changed the model's buffers (BatchNorm statistics)")
    record = {
        "kind": "evaluate",
        "cell": cell,
        "evaluation": ecfg,
        "checkpoint": {"name": checkpoint, "epoch": epoch, "file": ckpt_info["file"]},
        "threat": base_threat,
        "num_classes": classes,
        "test_examples": len(y_all),
        "metrics": metrics,
        "autoattack": aa,
        **({"defenses": defenses} if defenses is not None else {}),
        "guards": {"eval_mode": True, "buffers_unchanged": True, "inputs_in_unit_box": True,
                   "eps_tolerance": TOLERANCE},
        "measurement": meter.summary(),
        "provenance": provenance(cell, device, time.time() - started, ecfg),
    }
    meter.close()
    return write_result(result_path, record, "eval_result.schema.json")


def _autoattack_block(spec, compare_pgd, model, bundle, threat, seed, bs, device,
                      meter) -> Optional[Dict[str, Any]]:
    if not spec or not spec.get("enabled", True):
        return None
    from .autoattack_adapter import run_autoattack

    classes = int(bundle.num_classes)
    n = int(spec.get("n", 1000))
    aa_seed = int(spec.get("seed", seed))
    idx = stratified_subset(bundle.test.y, n, aa_seed)
    x, y = to_float(bundle.test.x[idx], device), bundle.test.y[idx].to(device)
    with meter.window("autoattack"):
        result = run_autoattack(model, x, y, norm=threat.norm.value, eps=threat.eps,
                                version=spec.get("version", "standard"), seed=aa_seed,
                                batch_size=int(spec.get("batch_size", bs)),
                                attacks=spec.get("attacks"), device=device)
    model.eval()
    check_adversarial(x, result.x_adv.to(device), threat, "AutoAttack")
    aa_ok = result.robust.to(device)
    out = {**result.to_dict(), **accuracy_record(aa_ok, y, classes),
           "indices": idx.tolist(), "subset_seed": aa_seed}
    groups = evaluated_groups(bundle.test.groups, idx)
    if groups is not None:
        groups = groups.to(device)
        out["per_group"] = group_counts(aa_ok, groups, bundle.num_groups)
    # PGD on the very same examples, so PGD >= AutoAttack can be checked example by example.
    if compare_pgd:   # at AutoAttack's threat (checked by evaluate_cell)
        pgd_ok, dist = run_attack(model, compare_pgd, threat, x, y, bs, seed,
                                  "PGD on the AutoAttack subset")
        out["pgd_same_subset"] = {**accuracy_record(pgd_ok, y, classes),
                                  "attack": compare_pgd, "label": attack_label(compare_pgd),
                                  "threat": _threat_dict(threat), "max_distance": dist,
                                  "robust_to_pgd_not_aa": int((pgd_ok & ~aa_ok).sum()),
                                  "robust_to_aa_not_pgd": int((aa_ok & ~pgd_ok).sum())}
        if groups is not None:
            out["pgd_same_subset"]["per_group"] = group_counts(pgd_ok, groups, bundle.num_groups)
    return out


# ----------------------------------------------------------------------------- defences

@torch.no_grad()
def defended_predict(defense: Defense, model: nn.Module, x: torch.Tensor, batch_size: int,
                     generator: torch.Generator) -> torch.Tensor:
    """The defended predictor's classes for ``x`` (batches of ``batch_size``; every draw from
    ``generator``)."""
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return torch.cat([defense.predict(model, x[i:i + batch_size], generator)
                      for i in range(0, len(x), batch_size)])


def _defense_tag(defense: Defense) -> Dict[str, str]:
    return {"label": defense.label, "name": defense.spec["name"]}


def _robust(run, pred: torch.Tensor, y: torch.Tensor, rule: Optional[str]) -> torch.Tensor:
    """Per example, whether one adversarial batch left the defended prediction ``pred`` robust:
    right on it (untargeted, or targeted under ``true_label``), or its target not reached
    (targeted under ``no_target``)."""
    if run.target is not None and rule == "no_target":
        return ~run.fooled(pred, y)
    return pred == y


def _needs_clean(runs, rule: Optional[str], clean_ok: torch.Tensor) -> torch.Tensor:
    """The starting flags: the defended clean flags for a targeted attack under ``no_target``
    (robust needs a right clean answer), else all true."""
    if any(run.target is not None for run in runs) and rule == "no_target":
        return clean_ok.clone()
    return torch.ones(len(clean_ok), dtype=torch.bool, device=clean_ok.device)


def _oblivious(model: nn.Module, defenses: List[Defense], attack: Dict[str, Any], labels: str,
               rule: Optional[str], threat: ThreatModel, x: torch.Tensor, y: torch.Tensor,
               clean_ok: Dict[str, torch.Tensor], batch_size: int, seed: int,
               keys: Dict[str, str], what: str) -> Tuple[Dict[str, torch.Tensor], float]:
    """One attack crafted on the base model (its generator seeded like :func:`run_attack`'s,
    so with ``labels: true`` it is the base metric's very ``x_adv``), then every defence
    classifies the same ``x_adv``.  Robust flags per defence label, and the largest
    perturbation."""
    implementation = ATTACKS.get(attack["name"])
    attack_generator = cpu_generator(seed)
    generators = {label: cpu_generator(derive_seed(seed, key)) for label, key in keys.items()}
    flags: Dict[str, list] = {d.label: [] for d in defenses}
    worst = 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        runs = implementation(model, xb, attack_labels(model, xb, yb, labels), attack, threat,
                              attack_generator)
        for run in runs:
            worst = max(worst, check_adversarial(xb, run.x_adv, threat, what))
        for d in defenses:
            ok = _needs_clean(runs, rule, clean_ok[d.label][i:i + batch_size])
            for run in runs:
                pred = defended_predict(d, model, run.x_adv, batch_size, generators[d.label])
                ok &= _robust(run, pred, yb, rule)
            flags[d.label].append(ok)
    return {label: torch.cat(f) if f else torch.zeros(0, dtype=torch.bool)
            for label, f in flags.items()}, worst


def replay_draws(gradient, generator: torch.Generator):
    """``eot_redraw: once``: every call of ``gradient`` replays the generator from the state it
    had when the attack on this batch began, so every step sees the same draws."""
    state = generator.get_state()

    def replay(*args):
        generator.set_state(state)
        return gradient(*args)
    return replay


def _adaptive(model: nn.Module, defense: Defense, attack: Dict[str, Any], entry: Dict[str, Any],
              threat: ThreatModel, x: torch.Tensor, y: torch.Tensor, clean_ok: torch.Tensor,
              batch_size: int, seed: int, key: str) -> Tuple[torch.Tensor, float]:
    """The attack crafted against the defended predictor: EOT gradients over the defence's
    draws (:func:`methods.attacks.eot_gradient`), targets, predicted labels and restarts scored
    by :class:`DefendedModel`; robust flags from the defended predictor on ``x_adv``."""
    implementation = ATTACKS.get(attack["name"])
    samples = effective_eot_samples(entry, defense.randomized)
    attack_generator = cpu_generator(seed)
    eot_generator = cpu_generator(derive_seed(seed, key, "eot"))
    predictor = DefendedModel(defense, model, cpu_generator(derive_seed(seed, key, "predictor")))
    judge = cpu_generator(derive_seed(seed, key))
    flags, worst = [], 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]

        prepared: Dict[str, Any] = {}

        def draws(x_in: torch.Tensor, k: int) -> torch.Tensor:
            # per-input work (MI's prediction) once per step, not once per chunk of draws
            if prepared.get("x") is not x_in:
                prepared.update(x=x_in, value=defense.prepare(model, x_in.detach()))
            return defense.draws(model, x_in, eot_generator, k, prepared["value"])

        gradient = eot_gradient(draws, samples, chunk=defense.chunk(len(xb), samples))
        if entry["eot_redraw"] == "once" and defense.randomized:
            gradient = replay_draws(gradient, eot_generator)
        runs = implementation(predictor, xb, attack_labels(predictor, xb, yb, entry["labels"]),
                              attack, threat, attack_generator, gradient=gradient)
        ok = _needs_clean(runs, entry["targeted_rule"], clean_ok[i:i + batch_size])
        for run in runs:
            worst = max(worst, check_adversarial(xb, run.x_adv, threat, key))
            pred = defended_predict(defense, model, run.x_adv, batch_size, judge)
            ok &= _robust(run, pred, yb, entry["targeted_rule"])
        flags.append(ok)
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool), worst


def evaluate_defenses(specs: List[Dict[str, Any]], attack_entries: List[Dict[str, Any]],
                      aa_spec: Optional[Dict[str, Any]], model: nn.Module, bundle,
                      x: torch.Tensor, y: torch.Tensor, base_threat: Dict[str, Any], *,
                      seed: int, batch_size: int, device: torch.device, meter,
                      metrics: Dict[str, Any], prepared_dir: Optional[Path] = None,
                      evaluated: Optional[torch.Tensor] = None, pool_augmentation: str = "none",
                      autoattack: Optional[Dict[str, Any]] = None) -> Dict[str, Dict[str, Any]]:
    """Evaluate normalized defence ``specs`` (:func:`methods.defenses.specs.check_defense_specs`)
    on ``x, y`` under every entry of ``attack_entries`` and mode, and AutoAttack ``aa_spec``;
    add the metrics to ``metrics`` (defence by defence: clean, then each attack and mode) and
    return ``{label: record}`` (see the module docstring).

    ``evaluated``: the evaluated images (uint8), to count how many a pool holds;
    ``pool_augmentation``: the cell's training augmentation, applied once to the pool images
    of a ``pool_augmentation: training`` defence; ``autoattack``: the plain AutoAttack block,
    whose ``n`` and ``seed`` choose the defences' AutoAttack subset unless ``aa_spec`` sets them.
    """
    classes = int(bundle.num_classes)
    pools: Dict[tuple, Any] = {}

    def pool_for(spec: Dict[str, Any]):
        augmentation = pool_augmentation if spec["pool_augmentation"] == "training" else "none"
        key = (spec["pool"], int(spec["pool_size"]), augmentation)
        if key not in pools:
            pools[key] = build_pool(bundle, key[0], key[1], augmentation,
                                    derive_seed(seed, "pool", *key), device, prepared_dir, evaluated)
        return pools[key]

    context = DefenseContext(num_classes=classes, image_shape=tuple(bundle.image_shape),
                             device=device, max_rows=batch_size, pool=pool_for)
    defenses: List[Defense] = []
    for spec in specs:
        defense = DEFENSES.get(spec["name"])(spec)
        defense.setup(context)
        defenses.append(defense)
    found: Dict[str, Dict[str, Any]] = {d.label: {} for d in defenses}
    clean_ok: Dict[str, torch.Tensor] = {}
    for d in defenses:
        key = metric_key(d.label)
        with meter.window(_window_name(key)):
            ok = defended_predict(d, model, x, batch_size, cpu_generator(derive_seed(seed, key))) == y
        clean_ok[d.label] = ok
        found[d.label][key] = {**accuracy_record(ok, y, classes), "defense": _defense_tag(d),
                               "mode": "clean"}

    def attack_metric(d, ok, spec, used, dist, entry, mode, label):
        adaptive = mode == "adaptive"
        return {**accuracy_record(ok, y, classes), "attack": spec, "threat": used,
                "max_distance": dist, "defense": _defense_tag(d), "mode": mode,
                "mode_label": label, "labels": entry["labels"],
                "targeted_rule": entry["targeted_rule"],
                "eot_samples": effective_eot_samples(entry, d.randomized) if adaptive else None,
                "eot_redraw": entry["eot_redraw"] if adaptive and d.randomized else None}

    for entry in attack_entries:
        spec, _ = split_defense_attack(entry)
        part = defense_attack_label(entry)
        used = attack_threat(spec, base_threat)
        threat = build_threat(used)
        if "oblivious" in entry["modes"]:
            keys = {d.label: metric_key(d.label, part, "oblivious") for d in defenses}
            with meter.window(_window_name(f"{part} | oblivious")):
                flags, dist = _oblivious(model, defenses, spec, entry["labels"],
                                         entry["targeted_rule"], threat, x, y, clean_ok,
                                         batch_size, seed, keys, f"{part} | oblivious")
            for d in defenses:
                found[d.label][keys[d.label]] = attack_metric(d, flags[d.label], spec, used, dist,
                                                              entry, "oblivious", "oblivious")
        if "adaptive" in entry["modes"]:
            for d in defenses:
                label = mode_label(entry, "adaptive", d.randomized)
                key = metric_key(d.label, part, label)
                if key in found[d.label]:
                    continue   # a deterministic defence: the same attack has already run
                with meter.window(_window_name(key)):
                    ok, dist = _adaptive(model, d, spec, entry, threat, x, y, clean_ok[d.label],
                                         batch_size, seed, key)
                found[d.label][key] = attack_metric(d, ok, spec, used, dist, entry, "adaptive", label)
    for d in defenses:
        metrics.update(found[d.label])
    records = {d.label: {**d.describe(), "autoattack": None} for d in defenses}
    if aa_spec and aa_spec["enabled"]:
        for label, result in _defense_autoattack(aa_spec, autoattack, defenses, model, bundle,
                                                 build_threat(base_threat), seed, batch_size,
                                                 device, meter).items():
            records[label]["autoattack"] = result
    return records


def _defense_autoattack(spec: Dict[str, Any], plain: Optional[Dict[str, Any]],
                        defenses: List[Defense], model: nn.Module, bundle, threat: ThreatModel,
                        seed: int, batch_size: int, device, meter) -> Dict[str, Dict[str, Any]]:
    """AutoAttack (``spec['version']``, 'rand' by default) against each randomized defence's
    :class:`DefendedModel` (log-probabilities averaged over ``draws`` draws per forward) on the
    plain AutoAttack's stratified subset."""
    from .autoattack_adapter import run_autoattack

    plain = plain or {}
    classes = int(bundle.num_classes)
    n = int(spec["n"] or plain.get("n", 1000))
    aa_seed = int(spec["seed"] if spec["seed"] is not None else plain.get("seed", seed))
    idx = stratified_subset(bundle.test.y, n, aa_seed)
    x, y = to_float(bundle.test.x[idx], device), bundle.test.y[idx].to(device)
    out: Dict[str, Dict[str, Any]] = {}
    for d in defenses:
        if not d.randomized:
            continue   # deterministic: its AutoAttack is the plain one's
        draws = int(spec["draws"] or d.samples)
        module = DefendedModel(d, model, cpu_generator(derive_seed(aa_seed, d.label, "autoattack-module")),
                               samples=draws)
        with meter.window(_window_name(f"autoattack | {d.label}")):
            result = run_autoattack(module, x, y, norm=threat.norm.value, eps=threat.eps,
                                    version=spec["version"], seed=aa_seed,
                                    batch_size=int(spec["batch_size"] or batch_size),
                                    attacks=spec["attacks"], device=device,
                                    iterations=spec["iterations"], eot_iter=spec["eot_iter"])
        model.eval()
        x_adv = result.x_adv.to(device)
        check_adversarial(x, x_adv, threat, f"AutoAttack on {d.label}")
        judged = defended_predict(d, model, x_adv, batch_size,
                                  cpu_generator(derive_seed(aa_seed, d.label, "autoattack"))) == y
        ok = result.robust.to(device) & judged
        out[d.label] = {**result.to_dict(), **accuracy_record(ok, y, classes),
                        "indices": idx.tolist(), "subset_seed": aa_seed,
                        "draws_per_forward": draws,
                        "robust_rule": "the adapter's flag (the module on x_adv) and the defended "
                                       "predictor with its own draws on x_adv both right"}
    return out
