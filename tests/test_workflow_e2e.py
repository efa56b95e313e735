"""End to end: the Snakemake workflow on the smoke config, and dry runs of the big configs."""
import copy
import subprocess
import sys

import pytest
import yaml

from methods.config import REPO_ROOT, iter_cells, load_yaml
from methods.results import read_result

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(*args, cwd=REPO_ROOT):
    return subprocess.run(SNAKEMAKE + list(args), cwd=cwd, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.e2e
def test_smoke_workflow_runs_end_to_end(smoke_run, tmp_path):
    # The run itself is the session fixture tests/conftest.py:smoke_run (shared with test_report).
    results, overrides, done = smoke_run.results, smoke_run.overrides, smoke_run.done
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

    check_identities(config, cells, results, overrides, tmp_path)


def planned_jobs(output: str) -> dict:
    """Job counts from Snakemake's dry-run summary table ("train    4")."""
    counts = {}
    for line in output.splitlines():
        parts = line.split()
        if (len(parts) == 2 and parts[1].isdigit() and parts[0].isidentifier()
                and parts[0] != "total"):
            counts[parts[0]] = int(parts[1])
    return counts


def dry_run(config: dict, tmp_path, name: str, overrides) -> dict:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    done = snakemake("-n", "--cores", "1", "--configfile", str(path), *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    return planned_jobs(done.stdout + done.stderr)


def check_identities(config, cells, results, overrides, tmp_path):
    """Evaluation settings re-evaluate without retraining; training settings retrain."""
    n_evals = 2 * len(cells)
    trained = {c: (results / c[0] / c[1] / c[2] / c[3] / f"seed{c[4]}" / "train.json") for c in cells}
    mtimes = {c: p.stat().st_mtime_ns for c, p in trained.items()}

    # A new attack (same PGD at another eps: its own column) and another AutoAttack subset size.
    evaluated = copy.deepcopy(config)
    extra = {"name": "pgd", "steps": 3, "alpha": 0.1, "restarts": 1, "eps": 0.2}
    evaluated["evaluation"]["attacks"].append(extra)
    evaluated["evaluation"]["autoattack"]["n"] = 16
    plan = dry_run(evaluated, tmp_path, "more_attacks", overrides)
    assert "train" not in plan and plan["evaluate"] == n_evals and plan["aggregate"] == 1, plan
    path = tmp_path / "more_attacks.yaml"
    done = snakemake("--cores", "2", "--resources", "gpu=1", "--configfile", str(path), *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {c: p.stat().st_mtime_ns for c, p in trained.items()} == mtimes, "nothing retrained"
    for c, p in trained.items():
        ev = read_result(p.parent / "eval_last.json", "eval_result.schema.json")
        assert ev["autoattack"]["n"] == 16
        pgd_columns = [k for k in ev["metrics"] if k.startswith("PGD-3-")]
        assert len(pgd_columns) == 2, ev["metrics"].keys()   # two eps, two columns

    # A note or a published-row link: only the tables that show annotations (and their pages).
    noted = copy.deepcopy(evaluated)
    noted["recipe_overrides"] = {**noted.get("recipe_overrides", {}), "notes": "edited note"}
    plan = dry_run(noted, tmp_path, "noted", overrides)
    assert set(plan) <= {"aggregate", "paper_tables", "report_tables_html", "all"}, plan
    assert plan.get("aggregate") == 1 and plan.get("paper_tables") == 1, plan

    # Where jobs run: nothing.
    moved = copy.deepcopy(evaluated)
    moved["threads"], moved["meter"] = 2, "fake"
    assert set(dry_run(moved, tmp_path, "moved", overrides)) <= {"all"}

    # A training setting: every cell retrains (and so re-evaluates).
    longer = copy.deepcopy(evaluated)
    longer["recipe_overrides"]["train"]["epochs"] = 3
    plan = dry_run(longer, tmp_path, "longer", overrides)
    assert plan["train"] == len(cells) and plan["evaluate"] == n_evals, plan


@pytest.mark.parametrize("name", ["paper.yaml", "ablations.yaml", "default.yaml", "iada_grid.yaml",
                                  "mnist5k_comparisons.yaml"])
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
