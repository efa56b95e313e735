"""The benchmark's derived ratios and tables, from ``bench.json`` results only (no torch).

:mod:`methods.bench` times the steps and writes one result per bench x arch x thread count
(the fields are described in its module docstring and in
``workflow/schemas/bench_result.schema.json``).  This module turns those results into

* target rows (:func:`evaluate_targets`, kinds in :data:`TARGETS`), each marked pass/fail
  against the target's ``max``;
* the cost table (:func:`cost_frame`, written as CSV) and its Markdown rendering
  (:func:`render_markdown`), with a second table of the unit costs at every row count.

Nothing here measures anything, so the tables can be re-rendered from a ``bench.json`` on a
machine without torch.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import pandas as pd

from .config import ConfigError
from .registry import Registry

# ----------------------------------------------------------------------------- targets
TARGETS: Registry[Callable] = Registry("bench target")


def _ratio(a: Dict[str, Any], b: Dict[str, Any], per_sample: bool) -> Dict[str, Any]:
    """Measured ratio of medians, its quartile range, and the pass arithmetic's ratio (of
    forward+backward-equivalent sample-passes per step, or per sample when ``per_sample``)."""
    sa, sb = a["step_time_s"], b["step_time_s"]
    scale = (b["batch_size"] / a["batch_size"]) if per_sample else 1.0
    fb = lambda r: r["fwd_bwd_equivalents_per_sample"] * (1 if per_sample else r["batch_size"])
    return {"value": scale * sa["median"] / sb["median"],
            "range": [scale * sa["q25"] / sb["q75"], scale * sa["q75"] / sb["q25"]],
            "arithmetic": fb(a) / fb(b)}


def _pairs(spec, group, per_sample: bool) -> List[Dict[str, Any]]:
    nums = spec["numerator"] if isinstance(spec["numerator"], list) else [spec["numerator"]]
    return [{"subject": n, "reference": spec["denominator"],
             **_ratio(group[n], group[spec["denominator"]], per_sample)} for n in nums]


@TARGETS.register("overhead")
def _overhead_target(spec, group) -> List[Dict[str, Any]]:
    names = spec.get("benches") or list(group)
    return [{"subject": n, "reference": "pass arithmetic at each row count",
             "value": group[n]["overhead_ratio"], "range": None, "arithmetic": 1.0} for n in names]


@TARGETS.register("step_ratio")
def _step_ratio_target(spec, group) -> List[Dict[str, Any]]:
    return _pairs(spec, group, per_sample=False)


@TARGETS.register("epoch_ratio")
def _epoch_ratio_target(spec, group) -> List[Dict[str, Any]]:
    return _pairs(spec, group, per_sample=True)


def evaluate_targets(targets: List[Dict[str, Any]], results: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per target x subject x (arch, threads) group, marked against ``max``."""
    groups: Dict[Tuple[str, int], Dict[str, Dict[str, Any]]] = {}
    for r in results.values():
        groups.setdefault((r["arch"], r["threads"]), {})[r["bench"]] = r
    rows = []
    for i, spec in enumerate(targets):
        for field in ("name", "kind", "max"):
            if field not in spec:
                raise ConfigError(f"targets[{i}]: missing field {field!r}")
        try:
            compute = TARGETS.get(spec["kind"])
        except KeyError as e:
            raise ConfigError(f"targets[{i}].kind: {e.args[0]}") from None
        for (arch, threads), group in groups.items():
            try:
                found = compute(spec, group)
            except KeyError as e:
                raise ConfigError(f"targets[{i}] ({spec['name']}): unknown bench {e.args[0]!r}; "
                                  f"benched: {sorted(group)}") from None
            for f in found:
                rows.append({"target": spec["name"], "kind": spec["kind"], "arch": arch,
                             "threads": threads, **f, "max": float(spec["max"]),
                             "pass": bool(f["value"] <= float(spec["max"]))})
    return rows


# ----------------------------------------------------------------------------- tables
def _mb(v: Optional[int]) -> Optional[float]:
    return None if v is None else v / 2**20


def _rows_sorted(r: Dict[str, Any]) -> List[int]:
    return sorted(int(n) for n in r["unit_costs"])


def cost_frame(results: Dict[str, Dict[str, Any]]) -> pd.DataFrame:
    """One row per bench result: passes, medians, predicted time (total and by phase), ratios."""
    rows = []
    for r in results.values():
        s, m = r["step_time_s"], r["memory"]
        rows.append({
            "bench": r["bench"], "recipe": r["recipe"], "method": r["method"], "arch": r["arch"],
            "threads": r["threads"], "batch_size": r["batch_size"],
            "fwd_per_sample": r["passes_per_sample"]["forward"],
            "bwd_per_sample": r["passes_per_sample"]["backward"],
            "fwd_bwd_equivalents": r["fwd_bwd_equivalents_per_sample"],
            "row_counts": " ".join(str(n) for n in sorted(int(k) for k in r["rows_run"])),
            "step_ms": 1e3 * s["median"], "step_ms_q25": 1e3 * s["q25"], "step_ms_q75": 1e3 * s["q75"],
            "predicted_ms": 1e3 * r["predicted_step_s"],
            "predicted_by_phase_ms": " ".join(f"{p}={1e3 * v:.2f}"
                                              for p, v in sorted(r["predicted_by_phase_s"].items())),
            "overhead_ratio": r["overhead_ratio"],
            "overhead_ratio_costs_at_B": r["overhead_ratio_costs_at_B"],
            "step_heap_mb": _mb(m["heap_added_bytes"]), "peak_rss_mb": _mb(m["peak_rss_bytes"]),
            "peak_gpu_mem_mb": _mb(m["peak_gpu_mem_bytes"]),
        })
    return pd.DataFrame(rows)


def unit_cost_frame(results: Dict[str, Dict[str, Any]]) -> pd.DataFrame:
    """One row per bench result x row count: the unit costs the prediction used."""
    rows = []
    for r in results.values():
        for n in _rows_sorted(r):
            u = r["unit_costs"][str(n)]
            rows.append({"bench": r["bench"], "arch": r["arch"], "threads": r["threads"], "rows": n,
                         "fwd_bwd_ms": 1e3 * u["fwd_bwd_s"]["median"],
                         "fwd_ms": 1e3 * u["fwd_s"]["median"],
                         "fwd_bwd_us_per_sample": 1e6 * u["fwd_bwd_per_sample_s"],
                         "fwd_us_per_sample": 1e6 * u["fwd_per_sample_s"],
                         "samples": u["fwd_bwd_s"]["n"]})
    return pd.DataFrame(rows)


def _num(v: Any, fmt: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def render_markdown(results: Dict[str, Dict[str, Any]], targets: List[Dict[str, Any]],
                    machine: Dict[str, Any], settings: Dict[str, Any]) -> str:
    """The cost table, the unit-cost table and the target table as Markdown."""
    frame, units = cost_frame(results), unit_cost_frame(results)
    lines = [f"Machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, torch "
             f"{machine['torch']}, device {machine['device']}; load average at start "
             f"{machine['loadavg_at_start']}.",
             f"Medians over {settings['repeats']} steps after {settings['warmup_steps']} warm-up "
             "steps, on a fixed synthetic batch, at the recipe's last epoch (steady state).",
             "predicted = sum over phases and over the row counts n their forward calls ran at of "
             "bwd(n) x t_fb(n) + (fwd(n) - bwd(n)) x t_f(n), with per-sample unit costs of one "
             "forward+backward / no-grad forward on n rows, measured after every timed step that "
             "ran at n; overhead = median over the timed steps of measured / that step's "
             "predicted (costs at B: every pass priced at the B-row unit cost, for comparison).  "
             "Step heap: peak C-heap bytes in use during the timed steps minus those in use "
             "before them (polled; a lower bound).", "",
             "| bench | method | arch | threads | B | rows run | fwd+bwd / sample | fb-equiv "
             "| step ms [IQR] | predicted ms | by phase ms | overhead | costs at B "
             "| step heap MB | peak RSS MB |",
             "|" + "---|" * 15]
    for r in frame.itertuples():
        lines.append(f"| {r.bench} | {r.method} | {r.arch} | {r.threads} | {r.batch_size} | "
                     f"{r.row_counts} | {r.fwd_per_sample:.2f}+{r.bwd_per_sample:.2f} | "
                     f"{r.fwd_bwd_equivalents:.2f} | "
                     f"{r.step_ms:.1f} [{r.step_ms_q25:.1f}, {r.step_ms_q75:.1f}] | "
                     f"{r.predicted_ms:.1f} | {r.predicted_by_phase_ms} | {r.overhead_ratio:.3f} | "
                     f"{r.overhead_ratio_costs_at_B:.3f} | {_num(r.step_heap_mb, '.1f')} | "
                     f"{_num(r.peak_rss_mb, '.1f')} |")
    lines += ["", "Unit costs by row count (medians over the timed steps that ran at that row "
              "count; B is always measured):", "",
              "| bench | arch | threads | rows | fwd+bwd ms | fwd ms | fwd+bwd us / sample "
              "| fwd us / sample | samples |", "|" + "---|" * 9]
    for u in units.itertuples():
        lines.append(f"| {u.bench} | {u.arch} | {u.threads} | {u.rows} | {u.fwd_bwd_ms:.2f} | "
                     f"{u.fwd_ms:.2f} | {u.fwd_bwd_us_per_sample:.1f} | {u.fwd_us_per_sample:.1f} | "
                     f"{u.samples} |")
    if targets:
        lines += ["", "Targets (measured: ratio of medians, range from the quartiles; arithmetic: "
                  "the same ratio of forward+backward-equivalent sample-passes):", "",
                  "| target | arch | threads | subject | reference | measured | range | "
                  "arithmetic | max | result |", "|" + "---|" * 10]
        for t in targets:
            rng = "" if t["range"] is None else f"[{t['range'][0]:.3f}, {t['range'][1]:.3f}]"
            lines.append(f"| {t['target']} | {t['arch']} | {t['threads']} | {t['subject']} | "
                         f"{t['reference']} | {t['value']:.3f} | {rng} | {t['arithmetic']:.3f} | "
                         f"{t['max']:.2f} | {'pass' if t['pass'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"
