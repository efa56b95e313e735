"""The Snakemake report: every table and figure of a run, rendered by a real browser.

The smoke run is the session fixture ``smoke_run`` (tests/conftest.py, shared with
tests/test_workflow_e2e.py).  ``snakemake --report`` is then built from it and opened in headless
Chromium with a small driver script appended to a copy of the page: it clicks through the
report's own menu (every category and subcategory), opens every result (image, HTML page, or the
download link of a CSV) and its description, and writes what was shown into the DOM, which
``--dump-dom`` returns.  Without Chromium that test skips and says so (.ci/run installs it).
"""
import html
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from methods.config import REPO_ROOT, eval_checkpoints, iter_cells, load_yaml
from methods.plots import PLOTS
from methods.text_escape import md_cell

REPORT_DIR = REPO_ROOT / "workflow" / "report"
RULE_FILES = [REPO_ROOT / "workflow" / "rules" / n for n in ("tables.smk", "report.smk")]
SMOKE = REPO_ROOT / "workflow" / "config" / "smoke.yaml"


def load_markdown_html():
    spec = importlib.util.spec_from_file_location("markdown_html", REPORT_DIR / "markdown_html.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


md = load_markdown_html()


# ------------------------------------------------------------------ captions and configuration
def test_every_caption_the_rules_name_exists_and_every_plot_has_its_own():
    named = set()
    for path in RULE_FILES:
        named |= set(re.findall(r'"([\w/]+\.rst)"', path.read_text()))
        named |= {f"plots/{name}.rst" for name in PLOTS if "plots/{name}.rst" in path.read_text()}
    assert {"run_table.rst", "masking.rst", "eps_curves.rst", "paper_tables.rst",
            "claims.rst"} <= named
    missing = [c for c in sorted(named) if not (REPORT_DIR / c).is_file()]
    assert not missing, f"captions named by the rules but absent under workflow/report/: {missing}"
    assert "report: \"workflow/report/workflow.rst\"" in (REPO_ROOT / "Snakefile").read_text()
    for name in PLOTS:
        assert (REPORT_DIR / "plots" / f"{name}.rst").read_text().strip(), name


@pytest.mark.parametrize("name", ["default", "claims", "paper"])
def test_the_repository_runs_write_their_paper_tables_into_paper_tables(name):
    config = load_yaml(REPO_ROOT / "workflow" / "config" / f"{name}.yaml")
    assert config["paper_tables_dir"] == f"paper_tables/{config['run_name']}"


def test_runs_without_paper_tables_dir_write_under_results_dir():
    for path in (REPO_ROOT / "workflow" / "config").glob("*.yaml"):
        if path.stem not in ("default", "claims", "paper"):
            assert "paper_tables_dir" not in load_yaml(path), path.name


def dry_run(tmp_path, *config):
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(SMOKE),
         "--config", f"results_dir={tmp_path / 'r'}", f"data_dir={tmp_path / 'd'}", *config],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_paper_tables_dir_places_the_paper_tables_claims_and_plots(tmp_path):
    done = dry_run(tmp_path, f"paper_tables_dir={tmp_path / 'pt'}")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    keys = [t["key"] for t in yaml.safe_load((REPO_ROOT / "paper_tables/papers.yaml").read_text())
            ["tables"]]
    wanted = ([f"pt/papers/{k}.{ext}" for k in keys for ext in ("md", "tex", "csv")]
              + ["pt/papers/index.md", "pt/claims.md", "pt/claims.csv", "pt/claims.tex"]
              + [f"pt/plots/{n}.{ext}" for n in PLOTS for ext in ("png", "pdf", "csv")])
    for rel in wanted:
        assert str(tmp_path / rel) in out, rel
    assert str(tmp_path / "r" / "paper_tables") not in out
    for rule in ("paper_tables", "claims", "plots", "report_tables_html"):
        assert f"rule {rule}:" in out, rule


def test_a_paper_tables_dir_with_shell_characters_is_refused(tmp_path):
    done = dry_run(tmp_path, "paper_tables_dir=paper tables")
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "paper_tables_dir: got 'paper tables'; allowed: a string of the pattern" in out, out


# ------------------------------------------------------------------ Markdown -> HTML pages
class Page(HTMLParser):
    """A page's tables (each a list of rows of cell texts, header row first) and its tags with
    their attributes, read with the standard library's parser (entities decoded)."""

    def __init__(self, page: str):
        super().__init__()
        self.tables, self.tags, self.cell = [], [], None
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("th", "td"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self.tables[-1][-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def markdown_table(rows):
    """A pipe table as the table writers write it: every cell through md_cell."""
    lines = ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join([lines[0], "|" + "---|" * len(rows[0])] + lines[1:]) + "\n"


#: Cell values with what a Markdown cell escapes or could mistake: bars (also at a cell's end),
#: HTML-like text, ampersands, underscores and stars, an attack label whose parts are joined by
#: bars.
ROWS = [["name", "acc | robust", "<d>", "AT & co"],
        ["MI-OL | PGD-10-1-alpha=2/255 | oblivious", "81.2 [80.1, 82.3]", "a|b|", "x < y > z"],
        ["r1", "n/a", "p<0.05", "seed_42_run * 2 * 3"],
        ["r2", "12.000", "|", "no sign"]]


def pipe_table_shapes(text):
    """(rows without the rule row, {cells per row}) of every pipe table in Markdown ``text``:
    runs of lines starting with a bar, cells split at bars not escaped as ``\\|``."""
    shapes, run = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            run.append(len(re.split(r"(?<!\\)\|", line.strip())) - 2)
        elif run:
            shapes.append((len(run) - 1, set(run)))
            run = []
    return shapes


def test_pipe_table_shapes_counts_escaped_bars_as_text():
    assert pipe_table_shapes("x\n\n" + markdown_table(ROWS) + "\ny\n| a |\n|---|\n") == [
        (4, {4}), (1, {1})]


def test_the_library_page_has_the_markdown_table_cell_for_cell_with_escaped_pipes_literal():
    text = "Caption line one\nline two.\n\n" + markdown_table(ROWS) + "\ntrailer\n"
    page = Page(md.markdown_to_html(text, "t.md"))
    assert page.tables == [ROWS]
    assert [t for t, _ in page.tags].count("th") == 4 and ("title", {}) in page.tags


def test_headings_lists_and_links_are_rendered_and_raw_html_is_text():
    text = ("# Title `key`\n\nSee [tex](key.tex) and [arXiv](https://arxiv.org/abs/1) **now**; "
            "<script>alert(1)</script> <b>x</b>\n\n- one\n- two\n")
    page_text = md.markdown_to_html(text, "a<b>.md")
    page = Page(page_text)
    tags = [t for t, _ in page.tags]
    assert tags.count("h1") == 1 and tags.count("li") == 2 and tags.count("strong") == 1
    assert "<title>a&lt;b&gt;.md</title>" in page_text and "<code>key</code>" in page_text
    # Raw HTML is shown as text, never passed on as markup.
    assert "script" not in tags and "b" not in tags
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &lt;b&gt;x&lt;/b&gt;" in page_text
    # A relative link leads nowhere inside the report: its text only; an absolute one: new tab.
    assert [a for t, a in page.tags if t == "a"] == [
        {"href": "https://arxiv.org/abs/1", "target": "_blank"}]
    assert "See <span>tex</span> and" in page_text


def test_the_rules_command_writes_every_page_atomically(tmp_path):
    """The command rule report_tables_html runs (a module, from the repository root)."""
    rows = [[f"r{i}", f"{i / 7:.3f} [0.1, 0.9]", "no | sign"] for i in range(12)]
    pairs = []
    for name in ("t", "u"):
        (tmp_path / f"{name}.md").write_text(markdown_table([["name", "acc", "masking"]] + rows))
        pairs += [str(tmp_path / f"{name}.md"), str(tmp_path / "out" / f"{name}.html")]
    done = subprocess.run([sys.executable, "-m", "workflow.report.markdown_html", *pairs],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("t", "u"):
        page = (tmp_path / "out" / f"{name}.html").read_text()
        assert page == md.markdown_to_html((tmp_path / f"{name}.md").read_text(), f"{name}.md")
        assert Page(page).tables == [[["name", "acc", "masking"]] + rows]
    assert not [p for p in (tmp_path / "out").iterdir() if p.suffix != ".html"]
    assert md.main([str(tmp_path / "t.md")]) == 2
    rule = (REPO_ROOT / "workflow" / "rules" / "report.smk").read_text()
    assert '"{PY} -m workflow.report.markdown_html {params.pairs:q} > {log} 2>&1"' in rule


# ------------------------------------------------------------------ the report in a browser
DRIVER = r"""
(async function () {
  const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
  const nav = () => document.querySelector("nav");
  const content = () => document.querySelector("div.grow.h-screen");
  const report = (value) => {
    const out = document.createElement("pre");
    out.id = "advrepro-report-check";
    out.textContent = JSON.stringify(value);
    document.body.appendChild(out);
  };
  try {
    await sleep(200);
    const landing = document.querySelector("#app").innerText;
    const seen = [];
    for (const category of Object.keys(categories)) {
      for (const subcategory of Object.keys(categories[category])) {
        const open = async () => {
          app.setView({ navbarMode: "subcategory", category: category, subcategory: subcategory });
          await sleep(40);
          return Array.from(nav().querySelectorAll("tbody tr"));
        };
        const count = (await open()).length;
        for (let i = 0; i < count; i++) {
          const row = (await open())[i];
          const entry = { category: category, subcategory: subcategory,
                          name: row.querySelector("td").innerText.trim() };
          const view = row.querySelectorAll("a")[0];
          if (view.getAttribute("href") === "#") {
            view.click();
            await sleep(40);
            const img = content().querySelector("img");
            const frame = content().querySelector("iframe");
            if (img) {
              for (let k = 0; k < 50 && !(img.complete && img.naturalWidth > 0); k++) {
                await sleep(20);
              }
              entry.shown = "img:" + img.naturalWidth;
            } else if (frame) {
              const src = frame.getAttribute("src") || "";
              entry.shown = "iframe:" + src.slice(5, src.indexOf(";"));
              entry.page = new TextDecoder().decode(Uint8Array.from(
                atob(src.slice(src.indexOf("base64,") + 7)), (c) => c.charCodeAt(0)));
            }
          } else {
            entry.shown = "download:" + (view.getAttribute("download") || "");
          }
          (await open())[i].querySelectorAll("a")[1].click();
          await sleep(40);
          entry.info = nav().innerText;
          seen.push(entry);
        }
      }
    }
    report({ landing: landing, entries: seen });
  } catch (err) {
    report({ error: String(err) + "\n" + err.stack });
  }
})();
"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it): "
                "the report's rendering in a browser is not checked")


def rendered(report: Path, tmp_path: Path) -> dict:
    """What the report showed in headless Chromium (DRIVER's JSON, read from the dumped DOM)."""
    page = report.read_text()
    end = page.rindex("</body>")
    driven = tmp_path / "driven.html"
    driven.write_text(page[:end] + "<script>" + DRIVER + "</script>" + page[end:])
    done = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=120000",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", driven.as_uri()],
        capture_output=True, text=True, timeout=300)
    found = re.search(r'<pre id="advrepro-report-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the driver wrote nothing (rc {done.returncode}): {done.stderr[-2000:]}"
    shown = json.loads(html.unescape(found.group(1)))
    assert "error" not in shown, shown.get("error")
    return shown


def caption_opening(name: str) -> str:
    """The first words of a caption as the report renders them (RST literals as plain text)."""
    words = (REPORT_DIR / name).read_text().replace("``", "").replace("**", "").split()[:8]
    assert not any("{" in w for w in words), name
    return " ".join(words)


@pytest.mark.e2e
def test_the_report_shows_every_table_and_figure_of_the_run(smoke_run, tmp_path):
    assert smoke_run.done.returncode == 0, smoke_run.done.stderr[-3000:]
    results, report = smoke_run.results, tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1", "--configfile", str(SMOKE),
         *smoke_run.overrides, "--report", str(report)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and report.is_file(), done.stderr[-3000:]
    shown = rendered(report, tmp_path)

    config = load_yaml(SMOKE)
    n_evals = len(list(iter_cells(config))) * len(eval_checkpoints(config))
    keys = [t["key"] for t in yaml.safe_load((REPO_ROOT / "paper_tables/papers.yaml").read_text())
            ["tables"]]
    run, pages, papers = config["run_name"], results / "report" / config["run_name"], \
        results / "paper_tables"
    # (category, subcategory, file name) -> (caption, the Markdown an HTML page renders)
    expected = {
        ("Tables", "Run table", "run_table.html"): ("run_table.rst", results / f"tables/{run}.md"),
        ("Tables", "Run table", f"{run}.csv"): ("run_table.rst", None),
        ("Masking", "Masking report", "masking.html"):
            ("masking.rst", results / f"tables/masking/{run}.md"),
        ("Masking", "Masking report", f"{run}.csv"): ("masking.rst", None),
        ("Claims", "Claims table", "claims.html"): ("claims.rst", papers / "claims.md"),
        ("Claims", "Claims table", "claims.csv"): ("claims.rst", None),
        ("Paper tables", "index", "index.html"):
            ("paper_tables.rst", papers / "papers" / "index.md"),
        ("Plots", "eps_curves", f"{run}.png"): ("eps_curves.rst", None),
        ("Plots", "eps_curves", f"{run}.csv"): ("eps_curves.rst", None),
    }
    for key in keys:
        expected[("Paper tables", key, f"{key}.html")] = ("paper_tables.rst",
                                                          papers / "papers" / f"{key}.md")
        expected[("Paper tables", key, f"{key}.csv")] = ("paper_tables.rst", None)
    for name in PLOTS:
        for suffix in ("png", "csv"):
            expected[("Plots", name, f"{name}.{suffix}")] = (f"plots/{name}.rst", None)

    entries = {(e["category"], e["subcategory"], e["name"]): e for e in shown["entries"]}
    assert len(entries) == len(shown["entries"]), "a result listed twice"
    assert sorted(entries) == sorted(expected)
    for where, (caption, markdown) in expected.items():
        entry, name = entries[where], where[2]
        info = " ".join(entry["info"].split())
        assert caption_opening(caption) in info, (where, info[:400])
        assert f"from the {n_evals} evaluation files" in info, (where, info[:600])
        if name.endswith(".png"):
            assert entry["shown"].startswith("img:") and int(entry["shown"][4:]) > 100, entry["shown"]
        elif name.endswith(".html"):
            assert entry["shown"] == "iframe:text/html", (where, entry["shown"])
            assert entry["page"] == md.markdown_to_html(markdown.read_text(), markdown.name), where
            tables = Page(entry["page"]).tables
            assert [(len(t), {len(r) for r in t}) for t in tables] == pipe_table_shapes(
                markdown.read_text()), where
        else:
            assert entry["shown"] == f"download:{name}", (where, entry["shown"])

    landing = " ".join(shown["landing"].split())
    assert "advrepro: the tables and figures of one run" in landing
    assert f"run_name: {run}" in landing and str(results / "paper_tables") in landing
    for category in ("Tables", "Paper tables", "Claims", "Plots", "Masking"):
        assert category in landing
