"""Microbenchmarks: outputs, pass arithmetic, ratio definitions (with fake clocks), the plot.

No timing is asserted.  Two fake clocks make every ratio a known number:

* :class:`FakeClock`: every call is 1 s after the previous one, so every timed interval is 1 s
  whatever it did, and the ratios follow from the pass counts alone;
* :class:`RowClock`: time advances only inside the model, by a cost that grows faster than the
  rows of the call (so a per-sample cost at B is *not* the per-sample cost at 5B); a step's
  time is then exactly the sum of its passes' costs, and pricing each pass at its own row count
  must predict it exactly (overhead ratio 1).
"""
import json

import pytest
import torch
import yaml

from methods import bench
from methods.bench_tables import evaluate_targets
from methods.config import ConfigError, REPO_ROOT, load_yaml, resolve_cell
from methods.cost_plot import plot_cost_vs_robustness, training_cost
from methods.models.core import NormalizedModel
from methods.results import validate, write_result

B, K = 16, 3   # batch size; PGD steps of the pgd recipe


class FakeClock:
    """Every call is 1 s after the previous one, so every timed interval is exactly 1 s."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1.0
        return self.t


def fwd_cost(n):
    """Seconds of a forward over n rows under RowClock: per-sample cost grows with n."""
    return 1e-3 * n * (1 + n / B)


def bwd_cost(n):
    return 2 * fwd_cost(n)


class RowClock:
    """Time stands still except inside the model: a forward over n rows adds ``fwd_cost(n)``,
    a backward reaching its output adds ``bwd_cost(n)`` (a global hook on every
    NormalizedModel, so unit-cost passes and step passes are charged alike)."""

    def __init__(self):
        self.t = 0.0
        self.handle = None

    def __call__(self):
        return self.t

    def _on_forward(self, module, inputs, output):
        if not isinstance(module, NormalizedModel):
            return
        n = int(output.shape[0])
        self.t += fwd_cost(n)
        if output.requires_grad:
            def on_backward(grad, n=n):
                self.t += bwd_cost(n)
            output.register_hook(on_backward)

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_hook(self._on_forward)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


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
            "bb5": {"extends": "base", "method": "bb",
                    "method_args": {"m": 5, "selection": "gs", "init": "tlhs", "regenerate": "epoch"}},
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


@pytest.fixture(scope="module")
def row_clock_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_rows")
    config = tiny_config(tmp, bench=["base", "sat", "bb5"], targets=[], repeats=4)
    with RowClock() as clock:
        summary = bench.run_bench(config, tmp / "out", clock=clock)
    return summary["results"]


def test_outputs_exist_and_json_has_the_fields(bench_run):
    summary, out = bench_run
    for name in ("bench.json", "cost_table.md", "cost_table.csv", "cost_vs_robustness.png"):
        assert (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk == summary
    assert set(on_disk["machine"]) >= {"cpu_model", "usable_cpus", "torch", "device"}
    r = on_disk["results"]["pgd@smallcnn-tiny@t1"]
    assert r["threads"] == 1 and r["batch_size"] == B and r["epoch"] == 2
    for field in ("step_time_s", "passes_per_step", "passes_by_rows", "unit_costs",
                  "predicted_step_s", "predicted_by_phase_s", "overhead_ratio", "memory"):
        assert field in r, field
    assert set(r["step_time_s"]) >= {"median", "q25", "q75", "iqr"} and r["step_time_s"]["n"] == 3
    assert on_disk["plot"]["points"] == 0   # no run results: the plot says so
    table = (out / "cost_table.md").read_text()
    assert "| pgd | pgd_at | smallcnn-tiny | 1 | 16 | 16 |" in table
    assert "| pgd | smallcnn-tiny | 1 | 16 |" in table          # its unit-cost row


def test_bench_json_validates_against_its_schema(bench_run):
    summary, out = bench_run
    on_disk = json.loads((out / "bench.json").read_text())
    validate(on_disk, bench.SCHEMA)
    broken = json.loads(json.dumps(on_disk))
    del broken["results"]["pgd@smallcnn-tiny@t1"]["unit_costs"]
    with pytest.raises(ValueError, match="unit_costs"):
        validate(broken, bench.SCHEMA)
    broken = json.loads(json.dumps(on_disk))
    broken["results"]["pgd@smallcnn-tiny@t1"]["unit_costs"]["zero"] = {}
    with pytest.raises(ValueError, match="bench_result.schema.json"):
        validate(broken, bench.SCHEMA)


def test_pgd_k_spends_k_plus_1_forward_backward_passes_per_sample(bench_run):
    r = bench_run[0]["results"]["pgd@smallcnn-tiny@t1"]
    assert r["passes_per_step_total"] == {"forward": (K + 1) * B, "backward": (K + 1) * B}
    assert r["passes_per_step"] == {"attack": {"forward": K * B, "backward": K * B},
                                    "train": {"forward": B, "backward": B}}
    assert r["passes_by_rows"] == {"attack": {str(B): {"forward": K * B, "backward": K * B}},
                                   "train": {str(B): {"forward": B, "backward": B}}}
    assert bench.UNIT_PHASE not in r["passes_per_step"] and r["rows_run"] == [B]


def test_fake_clock_gives_exact_overhead_ratios(bench_run):
    # Every interval is 1 s, so t_fb(n) = t_f(n) = 1/n per sample: predicted = forward calls.
    results = bench_run[0]["results"]
    assert results["base@smallcnn-tiny@t1"]["overhead_ratio"] == pytest.approx(1.0, rel=1e-12)
    pgd = results["pgd@smallcnn-tiny@t1"]
    assert pgd["predicted_step_s"] == pytest.approx(K + 1, rel=1e-12)
    assert pgd["overhead_ratio"] == pytest.approx(1 / (K + 1), rel=1e-12)
    assert pgd["unit_costs"][str(B)]["fwd_bwd_per_sample_s"] == pytest.approx(1 / B)


def test_epoch_dependent_methods_are_benched_in_steady_state(bench_run):
    results = bench_run[0]["results"]
    sat = results["sat@smallcnn-tiny@t1"]   # after warm-up: margin selection costs one forward
    k = int(0.25 * B)
    assert sat["passes_per_step"] == {"selection": {"forward": B, "backward": 0},
                                      "attack": {"forward": 2 * k, "backward": 2 * k},
                                      "train": {"forward": k + B, "backward": k + B}}
    assert sat["passes_by_rows"]["train"] == {str(k): {"forward": k, "backward": k},
                                              str(B): {"forward": B, "backward": B}}
    assert sat["rows_run"] == [k, B] and set(sat["unit_costs"]) == {str(k), str(B)}
    # 1 selection forward, 2 attack steps, 2 training forwards: 5 calls of 1 s each predicted
    assert sat["overhead_ratio"] == pytest.approx(1 / 5, rel=1e-12)
    bb = results["bb@smallcnn-tiny@t1"]     # tLHS drawn in the warm-up step, reused afterwards
    assert bb["method_stats"]["bb_noise_redrawn"] == 0.0
    assert bb["passes_per_step_total"] == {"forward": 4 * B, "backward": 4 * B}
    assert bb["rows_run"] == [2 * B] and set(bb["unit_costs"]) == {str(B), str(2 * B)}


def test_unit_costs_are_measured_at_the_row_counts_each_phase_runs_at(row_clock_run):
    bb = row_clock_run["bb5@smallcnn-tiny@t1"]
    m = 5
    assert bb["passes_by_rows"]["attack"] == {str(m * B): {"forward": m * B, "backward": m * B}}
    assert bb["passes_by_rows"]["selection"] == {str(m * B): {"forward": m * B, "backward": 0}}
    assert {B, m * B} <= {int(n) for n in bb["unit_costs"]}
    assert set(bb["rows_run"]) <= {int(n) for n in bb["unit_costs"]}
    for n, u in bb["unit_costs"].items():   # every unit cost is the cost at its own row count
        n = int(n)
        assert u["fwd_bwd_per_sample_s"] == pytest.approx((fwd_cost(n) + bwd_cost(n)) / n, rel=1e-9)
        assert u["fwd_per_sample_s"] == pytest.approx(fwd_cost(n) / n, rel=1e-9)
    attack = fwd_cost(m * B) + bwd_cost(m * B)           # one batched step over the 5B rows
    assert bb["predicted_by_phase_s"]["attack"] == pytest.approx(attack, rel=1e-9)
    assert bb["predicted_by_phase_s"]["selection"] == pytest.approx(fwd_cost(m * B), rel=1e-9)
    # All of the step's time is model passes, each priced at its own row count: exactly 1.
    for r in row_clock_run.values():
        assert r["overhead_ratio"] == pytest.approx(1.0, rel=1e-9), r["bench"]
    # Priced at B, BB's 5B-row passes would look (1 + 5) / (1 + 1) = 3x as expensive per sample.
    assert bb["overhead_ratio_costs_at_B"] > 1.5
    assert row_clock_run["base@smallcnn-tiny@t1"]["overhead_ratio_costs_at_B"] == pytest.approx(1.0)


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


def test_predicted_time_prices_each_pass_at_its_own_row_count():
    by_rows = {"attack": {80: {"forward": 80, "backward": 80}},
               "selection": {80: {"forward": 80, "backward": 0}},
               "train": {16: {"forward": 16, "backward": 16}, 4: {"forward": 8, "backward": 4}}}
    t_fb, t_f = {80: 3e-3, 16: 2e-3, 4: 5e-3}, {80: 1e-3, 16: 0.5e-3, 4: 1e-3}
    p = bench.predicted_step_time(by_rows, t_fb, t_f)
    assert p["attack"] == pytest.approx(80 * 3e-3)
    assert p["selection"] == pytest.approx(80 * 1e-3)
    assert p["train"] == pytest.approx(16 * 2e-3 + 4 * 5e-3 + 4 * 1e-3)
    assert p["total"] == pytest.approx(p["attack"] + p["selection"] + p["train"])
    fbeq = bench.fwd_bwd_equivalents(by_rows, t_fb, t_f)
    assert fbeq == pytest.approx(80 + 80 / 3 + 16 + 4 + 4 / 5)
    assert bench.rows_run(by_rows) == {4, 16, 80}
    assert bench.step_passes(by_rows)["train"] == {"forward": 24, "backward": 20}


def test_row_batches_slice_and_tile_the_fixed_batch():
    x, y = torch.arange(4.0).view(4, 1, 1, 1), torch.tensor([0, 1, 2, 3])
    rows = bench.RowBatches(x, y, channels_last=False)
    assert rows(2)[1].tolist() == [0, 1]
    xt, yt = rows(10)
    assert yt.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1] and xt.flatten().tolist() == yt.float().tolist()
    assert rows(10)[0] is xt   # built once


def test_unknown_target_reference_names_the_target():
    results = {"a@x@t1": {"bench": "a", "arch": "x", "threads": 1, "batch_size": 4,
                          "step_time_s": {"median": 1.0, "q25": 1.0, "q75": 1.0}}}
    with pytest.raises(ConfigError, match=r"targets\[0\] \(r\).*unknown"):
        evaluate_targets([{"name": "r", "kind": "step_ratio", "numerator": "a",
                           "denominator": "nope", "max": 1}], results)


def test_bench_tables_do_not_import_torch():
    import subprocess
    import sys
    code = ("import sys; import methods.bench_tables; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0


def test_default_bench_config_resolves_every_entry_and_target():
    resolving, settings = bench.load_bench_config(REPO_ROOT / "workflow/config/bench.yaml")
    names = {e["name"] for e in settings["benches"]}
    assert {"pgd10_mnist", "sat_margin_pgd10_mnist", "nfgsm_mnist_x5", "bb_gs_mnist"} <= names
    assert settings["device"] == "cpu"
    methods = set()
    for arch in settings["archs"]:
        for e in settings["benches"]:
            cell = resolve_cell(resolving, settings["dataset"], arch, e["recipe"], 0)
            assert set(cell["runtime"]) == {"amp", "channels_last", "compile"}
            methods.add(cell["method"])
    from methods.registry import METHODS
    assert methods == set(METHODS.names()), "every registered method is benched"
    # A benched cell is the default run's cell (Snakemake fills the schema defaults into it).
    from snakemake.utils import validate as fill_defaults
    run_config = load_yaml(REPO_ROOT / "workflow/config/default.yaml")
    fill_defaults(run_config, str(REPO_ROOT / "workflow/schemas/config.schema.yaml"))
    arch, recipe = "smallcnn-w0.5", "nfgsm_mnist"
    assert (resolve_cell(resolving, settings["dataset"], arch, recipe, settings["seed"])["train_hash"]
            == resolve_cell(run_config, "mnist5k", arch, recipe, 0)["train_hash"])
    for t in settings["targets"]:
        refs = [t.get("denominator")] + (t["numerator"] if isinstance(t.get("numerator"), list)
                                         else [t.get("numerator")])
        assert set(r for r in refs if r) <= names, t["name"]


# ----------------------------------------------------------------------------- the plot
def _cell(recipe):
    return {"dataset": {"name": "mnist5k", "source": "mnist5k"},
            "arch": {"name": "smallcnn-w0.5", "model": "smallcnn", "width": 0.5},
            "recipe": recipe, "method": "nfgsm", "method_args": {},
            "threat": {"norm": "linf", "eps": 0.3}, "train": {"epochs": 1}, "seed": 0,
            "runtime": {"amp": None, "channels_last": None, "compile": None},
            "train_hash": "0" * 64}


def _provenance(**ids):
    return {"train_hash": "0" * 64, **ids, "git": {"commit": None}, "python": "3.11",
            "packages": {"torch": "2.14.1", "pyautoattack": None}, "device": {"type": "cpu"},
            "seed": 0, "wall_s": 1.0}


def _acc(acc, n=100):
    correct = int(round(acc * n))
    return {"acc": acc, "ci95": [max(0.0, acc - 0.1), min(1.0, acc + 0.1)], "correct": correct,
            "n": n, "per_class": {"correct": [correct, 0], "total": [n, 0]}}


def _pgd(acc, steps, restarts=1):
    return {**_acc(acc), "attack": {"name": "pgd", "steps": steps, "restarts": restarts},
            "threat": {"norm": "linf", "eps": 0.3}, "max_distance": 0.3}


def write_cell_results(root, recipe, cpu_s, gpu_s=None, gpu_j=None, pgd=0.5, aa=None):
    d = root / "results" / recipe
    cell = _cell(recipe)
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
    metrics = {"clean": _acc(0.9), "PGD-10-1": _pgd(pgd + 0.1, 10), "PGD-50-10": _pgd(pgd, 50, 10)}
    autoattack = None if aa is None else {**_acc(aa), "indices": [0], "package": "autoattack",
                                          "package_version": "0.2", "version": "standard",
                                          "warnings": []}
    write_result(d / "eval_last.json", {
        "kind": "evaluate", "cell": cell, "evaluation": {"eval_hash": "1" * 64},
        "checkpoint": {"name": "last", "epoch": 0}, "threat": {"norm": "linf", "eps": 0.3},
        "num_classes": 2, "metrics": metrics, "autoattack": autoattack,
        "guards": {"eval_mode": True, "buffers_unchanged": True, "inputs_in_unit_box": True},
        "measurement": {"backend": "null", "records": []},
        "provenance": _provenance(eval_hash="1" * 64)}, "eval_result.schema.json")


def test_plot_uses_cpu_seconds_without_gpu_and_overlays_published_times(tmp_path):
    csv = tmp_path / "published.csv"
    csv.write_text("paper,dataset,method,eps,attack,metric,value,source\n"
                   "P,MNIST,N-FGSM,0.3,n/a,training time (minutes),2,s\n"
                   "P,MNIST,N-FGSM,0.3,PGD-50,robust accuracy (%),88.5,s\n"
                   "P,MNIST,N-FGSM,0.3,n/a,clean accuracy (%),98,s\n")
    write_cell_results(tmp_path, "a", cpu_s=100.0, gpu_s=3.0, gpu_j=50.0, aa=0.4)
    write_cell_results(tmp_path, "b", cpu_s=300.0, pgd=0.6)
    spec = {"results_glob": str(tmp_path / "results/**/eval_last.json"), "published": [str(csv)]}
    annotations = {"a": {"published": {"rows": [{"paper": "P", "method": "N-FGSM"}]}}}
    shown = plot_cost_vs_robustness(spec, tmp_path / "plot.png", annotations=annotations)
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
