"""Microbenchmarks: time every method's training step and compare it with its pass arithmetic.

``python -m methods bench --config workflow/config/bench.yaml --out-dir DIR`` (Snakemake rule
``bench``) runs :func:`run_bench`.  For each benched recipe x arch x thread count it builds the
model, method (set up), optimizer and schedule exactly as training does
(:func:`methods.builders.build_training`) and runs the trainer's own epoch loop
(:func:`methods.training.run_epoch`) over :class:`FixedBatches`, a loader that hands out one fixed
synthetic batch: images uniform in [0, 1] of the dataset's shape, labels uniform over its
classes, both drawn from ``seed``.  The model's weights are the seeded initial weights.

Steady state: the steps run at epoch ``train.epochs - 1`` of the recipe (config ``epoch:
last``), so every epoch-dependent warm-up is over (Selective AT's random-selection warm-up, BB's
clean warm-up, N-FGSM's eps ramp).  State a method draws once per epoch (BB's tLHS noise) is
drawn in the warm-up steps and reused by the timed steps, i.e. its once-per-epoch cost is left
out; ``method_stats.bb_noise_redrawn`` = 0 in ``bench.json`` shows it.

**What is timed.**  ``warmup_steps`` untimed steps, then ``repeats`` timed ones.  For timed step
``i``:

* ``t_step[i]``: the full training step exactly as the trainer runs it (``method.step``, i.e.
  ``method.loss`` + ``zero_grad`` + ``backward`` + ``optimizer.step``, then ``scheduler.step``),
  from the moment the trainer receives the batch to the moment it asks for the next (loading
  and augmentation are not included);
* right after it, for every row count ``n`` in ``R_i`` = {the batch rows of every model forward
  call step ``i`` made (read from :meth:`PassCounter.totals_by_rows`)} plus ``B``, in increasing
  ``n``: ``T_fb(n)``, one forward + ``loss.backward()`` (CE, train mode, all weight gradients,
  the recipe's precision and memory format) of the same model on ``n`` rows of the same
  synthetic batch (the fixed batch sliced, or tiled then sliced when ``n > B``), and ``T_f(n)``,
  one forward of the same under ``torch.no_grad()``.  These passes are booked to the pass phase
  ``bench_unit`` and left out of the step's passes.

So the unit costs are interleaved with the steps (background drift hits both alike) and are
measured at the row counts the phases actually run at: B for plain training, ``m B`` for BB's
attack and (GS/CP) selection, ``(m + 1) B`` for BG's selection, the selected count for BB's
training forward, ``k = int(rho B)`` for Selective AT's attack.  Each interval is ``clock()``
after ``torch.cuda.synchronize`` on CUDA (``time.perf_counter`` by default).

**Definitions.**  With ``fwd_p(n)`` / ``bwd_p(n)`` the forward / backward sample-passes per step
of phase ``p`` whose forward call had ``n`` rows (averaged over the timed steps; the passes of
step ``i`` alone give ``predicted[i]``), and medians over the timed steps that measured ``n``::

    t_fb(n) = median(T_fb(n)) / n          t_f(n) = median(T_f(n)) / n        (per sample)
    predicted_p = sum over n of  bwd_p(n) * t_fb(n) + (fwd_p(n) - bwd_p(n)) * t_f(n)
    predicted = sum over p of predicted_p                  (= mean over i of predicted[i])
    overhead_ratio = median over timed steps i of  t_step[i] / predicted[i]
    fbeq = sum over p, n of  bwd_p(n) + (fwd_p(n) - bwd_p(n)) * t_f(n) / t_fb(n)
    step_ratio(a, b)  = median(t_step[a]) / median(t_step[b])
    epoch_ratio(a, b) = (median(t_step[a]) / B_a) / (median(t_step[b]) / B_b)

When every step runs the same passes (all methods but BB's GS / BG selection, whose selected
row count varies from step to step) ``overhead_ratio = median(t_step) / predicted``.  Because
every pass is priced at its own row count, ``overhead_ratio`` measures what the step does
besides its model passes (bookkeeping, selection logic, copies, the optimizer and schedule),
not the per-sample cost difference between batch sizes.  ``overhead_ratio_costs_at_B`` prices
every pass at ``t_fb(B)`` / ``t_f(B)`` instead (the earlier definition, kept for comparison: its
gap to ``overhead_ratio`` is the batch-size curve).  An attack's forward+backward computes input
gradients only (no weight gradients), and attacks may run in eval mode, so attack-heavy steps
can come out below 1.  ``fbeq`` counts forward+backward-equivalent sample-passes per step (a
forward-only pass weighs what a forward costs relative to a forward+backward at its own row
count); ``fwd_bwd_equivalents_per_sample = fbeq / B``.

``epoch_ratio`` is the ratio of epoch times on the same training set (an epoch is N / B steps;
drop_last rounding ignored).  Ratios of medians come with a conservative range from the
quartiles, ``[q25_a / q75_b, q75_a / q25_b]``, and with the ratio the pass arithmetic predicts
(the same ratio of ``fbeq``); see :mod:`methods.bench_tables`.

Targets (``targets:`` in the config, one row per arch x thread count; kinds in
:data:`methods.bench_tables.TARGETS`) are marked pass/fail against their ``max``.  Outputs, each
written atomically: ``bench.json`` (validated against
``workflow/schemas/bench_result.schema.json`` first), ``cost_table.md`` and ``cost_table.csv``
(:mod:`methods.bench_tables`) and ``cost_vs_robustness.png`` (:mod:`methods.cost_plot`, from the
run's result files only).
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import builders, training
from .bench_tables import cost_frame, evaluate_targets, render_markdown
from .config import (ARITHMETIC_RUNTIME, REPO_ROOT, SCHEMA_DIR, ConfigError, load_recipes,
                     load_yaml, recipe_annotations, resolve_cell)
from .data import DatasetBundle, Split
from .measure import MemorySampler, make_meter
from .registry import DATASETS
from .results import atomic_write_text, git_commit, package_versions, write_result
from .runtime import autocast, cpu_generator, pick_device, seed_everything

UNIT_PHASE = "bench_unit"   # passes of the unit-cost measurements, dropped from the step's passes
SCHEMA = "bench_result.schema.json"
Clock = Callable[[], float]
RowCounts = Dict[str, Dict[int, Dict[str, float]]]   # {phase: {rows: {forward, backward}}}


# ----------------------------------------------------------------------------- configuration
def _path(rel: str) -> Path:
    return Path(rel) if Path(rel).is_absolute() else REPO_ROOT / rel


def runtime_defaults() -> Dict[str, Any]:
    """The config schema's defaults for ``amp``, ``channels_last`` and ``compile``: what
    Snakemake fills into a workflow config before resolving its cells."""
    props = load_yaml(SCHEMA_DIR / "config.schema.yaml").get("properties") or {}
    return {k: (props.get(k) or {}).get("default") for k in ARITHMETIC_RUNTIME}


def load_bench_config(path: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(the config recipes are resolved in, the bench settings).

    The resolving config is ``base_config`` (a workflow config) with the bench's ``archs``,
    its inline ``recipes`` and ``datasets`` added, and the bench's ``amp``, ``channels_last``
    and ``compile`` where it sets them (the arithmetic runtime, part of the training identity:
    unset, the base config's apply, with the config schema's defaults, so a benched cell is the
    run's cell, ``train_hash`` and all); the benched names
    are the recipes of the base config's ``cells`` (``recipes_from_cells``) followed by
    ``bench`` entries (a recipe name, or ``{recipe, name, batch_scale}``).  ``device`` and
    ``threads`` are bench settings: they say where the steps run, not what is trained.
    """
    bench = load_yaml(Path(path))
    base = load_yaml(_path(bench["base_config"])) if bench.get("base_config") else {}
    resolving = {**runtime_defaults(), **base}
    resolving["recipe_files"] = list(base.get("recipe_files", [])) + list(bench.get("recipe_files", []))
    resolving["recipes"] = {**(base.get("recipes") or {}), **(bench.get("recipes") or {})}
    resolving["datasets"] = {**(base.get("datasets") or {}), **(bench.get("datasets") or {})}
    if not bench.get("archs"):
        raise ConfigError(f"{path}: archs: at least one arch to bench is needed")
    resolving["archs"] = bench["archs"]
    resolving.update({k: bench[k] for k in ARITHMETIC_RUNTIME if k in bench})
    entries: List[Dict[str, Any]] = []
    if bench.get("recipes_from_cells"):
        for group in base.get("cells", []):
            entries += [{"recipe": r} for r in group.get("recipes", [])]
    for i, e in enumerate(bench.get("bench") or []):
        e = {"recipe": e} if isinstance(e, str) else dict(e)
        if "recipe" not in e:
            raise ConfigError(f"{path}: bench[{i}]: missing field 'recipe'")
        entries.append(e)
    seen, benches = set(), []
    for e in entries:
        e.setdefault("name", e["recipe"])
        e["batch_scale"] = int(e.get("batch_scale", 1))
        if e["name"] not in seen:
            seen.add(e["name"])
            benches.append(e)
    if not benches:
        raise ConfigError(f"{path}: nothing to bench (set recipes_from_cells or bench)")
    threads = bench.get("threads", [1])
    settings = {
        "dataset": bench.get("dataset") or next(iter(resolving["datasets"]), None),
        "benches": benches, "archs": list(bench["archs"]), "device": bench.get("device"),
        "threads": [int(t) for t in (threads if isinstance(threads, list) else [threads])],
        "batch_size": bench.get("batch_size", "recipe"),
        "warmup_steps": int(bench.get("warmup_steps", 2)), "repeats": int(bench.get("repeats", 10)),
        "seed": int(bench.get("seed", 0)), "epoch": bench.get("epoch", "last"),
        "memory_poll_s": bench.get("memory_poll_s", 0.002),
        "targets": list(bench.get("targets") or []),
        "plot": {"published": base.get("published", []), **(bench.get("plot") or {})},
    }
    if settings["repeats"] < 1:
        raise ConfigError(f"{path}: repeats must be >= 1, got {settings['repeats']}")
    return resolving, settings


# ----------------------------------------------------------------------------- arithmetic
def summarize(samples: List[float]) -> Dict[str, Any]:
    q25, med, q75 = (float(v) for v in np.percentile(samples, [25, 50, 75]))
    return {"median": med, "q25": q25, "q75": q75, "iqr": q75 - q25, "n": len(samples),
            "samples": [float(s) for s in samples]}


def step_passes(by_rows: RowCounts) -> Dict[str, Dict[str, float]]:
    """``{phase: {forward, backward}}``: the per-row-count counts summed over row counts."""
    return {p: {k: sum(c[k] for c in by_n.values()) for k in ("forward", "backward")}
            for p, by_n in by_rows.items()}


def rows_run(by_rows: RowCounts) -> Set[int]:
    """Every row count any phase's passes ran at (the forward calls', and the backwards through
    them)."""
    return {int(n) for by_n in by_rows.values() for n, c in by_n.items()
            if c["forward"] or c["backward"]}


def predicted_step_time(by_rows: RowCounts, t_fb: Dict[int, float],
                        t_f: Dict[int, float]) -> Dict[str, float]:
    """Seconds per step by phase (and ``total``): the sum over row counts ``n`` of
    ``bwd(n) * t_fb[n] + (fwd(n) - bwd(n)) * t_f[n]``, with per-sample unit costs at ``n``."""
    by_phase = {p: sum(c["backward"] * t_fb[n] + (c["forward"] - c["backward"]) * t_f[n]
                       for n, c in by_n.items())
                for p, by_n in by_rows.items()}
    return {**by_phase, "total": sum(by_phase.values())}


def fwd_bwd_equivalents(by_rows: RowCounts, t_fb: Dict[int, float], t_f: Dict[int, float]) -> float:
    """Forward+backward-equivalent sample-passes per step (``fbeq`` in the module docstring)."""
    return sum(c["backward"] + (c["forward"] - c["backward"]) * t_f[n] / t_fb[n]
               for by_n in by_rows.values() for n, c in by_n.items())


def _subtract(after: RowCounts, before: RowCounts) -> RowCounts:
    out: RowCounts = {}
    for p, by_n in after.items():
        if p == UNIT_PHASE:
            continue
        for n, c in by_n.items():
            old = before.get(p, {}).get(n, {"forward": 0, "backward": 0})
            d = {k: c[k] - old[k] for k in ("forward", "backward")}
            if d["forward"] or d["backward"]:
                out.setdefault(p, {})[int(n)] = d
    return out


# ----------------------------------------------------------------------------- measurement
class RowBatches:
    """``n``-row batches of the fixed batch: its first ``n`` rows, tiled when ``n > B``.

    Built once per ``n`` (outside any timed interval) and reused.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, channels_last: bool) -> None:
        self.x, self.y, self.channels_last = x, y, channels_last
        self._cache: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if n not in self._cache:
            reps = math.ceil(n / len(self.y))
            x = self.x.repeat(reps, *([1] * (self.x.dim() - 1)))[:n]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self._cache[n] = (x, self.y.repeat(reps)[:n])
        return self._cache[n]


class FixedBatches:
    """The trainer's loader, replaced: the fixed batch ``steps`` times, each step timed, and
    after each step the unit costs at that step's row counts (and ``B``) timed.

    Results: ``t_step`` (seconds per step) and ``t_fwd_bwd`` / ``t_fwd`` (``{n: [seconds of one
    pass over n rows]}``, one entry per step that ran at ``n``).
    """

    def __init__(self, parts: builders.TrainingParts, x: torch.Tensor, y: torch.Tensor, steps: int,
                 clock: Clock, device: torch.device, batches: RowBatches) -> None:
        self.parts, self.x, self.y, self.steps, self.clock = parts, x, y, steps, clock
        self.device, self.batches = device, batches
        self.t_step: List[float] = []
        self.step_rows: List[RowCounts] = []   # each step's own passes by row count
        self.t_fwd_bwd: Dict[int, List[float]] = {}
        self.t_fwd: Dict[int, List[float]] = {}

    def __len__(self) -> int:
        return self.steps

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, fn: Callable[[], None]) -> float:
        self._sync()
        t0 = self.clock()
        fn()
        self._sync()
        return self.clock() - t0

    def _fwd_bwd(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(self.device, self.parts.precision):
            loss = F.cross_entropy(self.parts.model(x), y)
        loss.backward()

    def _fwd(self, x: torch.Tensor) -> None:
        with torch.no_grad(), autocast(self.device, self.parts.precision):
            self.parts.model(x)

    def measure_units(self, rows: Iterable[int]) -> None:
        """Time one ``T_fb(n)`` and one ``T_f(n)`` for every ``n`` in ``rows`` (booked to
        ``bench_unit``); gradients are cleared before each and after the last."""
        model, counter = self.parts.model, self.parts.counter
        with counter.phase(UNIT_PHASE):
            for n in sorted(rows):
                x, y = self.batches(n)
                model.zero_grad(set_to_none=True)
                self.t_fwd_bwd.setdefault(n, []).append(self._timed(lambda: self._fwd_bwd(x, y)))
                self.t_fwd.setdefault(n, []).append(self._timed(lambda: self._fwd(x)))
        model.zero_grad(set_to_none=True)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        counter = self.parts.counter
        for _ in range(self.steps):
            xb, yb = self.x.clone(), self.y.clone()
            before = counter.totals_by_rows()
            self._sync()
            t0 = self.clock()
            yield xb, yb, torch.arange(len(yb), device=yb.device)
            self._sync()
            self.t_step.append(self.clock() - t0)
            step = _subtract(counter.totals_by_rows(), before)
            self.step_rows.append(step)
            self.measure_units(rows_run(step) | {len(self.y)})


def synthetic_bundle(cell: Dict[str, Any], seed: int, batch_size: int) -> DatasetBundle:
    """A bundle with the dataset's shape and classes and synthetic data: a training split of
    ``batch_size`` images (the benched batch, so per-example method state has a row for each)
    and a balanced validation / meta split of 10 images per class (for methods whose ``setup``
    needs one, e.g. Meta-IADA).  Images uniform in [0, 1] (stored as uint8), labels uniform
    over the classes (train) or cycling through them (meta), all drawn from ``seed``."""
    source = DATASETS.get(cell["dataset"]["source"])
    shape, classes = tuple(source.image_shape), source.num_classes
    g = cpu_generator(seed)

    def split(labels: torch.Tensor) -> Split:
        x = (torch.rand((len(labels), *shape), generator=g) * 255).to(torch.uint8)
        return Split(x, labels, torch.arange(len(labels)))

    train = split(torch.randint(0, classes, (batch_size,), generator=g))
    meta = split(torch.arange(10 * classes) % classes)
    empty = Split(torch.zeros((0, *shape), dtype=torch.uint8),
                  torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    return DatasetBundle(name=cell["dataset"]["name"], train=train, val=meta, test=empty,
                         num_classes=classes, image_shape=shape,
                         default_augmentation=source.default_augmentation)


def _per_step(counts: RowCounts, steps: int) -> RowCounts:
    """Counts per step, without the unit-cost phase and without row counts that saw no pass."""
    out: RowCounts = {}
    for p, by_n in counts.items():
        for n, c in by_n.items():
            if p != UNIT_PHASE and (c["forward"] or c["backward"]):
                out.setdefault(p, {})[int(n)] = {k: c[k] / steps for k in ("forward", "backward")}
    return out


def bench_cell(cell: Dict[str, Any], batch_size: int, settings: Dict[str, Any], clock: Clock,
               meter, window: str, device: torch.device) -> Dict[str, Any]:
    """Time one recipe's training step (see the module docstring for what is measured)."""
    seed = settings["seed"]
    seed_everything(seed)
    bundle = synthetic_bundle(cell, seed, batch_size)
    x = bundle.train.x.to(device).float().div_(255)     # the fixed batch is the training split
    y = bundle.train.y.to(device)
    epochs = int(cell["train"]["epochs"])
    epoch = epochs - 1 if settings["epoch"] == "last" else int(settings["epoch"])
    warmup, repeats = settings["warmup_steps"], settings["repeats"]
    parts = builders.build_training(cell, bundle, device, warmup + repeats)
    batches = RowBatches(x, y, parts.channels_last)

    def steps(n: int) -> Tuple[FixedBatches, Dict[str, Any]]:
        loader = FixedBatches(parts, x, y, n, clock, device, batches)
        return loader, training.run_epoch(parts, loader, device, epoch, epochs)

    if warmup:
        steps(warmup)
    with MemorySampler(settings["memory_poll_s"]) as memory, meter.window(window):
        loader, row = steps(repeats)
    by_rows = _per_step(parts.counter.totals_by_rows(), repeats)
    parts.counter.detach()
    win = meter.records()[-1]
    unit_costs = {}
    for n in sorted(loader.t_fwd_bwd):
        fb, f = summarize(loader.t_fwd_bwd[n]), summarize(loader.t_fwd[n])
        unit_costs[str(n)] = {"rows": n, "fwd_bwd_s": fb, "fwd_s": f,
                              "fwd_bwd_per_sample_s": fb["median"] / n,
                              "fwd_per_sample_s": f["median"] / n}
    t_fb = {int(n): u["fwd_bwd_per_sample_s"] for n, u in unit_costs.items()}
    t_f = {int(n): u["fwd_per_sample_s"] for n, u in unit_costs.items()}
    predicted = predicted_step_time(by_rows, t_fb, t_f)
    at_b = lambda rows: predicted_step_time(
        {p: {batch_size: c} for p, c in step_passes(rows).items()},
        {batch_size: t_fb[batch_size]}, {batch_size: t_f[batch_size]})["total"]
    ratios = summarize([t / predicted_step_time(rows, t_fb, t_f)["total"]
                        for t, rows in zip(loader.t_step, loader.step_rows)])
    ratios_at_b = [t / at_b(rows) for t, rows in zip(loader.t_step, loader.step_rows)]
    passes = step_passes(by_rows)
    total = {k: sum(c[k] for c in passes.values()) for k in ("forward", "backward")}
    step = summarize(loader.t_step)
    return {
        "recipe": cell["recipe"], "method": cell["method"], "arch": cell["arch"]["name"],
        "threads": torch.get_num_threads(), "device": str(device),
        "precision": parts.precision.value, "channels_last": parts.channels_last,
        "compiled": parts.compiled,
        "batch_size": batch_size, "epoch": epoch, "epochs": epochs, "warmup_steps": warmup,
        "step_time_s": step,
        "passes_per_step": passes, "passes_per_step_total": total,
        "passes_per_sample": {k: v / batch_size for k, v in total.items()},
        "passes_by_rows": {p: {str(n): c for n, c in sorted(by_n.items())}
                           for p, by_n in by_rows.items()},
        "rows_run": sorted(rows_run(by_rows)),
        "unit_costs": unit_costs,
        "predicted_step_s": predicted["total"],
        "predicted_by_phase_s": {k: v for k, v in predicted.items() if k != "total"},
        "fwd_bwd_equivalents_per_sample": fwd_bwd_equivalents(by_rows, t_fb, t_f) / batch_size,
        "overhead_ratio": ratios["median"],
        "overhead_ratio_steps": ratios,
        "overhead_ratio_costs_at_B": float(np.median(ratios_at_b)),
        "skipped_steps": row["skipped_steps"], "method_stats": row["method_stats"],
        "memory": {**memory.report(), "process_peak_rss_bytes": win.peak_mem_bytes,
                   "peak_gpu_mem_bytes": win.peak_gpu_mem_bytes},
        "window": {"wall_s": win.wall_s, "cpu_s": win.cpu_s, "cpu_energy_j": win.cpu_energy_j,
                   "gpu_energy_j": win.gpu_energy_j},
        "method_params": parts.method.describe(),
    }


# ----------------------------------------------------------------------------- outputs
def machine_info(device: torch.device) -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu_model": cpu, "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch": torch.__version__, "device": str(device), "python": platform.python_version(),
            "platform": platform.platform(), "host": platform.node(),
            "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


DEFINITIONS = {
    "unit_costs": "per row count n: T_fb(n), T_f(n) = one forward+backward (CE, train mode) / one "
                  "no-grad forward of the same model on n rows of the fixed batch, timed after "
                  "every timed step that ran a forward at n (and for n = B always); per-sample "
                  "t_fb(n) = median(T_fb(n)) / n, t_f(n) = median(T_f(n)) / n",
    "predicted_step_s": "mean over timed steps of the prediction: sum over phases p and row "
                        "counts n of bwd_p(n) * t_fb(n) + (fwd_p(n) - bwd_p(n)) * t_f(n); "
                        "fwd_p(n), bwd_p(n) = sample-passes per step of phase p whose forward "
                        "call had n rows (PassCounter.totals_by_rows)",
    "overhead_ratio": "median over timed steps of step time / that step's prediction (its own "
                      "passes by row count); = median step time / predicted_step_s when every "
                      "step runs the same passes",
    "overhead_ratio_steps": "the per-step ratios behind overhead_ratio, summarised",
    "overhead_ratio_costs_at_B": "overhead_ratio with every pass priced at t_fb(B), t_f(B) (the "
                                 "earlier definition: the batch-size curve left in)",
    "fwd_bwd_equivalents_per_sample": "sum over p, n of bwd_p(n) + (fwd_p(n) - bwd_p(n)) * "
                                      "t_f(n) / t_fb(n), divided by B",
    "step_ratio": "median step time of subject / median step time of reference",
    "epoch_ratio": "(median step / B) of subject / (median step / B) of reference "
                   "(epoch time on the same training set, drop_last rounding ignored)",
    "range": "[q25_subject / q75_reference, q75_subject / q25_reference]",
    "arithmetic": "the target's ratio computed from fwd_bwd_equivalents instead of measured "
                  "step times",
    "steady_state": "steps at epoch train.epochs - 1; once-per-epoch state drawn in warm-up",
}


def run_bench(config_path: Path, out_dir: Path, clock: Optional[Clock] = None,
              evals: Optional[List[Path]] = None) -> Dict[str, Any]:
    """Run the benchmarks of ``config_path`` and write the outputs into ``out_dir``.

    ``evals``: the evaluation files the cost plot is drawn from (the Snakemake rule passes the
    run's evaluations); without them the config's ``plot.results_glob`` is used.  The plot's
    published points come from the annotations of the recipes the bench config resolves.
    Returns the ``bench.json`` record as written.
    """
    from .cost_plot import plot_cost_vs_robustness

    clock = clock or time.perf_counter
    resolving, settings = load_bench_config(Path(config_path))
    out_dir = Path(out_dir)
    threads_before = torch.get_num_threads()
    device = pick_device(settings["device"])
    machine = machine_info(device)
    meter = make_meter("auto", device=device)
    recipes = load_recipes(resolving)
    results: Dict[str, Dict[str, Any]] = {}
    try:
        for threads in settings["threads"]:
            torch.set_num_threads(threads)
            for arch in settings["archs"]:
                for entry in settings["benches"]:
                    cell = resolve_cell(resolving, settings["dataset"], arch, entry["recipe"],
                                        settings["seed"], recipes=recipes)
                    base_b = (int(cell["train"]["batch_size"]) if settings["batch_size"] == "recipe"
                              else int(settings["batch_size"]))
                    key = f"{entry['name']}@{arch}@t{threads}"
                    r = bench_cell(cell, base_b * entry["batch_scale"], settings, clock, meter, key,
                                   device)
                    results[key] = {"bench": entry["name"], "batch_scale": entry["batch_scale"],
                                    "train_hash": cell["train_hash"], **r}
                    print(f"bench {key}: step {1e3 * r['step_time_s']['median']:.1f} ms, "
                          f"overhead {r['overhead_ratio']:.3f}", flush=True)
    finally:
        torch.set_num_threads(threads_before)
        meter.close()
    machine["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    targets = evaluate_targets(settings["targets"], results)
    plot_spec = dict(settings["plot"])
    if evals is not None:
        plot_spec["files"] = [str(p) for p in evals]
    plot = plot_cost_vs_robustness(plot_spec, out_dir / "cost_vs_robustness.png",
                                   annotations=recipe_annotations(recipes, recipes))
    summary = {
        "kind": "bench", "machine": machine,
        "code": {"git": git_commit(), "packages": package_versions()},
        "settings": {k: v for k, v in settings.items() if k != "plot"},
        "clock": getattr(clock, "__name__", type(clock).__name__),
        "definitions": DEFINITIONS,
        "results": results, "targets": targets, "plot": plot,
    }
    summary = write_result(out_dir / "bench.json", summary, SCHEMA)
    atomic_write_text(out_dir / "cost_table.csv", cost_frame(results).to_csv(index=False))
    atomic_write_text(out_dir / "cost_table.md", render_markdown(results, targets, machine, settings))
    return summary
