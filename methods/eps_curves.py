"""Accuracy over an eps grid (FGSM, PGD; Linf or L2), drawn from evaluation result files.  No torch.

**The grid is ordinary attack specs.**  An evaluation sweeps eps by listing the same attack
several times with its own ``eps`` (:mod:`methods.attack_specs`: a spec's ``eps`` / ``norm``
override the evaluation's threat), e.g. FGSM at 1/255 ... 8/255 on CIFAR or 0.05 ... 0.3 on
MNIST.  :func:`fgsm_eps_grid` (and :func:`eps_grid` for any attack) builds that list, with the
values written as YAML would (``"3/255"`` or ``0.05``); ``python -m methods eps-grid`` prints it
ready to paste into ``evaluation.attacks``.  eps 0 is not an attack (specs refuse eps <= 0): the
curve's eps-0 point is the ``clean`` accuracy of the same evaluation.  A grid point equal to
the evaluation's own eps repeats the plain ``{name: fgsm}`` entry under another label, so the
helpers take ``skip`` to leave it out; the curves read every metric's own ``threat.eps``, so the
plain entry supplies that point.

**Curves.**  For one evaluation file, :func:`curves` groups its metrics into curves:

* a metric belongs to a curve when its ``attack.name`` is ``fgsm`` or ``pgd`` (other metrics,
  including unknown future ones, are ignored);
* the curve's *family* is the attack with its eps and step size left out, plus the norm it ran
  at: ``FGSM Linf``, ``FGSM L2``, ``PGD-10-1 Linf``, ``PGD-10-1 Linf targeted=random`` (the
  other non-default fields of the spec, as in its label).  PGD's ``alpha`` is left out because a
  sweep may fix it or scale it with eps; two metrics of one family at the same eps (e.g. two
  step sizes) keep the lower accuracy, i.e. the stronger attack, and the CSV names both labels;
* metrics of an evaluation-time defence (a ``defense`` block; keys such as
  ``"MI-OL | PGD-10-1-alpha=2/255 | oblivious"``) form their own curves, tagged with the
  defence and the attack mode (:func:`metric_key_parts`), whose eps-0 point is the defence's
  own clean accuracy (``"MI-OL | clean"``) where present;
* points carry the accuracy's exact 95% (Clopper-Pearson) interval from the file.

**Plot** (:func:`plot_eps_curves`): one panel per dataset x family whose eps varies (some curve
has at least :data:`SWEEP_MIN_EPS` distinct attack eps), accuracy (%) against eps, one line per
model (cell x checkpoint, plus the defence tag) with its 95% band, AutoAttack's accuracy on its
subset marked at its eps in the panels of its norm (undefended curves only), and in FGSM panels
the untargeted PGD accuracies of families run at a single eps as open squares, so a model whose
FGSM curve stays high while PGD and AutoAttack are near zero is visible at a glance.  Written as PNG
and PDF (atomic writes), with the points as CSV.  Evaluations without any sweep still give a
figure that says so.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .attack_specs import ATTACK_KINDS, AttackSpecError, format_eps, normalize_attack_spec
from .config import number
from .results import atomic_write, atomic_write_text, read_result

#: Attacks whose accuracy is drawn over eps.
CURVE_ATTACKS = ("fgsm", "pgd")
#: Spec fields that do not name a family: the swept eps, the step size (fixed or scaled with
#: eps), and the norm (named separately, from the threat the metric ran at).
NOT_FAMILY_FIELDS = ("eps", "alpha", "norm")
#: A family is drawn when some curve of it has at least this many distinct attack eps.
SWEEP_MIN_EPS = 2
NORM_NAMES = {"linf": "Linf", "l2": "L2"}


# ----------------------------------------------------------------------------- grids

def _yaml_eps(value: float) -> Any:
    """An eps as YAML would write it: ``"3/255"`` when it is k/255 without a short decimal,
    else the number rounded to 12 digits (so 0.3 * 1 / 6 is 0.05)."""
    value = round(value, 12)
    text = format_eps(value)
    return text if "/" in text else value


def eps_grid(attack: Mapping[str, Any], eps_max: Any, points: int = 9,
             skip: Iterable[Any] = ()) -> List[Dict[str, Any]]:
    """Specs of ``attack`` (a spec without ``eps``, e.g. ``{"name": "pgd", "steps": 10,
    "alpha": "2/255"}``) at the ``points - 1`` non-zero values of ``linspace(0, eps_max,
    points)`` (eps 0 is the clean accuracy), leaving out any value in ``skip`` (the
    evaluation's own eps, which the plain spec already covers).  Every spec is checked
    (:func:`methods.attack_specs.check_attack_specs` rules), errors name the argument."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"eps grid points: expected an integer >= 2 (eps 0 and eps_max), "
                         f"got {points!r}")
    top = number(eps_max, "eps grid eps_max")
    if not top > 0:
        raise ValueError(f"eps grid eps_max: must be > 0, got {eps_max!r}")
    if "eps" in attack:
        raise ValueError(f"eps grid attack: {dict(attack)} already sets eps; the grid sets it")
    skipped = [number(s, "eps grid skip") for s in skip]
    specs = []
    for i in range(1, points):
        eps = _yaml_eps(top * i / (points - 1))
        value = number(eps, "eps")
        if any(abs(value - s) <= 1e-9 * max(1.0, s) for s in skipped):
            continue
        spec = {**attack, "eps": eps}
        normalize_attack_spec(spec, f"eps grid [{i}]")   # raises AttackSpecError on a bad spec
        specs.append(spec)
    return specs


def fgsm_eps_grid(eps_max: Any, points: int = 9, norm: Optional[str] = None,
                  skip: Iterable[Any] = ()) -> List[Dict[str, Any]]:
    """FGSM specs over ``linspace(0, eps_max, points)`` without 0 (:func:`eps_grid`).
    ``fgsm_eps_grid("8/255")`` is FGSM at 1/255 ... 8/255 (the seed's 9-point lists);
    ``fgsm_eps_grid(0.3, 7, skip=[0.1])`` is 0.05, 0.15, ..., 0.3 for an evaluation at 0.1.
    ``norm``: ``linf`` / ``l2`` (null: the evaluation's)."""
    return eps_grid({"name": "fgsm", **({"norm": norm} if norm else {})}, eps_max, points, skip)


def grid_yaml(specs: Sequence[Mapping[str, Any]], indent: int = 4) -> str:
    """The specs as YAML flow mappings, one list item a line (for ``evaluation.attacks``)."""
    value = lambda v: str(v).lower() if isinstance(v, bool) else str(v)
    return "".join(" " * indent + "- {" + ", ".join(f"{k}: {value(v)}" for k, v in s.items())
                   + "}\n" for s in specs)


# ----------------------------------------------------------------------------- curves

@dataclass(frozen=True)
class Point:
    """One point of a curve: accuracy (fraction) and its 95% interval at ``eps`` (0 = clean);
    ``labels``: the metric key(s) it comes from."""

    eps: float
    acc: float
    ci_low: float
    ci_high: float
    n: int
    labels: str


@dataclass(frozen=True)
class CurveKey:
    """Which curve: the defence (``None``: the undefended model), the attack mode under a
    defence (``oblivious`` / ``adaptive``, or ``None``), the family and the norm."""

    defense: Optional[str]
    mode: Optional[str]
    family: str
    norm: str

    @property
    def group(self) -> str:
        """The defence tag shown beside the model name (empty for the undefended model)."""
        return " | ".join(p for p in (self.defense, self.mode) if p)


def metric_key_parts(key: str,
                     metric: Mapping[str, Any]) -> Tuple[Optional[str], Optional[str], bool]:
    """``(defence, mode, is_clean)`` of one metric.  Undefended metrics (no ``defense`` block)
    are ``(None, None, key == "clean")``.  A defended metric's key is
    ``"<defence> | <attack label> | <mode>"`` or ``"<defence> | clean"``: the defence is the
    ``defense`` block's ``label`` (else ``name``, else the key's first part), the mode the
    metric's or block's ``mode`` (else the key's last part when there are three), clean when
    the metric has no attack or the key's last part is ``clean``."""
    defense = metric.get("defense")
    if not defense:
        return None, None, key == "clean"
    parts = [p.strip() for p in key.split("|")]
    block = defense if isinstance(defense, Mapping) else {}
    name = block.get("label") or block.get("name") or parts[0]
    clean = not metric.get("attack") or parts[-1].lower() == "clean"
    mode = metric.get("mode") or block.get("mode") or (parts[-1] if len(parts) >= 3 else None)
    return str(name), (None if clean or mode is None else str(mode)), clean


def attack_family(spec: Mapping[str, Any]) -> str:
    """``FGSM`` / ``PGD-<steps>-<restarts>`` plus the label tokens of every non-default field
    except eps, alpha and norm (``targeted=random``, ``zero_start``, ``no_early_stop``)."""
    spec = normalize_attack_spec(spec)
    kind = ATTACK_KINDS.get(spec["name"])
    parts = [kind.base_label(spec)]
    for key, field in kind.fields.items():
        if key not in NOT_FAMILY_FIELDS and field.token is not None and spec[key] != field.default:
            parts.append(field.token(spec[key]))
    return "-".join(parts)


def _point(metric: Mapping[str, Any], eps: float, label: str) -> Optional[Point]:
    acc, ci = metric.get("acc"), metric.get("ci95") or [None, None]
    if acc is None or ci[0] is None or ci[1] is None:
        return None
    return Point(float(eps), float(acc), float(ci[0]), float(ci[1]), int(metric.get("n", 0)), label)


def curves(ev: Mapping[str, Any]) -> Dict[CurveKey, List[Point]]:
    """The curves of one evaluation record (module docstring): ``{CurveKey: [Point]}``, points
    sorted by eps, the eps-0 (clean) point first where the group has a clean accuracy."""
    metrics = ev.get("metrics") or {}
    base_norm = str((ev.get("threat") or {}).get("norm", "linf")).lower()
    cleans: Dict[Optional[str], Point] = {}
    found: Dict[CurveKey, Dict[float, Point]] = {}
    for key, m in metrics.items():
        if not isinstance(m, Mapping):
            continue
        defense, mode, is_clean = metric_key_parts(key, m)
        if is_clean:
            p = _point(m, 0.0, key)
            if p is not None:
                cleans[defense] = p
            continue
        attack, threat = m.get("attack") or {}, m.get("threat") or {}
        if attack.get("name") not in CURVE_ATTACKS or threat.get("eps") is None:
            continue
        try:
            family = attack_family(attack)
        except AttackSpecError:
            continue                       # a spec this version cannot read: not drawn
        norm = str(threat.get("norm") or base_norm).lower()
        p = _point(m, float(threat["eps"]), key)
        if p is None:
            continue
        ck = CurveKey(defense, mode, family, NORM_NAMES.get(norm, norm))
        at = found.setdefault(ck, {})
        old = at.get(p.eps)
        if old is None:
            at[p.eps] = p
        else:                              # same family and eps twice: the stronger attack
            keep = p if p.acc < old.acc else old
            at[p.eps] = Point(keep.eps, keep.acc, keep.ci_low, keep.ci_high, keep.n,
                              f"{old.labels}; {p.labels}")
    out: Dict[CurveKey, List[Point]] = {}
    for ck, at in found.items():
        points = sorted(at.values(), key=lambda p: p.eps)
        clean = cleans.get(ck.defense)
        out[ck] = ([clean] if clean is not None else []) + points
    return out


def model_name(ev: Mapping[str, Any]) -> Dict[str, str]:
    """The parts that name a model in a run: dataset, arch, recipe, seed, checkpoint."""
    cell = ev.get("cell") or {}
    return {"dataset": str((cell.get("dataset") or {}).get("name", "?")),
            "arch": str((cell.get("arch") or {}).get("name", "?")),
            "recipe": str(cell.get("recipe", "?")), "seed": f"seed{cell.get('seed', '?')}",
            "checkpoint": str((ev.get("checkpoint") or {}).get("name", "?"))}


def short_names(names: List[Dict[str, str]]) -> List[str]:
    """Each model's name without the parts every model shares (the recipe always stays)."""
    keys = [k for k in ("dataset", "arch", "recipe", "seed", "checkpoint")
            if k == "recipe" or len({n[k] for n in names}) > 1]
    return ["/".join(n[k] for k in keys) for n in names]


def curve_rows(records: List[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One row per point of every curve of every record (the plot's data, for the CSV)."""
    rows = []
    names = short_names([model_name(ev) for ev in records])
    for ev, name in zip(records, names):
        for ck, points in curves(ev).items():
            for p in points:
                rows.append({**model_name(ev), "model": name, "defense": ck.defense or "",
                             "mode": ck.mode or "", "family": ck.family, "norm": ck.norm,
                             **asdict(p)})
    return rows


def _swept(records: List[Mapping[str, Any]]) -> List[Tuple[str, str, str]]:
    """(dataset, family, norm) panels whose eps varies within some curve, in order of appearance."""
    panels: List[Tuple[str, str, str]] = []
    for ev in records:
        dataset = model_name(ev)["dataset"]
        for ck, points in curves(ev).items():
            eps = {p.eps for p in points if p.eps > 0}
            panel = (dataset, ck.family, ck.norm)
            if len(eps) >= SWEEP_MIN_EPS and panel not in panels:
                panels.append(panel)
    return panels


def _eps_ticks(values: List[float]) -> Optional[Tuple[List[float], List[str]]]:
    """Ticks in units of 1/255 when every eps is k/255 (CIFAR-style grids), else ``None``."""
    ks = [v * 255 for v in values]
    if values and all(abs(k - round(k)) < 1e-6 for k in ks):
        ticks = sorted({round(k) for k in ks})
        return [t / 255 for t in ticks], ["0" if t == 0 else f"{t}/255" for t in ticks]
    return None


def plot_eps_curves(eval_paths: List[Path], png: Path, pdf: Optional[Path] = None,
                    csv: Optional[Path] = None) -> Dict[str, Any]:
    """Draw the curves of ``eval_paths`` (module docstring) to ``png`` (and ``pdf``), write
    their points to ``csv``; return what was drawn: ``{"panels": [...], "curves": n, ...}``."""
    records = [read_result(Path(p), "eval_result.schema.json") for p in eval_paths]
    return render_eps_curves(records, png, pdf, csv)


def render_eps_curves(records: List[Mapping[str, Any]], png: Path, pdf: Optional[Path] = None,
                      csv: Optional[Path] = None) -> Dict[str, Any]:
    """:func:`plot_eps_curves` from records already read."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    rows = curve_rows(records)
    panels = _swept(records)
    names = short_names([model_name(ev) for ev in records])
    lines = sorted({(name, ck.group) for ev, name in zip(records, names) for ck in curves(ev)})
    palette = dict(zip(lines, sns.color_palette("husl" if len(lines) > 10 else "tab10",
                                                max(1, len(lines)))))
    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    drawn = 0
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols + 2.6, 4.2 * nrows),
                                 squeeze=False)
        flat = [ax for row in axes for ax in row]
        if not panels:
            flat[0].text(0.5, 0.5, "no eps sweep in these evaluations\n(no FGSM/PGD family "
                         f"at {SWEEP_MIN_EPS} or more eps;\n{len(records)} evaluation files)",
                         ha="center", va="center", transform=flat[0].transAxes)
            flat[0].set_axis_off()
        for ax, (dataset, family, norm) in zip(flat, panels):
            all_eps: List[float] = []
            for ev, name in zip(records, names):
                if model_name(ev)["dataset"] != dataset:
                    continue
                for ck, points in curves(ev).items():
                    if (ck.family, ck.norm) != (family, norm):
                        continue
                    color = palette[(name, ck.group)]
                    xs = [p.eps for p in points]
                    all_eps += xs
                    label = f"{name} [{ck.group}]" if ck.group else name
                    style = "--" if ck.defense else "-"
                    ax.plot(xs, [100 * p.acc for p in points], style, marker="o", ms=3.5,
                            color=color, label=label, lw=1.4)
                    ax.fill_between(xs, [100 * p.ci_low for p in points],
                                    [100 * p.ci_high for p in points], color=color, alpha=0.18,
                                    lw=0)
                    drawn += 1
                if family == "FGSM":       # PGD run at one eps only: a square beside FGSM
                    for ck, points in curves(ev).items():
                        if (ck.family.startswith("PGD-") and "targeted=" not in ck.family
                                and ck.norm == norm and (dataset, ck.family, norm) not in panels):
                            hit = [p for p in points if p.eps > 0]
                            ax.plot([p.eps for p in hit], [100 * p.acc for p in hit], "s",
                                    mfc="none", ms=7, mew=1.5, color=palette[(name, ck.group)])
                            all_eps += [p.eps for p in hit]
                aa = ev.get("autoattack")
                aa_norm = NORM_NAMES.get(str((ev.get("threat") or {}).get("norm")), "")
                if aa and aa.get("acc") is not None and aa_norm == norm:
                    eps = float(ev["threat"]["eps"])
                    lo, hi = aa["ci95"]
                    ax.errorbar([eps], [100 * aa["acc"]],
                                yerr=[[100 * (aa["acc"] - lo)], [100 * (hi - aa["acc"])]],
                                fmt="x", ms=8, mew=2, capsize=3, color=palette.get((name, ""), "k"))
                    all_eps.append(eps)
            ticks = _eps_ticks(all_eps)
            if ticks:
                ax.set_xticks(ticks[0], ticks[1], fontsize=8)
            ax.set_title(f"{dataset}: {family} {norm}", fontsize=10)
            ax.set_xlabel(f"eps ({norm})")
            ax.set_ylabel("accuracy (%)")
            ax.set_ylim(-2, 102)
            ax.legend(fontsize=7, loc="upper right")
        for ax in flat[len(panels) or 1:]:
            ax.set_axis_off()
        fig.suptitle("Accuracy over eps, from the evaluation files", fontsize=11)
        note = textwrap.fill(
            "eps 0 = clean accuracy; bands: exact 95% intervals; x: AutoAttack on its subset; "
            "open squares in FGSM panels: untargeted PGD run at a single eps; dashed: with an "
            "evaluation-time defence.", width=int(fig.get_figwidth() * 14))
        fig.text(0.01, 0.01, note, fontsize=8, color="dimgray", va="bottom")
        lines_in_note = note.count("\n") + 1
        fig.tight_layout(rect=(0, 0.03 * lines_in_note / nrows + 0.02, 1, 0.95))
        atomic_write(Path(png), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
        if pdf is not None:
            atomic_write(Path(pdf), lambda tmp: fig.savefig(tmp, format="pdf",
                                                            metadata={"CreationDate": None}))
        plt.close(fig)
    if csv is not None:
        columns = ["dataset", "arch", "recipe", "seed", "checkpoint", "model", "defense", "mode",
                   "family", "norm", "eps", "acc", "ci_low", "ci_high", "n", "labels"]
        atomic_write_text(Path(csv), pd.DataFrame(rows, columns=columns).to_csv(index=False))
    return {"panels": [" ".join(p) for p in panels], "curves": drawn, "points": len(rows),
            "evaluations": len(records)}
