"""Evaluation of evaluation-time defences on a trained model (called by
:func:`methods.evaluation.evaluate_cell`).

Evaluation-time defences (``evaluation.defenses``, :mod:`methods.defenses`) wrap the model
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

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..attack_specs import attack_threat
from ..attacks import attack_labels, eot_gradient
from ..builders import build_threat, to_float
from ..eval_core import accuracy_record, check_adversarial, window_name
from ..registry import ATTACKS, DEFENSES
from ..runtime import cpu_generator
from ..subsets import stratified_subset
from ..threat import ThreatModel
from . import input_transforms, mixup_inference  # noqa: F401  (fill DEFENSES)
from .base import DefendedModel, Defense, DefenseContext, build_pool, derive_seed
from .specs import (defense_attack_label, effective_eot_samples, metric_key, mode_label,
                    split_defense_attack)

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
        with meter.window(window_name(key)):
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
            with meter.window(window_name(f"{part} | oblivious")):
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
                with meter.window(window_name(key)):
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
    from ..autoattack_adapter import run_autoattack

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
        with meter.window(window_name(f"autoattack | {d.label}")):
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
