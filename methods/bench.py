"""Microbenchmarks: time every method's training step and compare it with its pass arithmetic.

``python -m methods bench --config workflow/config/bench.yaml --out-dir DIR`` (Snakemake rule
``bench``) runs :func:`run_bench`.  For each benched recipe x arch x thread count it builds the
model, method, optimizer and schedule with the trainer's own builders
(:mod:`methods.training`) and feeds the trainer's own step loop (``training._run_epoch``) a
fixed synthetic batch: images uniform in [0, 1] of the dataset's shape, labels uniform over its
classes, both drawn from ``seed``.  The model's weights are the seeded initial weights.

Steady state: the steps run at epoch ``train.epochs - 1`` of the recipe (config ``epoch:
last``), so every epoch-dependent warm-up is over (Selective AT's random-selection warm-up, BB's
clean warm-up, N-FGSM's eps ramp).  State a method draws once per epoch (BB's tLHS noise) is
drawn in the warm-up steps and reused by the timed steps, i.e. its once-per-epoch cost is left
out; ``method_stats.bb_noise_redrawn`` = 0 in ``bench.json`` shows it.

Per repeat ``i`` (``repeats`` of them, after ``warmup_steps`` untimed ones), interleaved so that
background load drifts affect numerator and denominator alike:

* ``t_fwd_bwd[i]``: one forward + ``loss.backward()`` of the same model on the same batch (CE
  loss, train mode, gradients of all weights, the recipe's precision);
* ``t_fwd[i]``: one forward of the same model on the same batch under ``torch.no_grad()``;
* ``t_step[i]``: one full training step exactly as the trainer runs it: ``method.loss`` +
  ``zero_grad`` + ``backward`` + ``optimizer.step`` + ``scheduler.step`` (from the moment the
  trainer receives the batch to the moment it asks for the next; loading and augmentation
  are not included).

Each interval is ``clock()`` after ``torch.cuda.synchronize`` on CUDA (``time.perf_counter`` by
default).  Medians (and quartiles) are over the repeats.  With the batch size B and the passes of
the timed steps counted by :class:`~methods.measure.passes.PassCounter` (sample-passes per step,
by phase), the definitions are exactly::

    t_fb = median(t_fwd_bwd) / B          t_f = median(t_fwd) / B          (per sample)
    predicted = sum over phases p of  bwd_p * t_fb + (fwd_p - bwd_p) * t_f
    overhead_ratio = median(t_step) / predicted
    step_ratio(a, b)  = median(t_step[a]) / median(t_step[b])
    epoch_ratio(a, b) = (median(t_step[a]) / B_a) / (median(t_step[b]) / B_b)

``epoch_ratio`` is the ratio of epoch times on the same training set (an epoch is N / B steps;
drop_last rounding ignored).  Ratios of medians come with a conservative range from the
quartiles, e.g. ``[q25_a / q75_b, q75_a / q25_b]``, and with the ratio the pass arithmetic
predicts: the same ratio of forward+backward-equivalent sample-passes,
``fbeq = predicted / t_fb`` per step (``fwd_bwd_equivalents_per_sample`` = ``fbeq / B``).

The unit costs are per sample at the recipe's batch size B.  A method whose passes run on other
batch sizes (BB attacks m*B stacked rows; Selective AT attacks rho*B rows) therefore carries the
per-sample cost difference between those batch sizes and B in its overhead ratio; compare the
``unit_costs`` of a bench at the other batch size (e.g. ``nfgsm_mnist_x5``) to see it.  An
attack's forward+backward computes input gradients only (no weight gradients), so attack-heavy
steps can come out below 1.

Targets (``targets:`` in the config, one row per arch x thread count; kinds in :data:`TARGETS`)
are marked pass/fail against their ``max``.  Outputs, each written atomically: ``bench.json``,
``cost_table.md``, ``cost_table.csv`` and ``cost_vs_robustness.png``
(:mod:`methods.cost_plot`, from the run's result files only).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import training
from .config import REPO_ROOT, ConfigError, load_recipes, load_yaml, resolve_cell
from .data import DatasetBundle, Split
from .measure import make_meter
from .measure.passes import PassCounter
from .registry import DATASETS, METHODS, Registry
from .results import atomic_write_text
from .runtime import Precision, autocast, cpu_generator, grad_scaler, pick_device, seed_everything

UNIT_PHASE = "bench_unit"   # passes of the unit-cost measurements, dropped from the step's passes
Clock = Callable[[], float]


# ----------------------------------------------------------------------------- configuration
def _path(rel: str) -> Path:
    return Path(rel) if Path(rel).is_absolute() else REPO_ROOT / rel


def load_bench_config(path: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(the config recipes are resolved in, the bench settings).

    The resolving config is ``base_config`` (a workflow config) with the bench's ``archs``,
    its inline ``recipes`` and ``datasets`` added; the benched names are the recipes of the base
    config's ``cells`` (``recipes_from_cells``) followed by ``bench`` entries (a recipe name, or
    ``{recipe, name, batch_scale}``).
    """
    bench = load_yaml(Path(path))
    base = load_yaml(_path(bench["base_config"])) if bench.get("base_config") else {}
    resolving = dict(base)
    resolving["recipe_files"] = list(base.get("recipe_files", [])) + list(bench.get("recipe_files", []))
    resolving["recipes"] = {**(base.get("recipes") or {}), **(bench.get("recipes") or {})}
    resolving["datasets"] = {**(base.get("datasets") or {}), **(bench.get("datasets") or {})}
    if not bench.get("archs"):
        raise ConfigError(f"{path}: archs: at least one arch to bench is needed")
    resolving["archs"] = bench["archs"]
    resolving.update({k: bench.get(k) for k in ("device", "amp", "channels_last")})
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
        "benches": benches, "archs": list(bench["archs"]),
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


# ----------------------------------------------------------------------------- measurement
def summarize(samples: List[float]) -> Dict[str, Any]:
    q25, med, q75 = (float(v) for v in np.percentile(samples, [25, 50, 75]))
    return {"median": med, "q25": q25, "q75": q75, "iqr": q75 - q25, "n": len(samples),
            "samples": [float(s) for s in samples]}


def predicted_step_time(passes_per_step: Dict[str, Dict[str, float]], t_fb: float,
                        t_f: float) -> Dict[str, float]:
    """Seconds per step by phase (and ``total``): bwd * t_fb + (fwd - bwd) * t_f per phase,
    with per-sample unit costs ``t_fb`` (forward+backward) and ``t_f`` (forward only)."""
    by_phase = {p: c["backward"] * t_fb + (c["forward"] - c["backward"]) * t_f
                for p, c in passes_per_step.items()}
    return {**by_phase, "total": sum(by_phase.values())}


class FixedBatches:
    """The trainer's loader, replaced: the fixed batch ``steps`` times, each step timed.

    Before each batch is handed out, one forward+backward and one no-grad forward of the same
    model on the same batch are timed (booked to the pass phase ``bench_unit``).
    """

    def __init__(self, model, x, y, steps: int, clock: Clock, device, precision, counter) -> None:
        self.model, self.x, self.y, self.steps, self.clock = model, x, y, steps, clock
        self.device, self.precision, self.counter = device, precision, counter
        self.t_step: List[float] = []
        self.t_fwd_bwd: List[float] = []
        self.t_fwd: List[float] = []

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

    def _fwd_bwd(self) -> None:
        with autocast(self.device, self.precision):
            loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()

    def _fwd(self) -> None:
        with torch.no_grad(), autocast(self.device, self.precision):
            self.model(self.x)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.steps):
            self.model.zero_grad(set_to_none=True)
            with self.counter.phase(UNIT_PHASE):
                self.t_fwd_bwd.append(self._timed(self._fwd_bwd))
                self.t_fwd.append(self._timed(self._fwd))
            self.model.zero_grad(set_to_none=True)
            xb, yb = self.x.clone(), self.y.clone()
            self._sync()
            t0 = self.clock()
            yield xb, yb
            self._sync()
            self.t_step.append(self.clock() - t0)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]


def _heap_reader() -> Optional[Callable[[], int]]:
    """Bytes the C heap has handed out and not freed (glibc ``mallinfo2``: uordblks + hblkhd);
    torch's CPU tensors live there.  ``None`` off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def read() -> int:
        info = libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)
    return read


def _rss_bytes() -> Optional[int]:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class MemorySampler:
    """Peak memory while the block runs, polled every ``interval`` seconds by a thread:
    ``heap`` (C-heap bytes in use, where CPU tensors live; see :func:`_heap_reader`) and
    ``rss`` (the process's resident set).  ``before`` is the reading when the block starts
    (model, optimizer state and batch already allocated), so ``peak - before`` is what the
    steps add.  Short peaks between two polls are missed, so these are lower bounds."""

    def __init__(self, interval: Optional[float]) -> None:
        heap = _heap_reader()
        self.readers = {"heap": heap or (lambda: None), "rss": _rss_bytes}
        self.interval = interval
        self.before: Dict[str, Optional[int]] = {}
        self.peak: Dict[str, Optional[int]] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _read(self) -> None:
        for name, read in self.readers.items():
            v = read()
            if v is not None:
                self.peak[name] = max(self.peak.get(name) or 0, v)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._read()

    def __enter__(self) -> "MemorySampler":
        self.before = {name: read() for name, read in self.readers.items()}
        self.peak = dict(self.before)
        if self.interval:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._read()

    def report(self) -> Dict[str, Optional[int]]:
        out: Dict[str, Optional[int]] = {}
        for name in self.readers:
            b, p = self.before.get(name), self.peak.get(name)
            out[f"{name}_before_bytes"], out[f"peak_{name}_bytes"] = b, p
            out[f"{name}_added_bytes"] = None if b is None or p is None else p - b
        return out


def synthetic_bundle(cell: Dict[str, Any]) -> DatasetBundle:
    """A bundle with the dataset's shape and classes but no data (all the model builder needs)."""
    source = DATASETS.get(cell["dataset"]["source"])
    empty = Split(torch.zeros((0, *source.image_shape), dtype=torch.uint8),
                  torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    return DatasetBundle(name=cell["dataset"]["name"], train=empty, val=empty, test=empty,
                         num_classes=source.num_classes, image_shape=tuple(source.image_shape),
                         default_augmentation=source.default_augmentation)


def bench_cell(cell: Dict[str, Any], batch_size: int, settings: Dict[str, Any], clock: Clock,
               meter, window: str) -> Dict[str, Any]:
    """Time one recipe's training step (see the module docstring for what is measured)."""
    runtime = cell["runtime"]
    device = pick_device(runtime.get("device"))
    precision = Precision(runtime.get("amp") or "fp32")
    channels_last = bool(runtime.get("channels_last"))
    seed = settings["seed"]
    seed_everything(seed)
    bundle = synthetic_bundle(cell)
    g = cpu_generator(seed)
    x = torch.rand((batch_size, *bundle.image_shape), generator=g).to(device)
    y = torch.randint(0, bundle.num_classes, (batch_size,), generator=g).to(device)
    model = training.build_cell_model(cell, bundle).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    method = METHODS.get(cell["method"])(threat=training.build_threat(cell["threat"]),
                                         **cell.get("method_args", {}))
    tcfg = cell["train"]
    epochs = int(tcfg["epochs"])
    epoch = epochs - 1 if settings["epoch"] == "last" else int(settings["epoch"])
    warmup, repeats = settings["warmup_steps"], settings["repeats"]
    optimizer = training.build_optimizer(model, tcfg["optimizer"])
    scheduler = training.build_schedule(optimizer, tcfg.get("schedule", {}),
                                        float(tcfg["optimizer"]["lr"]), warmup + repeats, epochs)
    scaler = grad_scaler(device, precision)
    counter = PassCounter(model)
    method_gen = cpu_generator(seed + 1)

    def steps(n: int) -> Tuple[FixedBatches, Dict[str, Any]]:
        loader = FixedBatches(model, x, y, n, clock, device, precision, counter)
        row = training._run_epoch(model, method, loader, optimizer, scheduler, scaler, counter,
                                  device, precision, channels_last, method_gen, epoch, epochs)
        return loader, row

    if warmup:
        steps(warmup)
    with MemorySampler(settings["memory_poll_s"]) as memory, meter.window(window):
        loader, row = steps(repeats)
    counter.detach()
    win = meter.records()[-1]
    passes = {p: {k: v / repeats for k, v in c.items()}
              for p, c in row["passes"].items() if p != UNIT_PHASE}
    step, fb, fwd = (summarize(t) for t in (loader.t_step, loader.t_fwd_bwd, loader.t_fwd))
    t_fb, t_f = fb["median"] / batch_size, fwd["median"] / batch_size
    predicted = predicted_step_time(passes, t_fb, t_f)
    total = {k: sum(c[k] for c in passes.values()) for k in ("forward", "backward")}
    return {
        "recipe": cell["recipe"], "method": cell["method"], "arch": cell["arch"]["name"],
        "threads": torch.get_num_threads(), "device": str(device), "precision": precision.value,
        "batch_size": batch_size, "epoch": epoch, "epochs": epochs, "warmup_steps": warmup,
        "step_time_s": step,
        "passes_per_step": passes, "passes_per_step_total": total,
        "passes_per_sample": {k: v / batch_size for k, v in total.items()},
        "unit_costs": {"fwd_bwd_batch_s": fb, "fwd_batch_s": fwd,
                       "fwd_bwd_per_sample_s": t_fb, "fwd_per_sample_s": t_f},
        "predicted_step_s": predicted["total"],
        "predicted_by_phase_s": {k: v for k, v in predicted.items() if k != "total"},
        "fwd_bwd_equivalents_per_sample": predicted["total"] / (t_fb * batch_size),
        "overhead_ratio": step["median"] / predicted["total"],
        "skipped_steps": row["skipped_steps"], "method_stats": row["method_stats"],
        "memory": {**memory.report(), "process_peak_rss_bytes": win.peak_mem_bytes,
                   "peak_gpu_mem_bytes": win.peak_gpu_mem_bytes},
        "window": {"wall_s": win.wall_s, "cpu_s": win.cpu_s, "cpu_energy_j": win.cpu_energy_j,
                   "gpu_energy_j": win.gpu_energy_j},
        "method_params": method.describe(),
    }


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
    return [{"subject": n, "reference": "pass arithmetic", "value": group[n]["overhead_ratio"],
             "range": None, "arithmetic": 1.0} for n in names]


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


def cost_frame(results: Dict[str, Dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for key, r in results.items():
        s, u, m = r["step_time_s"], r["unit_costs"], r["memory"]
        rows.append({
            "bench": r["bench"], "recipe": r["recipe"], "method": r["method"], "arch": r["arch"],
            "threads": r["threads"], "batch_size": r["batch_size"],
            "fwd_per_sample": r["passes_per_sample"]["forward"],
            "bwd_per_sample": r["passes_per_sample"]["backward"],
            "fwd_bwd_equivalents": r["fwd_bwd_equivalents_per_sample"],
            "step_ms": 1e3 * s["median"], "step_ms_q25": 1e3 * s["q25"], "step_ms_q75": 1e3 * s["q75"],
            "fwd_bwd_batch_ms": 1e3 * u["fwd_bwd_batch_s"]["median"],
            "fwd_batch_ms": 1e3 * u["fwd_batch_s"]["median"],
            "predicted_ms": 1e3 * r["predicted_step_s"], "overhead_ratio": r["overhead_ratio"],
            "step_heap_mb": None if m["heap_added_bytes"] is None else m["heap_added_bytes"] / 2**20,
            "peak_rss_mb": None if m["peak_rss_bytes"] is None else m["peak_rss_bytes"] / 2**20,
            "peak_gpu_mem_mb": None if m["peak_gpu_mem_bytes"] is None else m["peak_gpu_mem_bytes"] / 2**20,
        })
    return pd.DataFrame(rows)


def render_markdown(frame: pd.DataFrame, targets: List[Dict[str, Any]], machine: Dict[str, Any],
                    settings: Dict[str, Any]) -> str:
    lines = [f"Machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, torch "
             f"{machine['torch']}, device {machine['device']}; load average at start "
             f"{machine['loadavg_at_start']}.",
             f"Medians over {settings['repeats']} steps after {settings['warmup_steps']} warm-up "
             "steps, on a fixed synthetic batch, at the recipe's last epoch (steady state).",
             "predicted = sum over phases of bwd x t_fb + (fwd - bwd) x t_f (per-sample unit costs "
             "of one forward+backward / no-grad forward measured in the same run); "
             "overhead = measured / predicted.  Step heap: peak C-heap bytes in use during the "
             "timed steps minus those in use before them (polled; a lower bound).", "",
             "| bench | method | arch | threads | B | fwd+bwd / sample | fb-equiv | step ms [IQR] "
             "| fwd+bwd ms | fwd ms | predicted ms | overhead | step heap MB | peak RSS MB |",
             "|" + "---|" * 14]
    for r in frame.itertuples():
        mb = lambda v: "n/a" if v is None or pd.isna(v) else f"{v:.1f}"
        lines.append(f"| {r.bench} | {r.method} | {r.arch} | {r.threads} | {r.batch_size} | "
                     f"{r.fwd_per_sample:.2f}+{r.bwd_per_sample:.2f} | {r.fwd_bwd_equivalents:.2f} | "
                     f"{r.step_ms:.1f} [{r.step_ms_q25:.1f}, {r.step_ms_q75:.1f}] | "
                     f"{r.fwd_bwd_batch_ms:.1f} | {r.fwd_batch_ms:.1f} | {r.predicted_ms:.1f} | "
                     f"{r.overhead_ratio:.3f} | {mb(r.step_heap_mb)} | {mb(r.peak_rss_mb)} |")
    if targets:
        lines += ["", "Targets (measured: ratio of medians, range from the quartiles; arithmetic: "
                  "the same ratio of forward+backward-equivalent sample-passes):", "",
                  "| target | arch | threads | subject | reference | measured | range | "
                  "arithmetic | max | result |", "|" + "---|" * 10]
        for t in targets:
            rng = "" if t["range"] is None else f"[{t['range'][0]:.3f}, {t['range'][1]:.3f}]"
            lines.append(f"| {t['target']} | {t['arch']} | {t['threads']} | {t['subject']} | "
                         f"{t['reference']} | {t['value']:.3f} | {rng} | {t['arithmetic']:.3f} | "
                         f"{t['max']:.2f} | "
                         f"{'pass' if t['pass'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def run_bench(config_path: Path, out_dir: Path, clock: Optional[Clock] = None,
              evals: Optional[List[Path]] = None) -> Dict[str, Any]:
    """Run the benchmarks of ``config_path`` and write the outputs into ``out_dir``.

    ``evals``: the evaluation files the cost plot is drawn from (the Snakemake rule passes the
    run's evaluations); without them the config's ``plot.results_glob`` is used.
    """
    from .cost_plot import plot_cost_vs_robustness

    clock = clock or time.perf_counter
    resolving, settings = load_bench_config(Path(config_path))
    out_dir = Path(out_dir)
    threads_before = torch.get_num_threads()
    device = pick_device(resolving.get("device"))
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
                    r = bench_cell(cell, base_b * entry["batch_scale"], settings, clock, meter, key)
                    results[key] = {"bench": entry["name"], "batch_scale": entry["batch_scale"], **r}
                    print(f"bench {key}: step {1e3 * r['step_time_s']['median']:.1f} ms, "
                          f"overhead {r['overhead_ratio']:.3f}", flush=True)
    finally:
        torch.set_num_threads(threads_before)
        meter.close()
    machine["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    targets = evaluate_targets(settings["targets"], results)
    frame = cost_frame(results)
    plot_spec = dict(settings["plot"])
    if evals is not None:
        plot_spec["files"] = [str(p) for p in evals]
    plot = plot_cost_vs_robustness(plot_spec, out_dir / "cost_vs_robustness.png")
    summary = {
        "kind": "bench", "machine": machine,
        "settings": {k: v for k, v in settings.items() if k not in ("plot",)},
        "clock": getattr(clock, "__name__", type(clock).__name__),
        "definitions": {
            "predicted_step_s": "sum over phases of bwd * t_fb + (fwd - bwd) * t_f; per-step sample-"
                                "passes from PassCounter; t_fb, t_f = median forward+backward / "
                                "no-grad forward time of the same model on the same batch, / B",
            "overhead_ratio": "median step time / predicted_step_s",
            "step_ratio": "median step time of subject / median step time of reference",
            "epoch_ratio": "(median step / B) of subject / (median step / B) of reference "
                           "(epoch time on the same training set, drop_last rounding ignored)",
            "range": "[q25_subject / q75_reference, q75_subject / q25_reference]",
            "arithmetic": "the target's ratio computed from forward+backward-equivalent sample-"
                          "passes (predicted_step_s / t_fb) instead of measured step times",
            "steady_state": "steps at epoch train.epochs - 1; once-per-epoch state drawn in warm-up"},
        "results": results, "targets": targets, "plot": plot,
    }
    atomic_write_text(out_dir / "bench.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out_dir / "cost_table.csv", frame.to_csv(index=False))
    atomic_write_text(out_dir / "cost_table.md", render_markdown(frame, targets, machine, settings))
    return summary
