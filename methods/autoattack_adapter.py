"""AutoAttack evaluation through the pinned reference package ``pyautoattack`` (0.2.0).

AutoAttack: Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020, https://arxiv.org/abs/2003.01690.  The project never
re-implements it: this module is the one seam between advrepro and the package.

Facts about ``pyautoattack`` 0.2.0 this adapter relies on (read from its source):

* ``AutoAttack(model, *, attacks=None, device='cpu', eps=0.3, norm='Linf'|'L2'|'L1', seed=None,
  version='standard'|'plus'|'rand'|'custom')``.  ``attacks`` is only accepted with
  ``version='custom'`` (any other version raises ``ValueError``).  ``seed=None`` means
  ``time.time()``; an integer seed is handed to every sub-attack, which calls
  ``torch.random.manual_seed(seed)`` (and the CUDA one) before it starts.
* ``run_standard_evaluation(x, y, /, *, batch_size=250, state_path=None)`` returns
  ``(x_adv, y_adv)`` only.  The cumulative robust accuracy after each attack lives in a local dict
  ``{'clean': acc, attack: acc, ...}`` that is logged at DEBUG level (as a rounded percentage)
  and passed once to ``checks.check_square_sr``; attacks after the robust set becomes empty are
  skipped and missing from it.
* The checks (randomized defense, probability outputs, dynamic defense, number of classes, zero
  gradients inside APGD-DLR/-T, Square Attack success) call ``logger.warning`` on the
  ``logging.getLogger('auto-attack')`` logger; they fall back to ``warnings.warn`` only when no
  logger is given, which AutoAttack never does.  The sub-attacks run with ``verbose=False``, so
  nothing is printed.
* It never calls ``model.eval()``.  FAB back-propagates with ``.backward()``, which would
  accumulate gradients in the model's parameters.
* ``checks.check_dynamic`` counts calls in a module-level dict that it never resets (one dynamic
  model makes every later run warn) and ends with ``sys.settrace(None)`` (which switches off a
  debugger's or coverage's tracer).
* Version ``'rand'`` (for randomized defences) runs ``['apgd-ce', 'apgd-dlr']`` with one restart
  and ``eot_iter = 20``: every APGD step averages 20 gradients, each from a fresh forward of the
  (randomized) model.  The APGD objects (``adversary.apgd``, ``adversary.apgd_targeted``) fix
  their step-size checkpoints from ``n_iter`` in ``__init__`` (``n_iter_2 = max(int(0.22 *
  n_iter), 1)``, ``n_iter_min = max(int(0.06 * n_iter), 1)``, ``size_decr = max(int(0.03 *
  n_iter), 1)``, ``n_iter_orig = n_iter``) and read ``eot_iter`` at every step.

What the adapter adds: eval mode for the run (every submodule's own mode restored afterwards),
frozen parameters (restored), input validation, a forked and seeded torch RNG (the caller's RNG
stream is untouched), the package's log and check warnings captured, and independent checks of
the output: the eps-ball in the chosen norm, the [0, 1] box, and ``robust`` recomputed from the
model's own predictions on ``x_adv``.  A smaller APGD budget (``iterations``, ``eot_iter``) can
be set for smoke runs and tests; it is applied exactly as the package's ``__init__`` derives its
schedule and recorded in the result (``None``: the version's own budget, the only one that is
AutoAttack as published).

Resuming (``state_path``).  The package can save its progress itself
(``run_standard_evaluation(state_path=...)``: the robust flags and the finished attacks, as
JSON), but that path is not usable as it stands: the state is written in place (a kill can leave
half a file); its set of attacks is written through ``json.dump(..., default=str)`` as the set's
repr, so a state file read back never matches the run's attacks (``ValueError: The state was
created with a different set of attacks``); the adversarial examples found before the kill are
not saved (the restored run returns ``x_orig`` for them); and when the restored state's flags
are already set
``run_standard_evaluation`` never assigns its local ``y_adv``: the first success of the resumed
run (``y_adv[non_robust_lin_idcs] = ...``) or its final ``return x_adv, y_adv`` raises
``UnboundLocalError`` (pinned 0.2.0; ``tests/test_autoattack_adapter.py`` reproduces both).  So
the adapter never hands the package a restored state.  With ``state_path`` it runs the package
one sub-attack and one batch at a time: the batch is exactly the one the package's own loop
would form (the still-robust indices at the start of the sub-attack, cut into ``batch_size``
pieces), handed to ``run_standard_evaluation`` as a fresh evaluation of that batch with that one
attack, so the package's clean pass assigns ``y_adv`` and its flags come back as
``y_adv != y``.  Every sub-attack reseeds torch with ``seed`` at each ``perturb`` call (APGD,
APGD-T, FAB, Square all do), so the batch-by-batch run gives the package's results for a
deterministic model, bit for bit (tested).  The package's input checks run once on the first
batch as ``run_standard_evaluation`` runs them, and ``check_square_sr`` once on the whole run's
accuracies; inside the per-batch calls they are switched off.  After every batch the adapter
writes its own state atomically (flags, the adversarial examples so far, the per-attack
accuracies, the warnings, the batch reached), keyed by everything that decides the result
(version, attacks, budget, norm, eps, seed, batch size, and SHA-256 digests of ``x``, ``y`` and
the model's parameters and buffers); a state with another key is ignored and overwritten.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import math
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence, Union
from unittest import mock

import torch
from torch import nn

from .threat import Norm, ThreatModel

import pyautoattack
from pyautoattack import autoattack as _aa_module
from pyautoattack import checks as _aa_checks

PACKAGE = "pyautoattack"
PINNED_VERSION = "0.2.0"
#: The package's logger name (``AutoAttack.__init__``).
PACKAGE_LOGGER = "auto-attack"
#: AutoAttack versions the package knows; ``custom`` needs ``attacks``.
VERSIONS = ("standard", "plus", "rand", "custom")
#: Attack names the package accepts in ``attacks`` (its ``AttackName`` literal).
ATTACK_NAMES = tuple(typing.get_args(_aa_module.AttackName))
#: Our norm names -> the package's.
_PACKAGE_NORM = {Norm.LINF: "Linf", Norm.L2: "L2"}
#: Slack allowed on the eps-ball check (float32 rounding of x + delta).
EPS_TOLERANCE = 1e-6

log = logging.getLogger(__name__)


class AutoAttackCheckError(RuntimeError):
    """The package's output failed one of the adapter's independent checks."""


@dataclass(frozen=True)
class AutoAttackResult:
    """Outcome of one AutoAttack run.

    ``x_adv``: same shape, dtype and device as ``x``, in [0, 1], within eps of ``x``; points the
    package did not break are returned unchanged.  ``robust``: bool (N,), recomputed by the
    adapter from the model's predictions on ``x_adv`` in eval mode.  ``per_attack``: the
    package's cumulative robust accuracy, ``{'clean': ..., '<attack>': ...}`` in run order
    (attacks skipped because nothing robust was left are absent).  ``warnings``: the package's
    check warnings (deduplicated, in order), plus an ``adapter:`` note if the package's final
    robust accuracy disagrees with the recomputed one (a randomized model, typically).
    """

    x_adv: torch.Tensor
    robust: torch.Tensor
    robust_accuracy: float
    per_attack: dict
    warnings: list
    package: str
    package_version: str
    version: str
    norm: str
    eps: float
    seed: int
    attacks: list
    batch_size: int = 500
    iterations: Optional[int] = None
    eot_iter: Optional[int] = None
    n_examples: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_examples", int(self.robust.numel()))

    def to_dict(self) -> dict:
        """JSON-serialisable summary: every field except the tensors."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("x_adv", "robust")}
        out["per_attack"] = {str(k): float(v) for k, v in self.per_attack.items()}
        out["warnings"] = [str(w) for w in self.warnings]
        out["attacks"] = [str(a) for a in self.attacks]
        return out


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float,
                   version: str = "standard", seed: int = 0, batch_size: int = 500,
                   attacks: Optional[Sequence[str]] = None,
                   device: Union[torch.device, str, None] = None,
                   log_path: Union[str, Path, None] = None,
                   iterations: Optional[int] = None,
                   eot_iter: Optional[int] = None,
                   state_path: Union[str, Path, None] = None,
                   on_attack_done: Optional[Callable[[str, int, str], None]] = None,
                   bar: Optional[Callable[..., Iterable[int]]] = None,
                   start: Optional[torch.Tensor] = None,
                   only: Optional[Sequence[str]] = None) -> AutoAttackResult:
    """Run AutoAttack (``pyautoattack`` 0.2.0) on ``model`` at ``x, y`` and check its output.

    ``model`` maps (N, C, H, W) images in [0, 1] to logits (normalisation inside the model).
    ``norm``: ``'linf'`` or ``'l2'``; ``eps`` > 0 in that norm.  ``version``: ``'standard'``
    (APGD-CE, APGD-T, FAB-T, Square), ``'plus'``, ``'rand'`` (APGD-CE and APGD-DLR with EOT over
    20 draws, for randomized defenses) or ``'custom'``, which requires ``attacks`` (a subset of
    :data:`ATTACK_NAMES`, run in the given order); ``attacks`` with any other version is an error.
    ``seed`` is passed to the package and seeds torch inside a forked RNG.  ``device``: where the
    package runs the model (default: the device of the model's parameters, else ``x.device``).
    ``log_path``: if given, the package's full log (DEBUG level) is written there.
    ``iterations`` / ``eot_iter``: override the APGD attacks' iterations and EOT draws per step
    (:func:`_set_apgd_budget`; default ``None``: the version's own, 100 and 1, or 20 for
    ``'rand'``); for smoke runs and tests, recorded in the result.

    ``state_path``: save progress there after every sub-attack batch and resume from it (see
    the module docstring); the file is left in place (a finished state returns at once).
    ``on_attack_done(attack, robust_count, status)`` is called per sub-attack in run order,
    ``status`` ``'run'``, ``'restored'`` (finished by an earlier session) or ``'skipped'``
    (nothing robust was left); ``bar(batches, total=, desc=)`` wraps each sub-attack's batch
    loop (state runs only).

    One stage of a run split over jobs (:mod:`methods.eval_shards`; batch by batch as with
    ``state_path``, saved only if it is given):
    ``start``, bool (N,), the robust flags to start from instead of the package's clean pass
    (its input checks are skipped too: the caller ran them with the clean pass); ``only``, the
    version's sub-attacks to run (in the version's order; the others are neither run nor
    reported; ``[]``: just the checks and the clean pass).  Each batch is still handed to the
    package as in the whole run, so the examples of a whole run's batches, given in its order,
    get its results.

    The model is in eval mode, with parameters frozen, for the run; both are restored afterwards.
    Raises ``ValueError`` for invalid arguments or inputs outside [0, 1] and
    :class:`AutoAttackCheckError` if ``x_adv`` leaves the eps-ball or [0, 1].
    """
    package_version = _package_version()
    threat = ThreatModel(_norm(norm), _eps(eps))
    attacks_arg = _attacks(version, attacks)
    _check_inputs(x, y)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    for name, value in (("iterations", iterations), ("eot_iter", eot_iter)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or a positive int, got {value!r}")
    if start is not None and (not isinstance(start, torch.Tensor) or start.dtype != torch.bool
                              or start.shape != (x.shape[0],)):
        raise ValueError(f"start must be a bool tensor of shape ({x.shape[0]},)")
    device = torch.device(device) if device is not None else _model_device(model, x)
    x = x.detach()
    y = y.detach()

    records: list[logging.LogRecord] = []
    reported: dict = {}
    with _eval_and_frozen(model), _seeded(seed, device), \
            _package_log(records, log_path), _report_hook(reported), _tracer_kept():
        _reset_dynamic_check_counts()
        adversary = pyautoattack.AutoAttack(
            model, attacks=attacks_arg, device=device, eps=threat.eps,
            norm=_PACKAGE_NORM[threat.norm], seed=seed, version=version)
        run_attacks = list(adversary.attacks_to_run)
        if only is not None and not set(only) <= set(run_attacks):
            raise ValueError(f"only={list(only)!r}: not among the version's attacks {run_attacks}")
        _set_apgd_budget(adversary, iterations, eot_iter)
        earlier: list = []
        if state_path is None and start is None and only is None:
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
            if on_attack_done is not None:
                for attack in run_attacks:
                    left = reported.get(attack)
                    on_attack_done(attack, 0 if left is None else round(left * len(y)),
                                   "skipped" if left is None else "run")
        else:
            key = {"package_version": package_version, "version": version, "attacks": run_attacks,
                   "norm": threat.norm.value, "eps": float(threat.eps), "seed": seed,
                   "batch_size": batch_size, "iterations": iterations, "eot_iter": eot_iter,
                   "n": int(x.shape[0]), "x": _tensor_digest(x), "y": _tensor_digest(y),
                   "model": _model_digest(model)}
            if start is not None or only is not None:   # absent otherwise: earlier states stay valid
                key["start"] = None if start is None else _tensor_digest(start)
                key["only"] = None if only is None else list(only)
            x_adv, earlier = _run_resumable(adversary, model, x, y, run_attacks, batch_size,
                                            device, None if state_path is None else Path(state_path),
                                            key, records,
                                            on_attack_done, bar, start=start, only=only)
        robust = _predict(model, x_adv, device, batch_size).to(y.device) == y

    _check_output(x, x_adv, threat)
    robust_accuracy = int(robust.sum()) / len(robust)
    warnings = _dedupe([*earlier, *(r.getMessage() for r in records
                                    if r.levelno >= logging.WARNING)])
    if reported:
        last = list(reported.values())[-1]
        # Compare counts, not floats: the package's accuracy is a float32 mean.
        if round(last * len(robust)) != int(robust.sum()):
            warnings.append(f"adapter: the package reported robust accuracy {last:.6f} after its"
                            f" last attack, but the model's predictions on x_adv give"
                            f" {robust_accuracy:.6f} (is the model randomized?)")
    for message in warnings:
        log.warning("AutoAttack: %s", message)
    return AutoAttackResult(
        x_adv=x_adv, robust=robust, robust_accuracy=robust_accuracy, per_attack=dict(reported),
        warnings=warnings, package=PACKAGE, package_version=package_version, version=version,
        norm=threat.norm.value, eps=float(threat.eps), seed=seed, attacks=run_attacks,
        batch_size=batch_size, iterations=iterations, eot_iter=eot_iter)


# ----------------------------------------------------------------------------- cost

def attack_budget(version: str = "standard", attacks: Optional[Sequence[str]] = None,
                  norm: str = "linf", iterations: Optional[int] = None,
                  eot_iter: Optional[int] = None) -> Dict[str, float]:
    """Forward+backward passes per example each sub-attack may spend, read from the package's
    own settings for this version (the sub-attack objects as ``AutoAttack.__init__`` and
    ``_set_version`` leave them, with the adapter's ``iterations`` / ``eot_iter``): APGD
    ``n_iter x n_restarts x eot_iter`` (APGD-T x its target classes), FAB ``n_iter x
    n_restarts`` (FAB-T: ``n_iter x n_target_classes``, one restart as the package sets it),
    Square ``n_queries x n_restarts / 3`` (forward passes only).  An upper bound: a point leaves
    the robust set, and the later attacks, once broken.  For progress estimates."""
    adversary = pyautoattack.AutoAttack(nn.Identity(), attacks=_attacks(version, attacks),
                                        eps=1.0, norm=_PACKAGE_NORM[_norm(norm)],
                                        seed=0, version=version)
    _set_apgd_budget(adversary, iterations, eot_iter)
    apgd, apgd_t, fab, square = (adversary.apgd, adversary.apgd_targeted, adversary.fab,
                                 adversary.square)
    costs = {
        "apgd-ce": apgd.n_iter * apgd.n_restarts * apgd.eot_iter,
        "apgd-dlr": apgd.n_iter * apgd.n_restarts * apgd.eot_iter,
        "apgd-t": apgd_t.n_iter * apgd_t.n_restarts * apgd_t.n_target_classes * apgd_t.eot_iter,
        "fab": fab.n_iter * fab.n_restarts,
        "fab-t": fab.n_iter * fab.n_target_classes,
        "square": square.n_queries * square.n_restarts / 3,
    }
    return {a: float(costs[a]) for a in adversary.attacks_to_run}


def square_check_warnings(per_attack: Dict[str, float]) -> list:
    """The package's Square check (``checks.check_square_sr``, run once at the end of a run) on a
    whole run's cumulative accuracies, as the warnings it logs: for a run whose stages ran in
    separate jobs (:mod:`methods.eval_shards`)."""
    records: list = []
    with _package_log(records, None):
        _aa_checks.check_square_sr(dict(per_attack), logger=logging.getLogger(PACKAGE_LOGGER))
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


# ----------------------------------------------------------------------------- resuming

def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def _model_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(name.encode())
        h.update(_tensor_digest(t).encode())
    return h.hexdigest()


def _load_state(path: Path, key: dict) -> Optional[Dict[str, Any]]:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # unreadable: start over rather than trust it
        log.warning("AutoAttack: ignoring unreadable state %s (%s)", path, err)
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        log.warning("AutoAttack: %s was written for another run; starting over", path)
        return None
    return state


def _save_state(path: Path, state: Dict[str, Any]) -> None:
    from .results import atomic_write
    atomic_write(path, lambda tmp: torch.save(state, tmp))


@contextlib.contextmanager
def _checks_off() -> Iterator[None]:
    """The package's run-level checks and its Square check, silenced for the per-batch calls
    (the adapter runs them once for the whole run).  ``check_zero_gradients``, inside APGD,
    stays on: it runs per batch in the package too."""
    with mock.patch.object(_aa_checks, "check_randomized", lambda *a, **k: None), \
            mock.patch.object(_aa_checks, "check_range_output", lambda *a, **k: 0), \
            mock.patch.object(_aa_checks, "check_dynamic", lambda *a, **k: None), \
            mock.patch.object(_aa_checks, "check_n_classes", lambda *a, **k: None), \
            mock.patch.object(_aa_checks, "check_square_sr", lambda *a, **k: None):
        yield


def _run_checks(adversary, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
    """The input checks exactly as ``run_standard_evaluation`` makes them, on its first batch."""
    xb, yb = x[:batch_size].to(adversary.device), y[:batch_size].to(adversary.device)
    if adversary.version != "rand":
        _aa_checks.check_randomized(adversary.get_logits, xb, yb, bs=batch_size,
                                    logger=adversary.logger)
    n_cls = _aa_checks.check_range_output(adversary.get_logits, xb, logger=adversary.logger)
    _aa_checks.check_dynamic(adversary.model, xb, False, logger=adversary.logger)
    _aa_checks.check_n_classes(n_cls, adversary.attacks_to_run,
                               adversary.apgd_targeted.n_target_classes,
                               adversary.fab.n_target_classes, logger=adversary.logger)


def _run_resumable(adversary, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   run_attacks: list, batch_size: int, device: torch.device, path: Path,
                   key: dict, records: list, on_attack_done, bar, start=None,
                   only=None) -> tuple:
    """``run_standard_evaluation`` sub-attack by sub-attack and batch by batch, saving the state
    after every batch; returns ``x_adv`` and the warnings of earlier sessions.  ``start`` /
    ``only``: see :func:`run_autoattack`."""
    n = int(x.shape[0])
    session_start = len(records)
    state = _load_state(path, key) if path is not None else None
    if state is None:
        if start is not None:
            robust = start.detach().cpu().clone()
        else:
            _run_checks(adversary, x, y, batch_size)
            with torch.no_grad():   # the package's clean pass
                clean = torch.cat([adversary.get_logits(x[i:i + batch_size].to(device)).max(dim=1)[1]
                                   for i in range(0, n, batch_size)])
            robust = clean.cpu() == y.cpu()
        state = {"key": key, "robust": robust, "x_adv": x.detach().cpu().clone(),
                 "per_attack": {"clean": int(robust.sum()) / n}, "done": [], "current": None,
                 "warnings": []}
    earlier = list(state["warnings"])

    def save() -> None:
        state["warnings"] = _dedupe([*earlier, *(r.getMessage() for r in records[session_start:]
                                                 if r.levelno >= logging.WARNING)])
        if path is not None:
            _save_state(path, state)

    save()
    robust, x_adv = state["robust"], state["x_adv"]
    y_cpu = y.detach().cpu()
    with _checks_off():
        for attack in run_attacks:
            if only is not None and attack not in only:
                continue
            if attack in state["done"]:
                if on_attack_done is not None:
                    on_attack_done(attack, int(round(state["per_attack"][attack] * n)), "restored")
                continue
            if not robust.any():   # the package: "no robust datapoints left", later attacks absent
                if on_attack_done is not None:
                    on_attack_done(attack, 0, "skipped")
                continue
            current = state["current"]
            if current is None or current["attack"] != attack:
                current = state["current"] = {"attack": attack, "pool": robust.nonzero().flatten(),
                                              "batches": 0}
            pool = current["pool"]
            n_batches = math.ceil(len(pool) / batch_size)
            batches = range(int(current["batches"]), n_batches)
            if bar is not None:
                batches = bar(batches, total=len(batches), desc=f"AutoAttack {attack}")
            for b in batches:
                ids = pool[b * batch_size:(b + 1) * batch_size]
                adversary.attacks_to_run = [attack]
                try:
                    xa, ya = adversary.run_standard_evaluation(x[ids.to(x.device)],
                                                               y[ids.to(y.device)],
                                                               batch_size=batch_size)
                finally:
                    adversary.attacks_to_run = run_attacks
                broken = ya.detach().cpu() != y_cpu[ids]   # the package's flags: y_adv != y
                robust[ids[broken]] = False
                x_adv[ids[broken]] = xa.detach().cpu()[broken]
                current["batches"] = b + 1
                save()
            state["per_attack"][attack] = int(robust.sum()) / n
            state["done"].append(attack)
            state["current"] = None
            save()
            if on_attack_done is not None:
                on_attack_done(attack, int(robust.sum()), "run")
    _aa_checks.check_square_sr(dict(state["per_attack"]), logger=adversary.logger)
    save()
    return x_adv.to(device=x.device, dtype=x.dtype), earlier


# ----------------------------------------------------------------------------- validation

def _package_version() -> str:
    found = importlib.metadata.version(PACKAGE)
    if found != PINNED_VERSION:
        raise RuntimeError(f"{PACKAGE}=={found} is installed but the adapter is written against the"
                           f" pinned {PINNED_VERSION}; re-read the package and update the adapter")
    return found


def _norm(norm: str) -> Norm:
    try:
        return Norm(str(norm).lower())
    except ValueError:
        raise ValueError(f"norm must be one of {[n.value for n in Norm]}, got {norm!r}") from None


def _eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) \
            or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return float(eps)


def _attacks(version: str, attacks: Optional[Sequence[str]]) -> Optional[list]:
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {list(VERSIONS)}, got {version!r}")
    if version != "custom":
        if attacks is not None:
            raise ValueError(f"attacks={list(attacks)!r} needs version='custom' (version"
                             f" {version!r} fixes its own attacks)")
        return None
    if isinstance(attacks, str) or not attacks:
        raise ValueError(f"version='custom' needs a non-empty list of attacks, got {attacks!r}")
    attacks = list(attacks)
    unknown = [a for a in attacks if a not in ATTACK_NAMES]
    if unknown:
        raise ValueError(f"unknown attacks {unknown}; {PACKAGE} knows {list(ATTACK_NAMES)}")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"attacks must not repeat, got {attacks}")
    return attacks


def _check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError("x must be a float tensor of shape (N, C, H, W), got "
                         f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
    if x.shape[0] == 0:
        raise ValueError("x is empty")
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.is_floating_point() \
            or y.dtype == torch.bool:
        got = f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}"
        raise ValueError(f"y must be an integer tensor of shape ({x.shape[0]},), got {got}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    lo, hi = x.min().item(), x.max().item()
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"x must lie in [0, 1] (pixel space; normalisation belongs inside the"
                         f" model), got min={lo:.6g}, max={hi:.6g}")


def _check_output(x: torch.Tensor, x_adv: torch.Tensor, threat: ThreatModel) -> None:
    if x_adv.shape != x.shape:
        raise AutoAttackCheckError(f"x_adv has shape {tuple(x_adv.shape)}, x {tuple(x.shape)}")
    if not torch.isfinite(x_adv).all():
        raise AutoAttackCheckError("x_adv contains NaN or infinite values")
    lo, hi = x_adv.min().item(), x_adv.max().item()
    if lo < 0.0 or hi > 1.0:
        raise AutoAttackCheckError(f"x_adv leaves [0, 1]: min={lo:.6g}, max={hi:.6g}")
    dist = threat.distance(x_adv.double() - x.double())
    worst = dist.max().item()
    if worst > threat.eps + EPS_TOLERANCE:
        n_out = int((dist > threat.eps + EPS_TOLERANCE).sum())
        raise AutoAttackCheckError(f"x_adv leaves the {threat.norm.value} ball of radius"
                                   f" {threat.eps}: max distance {worst:.8g} ({n_out} points)")


def _set_apgd_budget(adversary, iterations: Optional[int], eot_iter: Optional[int]) -> None:
    """Set the APGD attacks' ``n_iter`` (with the step-size checkpoints the package's
    ``APGDAttack.__init__`` derives from it) and ``eot_iter``; ``None`` leaves them alone."""
    for attack in (adversary.apgd, adversary.apgd_targeted):
        if iterations is not None:
            attack.n_iter = attack.n_iter_orig = iterations
            attack.n_iter_2 = max(int(0.22 * iterations), 1)
            attack.n_iter_min = max(int(0.06 * iterations), 1)
            attack.size_decr = max(int(0.03 * iterations), 1)
        if eot_iter is not None:
            attack.eot_iter = eot_iter


# ----------------------------------------------------------------------------- run context

def _model_device(model: nn.Module, x: torch.Tensor) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return x.device


@contextlib.contextmanager
def _eval_and_frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` parameters; every module's and parameter's own
    setting is restored (a mixed-mode model stays mixed).  Freezing keeps FAB's ``.backward()``
    from writing into ``param.grad`` and saves the parameter gradients' compute."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for the run inside a forked RNG, so the caller's RNG stream is untouched."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class _Collect(logging.Handler):
    def __init__(self, records: list) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _package_log(records: list, log_path: Union[str, Path, None]) -> Iterator[None]:
    """Collect the package's log records (and write them to ``log_path``) instead of letting
    them reach the root handlers, where DEBUG floods and warnings print and are lost."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    saved = (logger.level, logger.propagate)
    handlers: list[logging.Handler] = [_Collect(records)]
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_path, mode="w")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handlers.append(file_handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for h in handlers:
        logger.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


@contextlib.contextmanager
def _report_hook(reported: dict) -> Iterator[None]:
    """Record the package's per-attack robust accuracies.  The only place that dict leaves
    ``run_standard_evaluation`` is its single call to ``checks.check_square_sr``, which the
    package looks up at call time; wrap it, copy the dict, call the original."""
    original = _aa_checks.check_square_sr

    def wrapped(acc_dict, *args, **kwargs):
        reported.clear()
        reported.update((str(k), float(v)) for k, v in acc_dict.items())
        return original(acc_dict, *args, **kwargs)

    with mock.patch.object(_aa_checks, "check_square_sr", wrapped):
        yield


@contextlib.contextmanager
def _tracer_kept() -> Iterator[None]:
    """``checks.check_dynamic`` ends with ``sys.settrace(None)``; put the caller's tracer back."""
    tracer = sys.gettrace()
    try:
        yield
    finally:
        sys.settrace(tracer)


def _reset_dynamic_check_counts() -> None:
    """The dynamic-defense check never resets its call counts; zero them so each run is judged
    on its own model."""
    for name in _aa_checks.funcs:
        _aa_checks.funcs[name] = 0


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, device: torch.device,
             batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size].to(device)).argmax(dim=1)
                      for i in range(0, x.shape[0], batch_size)])


def _dedupe(messages) -> list:
    seen: dict = {}
    for m in messages:
        seen.setdefault(m, None)
    return list(seen)
