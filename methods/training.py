"""The one training loop every method shares.

A method supplies only its per-batch loss (``methods.algorithms.base.Method.loss``); this module
owns data order and augmentation, the optimizer and LR/momentum schedule, mixed precision,
per-epoch monitoring (PGD on a fixed held-out batch, so catastrophic overfitting is recorded
rather than hidden), measurement windows, pass counting and checkpoints.

Checkpoints: ``state.pt`` holds the full training state (model, optimizer, scheduler, grad
scaler, method state, every RNG, epoch, history) and is rewritten atomically after every epoch,
so rerunning a killed cell resumes from the last finished epoch.  ``last.pt`` (final weights)
and ``best.pt`` (weights of the epoch with the best monitored robust accuracy) are the outputs
evaluation reads; every number downstream names which one it came from.
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

from . import algorithms  # noqa: F401  (fills METHODS)
from .attacks import pgd
from .data import DatasetBundle, augment_batch, load_dataset, normalization
from .measure import make_meter
from .measure.passes import PassCounter, sum_passes
from .models import build_model
from .registry import METHODS
from .results import atomic_write, provenance, write_result
from .runtime import (Precision, autocast, cpu_generator, grad_scaler, pick_device,
                      runtime_summary, seed_everything, set_threads)
from .subsets import stratified_subset
from .threat import ThreatModel

STATE_FILE, LAST_FILE, BEST_FILE = "state.pt", "last.pt", "best.pt"


# ----------------------------------------------------------------------------- building blocks
def build_threat(spec: Dict[str, Any]) -> ThreatModel:
    try:
        return ThreatModel(spec["norm"], float(spec["eps"]))
    except KeyError as e:
        raise ValueError(f"threat: missing field {e.args[0]!r}") from None


def build_cell_model(cell: Dict[str, Any], bundle: DatasetBundle) -> nn.Module:
    arch = dict(cell["arch"])
    arch.pop("name")
    model_name = arch.pop("model")
    width = float(arch.pop("width", 1.0))
    mean, std = normalization(cell["normalization"], cell["dataset"]["source"])
    return build_model(model_name, num_classes=bundle.num_classes, image_shape=bundle.image_shape,
                       mean=mean, std=std, width=width, **arch)


def build_optimizer(model: nn.Module, spec: Dict[str, Any]) -> torch.optim.Optimizer:
    name = spec.get("name", "sgd")
    lr = float(spec["lr"])
    wd = float(spec.get("weight_decay", 0.0))
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=float(spec.get("momentum", 0.9)),
                               weight_decay=wd, nesterov=bool(spec.get("nesterov", False)))
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    raise ValueError(f"train.optimizer.name: unknown optimizer {name!r} (sgd, adam)")


def build_schedule(opt: torch.optim.Optimizer, spec: Dict[str, Any], lr: float,
                   steps_per_epoch: int, epochs: int):
    """Per-iteration LR schedule.

    ``cyclic``: torch's CyclicLR from 0 up to ``lr`` and back to 0 over the whole run, peaking at
    fraction ``peak_at`` (0.5 in N-FGSM/FGSM-RS/BB on CIFAR; 0.4 for N-FGSM SVHN and locuslab
    MNIST).  With SGD the official codes keep CyclicLR's default momentum cycling (0.9 at LR 0,
    0.8 at the peak; spec section 2.4); ``cycle_momentum`` can switch it off.
    ``multistep``: LR times ``gamma`` at each epoch in ``milestones``.  ``constant``: no change.
    """
    name = spec.get("name", "constant")
    total = steps_per_epoch * epochs
    if name == "cyclic":
        peak = float(spec.get("peak_at", 0.5))
        up = max(1.0, total * peak)
        down = max(1.0, total - up)
        cycle_m = bool(spec.get("cycle_momentum", isinstance(opt, torch.optim.SGD)))
        return torch.optim.lr_scheduler.CyclicLR(
            opt, base_lr=0.0, max_lr=lr, step_size_up=up, step_size_down=down,
            cycle_momentum=cycle_m, base_momentum=float(spec.get("base_momentum", 0.8)),
            max_momentum=float(spec.get("max_momentum", 0.9)))
    if name == "multistep":
        milestones = [int(m) * steps_per_epoch for m in spec["milestones"]]
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones,
                                                    gamma=float(spec.get("gamma", 0.1)))
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    raise ValueError(f"train.schedule.name: unknown schedule {name!r} (cyclic, multistep, constant)")


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

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.x), generator=self.generator).to(self.device)
        for i in range(self.steps):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.x[idx].float().div_(255)
            yield augment_batch(x, self.augmentation, self.generator), self.y[idx]


def to_float(x_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x_uint8.to(device).float().div_(255)


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


# ----------------------------------------------------------------------------- the loop
def train_cell(cell: Dict[str, Any], data_dir: Path, prepared_dir: Path, out_dir: Path,
               result_path: Path, meter_backend: Optional[str] = None) -> Dict[str, Any]:
    started = time.time()
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    runtime = cell.get("runtime") or {}
    set_threads(runtime.get("threads"))
    device = pick_device(runtime.get("device"))
    precision = Precision(runtime.get("amp") or "fp32")
    seed = int(cell["seed"])
    seed_everything(seed)
    meter = make_meter(meter_backend or runtime.get("meter") or "auto", device=device)
    run_window = contextlib.ExitStack()
    run_window.enter_context(meter.window("run"))  # closed before the meter is summarised

    tcfg = cell["train"]
    epochs = int(tcfg["epochs"])
    dataset_spec = {k: v for k, v in cell["dataset"].items() if k != "name"}
    bundle = load_dataset(cell["dataset"]["name"], dataset_spec, Path(data_dir), Path(prepared_dir))
    threat = build_threat(cell["threat"])
    model = build_cell_model(cell, bundle).to(device)
    channels_last = bool(runtime.get("channels_last"))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    compiled = bool(runtime.get("compile"))
    if compiled:
        model.compile()  # in place: same module, state_dict keys and hooks; slow first steps
    method = METHODS.get(cell["method"])(threat=threat, **cell.get("method_args", {}))

    augmentation = cell["augmentation"]
    if augmentation == "default":
        augmentation = bundle.default_augmentation
    gens = {"loader": cpu_generator(seed), "method": cpu_generator(seed + 1)}
    loader = TensorLoader(bundle.train.x, bundle.train.y, int(tcfg["batch_size"]),
                          bool(tcfg.get("drop_last", True)), device, augmentation,
                          gens["loader"], tcfg.get("max_steps_per_epoch"))
    opt_spec = tcfg["optimizer"]
    optimizer = build_optimizer(model, opt_spec)
    scheduler = build_schedule(optimizer, tcfg.get("schedule", {}), float(opt_spec["lr"]),
                               len(loader), epochs)
    scaler = grad_scaler(device, precision)
    monitor = build_monitor(cell, bundle, threat, device)
    counter = PassCounter(model)

    state = _load_state(ckpt_dir / STATE_FILE, cell["config_hash"])
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
        for name, g in gens.items():
            g.set_state(state["generators"][name])
        torch.set_rng_state(state["torch_rng"])
        history, best, best_weights = state["history"], state["best"], state["best_model"]
        start_epoch = int(state["epoch"]) + 1
        previous_windows = state.get("windows", [])

    co_drop = float(tcfg.get("co_drop", 0.2))
    stop_on_co = bool(tcfg.get("early_stop_on_co", False))
    with meter.window("train"):
        for epoch in range(start_epoch, epochs):
            if history and history[-1].get("stopped_early"):
                break
            with meter.window(f"epoch_{epoch:03d}"):
                row = _run_epoch(model, method, loader, optimizer, scheduler, scaler, counter,
                                 device, precision, channels_last, gens["method"], epoch, epochs)
                row.update(monitor(model))
            row["catastrophic_overfitting"] = is_catastrophic_overfitting(history, row, co_drop)
            row["stopped_early"] = bool(row["catastrophic_overfitting"] and stop_on_co)
            history.append(row)
            if row["pgd_acc"] > best["pgd_acc"]:
                best = {"epoch": epoch, "pgd_acc": row["pgd_acc"]}
                best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            # best.pt is a Snakemake output (deleted when a job fails), so the best weights
            # live in the state too and best.pt is written only at the end.
            _save(ckpt_dir / STATE_FILE, {
                "config_hash": cell["config_hash"], "epoch": epoch,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "method": method.state_dict(),
                "generators": {k: g.get_state() for k, g in gens.items()},
                "torch_rng": torch.get_rng_state(), "history": history, "best": best,
                "best_model": best_weights,
                "windows": previous_windows + [r.to_dict() for r in meter.records()]})
    _save(ckpt_dir / BEST_FILE, {"model": best_weights, "epoch": best["epoch"]})
    _save(ckpt_dir / LAST_FILE, {"model": model.state_dict(), "epoch": history[-1]["epoch"]})
    run_window.close()
    meter_summary = meter.summary()
    meter.close()
    counter.detach()

    co_epochs = [h["epoch"] for h in history if h["catastrophic_overfitting"]]
    record = {
        "kind": "train",
        "cell": cell,
        "method": method.describe(),
        "data": bundle.meta,
        "runtime": runtime_summary(device, precision, channels_last, compiled),
        "augmentation": augmentation,
        "steps_per_epoch": len(loader),
        "epochs_completed": len(history),
        "resumed_from_epoch": start_epoch if start_epoch > 0 else None,
        "history": history,
        "monitor": {"source": monitor.source, "steps": monitor.steps, "alpha": monitor.alpha,
                    "eps": threat.eps},
        "catastrophic_overfitting": {"detected": bool(co_epochs), "epochs": co_epochs,
                                     "threshold_drop": co_drop},
        "checkpoints": {"last": {"file": str(ckpt_dir / LAST_FILE), "epoch": history[-1]["epoch"]},
                        "best": {"file": str(ckpt_dir / BEST_FILE), "epoch": best["epoch"],
                                 "selected_by": f"monitor pgd_acc on {monitor.source}"}},
        "passes": _pass_summary(history),
        "measurement": {**meter_summary, "previous_sessions": previous_windows},
        "provenance": provenance(cell, device, time.time() - started),
    }
    return write_result(result_path, record, "train_result.schema.json")


def is_catastrophic_overfitting(history: List[Dict[str, Any]], row: Dict[str, Any],
                                drop: float) -> bool:
    """Robust accuracy fell more than ``drop`` (absolute) below the best earlier epoch.

    locuslab's FGSM-RS early stop compares with the previous epoch; comparing with the best
    earlier epoch also catches a collapse spread over several epochs.
    """
    best_before = max((h["pgd_acc"] for h in history), default=None)
    return best_before is not None and row["pgd_acc"] < best_before - drop


def _run_epoch(model, method, loader, optimizer, scheduler, scaler, counter, device, precision,
               channels_last, generator, epoch, epochs) -> Dict[str, Any]:
    from .algorithms.base import StepContext

    model.train()
    counter.reset()
    ctx = StepContext(epoch=epoch, step_in_epoch=0, steps_per_epoch=len(loader), epochs=epochs,
                      device=device, counter=counter, generator=generator)
    method.start_epoch(model, ctx)
    loss_sum, loss_n, skipped, seen = 0.0, 0, 0, 0
    stats_sum: Dict[str, float] = {}
    lr_first = optimizer.param_groups[0]["lr"]
    for step, (x, y) in enumerate(loader):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx.step_in_epoch, ctx.stats = step, {}
        with autocast(device, precision):
            loss = method.loss(model, x, y, ctx)
        if not model.training:
            raise RuntimeError(f"method {method.name!r} returned with the model in eval mode")
        seen += len(y)
        if loss is None:
            skipped += 1
        else:
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            loss_sum += float(loss.detach())
            loss_n += 1
        scheduler.step()
        for k, v in ctx.stats.items():
            stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
    passes = counter.totals()
    steps = len(loader)
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
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _load_state(path: Path, expected_hash: str) -> Optional[Dict[str, Any]]:
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("config_hash") != expected_hash:
        # A different configuration trained here before: start over rather than mix the two.
        path.rename(path.with_suffix(f".stale-{state.get('config_hash', 'unknown')[:12]}.pt"))
        return None
    return state


def load_weights(path: Path, model: nn.Module) -> int:
    """Load weights saved by the trainer into ``model``; returns the epoch they come from."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(blob["model"])
    return int(blob["epoch"])
