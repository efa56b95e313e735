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
* Evaluation-time defences (``evaluation.defenses``) are evaluated by
  :func:`methods.defenses.evaluate.evaluate_defenses` on the same examples; the base model's
  metrics are unchanged.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .attack_specs import attack_label, attack_threat, check_attack_specs, normalize_attack_spec
from .builders import build_cell_model, build_threat, load_weights, to_float
from .data import load_dataset
from .defenses.evaluate import evaluate_defenses
from .defenses.specs import check_defense_attacks, check_defense_specs, normalize_defense_autoattack
from .eval_core import (TOLERANCE, accuracy_record, buffers_digest, check_adversarial,
                        run_attack, threat_dict, window_name)
from .eval_extras import calibration_histogram, clean_predictions, evaluated_groups, group_counts
from .measure import make_meter
from .results import provenance, read_result, write_result
from .runtime import pick_device, seed_everything, set_threads
from .subsets import stratified_subset


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
    if ecfg.get("channels_last"):   # part of the evaluation identity: other kernels, same function
        model = model.to(memory_format=torch.channels_last)
    digest_before = buffers_digest(model)
    base_threat = threat_dict(build_threat(ecfg.get("threat", cell["threat"])))
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
            with meter.window(window_name(label)):
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
                   "eps_tolerance": TOLERANCE, "memory_format": memory_format(model)},
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
                                  "threat": threat_dict(threat), "max_distance": dist,
                                  "robust_to_pgd_not_aa": int((pgd_ok & ~aa_ok).sum()),
                                  "robust_to_aa_not_pgd": int((aa_ok & ~pgd_ok).sum())}
        if groups is not None:
            out["pgd_same_subset"]["per_group"] = group_counts(pgd_ok, groups, bundle.num_groups)
    return out


def memory_format(model: torch.nn.Module) -> str:
    """The layout the model's conv weights are in (what ``evaluation.channels_last`` asked for)."""
    weights = [p for p in model.parameters() if p.dim() == 4]
    if not weights:
        return "no conv weights"
    # A weight with one input channel (or 1x1 kernels) is both at once: judge by the others.
    last = all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    return "channels_last" if last and not all(w.is_contiguous() for w in weights) else "contiguous"
