"""Cell builders shared by training, evaluation and the benchmarks.

The one place that turns a resolved training identity (:func:`methods.config.resolve_cell`)
into torch objects: the threat model, the model (normalisation inside), the method, the
optimizer and the LR schedule.  Training (:mod:`methods.training`), evaluation
(:mod:`methods.evaluation`) and the microbenchmarks (:mod:`methods.bench`) all build through
here, so a benchmarked or evaluated cell is the trained cell, object for object; evaluation
therefore never imports the training loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from . import algorithms  # noqa: F401  (fills METHODS)
from .algorithms.base import Method, MethodData, SetupContext
from .data import DatasetBundle, normalization
from .measure.passes import PassCounter
from .models import build_model
from .registry import METHODS
from .runtime import Precision, cpu_generator, grad_scaler
from .threat import ThreatModel


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


def build_method(cell: Dict[str, Any], threat: ThreatModel) -> Method:
    """``METHODS[cell.method](threat=threat, **cell.method_args)``; a wrong argument names it."""
    cls = METHODS.get(cell["method"])
    try:
        return cls(threat=threat, **cell.get("method_args", {}))
    except TypeError as e:
        raise ValueError(f"recipe {cell.get('recipe')!r}: method_args for {cell['method']!r}: {e}") from None


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


def method_data(model: nn.Module, bundle: DatasetBundle, device: torch.device) -> MethodData:
    """What :meth:`Method.setup` may know about the data and the model."""
    counts = torch.bincount(bundle.train.y.long(), minlength=bundle.num_classes)
    return MethodData(num_classes=bundle.num_classes, image_shape=tuple(bundle.image_shape),
                      feature_dim=int(model.feature_dim), class_counts=counts,
                      meta=bundle.val if len(bundle.val.y) > 0 else None, device=device)


@dataclass
class TrainingParts:
    """Everything one training step needs, built the same way for training and benchmarks."""

    threat: ThreatModel
    model: nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    counter: PassCounter
    precision: Precision
    channels_last: bool
    compiled: bool
    generators: Dict[str, torch.Generator]   # {"method": the method's generator}


def build_training(cell: Dict[str, Any], bundle: DatasetBundle, device: torch.device,
                   steps_per_epoch: int) -> TrainingParts:
    """Model, method (set up, before any state is loaded), optimizer, schedule and counters.

    ``steps_per_epoch`` sizes the per-iteration schedule.  The method's generator is seeded
    with ``seed + 1`` (the loader's with ``seed``); a resume overwrites its state.
    """
    runtime = cell.get("runtime") or {}
    seed = int(cell["seed"])
    tcfg = cell["train"]
    epochs = int(tcfg["epochs"])
    threat = build_threat(cell["threat"])
    model = build_cell_model(cell, bundle).to(device)
    channels_last = bool(runtime.get("channels_last"))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    compiled = bool(runtime.get("compile"))
    if compiled:
        model.compile()  # in place: same module, state_dict keys and hooks; slow first steps
    precision = Precision(runtime.get("amp") or "fp32")
    method = build_method(cell, threat)
    generators = {"method": cpu_generator(seed + 1)}
    method.setup(model, method_data(model, bundle, device),
                 SetupContext(device=device, generator=generators["method"], epochs=epochs,
                              steps_per_epoch=steps_per_epoch, precision=precision))
    opt_spec = tcfg["optimizer"]
    optimizer = build_optimizer(model, opt_spec)
    scheduler = build_schedule(optimizer, tcfg.get("schedule", {}), float(opt_spec["lr"]),
                               steps_per_epoch, epochs)
    return TrainingParts(threat=threat, model=model, method=method, optimizer=optimizer,
                         scheduler=scheduler, scaler=grad_scaler(device, precision),
                         counter=PassCounter(model), precision=precision,
                         channels_last=channels_last, compiled=compiled, generators=generators)


def to_float(x_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x_uint8.to(device).float().div_(255)


def load_weights(path: Path, model: nn.Module) -> int:
    """Load weights saved by the trainer into ``model``; returns the epoch they come from."""
    from .checkpoints import CorruptCheckpointError, load_torch_file
    fix = "delete it and train the cell again (python -m methods train writes it)"
    blob = load_torch_file(path, what="weights file", fix=fix)     # weights_only=True, map_location cpu
    if not isinstance(blob, dict) or not {"model", "epoch"} <= set(blob):
        raise CorruptCheckpointError(f"weights file {path} is not a checkpoint written by the trainer (want a dict "
                                     f"with 'model' and 'epoch'); {fix}", Path(path))
    model.load_state_dict(blob["model"])
    return int(blob["epoch"])
