"""A paper table's sections as Markdown and LaTeX.  No torch.

:class:`Table` is one captioned table (header, rows of text, notes); :func:`render_md` and
:func:`render_tex` write it (a booktabs ``tabular``, every cell escaped:
:func:`methods.text_escape.tex_escape`).  The tables of one paper table, from its CSV rows
(:mod:`methods.paper_tables_compare`): per paper_key, :func:`published_tables` -- a grid laid
out like the paper (rows: method / variant x dataset x arch x eps; columns: the paper's metric
and attack), then every published row with its source and evidence level; and the This-run
section, :func:`run_table` -- the run's cells of the table's recipes as mean [95% interval over
seeds], with a sentence when none of them is linked to a published row.  :data:`RULE` states
the band and the verdicts in words (the caption of every table file and of the index).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from .paper_tables_compare import MARKERS
from .paper_tables_measure import RunGroup, has_value
from .text_escape import md_cell, tex_escape


@dataclass
class Table:
    """One captioned table: header, rows of free text (escaped when rendered), notes below."""
    caption: str
    header: List[str]
    rows: List[List[str]]
    notes: List[str] = field(default_factory=list)


#: A paper table's sections in order: (heading, its tables); the last is "This run".
Sections = List[Tuple[str, List[Table]]]


def render_md(t: Table) -> List[str]:
    """The Markdown lines of ``t`` (``(no rows)`` for an empty one), a blank line last."""
    lines = [t.caption, ""] if t.caption else []
    if t.rows:
        lines += ["| " + " | ".join(md_cell(h) for h in t.header) + " |",
                  "|" + "---|" * len(t.header)]
        lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in t.rows]
    else:
        lines.append("(no rows)")
    return lines + ([""] + t.notes if t.notes else []) + [""]


def render_tex(t: Table) -> List[str]:
    """The LaTeX lines of ``t``: a booktabs table, or the caption alone for an empty one."""
    if not t.rows:
        return ([tex_escape(t.caption) + r" (no rows)\par"]
                + [r"{\footnotesize " + tex_escape(n) + r"\par}" for n in t.notes] + [""])
    lines = [r"\begin{table}[htbp]", r"\centering\scriptsize",
             r"\caption{" + tex_escape(t.caption) + "}",
             r"\begin{tabular}{" + "l" * len(t.header) + "}", r"\toprule",
             " & ".join(tex_escape(h) for h in t.header) + r" \\", r"\midrule"]
    lines += [" & ".join(tex_escape(c) for c in row) + r" \\" for row in t.rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    lines += [r"{\footnotesize " + tex_escape(n) + r"\par}" for n in t.notes]
    return lines + [""]


def _pts(x: Any, digits: int = 2) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _interval(r: Mapping[str, Any], digits: int) -> str:
    if not has_value(r.get("mean")):
        return "n/a"
    return (f"{_pts(r['mean'], digits)} [{_pts(r['ci_low'], digits)}, "
            f"{_pts(r['ci_high'], digits)}]")


def _verdict_text(r: Mapping[str, Any]) -> str:
    return r["verdict"] + (f" ({r['reason']})" if r.get("reason") else "")


def _published_text(r: Mapping[str, Any]) -> str:
    q = "" if r.get("value_qualifier") in (None, "", "=") else r["value_qualifier"]
    if math.isnan(r["published"]):
        return "n/a"
    return f"{q}{'' if not q or q in '<=>' else ' '}{r['published']:g}"


#: The band and the verdicts in words (:mod:`methods.paper_tables_band`).
RULE = ("Accuracies in points.  Reproduced: mean over the seeds of the linked cell, 95% "
        "interval = mean +- half-width, half-width = t(0.975, n-1) * sqrt(s^2/n + v/n) with s "
        "the seed standard deviation and v the mean over seeds of each seed's binomial variance "
        "p(1-p)/N (N test examples); with one seed 1.96 * sqrt(p(1-p)/N) (1 seed: binomial "
        "only).  within band: |mean - published| <= half-width (a published bound '<=', '>=' is "
        "met when the interval reaches it); otherwise below / above.  delta = reproduced - "
        "published.  A row's number comes only from cells whose recipe links it (same protocol: "
        "verdict; different protocol: shown, not comparable) on the cell's dataset and eps, and "
        "from the evaluated metric the row names.")


def _legend(rows: List[Mapping[str, Any]]) -> List[str]:
    marks = {m for r in rows for m in (r.get("markers") or "").split("; ") if m}
    used = [k for k in MARKERS if any(m.startswith(k) for m in marks)]
    return ["Markers: " + "; ".join(f"{k}{'N' if k.endswith('=') else ''}: {MARKERS[k]}"
                                     for k in used) + "."] if used else []


def _grid_text(lines: List[Mapping[str, Any]]) -> str:
    """One published row in the paper-shaped grid: its value, then this run's mean and verdict
    per linked cell (``best`` checkpoints tagged), or the verdict alone."""
    reproduced = [f"{_pts(r['mean'], 1)} {r['verdict']}"
                  + (" [best]" if r.get("checkpoint") == "best" else "")
                  for r in lines if has_value(r.get("mean"))]
    if reproduced:
        return f"{_published_text(lines[0])} -> " + ", ".join(reproduced)
    return f"{_published_text(lines[0])} ({lines[0]['verdict']})"


def published_tables(paper: Mapping[str, Any], rows: List[Dict[str, Any]],
                     layout: Mapping[str, Sequence[str]]) -> List[Table]:
    """The grid (laid out like the paper) and the every-row table of one paper_key."""
    title = f"{paper.get('title', paper['paper_key'])} ({paper['paper_key']})"
    if not rows:
        return [Table(title + ": no published row with this paper_key in the published CSVs",
                      [], [])]
    row_cols = list(paper.get("rows") or layout["rows"])
    col_cols = list(paper.get("columns") or layout["columns"])
    key_of = lambda r, cols: tuple(r.get(f"pub_{c}", "") for c in cols)
    present_rows = [c for c in row_cols if any(r.get(f"pub_{c}") for r in rows)]
    lines_of: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        lines_of.setdefault(r["published_id"], []).append(r)
    grid: Dict[tuple, Dict[tuple, List[str]]] = {}
    columns: List[tuple] = []
    for same in lines_of.values():
        rk, ck = key_of(same[0], present_rows), key_of(same[0], col_cols)
        columns += [ck] if ck not in columns else []
        grid.setdefault(rk, {}).setdefault(ck, []).append(_grid_text(same))
    grid_table = Table(f"{title}, as laid out in the paper (published -> this run's mean and "
                       "verdict per linked cell; [best] = best checkpoint)",
                       present_rows + ["; ".join(c for c in ck if c) for ck in columns],
                       [list(rk) + ["; ".join(grid[rk].get(ck, [])) for ck in columns]
                        for rk in grid])
    sources: List[str] = []
    detail = []
    for r in rows:
        src = f"{r['source']} (evidence: {r['evidence'] or 'not stated'})"
        sources += [src] if src not in sources else []
        run_cell = f"{r['dataset']}/{r['arch']}/{r['recipe']}" if r.get("recipe") else ""
        detail.append([r["published_id"],
                       " / ".join(x for x in (r["pub_method"], r["pub_variant"]) if x),
                       r["pub_dataset"], r["pub_arch"], r["pub_eps"],
                       "; ".join(x for x in (r["pub_metric"], r["pub_attack"]) if x),
                       _published_text(r), r["evidence"], f"[{sources.index(src) + 1}]", run_cell,
                       r.get("checkpoint") or "", r.get("metric_label") or "",
                       str(r["n_seeds"]) if has_value(r.get("n_seeds")) else "",
                       _interval(r, 2), _pts(r.get("delta")), _verdict_text(r),
                       r.get("markers") or "", r.get("pub_note") or ""])
    detail_table = Table(f"{title}: every published row", [
        "id", "method / variant", "dataset", "arch", "eps", "metric; attack", "published",
        "evidence", "source", "this run's cell", "ckpt", "evaluated", "n seeds",
        "reproduced [95%]", "delta", "verdict", "markers",
        "note (corrections, conflicts, second readings)"], detail,
        ["Sources: " + "  ".join(f"[{i + 1}] {s}" for i, s in enumerate(sources))]
        + _legend(rows))
    return [grid_table, detail_table]


def run_table(run: Sequence[Mapping[str, Any]], groups: List[RunGroup],
              rows: List[Dict[str, Any]], linked_any: bool) -> Table:
    """The This-run section: a row per group (one column per metric label of ``rows``, the
    section's CSV rows), with a note when ``groups`` is empty (naming the registry entry's
    ``run`` recipes) or when no group is linked to a published row (not ``linked_any``)."""
    labels: List[str] = []
    for r in rows:
        if r["metric_label"] not in labels:
            labels.append(r["metric_label"])
    first = {l: i for i, l in enumerate(labels)}
    labels.sort(key=lambda l: (l != "clean", l.startswith("AutoAttack"), first[l]))
    by = {(r["dataset"], r["arch"], r["recipe"], r["checkpoint"], r["metric_label"]): r
          for r in rows}
    body = []
    for g in groups:
        cells = []
        for l in labels:
            r = by.get((g.dataset, g.arch, g.recipe, g.checkpoint, l))
            cells.append(_interval(r, 1) if r else "n/a")
        marks = sorted({m for r in rows if (r["dataset"], r["arch"], r["recipe"], r["checkpoint"])
                        == (g.dataset, g.arch, g.recipe, g.checkpoint)
                        for m in (r["markers"] or "").split("; ") if m})
        body.append([g.recipe, g.method, g.dataset, g.arch, g.checkpoint, str(len(g.rows))]
                    + cells + ["; ".join(marks)])
    notes = _legend(rows)
    if not groups:
        recipes = ", ".join(e["recipe"]
                            + (f" on {', '.join(e['datasets'])}" if e.get("datasets") else "")
                            for e in run)
        notes.append(f"This run has no cell of this paper's recipes ({recipes}).")
    elif not linked_any:
        notes.append("No cell of this run is linked to a published row of this paper (datasets "
                     f"here: {', '.join(sorted({g.dataset for g in groups}))}): no published row "
                     "is at this scale, and these are this run's own numbers.")
    return Table("This run: the cells of this paper's recipes, accuracy in % as mean [95% "
                 "interval over seeds] (the band of the caption)",
                 ["recipe", "method", "dataset", "arch", "ckpt", "seeds"] + labels + ["markers"],
                 body, notes)


def render_document(key: str, title: str, head: Sequence[str], sections: Sections
                    ) -> Tuple[str, str]:
    """The Markdown and LaTeX files of one paper table: ``title``, the ``head`` paragraphs, a
    "Published numbers" heading with each paper_key's section under it, then "This run"."""
    md = [f"# {title}", ""] + [h + "\n" for h in head]
    tex = [f"% {key}: regenerated by methods/paper_tables.py; needs booktabs",
           r"\section*{" + tex_escape(title) + "}"] + [tex_escape(h) + r"\par" for h in head]
    md += ["## Published numbers", ""]
    tex.append(r"\subsection*{Published numbers}")
    for heading, parts in sections:
        level = "##" if heading == "This run" else "###"
        md += [f"{level} {heading}", ""]
        tex.append((r"\subsection*{" if level == "##" else r"\subsubsection*{")
                   + tex_escape(heading.replace("`", "")) + "}")
        for part in parts:
            md += render_md(part)
            tex += render_tex(part)
    return "\n".join(md), "\n".join(tex) + "\n"
