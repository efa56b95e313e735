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
* Resumable: the evaluation is a list of units (``clean``, each attack label, ``AutoAttack``,
  ``PGD on the AutoAttack subset``, ``defences``), each saved when done and the attacks batch by batch,
  AutoAttack sub-attack by sub-attack and batch by batch, in ``eval_<checkpoint>.partial/``
  beside the result (:mod:`methods.eval_resume`).  A killed evaluation rerun skips what was
  finished and ends with the same flags and metrics; the defences block is redone from its
  start.  ``resumed`` in the result says what came from earlier sessions.
* Sharded (``evaluation.autoattack.shards: K``, :mod:`methods.eval_shards`): AutoAttack and
  its PGD ran in K jobs per sub-attack, each on whole batches of the unsharded run; their files
  are merged into the same ``autoattack`` block (plus ``shards``), example for example.
* Progress: a line per unit on stderr (the job's log under Snakemake) with elapsed time and an
  estimate of what remains, weighted by each unit's passes (:func:`unit_weights`), and a tqdm
  bar over batches in a terminal (:mod:`methods.progress`).
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .attack_specs import attack_label, attack_threat, check_attack_specs, normalize_attack_spec
from .builders import build_cell_model, build_threat, load_weights, to_float
from .data import load_dataset
from .defenses.evaluate import evaluate_defenses
from .defenses.specs import check_defense_attacks, check_defense_specs, normalize_defense_autoattack
from .eval_core import (TOLERANCE, accuracy_record, buffers_digest, check_adversarial,
                        run_attack, threat_dict, window_name)
from .eval_extras import calibration_histogram, clean_predictions, evaluated_groups, group_counts
from .eval_resume import PartialEvaluation, resume_key
from .measure import make_meter
from .progress import Progress
from .results import provenance, read_result, write_result
from .runtime import pick_device, seed_everything, set_threads
from .subsets import stratified_subset


def evaluate_cell(train_result_path: Path, evaluation: Dict[str, Any], checkpoint: str,
                  data_dir: Path, prepared_dir: Path, result_path: Path, *,
                  device: Optional[str] = None, threads: Optional[int] = None,
                  meter_backend: Optional[str] = None,
                  autoattack_shards: Optional[Sequence[Path]] = None) -> Dict[str, Any]:
    """Evaluate one checkpoint of a trained cell under an evaluation identity.

    ``evaluation`` comes from the workflow config (:func:`methods.config.resolve_evaluation`),
    never from ``train.json``, so a new attack or subset applies to an existing model without
    retraining; the model is rebuilt from the training identity recorded in ``train.json``.
    Its attacks are normalized and checked here too (:func:`check_attack_specs`), so a wrong
    spec fails before any model is loaded.  ``metrics`` holds ``clean`` and one entry per
    attack label with the normalized spec (``attack``), the threat it used (``threat``) and
    the largest perturbation (``max_distance``), then the defences' entries
    (:func:`evaluate_defenses`; defence specs are checked before any model is loaded too).
    ``autoattack_shards``: the files of a sharded AutoAttack run
    (``evaluation.autoattack.shards``, :func:`methods.eval_shards.final_shard_files`), merged
    into the ``autoattack`` block instead of running AutoAttack here.
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

    aa_on = bool(aa_spec and aa_spec.get("enabled", True))
    if autoattack_shards and not aa_on:
        raise ValueError("AutoAttack shard files given, but the evaluation runs no AutoAttack")
    sharded = bool(autoattack_shards)
    plan = unit_weights(specs, len(y_all), classes, aa_spec if aa_on and not sharded else None,
                        compare_pgd, base_threat, defense_specs, defense_attacks, defense_aa)
    partial = PartialEvaluation(result_path, resume_key(ecfg["eval_hash"], cell["train_hash"],
                                                        checkpoint, Path(ckpt_info["file"])),
                                list(plan))
    units = _Units(partial, plan, meter,
                   f"evaluate {cell['recipe']} seed {cell['seed']} {checkpoint}")

    def clean_unit(unit):
        pred, probs = clean_predictions(model, x_all, bs)
        ok = pred == y_all
        return with_groups({**accuracy_record(ok, y_all, classes),
                            "calibration": calibration_histogram(probs, y_all, pred=pred)}, ok), ok

    def attack_unit(spec, label, used):
        def run(unit):
            ok, dist = run_attack(model, spec, build_threat(used), x_all, y_all, bs, seed, label,
                                  resume=unit, bar=units.progress.bar)
            return with_groups({**accuracy_record(ok, y_all, classes), "attack": spec,
                                "threat": used, "max_distance": dist}, ok), ok
        return run

    metrics: Dict[str, Any] = {}
    with meter.window("run"), meter.window("evaluate"):
        metrics["clean"], _ = units.run("clean", clean_unit, window="clean")
        for spec in specs:
            label = attack_label(spec)
            used = attack_threat(spec, base_threat)
            metrics[label], _ = units.run(label, attack_unit(spec, label, used),
                                          window=window_name(label))
        aa = None
        if sharded:   # the shards ran AutoAttack and its PGD (methods.eval_shards)
            from .eval_shards import merge_autoattack
            with meter.window("autoattack"):
                aa = merge_autoattack(autoattack_shards, ecfg, cell, Path(ckpt_info["file"]),
                                      bundle, base_threat)
        elif aa_on:
            aa = _autoattack_block(aa_spec, compare_pgd, model, bundle, threat, seed, bs, device,
                                   meter, units)
        defenses = None
        if defense_specs:
            augmentation = cell.get("augmentation", "none")
            if augmentation == "default":
                augmentation = bundle.default_augmentation

            def defenses_unit(unit):
                added: Dict[str, Any] = {}
                records = evaluate_defenses(
                    defense_specs, defense_attacks, defense_aa, model, bundle, x_all, y_all,
                    base_threat, seed=seed, batch_size=bs, device=device, meter=meter,
                    metrics=added, prepared_dir=Path(prepared_dir), evaluated=evaluated,
                    pool_augmentation=augmentation, autoattack=aa_spec)
                return {"metrics": added, "defenses": records}, None
            block, _ = units.run(DEFENSES_UNIT, defenses_unit)
            metrics.update(block["metrics"])
            defenses = block["defenses"]
    if model.training:
        raise AssertionError("model left eval mode during evaluation")
    if buffers_digest(model) != digest_before:
        raise AssertionError("evaluation changed the model's buffers (BatchNorm statistics)")
    measurement = meter.summary()
    if units.previous_windows:
        measurement["previous_sessions"] = units.previous_windows
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
        "resumed": units.resumed(),
        "measurement": measurement,
        "provenance": provenance(cell, device, time.time() - started, ecfg),
    }
    meter.close()
    written = write_result(result_path, record, "eval_result.schema.json")
    partial.remove()
    return written


#: Unit names besides ``clean`` and the attack labels.
AUTOATTACK_UNIT, COMPARE_UNIT, DEFENSES_UNIT = ("AutoAttack", "PGD on the AutoAttack subset",
                                                "defences")


def _autoattack_block(spec, compare_pgd, model, bundle, threat, seed, bs, device,
                      meter, units: "_Units") -> Dict[str, Any]:
    from .autoattack_adapter import attack_budget, run_autoattack

    classes = int(bundle.num_classes)
    n = int(spec.get("n", 1000))
    aa_seed = int(spec.get("seed", seed))
    idx = stratified_subset(bundle.test.y, n, aa_seed)
    x, y = to_float(bundle.test.x[idx], device), bundle.test.y[idx].to(device)
    groups = evaluated_groups(bundle.test.groups, idx)
    if groups is not None:
        groups = groups.to(device)
    version = spec.get("version", "standard")
    budget = attack_budget(version, spec.get("attacks"), threat.norm.value)

    def sub_attack_done(attack: str, robust: int, status: str) -> None:
        weight = budget.get(attack, 0.0) * len(y)
        if status == "restored":
            units.sub_restored(weight)
        else:
            units.sub_done(f"{AUTOATTACK_UNIT} {attack}", weight,
                           "skipped: nothing robust left" if status == "skipped"
                           else f"robust {robust}/{len(y)}")

    def aa_unit(unit):
        if units.partial.autoattack_state.exists():
            units.continued.append(AUTOATTACK_UNIT)
        with meter.window("autoattack"):
            result = run_autoattack(model, x, y, norm=threat.norm.value, eps=threat.eps,
                                    version=version, seed=aa_seed,
                                    batch_size=int(spec.get("batch_size", bs)),
                                    attacks=spec.get("attacks"), device=device,
                                    state_path=units.partial.autoattack_state,
                                    on_attack_done=sub_attack_done, bar=units.progress.bar)
        model.eval()
        check_adversarial(x, result.x_adv.to(device), threat, "AutoAttack")
        aa_ok = result.robust.to(device)
        out = {**result.to_dict(), **accuracy_record(aa_ok, y, classes),
               "indices": idx.tolist(), "subset_seed": aa_seed}
        if groups is not None:
            out["per_group"] = group_counts(aa_ok, groups, bundle.num_groups)
        return out, aa_ok

    out, aa_ok = units.run(AUTOATTACK_UNIT, aa_unit)
    out = dict(out)
    aa_ok = aa_ok.to(device)
    # PGD on the very same examples, so PGD >= AutoAttack can be checked example by example.
    if compare_pgd:   # at AutoAttack's threat (checked by evaluate_cell)
        def compare_unit(unit):
            pgd_ok, dist = run_attack(model, compare_pgd, threat, x, y, bs, seed,
                                      COMPARE_UNIT, resume=unit, bar=units.progress.bar)
            record = {**accuracy_record(pgd_ok, y, classes),
                      "attack": compare_pgd, "label": attack_label(compare_pgd),
                      "threat": threat_dict(threat), "max_distance": dist,
                      "robust_to_pgd_not_aa": int((pgd_ok & ~aa_ok).sum()),
                      "robust_to_aa_not_pgd": int((aa_ok & ~pgd_ok).sum())}
            if groups is not None:
                record["per_group"] = group_counts(pgd_ok, groups, bundle.num_groups)
            return record, pgd_ok
        out["pgd_same_subset"], _ = units.run(COMPARE_UNIT, compare_unit)
    return out


# ----------------------------------------------------------------------------- units, progress

def attack_passes(spec: Dict[str, Any], classes: int) -> float:
    """Forward+backward passes per example of one attack spec: steps x restarts (x the C - 1
    targets of ``targeted: all``), plus a forward per adversarial batch to judge it."""
    runs = int(spec.get("restarts", 1)) * (classes - 1 if spec.get("targeted") == "all" else 1)
    steps = int(spec.get("steps", 1)) if spec["name"] != "fgsm" else 1
    return float(runs * steps + runs / 3)


def unit_weights(specs: List[Dict[str, Any]], n: int, classes: int,
                 aa_spec: Optional[Dict[str, Any]], compare_pgd: Optional[Dict[str, Any]],
                 base_threat: Dict[str, Any], defense_specs, defense_attacks,
                 defense_aa) -> Dict[str, float]:
    """The evaluation's units in run order, each weighted by its estimated passes over the
    examples (a forward alone counts 1/3): the progress lines' estimate of what remains."""
    from .autoattack_adapter import attack_budget

    plan = {"clean": n / 3}
    for spec in specs:
        plan[attack_label(spec)] = n * attack_passes(spec, classes)
    if aa_spec:
        n_aa = int(aa_spec.get("n", 1000))
        budget = attack_budget(aa_spec.get("version", "standard"), aa_spec.get("attacks"),
                               base_threat["norm"])
        plan[AUTOATTACK_UNIT] = n_aa * sum(budget.values())
        if compare_pgd:
            plan[COMPARE_UNIT] = n_aa * attack_passes(compare_pgd, classes)
    if defense_specs:
        plan[DEFENSES_UNIT] = _defense_weight(defense_specs, defense_attacks, defense_aa, n,
                                              classes, aa_spec, base_threat)
    return {name: float(max(1, round(weight))) for name, weight in plan.items()}


def _defense_weight(defense_specs, defense_attacks, defense_aa, n, classes, aa_spec,
                    base_threat) -> float:
    from .autoattack_adapter import attack_budget
    from .defenses.specs import is_randomized

    draws = [float(d.get("samples") or (d.get("samples_pl", 0) + d.get("samples_ol", 0)) or 1)
             for d in defense_specs]
    randomized = [is_randomized(d) for d in defense_specs]
    weight = n * sum(draws) / 3                                          # clean
    for entry in defense_attacks or []:
        passes = attack_passes(entry, classes)
        if "oblivious" in entry.get("modes", ()):
            weight += n * (passes + sum(draws) / 3)
        if "adaptive" in entry.get("modes", ()):
            weight += sum(n * passes * (int(entry.get("eot_samples", 1)) if r else 1)
                          for r in randomized)
    if defense_aa and defense_aa.get("enabled", True) and any(randomized):
        n_aa = int(defense_aa.get("n") or (aa_spec or {}).get("n") or 1000)
        budget = attack_budget(defense_aa.get("version", "rand"), defense_aa.get("attacks"),
                               base_threat["norm"], defense_aa.get("iterations"),
                               defense_aa.get("eot_iter"))
        weight += sum(n_aa * sum(budget.values()) * float(defense_aa.get("draws") or d)
                      for d, r in zip(draws, randomized) if r)
    return weight


class _Units:
    """Runs the evaluation's units: a unit an earlier session finished is taken from the
    partial directory; any other runs (its batch progress saved as it goes), is saved when
    done and logs its progress line."""

    def __init__(self, partial: PartialEvaluation, plan: Dict[str, float], meter,
                 job: str) -> None:
        self.partial, self.plan, self.meter = partial, plan, meter
        self.restored = [name for name in plan if partial.finished(name) is not None]
        self.progress = Progress(job, sum(plan.values()),
                                 done_before=sum(plan[name] for name in self.restored))
        self.continued: List[str] = []
        self.previous_windows: List[Dict[str, Any]] = []
        self._counted = 0.0
        if self.restored:
            print(f"[{job}] resuming: {len(self.restored)} of {len(plan)} units done in an "
                  f"earlier session ({', '.join(self.restored)})",
                  file=self.progress.stream, flush=True)

    def run(self, name: str, compute: Callable[[Any], Tuple[Any, Optional[torch.Tensor]]],
            window: Optional[str] = None):
        """``(record, flags)`` of unit ``name``: restored, or ``compute(unit_progress)`` (in the
        measurement window ``window``, if given)."""
        done = self.partial.finished(name)
        if done is not None:
            self.previous_windows.extend(done["windows"])
            return done["record"], done["flags"]
        unit = self.partial.unit(name)
        first = len(self.meter.records())
        self._counted = 0.0
        with self.meter.window(window) if window else contextlib.nullcontext():
            record, flags = compute(unit)
        if unit.restored:
            self.continued.append(name)
        self.partial.finish(name, record, flags,
                            [r.to_dict() for r in self.meter.records()[first:]])
        weight = self.plan[name]
        earlier = float(round(weight * unit.restored_fraction(len(flags) if flags is not None else 0)))
        self.progress.done_before += earlier
        acc = record.get("acc") if isinstance(record, dict) else None
        self.progress.unit_done(name, max(0.0, weight - earlier - self._counted),
                                f"acc {acc:.4f}" if isinstance(acc, float) else "")
        return record, flags

    def sub_done(self, name: str, weight: float, detail: str) -> None:
        """A line for a part of the running unit (an AutoAttack sub-attack)."""
        weight = min(float(round(weight)), self._left())
        self._counted += weight
        self.progress.unit_done(name, weight, detail)

    def sub_restored(self, weight: float) -> None:
        """A part of the running unit an earlier session finished."""
        weight = min(float(round(weight)), self._left())
        self._counted += weight
        self.progress.done_before += weight

    def _left(self) -> float:
        return max(0.0, self.plan.get(AUTOATTACK_UNIT, 0.0) - self._counted)

    def resumed(self) -> Optional[Dict[str, List[str]]]:
        if not self.restored and not self.continued:
            return None
        return {"units": list(self.restored), "continued": list(self.continued)}


def memory_format(model: torch.nn.Module) -> str:
    """The layout the model's conv weights are in (what ``evaluation.channels_last`` asked for)."""
    weights = [p for p in model.parameters() if p.dim() == 4]
    if not weights:
        return "no conv weights"
    # A weight with one input channel (or 1x1 kernels) is both at once: judge by the others.
    last = all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    return "channels_last" if last and not all(w.is_contiguous() for w in weights) else "contiguous"
