"""The run's Markdown tables as standalone HTML pages, for the Snakemake report only.

Snakemake's HTML report shows images, PDFs and HTML inline, but offers CSV and Markdown files only
as downloads; rule ``report_tables_html`` (workflow/rules/report.smk) therefore renders each
Markdown table written by the table rules into an HTML page the report displays.  The Markdown
files stay the tables of record; this page shows the same text.

    python workflow/report/markdown_html.py IN.md OUT.html [IN.md OUT.html ...]

Only the Markdown the table writers produce is understood: ``#`` headings, pipe tables (a header
row, a ``|---|`` rule, body rows; ``\\|`` is a literal bar), ``-`` / ``*`` bullet lists and
paragraphs, with inline code, ``**bold**``, ``*italic*`` and links (relative links become their
text: the page is embedded in the report, where they would lead nowhere).  Standard library only,
no torch; each page is written atomically (temporary file, then rename).
"""
from __future__ import annotations

import html
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import List

STYLE = """
body { font-family: system-ui, sans-serif; font-size: 14px; margin: 1.5em; color: #1e293b; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #cbd5e1; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f1f5f9; }
tr:nth-child(even) td { background: #f8fafc; }
code { background: #f1f5f9; padding: 0 2px; }
"""
HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
BULLET = re.compile(r"^[-*]\s+(.*)$")
RULE_ROW = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
CODE = re.compile(r"`([^`]+)`")
BOLD = re.compile(r"\*\*(.+?)\*\*")
ITALIC = re.compile(r"(?<![*\w])\*(?!\s)(.+?)(?<!\s)\*(?![*\w])")
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def inline(text: str) -> str:
    """One line of Markdown text as HTML: escaped, then code spans, links, bold, italic."""
    codes: List[str] = []

    def keep_code(m: re.Match) -> str:
        codes.append(f"<code>{m.group(1)}</code>")
        return f"\x00{len(codes) - 1}\x00"

    out = CODE.sub(keep_code, html.escape(text, quote=False))

    def link(m: re.Match) -> str:
        target = m.group(2)
        if target.startswith(("http://", "https://")):
            return f'<a href="{html.escape(target)}" target="_blank">{m.group(1)}</a>'
        return m.group(1)

    out = ITALIC.sub(r"<em>\1</em>", BOLD.sub(r"<strong>\1</strong>", LINK.sub(link, out)))
    return re.sub("\x00(\\d+)\x00", lambda m: codes[int(m.group(1))], out)


def split_row(line: str) -> List[str]:
    """The cells of a pipe-table row (outer bars optional; ``\\|`` stays a bar inside a cell)."""
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)]


def table_html(lines: List[str]) -> str:
    head, body = split_row(lines[0]), [split_row(line) for line in lines[2:]]
    rows = ["<tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"]
    rows += ["<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in body]
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def is_table(lines: List[str], i: int) -> bool:
    return (lines[i].lstrip().startswith("|") and i + 1 < len(lines)
            and bool(RULE_ROW.match(lines[i + 1].strip())))


def markdown_to_html(text: str, title: str) -> str:
    """A standalone HTML page (with a small stylesheet) of the Markdown ``text``."""
    lines, parts, i = text.splitlines(), [], 0
    paragraph: List[str] = []
    bullets: List[str] = []

    def flush() -> None:
        if paragraph:
            parts.append("<p>" + " ".join(inline(p) for p in paragraph) + "</p>")
            paragraph.clear()
        if bullets:
            parts.append("<ul>" + "".join(f"<li>{inline(b)}</li>" for b in bullets) + "</ul>")
            bullets.clear()

    while i < len(lines):
        line = lines[i].rstrip()
        heading, bullet = HEADING.match(line), BULLET.match(line)
        if not line.strip():
            flush()
        elif heading:
            flush()
            level = len(heading.group(1))
            parts.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
        elif is_table(lines, i):
            flush()
            end = i + 2
            while end < len(lines) and lines[end].lstrip().startswith("|"):
                end += 1
            parts.append(table_html(lines[i:end]))
            i = end
            continue
        elif bullet:
            if paragraph:
                flush()
            bullets.append(bullet.group(1))
        elif bullets:
            bullets[-1] += " " + line.strip()
        else:
            paragraph.append(line.strip())
        i += 1
    flush()
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_page(markdown: Path, out: Path) -> None:
    page = markdown_to_html(markdown.read_text(encoding="utf-8"), markdown.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: List[str]) -> int:
    if not argv or len(argv) % 2:
        print("usage: markdown_html.py IN.md OUT.html [IN.md OUT.html ...]", file=sys.stderr)
        return 2
    for markdown, out in zip(argv[::2], argv[1::2]):
        write_page(Path(markdown), Path(out))
        print(f"{markdown} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
