"""The one training loop every method shares.

A method supplies only its per-batch loss (``methods.algorithms.base.Method.loss``); this module
owns data order and augmentation, the optimizer and LR/momentum schedule, mixed precision,
per-epoch monitoring (PGD on a fixed held-out batch, so catastrophic overfitting is recorded
rather than hidden), measurement windows, pass counting and checkpoints.

Checkpoints: ``state.pt`` holds the full training state (model, optimizer, scheduler, grad
scaler, method state, every RNG, epoch, history) and is rewritten atomically after every epoch,
so rerunning a killed cell resumes from the last finished epoch and ends bit for bit where an
uninterrupted run ends (nothing of an unfinished epoch is kept: the rerun restores every
generator, the global RNGs and the method's state from the file).  ``last.pt`` (final weights)
and ``best.pt`` (weights of the epoch with the best monitored robust accuracy) are the outputs
evaluation reads; every number downstream names which one it came from.

Numerical faults: after every step the loss and the weights are checked; a NaN or infinite
loss, or a non-finite parameter or buffer after the update (how a NaN/inf gradient shows once
it is applied; inf gradients that a GradScaler skips leave the weights finite), stops training
with :class:`TrainingDiverged` naming the epoch, step and method.  If an epoch had finished, the
run is *recorded* as diverged: ``train.json`` gets ``diverged`` (epoch, step, method, value) and
``last.pt`` / ``best.pt`` hold the last finished epoch's weights (``state.pt`` is left as that
epoch wrote it), so a campaign keeps going and its tables show the row as diverged.  A
divergence before any epoch finished leaves nothing to keep: the job fails with that message.
Catastrophic overfitting (robust accuracy collapsing while the loss stays finite) is not a
fault: it is recorded per epoch (``catastrophic_overfitting``).

Progress: one log line per finished epoch (elapsed time, an estimate of what remains, training
loss and monitored accuracies; a resumed run counts the epochs done before it) on stderr, and a
tqdm bar over the epoch's steps when stderr is a terminal (:mod:`methods.progress`).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .algorithms.base import StepContext
from .attacks import pgd
from .builders import TrainingParts, build_training, to_float
from .data import DatasetBundle, augment_batch, load_dataset
from .measure import make_meter
from .measure.passes import sum_passes
from .progress import Progress
from .results import provenance, write_result
from .runtime import cpu_generator, pick_device, runtime_summary, seed_everything, set_threads
from .subsets import stratified_subset
from .threat import ThreatModel

STATE_FILE, LAST_FILE, BEST_FILE = "state.pt", "last.pt", "best.pt"


# ----------------------------------------------------------------------------- data order
class TensorLoader:
    """Shuffled minibatches from uint8 image tensors, converted to [0, 1] floats on the device.

    Whole splits live on the device (GPU-resident when they fit), so there are no worker
    processes; the order comes from a checkpointed CPU generator, so a resumed run sees the
    same batches as an uninterrupted one.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, drop_last: bool,
                 device: torch.device, augmentation: str, generator: torch.Generator,
                 max_steps: Optional[int] = None) -> None:
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.drop_last = batch_size, drop_last
        self.augmentation, self.generator, self.device = augmentation, generator, device
        n = len(self.x)
        steps = n // batch_size if drop_last else math.ceil(n / batch_size)
        if steps == 0:
            raise ValueError(f"train.batch_size={batch_size} is larger than the {n} training "
                             "examples with drop_last=True")
        self.steps = min(steps, max_steps) if max_steps else steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(x, y, idx)``: images in [0, 1], labels, and their positions in the training split
        (for methods that keep per-example state, e.g. Meta-IADA's training history)."""
        order = torch.randperm(len(self.x), generator=self.generator).to(self.device)
        for i in range(self.steps):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.x[idx].float().div_(255)
            yield augment_batch(x, self.augmentation, self.generator), self.y[idx], idx


# ----------------------------------------------------------------------------- monitoring
@dataclass
class Monitor:
    """Clean and PGD accuracy on a fixed held-out batch after every epoch (eval mode)."""

    x: torch.Tensor
    y: torch.Tensor
    source: str
    threat: ThreatModel
    steps: int
    alpha: float
    seed: int

    def __call__(self, model: nn.Module) -> Dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                clean = (model(self.x).argmax(1) == self.y).float().mean().item()
            x_adv = pgd(model, self.x, self.y, self.threat, alpha=self.alpha, steps=self.steps,
                        generator=cpu_generator(self.seed))
            with torch.no_grad():
                robust = (model(x_adv).argmax(1) == self.y).float().mean().item()
        finally:
            model.train(was_training)
        return {"clean_acc": clean, "pgd_acc": robust}


def build_monitor(cell, bundle: DatasetBundle, threat: ThreatModel, device) -> Monitor:
    spec = cell["train"].get("monitor", {})
    n = int(spec.get("n", 256))
    split, name = (bundle.val, "val") if len(bundle.val.y) > 0 else (bundle.train, "train")
    # Without a validation split, locuslab's early-stop check uses a fixed training batch.
    idx = stratified_subset(split.y, n, int(cell["seed"]))
    x, y, source = split.x[idx], split.y[idx], f"{name}: stratified {len(idx)} (seed {cell['seed']})"
    alpha = float(spec.get("alpha", threat.eps / 4))
    return Monitor(to_float(x, device), y.to(device), source, threat,
                   int(spec.get("steps", 10)), alpha, int(cell["seed"]))


# ----------------------------------------------------------------------------- faults
class TrainingDiverged(RuntimeError):
    """A non-finite loss or non-finite weights at a training step.

    ``epoch`` and ``step`` are 0-based (as in ``history``); the message gives them 1-based with
    their totals as well.  ``quantity`` is ``"loss"`` or ``"weights"``; ``value`` is text
    (``"nan"``, ``"inf"``, or the first non-finite tensor), since JSON has no NaN.
    """

    def __init__(self, *, epoch: int, epochs: int, step: int, steps: int, method: str,
                 quantity: str, value: str, note: str = "") -> None:
        self.epoch, self.epochs, self.step, self.steps = epoch, epochs, step, steps
        self.method, self.quantity, self.value = method, quantity, value
        super().__init__(
            f"training diverged in epoch {epoch + 1}/{epochs}, step {step + 1}/{steps} "
            f"(0-based: epoch {epoch}, step {step}), method {method!r}: {quantity} is {value}"
            + (f"; {note}" if note else ""))

    def record(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "method": self.method,
                "quantity": self.quantity, "value": self.value, "message": str(self)}


def _watched_tensors(model: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """Parameters and floating-point buffers (BatchNorm statistics): what an update may ruin."""
    return ([(n, p) for n, p in model.named_parameters()]
            + [(n, b) for n, b in model.named_buffers() if b.is_floating_point()])


def _first_non_finite(tensors: List[Tuple[str, torch.Tensor]]) -> Optional[str]:
    """Name of the first tensor holding a NaN or inf, or None (one device sync)."""
    if not tensors:
        return None
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in tensors])
    if bool(finite.all()):
        return None
    return tensors[int((~finite).nonzero()[0, 0])][0]


def _number_text(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


# ----------------------------------------------------------------------------- the loop
def train_cell(cell: Dict[str, Any], data_dir: Path, prepared_dir: Path, out_dir: Path,
               result_path: Path, *, device: Optional[str] = None, threads: Optional[int] = None,
               meter_backend: Optional[str] = None) -> Dict[str, Any]:
    """Train one cell (a training identity from :func:`methods.config.resolve_cell`).

    ``device``, ``threads`` and ``meter_backend`` say where and how it runs, not what is
    trained: they are not part of the identity, so a cell may resume on other hardware.
    """
    started = time.time()
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    set_threads(threads)
    dev = pick_device(device)
    seed = int(cell["seed"])
    seed_everything(seed)
    meter = make_meter(meter_backend or "auto", device=dev)
    run_window = contextlib.ExitStack()
    run_window.enter_context(meter.window("run"))  # closed before the meter is summarised

    tcfg = cell["train"]
    epochs = int(tcfg["epochs"])
    dataset_spec = {k: v for k, v in cell["dataset"].items() if k != "name"}
    bundle = load_dataset(cell["dataset"]["name"], dataset_spec, Path(data_dir), Path(prepared_dir))
    augmentation = cell["augmentation"]
    if augmentation == "default":
        augmentation = bundle.default_augmentation
    loader_generator = cpu_generator(seed)
    loader = TensorLoader(bundle.train.x, bundle.train.y, int(tcfg["batch_size"]),
                          bool(tcfg.get("drop_last", True)), dev, augmentation,
                          loader_generator, tcfg.get("max_steps_per_epoch"))
    parts = build_training(cell, bundle, dev, len(loader))
    generators = {"loader": loader_generator, **parts.generators}   # everything a resume restores
    model, method, optimizer, scheduler, scaler = (parts.model, parts.method, parts.optimizer,
                                                   parts.scheduler, parts.scaler)
    threat = parts.threat
    monitor = build_monitor(cell, bundle, threat, dev)

    state = _load_state(ckpt_dir / STATE_FILE, cell["train_hash"])
    history: List[Dict[str, Any]] = []
    start_epoch, best = 0, {"epoch": None, "pgd_acc": -1.0}
    best_weights: Optional[Dict[str, torch.Tensor]] = None
    previous_windows: List[Dict[str, Any]] = []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        method.load_state_dict(state["method"])
        for name, g in generators.items():
            g.set_state(state["generators"][name])
        torch.set_rng_state(state["torch_rng"])
        if dev.type == "cuda" and state.get("cuda_rng") is not None \
                and len(state["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        history, best, best_weights = state["history"], state["best"], state["best_model"]
        start_epoch = int(state["epoch"]) + 1
        previous_windows = state.get("windows", [])

    co_drop = float(tcfg.get("co_drop", 0.2))
    stop_on_co = bool(tcfg.get("early_stop_on_co", False))
    progress = Progress(f"train {cell['recipe']} seed {seed}", epochs, done_before=start_epoch)
    if start_epoch:
        print(f"[{progress.job}] resuming after epoch {start_epoch}/{epochs} "
              f"({ckpt_dir / STATE_FILE})", file=progress.stream, flush=True)
    diverged: Optional[TrainingDiverged] = None
    with meter.window("train"):
        for epoch in range(start_epoch, epochs):
            if history and history[-1].get("stopped_early"):
                break
            try:
                with meter.window(f"epoch_{epoch:03d}"):
                    row = run_epoch(parts, loader, dev, epoch, epochs, progress=progress)
                    row.update(monitor(model))
            except TrainingDiverged as fault:
                diverged = fault
                print(f"[{progress.job}] {fault}", file=progress.stream, flush=True)
                break
            row["catastrophic_overfitting"] = is_catastrophic_overfitting(history, row, co_drop)
            row["stopped_early"] = bool(row["catastrophic_overfitting"] and stop_on_co)
            history.append(row)
            if row["pgd_acc"] > best["pgd_acc"]:
                best = {"epoch": epoch, "pgd_acc": row["pgd_acc"]}
                best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            # best.pt is a Snakemake output (deleted when a job fails), so the best weights
            # live in the state too and best.pt is written only at the end.
            _save(ckpt_dir / STATE_FILE, {
                "train_hash": cell["train_hash"], "epoch": epoch,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "method": method.state_dict(),
                "generators": {k: g.get_state() for k, g in generators.items()},
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if dev.type == "cuda" else None,
                "history": history, "best": best, "best_model": best_weights,
                "windows": previous_windows + [r.to_dict() for r in meter.records()]})
            progress.unit_done(f"epoch {epoch + 1}", 1, _epoch_detail(row))
    if diverged is not None:
        if not history:
            run_window.close()
            meter.close()
            parts.counter.detach()
            raise TrainingDiverged(**{k: getattr(diverged, k) for k in (
                "epoch", "epochs", "step", "steps", "method", "quantity", "value")},
                note="no epoch had finished, so there are no weights to keep and no result "
                     "is written (lower the learning rate, or check the recipe)") from None
        # The weights in memory are ruined: take the last finished epoch's from its state file
        # (written by this session or an earlier one), which stays as it is.
        good = _load_state(ckpt_dir / STATE_FILE, cell["train_hash"])
        if good is None or int(good["epoch"]) != int(history[-1]["epoch"]):
            raise RuntimeError(f"{diverged}; and {ckpt_dir / STATE_FILE} does not hold epoch "
                               f"{history[-1]['epoch']}, the last finished one") from diverged
        model.load_state_dict(good["model"])
        print(f"[{progress.job}] recorded as diverged; last.pt and best.pt hold the weights of "
              f"epoch {history[-1]['epoch'] + 1}/{epochs}, the last finished one",
              file=progress.stream, flush=True)
    _save(ckpt_dir / BEST_FILE, {"model": best_weights, "epoch": best["epoch"]})
    _save(ckpt_dir / LAST_FILE, {"model": model.state_dict(), "epoch": history[-1]["epoch"]})
    run_window.close()
    meter_summary = meter.summary()
    meter.close()
    parts.counter.detach()

    co_epochs = [h["epoch"] for h in history if h["catastrophic_overfitting"]]
    record = {
        "kind": "train",
        "cell": cell,
        "method": method.describe(),
        "data": bundle.meta,
        "runtime": runtime_summary(dev, parts.precision, parts.channels_last, parts.compiled),
        "augmentation": augmentation,
        "steps_per_epoch": len(loader),
        "epochs_completed": len(history),
        "resumed_from_epoch": start_epoch if start_epoch > 0 else None,
        "history": history,
        "monitor": {"source": monitor.source, "steps": monitor.steps, "alpha": monitor.alpha,
                    "eps": threat.eps},
        "catastrophic_overfitting": {"detected": bool(co_epochs), "epochs": co_epochs,
                                     "threshold_drop": co_drop},
        "diverged": (None if diverged is None else
                     {**diverged.record(), "kept_epoch": history[-1]["epoch"]}),
        "checkpoints": {"last": {"file": str(ckpt_dir / LAST_FILE), "epoch": history[-1]["epoch"]},
                        "best": {"file": str(ckpt_dir / BEST_FILE), "epoch": best["epoch"],
                                 "selected_by": f"monitor pgd_acc on {monitor.source}"}},
        "passes": _pass_summary(history),
        "measurement": {**meter_summary, "previous_sessions": previous_windows},
        "provenance": provenance(cell, dev, time.time() - started),
    }
    return write_result(result_path, record, "train_result.schema.json")


def _epoch_detail(row: Dict[str, Any]) -> str:
    loss = row.get("train_loss")
    text = (f"train_loss {'n/a' if loss is None else f'{loss:.4f}'}  "
            f"monitor clean {row['clean_acc']:.3f} pgd {row['pgd_acc']:.3f}")
    if row.get("catastrophic_overfitting"):
        text += "  catastrophic overfitting" + (" (stopping)" if row.get("stopped_early") else "")
    return text


def is_catastrophic_overfitting(history: List[Dict[str, Any]], row: Dict[str, Any],
                                drop: float) -> bool:
    """Robust accuracy fell more than ``drop`` (absolute) below the best earlier epoch.

    locuslab's FGSM-RS early stop compares with the previous epoch; comparing with the best
    earlier epoch also catches a collapse spread over several epochs.
    """
    best_before = max((h["pgd_acc"] for h in history), default=None)
    return best_before is not None and row["pgd_acc"] < best_before - drop


def run_epoch(parts: TrainingParts, loader, device: torch.device, epoch: int,
              epochs: int, progress: Optional[Progress] = None) -> Dict[str, Any]:
    """One epoch of training steps over ``loader`` (the benchmarks feed it fixed batches).

    Each step is ``method.step`` (by default: ``method.loss`` under the run's precision, then
    the trainer's update), followed by one scheduler step whether or not the method updated.
    A non-finite loss, or non-finite weights after the step, raises :class:`TrainingDiverged`.
    ``progress``: draw a bar over the steps (in a terminal only).
    """
    model, method, optimizer, counter = parts.model, parts.method, parts.optimizer, parts.counter
    model.train()
    counter.reset()
    ctx = StepContext(epoch=epoch, step_in_epoch=0, steps_per_epoch=len(loader), epochs=epochs,
                      device=device, counter=counter, generator=parts.generators["method"],
                      optimizer=optimizer, scaler=parts.scaler, precision=parts.precision)
    method.start_epoch(model, ctx)
    loss_sum, loss_n, skipped, seen = 0.0, 0, 0, 0
    stats_sum: Dict[str, float] = {}
    lr_first = optimizer.param_groups[0]["lr"]
    watched = _watched_tensors(model)
    steps = len(loader)
    batches = (progress.bar(loader, total=steps, desc=f"epoch {epoch + 1}/{epochs}")
               if progress is not None else loader)

    def fault(step: int, quantity: str, value: str) -> TrainingDiverged:
        return TrainingDiverged(epoch=epoch, epochs=epochs, step=step, steps=steps,
                                method=method.name, quantity=quantity, value=value)

    for step, (x, y, *positions) in enumerate(batches):
        if parts.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx.step_in_epoch, ctx.stats = step, {}
        ctx.indices = positions[0] if positions else None
        loss = method.step(model, x, y, ctx)
        if not model.training:
            raise RuntimeError(f"method {method.name!r} returned with the model in eval mode")
        seen += len(y)
        if loss is None:
            skipped += 1
        else:
            value = float(loss.detach())
            if not math.isfinite(value):
                raise fault(step, "loss", _number_text(value))
            loss_sum += value
            loss_n += 1
        bad = _first_non_finite(watched)
        if bad is not None:
            raise fault(step, "weights", f"non-finite ({bad})")
        parts.scheduler.step()
        for k, v in ctx.stats.items():
            stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
    passes = counter.totals()
    return {
        "epoch": epoch,
        "train_loss": loss_sum / loss_n if loss_n else None,
        "skipped_steps": skipped,
        "examples": seen,
        "lr_first": lr_first,
        "lr_last": optimizer.param_groups[0]["lr"],
        "method_stats": {k: v / steps for k, v in stats_sum.items()},
        "passes": passes,
        "passes_per_example": {k: v / max(1, seen) for k, v in sum_passes(passes).items()},
    }


def _pass_summary(history: List[Dict[str, Any]]) -> Dict[str, Any]:
    phases: Dict[str, Dict[str, int]] = {}
    examples = 0
    for h in history:
        examples += h["examples"]
        for phase, c in h["passes"].items():
            tot = phases.setdefault(phase, {"forward": 0, "backward": 0})
            tot["forward"] += c["forward"]
            tot["backward"] += c["backward"]
    total = sum_passes(phases)
    return {"by_phase": phases, "total": total, "examples": examples,
            "per_example": {k: v / max(1, examples) for k, v in total.items()}}


def _save(path: Path, obj: Dict[str, Any]) -> None:
    """state.pt / last.pt / best.pt: temp file beside ``path``, fsync, ``os.replace``; a failed
    write (disk full, read-only) leaves the previous file intact and raises an OSError naming ``path``."""
    from .checkpoints import save_torch_file
    save_torch_file(path, obj)


def _load_state(path: Path, expected_hash: str) -> Optional[Dict[str, Any]]:
    """The resumable state, loaded with ``weights_only=True`` (a file holding anything but tensors
    and plain containers is refused with an error naming it, and nothing in it runs)."""
    from .checkpoints import CorruptCheckpointError, load_torch_file
    if not path.exists():
        return None
    fix = f"delete {path} to train this cell from the start"
    state = load_torch_file(path, what="training state", fix=fix)
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"training state {path} holds a {type(state).__name__}, not the trainer's "
                                     f"state dict; {fix}", path)
    if state.get("train_hash") != expected_hash:
        # A different training identity trained here before: start over rather than mix the two.
        old = str(state.get("train_hash") or state.get("config_hash") or "unknown")[:12]
        path.rename(path.with_suffix(f".stale-{old}.pt"))
        return None
    return state
