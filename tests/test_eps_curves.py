"""Accuracy-over-eps curves: grid specs as YAML would write them, curves read from the metrics'
own threat (eps 0 = clean), families, defences, and the PNG / PDF / CSV files."""
import pandas as pd
import pytest
import yaml

from methods.attack_specs import AttackSpecError, attack_label, check_attack_specs
from methods.cli import main
from methods.config import number
from methods.eps_curves import (CurveKey, attack_family, curves, eps_grid, fgsm_eps_grid,
                                grid_yaml, plot_eps_curves, render_eps_curves)
from tests.test_masking_report import (ALT_3, C10, PGD10, acc, fgsm_grid, healthy, metric,
                                       record, save, seed_batchout)


# ----------------------------------------------------------------------------- grids
def test_fgsm_grid_is_the_non_zero_points_of_linspace_written_as_yaml_would():
    cifar = fgsm_eps_grid("8/255")
    assert [s["eps"] for s in cifar] == [f"{k}/255" for k in range(1, 9)]
    assert all(s["name"] == "fgsm" and set(s) == {"name", "eps"} for s in cifar)
    assert [number(s["eps"], "eps") for s in cifar] == [k / 255 for k in range(1, 9)]
    assert len(check_attack_specs(cifar)) == 8                       # labels are unique
    assert [s["eps"] for s in fgsm_eps_grid(8 / 255, skip=["8/255"])] == [f"{k}/255" for k in range(1, 8)]
    mnist = fgsm_eps_grid(0.3, 7, skip=[0.1])
    assert [s["eps"] for s in mnist] == [0.05, 0.15, 0.2, 0.25, 0.3]
    assert [attack_label(s) for s in mnist][:2] == ["FGSM-eps=0.05", "FGSM-eps=0.15"]
    l2 = fgsm_eps_grid(0.5, 2, norm="l2")
    assert l2 == [{"name": "fgsm", "norm": "l2", "eps": 0.5}]
    pgd = eps_grid(PGD10, "8/255", 3)
    assert pgd == [{**PGD10, "eps": "4/255"}, {**PGD10, "eps": "8/255"}]
    # The YAML lines parse back to the same specs.
    assert yaml.safe_load(grid_yaml(cifar + mnist + pgd, indent=0)) == cifar + mnist + pgd


def test_grid_errors_name_the_argument():
    with pytest.raises(ValueError, match="points"):
        fgsm_eps_grid("8/255", 1)
    with pytest.raises(ValueError, match="eps_max"):
        fgsm_eps_grid(0)
    with pytest.raises(ValueError, match="eps_max"):
        fgsm_eps_grid("eight")
    with pytest.raises(ValueError, match="already sets eps"):
        eps_grid({"name": "fgsm", "eps": 0.1}, 0.3)
    with pytest.raises(AttackSpecError, match=r"eps grid \[1\]\.steps"):
        eps_grid({"name": "pgd", "alpha": 0.01}, 0.3)


def test_cli_prints_the_grid(capsys):
    assert main(["eps-grid", "--eps-max", "0.3", "--points", "7", "--skip", "0.1"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == fgsm_eps_grid(0.3, 7, skip=[0.1])


# ----------------------------------------------------------------------------- curves
def test_curves_take_eps_from_each_metric_and_clean_as_eps_zero():
    ev = seed_batchout()
    got = curves(ev)
    fgsm = got[CurveKey(None, None, "FGSM", "Linf")]
    assert [p.eps for p in fgsm] == pytest.approx([k / 255 for k in range(9)])
    assert [round(100 * p.acc, 1) for p in fgsm] == [round(v, 1) for v in ALT_3]
    assert fgsm[0].labels == "clean" and fgsm[-1].labels == "FGSM"          # the plain spec at 8/255
    assert fgsm[3].ci_low == ev["metrics"]["FGSM-eps=3/255"]["ci95"][0]
    pgd = got[CurveKey(None, None, "PGD-10-1", "Linf")]
    assert [(p.eps, p.acc) for p in pgd] == [(0.0, 0.867), (C10, 0.025)]


def test_families_norms_duplicates_and_unknown_attacks():
    extra = {"Square-5000": {**acc(10, 1000), "attack": {"name": "square"},
                             "threat": {"norm": "linf", "eps": C10}, "max_distance": C10}}
    ev = record("mixed", 900, [
        (PGD10, 300), ({**PGD10, "alpha": "1/255"}, 280),                # same family and eps
        ({**PGD10, "eps": "4/255"}, 500),
        ({**PGD10, "targeted": "random"}, 700),
        ({"name": "fgsm", "norm": "l2", "eps": 0.5}, 400)], extra_metrics=extra)
    got = curves(ev)
    assert set(got) == {CurveKey(None, None, "PGD-10-1", "Linf"),
                        CurveKey(None, None, "PGD-10-1-targeted=random", "Linf"),
                        CurveKey(None, None, "FGSM", "L2")}
    pgd = got[CurveKey(None, None, "PGD-10-1", "Linf")]
    assert [(p.eps, p.acc) for p in pgd] == [(0.0, 0.9), (4 / 255, 0.5), (C10, 0.28)]
    assert pgd[-1].labels == "PGD-10-1-alpha=2/255; PGD-10-1-alpha=1/255"  # the stronger kept
    assert [(p.eps, p.acc) for p in got[CurveKey(None, None, "FGSM", "L2")]] == [(0, 0.9), (0.5, 0.4)]
    assert attack_family({**PGD10, "random_start": False, "early_stop": False}) == \
        "PGD-10-1-zero_start-no_early_stop"


def test_defended_metrics_are_separate_curves_from_the_defences_clean():
    defense = {"label": "MI-OL", "randomized": True}
    extra = {"MI-OL | clean": {**acc(840, 1000), "defense": defense}}
    for mode, correct in (("oblivious", 600), ("adaptive", 200)):
        for spec, c in (({"name": "fgsm", "eps": "4/255"}, correct + 100), ({"name": "fgsm"}, correct)):
            label, m = metric(spec, c, 1000, C10)
            extra[f"MI-OL | {label} | {mode}"] = {**m, "defense": defense}
    got = curves(record("mixup", 900, [({"name": "fgsm"}, 300)], extra_metrics=extra))
    assert [(p.eps, p.acc) for p in got[CurveKey(None, None, "FGSM", "Linf")]] == [(0, 0.9), (C10, 0.3)]
    adaptive = got[CurveKey("MI-OL", "adaptive", "FGSM", "Linf")]
    assert [(p.eps, p.acc) for p in adaptive] == [(0, 0.84), (4 / 255, 0.3), (C10, 0.2)]
    assert CurveKey("MI-OL", "oblivious", "FGSM", "Linf") in got
    assert CurveKey("MI-OL", "adaptive", "FGSM", "Linf").group == "MI-OL | adaptive"


# ----------------------------------------------------------------------------- files
def test_plot_files_and_points_csv(tmp_path):
    paths = [save(tmp_path, seed_batchout()), save(tmp_path, healthy())]
    png, pdf, csv = tmp_path / "p" / "c.png", tmp_path / "p" / "c.pdf", tmp_path / "p" / "c.csv"
    assert main(["eps-curves", "--evals", *map(str, paths), "--png", str(png), "--pdf", str(pdf),
                 "--csv", str(csv)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert pdf.read_bytes()[:5] == b"%PDF-"
    points = pd.read_csv(csv)
    assert len(points) == 2 * (9 + 2)                 # FGSM 0..8/255 and PGD (clean, 8/255) each
    fgsm = points[(points.recipe == "batchout_alt_3") & (points.family == "FGSM")]
    assert list((100 * fgsm.acc).round(1)) == [round(v, 1) for v in ALT_3]
    assert not list(tmp_path.glob("p/.*.tmp"))        # atomic writes leave nothing behind


def test_no_sweep_no_files_and_no_autoattack_still_draw(tmp_path):
    flat = record("flat", 900, [({"name": "fgsm"}, 300), (PGD10, 200)])    # one eps each
    shown = render_eps_curves([flat], tmp_path / "a.png", tmp_path / "a.pdf", tmp_path / "a.csv")
    assert shown["panels"] == [] and (tmp_path / "a.png").stat().st_size > 0
    assert len(pd.read_csv(tmp_path / "a.csv")) == 4
    shown = plot_eps_curves([], tmp_path / "b.png", csv=tmp_path / "b.csv")
    assert shown == {"panels": [], "curves": 0, "points": 0, "evaluations": 0}
    assert (tmp_path / "b.png").stat().st_size > 0
    assert pd.read_csv(tmp_path / "b.csv").empty
    mnist = record("mnist", 950, fgsm_grid([80, 60, 40], eps_unit=0.05, last_is_plain=False),
                   eps=0.1, source="mnist5k")                               # no AutoAttack
    shown = render_eps_curves([mnist, seed_batchout()], tmp_path / "c.png")
    assert shown["panels"] == ["mnist5k FGSM Linf", "cifar10 FGSM Linf"]
