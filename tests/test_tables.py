"""Tables and the cost plot's published points: computed from result files and the recipes'
annotations only, one column per attack label, identities in the CSV, and no torch."""

import pandas as pd
import pytest

from methods.attack_specs import attack_label, normalize_attack_spec
from methods.config import REPO_ROOT, config_hash
from methods.cost_plot import published_points
from methods.results import write_result
from methods.tables import aggregate, load_published, published_for


# ----------------------------------------------------------------------------- fake results
def _cell(recipe, eps=0.3, source="mnist5k"):
    cell = {"dataset": {"name": source, "source": source},
            "arch": {"name": "smallcnn-w0.5", "model": "smallcnn", "width": 0.5},
            "recipe": recipe, "method": "nfgsm", "method_args": {},
            "threat": {"norm": "linf", "eps": eps}, "train": {"epochs": 1}, "seed": 0,
            "runtime": {"amp": None, "channels_last": None, "compile": None}}
    return {**cell, "train_hash": config_hash(cell)}


def _acc(correct, total=(10, 10)):
    """An accuracy record from per-class counts (two classes)."""
    c, n = sum(correct), sum(total)
    return {"acc": c / n, "ci95": [max(0.0, c / n - 0.1), min(1.0, c / n + 0.1)], "correct": c,
            "n": n, "per_class": {"correct": list(correct), "total": list(total)}}


def _metric(spec, correct, base_eps=0.3):
    spec = normalize_attack_spec(spec)
    eps = spec["eps"] if spec["eps"] is not None else base_eps
    return attack_label(spec), {**_acc(correct), "attack": spec,
                                "threat": {"norm": "linf", "eps": eps}, "max_distance": eps}


def write_eval(root, recipe, attacks, eps=0.3, source="mnist5k"):
    cell = _cell(recipe, eps, source)
    evaluation = {"attacks": [s for s, _ in attacks]}
    evaluation["eval_hash"] = config_hash(evaluation)
    metrics = {"clean": _acc((9, 8)), **dict(_metric(s, c, eps) for s, c in attacks)}
    path = root / recipe / "eval_last.json"
    write_result(path, {
        "kind": "evaluate", "cell": cell, "evaluation": evaluation,
        "checkpoint": {"name": "last", "epoch": 0}, "threat": {"norm": "linf", "eps": eps},
        "num_classes": 2, "test_examples": 20, "metrics": metrics, "autoattack": None,
        "guards": {"eval_mode": True, "buffers_unchanged": True, "inputs_in_unit_box": True},
        "measurement": {"backend": "null", "records": []},
        "provenance": {"train_hash": cell["train_hash"], "eval_hash": evaluation["eval_hash"],
                       "git": {"commit": None}, "python": "3.11",
                       "packages": {"torch": "2", "pyautoattack": None},
                       "device": {"type": "cpu"}, "seed": 0, "wall_s": 1.0}},
        "eval_result.schema.json")
    return path, cell, evaluation


PGD = {"name": "pgd", "steps": 10, "alpha": 0.01}


def test_one_column_per_attack_label_and_identities_in_the_csv(tmp_path):
    a, cell_a, ev_a = write_eval(tmp_path, "a", [({"name": "fgsm"}, (7, 6)), (PGD, (5, 4)),
                                                 ({**PGD, "eps": 0.2}, (6, 6))])
    b, _, _ = write_eval(tmp_path, "b", [(PGD, (3, 2)),
                                         ({**PGD, "targeted": "least_likely"}, (8, 7))])
    frame = aggregate([a, b], tmp_path / "t.md", tmp_path / "t.csv")
    md = (tmp_path / "t.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| dataset"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    labels = ["FGSM", "PGD-10-1-alpha=0.01", "PGD-10-1-alpha=0.01-eps=0.2", "PGD-10-1-alpha=0.01-targeted=least_likely"]
    assert columns[7:11] == labels
    row_b = next(line for line in md.splitlines() if line.startswith("| mnist5k") and "| b |" in line)
    assert [c.strip() for c in row_b.strip("|").split("|")][7] == "n/a"   # b ran no FGSM
    csv = pd.read_csv(tmp_path / "t.csv")
    assert "config_hash" not in csv.columns
    row = csv[csv["recipe"] == "a"].iloc[0]
    assert row["train_hash"] == cell_a["train_hash"][:12] and row["eval_hash"] == ev_a["eval_hash"][:12]
    assert row["PGD-10-1-alpha=0.01_acc"] == 0.45 and row["PGD-10-1-alpha=0.01-eps=0.2_acc"] == 0.6
    assert pd.isna(row["PGD-10-1-alpha=0.01-targeted=least_likely_acc"])
    assert list(frame["recipe"]) == ["a", "b"]


# ----------------------------------------------------------------------------- published rows
PUBLISHED_CSV = REPO_ROOT / "paper_tables/published/bb_nfgsm_fgsmrs_pgd_selective.csv"


def test_published_rows_come_from_the_annotation_and_match_dataset_and_eps_exactly():
    pub = load_published([PUBLISHED_CSV])
    rows = [{"paper": "lp-FGSM README (third-party report of N-FGSM)", "eps": "8/255"}]
    annotation = {"paper": "", "notes": "", "published": {"rows": rows}}
    cell = {"dataset": {"source": "cifar10"}, "threat": {"eps": 8 / 255}}
    got = {(r["dataset"], r["value"]) for r in published_for(cell, annotation, pub)}
    assert got == {("CIFAR-10", "81.64"), ("CIFAR-10", "49.51")}  # not CIFAR-100's rows
    assert published_for(cell, None, pub) == []                   # no annotation, no rows
    assert published_for({**cell, "published": {"rows": rows}}, None, pub) == []  # never the cell's
    assert published_for({**cell, "threat": {"eps": 2 / 255}}, annotation, pub) == []


IADA_CSV = REPO_ROOT / "paper_tables/published/iada_mixup_layerwise_batchout.csv"


def _lt(source, factor):
    return {"name": f"{source}-lt{factor}", "source": source,
            "long_tail": {"imbalance_factor": factor, "meta_per_class": 10}}


def test_long_tail_rows_match_long_tail_cells_of_their_source_and_imbalance():
    """"CIFAR-LT" (either CIFAR) and "CIFAR-100-LT" rows match only cells with a long_tail block
    of the row's imbalance ratio; plain "CIFAR-10" rows only plain cells."""
    pub = load_published([IADA_CSV, PUBLISHED_CSV])
    eps = {"eps": 8 / 255}
    meta_iada = {"published": {"rows": [{"paper": "IADA/Meta-IADA (Zhou et al., IJCAI 2024)",
                                         "method": "Meta-IADA"}]}}
    def values(dataset, annotation):
        return [r["value"] for r in published_for({"dataset": dataset, "threat": eps}, annotation, pub)]
    assert values(_lt("cifar100", 100), meta_iada) == ["52.18"]   # CIFAR-LT, "imbalance 100:1"
    assert values(_lt("cifar10", 100), meta_iada) == ["52.18"]    # the row does not say which CIFAR
    assert values(_lt("cifar100", 50), meta_iada) == []            # another ratio
    assert values({"source": "cifar100"}, meta_iada) == []         # no long tail
    assert values({"source": "svhn", "long_tail": {"imbalance_factor": 100}}, meta_iada) == []
    noisy = {"source": "cifar100", "label_noise": {"kind": "flip", "rate": 0.2, "meta_per_class": 10}}
    assert values(noisy, meta_iada) == []
    # A named CIFAR-100-LT row: its own source and ratio only.
    gla = {"published": {"rows": [{"paper": "GLA/CALA (Zhou, Wu, Yang; AAAI 2025) - CONTEXT, "
                                            "sibling paper of IADA's first author",
                                   "variant": "imbalance 10:1"}]}}
    assert values(_lt("cifar100", 10), gla) and all(
        r["dataset"] == "CIFAR-100-LT" for r in
        published_for({"dataset": _lt("cifar100", 10), "threat": eps}, gla, pub))
    assert values(_lt("cifar100", 100), gla) == [] and values({"source": "cifar100"}, gla) == []
    # A plain CIFAR-10 row is not set beside a long-tail or noisy CIFAR-10 cell.
    lp = {"published": {"rows": [{"paper": "lp-FGSM README (third-party report of N-FGSM)", "eps": "8/255"}]}}
    assert sorted(values({"source": "cifar10"}, lp)) == ["49.51", "81.64"]
    assert values(_lt("cifar10", 100), lp) == []
    assert values({**noisy, "source": "cifar10"}, lp) == []


def test_aggregate_sets_published_rows_and_notes_from_the_annotations(tmp_path):
    path, _, _ = write_eval(tmp_path, "nfgsm_c10", [(PGD, (5, 5))], eps=8 / 255, source="cifar10")
    rows = [{"paper": "lp-FGSM README (third-party report of N-FGSM)", "eps": "8/255"}]
    annotations = {"nfgsm_c10": {"paper": "de Jorge et al. 2022", "notes": "one line\nand | two",
                                 "published": {"rows": rows}},
                   "elsewhere": {"paper": "not in this run", "notes": "", "published": {}}}
    aggregate([path], tmp_path / "t.md", tmp_path / "t.csv", published=[PUBLISHED_CSV],
              annotations=annotations)
    md = (tmp_path / "t.md").read_text()
    assert "| nfgsm_c10 | lp-FGSM README" in md and "81.64" in md
    assert "| nfgsm_c10 | de Jorge et al. 2022 | one line and \\| two |" in md
    assert "not in this run" not in md
    aggregate([path], tmp_path / "u.md", tmp_path / "u.csv", published=[PUBLISHED_CSV])
    assert "81.64" not in (tmp_path / "u.md").read_text()


def test_cost_plot_published_points_follow_the_annotations(tmp_path):
    csv = tmp_path / "published.csv"
    csv.write_text("paper,dataset,method,eps,attack,metric,value,source\n"
                   "P,MNIST,N-FGSM,0.3,n/a,training time (minutes),2,s\n"
                   "P,MNIST,N-FGSM,0.3,PGD-50,robust accuracy (%),88.5,s\n")
    points = [{"recipe": "a", "_cell": _cell("a")}, {"recipe": "b", "_cell": _cell("b")}]
    annotations = {"a": {"published": {"rows": [{"paper": "P", "method": "N-FGSM"}]}}}
    shown = published_points(points, [str(csv)], annotations)
    assert shown == [{"paper": "P", "dataset": "MNIST", "method": "N-FGSM", "seconds": 120.0,
                      "robust_acc": pytest.approx(0.885), "attack": "PGD-50", "recipe": "a"}]
    assert published_points(points, [str(csv)]) == []


# ----------------------------------------------------------------------------- masking, sweeps, defences
def _columns(line):
    """Markdown cells of one row, splitting on unescaped pipes only."""
    import re
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_masking_verdict_column_and_sweep_columns_kept_out_of_the_markdown(tmp_path):
    from methods.masking_report import MASKING_GAP_POINTS
    from tests.test_masking_report import healthy, save, seed_batchout

    paths = [save(tmp_path, seed_batchout()), save(tmp_path, healthy())]
    aggregate(paths, tmp_path / "t.md", tmp_path / "t.csv")
    md = (tmp_path / "t.md").read_text()
    lines = md.splitlines()
    header = _columns(next(l for l in lines if l.startswith("| dataset")))
    assert header[-1] == "masking" and f"above {MASKING_GAP_POINTS:g} points" in md
    # FGSM at 1/255 ... 7/255 (an eps sweep) stays out; FGSM and PGD at the evaluation's eps stay in.
    assert header[7:9] == ["FGSM", "PGD-10-1-alpha=2/255"] and not any("eps=" in h for h in header)
    assert "7 further columns of eps sweeps" in md
    rows = {c[3]: c for c in (_columns(l) for l in lines if l.startswith("| cifar10"))}
    assert rows["batchout_alt_3"][-1] == "**masking**" and rows["pgd_at"][-1] == "no sign"
    assert all(len(r) == len(header) for r in rows.values())
    csv = pd.read_csv(tmp_path / "t.csv").set_index("recipe")
    assert csv.loc["batchout_alt_3", "masking_verdict"] == "masking"
    assert csv.loc["batchout_alt_3", "FGSM-eps=3/255_acc"] == pytest.approx(0.649)


def test_defence_metric_keys_render_as_columns():
    """Keys such as "MI-OL | PGD-10-1-alpha=2/255 | oblivious" (pipes escaped in Markdown) and a
    defence's clean accuracy without an attack do not break the table."""
    from methods.tables import render_markdown, row_from_record
    from tests.test_masking_report import C10, PGD10, metric, record

    defense = {"label": "MI-OL", "randomized": True}
    label, m = metric(PGD10, 450, 1000, C10)
    extra = {"MI-OL | clean": {"acc": 0.84, "correct": 840, "n": 1000, "defense": defense},
             f"MI-OL | {label} | oblivious": {**m, "defense": defense}}
    row = row_from_record(record("mixup", 900, [(PGD10, 30)], extra_metrics=extra))
    md = render_markdown([row], pd.DataFrame())
    header = _columns(next(l for l in md.splitlines() if l.startswith("| dataset")))
    assert header[7:10] == ["PGD-10-1-alpha=2/255", "MI-OL \\| clean",
                            "MI-OL \\| PGD-10-1-alpha=2/255 \\| oblivious"]
    cells = _columns(next(l for l in md.splitlines() if l.startswith("| cifar10")))
    assert len(cells) == len(header) and cells[8] == "84.0" and cells[9].startswith("45.0 [")
    assert row["MI-OL | clean_acc"] == 0.84 and row["masking_verdict"] == "n/a"


def test_cost_plot_strongest_pgd_is_the_base_models_never_a_defences():
    """Evaluation-time defences write PGD metrics too ("<defence> | <attack> | <mode>", with a
    ``defense`` block); the cost plot's strongest PGD is the undefended model's."""
    from methods.cost_plot import _strongest_pgd
    from tests.test_masking_report import C10, PGD10, metric, record

    defense = {"label": "MI-OL", "randomized": True}
    pgd200 = {**PGD10, "steps": 200}
    label200, m200 = metric(pgd200, 300, 1000, C10)
    extra = {f"MI-OL | {label200} | oblivious": {**m200, "defense": defense},
             f"MI-OL | {label200} | adaptive-EOT-20": {**m200, "defense": defense}}
    ev = record("mixup_mi_cifar", 900, [(PGD10, 30), ({**PGD10, "steps": 50}, 20)], extra_metrics=extra)
    assert _strongest_pgd(ev["metrics"], None) == "PGD-50-1-alpha=2/255"
    # Only defence metrics: no PGD point (not a defended number in its place).
    only = {k: v for k, v in ev["metrics"].items() if k == "clean" or k.startswith("MI-OL")}
    assert _strongest_pgd(only, None) is None
    assert _strongest_pgd(ev["metrics"], f"MI-OL | {label200} | oblivious") is not None  # asked for


def test_scenario_rows_get_shot_group_and_calibration_metrics(tmp_path):
    """A long-tailed cell's row appears in the scenario section with many / medium / few-shot
    accuracy computed from its per-class counts and the train class counts beside it."""
    from methods.tables import scenario_lines

    counts = [390, 233, 140, 84, 50, 30, 18, 10, 6, 3]
    per_class = {"correct": [90, 80, 70, 60, 50, 40, 30, 20, 10, 0], "total": [100] * 10}
    ev = {"cell": {"dataset": {"name": "lt", "source": "mnist5k",
                               "long_tail": {"imbalance_factor": 100}}},
          "checkpoint": {"name": "last"},
          "metrics": {"clean": {"acc": 0.45, "correct": 450, "n": 1000, "per_class": per_class}},
          "autoattack": None}
    tr = {"data": {"splits": {"train": {"class_counts": counts}}}}
    row = {"dataset": "lt", "recipe": "r", "checkpoint": "last", "_cell": ev["cell"],
           "_record": ev, "_train": tr, "arch": "a", "method": "m", "seed": 0}
    lines = scenario_lines([row], key=lambda r: r["recipe"])
    body = [l for l in lines if l.startswith("| lt |")][0].split(" | ")
    # thresholds 100 / 20 scaled by 390 / 500: many > 78 (classes 0-3), few < 15.6 (7-9)
    assert body[3:7] == ["45.0", "75.0", "40.0", "10.0"]
    assert body[-1].startswith("78, 15.6")
    plain = dict(row, _cell={"dataset": {"name": "p", "source": "mnist5k"}})
    assert scenario_lines([plain], key=lambda r: r["recipe"]) == []
