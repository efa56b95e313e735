"""Write the per-rule conda environments for ``snakemake --sdm conda`` from the pip lock file.

    python envs/make_conda_envs.py          # rewrite envs/*.conda.yaml from envs/requirements.txt
    python envs/make_conda_envs.py --check  # exit 1 if they differ from what the lock file gives

Two environments, each pinned exactly like ``envs/requirements.txt`` (pip packages inline, since
Snakemake 9.27 does not copy a ``-r requirements.txt`` referenced from a conda file):

* ``advrepro.conda.yaml``: every pin (prepare_data, train, evaluate, the AutoAttack shards and
  bench: torch, torchvision, pyautoattack, mlxtend, nvidia-ml-py, ...);
* ``tables.conda.yaml``: the table and plot rules (aggregate, masking report, eps curves, paper tables, claims, plots), which
  import no torch (``tests/test_layering.py``), and the report's HTML pages of the tables: the
  pins of pandas, seaborn, matplotlib, jsonschema, PyYAML, scipy and Markdown (Python-Markdown,
  workflow/report/markdown_html.py) and everything they pull in, read from the installed packages'
  metadata, so the closure follows the lock file.
"""
from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Set

ENVS = Path(__file__).resolve().parent
LOCK = ENVS / "requirements.txt"
TABLE_ROOTS = ["pandas", "seaborn", "matplotlib", "jsonschema", "PyYAML", "scipy", "Markdown"]
HEADER = ("# Conda environment for `snakemake --sdm conda` ({what}).\n"
          "# Written by envs/make_conda_envs.py from envs/requirements.txt: do not edit by hand.\n"
          "# (Snakemake does not copy `-r requirements.txt` referenced from here, so pip packages are inline.)\n")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> Dict[str, str]:
    """``{canonical name: pin line}`` of the lock file, in its order."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            pins[canonical(line.split("==")[0])] = line
    return pins


def closure(roots: List[str], pins: Dict[str, str]) -> Set[str]:
    """The roots and every requirement they pull in (unconditional ones, or markers true here),
    by the installed distributions' metadata, restricted to pinned packages."""
    from packaging.requirements import Requirement

    seen: Set[str] = set()
    todo = [canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in pins:
            raise SystemExit(f"envs/make_conda_envs.py: {name!r} is not pinned in {LOCK}")
        seen.add(name)
        for text in metadata.requires(pins[name].split("==")[0]) or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return seen


def render(what: str, lines: List[str]) -> str:
    body = "".join(f"      - {line}\n" for line in lines)
    return (HEADER.format(what=what) + "name: advrepro\nchannels: [conda-forge]\ndependencies:\n"
            "  - python=3.11\n  - pip\n  - pip:\n" + body)


def environments() -> Dict[Path, str]:
    pins = read_lock()
    tables = closure(TABLE_ROOTS, pins)
    return {
        ENVS / "advrepro.conda.yaml": render("prepare, train, evaluate, bench: every pin",
                                             list(pins.values())),
        ENVS / "tables.conda.yaml": render("tables and plots: no torch",
                                           [line for name, line in pins.items() if name in tables]),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for path, text in environments().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date with envs/requirements.txt: {', '.join(stale)} "
              f"(run: python envs/make_conda_envs.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
