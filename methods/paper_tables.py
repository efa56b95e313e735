"""One regenerated table per seed paper: published numbers beside this run's.  No torch.

:func:`write_paper_tables` writes ``<out_dir>/<key>.md``, ``<key>.tex`` and ``<key>.csv`` for
every table of the registry (``paper_tables/papers.yaml``: :func:`load_papers`), whether or not
the run has anything for it, and ``<out_dir>/index.md`` listing them with their verdict counts.
Each table has two sections.

*Published numbers*: every published row (:func:`read_published`) whose ``paper_key`` the table
lists, one sub-heading per paper_key -- a grid laid out like the paper, then every row with its
source and evidence level, each beside this run's cells whose recipe links it, with the seed
band and a verdict (``within band`` / ``below`` / ``above`` / ``not comparable`` / ``not run``
/ ``no runnable cell``) and markers.

*This run*: the run's cells of the table's recipes (papers.yaml ``run``: recipe globs, each
optionally limited to dataset globs; :func:`in_run_section`), embedded scale included, as mean
[95% interval over seeds] per metric.

The parts, bottom up:

- :mod:`methods.paper_tables_band` -- the seed band (t over seeds plus binomial) and the verdict;
- :mod:`methods.paper_tables_measure` -- run cells grouped over seeds, and the number a published
  row names read from them (or why not);
- :mod:`methods.paper_tables_compare` -- the CSV rows: published rows against linked cells,
  unlinked rows, this run's metrics (:data:`~methods.paper_tables_compare.CSV_COLUMNS`);
- :mod:`methods.paper_tables_render` -- those rows as Markdown and LaTeX tables;
- this module -- the registry, the published CSVs, and the files.
"""
from __future__ import annotations

import fnmatch
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import pandas as pd
import yaml

from .config import ConfigError
from .paper_tables_compare import CSV_COLUMNS, VERDICTS, compare, links, run_rows, unlinked
from .paper_tables_measure import RunGroup, group_rows
from .paper_tables_render import RULE, Sections, published_tables, render_document, run_table
from .results import atomic_write_text
from .tables import rows_from_results
from .text_escape import md_cell

#: Published-CSV columns read as numbers (a CSV without an ``id`` column: read as text).
NUMERIC_PUBLISHED = ("value", "eps_value", "attack_steps", "attack_restarts", "attack_step_size")


# ----------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class PaperTable:
    """One entry of papers.yaml (see its header)."""
    key: str
    title: str
    arxiv: Tuple[str, ...]
    seed: Optional[str]
    papers: Tuple[Mapping[str, Any], ...]
    run: Tuple[Mapping[str, Any], ...]
    layout: Mapping[str, Sequence[str]]


def load_papers(path: Path) -> List[PaperTable]:
    """The tables of the registry at ``path``; errors name the entry and field."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    layout = raw.get("layout") or {"rows": ["method", "variant", "dataset", "arch", "eps"],
                                   "columns": ["metric", "attack"]}
    tables, seen = [], set()
    for i, t in enumerate(raw.get("tables") or []):
        where = f"{path}: tables[{i}]"
        for req in ("key", "title", "papers", "run"):
            if req not in t:
                raise ConfigError(f"{where}.{req} is required")
        if t["key"] in seen:
            raise ConfigError(f"{where}.key: {t['key']!r} is listed twice")
        seen.add(t["key"])
        for j, p in enumerate(t["papers"]):
            if not isinstance(p, Mapping) or "paper_key" not in p:
                raise ConfigError(f"{where}.papers[{j}].paper_key is required")
        run = []
        for j, r in enumerate(t["run"]):
            entry = {"recipe": r} if isinstance(r, str) else dict(r)
            if not isinstance(entry.get("recipe"), str):
                raise ConfigError(f"{where}.run[{j}].recipe: expected a recipe glob, got {r!r}")
            run.append(entry)
        tables.append(PaperTable(str(t["key"]), str(t["title"]), tuple(t.get("arxiv") or ()),
                                 t.get("seed"), tuple(t["papers"]), tuple(run), layout))
    if not tables:
        raise ConfigError(f"{path}: tables: no table listed")
    return tables


def in_run_section(group: RunGroup, table: PaperTable) -> bool:
    """Whether ``group`` is one of ``table``'s This-run cells (a ``run`` entry's recipe glob and,
    where it lists some, dataset globs)."""
    for entry in table.run:
        if fnmatch.fnmatchcase(group.recipe, entry["recipe"]) and (
                not entry.get("datasets")
                or any(fnmatch.fnmatchcase(group.dataset, d) for d in entry["datasets"])):
            return True
    return False


# ----------------------------------------------------------------------------- published numbers
def read_published(paths: Sequence[Path]) -> pd.DataFrame:
    """The published rows of ``paths``: :func:`methods.published.load_published` where that
    module exists and the file is structured (an ``id`` column), else the CSV read as text with
    :data:`NUMERIC_PUBLISHED` as numbers and an ``id`` (``<file stem>:<line>``) where it has
    none.  A missing path is an error."""
    structured = None
    if importlib.util.find_spec(f"{__package__}.published") is not None:
        from .published import is_structured, load_published
        structured = lambda p: load_published([p]) if is_structured(p) else None
    frames = []
    for p in (Path(p) for p in paths):
        if not p.exists():
            raise FileNotFoundError(f"published file {p} not found")
        typed = structured(p) if structured else None
        if typed is not None:
            frames.append(typed)
            continue
        f = pd.read_csv(p, dtype=str)
        if "id" not in f.columns:
            f["id"] = [f"{Path(p).stem}:{i + 2}" for i in range(len(f))]
        frames.append(f.assign(file=p.name))
    if not frames:
        return pd.DataFrame()
    frame = pd.concat(frames, ignore_index=True)
    for c in NUMERIC_PUBLISHED:
        if c in frame.columns:
            frame[c] = pd.to_numeric(frame[c], errors="coerce")
    return frame


# ----------------------------------------------------------------------------- writing
def build(table: PaperTable, groups: List[RunGroup], pub: pd.DataFrame,
          linked: Mapping[str, List[Tuple[RunGroup, str, str]]]
          ) -> Tuple[List[Dict[str, Any]], Sections]:
    """The CSV rows and the sections of one paper table: a section per paper_key, then This
    run.  ``linked``: :func:`methods.paper_tables_compare.links`."""
    run_cells = {g.cell_id for g in groups}
    csv_rows: List[Dict[str, Any]] = []
    sections: Sections = []
    linked_any = False
    for paper in table.papers:
        mine = (pub[pub["paper_key"].astype(str) == str(paper["paper_key"])]
                if not pub.empty and "paper_key" in pub.columns else pd.DataFrame())
        rows: List[Dict[str, Any]] = []
        for row in mine.to_dict("records"):
            hits = linked.get(str(row["id"]), [])
            if hits:
                linked_any = True
                rows += [compare(table.key, row, g, link, why) for g, link, why in hits]
            else:
                rows.append(unlinked(table.key, row, run_cells))
        csv_rows += rows
        sections.append((f"{paper.get('title', paper['paper_key'])} (`{paper['paper_key']}`)",
                         published_tables(paper, rows, table.layout)))
    mine_groups = [g for g in groups if in_run_section(g, table)]
    runs = run_rows(table.key, mine_groups)
    csv_rows += runs
    sections.append(("This run", [run_table(table.run, mine_groups, runs, linked_any)]))
    return csv_rows, sections


def _header(table: PaperTable, n_evals: int) -> List[str]:
    """The paragraphs under a table's title: its provenance, then :data:`RULE`."""
    bits = [f"arXiv: {', '.join(table.arxiv)}" if table.arxiv else "no arXiv id",
            f"seed summary: {table.seed}" if table.seed else "no seed file"]
    return [f"Regenerated by methods/paper_tables.py from {n_evals} evaluation files "
            f"({'; '.join(bits)}).", RULE]


def write_paper_tables(eval_paths: List[Path], papers_yaml: Path, published_paths: List[Path],
                       annotations: Mapping[str, Mapping[str, Any]], out_dir: Path) -> List[Path]:
    """Write ``<key>.md``, ``<key>.tex``, ``<key>.csv`` per table of ``papers_yaml`` and
    ``index.md`` into ``out_dir``; return the written paths (module docstring)."""
    tables = load_papers(papers_yaml)
    groups = group_rows(rows_from_results(list(eval_paths)))
    pub = read_published(published_paths)
    linked = links(groups, annotations or {}, pub)
    out_dir = Path(out_dir)
    written: List[Path] = []
    index = ["# Paper tables", "", RULE, "",
             "| table | title | published rows | " + " | ".join(VERDICTS)
             + " | run cells | files |", "|" + "---|" * (len(VERDICTS) + 5)]
    for table in tables:
        csv_rows, sections = build(table, groups, pub, linked)
        md, tex = render_document(table.key, table.title, _header(table, len(eval_paths)),
                                  sections)
        frame = pd.DataFrame(csv_rows, columns=CSV_COLUMNS)
        for suffix, text in ((".md", md), (".tex", tex), (".csv", frame.to_csv(index=False))):
            path = out_dir / f"{table.key}{suffix}"
            atomic_write_text(path, text)
            written.append(path)
        index.append(_index_line(table, frame))
    index += ["", "Verdict counts are over (published row x linked cell) lines."]
    path = out_dir / "index.md"
    atomic_write_text(path, "\n".join(index) + "\n")
    return written + [path]


def _index_line(table: PaperTable, frame: pd.DataFrame) -> str:
    """The index row of a table written as ``frame`` (its CSV): published rows, the count of
    each verdict, run cells, links to the files."""
    pubs = frame[frame["section"] == "published"]
    counts = [str(int((pubs["verdict"] == v).sum())) for v in VERDICTS]
    n_rows = pubs["published_id"].nunique()
    n_cells = frame[frame["section"] == "run"][["dataset", "arch", "recipe", "checkpoint"]] \
        .drop_duplicates().shape[0]
    return (f"| {table.key} | {md_cell(table.title)} | {n_rows} | " + " | ".join(counts)
            + f" | {n_cells} | [{table.key}.md]({table.key}.md), [tex]({table.key}.tex),"
            f" [csv]({table.key}.csv) |")
