"""Microbenchmarks: outputs, pass arithmetic, ratio definitions (with a fake clock), the plot.

No timing is asserted: the clock is replaced by a fake whose every interval is exactly 1 s, so
each ratio is a known number determined by the pass counts alone.
"""
import json

import pytest
import yaml

from methods import bench
from methods.config import ConfigError, REPO_ROOT, resolve_cell
from methods.cost_plot import plot_cost_vs_robustness, training_cost
from methods.results import write_result

B, K = 16, 3   # batch size; PGD steps of the pgd recipe


class FakeClock:
    """Every call is 1 s after the previous one, so every timed interval is exactly 1 s."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1.0
        return self.t


def tiny_config(tmp_path, **extra):
    cfg = {
        "datasets": {"mnist5k": {"source": "mnist5k"}},
        "dataset": "mnist5k",
        "recipes": {
            "base": {"method": "standard", "threat": {"norm": "linf", "eps": 0.3},
                     "normalization": "none", "augmentation": "none",
                     "train": {"epochs": 3, "batch_size": 64, "optimizer": {"name": "adam", "lr": 1e-3},
                               "schedule": {"name": "cyclic", "peak_at": 0.4}}},
            "pgd": {"extends": "base", "method": "pgd_at", "method_args": {"steps": K, "alpha": 0.1}},
            "sat": {"extends": "base", "method": "selective",
                    "method_args": {"rho": 0.25, "steps": 2, "alpha": 0.1, "warmup_epochs": 2}},
            "bb": {"extends": "base", "method": "bb",
                   "method_args": {"m": 2, "selection": "none", "init": "tlhs", "regenerate": "epoch"}},
        },
        "bench": ["base", "pgd", "sat", "bb", {"recipe": "base", "name": "base_x2", "batch_scale": 2}],
        "archs": {"smallcnn-tiny": {"model": "smallcnn", "width": 0.125}},
        "batch_size": B, "warmup_steps": 1, "repeats": 3, "threads": [1], "device": "cpu",
        "targets": [
            {"name": "overhead", "kind": "overhead", "max": 0.9},
            {"name": "pgd_vs_base", "kind": "step_ratio", "numerator": "pgd", "denominator": "base",
             "max": 1.05},
            {"name": "x2_epoch", "kind": "epoch_ratio", "numerator": "base_x2", "denominator": "base",
             "max": 0.4},
        ],
        "plot": {"results_glob": str(tmp_path / "results" / "**" / "eval_last.json"), "published": []},
        **extra,
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "out"
    summary = bench.run_bench(tiny_config(tmp), out, clock=FakeClock())
    return summary, out


def test_outputs_exist_and_json_has_the_fields(bench_run):
    summary, out = bench_run
    for name in ("bench.json", "cost_table.md", "cost_table.csv", "cost_vs_robustness.png"):
        assert (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "bench.json").read_text())
    assert set(on_disk["machine"]) >= {"cpu_model", "usable_cpus", "torch", "device"}
    r = on_disk["results"]["pgd@smallcnn-tiny@t1"]
    assert r["threads"] == 1 and r["batch_size"] == B and r["epoch"] == 2
    for field in ("step_time_s", "passes_per_step", "unit_costs", "predicted_step_s",
                  "overhead_ratio", "memory"):
        assert field in r, field
    assert set(r["step_time_s"]) >= {"median", "q25", "q75", "iqr"} and r["step_time_s"]["n"] == 3
    assert on_disk["plot"]["points"] == 0   # no run results: the plot says so
    assert "| pgd | pgd_at | smallcnn-tiny | 1 | 16 |" in (out / "cost_table.md").read_text()


def test_pgd_k_spends_k_plus_1_forward_backward_passes_per_sample(bench_run):
    r = bench_run[0]["results"]["pgd@smallcnn-tiny@t1"]
    assert r["passes_per_step_total"] == {"forward": (K + 1) * B, "backward": (K + 1) * B}
    assert r["passes_per_step"] == {"attack": {"forward": K * B, "backward": K * B},
                                    "train": {"forward": B, "backward": B}}
    assert bench.UNIT_PHASE not in r["passes_per_step"]


def test_fake_clock_gives_exact_overhead_ratios(bench_run):
    # Every interval is 1 s, so t_fb = t_f = 1/B per sample and predicted = forward passes / B.
    results = bench_run[0]["results"]
    assert results["base@smallcnn-tiny@t1"]["overhead_ratio"] == pytest.approx(1.0, rel=1e-12)
    pgd = results["pgd@smallcnn-tiny@t1"]
    assert pgd["predicted_step_s"] == pytest.approx(K + 1, rel=1e-12)
    assert pgd["overhead_ratio"] == pytest.approx(1 / (K + 1), rel=1e-12)


def test_epoch_dependent_methods_are_benched_in_steady_state(bench_run):
    results = bench_run[0]["results"]
    sat = results["sat@smallcnn-tiny@t1"]   # after warm-up: margin selection costs one forward
    k = int(0.25 * B)
    assert sat["passes_per_step"] == {"selection": {"forward": B, "backward": 0},
                                      "attack": {"forward": 2 * k, "backward": 2 * k},
                                      "train": {"forward": k + B, "backward": k + B}}
    assert sat["overhead_ratio"] == pytest.approx(B / (B + 2 * k + k + B), rel=1e-12)
    bb = results["bb@smallcnn-tiny@t1"]     # tLHS drawn in the warm-up step, reused afterwards
    assert bb["method_stats"]["bb_noise_redrawn"] == 0.0
    assert bb["passes_per_step_total"] == {"forward": 4 * B, "backward": 4 * B}


def test_targets_are_ratios_of_medians_marked_against_max(bench_run):
    rows = {(t["target"], t["subject"]): t for t in bench_run[0]["targets"]}
    assert rows[("pgd_vs_base", "pgd")]["value"] == pytest.approx(1.0)
    assert rows[("pgd_vs_base", "pgd")]["pass"]
    assert rows[("pgd_vs_base", "pgd")]["arithmetic"] == pytest.approx(K + 1)   # (K+1)B vs B passes
    assert rows[("x2_epoch", "base_x2")]["arithmetic"] == pytest.approx(1.0)    # same passes per sample
    assert rows[("x2_epoch", "base_x2")]["value"] == pytest.approx(0.5)   # same step, twice the batch
    assert not rows[("x2_epoch", "base_x2")]["pass"]
    assert not rows[("overhead", "base")]["pass"] and rows[("overhead", "pgd")]["pass"]
    assert rows[("overhead", "base")]["max"] == 0.9


def test_predicted_time_weights_forward_only_passes_by_the_forward_cost():
    passes = {"attack": {"forward": 48, "backward": 48}, "selection": {"forward": 16, "backward": 0},
              "train": {"forward": 20, "backward": 20}}
    p = bench.predicted_step_time(passes, t_fb=2e-3, t_f=0.5e-3)
    assert p["selection"] == pytest.approx(16 * 0.5e-3)
    assert p["total"] == pytest.approx(68 * 2e-3 + 16 * 0.5e-3)


def test_unknown_target_reference_names_the_target():
    results = {"a@x@t1": {"bench": "a", "arch": "x", "threads": 1, "batch_size": 4,
                          "step_time_s": {"median": 1.0, "q25": 1.0, "q75": 1.0}}}
    with pytest.raises(ConfigError, match=r"targets\[0\] \(r\).*unknown"):
        bench.evaluate_targets([{"name": "r", "kind": "step_ratio", "numerator": "a",
                                 "denominator": "nope", "max": 1}], results)


def test_default_bench_config_resolves_every_entry_and_target():
    resolving, settings = bench.load_bench_config(REPO_ROOT / "workflow/config/bench.yaml")
    names = {e["name"] for e in settings["benches"]}
    assert {"pgd10_mnist", "sat_margin_pgd10_mnist", "nfgsm_mnist_x5", "bb_gs_mnist"} <= names
    methods = set()
    for arch in settings["archs"]:
        for e in settings["benches"]:
            methods.add(resolve_cell(resolving, settings["dataset"], arch, e["recipe"], 0)["method"])
    from methods.registry import METHODS
    assert methods == set(METHODS.names()), "every registered method is benched"
    for t in settings["targets"]:
        refs = [t.get("denominator")] + (t["numerator"] if isinstance(t.get("numerator"), list)
                                         else [t.get("numerator")])
        assert set(r for r in refs if r) <= names, t["name"]


# ----------------------------------------------------------------------------- the plot
def _cell(recipe, published_rows=()):
    return {"dataset": {"name": "mnist5k", "source": "mnist5k"},
            "arch": {"name": "smallcnn-w0.5", "model": "smallcnn", "width": 0.5},
            "recipe": recipe, "method": "nfgsm", "threat": {"norm": "linf", "eps": 0.3},
            "train": {"epochs": 1}, "evaluation": {}, "seed": 0, "config_hash": "0" * 64,
            "published": {"rows": list(published_rows)}}


def _provenance():
    return {"config_hash": "0" * 64, "git": {"commit": None}, "python": "3.11",
            "packages": {"torch": "2.14.1", "pyautoattack": None}, "device": {"type": "cpu"},
            "seed": 0, "wall_s": 1.0}


def _acc(acc, n=100):
    return {"acc": acc, "ci95": [max(0.0, acc - 0.1), min(1.0, acc + 0.1)], "correct": int(acc * n), "n": n}


def write_cell_results(root, recipe, cpu_s, gpu_s=None, gpu_j=None, pgd=0.5, aa=None,
                       published_rows=()):
    d = root / "results" / recipe
    cell = _cell(recipe, published_rows)
    window = {"name": "train", "path": "run/train", "wall_s": cpu_s, "cpu_s": cpu_s, "gpu_s": gpu_s,
              "gpu_energy_j": gpu_j, "cpu_energy_j": None}
    write_result(d / "train.json", {
        "kind": "train", "cell": cell, "method": {"name": "nfgsm", "paper": ""}, "data": {},
        "history": [{"epoch": 0, "train_loss": 1.0, "clean_acc": 0.9, "pgd_acc": 0.5,
                     "catastrophic_overfitting": False, "passes": {}, "skipped_steps": 0}],
        "epochs_completed": 1, "monitor": {},
        "checkpoints": {"last": {"file": "x", "epoch": 0},
                        "best": {"file": "x", "epoch": 0, "selected_by": "monitor"}},
        "catastrophic_overfitting": {"detected": False, "epochs": []},
        "passes": {"by_phase": {}, "total": {"forward": 1, "backward": 1}, "per_example": {}},
        "measurement": {"backend": "null", "records": [window], "previous_sessions": []},
        "provenance": _provenance()}, "train_result.schema.json")
    metrics = {"clean": _acc(0.9), "PGD-10-1": {**_acc(pgd + 0.1), "attack": {"name": "pgd", "steps": 10}},
               "PGD-50-10": {**_acc(pgd), "attack": {"name": "pgd", "steps": 50, "restarts": 10}}}
    autoattack = None if aa is None else {**_acc(aa), "indices": [0], "package": "autoattack",
                                          "package_version": "0.2", "version": "standard",
                                          "warnings": []}
    write_result(d / "eval_last.json", {
        "kind": "evaluate", "cell": cell, "checkpoint": {"name": "last", "epoch": 0},
        "threat": {"norm": "linf", "eps": 0.3}, "metrics": metrics, "autoattack": autoattack,
        "guards": {"eval_mode": True, "buffers_unchanged": True, "inputs_in_unit_box": True},
        "measurement": {"backend": "null", "records": []}, "provenance": _provenance()},
        "eval_result.schema.json")


def test_plot_uses_cpu_seconds_without_gpu_and_overlays_published_times(tmp_path):
    csv = tmp_path / "published.csv"
    csv.write_text("paper,dataset,method,eps,attack,metric,value,source\n"
                   "P,MNIST,N-FGSM,0.3,n/a,training time (minutes),2,s\n"
                   "P,MNIST,N-FGSM,0.3,PGD-50,robust accuracy (%),88.5,s\n"
                   "P,MNIST,N-FGSM,0.3,n/a,clean accuracy (%),98,s\n")
    write_cell_results(tmp_path, "a", cpu_s=100.0, gpu_s=3.0, gpu_j=50.0, aa=0.4,
                       published_rows=[{"paper": "P", "method": "N-FGSM"}])
    write_cell_results(tmp_path, "b", cpu_s=300.0, pgd=0.6)
    spec = {"results_glob": str(tmp_path / "results/**/eval_last.json"), "published": [str(csv)]}
    shown = plot_cost_vs_robustness(spec, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
    assert shown["points"] == 2 and shown["published_points"] == 1
    assert shown["time_axis"].startswith("training cost (CPU seconds")   # b has no GPU reading
    assert shown["energy_axis"] is None
    a = next(r for r in shown["rows"] if r["recipe"] == "a")
    assert a["pgd_label"] == "PGD-50-10" and a["pgd_acc"] == 0.5 and a["autoattack_acc"] == 0.4


def test_plot_uses_gpu_seconds_and_joules_when_every_result_has_them(tmp_path):
    write_cell_results(tmp_path, "a", cpu_s=100.0, gpu_s=3.0, gpu_j=50.0)
    write_cell_results(tmp_path, "b", cpu_s=300.0, gpu_s=9.0, gpu_j=150.0)
    shown = plot_cost_vs_robustness({"results_glob": str(tmp_path / "results/**/eval_last.json")},
                                    tmp_path / "plot.png")
    assert shown["time_axis"] == "training cost (GPU-seconds)"
    assert shown["energy_axis"] == "training energy (GPU joules)"
    assert shown["published_points"] == 0


def test_resumed_training_cost_adds_the_earlier_sessions_epochs():
    w = lambda path, s: {"name": path.split("/")[-1], "path": path, "wall_s": s, "cpu_s": s,
                         "gpu_s": None, "gpu_energy_j": None, "cpu_energy_j": None}
    train = {"measurement": {"records": [w("run/train/epoch_002", 5.0), w("run/train", 6.0),
                                         w("run", 7.0)],
                             "previous_sessions": [w("run/train/epoch_000", 4.0),
                                                   w("run/train/epoch_001", 4.5)]}}
    cost = training_cost(train)
    assert cost["cpu_s"] == pytest.approx(14.5) and cost["gpu_s"] is None
