"""Every registered training method, through the real trainer: killed at a seeded random step of
a seeded random epoch, a rerun ends bit for bit where an uninterrupted run ends (weights, method
state, optimizer and scheduler, every generator and RNG, history); the same cell and seed twice
give identical runs and another seed a different one; and a training job logs one progress line
per epoch.

The tests are parametrized over ``METHODS``: a newly registered method fails here until it adds
its tiny configuration to :data:`CELLS` (what it needs to run: a meta split, layer names, ...).
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

import methods.algorithms  # noqa: F401  (fills METHODS: every module of the package)
from methods.registry import METHODS
from tests.helpers import (assert_same_training, check_killed_output, kill_then_resume, rehash,
                           run, tiny_cell)

REPO = Path(__file__).resolve().parents[1]
EPOCHS, STEPS = 4, 3      # tiny_cell: 3 steps of 32 per epoch

#: method -> (method_args, changes to tiny_cell).  Each exercises the method's state that must
#: survive a resume (BB's per-epoch tLHS noise, Selective AT's BN-eval-bug start step, the
#: ISDA / IADA covariance estimators, Meta-IADA's perturbation net, history and meta batches).
#: MNIST-5k's 500-image validation split is the meta split Meta-IADA needs.
CELLS = {
    "batchout": ({"layers": [["conv1", "conv2"], "fc1"], "position": "output", "k": 0.5,
                  "coefficient": "choice", "choices": [0.3, -0.2, 0.0],
                  "probs": [0.6, 0.3, 0.1]}, {}),
    "bb": ({"m": 2, "selection": "gs"}, {}),
    "fgsm_rs": ({}, {}),
    "iada": ({"shift": "gradient", "epsilon_mode": "class_prior"}, {}),
    "iat": ({"steps": 2, "alpha": 0.1}, {}),
    "isda": ({}, {}),
    "layerwise_at": ({}, {}),
    "manifold_mixup": ({}, {}),
    "meta_iada": ({"meta_interval": 2, "meta_batch_size": 30, "hidden": 8}, {}),
    "mixup": ({}, {}),
    "nfgsm": ({}, {}),
    "pgd_at": ({"steps": 2, "alpha": 0.1}, {}),
    "selective": ({"steps": 2, "alpha": 0.1, "warmup_epochs": 0, "bn_eval_bug": True,
                   "eval_every_epochs": 2}, {}),
    "standard": ({}, {}),
}
#: Extra cases beyond one per method: BatchNorm buffers updated by a train-mode attack.
EXTRA = {
    "nfgsm-batchnorm": ("nfgsm", {}, {"arch": {"name": "prn18-tiny", "model": "preactresnet18",
                                               "width": 0.0625}}),
}


def make_cell(name: str, seed: int = 3):
    if name in EXTRA:
        method, args, changes = EXTRA[name]
    elif name in CELLS:
        method, (args, changes) = name, CELLS[name]
    else:
        pytest.fail(f"method {name!r} is registered but has no resume test configuration: add "
                    f"its tiny method_args to CELLS in {Path(__file__).name}")
    cell = tiny_cell(method, json.loads(json.dumps(args)), epochs=EPOCHS)
    cell.update(json.loads(json.dumps(changes)))
    cell["seed"] = seed
    return rehash(cell)


def kill_point(name: str):
    """A seeded random (epoch, step, before-or-after-the-step): never the first epoch, which
    leaves no state to resume from; any later one, the last included."""
    rng = random.Random(zlib.crc32(name.encode()))
    return rng.randrange(1, EPOCHS), rng.randrange(STEPS), rng.random() < 0.3


@pytest.fixture(scope="module")
def straight_runs(mnist5k_prepared, tmp_path_factory):
    """One uninterrupted run per case, shared by the resume and determinism tests."""
    cache = {}

    def get(name):
        if name not in cache:
            out = tmp_path_factory.mktemp(f"straight-{name}")
            cache[name] = (out, run(make_cell(name), mnist5k_prepared, out))
        return cache[name]

    return get


CASES = METHODS.names() + sorted(EXTRA)


def test_every_configuration_names_a_registered_method():
    assert len(METHODS.names()) >= 14, "the registry was not filled before parametrization"
    assert not set(CELLS) - set(METHODS.names()), "CELLS names methods that are not registered"
    assert {m for m, _, _ in EXTRA.values()} <= set(METHODS.names())


@pytest.mark.parametrize("name", CASES)
def test_killed_at_a_random_step_resumes_bit_for_bit(name, straight_runs, mnist5k_prepared, tmp_path):
    straight_dir, straight = straight_runs(name)
    epoch, step, before = kill_point(name)
    resumed = kill_then_resume(make_cell(name), mnist5k_prepared, tmp_path, epoch=epoch,
                               step=step, before=before)
    assert_same_training(straight_dir, tmp_path, straight, resumed)
    assert resumed["epochs_completed"] == EPOCHS and resumed["diverged"] is None


@pytest.mark.parametrize("name", CASES)
def test_same_seed_same_run_other_seed_another(name, straight_runs, mnist5k_prepared, tmp_path):
    first_dir, first = straight_runs(name)
    again = run(make_cell(name), mnist5k_prepared, tmp_path / "again")
    assert_same_training(first_dir, tmp_path / "again", first, again)
    other = run(make_cell(name, seed=4), mnist5k_prepared, tmp_path / "other")
    a = torch.load(first_dir / "checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "other/checkpoints/last.pt", weights_only=True)["model"]
    assert not all(torch.equal(a[k], b[k]) for k in a), "another seed trained the same weights"
    assert [h["train_loss"] for h in other["history"]] != [h["train_loss"] for h in first["history"]]


# ----------------------------------------------------------------------------- a real SIGKILL
KILLER = r"""
import json, os, signal, sys
from pathlib import Path
from methods import training
from tests.helpers import killing_build_training, run

cell, root, out, epoch, step = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
training.build_training = killing_build_training(
    training.build_training, epoch, step, die=lambda: os.kill(os.getpid(), signal.SIGKILL))
run(cell, root, out)
"""


def test_a_sigkilled_process_resumes_bit_for_bit(straight_runs, mnist5k_prepared, tmp_path):
    """No exception unwinds, no ``finally`` runs: the process is gone mid-step."""
    name, (epoch, step) = "bb", (2, 1)
    straight_dir, straight = straight_runs(name)
    cell = make_cell(name)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps(cell), str(mnist5k_prepared),
                           str(tmp_path), str(epoch), str(step)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert f"epoch {epoch} done ({epoch}/{EPOCHS})" in proc.stderr      # it got that far
    check_killed_output(tmp_path, epoch)
    resumed = run(cell, mnist5k_prepared, tmp_path)
    assert resumed["resumed_from_epoch"] == epoch
    assert_same_training(straight_dir, tmp_path, straight, resumed)


# ----------------------------------------------------------------------------- progress lines
LINE = re.compile(r"^\[train (?P<recipe>\S+) seed (?P<seed>\d+)\] epoch (?P<k>\d+) done "
                  r"\((?P<done>\d+)/(?P<n>\d+)\)  elapsed \S+  remaining ~(?P<eta>\d\S*)  "
                  r"train_loss \d\.\d{4}  monitor clean \d\.\d{3} pgd \d\.\d{3}$")


def epoch_lines(err: str):
    return [m.groupdict() for m in map(LINE.match, err.splitlines()) if m]


def test_one_progress_line_per_epoch_with_an_estimate_and_a_resume_counts_earlier_epochs(
        mnist5k_prepared, tmp_path, capsys):
    cell = tiny_cell("standard", epochs=3)
    run(cell, mnist5k_prepared, tmp_path / "straight")
    err = capsys.readouterr().err
    lines = epoch_lines(err)
    assert len(lines) == 3 == len([l for l in err.splitlines() if " done (" in l]), err
    assert [(l["k"], l["done"], l["n"]) for l in lines] == [("1", "1", "3"), ("2", "2", "3"),
                                                           ("3", "3", "3")]
    assert lines[-1]["eta"] == "0s" and lines[0]["recipe"] == "standard_tiny"
    assert "\r" not in err              # no bar: stderr is not a terminal here

    kill_then_resume(cell, mnist5k_prepared, tmp_path / "killed", epoch=2, step=0)
    err = capsys.readouterr().err
    assert "resuming after epoch 2/3" in err
    # the killed session logged epochs 1 and 2, the resumed one only epoch 3, counted as 3/3
    assert [(l["k"], l["done"]) for l in epoch_lines(err)] == [("1", "1"), ("2", "2"), ("3", "3")]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_bar_over_the_steps_of_each_epoch(mnist5k_prepared, tmp_path, monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    run(tiny_cell("standard", epochs=2), mnist5k_prepared, tmp_path)
    out = term.getvalue()
    assert "epoch 1/2" in out and "epoch 2/2" in out and "/3 [" in out   # tqdm drew the steps
    assert len(epoch_lines(out.replace("\r", "\n"))) == 2
