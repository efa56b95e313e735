"""Kill the train job and then the evaluate job of a smoke workflow with SIGKILL, rerun the same
command each time, and get the tables of an uninterrupted run.

The workflow is the smoke config cut to one cell (``standard_mnist``, checkpoint ``last``) and
made a little longer, so each job is still running when the test kills it: 3 epochs of 15 steps,
PGD-20 over 4 batches, AutoAttack in 2 batches.  The train job's python process is killed once
the first epoch's ``state.pt`` exists, the evaluate job's once its partial directory holds the
PGD unit (clean and FGSM finished, PGD under way).  No killed job's output is taken as finished:
after each killed run none of its outputs exists (the jobs write them atomically at their very
end, and Snakemake removes a failed job's outputs) and no incomplete marker is left; the rerun
runs the job again (resuming from ``state.pt`` / the partial directory).  The uninterrupted reference is computed in
this process from the very identities Snakemake ran (``cell`` in ``train.json``, ``evaluation``
in the eval JSON) with the same functions the jobs call, into another directory.
"""
from __future__ import annotations

import csv
import os
from base64 import urlsafe_b64decode
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, List, Optional

import pytest
import torch
import yaml

from methods.config import REPO_ROOT, load_yaml
from methods.eval_resume import partial_dir
from methods.evaluation import evaluate_cell
from methods.results import read_result
from methods.tables import aggregate
from methods.training import train_cell
from tests.test_workflow_e2e import SNAKEMAKE

CELL = "mnist5k/smallcnn-w0.125/standard/standard_mnist/seed0"
#: Columns that measure time, not results.
TIMING = ("train_wall_s",)


def kill_config(tmp_path: Path) -> Path:
    config = load_yaml(REPO_ROOT / "workflow" / "config" / "smoke.yaml")
    config.update(run_name="kill", results_dir=str(tmp_path / "results"),
                  data_dir=str(tmp_path / "data"))
    config["cells"] = [{"datasets": ["mnist5k"], "archs": ["smallcnn-w0.125"],
                        "recipes": ["standard_mnist"], "seeds": [0]}]
    config["recipe_overrides"]["train"].update(epochs=3, max_steps_per_epoch=15)
    pgd = {"name": "pgd", "steps": 20, "alpha": 0.02, "restarts": 2}
    config["evaluation"].update(checkpoints=["last"], batch_size=50,
                                attacks=[{"name": "fgsm"}, pgd])
    config["evaluation"]["autoattack"].update(batch_size=10, compare_pgd=pgd)
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def job_pid(command: str, results: Path) -> Optional[int]:
    """The python process of a ``python -m methods <command> ...`` job writing under ``results``
    (the job's own process, not the shell Snakemake wraps it in)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = [a.decode(errors="replace")
                    for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if args[1:4] == ["-m", "methods", command] and any(str(results) in a for a in args):
            return int(entry.name)
    return None


def run_workflow(args: List[str], log: Path, kill: Optional[str] = None,
                 when: Callable[[], bool] = lambda: False, results: Optional[Path] = None,
                 timeout: float = 900) -> dict:
    """Run Snakemake; with ``kill``, SIGKILL that job's python process as soon as ``when()``."""
    killed = None
    with open(log, "w") as out:
        proc = subprocess.Popen(SNAKEMAKE + args, cwd=REPO_ROOT, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if kill and killed is None and when():
                    pid = job_pid(kill, results)
                    if pid is not None:
                        os.kill(pid, signal.SIGKILL)
                        killed = pid
                if time.monotonic() > deadline:
                    raise TimeoutError(f"snakemake {args} did not finish in {timeout} s")
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {"rc": proc.returncode, "killed": killed, "log": log.read_text()}


def incomplete_markers(under: Path) -> List[str]:
    """Outputs under ``under`` that Snakemake has marked incomplete (``.snakemake/incomplete``:
    one file per output, its path urlsafe-base64 encoded and cut into ``@``-prefixed parts)."""
    root = REPO_ROOT / ".snakemake" / "incomplete"
    found = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            parts = Path(dirpath, name).relative_to(root).parts
            try:
                path = urlsafe_b64decode("".join(p.lstrip("@") for p in parts)).decode()
            except ValueError:
                continue
            if path.startswith(str(under)):
                found.append(path)
    return found


def table_rows(path: Path) -> List[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


@pytest.mark.e2e
def test_killed_jobs_rerun_to_the_tables_of_an_uninterrupted_run(tmp_path):
    config = kill_config(tmp_path)
    results = tmp_path / "results"
    cell = results / CELL
    table = results / "tables" / "kill.csv"
    args = ["--cores", "2", "--resources", "gpu=1", "--configfile", str(config), "--",
            str(table)]
    state, result = cell / "checkpoints" / "state.pt", cell / "eval_last.json"
    partial = partial_dir(result)

    # 1. SIGKILL the train job once its first epoch is saved: Snakemake fails the job and keeps
    # none of its outputs; the state survives (it is not an output).
    marked = []

    def epoch_saved() -> bool:
        if not state.exists():
            return False
        marked.extend(incomplete_markers(results))      # while the job runs: its outputs
        return True

    first = run_workflow(args, tmp_path / "run1.log", "train", epoch_saved, results)
    assert first["killed"], "the train job ended before it could be killed:\n" + first["log"][-3000:]
    assert str(cell / "train.json") in marked                 # the markers are read right
    assert first["rc"] != 0 and "Error in rule train" in first["log"], first["log"][-3000:]
    for name in ("train.json", "checkpoints/last.pt", "checkpoints/best.pt", "eval_last.json"):
        assert not (cell / name).exists(), name
    assert incomplete_markers(results) == []
    killed_at = torch.load(state, weights_only=True)["epoch"]
    assert killed_at < 2                                  # mid-way: 3 epochs, 0-based

    # 2. The same command: training resumes from the state; SIGKILL the evaluate job once its
    # partial directory holds the PGD unit (clean and FGSM done).
    def pgd_under_way() -> bool:
        return partial.is_dir() and any(p.name.startswith("02-") for p in partial.iterdir())

    second = run_workflow(args, tmp_path / "run2.log", "evaluate", pgd_under_way, results)
    assert second["killed"], "the evaluate job ended before it could be killed:\n" + second["log"][-3000:]
    assert second["rc"] != 0 and "Error in rule evaluate" in second["log"], second["log"][-3000:]
    train = read_result(cell / "train.json", "train_result.schema.json")
    assert train["resumed_from_epoch"] is not None and train["resumed_from_epoch"] >= killed_at + 1
    assert train["epochs_completed"] == 3
    assert not result.exists() and (partial / "key.json").exists()
    assert incomplete_markers(results) == []

    # 3. The same command again: training is not redone, the evaluation resumes, the tables.
    third = run_workflow(args, tmp_path / "run3.log")
    assert third["rc"] == 0, third["log"][-3000:]
    assert "rule train:" not in third["log"] and "rule evaluate:" in third["log"]
    evaluated = read_result(result, "eval_result.schema.json")
    assert evaluated["resumed"]["units"][:2] == ["clean", "FGSM"], evaluated["resumed"]
    assert not partial.exists()
    log = (cell / "logs" / "evaluate_last.log").read_text()
    assert "resuming: " in log and "AutoAttack done (" in log and "remaining ~" in log

    # The uninterrupted run, from the identities Snakemake ran, into another directory.
    reference = tmp_path / "reference"
    prepared = results / "data" / "mnist5k"
    train_cell(train["cell"], tmp_path / "data", prepared, reference, reference / "train.json",
               device="cpu", threads=1, meter_backend="null")
    ref = evaluate_cell(reference / "train.json", evaluated["evaluation"], "last",
                        tmp_path / "data", prepared, reference / "eval_last.json", device="cpu",
                        threads=1, meter_backend="null")
    for key in ("metrics", "autoattack", "test_examples"):
        assert evaluated[key] == ref[key], key
    weights = [torch.load(d / "checkpoints" / "last.pt", weights_only=True)["model"]
               for d in (cell, reference)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    aggregate([reference / "eval_last.json"], reference / "kill.md", reference / "kill.csv")
    rows = table_rows(table)
    assert len(rows) == 1 and rows == table_rows(reference / "kill.csv")
