"""Ablation and diagnostic plots (methods/plots.py): every declared file is written, the CSVs
hold the points a direct computation gives (seed means, t-intervals, CO flags, costs), a run
without data still draws every figure saying what is missing, the claims intervals draw a
not-run row and an equivalence margin, and nothing imports torch."""
import json
import math
import subprocess
import sys

import pandas as pd
import pytest
from scipy.stats import t

from methods.claims import CSV_COLUMNS
from methods.cli import main
from methods.config import REPO_ROOT, config_hash
from methods.plot_data import load_points, seed_stats
from methods.plots import COLUMNS, PLOTS, plot_files, render, save, write_plots
from methods.results import write_result
from tests.test_masking_report import record

N = 1000
PGD40 = {"name": "pgd", "steps": 40, "alpha": 0.01}
MONITOR_CLEAN = (0.5, 0.8, 0.9)


# ----------------------------------------------------------------------------- fake results
def train_record(cell, monitor_pgd, co_epoch=None, cpu_s=10.0, fwd_bwd=(2.0, 1.0)):
    """A train.json: per-epoch monitor (clean MONITOR_CLEAN, PGD ``monitor_pgd``), CO flagged at
    ``co_epoch``, ``fwd_bwd`` passes per example, a 'train' window of ``cpu_s`` CPU seconds."""
    history = [{"epoch": e, "train_loss": 1.0, "clean_acc": c, "pgd_acc": p,
                "catastrophic_overfitting": e == co_epoch, "passes": {}, "skipped_steps": 0,
                "examples": 100} for e, (c, p) in enumerate(zip(MONITOR_CLEAN, monitor_pgd))]
    window = {"name": "train", "path": "run/train", "wall_s": cpu_s, "cpu_s": cpu_s,
              "gpu_s": None, "gpu_energy_j": None, "cpu_energy_j": None}
    return {"kind": "train", "cell": cell, "method": {"name": cell["method"], "paper": ""},
            "data": {}, "history": history, "epochs_completed": len(history), "monitor": {},
            "checkpoints": {"last": {"file": "x", "epoch": 2},
                            "best": {"file": "x", "epoch": 2, "selected_by": "monitor"}},
            "catastrophic_overfitting": {"detected": co_epoch is not None,
                                         "epochs": [] if co_epoch is None else [co_epoch]},
            "passes": {"by_phase": {}, "total": {"forward": 1, "backward": 1},
                       "per_example": {"forward": fwd_bwd[0], "backward": fwd_bwd[1]}},
            "measurement": {"backend": "null", "records": [window], "previous_sessions": []},
            "provenance": {"train_hash": cell["train_hash"], "git": {"commit": None},
                           "python": "3.11", "packages": {"torch": "2", "pyautoattack": None},
                           "device": {"type": "cpu"}, "seed": cell["seed"], "wall_s": cpu_s}}


def write_cell(root, recipe, method, seed, pgd, *, eps=0.1, fgsm=None, method_args=None,
               co_epoch=None, cpu_s=10.0, fwd_bwd=(2.0, 1.0)):
    """Evaluation (``pgd`` / ``fgsm`` correct of N on mnist5k / smallcnn-w0.5) and train.json of
    one cell; the evaluation record is tests.test_masking_report's."""
    ev = record(recipe, 900, [({"name": "fgsm"}, fgsm if fgsm is not None else pgd + 50),
                              (PGD40, pgd)], n=N, eps=eps, source="mnist5k", seed=seed)
    cell = ev["cell"]
    cell.update(method=method, method_args=method_args or {},
                arch={"name": "smallcnn-w0.5", "model": "smallcnn", "width": 0.5})
    cell["train_hash"] = config_hash({k: v for k, v in cell.items() if k != "train_hash"})
    ev["provenance"]["train_hash"] = cell["train_hash"]
    out = root / f"{recipe}-s{seed}"
    write_result(out / "eval_last.json", ev, "eval_result.schema.json")
    monitor = (0.3, 0.05, 0.02) if co_epoch is not None else (0.3, 0.4, 0.5)
    write_result(out / "train.json", train_record(cell, monitor, co_epoch, cpu_s, fwd_bwd),
                 "train_result.schema.json")
    return out / "eval_last.json"


#: fgsm_rs PGD correct (of N) by training eps and seed; seed 1 at eps 0.3 overfits.
FGSM_RS = {0.1: (800, 820, 790), 0.2: (600, 640, 610), 0.3: (300, 20, 280)}
NFGSM = {0.1: (810, 805, 815), 0.2: (700, 690, 720)}


def claims_csv(path):
    rows = [
        {"claim_id": "C1", "seed_paper": "P", "claim": "a beats b", "test_id": "t1",
         "test": "N-FGSM vs FGSM-RS", "context": "mnist5k / smallcnn-w0.5 / eps 0.3",
         "side_a": "nfgsm", "side_b": "fgsm_rs", "metric": "PGD", "n_seeds": 3,
         "values_a": "[80, 82, 81]", "values_b": "[30, 2, 28]", "diff_mean": 51.0,
         "ci_low": 20.0, "ci_high": 82.0, "margin": "", "direction": "greater",
         "verdict": "holds", "reason": ""},
        {"claim_id": "C2", "seed_paper": "P", "claim": "a matches b", "test_id": "t1",
         "test": "BB vs N-FGSM", "context": "mnist5k", "side_a": "bb", "side_b": "nfgsm",
         "metric": "PGD", "n_seeds": 3, "values_a": "[80, 81, 79]", "values_b": "[81, 80, 80]",
         "diff_mean": -0.333, "ci_low": -2.0, "ci_high": 1.3, "margin": 2.0,
         "direction": "equivalent", "verdict": "inconclusive", "reason": "CI beyond margin"},
        {"claim_id": "C3", "seed_paper": "Q", "claim": "AA", "test_id": "t2",
         "test": "mixup vs standard under AutoAttack", "context": "mnist5k", "side_a": "mixup",
         "side_b": "standard", "metric": "AutoAttack", "n_seeds": 0, "values_a": "[]",
         "values_b": "[]", "diff_mean": "", "ci_low": "", "ci_high": "", "margin": "",
         "direction": "greater", "verdict": "not run",
         "reason": "not run: no cells of mixup in this run "
                   "(workflow/config/claims.yaml runs them)"},
    ]
    pd.DataFrame(rows, columns=CSV_COLUMNS).to_csv(path, index=False)   # claims.py's columns
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    paths = []
    for eps, counts in FGSM_RS.items():
        for seed, c in enumerate(counts):
            recipe = "fgsm_rs_mnist" + ("" if eps == 0.1 else f"-eps{eps}")
            paths.append(write_cell(root, recipe, "fgsm_rs", seed, c, eps=eps,
                                    method_args={"alpha_ratio": 1.25},
                                    co_epoch=1 if (eps, seed) == (0.3, 1) else None,
                                    cpu_s=10.0 + seed, fwd_bwd=(2.0, 2.0)))
    for eps, counts in NFGSM.items():
        for seed, c in enumerate(counts):
            recipe = "nfgsm_mnist" + ("" if eps == 0.1 else f"-eps{eps}")
            paths.append(write_cell(root, recipe, "nfgsm", seed, c, eps=eps))
    for eps in (0.1, 0.2):   # differs from nfgsm_mnist in attack_mode too: a line of its own
        paths.append(write_cell(root, f"nfgsm_evalmode-{eps}", "nfgsm", 0, 500, eps=eps,
                                method_args={"attack_mode": "eval"}))
    bb = [("bb_m1", {"m": 1}, 700), ("bb_m5", {}, 750), ("bb_cp", {"selection": "cp"}, 720),
          ("bb_same_as_m5", {"m": 5, "selection": "gs"}, 10)]     # same identity as bb_m5
    for recipe, args, c in bb:
        paths.append(write_cell(root, recipe, "bb", 0, c, method_args=args))
    for recipe, rho, c in (("sat", 0.25, 650), ("sat-rho0.5", 0.5, 680)):
        paths.append(write_cell(root, recipe, "selective", 0, c, method_args={"rho": rho}))
    paths.append(write_cell(root, "pgd40_mnist", "pgd_at", 0, 690, fwd_bwd=(41.0, 41.0)))
    out = root / "out"
    written = write_plots(paths, claims_csv(root / "claims.csv"), out)
    csv = {name: pd.read_csv(out / f"{name}.csv") for name in PLOTS}
    return {"root": root, "paths": paths, "out": out, "written": written, "csv": csv}


# ----------------------------------------------------------------------------- the files
def test_every_declared_file_is_written_and_is_what_its_suffix_says(run):
    assert run["written"] == plot_files(run["out"])
    assert [p.name for p in plot_files(run["out"])][:3] == [
        "train_eps_sweep.png", "train_eps_sweep.pdf", "train_eps_sweep.csv"]
    assert len(run["written"]) == 3 * len(PLOTS) == 18
    for path in run["written"]:
        data = path.read_bytes()
        magic = {".png": b"\x89PNG\r\n\x1a\n", ".pdf": b"%PDF-"}.get(path.suffix)
        assert data[:len(magic)] == magic if magic else data.startswith(b",".join(
            c.encode() for c in COLUMNS[path.stem][:2])), path
    assert not list(run["out"].glob(".*tmp*"))


# ----------------------------------------------------------------------------- the points
def test_train_eps_sweep_points_are_seed_means_with_t_intervals_and_co_flags(run):
    sweep = run["csv"]["train_eps_sweep"]
    fgsm_rs = sweep[(sweep.method == "fgsm_rs") & (sweep.attack == "PGD")].sort_values("x")
    assert list(fgsm_rs.x) == [0.1, 0.2, 0.3]
    for (_, row), (eps, counts) in zip(fgsm_rs.iterrows(), FGSM_RS.items()):
        values = [100 * c / N for c in counts]
        mean = sum(values) / 3
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
        half = t.ppf(0.975, 2) * sd / math.sqrt(3)
        assert row.acc_mean_pct == pytest.approx(mean)
        assert (row.acc_ci_low_pct, row.acc_ci_high_pct) == pytest.approx((mean - half,
                                                                           mean + half))
        assert row.n_seeds == 3 and row.co_seeds == (1 if eps == 0.3 else 0)
        assert row.attack_label == "PGD-40-1-alpha=0.01"
    fgsm = sweep[(sweep.method == "fgsm_rs") & (sweep.attack == "FGSM")].sort_values("x")
    assert list(fgsm.acc_mean_pct) == pytest.approx([100 * (sum(c) / 3 + 50) / N
                                                     for c in FGSM_RS.values()])
    lines = set(sweep[sweep.method == "nfgsm"].line)
    assert lines == {"nfgsm, attack_mode=train", "nfgsm, attack_mode=eval"}
    evalmode = sweep[(sweep.line == "nfgsm, attack_mode=eval") & (sweep.attack == "PGD")]
    assert list(evalmode.n_seeds) == [1, 1] and evalmode.acc_ci_low_pct.isna().all()
    assert set(sweep.method) == {"fgsm_rs", "nfgsm"}   # no eps sweep of bb, selective, pgd_at


def test_bb_and_selective_ablations_with_their_reference_lines(run):
    bb = run["csv"]["bb_ablation"]
    m = bb[bb.panel == "m"].sort_values("x")
    assert list(m.x.astype(float)) == [1.0, 5.0] and set(m.line) == {"gs"}
    # bb_m5 and bb_same_as_m5 are one training identity: the first recipe in name order stands
    assert list(m.acc_mean_pct) == pytest.approx([70.0, 75.0]) and list(m.recipes)[1] == "bb_m5"
    sel = bb[bb.panel == "selection rule"]
    assert list(sel.x) == ["gs", "cp"] and list(sel.acc_mean_pct) == pytest.approx([75.0, 72.0])
    ref = bb[bb.panel == "reference (m)"]
    assert list(ref.recipes) == ["nfgsm_evalmode-0.1", "nfgsm_mnist"]   # eps 0.1 only
    assert ref.acc_mean_pct.iloc[1] == pytest.approx(100 * sum(NFGSM[0.1]) / 3 / N)
    sat = run["csv"]["selective_ablation"]
    rho = sat[sat.panel == "rho"]
    assert list(rho.x) == [0.25, 0.5] and set(rho.line) == {"margin"}
    assert list(rho.acc_mean_pct) == pytest.approx([65.0, 68.0])
    assert set(sat.panel) == {"rho", "reference (rho)"}
    assert sat[sat.panel == "reference (rho)"].recipes.tolist() == ["pgd40_mnist"]


def test_monitor_curves_and_cost_points(run):
    mon = run["csv"]["monitor_curves"]
    assert len(mon) == 3 * len(run["paths"])                    # three epochs per cell
    co = mon[mon.co]
    assert list(zip(co.recipe, co.seed, co.epoch)) == [("fgsm_rs_mnist-eps0.3", 1, 1)]
    assert co.pgd_acc_pct.iloc[0] == pytest.approx(5.0)
    cost = run["csv"]["cost_vs_robustness"]
    row = cost[cost.recipe == "fgsm_rs_mnist"].iloc[0]
    assert row.passes_mean == 4.0 and row.time_field == "cpu_s"
    assert row.time_mean == pytest.approx(11.0)                # cpu_s 10, 11, 12 over seeds
    assert row.acc_mean_pct == pytest.approx(100 * sum(FGSM_RS[0.1]) / 3 / N)
    assert cost.energy_field.isna().all() and (cost.metric != "AutoAttack").all()
    assert cost[cost.recipe == "pgd40_mnist"].passes_mean.iloc[0] == 82.0


def test_claims_drawn_as_intervals_with_margin_and_a_not_run_text_row(run):
    claims = run["csv"]["claims_intervals"]
    assert list(claims.drawn) == ["interval", "interval", "text"]
    assert list(claims.verdict) == ["holds", "inconclusive", "not run"]
    assert claims.margin.iloc[1] == 2.0 and claims.diff_mean.iloc[0] == 51.0
    shown = render("claims_intervals", [], run["root"] / "claims.csv")
    ax = shown.fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert any(t.startswith("not run: no cells of mixup") for t in texts)
    assert len(ax.collections) >= 1                           # the shaded +-margin band
    shown.fig.clf()


# ----------------------------------------------------------------------------- no data
def test_an_empty_run_writes_every_file_saying_what_is_missing(tmp_path):
    """Through the CLI contract (``python -m methods plots`` with no --evals)."""
    out = tmp_path / "a"
    assert main(["plots", "--claims-csv", str(tmp_path / "no_claims.csv"),
                 "--out-dir", str(out)]) == 0
    for path in plot_files(out):
        assert path.stat().st_size > 0
        if path.suffix == ".csv":
            frame = pd.read_csv(path)
            assert frame.empty and list(frame.columns) == COLUMNS[path.stem]
    expected = {"train_eps_sweep": "workflow/config/claims.yaml",
                "bb_ablation": "no BB m sweep in this run: workflow/config/ablations.yaml",
                "selective_ablation": "no Selective AT rho sweep in this run",
                "monitor_curves": "no train.json", "cost_vs_robustness": "no evaluation",
                "claims_intervals": "no claims table"}
    for name in PLOTS:
        shown = render(name, [], tmp_path / "no_claims.csv")
        drawn = " ".join(t.get_text().replace("\n", " ") for ax in shown.fig.axes
                         for t in ax.texts)
        assert shown.missing and all(" ".join(m.split()) in " ".join(drawn.split())
                                     for m in shown.missing), name
        assert any(expected[name] in m for m in shown.missing), (name, shown.missing)
        assert shown.rows == []
        if name == "monitor_curves":          # re-running gives the same bytes
            save(shown, tmp_path / "b", name)
            for suffix in (".png", ".pdf"):
                assert (out / f"{name}{suffix}").read_bytes() == \
                    (tmp_path / "b" / f"{name}{suffix}").read_bytes(), suffix
        shown.fig.clf()


def test_seed_stats_and_an_eval_without_train_json_is_left_out(tmp_path):
    assert seed_stats([5.0])["ci_low"] != seed_stats([5.0])["ci_low"]   # NaN for one seed
    assert seed_stats([None, 4.0, 6.0])["mean"] == 5.0
    path = write_cell(tmp_path, "x", "standard", 0, 100)
    (path.parent / "train.json").unlink()
    assert load_points([path]) == []


def test_claims_csv_missing_a_column_is_an_error_naming_it(tmp_path):
    bad = tmp_path / "claims.csv"
    bad.write_text("claim_id,test_id\nC1,t1\n")
    with pytest.raises(ValueError, match=r"claims CSV .*claims.csv.*diff_mean"):
        render("claims_intervals", [], bad)


# ----------------------------------------------------------------------------- layering, CLI
def test_plots_import_no_torch_nor_the_stages():
    code = ("import sys, json, methods.plots, methods.plot_data, methods.results, "
            "methods.declared, methods.cli; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' "
            "or m.startswith('torch.') or m in ('methods.training', 'methods.evaluation', "
            "'methods.attacks'))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
