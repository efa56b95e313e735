"""End to end: the Snakemake workflow on the smoke config, and dry runs of the big configs."""
import subprocess
import sys

import pytest

from methods.config import REPO_ROOT, iter_cells, load_yaml
from methods.results import read_result

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(*args, cwd=REPO_ROOT):
    return subprocess.run(SNAKEMAKE + list(args), cwd=cwd, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.e2e
def test_smoke_workflow_runs_end_to_end(tmp_path):
    results, data = tmp_path / "results", tmp_path / "data"
    overrides = ["--config", f"results_dir={results}", f"data_dir={data}"]
    done = snakemake("--cores", "2", "--resources", "gpu=1", "--configfile",
                     "workflow/config/smoke.yaml", *overrides)
    assert done.returncode == 0, done.stderr[-3000:]

    table = (results / "tables" / "smoke.md").read_text()
    config = load_yaml(REPO_ROOT / "workflow" / "config" / "smoke.yaml")
    cells = list(iter_cells(config))
    for dataset, arch, method, recipe, seed in cells:
        cell = results / dataset / arch / method / recipe / f"seed{seed}"
        train = read_result(cell / "train.json", "train_result.schema.json")
        assert train["epochs_completed"] == 2
        for ckpt in ("last", "best"):
            ev = read_result(cell / f"eval_{ckpt}.json", "eval_result.schema.json")
            assert ev["autoattack"]["n"] == 20
            assert f"| {recipe} |" in table
    csv_lines = (results / "tables" / "smoke.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 2 * len(cells)

    again = snakemake("--cores", "1", "--configfile", "workflow/config/smoke.yaml", *overrides)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr

    # One cell asked for by its path (here: already there, so nothing runs).
    one = results / "mnist5k/smallcnn-w0.125/nfgsm/nfgsm_mnist/seed0/eval_last.json"
    single = snakemake(str(one), "--cores", "1", "--configfile", "workflow/config/smoke.yaml",
                       *overrides)
    assert single.returncode == 0


@pytest.mark.parametrize("name", ["paper.yaml", "ablations.yaml", "default.yaml"])
def test_dry_run_lists_every_cell(name):
    config = load_yaml(REPO_ROOT / "workflow" / "config" / name)
    n_cells = len(list(iter_cells(config)))
    n_ckpt = len(config["evaluation"].get("checkpoints", ["last"]))
    dry = snakemake("-n", "--cores", "1", "--configfile", f"workflow/config/{name}",
                    "--config", "results_dir=/nonexistent/advrepro-dry")
    assert dry.returncode == 0, dry.stderr[-3000:]
    out = dry.stdout + dry.stderr
    assert "Using workflow specific profile profiles/default" in out  # rerun-triggers etc.
    counts = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] in ("train", "evaluate", "prepare_data"):
            counts[parts[0]] = int(parts[1])
    assert counts["train"] == n_cells
    assert counts["evaluate"] == n_cells * n_ckpt


def test_a_recipe_under_the_wrong_method_path_is_refused(tmp_path):
    bad = tmp_path / "mnist5k/smallcnn-w0.5/pgd_at/nfgsm_mnist/seed0/train.json"
    dry = snakemake(str(bad), "-n", "--cores", "1", "--config", f"results_dir={tmp_path}")
    assert dry.returncode != 0
    assert "is method 'nfgsm', not 'pgd_at'" in dry.stdout + dry.stderr
