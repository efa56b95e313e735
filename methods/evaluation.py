"""Robust evaluation of one trained checkpoint.  Evaluation never trusts the training code.

* The model is rebuilt from the cell config, loaded from a named checkpoint (``last`` or
  ``best``) and forced into eval mode; BatchNorm buffers are hashed before and after and must
  not change.
* Every attack's output is checked: inputs and adversarial images in [0, 1] and
  ``distance(x_adv - x) <= eps + 1e-6``.
* Robust accuracy comes with a 95% Clopper-Pearson (exact binomial) interval.
* PGD is run with the configured steps / step size / restarts (per-example worst case over
  restarts, :func:`methods.attacks.pgd`).  AutoAttack runs only through the pinned reference
  package (:mod:`methods.autoattack_adapter`) on a seeded, class-stratified subset of the test
  split whose indices are recorded; PGD is also run on that same subset so the two can be
  compared example for example (PGD should never be below AutoAttack's accuracy).
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from scipy.stats import binomtest
from torch import nn

from .attacks import fgsm, pgd
from .builders import build_cell_model, build_threat, load_weights, to_float
from .data import load_dataset
from .measure import make_meter
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


def batched_attack(attack, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([attack(x[i:i + batch_size], y[i:i + batch_size])
                      for i in range(0, len(x), batch_size)])


def attack_label(spec: Dict[str, Any]) -> str:
    if spec["name"] == "fgsm":
        return "FGSM"
    return f"PGD-{spec['steps']}-{spec.get('restarts', 1)}"


def make_attack(spec: Dict[str, Any], model: nn.Module, threat: ThreatModel, seed: int):
    name = spec["name"]
    if name == "fgsm":
        return lambda x, y: fgsm(model, x, y, threat)
    if name == "pgd":
        gen = cpu_generator(seed)
        return lambda x, y: pgd(model, x, y, threat, alpha=float(spec["alpha"]),
                                steps=int(spec["steps"]), restarts=int(spec.get("restarts", 1)),
                                early_stop=bool(spec.get("early_stop", True)), generator=gen)
    raise ValueError(f"evaluation.attacks: unknown attack {name!r} (fgsm, pgd)")


def evaluate_cell(train_result_path: Path, evaluation: Dict[str, Any], checkpoint: str,
                  data_dir: Path, prepared_dir: Path, result_path: Path, *,
                  device: Optional[str] = None, threads: Optional[int] = None,
                  meter_backend: Optional[str] = None) -> Dict[str, Any]:
    """Evaluate one checkpoint of a trained cell under an evaluation identity.

    ``evaluation`` comes from the workflow config (:func:`methods.config.resolve_evaluation`),
    never from ``train.json``, so a new attack or subset applies to an existing model without
    retraining; the model is rebuilt from the training identity recorded in ``train.json``.
    """
    started = time.time()
    train_record = read_result(train_result_path, "train_result.schema.json")
    cell = train_record["cell"]
    ecfg = evaluation
    if "eval_hash" not in ecfg:
        raise ValueError("evaluation: missing eval_hash (resolve it with methods.config.resolve_evaluation)")
    set_threads(threads)
    device = pick_device(device)
    seed = int(ecfg.get("seed", 0))
    seed_everything(seed)
    meter = make_meter(meter_backend or "auto", device=device)

    dataset_spec = {k: v for k, v in cell["dataset"].items() if k != "name"}
    bundle = load_dataset(cell["dataset"]["name"], dataset_spec, Path(data_dir), Path(prepared_dir))
    model = build_cell_model(cell, bundle).to(device)
    ckpt_info = train_record["checkpoints"][checkpoint]
    epoch = load_weights(Path(ckpt_info["file"]), model)
    model.eval()
    digest_before = buffers_digest(model)
    threat = build_threat(ecfg.get("threat", cell["threat"]))
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
            metrics["clean"] = accuracy_ci(int((predict(model, x_all, bs) == y_all).sum()), len(y_all))
        for spec in ecfg.get("attacks", []):
            label = attack_label(spec)
            with meter.window(label):
                x_adv = batched_attack(make_attack(spec, model, threat, seed), x_all, y_all, bs)
                dist = check_adversarial(x_all, x_adv, threat, label)
                correct = int((predict(model, x_adv, bs) == y_all).sum())
            metrics[label] = {**accuracy_ci(correct, len(y_all)), "attack": spec,
                              "max_distance": dist}
        aa = _autoattack_block(ecfg.get("autoattack"), model, bundle, threat, seed, bs, device,
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
        "threat": {"norm": threat.norm.value, "eps": threat.eps},
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


def _autoattack_block(spec, model, bundle, threat, seed, bs, device, meter) -> Optional[Dict[str, Any]]:
    if not spec or not spec.get("enabled", True):
        return None
    from .autoattack_adapter import run_autoattack

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
    aa_correct = int(result.robust.sum())
    out = {**result.to_dict(), **accuracy_ci(aa_correct, len(y)),
           "indices": idx.tolist(), "subset_seed": aa_seed}
    # PGD on the very same examples, so PGD >= AutoAttack can be checked example by example.
    pgd_spec = spec.get("compare_pgd")
    if pgd_spec:
        x_pgd = batched_attack(make_attack(pgd_spec, model, threat, seed), x, y, bs)
        check_adversarial(x, x_pgd, threat, "PGD on the AutoAttack subset")
        pgd_ok = predict(model, x_pgd, bs) == y
        aa_ok = result.robust.to(device)
        out["pgd_same_subset"] = {**accuracy_ci(int(pgd_ok.sum()), len(y)),
                                  "attack": pgd_spec,
                                  "robust_to_pgd_not_aa": int((pgd_ok & ~aa_ok).sum()),
                                  "robust_to_aa_not_pgd": int((aa_ok & ~pgd_ok).sum())}
    return out
