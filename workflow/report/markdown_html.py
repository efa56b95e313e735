"""The run's Markdown tables as standalone HTML pages, for the Snakemake report only.

Snakemake's HTML report shows images, PDFs and HTML inline, but offers CSV and Markdown files only
as downloads; rule ``report_tables_html`` (workflow/rules/report.smk) therefore renders each
Markdown table written by the table rules into an HTML page the report displays.  The Markdown
files stay the tables of record; this page shows the same text.

    python -m workflow.report.markdown_html IN.md OUT.html [IN.md OUT.html ...]

(from the repository root, as the rule runs it: the module imports :mod:`methods.results`).

The Markdown is rendered by Python-Markdown (pinned in envs/requirements.txt) with its ``tables``
extension: pipe tables, where ``\\|`` (how :func:`methods.text_escape.md_cell` writes a bar) is
a literal ``|`` inside a cell.  Two departures from plain Python-Markdown, both for a page that
the report embeds as a ``data:`` URI (:class:`ReportPage`):

* raw HTML in the text is shown as text (a cell reading ``<d>`` shows ``<d>``), not passed on;
* a relative link (``[tex](key.tex)``) becomes its text, since it would lead nowhere from inside
  the report; an absolute link (``http(s)://``) opens in a new tab.

Otherwise a cell is Markdown like the rest of the file (``**bold**`` is bold, ``&lt;`` an
entity), as in any Markdown viewer of the ``.md`` file.  Known limit: inside a code span (```x\\|y```) Python-Markdown keeps the backslash; the table
writers put no code spans in cells.  No torch; each page is written atomically
(:func:`methods.results.atomic_write_text`).
"""
from __future__ import annotations

import html
import sys
from pathlib import Path
from typing import List

import markdown
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor

from methods.results import atomic_write_text

STYLE = """
body { font-family: system-ui, sans-serif; font-size: 14px; margin: 1.5em; color: #1e293b; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #cbd5e1; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f1f5f9; }
tr:nth-child(even) td { background: #f8fafc; }
code { background: #f1f5f9; padding: 0 2px; }
"""
#: Python-Markdown extensions the pages are rendered with (besides :class:`ReportPage`).
EXTENSIONS = ["tables"]
ABSOLUTE = ("http://", "https://")


class ReportLinks(Treeprocessor):
    """Relative links -> ``<span>`` of their text; absolute links get ``target="_blank"``."""

    def run(self, root):
        for link in root.iter("a"):
            if link.get("href", "").startswith(ABSOLUTE):
                link.set("target", "_blank")
            else:
                link.tag = "span"
                link.attrib.clear()
        return None


class ReportPage(Extension):
    """Python-Markdown set up for a page inside the report: no raw HTML (the block and inline
    HTML handlers are removed, so ``<...>`` is escaped as text) and :class:`ReportLinks`, run
    after the inline patterns have made the links."""

    def extendMarkdown(self, md):
        md.preprocessors.deregister("html_block")
        md.inlinePatterns.deregister("html")
        md.treeprocessors.register(ReportLinks(md), "report_links", 5)


def markdown_to_html(text: str, title: str) -> str:
    """A standalone HTML page (``title``, a small stylesheet) of the Markdown ``text``."""
    body = markdown.markdown(text, extensions=[*EXTENSIONS, ReportPage()], output_format="html")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + body + "\n</body></html>\n")


def write_page(source: Path, out: Path) -> None:
    """Render ``source`` (a Markdown file) to ``out``, titled with the Markdown file's name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, markdown_to_html(source.read_text(encoding="utf-8"), source.name))


def main(argv: List[str]) -> int:
    if not argv or len(argv) % 2:
        print("usage: python -m workflow.report.markdown_html IN.md OUT.html [IN.md OUT.html ...]",
              file=sys.stderr)
        return 2
    for source, out in zip(argv[::2], argv[1::2]):
        write_page(Path(source), Path(out))
        print(f"{source} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
