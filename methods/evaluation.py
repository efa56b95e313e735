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
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from scipy.stats import binomtest
from torch import nn

from . import attacks  # noqa: F401  (fills ATTACKS)
from .attack_specs import attack_label, attack_threat, check_attack_specs, normalize_attack_spec
from .builders import build_cell_model, build_threat, load_weights, to_float
from .data import load_dataset
from .measure import make_meter
from .registry import ATTACKS
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
    the largest perturbation (``max_distance``).
    """
    started = time.time()
    ecfg = evaluation
    if "eval_hash" not in ecfg:
        raise ValueError("evaluation: missing eval_hash (resolve it with methods.config.resolve_evaluation)")
    specs = check_attack_specs(ecfg.get("attacks"), "evaluation.attacks")
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
    n_eval = ecfg.get("n")
    if n_eval:
        idx = stratified_subset(bundle.test.y, int(n_eval), seed).to(device)
        x_all, y_all = x_all[idx], y_all[idx]
    if x_all.min() < 0 or x_all.max() > 1:
        raise AssertionError("test inputs leave [0, 1]")

    metrics: Dict[str, Any] = {}
    with meter.window("run"), meter.window("evaluate"):
        with meter.window("clean"):
            metrics["clean"] = accuracy_record(predict(model, x_all, bs) == y_all, y_all, classes)
        for spec in specs:
            label = attack_label(spec)
            used = attack_threat(spec, base_threat)
            with meter.window(_window_name(label)):
                ok, dist = run_attack(model, spec, build_threat(used), x_all, y_all, bs, seed, label)
            metrics[label] = {**accuracy_record(ok, y_all, classes), "attack": spec,
                              "threat": used, "max_distance": dist}
        aa = _autoattack_block(aa_spec, compare_pgd, model, bundle, threat, seed, bs, device,
                               meter)
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
    # PGD on the very same examples, so PGD >= AutoAttack can be checked example by example.
    if compare_pgd:   # at AutoAttack's threat (checked by evaluate_cell)
        pgd_ok, dist = run_attack(model, compare_pgd, threat, x, y, bs, seed,
                                  "PGD on the AutoAttack subset")
        out["pgd_same_subset"] = {**accuracy_record(pgd_ok, y, classes),
                                  "attack": compare_pgd, "label": attack_label(compare_pgd),
                                  "threat": _threat_dict(threat), "max_distance": dist,
                                  "robust_to_pgd_not_aa": int((pgd_ok & ~aa_ok).sum()),
                                  "robust_to_aa_not_pgd": int((aa_ok & ~pgd_ok).sum())}
    return out
