"""One regenerated table per seed paper: published numbers beside this run's.  No torch.

:func:`write_paper_tables` writes ``<out_dir>/<key>.md``, ``<key>.tex`` and ``<key>.csv`` for
every table of the registry (``paper_tables/papers.yaml``: :func:`load_papers`), whether or not
the run has anything for it, and ``<out_dir>/index.md`` listing them.  Each table has two
sections.

*Published numbers*: every published row whose ``paper_key`` the table lists, one sub-heading
per paper_key -- first a grid laid out like the paper (rows: method / variant x dataset x arch x
eps; columns: the paper's metric and attack), then every row with its source and evidence level.
A row's reproduced value comes only from this run's cells whose recipe links the row in its
annotation (:func:`methods.config.recipe_annotations`, matched by
:func:`methods.tables.published_for` on the cell's dataset and eps): ``published.rows`` = the
same protocol (a verdict), ``published.different_protocol`` = ``[{match, why}]`` (shown with its
``why``, verdict ``not comparable``).  The number read is the one the row's metric names
(:data:`METRIC_SOURCES`): ``clean_acc`` the clean accuracy; ``robust_acc`` with ``attack_name``
``pgd`` / ``fgsm`` an evaluated attack of that kind with the row's steps (PGD; required), and
its restarts, eps, norm and targeting where the row gives them; ``autoattack`` the AutoAttack
subset.  No such evaluated attack: ``not comparable (attack not evaluated: ...)``; another
metric (a gain, a time, a speed-up): ``not comparable`` with the reason.  A row no cell of this
run links: ``not run`` naming the paper.yaml cells (the row's ``cells``) that would reproduce
it, or ``no runnable cell`` with the row's ``no_cell_reason``.

*The band* (all numbers in points): per seed, an accuracy p on N examples has the binomial
variance p(1-p)/N.  Over n seeds with mean m and seed standard deviation s, the half-width is
``t(0.975, n-1) * sqrt(s^2/n + mean_binomial_var/n)`` for n >= 2, and
``1.96 * sqrt(p(1-p)/N)`` for n = 1 (marked ``1 seed: binomial only``).  The reproduced 95%
interval is m +- half-width; the verdict is ``within band`` if |m - published| <= half-width,
else ``below`` or ``above``.  A published bound (``value_qualifier`` ``<``, ``<=``, ``up to``:
an upper bound; ``>``, ``>=``: a lower one) is met when the band reaches it.  delta = m -
published.  t comes from :func:`t_975` (a table for df 1..30, a Cornish-Fisher expansion past
it): the table rule's environment has no scipy.

Markers (a column and a legend, :data:`MARKERS`): a number from the ``best`` checkpoint (chosen
on held-out or test data during training), from AutoAttack on a subset smaller than the test
set (``subset n=50``), from a different protocol, and a band from one seed.

*This run*: the run's cells of the table's recipes (papers.yaml ``run``: recipe globs, each
optionally limited to dataset globs), embedded scale included -- recipe, dataset, arch, n seeds,
clean / each attack / AutoAttack as mean [95% interval over seeds, the band above] -- and a
sentence when no cell of it is linked to a published row (nothing published is at this scale).

CSV (numbers as numbers, accuracies in points): one row per (published row x linked cell) or
unlinked published row (``section`` ``published``) and per (run cell x metric) (``section``
``run``); columns :data:`CSV_COLUMNS`.  LaTeX: a booktabs ``tabular`` per section and paper,
every cell escaped (:func:`tex_escape`).
"""
from __future__ import annotations

import fnmatch
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import pandas as pd
import yaml

from .config import ConfigError
from .results import atomic_write_text
from .tables import published_for, rows_from_results, sweep_columns

Z_975 = 1.959963984540054
#: t_{0.975, df} for df = 1..30 (scipy.stats.t.ppf(0.975, df), 6 decimals).
T_975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004,
         2.262157, 2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905,
         2.109816, 2.100922, 2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899,
         2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)
ONE_SEED = "1 seed: binomial only"
VERDICTS = ("within band", "below", "above", "not comparable", "not run", "no runnable cell")
#: value_qualifier -> which side of the band must reach the published bound.
QUALIFIER_SIDES = {"<": "upper", "<=": "upper", "up to": "upper", ">": "lower", ">=": "lower"}
MARKERS = {
    "best ckpt": "the best checkpoint: chosen on held-out (or test) data during training, not "
                 "the last epoch",
    "subset n=": "AutoAttack on a seeded stratified test subset of N examples, fewer than the "
                 "test set",
    "diff. protocol": "the recipe links the row as another protocol (the reason says what "
                      "differs): shown for comparison, no verdict",
    ONE_SEED: "one seed: the band is the binomial interval alone (no seed variance)",
}
CSV_COLUMNS = ["table", "section", "paper_key", "published_id", "paper", "evidence", "source",
               "pub_method", "pub_variant", "pub_dataset", "pub_arch", "pub_eps", "pub_metric",
               "pub_attack", "metric_kind", "published", "value_qualifier", "link", "dataset",
               "arch", "method", "recipe", "checkpoint", "metric_label", "n_seeds", "seeds",
               "n_examples", "mean", "ci_low", "ci_high", "half_width", "band_rule", "delta",
               "verdict", "reason", "markers"]
#: threat_protocol of a row about an attack on an evaluation-time defence (Mixup Inference's
#: tables): not matched to the plain attack metrics.
DEFENCE_PROTOCOLS = ("oblivious", "adaptive")
NUMERIC_PUBLISHED = ("value", "eps_value", "attack_steps", "attack_restarts", "attack_step_size")


# ----------------------------------------------------------------------------- the band
def t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"t_975: df must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975  # Cornish-Fisher: within 2e-6 of the exact quantile for df > 30
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


@dataclass(frozen=True)
class Band:
    """Mean over seeds and the 95% half-width (both in points), the rule that made it."""
    n: int
    mean: float
    half_width: float
    rule: str

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def band(accs: Sequence[float], totals: Sequence[int]) -> Band:
    """The band of per-seed accuracies ``accs`` (fractions) on ``totals`` examples (module
    docstring)."""
    if not accs or len(accs) != len(totals):
        raise ValueError(f"band: {len(accs)} accuracies for {len(totals)} totals")
    n = len(accs)
    var = [p * (1 - p) / N for p, N in zip(accs, totals)]
    m = sum(accs) / n
    if n == 1:
        return Band(1, 100 * m, 100 * Z_975 * math.sqrt(var[0]), ONE_SEED)
    s2 = sum((p - m) ** 2 for p in accs) / (n - 1)
    hw = t_975(n - 1) * math.sqrt(s2 / n + (sum(var) / n) / n)
    return Band(n, 100 * m, 100 * hw, f"t(0.975, {n - 1})")


def verdict(b: Band, published: float, qualifier: str = "") -> str:
    """``within band`` / ``below`` / ``above`` for the band against a published value (points),
    a bound when ``qualifier`` is one of :data:`QUALIFIER_SIDES`."""
    side = QUALIFIER_SIDES.get((qualifier or "").strip().lower())
    tol = 1e-9
    if side == "upper":
        return "within band" if b.low <= published + tol else "above"
    if side == "lower":
        return "within band" if b.high >= published - tol else "below"
    delta = b.mean - published
    if abs(delta) <= b.half_width + tol:
        return "within band"
    return "below" if delta < 0 else "above"


# ----------------------------------------------------------------------------- inputs
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


# ----------------------------------------------------------------------------- run cells
@dataclass
class RunGroup:
    """The seeds of one (dataset, arch, method, recipe, checkpoint) of this run."""
    dataset: str
    arch: str
    method: str
    recipe: str
    checkpoint: str
    rows: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def cell(self) -> Dict[str, Any]:
        return self.rows[0]["_cell"]

    @property
    def cell_id(self) -> str:
        return f"{self.dataset}/{self.arch}/{self.recipe}"

    @property
    def seeds(self) -> List[int]:
        return sorted(r["seed"] for r in self.rows)

    @property
    def n_test(self) -> Optional[int]:
        return self.rows[0].get("n_test")


def group_rows(rows: List[Dict[str, Any]]) -> List[RunGroup]:
    groups: Dict[tuple, RunGroup] = {}
    for r in rows:
        key = (r["dataset"], r["arch"], r["method"], r["recipe"], r["checkpoint"])
        groups.setdefault(key, RunGroup(*key)).rows.append(r)
    return [groups[k] for k in sorted(groups)]


def in_run_section(group: RunGroup, table: PaperTable) -> bool:
    for entry in table.run:
        if fnmatch.fnmatchcase(group.recipe, entry["recipe"]) and (
                not entry.get("datasets")
                or any(fnmatch.fnmatchcase(group.dataset, d) for d in entry["datasets"])):
            return True
    return False


# ----------------------------------------------------------------------------- measuring
@dataclass
class Measured:
    """One number of a run group: the label read and each seed's (accuracy, examples)."""
    label: str
    accs: List[float]
    totals: List[int]
    seeds: List[int]
    subset_n: Optional[int] = None   # AutoAttack on a subset smaller than the test set

    @property
    def band(self) -> Band:
        return band(self.accs, self.totals)


def _present(v: Any) -> bool:
    """Whether a published cell holds a value (not None, NaN, pd.NA or blank)."""
    if v is None:
        return False
    try:
        if pd.isna(v):
            return False
    except (TypeError, ValueError):
        pass
    return str(v).strip() != ""


def _text(v: Any) -> str:
    return str(v).strip() if _present(v) else ""


def _collect(group: RunGroup, label: str, get: Callable[[Dict[str, Any]], Optional[Mapping]]) -> Optional[Measured]:
    accs, totals, seeds, subset = [], [], [], None
    for r in sorted(group.rows, key=lambda r: r["seed"]):
        m = get(r)
        if not m or m.get("acc") is None or not m.get("n"):
            continue
        accs.append(float(m["acc"]))
        totals.append(int(m["n"]))
        seeds.append(r["seed"])
    return Measured(label, accs, totals, seeds, subset) if accs else None


def _clean(row: Mapping[str, Any], group: RunGroup) -> Union[Measured, str]:
    got = _collect(group, "clean", lambda r: r["_metrics"].get("clean"))
    return got or "no clean accuracy in the result files"


def _norm(text: str) -> str:
    return text.lower().replace("-", "").replace(" ", "").replace("_", "")


def _targeted_ok(row_value: Any, spec_value: Any) -> bool:
    want = _text(row_value).lower()
    if want in ("", "none", "false", "no", "0", "untargeted", "n/a"):
        return spec_value is None
    if want in ("true", "yes", "1", "targeted"):
        return spec_value is not None
    return spec_value == want


def _attack_matcher(name: str) -> Callable[[Mapping[str, Any], RunGroup], Union[Measured, str]]:
    """Reader of an evaluated ``name`` (pgd / fgsm) attack matching the row's steps (PGD),
    restarts, eps, norm and targeting; the step size only breaks ties."""
    def read(row: Mapping[str, Any], group: RunGroup) -> Union[Measured, str]:
        steps = row.get("attack_steps")
        if name == "pgd" and not _present(steps):
            return "attack not evaluated: the row states no PGD step count"
        eps = row.get("eps_value") if _present(row.get("eps_value")) else float(group.cell["threat"]["eps"])
        step_counts = {int(float(s)) for s in (steps, row.get("attack_steps_alt")) if _present(s)}

        def fits(label: str, m: Mapping[str, Any]) -> bool:
            spec, threat = m.get("attack") or {}, m.get("threat") or {}
            if "defense" in m or " | " in label or spec.get("name") != name:
                return False
            if name == "pgd" and int(spec.get("steps", -1)) not in step_counts:
                return False
            if _present(row.get("attack_restarts")) and name == "pgd" and \
                    int(spec.get("restarts", 1)) != int(float(row["attack_restarts"])):
                return False
            if abs(float(threat.get("eps", -1)) - float(eps)) > 1e-9 * max(1.0, float(eps)):
                return False
            if _present(row.get("norm")) and _norm(str(row["norm"])) != _norm(str(threat.get("norm"))):
                return False
            return _targeted_ok(row.get("attack_targeted"), spec.get("targeted"))

        count: Dict[str, int] = {}
        alpha_ok: Dict[str, bool] = {}
        for r in group.rows:
            for label, m in r["_metrics"].items():
                if label != "clean" and fits(label, m):
                    count[label] = count.get(label, 0) + 1
                    a = (m.get("attack") or {}).get("alpha")
                    alpha_ok[label] = (_present(row.get("attack_step_size")) and a is not None
                                       and abs(float(a) - float(row["attack_step_size"])) < 1e-9)
        if not count:
            what = f"{name.upper()}" + (f"-{int(float(steps))}" if name == "pgd" else "")
            if _present(row.get("attack_restarts")) and name == "pgd":
                what += f" with {int(float(row['attack_restarts']))} restarts"
            targeted = _text(row.get("attack_targeted"))
            what += f" (targeted: {targeted})" if targeted else ""
            return f"attack not evaluated: {what} at eps {float(eps):.6g}"
        label = sorted(count, key=lambda l: (-count[l], not alpha_ok[l], l))[0]
        return _collect(group, label, lambda r: r["_metrics"].get(label))  # type: ignore[return-value]
    return read


def _autoattack(row: Mapping[str, Any], group: RunGroup) -> Union[Measured, str]:
    got = _collect(group, "AutoAttack", lambda r: r["_aa"])
    if got is None:
        return "attack not evaluated: AutoAttack was not run for this cell"
    n_aa = min(got.totals)
    if group.n_test and n_aa < group.n_test:
        got.subset_n = n_aa
    version = (group.rows[0]["_aa"] or {}).get("version")
    got.label = f"AutoAttack ({version})" if version else "AutoAttack"
    return got


#: attack_name of a robust_acc row -> its reader; any other attack is not evaluated here.
ATTACK_SOURCES: Dict[str, Callable[[Mapping[str, Any], RunGroup], Union[Measured, str]]] = {
    "pgd": _attack_matcher("pgd"), "fgsm": _attack_matcher("fgsm"), "autoattack": _autoattack}


def _robust(row: Mapping[str, Any], group: RunGroup) -> Union[Measured, str]:
    name = _text(row.get("attack_name")).lower()
    protocol = _text(row.get("threat_protocol")).lower()
    if protocol in DEFENCE_PROTOCOLS:
        return (f"attack not evaluated: a {protocol} attack on an evaluation-time defence "
                f"({_text(row.get('method'))}; defence metrics are not matched to published rows)")
    reader = ATTACK_SOURCES.get(name)
    if reader is None:
        return f"attack not evaluated: {name or 'attack unspecified'} ({_text(row.get('attack'))})"
    return reader(row, group)


def _error(reader: Callable[[Mapping[str, Any], RunGroup], Union[Measured, str]]):
    """The error rate (1 - accuracy, same binomial variance) of what ``reader`` reads."""
    def read(row: Mapping[str, Any], group: RunGroup) -> Union[Measured, str]:
        got = reader(row, group)
        if isinstance(got, Measured):
            got = Measured(f"{got.label} error", [1 - a for a in got.accs], got.totals,
                           got.seeds, got.subset_n)
        return got
    return read


#: metric_kind -> reader of the matching number of a run group; any other kind (a gain, a
#: time, a speed-up, a relative error increase) is not comparable.
METRIC_SOURCES: Dict[str, Callable[[Mapping[str, Any], RunGroup], Union[Measured, str]]] = {
    "clean_acc": _clean, "robust_acc": _robust, "top1_error": _error(_clean),
    "robust_error": _error(_robust)}


def measure(row: Mapping[str, Any], group: RunGroup) -> Union[Measured, str]:
    kind = _text(row.get("metric_kind"))
    reader = METRIC_SOURCES.get(kind)
    if reader is None:
        return (f"metric {kind or 'unstated'} ({_text(row.get('metric'))}) is not an accuracy "
                "this suite evaluates per cell")
    return reader(row, group)


# ----------------------------------------------------------------------------- comparing
def _markers(group: Optional[RunGroup], got: Optional[Measured], link: str) -> List[str]:
    out = []
    if group is not None and group.checkpoint == "best":
        out.append("best ckpt")
    if got is not None and got.subset_n is not None:
        out.append(f"subset n={got.subset_n}")
    if link == "different_protocol":
        out.append("diff. protocol")
    if got is not None and len(got.accs) == 1:
        out.append(ONE_SEED)
    return out


def _published_fields(table: str, row: Mapping[str, Any]) -> Dict[str, Any]:
    value = row.get("value")
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    return {"table": table, "section": "published", "paper_key": _text(row.get("paper_key")),
            "published_id": _text(row.get("id")), "paper": _text(row.get("paper")),
            "evidence": _text(row.get("evidence")), "source": _text(row.get("source")),
            "pub_method": _text(row.get("method")), "pub_variant": _text(row.get("variant")),
            "pub_dataset": _text(row.get("dataset")), "pub_arch": _text(row.get("arch")),
            "pub_eps": _text(row.get("eps")), "pub_metric": _text(row.get("metric")),
            "pub_attack": _text(row.get("attack")), "metric_kind": _text(row.get("metric_kind")),
            "published": value, "value_qualifier": _text(row.get("value_qualifier"))}


def _numbers(got: Measured) -> Dict[str, Any]:
    b = got.band
    return {"metric_label": got.label, "n_seeds": b.n, "seeds": ";".join(map(str, got.seeds)),
            "n_examples": min(got.totals), "mean": b.mean, "ci_low": b.low, "ci_high": b.high,
            "half_width": b.half_width, "band_rule": b.rule}


def compare(table: str, row: Mapping[str, Any], group: RunGroup, link: str,
            why: str = "") -> Dict[str, Any]:
    """The CSV row of published ``row`` against run ``group`` linked as ``link``."""
    out = _published_fields(table, row)
    out.update({"link": link, "dataset": group.dataset, "arch": group.arch,
                "method": group.method, "recipe": group.recipe, "checkpoint": group.checkpoint})
    got = measure(row, group)
    reasons = []
    if isinstance(got, str):
        reasons.append(got)
        got = None
    else:
        out.update(_numbers(got))
        if not math.isnan(out["published"]):
            out["delta"] = out["mean"] - out["published"]
    if link == "different_protocol":
        reasons.append(f"different protocol: {' '.join(str(why).split())}")
    if got is not None and not reasons and math.isnan(out["published"]):
        reasons.append("the published value is not a number")
    if reasons:
        out["verdict"], out["reason"] = "not comparable", "; ".join(reasons)
    else:
        out["verdict"] = verdict(got.band, out["published"], out["value_qualifier"])
    out["markers"] = "; ".join(_markers(group, got, link))
    return out


def unlinked(table: str, row: Mapping[str, Any], run_cells: set) -> Dict[str, Any]:
    """The CSV row of a published row no cell of this run links."""
    out = _published_fields(table, row)
    cells = [c.strip() for c in _text(row.get("cells")).split(";") if c.strip()]
    present = [c for c in cells if c in run_cells]
    if present:
        out["verdict"] = "not comparable"
        out["reason"] = (f"cell(s) {', '.join(present)} ran, but the recipe's annotation does not "
                         "link this row (dataset, eps or match differ)")
    elif cells:
        out["verdict"] = "not run"
        out["reason"] = "paper.yaml cells that would reproduce it: " + ", ".join(cells)
    else:
        out["verdict"] = "no runnable cell"
        out["reason"] = _text(row.get("no_cell_reason")) or "no cell of the suite reproduces it"
    return out


def links(groups: List[RunGroup], annotations: Mapping[str, Mapping[str, Any]],
          pub: pd.DataFrame) -> Dict[str, List[Tuple[RunGroup, str, str]]]:
    """published id -> [(group, "rows" | "different_protocol", why)]: the rows each group's
    recipe links (a row linked both ways counts as the different protocol)."""
    out: Dict[str, List[Tuple[RunGroup, str, str]]] = {}
    if pub.empty:
        return out
    for g in groups:
        ann = annotations.get(g.recipe)
        if not ann:
            continue
        found: Dict[str, Tuple[str, str]] = {}
        for r in published_for(g.cell, ann, pub):
            found[str(r["id"])] = ("rows", "")
        for i, dp in enumerate(((ann.get("published") or {}).get("different_protocol") or [])):
            if not isinstance(dp, Mapping) or not isinstance(dp.get("match"), Mapping):
                raise ConfigError(f"recipe {g.recipe}: published.different_protocol[{i}].match: "
                                  f"expected a mapping of published-CSV column -> value, got {dp!r}")
            for r in published_for(g.cell, {"published": {"rows": [dp["match"]]}}, pub):
                found[str(r["id"])] = ("different_protocol", str(dp.get("why", "")))
        for pid, (link, why) in found.items():
            out.setdefault(pid, []).append((g, link, why))
    return out


def run_rows(table: str, groups: List[RunGroup]) -> List[Dict[str, Any]]:
    """CSV rows of the This-run section: one per (group, metric label), AutoAttack included."""
    out = []
    swept = set(sweep_columns([r for g in groups for r in g.rows]))
    for g in groups:
        labels = []
        for r in g.rows:
            labels += [l for l in r["_metrics"] if l not in labels and l not in swept]
        measured = [_collect(g, l, lambda r, l=l: r["_metrics"].get(l)) for l in labels]
        aa = _autoattack({}, g)
        measured.append(aa if isinstance(aa, Measured) else None)
        for got in measured:
            if got is None:
                continue
            out.append({"table": table, "section": "run", "dataset": g.dataset, "arch": g.arch,
                        "method": g.method, "recipe": g.recipe, "checkpoint": g.checkpoint,
                        **_numbers(got), "markers": "; ".join(_markers(g, got, ""))})
    return out


# ----------------------------------------------------------------------------- rendering
@dataclass
class Table:
    caption: str
    header: List[str]
    rows: List[List[str]]
    notes: List[str] = field(default_factory=list)


def md_cell(text: Any) -> str:
    """Free text as one Markdown table cell (no line breaks, no bare pipes)."""
    return " ".join(str(text or "").split()).replace("|", "\\|")


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
        "<": r"\textless{}", ">": r"\textgreater{}"}


def tex_escape(text: Any) -> str:
    """Free text as LaTeX text: every special character escaped, whitespace collapsed."""
    return "".join(_TEX.get(ch, ch) for ch in " ".join(str(text or "").split()))


def render_md(t: Table) -> List[str]:
    lines = [t.caption, ""] if t.caption else []
    if t.rows:
        lines += ["| " + " | ".join(md_cell(h) for h in t.header) + " |",
                  "|" + "---|" * len(t.header)]
        lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in t.rows]
    else:
        lines.append("(no rows)")
    return lines + ([""] + t.notes if t.notes else []) + [""]


def render_tex(t: Table) -> List[str]:
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
    if not _present(r.get("mean")):
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
    reproduced = [f"{_pts(r['mean'], 1)} {r['verdict']}" + (" [best]" if r.get("checkpoint") == "best" else "")
                  for r in lines if _present(r.get("mean"))]
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
                       "verdict per linked cell; [best] = best checkpoint)", present_rows + ["; ".join(c for c in ck if c) for ck in columns],
                       [list(rk) + ["; ".join(grid[rk].get(ck, [])) for ck in columns]
                        for rk in grid])
    sources: List[str] = []
    detail = []
    for r in rows:
        src = f"{r['source']} (evidence: {r['evidence'] or 'not stated'})"
        sources += [src] if src not in sources else []
        run_cell = f"{r['dataset']}/{r['arch']}/{r['recipe']}" if r.get("recipe") else ""
        detail.append([r["published_id"], " / ".join(x for x in (r["pub_method"], r["pub_variant"]) if x),
                       r["pub_dataset"], r["pub_arch"], r["pub_eps"],
                       "; ".join(x for x in (r["pub_metric"], r["pub_attack"]) if x),
                       _published_text(r), r["evidence"], f"[{sources.index(src) + 1}]", run_cell,
                       r.get("checkpoint") or "", r.get("metric_label") or "",
                       str(r["n_seeds"]) if _present(r.get("n_seeds")) else "",
                       _interval(r, 2), _pts(r.get("delta")), _verdict_text(r),
                       r.get("markers") or ""])
    detail_table = Table(f"{title}: every published row", [
        "id", "method / variant", "dataset", "arch", "eps", "metric; attack", "published",
        "evidence", "source", "this run's cell", "ckpt", "evaluated", "n seeds",
        "reproduced [95%]", "delta", "verdict", "markers"], detail,
        [f"Sources: " + "  ".join(f"[{i + 1}] {s}" for i, s in enumerate(sources))] + _legend(rows))
    return [grid_table, detail_table]


def run_table(table: PaperTable, groups: List[RunGroup], rows: List[Dict[str, Any]],
              linked_any: bool) -> Table:
    labels: List[str] = []
    for r in rows:
        if r["metric_label"] not in labels:
            labels.append(r["metric_label"])
    first = {l: i for i, l in enumerate(labels)}
    labels.sort(key=lambda l: (l != "clean", l.startswith("AutoAttack"), first[l]))
    by = {(r["dataset"], r["arch"], r["recipe"], r["checkpoint"], r["metric_label"]): r for r in rows}
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
        recipes = ", ".join(e["recipe"] + (f" on {', '.join(e['datasets'])}" if e.get("datasets") else "")
                            for e in table.run)
        notes.append(f"This run has no cell of this paper's recipes ({recipes}).")
    elif not linked_any:
        notes.append("No cell of this run is linked to a published row of this paper (datasets "
                     f"here: {', '.join(sorted({g.dataset for g in groups}))}): no published row "
                     "is at this scale, and these are this run's own numbers.")
    return Table("This run: the cells of this paper's recipes, accuracy in % as mean [95% "
                 "interval over seeds] (the band of the caption)",
                 ["recipe", "method", "dataset", "arch", "ckpt", "seeds"] + labels + ["markers"],
                 body, notes)


# ----------------------------------------------------------------------------- writing
def build(table: PaperTable, groups: List[RunGroup], pub: pd.DataFrame,
          linked: Mapping[str, List[Tuple[RunGroup, str, str]]]) -> Tuple[List[Dict[str, Any]], List[Tuple[str, List[Table]]]]:
    """The CSV rows and the (heading, tables) sections of one paper table."""
    run_cells = {g.cell_id for g in groups}
    csv_rows: List[Dict[str, Any]] = []
    sections: List[Tuple[str, List[Table]]] = []
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
    sections.append(("This run", [run_table(table, mine_groups, runs, linked_any)]))
    return csv_rows, sections


def _header(table: PaperTable, n_evals: int) -> List[str]:
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
             "| table | title | published rows | " + " | ".join(VERDICTS) + " | run cells | files |",
             "|" + "---|" * (len(VERDICTS) + 5)]
    for table in tables:
        csv_rows, sections = build(table, groups, pub, linked)
        head = _header(table, len(eval_paths))
        md = [f"# {table.title}", ""] + [h + "\n" for h in head]
        tex = [f"% {table.key}: regenerated by methods/paper_tables.py; needs booktabs",
               r"\section*{" + tex_escape(table.title) + "}"] + [tex_escape(h) + r"\par" for h in head]
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
        frame = pd.DataFrame(csv_rows, columns=CSV_COLUMNS)
        for suffix, text in ((".md", "\n".join(md)), (".tex", "\n".join(tex) + "\n"),
                             (".csv", frame.to_csv(index=False))):
            path = out_dir / f"{table.key}{suffix}"
            atomic_write_text(path, text)
            written.append(path)
        pubs = frame[frame["section"] == "published"]
        counts = [str(int((pubs["verdict"] == v).sum())) for v in VERDICTS]
        n_rows = pubs["published_id"].nunique()
        n_cells = frame[frame["section"] == "run"][["dataset", "arch", "recipe", "checkpoint"]] \
            .drop_duplicates().shape[0]
        index.append(f"| {table.key} | {md_cell(table.title)} | {n_rows} | " + " | ".join(counts)
                     + f" | {n_cells} | [{table.key}.md]({table.key}.md), [tex]({table.key}.tex),"
                     f" [csv]({table.key}.csv) |")
    index += ["", "Verdict counts are over (published row x linked cell) lines."]
    path = out_dir / "index.md"
    atomic_write_text(path, "\n".join(index) + "\n")
    return written + [path]
