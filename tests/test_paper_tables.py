"""Paper tables: published rows beside this run's cells, with the seed band, the verdicts, the
markers, all five files per table even for an empty run, LaTeX escaping, and no torch."""
import csv
import math
import re
import statistics

import pandas as pd
import pytest
import yaml
from scipy.stats import t as student_t

from methods.config import REPO_ROOT
from methods.paper_tables import load_papers, write_paper_tables
from methods.paper_tables_band import ONE_SEED, Band, band, verdict
from methods.paper_tables_compare import CSV_COLUMNS
from methods.text_escape import md_cell, tex_escape
from methods.results import write_result
from tests.test_masking_report import C10, PGD10, acc, record

N = 1000
PGD50 = {**PGD10, "steps": 50, "restarts": 10}


# ----------------------------------------------------------------------------- the band
def direct_band(accs, totals):
    """The caption's rule, computed here independently (points)."""
    n = len(accs)
    v = statistics.mean(p * (1 - p) / k for p, k in zip(accs, totals))
    if n == 1:
        return 100 * accs[0], 100 * 1.959963984540054 * math.sqrt(v)
    s = statistics.stdev(accs)
    return 100 * statistics.mean(accs), 100 * student_t.ppf(0.975, n - 1) * math.sqrt(s * s / n + v / n)


@pytest.mark.parametrize("accs,totals", [([0.80, 0.82, 0.84], [N] * 3), ([0.4, 0.55], [200, 300]),
                                         ([0.85], [20]), ([0.5] * 4, [50] * 4)])
def test_band_is_the_caption_rule(accs, totals):
    b = band(accs, totals)
    mean, hw = direct_band(accs, totals)
    assert (b.n, b.mean, b.half_width) == (len(accs), pytest.approx(mean), pytest.approx(hw))
    assert (b.low, b.high) == (pytest.approx(mean - hw), pytest.approx(mean + hw))
    assert (b.rule == ONE_SEED) == (len(accs) == 1)


#: t(0.975, df) as printed in Student's t tables (3 decimals): independent of scipy.
PRINTED_T = {1: 12.706, 2: 4.303, 9: 2.262, 29: 2.045, 39: 2.023, 119: 1.980}


@pytest.mark.parametrize("df", sorted(PRINTED_T))
def test_band_uses_t_with_n_minus_one_degrees_of_freedom(df):
    """The half-width over n = df + 1 seeds, computed here with the printed t quantile."""
    n = df + 1
    accs = [0.45 + 0.01 * ((7 * i) % 11) for i in range(n)]
    totals = [200 + 10 * (i % 4) for i in range(n)]
    mean = sum(accs) / n
    s2 = sum((p - mean) ** 2 for p in accs) / (n - 1)
    v = sum(p * (1 - p) / k for p, k in zip(accs, totals)) / n
    b = band(accs, totals)
    assert b.rule == f"t(0.975, {df})" and b.n == n and b.mean == pytest.approx(100 * mean)
    assert b.half_width == pytest.approx(100 * PRINTED_T[df] * math.sqrt(s2 / n + v / n),
                                         rel=3e-4)   # the printed t's rounding


def test_verdicts_of_values_and_bounds():
    b = Band(3, 50.0, 4.0, "t")
    # the verdict places the reproduced mean relative to the published value
    assert [verdict(b, v) for v in (46.0, 54.0, 45.9, 54.1)] == ["within band", "within band",
                                                                 "above", "below"]
    assert verdict(b, 47.0, "<=") == "within band" and verdict(b, 45.0, "<=") == "above"
    assert verdict(b, 53.0, ">") == "within band" and verdict(b, 55.0, ">=") == "below"
    assert verdict(b, 13.0, "up to") == "above"


# ----------------------------------------------------------------------------- fake inputs
def save_eval(root, recipe, seed, clean, pgd, *, ckpt="last", aa=None, n=N):
    ev = record(recipe, clean, [(PGD10, pgd)], n=n, aa=aa, seed=seed)
    ev["checkpoint"]["name"] = ckpt
    path = root / "results" / recipe / f"seed{seed}" / f"eval_{ckpt}.json"
    write_result(path, ev, "eval_result.schema.json")
    return path


PUB_COLUMNS = ["id", "seed_paper", "paper_key", "evidence", "paper", "arxiv", "table", "dataset",
               "variant", "arch", "method", "eps", "eps_value", "norm", "attack", "attack_name",
               "attack_steps", "attack_steps_alt", "attack_restarts", "attack_step_size",
               "attack_targeted", "threat_protocol", "metric", "metric_kind", "unit",
               "value_text", "value", "value_qualifier", "value_alt", "value_std", "source",
               "note", "cells", "link", "no_cell_reason"]


def pub_row(i, method, value, **kw):
    row = {c: "" for c in PUB_COLUMNS}
    row.update({"id": f"pubtest:{i}", "seed_paper": "selective", "paper_key": "selective",
                "evidence": "paper-table", "paper": "Test paper", "table": "T1",
                "dataset": "CIFAR-10", "arch": "ResNet18", "method": method, "eps": "8/255",
                "eps_value": repr(C10), "norm": "linf", "attack": "PGD-10",
                "attack_name": "pgd", "attack_steps": "10", "threat_protocol": "white-box",
                "metric": "robust acc (%)", "metric_kind": "robust_acc", "unit": "%",
                "value_text": str(value), "value": str(value), "value_qualifier": "=",
                "source": "Table 2 of the_paper, 50% & more"})
    row.update({k: str(v) for k, v in kw.items()})
    return row


CLEAN = dict(attack="none (clean)", attack_name="none", attack_steps="", norm="",
             metric="clean acc (%)", metric_kind="clean_acc")


@pytest.fixture
def run(tmp_path):
    """3 seeds of r_multi (last and best), 1 seed of r_one, one unlinked recipe; a published
    CSV with one row per verdict case; annotations; a two-table registry."""
    clean, pgd, aa = [800, 820, 840], [400, 420, 440], [18, 19, 20]
    evals = [save_eval(tmp_path, "r_multi", s, clean[s], pgd[s], aa={"correct": aa[s], "n": 50})
             for s in range(3)]
    evals += [save_eval(tmp_path, "r_multi", s, clean[s], pgd[s], ckpt="best") for s in range(3)]
    evals.append(save_eval(tmp_path, "r_one", 0, 17, 5, n=20))
    evals.append(save_eval(tmp_path, "unlinked_x", 0, 900, 100))
    rows = [pub_row(1, "A", 45),                                   # PGD-10: within band
            pub_row(2, "A", 99, **CLEAN),                          # clean: below
            pub_row(3, "A", 20),                                   # PGD-10: above
            pub_row(4, "A", 10, attack="CW", attack_name="cw", attack_steps=""),
            pub_row(5, "A", 10, attack="PGD-50", attack_steps="50"),
            pub_row(6, "A", 12, metric="training time (minutes)", metric_kind="train_time",
                    unit="min", attack="n/a", attack_name="n/a", attack_steps=""),
            pub_row(7, "A", 30, attack="AutoAttack", attack_name="autoattack", attack_steps=""),
            pub_row(8, "DP", 41),
            pub_row(9, "NR", 50, cells="cifar10/prn18/r_notrun;cifar10/wrn/r_notrun"),
            pub_row(10, "NC", 50, no_cell_reason="needs ImageNet"),
            pub_row(11, "ONE", 80, **CLEAN),
            pub_row(12, "A", 3, attack="PGD-10 targeted", attack_targeted="true")]
    pub = tmp_path / "pubtest.csv"
    with open(pub, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=PUB_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    annotations = {
        "r_multi": {"paper": "", "notes": "", "published": {
            "rows": [{"method": "A"}],
            "different_protocol": [{"match": {"method": "DP"}, "why": "another net"}]}},
        "r_one": {"paper": "", "notes": "", "published": {"rows": [{"method": "ONE"}]}}}
    papers = tmp_path / "papers.yaml"
    papers.write_text(yaml.safe_dump({"tables": [
        {"key": "sel", "title": "Selective_test", "arxiv": ["1.2"], "seed": None,
         "papers": [{"paper_key": "selective", "title": "Test paper"}],
         "run": ["r_*", {"recipe": "unlinked_*", "datasets": ["cifar10"]}]},
        {"key": "other", "title": "Other", "papers": [{"paper_key": "bb"}],
         "run": ["unlinked_x"]},
        {"key": "empty", "title": "Empty", "papers": [{"paper_key": "iada"}], "run": ["nothing"]}]}))
    out = tmp_path / "out"
    written = write_paper_tables(evals, papers, [pub], annotations, out)
    return {"written": written, "out": out, "clean": clean, "pgd": pgd, "aa": aa}


def published_line(frame, pid, ckpt="last"):
    got = frame[(frame["section"] == "published") & (frame["published_id"] == pid)]
    if "checkpoint" in got and got["checkpoint"].notna().any():
        got = got[got["checkpoint"] == ckpt]
    assert len(got) == 1, got
    return got.iloc[0]


# ----------------------------------------------------------------------------- verdicts
def test_numbers_and_verdicts_against_a_direct_computation(run):
    frame = pd.read_csv(run["out"] / "sel.csv")
    assert list(frame.columns) == CSV_COLUMNS
    for pid, counts, published, expected in [("pubtest:1", run["pgd"], 45, "within band"),
                                             ("pubtest:2", run["clean"], 99, "below"),
                                             ("pubtest:3", run["pgd"], 20, "above")]:
        row = published_line(frame, pid)
        mean, hw = direct_band([c / N for c in counts], [N] * 3)
        assert row["n_seeds"] == 3 and row["seeds"] == "0;1;2" and row["n_examples"] == N
        assert row["mean"] == pytest.approx(mean) and row["half_width"] == pytest.approx(hw)
        assert (row["ci_low"], row["ci_high"]) == (pytest.approx(mean - hw), pytest.approx(mean + hw))
        assert row["delta"] == pytest.approx(mean - published)
        assert row["verdict"] == expected and row["published"] == published
        assert row["link"] == "rows" and row["recipe"] == "r_multi"
    assert published_line(frame, "pubtest:1")["metric_label"] == "PGD-10-1-alpha=2/255"


def test_not_comparable_not_run_and_no_runnable_cell(run):
    frame = pd.read_csv(run["out"] / "sel.csv")
    cw = published_line(frame, "pubtest:4")
    assert cw["verdict"] == "not comparable" and cw["reason"].startswith("attack not evaluated: cw")
    assert pd.isna(cw["mean"])
    pgd50 = published_line(frame, "pubtest:5")
    assert pgd50["verdict"] == "not comparable" and "attack not evaluated: PGD-50" in pgd50["reason"]
    time = published_line(frame, "pubtest:6")
    assert time["verdict"] == "not comparable" and "train_time" in time["reason"]
    targeted = published_line(frame, "pubtest:12")   # only an untargeted PGD-10 was evaluated
    assert targeted["verdict"] == "not comparable" and "targeted" in targeted["reason"]
    dp = published_line(frame, "pubtest:8")
    assert dp["verdict"] == "not comparable" and dp["link"] == "different_protocol"
    assert "different protocol: another net" in dp["reason"] and "diff. protocol" in dp["markers"]
    mean, _ = direct_band([c / N for c in run["pgd"]], [N] * 3)
    assert dp["mean"] == pytest.approx(mean) and dp["delta"] == pytest.approx(mean - 41)
    not_run = published_line(frame, "pubtest:9")
    assert not_run["verdict"] == "not run" and pd.isna(not_run["recipe"])
    assert "cifar10/prn18/r_notrun" in not_run["reason"] and "cifar10/wrn/r_notrun" in not_run["reason"]
    no_cell = published_line(frame, "pubtest:10")
    assert no_cell["verdict"] == "no runnable cell" and no_cell["reason"] == "needs ImageNet"
    md = (run["out"] / "sel.md").read_text()
    assert "not comparable (attack not evaluated: cw" in md and "no runnable cell (needs ImageNet)" in md


def test_one_seed_is_binomial_only(run):
    frame = pd.read_csv(run["out"] / "sel.csv")
    one = published_line(frame, "pubtest:11")
    assert one["n_seeds"] == 1 and one["band_rule"] == ONE_SEED and ONE_SEED in one["markers"]
    assert one["half_width"] == pytest.approx(100 * 1.959963984540054 * math.sqrt(0.85 * 0.15 / 20))
    assert one["verdict"] == "within band"   # |85 - 80| < 15.6


def test_best_checkpoint_and_autoattack_subset_are_marked(run):
    frame = pd.read_csv(run["out"] / "sel.csv")
    best = published_line(frame, "pubtest:1", ckpt="best")
    assert best["markers"] == "best ckpt" and best["verdict"] == "within band"
    assert pd.isna(published_line(frame, "pubtest:1")["markers"])   # last, 3 seeds: no marker
    aa = published_line(frame, "pubtest:7")
    mean, hw = direct_band([c / 50 for c in run["aa"]], [50] * 3)
    assert aa["markers"] == "subset n=50" and aa["n_examples"] == 50
    assert aa["mean"] == pytest.approx(mean) and aa["half_width"] == pytest.approx(hw)
    # the best checkpoint has no AutoAttack: not comparable, not a crash
    assert published_line(frame, "pubtest:7", ckpt="best")["verdict"] == "not comparable"
    md = (run["out"] / "sel.md").read_text()
    assert "Markers: best ckpt:" in md and "subset n=N:" in md


def test_this_run_section_lists_the_paper_cells_with_seed_intervals(run):
    frame = pd.read_csv(run["out"] / "sel.csv")
    runs = frame[frame["section"] == "run"]
    assert set(runs["recipe"]) == {"r_multi", "r_one", "unlinked_x"}
    clean = runs[(runs["recipe"] == "r_multi") & (runs["checkpoint"] == "last")
                 & (runs["metric_label"] == "clean")].iloc[0]
    mean, hw = direct_band([c / N for c in run["clean"]], [N] * 3)
    assert clean["n_seeds"] == 3 and clean["mean"] == pytest.approx(mean)
    assert clean["ci_high"] == pytest.approx(mean + hw)
    aa = runs[runs["metric_label"] == "AutoAttack (standard)"]
    assert list(aa["markers"]) == ["subset n=50"]
    md = (run["out"] / "sel.md").read_text()
    section = md.split("## This run")[1]
    assert f"{mean:.1f} [{mean - hw:.1f}, {mean + hw:.1f}]" in section
    assert "| r_multi | batchout | cifar10 | vgg19bn | last | 3 |" in section
    # a table whose run cells link no published row says so
    other = (run["out"] / "other.md").read_text()
    assert "no published row is at this scale" in other and "| unlinked_x |" in other
    assert "This run has no cell of this paper's recipes (nothing)" in (run["out"] / "empty.md").read_text()


# ----------------------------------------------------------------------------- files and escaping
def test_every_table_writes_its_three_files_and_the_index(run, tmp_path):
    names = sorted(p.name for p in run["written"])
    assert names == sorted([f"{k}.{s}" for k in ("sel", "other", "empty") for s in ("md", "tex", "csv")]
                           + ["index.md"])
    index = (run["out"] / "index.md").read_text()
    assert "[sel.md](sel.md)" in index and "| empty |" in index


def test_the_registry_makes_five_tables_even_for_an_empty_run(tmp_path):
    """Every published row of a table's paper_keys appears once (nothing linked in an empty
    run), with the verdict its ``cells`` column implies."""
    papers = REPO_ROOT / "paper_tables" / "papers.yaml"
    tables = load_papers(papers)
    assert [t.key for t in tables] == ["bb", "batchout_notes", "iada", "selective", "baselines"]
    published = sorted((REPO_ROOT / "paper_tables" / "published").glob("*.csv"))
    structured = [p for p in published if "id" in p.read_text().splitlines()[0].split(",")]
    written = write_paper_tables([], papers, structured, {}, tmp_path / "out")
    assert len(written) == 16 and all(p.exists() for p in written)
    raw = pd.concat([pd.read_csv(p, dtype=str, keep_default_na=False) for p in structured]) \
        if structured else pd.DataFrame(columns=["id", "paper_key", "cells"])
    for t in tables:
        frame = pd.read_csv(tmp_path / "out" / f"{t.key}.csv", dtype={"published_id": str})
        assert frame.columns.tolist() == CSV_COLUMNS
        mine = raw[raw["paper_key"].isin([p["paper_key"] for p in t.papers])]
        assert sorted(frame["published_id"]) == sorted(mine["id"])
        expected = dict(zip(mine["id"], ["not run" if c else "no runnable cell" for c in mine["cells"]]))
        assert dict(zip(frame["published_id"], frame["verdict"])) == expected
        assert "This run has no cell" in (tmp_path / "out" / f"{t.key}.md").read_text()
    # The corrections stay visible: Selective AT's CIFAR rows labelled PGD-40 with the official
    # script's PGD-10 as the second reading, and FGSM-RS's two clean accuracies.
    selective = pd.read_csv(tmp_path / "out" / "selective.csv", dtype=str, keep_default_na=False)
    cifar40 = selective[selective["pub_dataset"].str.startswith("CIFAR-10")
                        & selective["pub_attack"].str.contains("PGD-40")]
    assert len(cifar40) == 4 and cifar40["pub_note"].str.contains("PGD-10").all()
    baselines = (tmp_path / "out" / "baselines.md").read_text()
    assert "86.06" in baselines and "83.81" in baselines and "conflict" in baselines


def test_the_registry_names_only_known_paper_keys():
    schema = (REPO_ROOT / "workflow" / "schemas" / "published.schema.json")
    if not schema.exists():
        pytest.skip("published schema not present")
    known = set(yaml.safe_load(schema.read_text())["properties"]["paper_key"]["enum"])
    listed = [p["paper_key"] for t in load_papers(REPO_ROOT / "paper_tables" / "papers.yaml")
              for p in t.papers]
    assert set(listed) == known and len(listed) == len(known)   # each paper_key in one table


def test_registry_errors_name_the_field(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump({"tables": [{"key": "a", "title": "A", "papers": [{}], "run": []}]}))
    with pytest.raises(ValueError, match=r"tables\[0\]\.papers\[0\]\.paper_key"):
        load_papers(bad)
    bad.write_text(yaml.safe_dump({"tables": [{"key": "a", "title": "A", "papers": []}]}))
    with pytest.raises(ValueError, match=r"tables\[0\]\.run is required"):
        load_papers(bad)


RAW = re.compile(r"(?<!\\)[_%&#$]")


def test_latex_cells_are_escaped(run):
    tex = (run["out"] / "sel.tex").read_text()
    assert r"\begin{tabular}" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    body = False
    rows = 0
    for line in tex.splitlines():
        if line == r"\midrule":
            body = True
            continue
        if line == r"\bottomrule":
            body = False
        if body:
            rows += 1
            assert line.endswith(r" \\")
            for cell in line[:-3].split(" & "):
                assert not RAW.search(cell), (cell, line)
    assert rows > 10
    assert r"r\_multi" in tex and r"50\% \& more" in tex and "the\\_paper" in tex
    assert tex_escape("a_b%c&d{e}~^\\") == r"a\_b\%c\&d\{e\}\textasciitilde{}\textasciicircum{}\textbackslash{}"


def test_shared_escaping_keeps_a_value_on_one_line():
    """methods.text_escape, shared with methods.tables and methods.claims: None is empty, a zero
    stays (the claims table's "0 seeds"), whitespace collapses, pipes and < > are escaped."""
    assert [md_cell(v) for v in (None, 0, "a|b\n  c ", 1.5)] == ["", "0", "a\\|b c", "1.5"]
    assert tex_escape("x <= y >\n 0") == r"x \textless{}= y \textgreater{} 0"
    assert tex_escape(None) == "" and tex_escape(0) == "0"

