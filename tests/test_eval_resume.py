"""Resumable evaluation and its progress lines.

A kill is a :class:`Killed` raised inside the evaluation (a ``BaseException``, as a signal would
be, so no ``except Exception`` can swallow it) after some work was saved; rerunning the same
evaluation must skip what was finished (counted by spies on the attacks and on the AutoAttack
package) and end with the same metrics, AutoAttack block and defence records as a run that was
never interrupted.  ``tests/test_workflow_kill.py`` does the same with SIGKILL through Snakemake.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import re
from unittest import mock

import pytest
import torch
from torch import nn

import pyautoattack

import methods.evaluation as evaluation_module
from methods.attack_specs import normalize_attack_spec
from methods.config import resolve_cell, resolve_evaluation
from methods.eval_core import run_attack
from methods.eval_resume import PartialEvaluation, partial_dir, resume_key
from methods.evaluation import evaluate_cell
from methods.progress import Progress
from methods.registry import ATTACKS
from methods.threat import ThreatModel
from methods.training import train_cell


class Killed(BaseException):
    """Stands for a kill at a chosen point of an evaluation."""


# ----------------------------------------------------------------------------- run_attack
class MemoryProgress:
    """A :class:`methods.eval_resume.UnitProgress` in memory that dies at its ``die_at``-th save
    (the batch ran, its progress is lost: the rerun must redo exactly that batch)."""

    def __init__(self, die_at=None):
        self.saved, self.saves, self.die_at = None, 0, die_at

    def load(self):
        return self.saved

    def save(self, progress):
        self.saves += 1
        if self.saves == self.die_at:
            raise Killed(f"killed before saving batch {self.saves}")
        self.saved = copy.deepcopy(progress)


def counting(monkeypatch, name):
    """Count the calls of attack ``name`` (one per batch) through the registry."""
    calls = []
    inner = ATTACKS.get(name)

    def spy(model, x, *args, **kwargs):
        calls.append(len(x))
        return inner(model, x, *args, **kwargs)

    monkeypatch.setitem(ATTACKS._items, name, spy)
    return calls


def test_run_attack_resumes_at_its_first_unfinished_batch_with_the_same_draws(monkeypatch):
    """Random starts and random targets come from one generator shared by the batches; its
    state is saved with each batch, so the resumed batches draw what the uninterrupted run
    drew, and the flags are the same example for example."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(40, 1, 4, 4, generator=g), torch.randint(0, 10, (40,), generator=g)
    threat = ThreatModel("linf", 0.1)
    for spec in ({"name": "pgd", "steps": 3, "alpha": 0.05, "restarts": 2},
                 {"name": "pgd", "steps": 3, "alpha": 0.05, "targeted": "random"}):
        spec = normalize_attack_spec(spec)
        whole, worst = run_attack(model, spec, threat, x, y, 8, 0, "whole")
        assert 0 < int(whole.sum()) < 40          # some flags of each kind: a real comparison
        store = MemoryProgress(die_at=3)
        with pytest.raises(Killed):
            run_attack(model, spec, threat, x, y, 8, 0, "killed", resume=store)
        assert store.saved["next"] == 16          # two of five batches kept
        calls = counting(monkeypatch, "pgd")
        store.die_at = None
        resumed, resumed_worst = run_attack(model, spec, threat, x, y, 8, 0, "resumed",
                                            resume=store)
        assert calls == [8, 8, 8]                 # batches 3..5 only
        assert torch.equal(resumed, whole) and resumed_worst == worst
        monkeypatch.undo()
        # Progress saved with another batch size is not resumed from.
        other = MemoryProgress()
        other.saved = {**store.saved, "batch_size": 4}
        again, _ = run_attack(model, spec, threat, x, y, 8, 0, "other", resume=other)
        assert torch.equal(again, whole) and other.saves == 5


# ----------------------------------------------------------------------------- the partial directory
def test_progress_of_another_evaluation_or_checkpoint_is_never_used(tmp_path):
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"weights v1")
    result = tmp_path / "eval_last.json"
    key = resume_key("e" * 64, "t" * 64, "last", ckpt)
    units = ["clean", "FGSM"]
    first = PartialEvaluation(result, key, units)
    assert not first.resumed and partial_dir(result) == tmp_path / "eval_last.partial"
    first.finish("clean", {"acc": 0.5}, torch.tensor([True, False]), [])
    assert PartialEvaluation(result, key, units).finished("clean")["record"] == {"acc": 0.5}

    # The same checkpoint path with other bytes, another evaluation or training identity: the
    # whole directory goes.
    ckpt.write_bytes(b"weights v2")
    for other in (resume_key("e" * 64, "t" * 64, "last", ckpt),
                  resume_key("f" * 64, "t" * 64, "last", tmp_path / "last.pt"),
                  resume_key("e" * 64, "u" * 64, "last", tmp_path / "last.pt")):
        assert other != key
        PartialEvaluation(result, key, units).finish("clean", {"acc": 0.5}, None, [])
        fresh = PartialEvaluation(result, other, units)
        assert not fresh.resumed and fresh.finished("clean") is None
        assert sorted(p.name for p in fresh.dir.iterdir()) == ["key.json"]

    # A unit file carried over from another key's directory is ignored, not trusted.
    mine = PartialEvaluation(result, key, units)
    stray = PartialEvaluation(tmp_path / "other.json", resume_key("0" * 64, "t" * 64, "last", ckpt),
                              units)
    stray.finish("FGSM", {"acc": 0.1}, None, [])
    mine.paths["FGSM"].write_bytes(stray.paths["FGSM"].read_bytes())
    assert mine.finished("FGSM") is None
    mine.paths["FGSM"].write_bytes(b"truncated")             # unreadable: redone, not fatal
    assert mine.finished("FGSM") is None
    mine.remove()
    assert not mine.dir.exists()


# ----------------------------------------------------------------------------- evaluate_cell
CONFIG = {
    "datasets": {"mnist5k": {"source": "mnist5k"}},
    "archs": {"smallcnn-tiny": {"model": "smallcnn", "width": 0.125}},
    "recipes": {"standard_tiny": {
        "method": "standard", "threat": {"norm": "linf", "eps": 0.05},
        "normalization": "none", "augmentation": "none",
        "train": {"epochs": 2, "batch_size": 32, "max_steps_per_epoch": 60,
                  "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                  "schedule": {"name": "cyclic", "peak_at": 0.5},
                  "monitor": {"n": 40, "steps": 2}}}},
    "cells": [{"datasets": ["mnist5k"], "archs": ["smallcnn-tiny"], "recipes": ["standard_tiny"],
               "seeds": [3]}],
    "evaluation": {
        "checkpoints": ["last"], "batch_size": 50, "n": 100, "seed": 0,
        "attacks": [{"name": "fgsm"}, {"name": "pgd", "steps": 5, "alpha": 0.02, "restarts": 2}],
        "autoattack": {"version": "custom", "attacks": ["apgd-ce"], "n": 16, "seed": 0,
                       "batch_size": 8,
                       "compare_pgd": {"name": "pgd", "steps": 5, "alpha": 0.02, "restarts": 2}},
        "defenses": [{"name": "gaussian", "samples": 2}],
        "defense_attacks": [{"name": "fgsm", "modes": ["oblivious"]}]},
}
PGD = "PGD-5-2-alpha=0.02"
UNITS = ["clean", "FGSM", PGD, "AutoAttack", "PGD on the AutoAttack subset", "defences"]


@pytest.fixture(scope="module")
def trained(mnist5k_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume_cell")
    cell = resolve_cell(CONFIG, "mnist5k", "smallcnn-tiny", "standard_tiny", 3)
    train_cell(cell, mnist5k_prepared / "data", mnist5k_prepared / "prepared", out,
               out / "train.json", device="cpu", threads=1, meter_backend="null")
    return mnist5k_prepared, out


def evaluate(trained, name):
    root, out = trained
    return evaluate_cell(out / "train.json", resolve_evaluation(CONFIG, "standard_tiny"), "last",
                         root / "data", root / "prepared", out / name, device="cpu", threads=1,
                         meter_backend="null")


@pytest.fixture(scope="module")
def reference(trained):
    """An uninterrupted evaluation, what it logged on stderr and each unit's per-example flags."""
    err, flags = io.StringIO(), {}
    finish = PartialEvaluation.finish

    def recording(self, name, record, unit_flags, windows):
        flags[name] = None if unit_flags is None else unit_flags.detach().cpu().clone()
        return finish(self, name, record, unit_flags, windows)

    with mock.patch.object(PartialEvaluation, "finish", recording), \
            contextlib.redirect_stderr(err):
        rec = evaluate(trained, "reference.json")
    return rec, err.getvalue(), flags


COMPUTED = ("metrics", "autoattack", "defenses", "test_examples", "checkpoint", "evaluation")


def test_every_unit_logs_a_progress_line_with_elapsed_and_remaining(reference):
    rec, err, _ = reference
    assert rec["resumed"] is None
    job = re.escape("[evaluate standard_tiny seed 3 last]")
    line = r"{} {} done \((\d+)/(\d+)\)  elapsed \S+  remaining ~\S+"
    for unit in [*UNITS, "AutoAttack apgd-ce"]:
        assert re.search(line.format(job, re.escape(unit)), err), (unit, err)
    done = [m.groups() for m in re.finditer(line.format(job, r".+?"), err)]
    assert len(done) == len(UNITS) + 1
    counts = [int(d) for d, _ in done]
    assert counts == sorted(counts) and counts[-1] == int(done[-1][1])   # ends at the total
    # AutoAttack (500 passes per example for custom apgd-ce) weighs more than FGSM.
    weights = dict(zip(UNITS[:3], [counts[0], counts[1] - counts[0], counts[2] - counts[1]]))
    assert counts[3] - counts[2] > 10 * weights["FGSM"]
    assert "acc 0." in err


def test_a_killed_evaluation_resumes_without_redoing_finished_work(trained, reference,
                                                                   monkeypatch, capsys):
    """Killed in PGD's second batch, then in AutoAttack's second batch, then at the end of the
    defences block; each rerun picks up where the last one stopped and the last one writes
    what the uninterrupted run wrote."""
    root, out = trained
    result, partial = out / "resumed.json", partial_dir(out / "resumed.json")
    package_run = pyautoattack.AutoAttack.run_standard_evaluation

    def session(kill_pgd_at=None, kill_package_at=None, kill_defenses=False, bar=False):
        monkeypatch.undo()
        pgd, fgsm = counting(monkeypatch, "pgd"), counting(monkeypatch, "fgsm")
        package_calls, defense_calls = [], []

        def package(self, x, y, **kwargs):
            package_calls.append(len(x))
            if len(package_calls) == kill_package_at:
                raise Killed("in AutoAttack")
            return package_run(self, x, y, **kwargs)

        def defenses(*args, **kwargs):
            defense_calls.append(1)
            records = evaluate_defenses(*args, **kwargs)
            if kill_defenses:
                raise Killed("at the end of the defences block")
            return records

        if kill_pgd_at:
            inner = ATTACKS.get("pgd")

            def dying_pgd(model, x, *args, **kwargs):
                if len(pgd) + 1 == kill_pgd_at:
                    raise Killed("in PGD")
                return inner(model, x, *args, **kwargs)
            monkeypatch.setitem(ATTACKS._items, "pgd", dying_pgd)
        monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", package)
        evaluate_defenses = evaluation_module.evaluate_defenses
        monkeypatch.setattr(evaluation_module, "evaluate_defenses", defenses)
        if bar:
            monkeypatch.setattr(evaluation_module, "Progress",
                                functools.partial(Progress, interactive=True))
        killed = None
        try:
            rec = evaluate(trained, "resumed.json")
        except Killed as e:
            killed, rec = str(e), None
        return {"rec": rec, "killed": killed, "pgd": list(pgd), "fgsm": list(fgsm),
                "package": list(package_calls), "defenses": len(defense_calls)}

    # 1: clean, FGSM and PGD's first batch (of two) done; a bar over the batches in a terminal.
    s = session(kill_pgd_at=2, bar=True)
    assert s["killed"] == "in PGD" and s["fgsm"] == [50, 50] and s["pgd"] == [50]
    assert not result.exists() and (partial / "key.json").exists()
    err = capsys.readouterr().err
    assert re.search(r"PGD-5-2-alpha=0\.02: +\d+%.*\| 0/2 \[", err), err     # tqdm's bar
    assert "FGSM done (" in err and f"{PGD} done" not in err

    # 2: PGD's second batch only; AutoAttack (the still-robust of its 16 images in batches of
    # 8) killed in its second batch.
    s = session(kill_package_at=2)
    assert s["killed"] == "in AutoAttack" and s["fgsm"] == [] and s["pgd"] == [50]
    first_aa = s["package"]
    assert len(first_aa) == 2 and first_aa[0] == 8 and not result.exists()
    assert "resuming: 2 of 6 units done in an earlier session (clean, FGSM)" in capsys.readouterr().err

    # 3: AutoAttack's second batch only, the PGD comparison, then killed after the defences
    # (whose oblivious FGSM is the two FGSM batches).
    s = session(kill_defenses=True)
    assert s["killed"] == "at the end of the defences block"
    assert s["package"] == first_aa[1:] and s["pgd"] == [16] and s["defenses"] == 1
    assert s["fgsm"] == [50, 50]

    # 4: only the defences block again (a block is redone whole), then the result.
    restored = {}
    finished = PartialEvaluation.finished

    def recording(self, name):
        saved = finished(self, name)
        if saved is not None and saved["flags"] is not None:
            restored[name] = saved["flags"]
        return saved

    with mock.patch.object(PartialEvaluation, "finished", recording):
        s = session()
    assert s["killed"] is None and (s["pgd"], s["package"]) == ([], [])
    assert s["defenses"] == 1 and s["fgsm"] == [50, 50]
    rec, (ref, _, ref_flags) = s["rec"], reference
    assert restored.keys() == set(UNITS[:5])
    for name, unit_flags in restored.items():       # the same examples robust, one by one
        assert torch.equal(unit_flags, ref_flags[name]), name
    for key in COMPUTED:
        assert rec[key] == ref[key], key
    assert rec["resumed"] == {"units": UNITS[:5], "continued": []}
    assert {r["name"] for r in rec["measurement"]["previous_sessions"]} >= {"clean", "FGSM"}
    assert json.loads(result.read_text())["metrics"] == ref["metrics"]
    assert not partial.exists()                                  # removed after success
