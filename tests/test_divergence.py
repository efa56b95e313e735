"""Numerical faults in training: a NaN / infinite loss or non-finite weights stop the run naming
the epoch, step and method.  After a finished epoch the run is recorded as diverged (train.json
``diverged``, checkpoints of the last finished epoch, state.pt untouched, tables mark the row);
before any finished epoch the job fails with that message.  Catastrophic overfitting stays a
recorded result, never a fault."""
from __future__ import annotations

import json

import pytest
import torch

from methods import cli
from methods.algorithms.base import Method
from methods.registry import METHODS
from methods.results import read_result
from methods.tables import aggregate
from methods.training import TrainingDiverged
from tests.helpers import rehash, run, tiny_cell

from test_tables import write_eval


def absurd_lr_cell(method="pgd_at", args=None, epochs=2):
    """lr 1e12 from the first step: the logits overflow within a few steps (lr 1e6 leaves a
    huge but finite loss on this net, which is not what is tested)."""
    cell = tiny_cell(method, args if args is not None else {"steps": 2, "alpha": 0.1}, epochs)
    cell["train"]["optimizer"]["lr"] = 1e12
    cell["train"]["schedule"] = {"name": "constant"}
    return rehash(cell)


def late_blowup_cell(gamma=1e9, epochs=3):
    """Sane for epoch 0 (lr 0.05), then lr x gamma from epoch 1 on."""
    cell = tiny_cell("standard", epochs=epochs)
    cell["train"]["schedule"] = {"name": "multistep", "milestones": [1], "gamma": gamma}
    return rehash(cell)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_absurd_lr_in_the_first_epoch_fails_naming_epoch_step_and_method(mnist5k_prepared, tmp_path):
    with pytest.raises(TrainingDiverged) as info:
        run(absurd_lr_cell(), mnist5k_prepared, tmp_path)
    fault = info.value
    assert fault.epoch == 0 and fault.method == "pgd_at" and 0 <= fault.step < 3
    assert fault.quantity in ("loss", "weights")
    message = str(fault)
    assert f"epoch 1/2, step {fault.step + 1}/3" in message and "method 'pgd_at'" in message
    assert "no weights to keep" in message
    # nothing that looks like a result, and no state to resume from
    assert not (tmp_path / "train.json").exists()
    assert not list(tmp_path.glob("checkpoints/*"))


def test_the_train_command_exits_nonzero_with_the_message(mnist5k_prepared, tmp_path):
    cell = absurd_lr_cell("standard", {})
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--cell", json.dumps(cell), "--data-dir", str(mnist5k_prepared / "data"),
                  "--prepared-dir", str(mnist5k_prepared / "prepared"), "--out-dir", str(tmp_path),
                  "--result", str(tmp_path / "train.json"), "--device", "cpu", "--threads", "1",
                  "--meter", "null"])
    assert info.value.code != 0
    assert "train standard_tiny seed 3: training diverged in epoch 1/2" in str(info.value.code)
    assert "method 'standard'" in str(info.value.code)


def test_divergence_after_a_finished_epoch_is_recorded_with_the_last_good_weights(
        mnist5k_prepared, tmp_path, capsys):
    cell = late_blowup_cell()
    record = run(cell, mnist5k_prepared, tmp_path / "blown")
    err = capsys.readouterr().err
    d = record["diverged"]
    assert d["epoch"] == 1 and d["method"] == "standard" and d["kept_epoch"] == 0
    assert d["quantity"] in ("loss", "weights") and d["value"]
    assert f"epoch 2/3, step {d['step'] + 1}/3" in d["message"] and "method 'standard'" in d["message"]
    assert d["message"] in err and "recorded as diverged" in err
    assert record["epochs_completed"] == 1 and len(record["history"]) == 1
    assert record["checkpoints"]["last"]["epoch"] == record["checkpoints"]["best"]["epoch"] == 0
    assert read_result(tmp_path / "blown/train.json", "train_result.schema.json") == record

    ckpts = tmp_path / "blown/checkpoints"
    state = torch.load(ckpts / "state.pt", weights_only=True)
    assert state["epoch"] == 0
    last = weights(ckpts / "last.pt")
    assert same_weights(last, state["model"]) and same_weights(last, weights(ckpts / "best.pt"))
    assert all(torch.isfinite(v).all() for v in last.values())
    # the kept weights are exactly epoch 0 of the same training without the blow-up
    sane = late_blowup_cell(gamma=1.0, epochs=1)
    run(sane, mnist5k_prepared, tmp_path / "sane")
    assert same_weights(last, weights(tmp_path / "sane/checkpoints/last.pt"))

    # A rerun (Snakemake deletes a failed job's outputs; here: the user forces it) resumes from
    # the kept state and diverges at the same place: the fault is deterministic, not transient.
    for name in ("train.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        (tmp_path / "blown" / name).unlink()
    again = run(cell, mnist5k_prepared, tmp_path / "blown")
    assert again["resumed_from_epoch"] == 1
    assert {k: again["diverged"][k] for k in ("epoch", "step", "quantity", "value")} == \
        {k: d[k] for k in ("epoch", "step", "quantity", "value")}


class PoisonsItsWeights(Method):
    """A finite loss, but after the update at (epoch 1, step 1) one weight is NaN: what a NaN
    gradient does once it is applied."""

    name = "poison_test"
    paper = "test only"

    def loss(self, model, x, y, ctx):
        return torch.nn.functional.cross_entropy(model(x), y)

    def step(self, model, x, y, ctx):
        loss = super().step(model, x, y, ctx)
        if (ctx.epoch, ctx.step_in_epoch) == (1, 1):
            with torch.no_grad():
                model.head.bias[0] = float("nan")
        return loss


def test_non_finite_weights_after_a_finite_loss_are_caught_and_named(
        mnist5k_prepared, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS._items, PoisonsItsWeights.name, PoisonsItsWeights)
    record = run(tiny_cell(PoisonsItsWeights.name, epochs=3), mnist5k_prepared, tmp_path)
    d = record["diverged"]
    assert (d["epoch"], d["step"], d["method"], d["quantity"]) == (1, 1, "poison_test", "weights")
    assert "head.bias" in d["value"] and d["kept_epoch"] == 0


def test_catastrophic_overfitting_is_a_recorded_result_not_a_fault(mnist5k_prepared, tmp_path, capsys):
    """A negative threshold makes every epoch after the first 'collapse': the run records it
    and (with early_stop_on_co) stops early; nothing diverged, nothing raised."""
    cell = tiny_cell("fgsm_rs", epochs=3)
    cell["train"].update({"co_drop": -1.0, "early_stop_on_co": True})
    record = run(rehash(cell), mnist5k_prepared, tmp_path)
    assert record["diverged"] is None
    assert record["catastrophic_overfitting"]["detected"] and record["catastrophic_overfitting"]["epochs"] == [1]
    assert record["epochs_completed"] == 2 and record["history"][-1]["stopped_early"]
    assert "epoch 2 done (2/3)" in capsys.readouterr().err


def test_tables_mark_a_diverged_row(tmp_path):
    path, _, _ = write_eval(tmp_path, "blown", [({"name": "fgsm"}, (7, 6))])
    message = ("training diverged in epoch 2/3, step 1/3 (0-based: epoch 1, step 0), "
               "method 'standard': loss is nan")
    (path.parent / "train.json").write_text(json.dumps({
        "catastrophic_overfitting": {"detected": False, "epochs": []},
        "passes": {"per_example": {"forward": 1.0, "backward": 1.0}},
        "provenance": {"wall_s": 3.0},
        "diverged": {"epoch": 1, "step": 0, "method": "standard", "quantity": "loss",
                     "value": "nan", "message": message, "kept_epoch": 0}}))
    fine, _, _ = write_eval(tmp_path, "fine", [({"name": "fgsm"}, (7, 6))])
    frame = aggregate([path, fine], tmp_path / "t.md", tmp_path / "t.csv")
    md = (tmp_path / "t.md").read_text()
    assert "| last **DIVERGED** |" in md and f"- blown seed 0: {message}" in md
    assert md.count("DIVERGED**") == 2                 # the row and the note's heading only
    assert frame.set_index("recipe").loc["blown", "diverged"] == message
