"""Published numbers as a schema-checked table.  No torch.

``paper_tables/published/<stem>.csv`` holds one published number per row: the source file's raw
columns with their text unchanged (recipe links, ``published.rows`` and
``published.different_protocol`` in ``workflow/config/papers/*.yaml``, match them as text) and
structured columns (numbers as numbers, small vocabularies) that
``workflow/schemas/published.schema.json`` defines for one row.  The verbatim source files are in
``paper_tables/published/source/``; :mod:`methods.published_build` derives the structured files
from them, and ``paper_tables/README.md`` documents the columns and vocabularies.

* :func:`load_published` reads structured CSVs into a typed frame (``value`` a float,
  ``attack_steps`` a nullable integer, ...), validating every row; a bad row raises
  :class:`PublishedError` naming the file, the row id and the field.
* :func:`load_for_tables` is the frame :func:`methods.tables.load_published` returns: the same,
  but ``value`` is the source's text (``value_text``: ">13" keeps its qualifier in a Markdown
  table), and a CSV in the source format (no ``id`` column) is read as text, unvalidated, as the
  tables always read it.
* :func:`cells_for_rows` computes the ``cells`` / ``link`` / ``no_cell_reason`` columns: the
  cells of the paper config (``workflow/config/paper.yaml`` and its ``recipe_files``) whose
  recipe links the row, matched exactly as the tables match them
  (:func:`methods.tables.published_for`: the link's columns as text, then dataset and eps per
  cell), or, for a row no cell links, the first reason of :data:`NO_CELL_REASONS` that applies.
  ``python -m methods.published --update-cells`` refills those columns in place, so they are
  never edited by hand; ``--check`` fails when they differ from the computed ones.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import jsonschema
import pandas as pd

from .config import REPO_ROOT, SCHEMA_DIR, load_recipes, load_yaml, iter_cells, resolve_cell
from .results import atomic_write_text

SCHEMA_NAME = "published.schema.json"
PUBLISHED_DIR = REPO_ROOT / "paper_tables" / "published"
SOURCE_DIR = PUBLISHED_DIR / "source"
#: The structured published files, in the order the configs list them.
PUBLISHED_STEMS = ("bb_nfgsm_fgsmrs_pgd_selective", "iada_mixup_layerwise_batchout",
                   "fgsm_rs_additions")
PAPER_CONFIG = REPO_ROOT / "workflow" / "config" / "paper.yaml"
#: The two ways a recipe links a published row (``published.<kind>`` in a recipe file).
LINK_KINDS = ("rows", "different_protocol")
#: Columns computed by :func:`cells_for_rows` (never edited by hand).
CELL_COLUMNS = ("cells", "link", "no_cell_reason")


class PublishedError(ValueError):
    """A published row does not fit the schema; the message names the file, row id and field."""


def published_paths() -> List[Path]:
    return [PUBLISHED_DIR / f"{stem}.csv" for stem in PUBLISHED_STEMS]


@lru_cache(maxsize=1)
def _schema_text() -> str:
    return (SCHEMA_DIR / SCHEMA_NAME).read_text()


def schema() -> Dict[str, Any]:
    return json.loads(_schema_text())


def columns() -> List[str]:
    """Every column of a structured published CSV, in file order (the schema's ``required``)."""
    return list(schema()["required"])


def _types(spec: Mapping[str, Any]) -> Tuple[str, ...]:
    t = spec.get("type", "string")
    return tuple(t) if isinstance(t, list) else (t,)


def _typed(text: str, spec: Mapping[str, Any]) -> Any:
    """A CSV cell as the schema's type: '' is null where null is allowed; a cell that does not
    parse stays text, so the schema reports the field."""
    types = _types(spec)
    if text == "" and "null" in types:
        return None
    try:
        if "integer" in types:
            return int(text)
        if "number" in types:
            return float(text)
    except ValueError:
        return text
    if "boolean" in types:
        return {"true": True, "false": False}.get(text, text)
    return text


def parse_row(raw: Mapping[str, Optional[str]]) -> Dict[str, Any]:
    """One CSV row (text cells) as a schema-typed dict; columns the schema does not know are
    kept as text (the schema then rejects them)."""
    props = schema()["properties"]
    return {k: _typed("" if v is None else v, props.get(k, {})) for k, v in raw.items()}


@lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(_schema_text()))


def check_row(row: Mapping[str, Any], where: str) -> None:
    """Raise :class:`PublishedError` ``"<where>: row <id>: field '<f>': <problem>"`` unless
    ``row`` fits the schema."""
    error = jsonschema.exceptions.best_match(_validator().iter_errors(dict(row)))
    if error is None:
        return
    if error.validator == "required":
        field = re.search(r"'([^']+)' is a required property", error.message)
        field = field.group(1) if field else "?"
    elif error.validator == "additionalProperties":
        field = ", ".join(sorted(set(row) - set(schema()["properties"])))
    else:
        field = ".".join(str(p) for p in error.path) or "?"
    rid = row.get("id") or "(no id)"
    raise PublishedError(f"{where}: row {rid}: field {field!r}: {error.message}")


def read_rows(path: Path) -> List[Dict[str, Any]]:
    """The rows of one structured published CSV, typed and validated; ids must be
    ``<file stem>:<n>`` and unique."""
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        raw_rows = list(reader)
    rows, seen = [], set()
    for line, raw in enumerate(raw_rows, start=2):
        row = parse_row(raw)
        where = f"{path.name} (line {line})"
        check_row(row, where)
        stem = row["id"].split(":")[0]
        if stem != path.stem:
            raise PublishedError(f"{where}: row {row['id']}: field 'id': the stem must be the "
                                 f"file's, {path.stem!r}")
        if row["id"] in seen:
            raise PublishedError(f"{where}: row {row['id']}: field 'id': duplicate id")
        seen.add(row["id"])
        rows.append(row)
    return rows


def _frame(rows: List[Dict[str, Any]], file: str) -> pd.DataFrame:
    props = schema()["properties"]
    frame = pd.DataFrame(rows, columns=columns())
    for name in frame.columns:
        types = _types(props[name])
        if "integer" in types:
            frame[name] = frame[name].astype("Int64")
        elif "number" in types:
            frame[name] = frame[name].astype("float64")
        elif "boolean" in types:
            frame[name] = frame[name].astype("boolean")
    return frame.assign(file=file)


def load_published(paths: Iterable[Path]) -> pd.DataFrame:
    """Structured published CSVs as one typed frame (schema columns plus ``file``, the file
    name); every row validated (:func:`read_rows`).  A missing path is an error."""
    frames = []
    for p in paths:
        if not Path(p).exists():
            raise PublishedError(f"{p}: published file not found")
        frames.append(_frame(read_rows(Path(p)), Path(p).name))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns())


def is_structured(path: Path) -> bool:
    """Whether ``path`` is a structured published CSV (its header has ``id``) rather than a CSV
    in the source format."""
    with open(path, newline="") as f:
        return "id" in next(csv.reader(f), [])


def load_for_tables(paths: Iterable[Path]) -> pd.DataFrame:
    """The published rows as :mod:`methods.tables` and :mod:`methods.cost_plot` read them.

    A structured file: :func:`load_published` (validated), with ``value`` the source's text
    (``value_text``; e.g. ">13", "<=1", "87.30"), as the tables have always shown it.  A file in
    the source format (no ``id`` column, e.g. a hand-written test fixture): ``pandas.read_csv``
    as before, unvalidated.  Missing paths are skipped (as the tables always did)."""
    frames = []
    for p in (Path(p) for p in paths):
        if not p.exists():
            continue
        if is_structured(p):
            frame = load_published([p])
            frames.append(frame.assign(value=frame["value_text"]))
        else:
            frames.append(pd.read_csv(p).assign(file=p.name))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def cell_text(value: Any) -> str:
    """A typed value as its CSV cell: '' for null, 'true'/'false', floats in their shortest
    round-trip form."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def rows_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as structured-CSV text (schema column order)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns())
    for row in rows:
        writer.writerow([cell_text(row.get(c)) for c in columns()])
    return out.getvalue()


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Validate ``rows`` and write them atomically as a structured published CSV."""
    for row in rows:
        check_row(row, Path(path).name)
    atomic_write_text(Path(path), rows_csv(rows))


# ----------------------------------------------------------------------------- cells
def linked_cells(config_path: Path = PAPER_CONFIG,
                 published: Optional[Iterable[Path]] = None) -> Dict[str, List[Tuple[str, str]]]:
    """``{row id: [(cell "dataset/arch/recipe", link kind), ...]}`` for the config's cells whose
    recipe links the row by ``published.rows`` or ``published.different_protocol`` (its
    ``match`` mappings), matched by :func:`methods.tables.published_for` (link columns as
    text, then the cell's dataset and eps).  Seeds are not part of a cell name here."""
    from .tables import published_for   # methods.tables imports this module

    config = load_yaml(Path(config_path))
    recipes = load_recipes(config)
    pub = load_published(list(published) if published is not None else published_paths())
    found: Dict[str, set] = {}
    for dataset, arch, _method, recipe, seed in iter_cells(config):
        links = recipes[recipe].get("published") or {}
        by_kind = {"rows": links.get("rows") or [],
                   "different_protocol": [d["match"] for d in links.get("different_protocol") or []]}
        if not any(by_kind.values()):
            continue
        cell = resolve_cell(config, dataset, arch, recipe, seed, recipes)
        for kind in LINK_KINDS:
            annotation = {"published": {"rows": by_kind[kind]}}
            for row in published_for(cell, annotation, pub):
                found.setdefault(row["id"], set()).add((f"{dataset}/{arch}/{recipe}", kind))
    return {rid: sorted(pairs) for rid, pairs in found.items()}


def _any(*words: str) -> Callable[[str], bool]:
    return lambda text: any(w.lower() in text.lower() for w in words)


#: Why no cell of the paper config can reproduce a row: (name, test on the row, reason); the
#: first that applies is the row's ``no_cell_reason``.  Order matters: data and metric first.
#: There is no catch-all: a row no recipe links and no rule explains has an empty reason, which
#: the tests reject (add a link in a recipe file or a rule here).
NO_CELL_REASONS: List[Tuple[str, Callable[[Mapping[str, Any]], bool], str]] = [
    ("imagenet", lambda r: _any("imagenet", "mscoco")(r["dataset"]),
     "ImageNet / MSCOCO are not in the suite"),
    ("ratio", lambda r: r["metric_kind"] in ("acc_gain", "speedup", "compute_reduction",
                                             "relative_error_increase"),
     "a gain or a ratio between runs, not one model's number"),
    ("free_at", lambda r: _any("free at")(r["method"]),
     "Free AT is not implemented"),
    ("train_time", lambda r: r["metric_kind"] in ("train_time", "time_per_epoch"),
     "a training time of a run no recipe reproduces (the paper's hardware and schedule)"),
    ("gla_cala", lambda r: r["paper_key"] == "gla_cala",
     "context rows of a sibling paper (GLA/CALA): its methods and baselines have no recipe"),
    ("mi_ablation", lambda r: r["paper_key"] == "mixup_inference" and "(ablation)" in r["method"],
     "MI-OL on an ERM / adversarially trained base model: no Mixup Inference recipe trains that "
     "base model"),
    ("other_arch", lambda r: _any("resnet-18 (hooks)", "densenet", "preactresnet152")(r["arch"]),
     "architecture not in the paper config (no cell of this network)"),
    ("manifold_mixup_setting", lambda r: r["paper_key"] == "manifold_mixup",
     "the Manifold Mixup recipes run on CIFAR-10 with PreActResNet18 only; this row is another "
     "dataset or network"),
]


def no_cell_reason(row: Mapping[str, Any]) -> str:
    """The first reason of :data:`NO_CELL_REASONS` that applies to ``row`` ('' if none)."""
    return next((reason for _, test, reason in NO_CELL_REASONS if test(row)), "")


def cells_for_rows(rows: Sequence[Mapping[str, Any]], config_path: Path = PAPER_CONFIG,
                   published: Optional[Iterable[Path]] = None) -> Dict[str, Dict[str, str]]:
    """``{row id: {"cells", "link", "no_cell_reason"}}`` for ``rows`` (typed dicts with the
    structured columns): ``cells`` the ';'-joined linked cells (:func:`linked_cells`), ``link``
    one kind for all of them or one per cell in the same order, ``no_cell_reason`` only when
    there is no cell (:func:`no_cell_reason`)."""
    linked = linked_cells(config_path, published)
    out = {}
    for row in rows:
        pairs = linked.get(row["id"], [])
        kinds = [k for _, k in pairs]
        out[row["id"]] = {
            "cells": ";".join(c for c, _ in pairs),
            "link": kinds[0] if kinds and len(set(kinds)) == 1 else ";".join(kinds),
            "no_cell_reason": "" if pairs else no_cell_reason(row)}
    return out


def update_cells(paths: Optional[Sequence[Path]] = None, config_path: Path = PAPER_CONFIG,
                 write: bool = True) -> Dict[str, List[str]]:
    """Recompute the :data:`CELL_COLUMNS` of every row of ``paths`` (default: the structured
    published files), writing the files when ``write``; return ``{file name: [ids changed]}``."""
    paths = [Path(p) for p in (paths or published_paths())]
    per_file = {p: read_rows(p) for p in paths}
    computed = cells_for_rows([r for rows in per_file.values() for r in rows], config_path, paths)
    changed: Dict[str, List[str]] = {}
    for path, rows in per_file.items():
        new = [{**r, **computed[r["id"]]} for r in rows]
        changed[path.name] = [r["id"] for r, n in zip(rows, new)
                              if any(r[c] != n[c] for c in CELL_COLUMNS)]
        if write and changed[path.name]:
            write_rows(path, new)
    return changed


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m methods.published", description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--update-cells", action="store_true",
                      help="refill cells / link / no_cell_reason from the paper config")
    mode.add_argument("--check", action="store_true",
                      help="validate the files; fail if the cell columns are out of date")
    p.add_argument("--config", default=str(PAPER_CONFIG))
    p.add_argument("files", nargs="*", help="structured published CSVs (default: all)")
    args = p.parse_args(argv)
    changed = update_cells([Path(f) for f in args.files] or None, Path(args.config),
                           write=args.update_cells)
    for name, ids in changed.items():
        verb = "updated" if args.update_cells else "out of date"
        print(f"{name}: {len(ids)} rows {verb}" + (f" ({', '.join(ids[:8])}...)" if ids else ""))
    return 1 if args.check and any(changed.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
