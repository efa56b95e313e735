"""Small models and data shared by the tests (no files, no network)."""
from __future__ import annotations

import torch
from torch import nn

from methods.models.core import Backbone, Stage


class TinyNet(Backbone):
    """A small conv net with the project's model interface (a :class:`Backbone`: forward_features,
    head, stages ``stage1`` (after the conv block) and ``features``; no ``input`` stage, since the
    bare net has no normalization module)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, size: int = 8,
                 batchnorm: bool = False) -> None:
        super().__init__()
        layers = [nn.Conv2d(in_channels, 4, 3, padding=1)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(4))
        layers += [nn.ReLU(), nn.Flatten(), nn.Linear(4 * size * size, 16), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(16, num_classes)
        conv_relu = 1 + int(batchnorm)  # index of the ReLU after the conv (and BN)
        self.declare_stages(Stage("stage1", f"body.{conv_relu}", 4, 1),
                            Stage("features", f"body.{len(layers) - 1}", 16, 0))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TinyMLP(Backbone):
    """A 16-input MLP with the model interface (a :class:`Backbone` whose only stage is
    ``features``, the body's last module); optional BatchNorm and Dropout (1x4x4 inputs)."""

    def __init__(self, bn: bool = False, dropout: float = 0.0, classes: int = 3) -> None:
        super().__init__()
        layers = [nn.Flatten(), nn.Linear(16, 12)]
        if bn:
            layers.append(nn.BatchNorm1d(12))
        layers.append(nn.ReLU())
        if dropout:
            layers.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(12, classes)
        self.declare_stages(Stage("features", f"body.{len(layers) - 1}", 12, 0))

    def forward_features(self, x):
        return self.body(x)


def toy_batch(n: int = 16, channels: int = 1, size: int = 8, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def make_ctx(model, epoch: int = 0, step: int = 0, steps_per_epoch: int = 10, epochs: int = 2,
             seed: int = 0):
    from methods.algorithms.base import StepContext
    from methods.measure.passes import PassCounter

    return StepContext(epoch=epoch, step_in_epoch=step, steps_per_epoch=steps_per_epoch,
                       epochs=epochs, device=torch.device("cpu"), counter=PassCounter(model),
                       generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- tiny training cells
def tiny_cell(method="nfgsm", method_args=None, epochs=3):
    """A resolved training identity that trains in well under a second on MNIST-5k: SmallCNN
    width 0.125, 3 steps of 32 per epoch, a 40-image monitor with PGD-2."""
    cell = {
        "dataset": {"name": "mnist5k", "source": "mnist5k"},
        "arch": {"name": "smallcnn-tiny", "model": "smallcnn", "width": 0.125},
        "recipe": f"{method}_tiny", "method": method, "method_args": method_args or {},
        "threat": {"norm": "linf", "eps": 0.3}, "normalization": "none", "augmentation": "none",
        "train": {"epochs": epochs, "batch_size": 32, "max_steps_per_epoch": 3,
                  "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                  "schedule": {"name": "cyclic", "peak_at": 0.5},
                  "monitor": {"n": 40, "steps": 2}},
        "seed": 3,
        "runtime": {"amp": None, "channels_last": None, "compile": None},
    }
    return rehash(cell)


def rehash(cell):
    """Recompute ``train_hash`` after editing a cell."""
    from methods.config import config_hash

    cell["train_hash"] = config_hash({k: v for k, v in cell.items() if k != "train_hash"})
    return cell


def run(cell, root, out):
    """``train_cell`` on the CPU, one thread, no energy meter; ``root`` holds data/ and prepared/."""
    from methods.training import train_cell

    return train_cell(cell, root / "data", root / "prepared", out, out / "train.json",
                      device="cpu", threads=1, meter_backend="null")


# ----------------------------------------------------------------------------- kill and resume
class Killed(BaseException):
    """Raised inside a training step to stand for a kill (like KeyboardInterrupt, it is not an
    ``Exception``, so no ``except Exception`` in the trainer can swallow it)."""


def killing_build_training(build, epoch: int, step: int, before: bool = False, die=None):
    """Wrap ``methods.builders.build_training`` so the built method's step dies at (``epoch``,
    ``step``), 0-based: after the step ran (so the model, optimizer, method state and generators
    are all mid-epoch, as a real kill leaves them) or, with ``before``, before it.  ``die``:
    how (default: raise :class:`Killed`; a subprocess test passes a SIGKILL of itself)."""
    def default_die():
        raise Killed(f"killed {'before' if before else 'after'} epoch {epoch} step {step}")

    die = die or default_die

    def build_and_arm(*args, **kwargs):
        parts = build(*args, **kwargs)
        inner = parts.method.step

        def step_then_die(model, x, y, ctx):
            here = (ctx.epoch, ctx.step_in_epoch) == (epoch, step)
            if here and before:
                die()
            out = inner(model, x, y, ctx)
            if here:
                die()
            return out

        parts.method.step = step_then_die
        return parts

    return build_and_arm


def check_killed_output(out, epoch: int) -> None:
    """What a run killed inside ``epoch`` (0-based, >= 1) may leave in ``out``: ``state.pt`` of
    epoch ``epoch - 1`` and nothing else (no result, no final checkpoint, no temporary file)."""
    ckpts = out / "checkpoints"
    assert not (out / "train.json").exists(), "a killed run left a finished-looking result"
    assert sorted(p.name for p in ckpts.iterdir()) == ["state.pt"], sorted(ckpts.iterdir())
    assert torch.load(ckpts / "state.pt", weights_only=True)["epoch"] == epoch - 1


def kill_then_resume(cell, root, out, *, epoch: int, step: int = 0, before: bool = False):
    """Run ``cell`` into ``out``, kill it inside (``epoch``, ``step``) (0-based; ``epoch`` >= 1),
    check what the kill left (``state.pt`` of epoch ``epoch - 1`` and nothing else: no result,
    no final checkpoints, no temporary file), then rerun it to the end and return the resumed
    run's record."""
    import pytest

    from methods import training

    real = training.build_training
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "build_training", killing_build_training(real, epoch, step, before))
        with pytest.raises(Killed):
            run(cell, root, out)
    check_killed_output(out, epoch)
    resumed = run(cell, root, out)
    assert resumed["resumed_from_epoch"] == epoch
    return resumed


def assert_same(a, b, where="state"):
    """Bit-for-bit equality of nested dicts / lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys(), getattr(b, "keys", None))
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


#: State entries that measure the session (wall times), not the training.
SESSION_ONLY = ("windows",)


def assert_same_training(dir_a, dir_b, record_a=None, record_b=None):
    """Two runs of one cell ended identically: ``last.pt`` and ``best.pt`` weights and epochs,
    and everything in ``state.pt`` (model, optimizer, scheduler, scaler, method state, every
    generator and RNG, history, best) but the measurement windows; with the records, the same
    history (every metric of every epoch), passes and checkpoint epochs."""
    from pathlib import Path

    ca, cb = Path(dir_a) / "checkpoints", Path(dir_b) / "checkpoints"
    for name in ("last.pt", "best.pt"):
        assert_same(torch.load(ca / name, weights_only=True), torch.load(cb / name, weights_only=True), name)
    sa = torch.load(ca / "state.pt", weights_only=True)
    sb = torch.load(cb / "state.pt", weights_only=True)
    assert_same({k: v for k, v in sa.items() if k not in SESSION_ONLY},
                {k: v for k, v in sb.items() if k not in SESSION_ONLY}, "state.pt")
    if record_a is not None and record_b is not None:
        for key in ("history", "passes", "epochs_completed", "method", "catastrophic_overfitting"):
            assert_same(record_a[key], record_b[key], f"train.json/{key}")
        assert record_a["checkpoints"]["best"]["epoch"] == record_b["checkpoints"]["best"]["epoch"]
        assert record_a["checkpoints"]["last"]["epoch"] == record_b["checkpoints"]["last"]["epoch"]
