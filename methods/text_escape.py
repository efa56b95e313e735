"""Free text as one Markdown table cell or as LaTeX text.  No torch, no project imports.

Shared by every table writer (:mod:`methods.tables`, :mod:`methods.paper_tables_render`,
:mod:`methods.claims`).  Both functions take any value: ``None`` is the empty string, anything
else its ``str()``; whitespace runs (line breaks included) collapse to one space and the ends
are stripped, so a value never breaks a table row.
"""
from __future__ import annotations

from typing import Any

#: LaTeX special characters -> their text-mode escapes (``<`` and ``>`` too: in the default
#: OT1 font encoding they would print as inverted exclamation / question marks).
TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
               "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
               "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}"}


def one_line(text: Any) -> str:
    """``text`` as one line: ``None`` -> ``""``, whitespace runs -> one space, ends stripped."""
    return " ".join(("" if text is None else str(text)).split())


def md_cell(text: Any) -> str:
    """``text`` as one Markdown table cell: one line (:func:`one_line`), pipes escaped."""
    return one_line(text).replace("|", "\\|")


def tex_escape(text: Any) -> str:
    """``text`` as LaTeX text: one line (:func:`one_line`), every character of
    :data:`TEX_ESCAPES` escaped."""
    return "".join(TEX_ESCAPES.get(ch, ch) for ch in one_line(text))
