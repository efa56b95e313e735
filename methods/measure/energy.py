"""GPU energy sources for measurement windows: real NVML, null, fake and replay backends.

Every backend gives the :class:`~methods.measure.windows.Meter` a *snapshot* at each window edge
(cumulative joules per device in use, plus the pids seen on it) and turns two snapshots into one
window's GPU values.  Backends are looked up by name in :data:`BACKENDS`:

``nvml``    the real ``pynvml`` (nvidia-ml-py).  Per device, the total-energy counter
            (``nvmlDeviceGetTotalEnergyConsumption``, mJ since driver load, Volta and newer) is
            used; where it raises (``NVMLError_NotSupported`` on Pascal and older) the device falls
            back to ``nvmlDeviceGetPowerUsage`` (mW), sampled every ``sample_interval_s`` on a
            background thread (:class:`~methods.measure.sampler.BackgroundSampler`) and at every
            window edge, integrated with the trapezoid rule.
``fake``    the same code driven by a scripted pynvml-like object passed as ``nvml=`` (tests).
``replay``  the same windows computed from a recorded CSV (format below).
``null``    no GPU: every GPU value is ``None`` with the reason.
``auto``    ``nvml`` if a CUDA device is in use and pynvml initialises, otherwise ``null``; the
            summary says why.

Device mapping follows CUDA: ``CUDA_VISIBLE_DEVICES`` entries are NVML indices, ``GPU-`` UUIDs
(or unique prefixes of them) or ``MIG-`` UUIDs; CUDA ignores an invalid entry and every entry after
it, and so does :func:`map_visible_devices` (with a note).  NVML energy on a MIG slice is that of
the whole parent GPU, so MIG slices (and GPUs with MIG mode on) are marked non-attributable: their
joules and GPU-seconds are left out of the window sums and the window is flagged.  Integer entries
are NVML (PCI bus) order; CUDA uses the same order only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, which
the summary notes.  The foreign-process check compares the pids NVML reports with ``os.getpid()``;
inside a container with its own pid namespace NVML reports host pids, so a GPU may be flagged shared
when it is not -- the flag is conservative.

Idle baseline: before the run, ``idle_samples`` power readings ``idle_interval_s`` apart per device;
their mean is the idle power, and ``net = gross - idle_watts * wall_s`` over attributable devices.

Replay CSV format (written by any NVML/fake meter given ``MeterOptions(record_csv=...)``)::

    t_s,device_index,energy_mj,power_mw,phase,uuid,name,architecture,attributable

``t_s``           seconds on the meter clock since the meter's origin (the end of the idle baseline)
``device_index``  CUDA ordinal of the device in the recorded process (0 = first visible device)
``energy_mj``     total-energy counter reading in mJ, or blank
``power_mw``      power reading in mW, or blank
``phase``         ``idle`` for baseline samples, ``run`` (or blank) otherwise
``uuid,name,architecture,attributable``  optional device description; the first non-blank
                  value per device is used (``attributable`` is ``1``/``0``)

Only ``t_s`` and ``device_index`` are required, plus at least one of ``energy_mj``/``power_mw``.
A device with any ``energy_mj`` run row replays as an energy counter (linear interpolation between
rows), otherwise as power samples (the exact integral of the piecewise-linear power); both are held
at the first/last row outside the recorded span.  Idle power is the mean ``power_mw`` of ``idle``
rows.  Replayed windows carry no foreign-process information.
"""
from __future__ import annotations

import bisect
import csv
import dataclasses
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from methods.registry import Registry

from .sampler import BackgroundSampler

Clock = Callable[[], float]
COUNTER, SAMPLED, UNAVAILABLE = "energy_counter", "power_sampling", "unavailable"
CSV_FIELDS = ("t_s", "device_index", "energy_mj", "power_mw", "phase", "uuid", "name",
              "architecture", "attributable")


@dataclass(frozen=True)
class MeterOptions:
    """Tunables of a meter; the defaults suit a real run (tests shorten the idle baseline)."""
    sample_interval_s: float = 0.1   # power-sampling thread period (fallback path); 0 = edges only
    counter_period_s: float = 0.1    # assumed update period of the NVML total-energy counter
    power_period_s: float = 0.1      # assumed update period of NVML power readings
    idle_samples: int = 5            # power readings in the idle baseline (0 = no baseline)
    idle_interval_s: float = 0.1
    rapl_root: Optional[Path] = Path("/sys/class/powercap")   # None disables CPU energy
    rapl_poll_s: float = 5.0         # RAPL poll period, so counter wrap-arounds are not missed
    record_csv: Optional[Path] = None  # write every GPU reading here, in the replay format

    def __post_init__(self) -> None:
        for f in ("sample_interval_s", "counter_period_s", "power_period_s", "idle_interval_s",
                  "rapl_poll_s"):
            if not getattr(self, f) >= 0:
                raise ValueError(f"MeterOptions.{f} must be >= 0, got {getattr(self, f)!r}")
        if not (isinstance(self.idle_samples, int) and self.idle_samples >= 0):
            raise ValueError(f"MeterOptions.idle_samples must be an int >= 0, got {self.idle_samples!r}")

    def to_dict(self) -> Dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class DeviceInfo:
    """One GPU in use.  ``index`` is its CUDA ordinal inside this process."""
    index: int
    visible_id: str                  # the CUDA_VISIBLE_DEVICES entry it came from
    nvml_index: Optional[int]        # NVML index of the (parent) GPU
    uuid: Optional[str]
    name: Optional[str]
    architecture: Optional[str]
    attributable: bool
    mig: bool
    mode: str = UNAVAILABLE          # energy_counter | power_sampling | unavailable

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Snapshot:
    t: float
    joules: Dict[int, Optional[float]]   # cumulative joules per device index
    errors: Dict[int, str]
    foreign: frozenset                   # device indices with a foreign process


@dataclass(frozen=True)
class GpuWindow:
    gpu_s: Optional[float]
    energy_j: Optional[float]
    net_j: Optional[float]
    flags: Tuple[str, ...]
    reasons: Dict[str, str]


class MappingError(ValueError):
    pass


# ----------------------------------------------------------------------------- device mapping
def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _nvml_errors(nvml: Any) -> tuple:
    return (getattr(nvml, "NVMLError", RuntimeError), AttributeError)


def _arch_name(nvml: Any, handle: Any) -> Optional[str]:
    try:
        code = nvml.nvmlDeviceGetArchitecture(handle)
    except _nvml_errors(nvml):
        return None
    prefix = "NVML_DEVICE_ARCH_"
    names = [k[len(prefix):].lower() for k in dir(nvml) if k.startswith(prefix) and getattr(nvml, k) == code]
    return names[0] if names else f"code_{code}"


def _mig_mode_on(nvml: Any, handle: Any) -> bool:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except _nvml_errors(nvml):
        return False
    return current == 1


def _resolve_entry(nvml: Any, entry: str, uuids: List[str]) -> Tuple[int, Any, Any, bool]:
    """-> (nvml index of the GPU, handle CUDA uses, handle of the whole GPU, is_mig)."""
    if entry.isdigit():
        i = int(entry)
        if i >= len(uuids):
            raise MappingError(f"index {i} but NVML sees {len(uuids)} device(s)")
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        return i, h, h, False
    if entry.startswith("GPU-"):
        hits = [i for i, u in enumerate(uuids) if u.startswith(entry)]
        if len(hits) != 1:
            raise MappingError("no NVML device has this UUID" if not hits else "ambiguous UUID prefix")
        h = nvml.nvmlDeviceGetHandleByIndex(hits[0])
        return hits[0], h, h, False
    if entry.startswith("MIG-"):
        try:
            mig = nvml.nvmlDeviceGetHandleByUUID(entry)
            parent = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig)
        except _nvml_errors(nvml) as e:
            raise MappingError(f"NVML does not resolve this MIG UUID ({e})") from None
        parent_uuid = _text(nvml.nvmlDeviceGetUUID(parent))
        return uuids.index(parent_uuid), mig, parent, True
    raise MappingError("not an index, a GPU- UUID or a MIG- UUID")


def map_visible_devices(nvml: Any, visible: Optional[str], notes: Optional[List[str]] = None
                        ) -> List[Tuple[DeviceInfo, Any, Any]]:
    """Map a ``CUDA_VISIBLE_DEVICES`` value (``None`` = unset) to NVML devices, in CUDA order.

    Returns ``(info, cuda_handle, gpu_handle)`` per visible device: ``cuda_handle`` is the MIG
    handle for a MIG slice (used for its process list), ``gpu_handle`` the whole GPU (energy, power).
    """
    notes = [] if notes is None else notes
    count = int(nvml.nvmlDeviceGetCount())
    uuids = [_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)]
    entries = [str(i) for i in range(count)] if visible is None else \
        ([e.strip() for e in visible.split(",")] if visible.strip() else [])
    out: List[Tuple[DeviceInfo, Any, Any]] = []
    for entry in entries:
        try:
            nvml_index, handle, gpu, mig = _resolve_entry(nvml, entry, uuids)
        except MappingError as e:
            notes.append(f"CUDA_VISIBLE_DEVICES entry {entry!r}: {e}; CUDA ignores it and all after it")
            break
        mig_mode = not mig and _mig_mode_on(nvml, gpu)
        if mig_mode:
            notes.append(f"GPU {uuids[nvml_index]} has MIG mode on: its energy is not attributable")
        info = DeviceInfo(index=len(out), visible_id=entry, nvml_index=nvml_index,
                          uuid=entry if mig else uuids[nvml_index],
                          name=_text(nvml.nvmlDeviceGetName(gpu)), architecture=_arch_name(nvml, gpu),
                          attributable=not (mig or mig_mode), mig=mig or mig_mode)
        out.append((info, handle, gpu))
    if count > 1 and any(e.isdigit() for e in entries) and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        notes.append("CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA ordinals may differ from NVML indices")
    return out


# ----------------------------------------------------------------------------- channels
class _Recorder:
    """Append every reading to a CSV in the replay format."""

    def __init__(self, path: Path, origin: float) -> None:
        self.origin, self._lock, self._described = origin, threading.Lock(), set()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "w", newline="")
        self._csv = csv.writer(self._file)
        self._csv.writerow(CSV_FIELDS)

    def row(self, t: float, dev: DeviceInfo, energy_mj: Any = "", power_mw: Any = "", phase: str = "run") -> None:
        with self._lock:
            desc = ["", "", "", ""]
            if dev.index not in self._described:
                self._described.add(dev.index)
                desc = [dev.uuid or "", dev.name or "", dev.architecture or "", int(dev.attributable)]
            self._csv.writerow([repr(t - self.origin), dev.index, energy_mj, power_mw, phase, *desc])
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


class _CounterChannel:
    mode = COUNTER

    def __init__(self, nvml: Any, handle: Any, dev: DeviceInfo, clock: Clock, rec: Optional[_Recorder]) -> None:
        self.nvml, self.handle, self.dev, self.clock, self.rec = nvml, handle, dev, clock, rec

    def read_j(self) -> float:
        mj = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        if self.rec:
            self.rec.row(self.clock(), self.dev, energy_mj=mj)
        return mj / 1000.0


class _SampledChannel:
    """Running trapezoid integral of power readings; every read is also a sample."""
    mode = SAMPLED

    def __init__(self, nvml: Any, handle: Any, dev: DeviceInfo, clock: Clock, rec: Optional[_Recorder]) -> None:
        self.nvml, self.handle, self.dev, self.clock, self.rec = nvml, handle, dev, clock, rec
        self._lock, self._last, self._joules = threading.Lock(), None, 0.0

    def read_j(self) -> float:
        with self._lock:
            t, mw = self.clock(), self.nvml.nvmlDeviceGetPowerUsage(self.handle)
            if self._last is not None and t > self._last[0]:
                self._joules += 0.5 * (mw + self._last[1]) / 1000.0 * (t - self._last[0])
            if self._last is None or t >= self._last[0]:
                self._last = (t, mw)
            if self.rec:
                self.rec.row(t, self.dev, power_mw=mw)
            return self._joules


class _ReplayChannel:
    """Cumulative joules at clock time from recorded counter readings or power samples."""

    def __init__(self, mode: str, ts: Sequence[float], values: Sequence[float], clock: Clock, origin: float) -> None:
        self.mode, self.ts, self.clock, self.origin = mode, list(ts), clock, origin
        if mode == COUNTER:
            self.cum = [v / 1000.0 for v in values]
        else:
            self.w = [v / 1000.0 for v in values]
            self.cum = [0.0]
            for i in range(1, len(self.ts)):
                self.cum.append(self.cum[-1] + 0.5 * (self.w[i] + self.w[i - 1]) * (self.ts[i] - self.ts[i - 1]))

    def read_j(self) -> float:
        t = min(max(self.clock() - self.origin, self.ts[0]), self.ts[-1])
        i = max(bisect.bisect_right(self.ts, t) - 1, 0)
        if i + 1 >= len(self.ts) or t == self.ts[i]:
            return self.cum[i]
        frac = (t - self.ts[i]) / (self.ts[i + 1] - self.ts[i])
        if self.mode == COUNTER:
            return self.cum[i] + frac * (self.cum[i + 1] - self.cum[i])
        w_t = self.w[i] + frac * (self.w[i + 1] - self.w[i])
        return self.cum[i] + 0.5 * (self.w[i] + w_t) * (t - self.ts[i])


# ----------------------------------------------------------------------------- backends
class GpuBackend:
    """What the meter needs from a GPU energy source."""
    name = "null"
    uses_cuda = False   # the meter may synchronize and read torch.cuda memory for this backend

    def __init__(self, reason: str, clock: Clock) -> None:
        self.reason, self.clock, self.origin = reason, clock, clock()
        self.devices: Tuple[DeviceInfo, ...] = ()
        self.idle_watts: Dict[int, Optional[float]] = {}
        self.idle_reason: Optional[str] = f"backend=null: {reason}"
        self.notes: List[str] = []

    def snapshot(self) -> Snapshot:
        return Snapshot(self.clock(), {}, {}, frozenset())

    def window(self, a: Snapshot, b: Snapshot, wall_s: float) -> GpuWindow:
        why = f"backend=null: {self.reason}"
        return GpuWindow(None, None, None, (), {"gpu_s": why, "gpu_energy_j": why, "gpu_energy_net_j": why})

    def close(self) -> None:
        pass


class _ChannelBackend(GpuBackend):
    """Devices with one energy channel each (NVML, fake and replay backends)."""

    def __init__(self, name: str, reason: str, clock: Clock, options: MeterOptions) -> None:
        super().__init__(reason, clock)
        self.name, self.options, self.idle_reason = name, options, None
        self.channels: Dict[int, Any] = {}

    def _pids(self, dev: DeviceInfo) -> Sequence[int]:
        return ()

    def snapshot(self) -> Snapshot:
        joules, errors, foreign = {}, {}, set()
        for dev in self.devices:
            ch = self.channels.get(dev.index)
            try:
                joules[dev.index] = ch.read_j() if ch else None
                if ch is None:
                    errors[dev.index] = "neither the energy counter nor power readings are supported"
            except Exception as e:   # a transient NVML error loses this edge, not the run
                joules[dev.index], errors[dev.index] = None, f"{self.name} read failed: {e!r}"
            if any(pid != os.getpid() for pid in self._pids(dev)):
                foreign.add(dev.index)
        return Snapshot(self.clock(), joules, errors, frozenset(foreign))

    def window(self, a: Snapshot, b: Snapshot, wall_s: float) -> GpuWindow:
        flags, reasons = [], {}
        used = [d for d in self.devices if d.attributable]
        if len(used) < len(self.devices):
            flags.append("mig_not_attributable")
        if any(d.mode == SAMPLED for d in self.devices):
            flags.append("power_sampling_fallback")
        period = max([self.options.counter_period_s if d.mode == COUNTER else self.options.power_period_s
                      for d in self.devices] or [0.0])
        if wall_s < period:
            flags.append("shorter_than_counter_period")
        if a.foreign | b.foreign:
            flags.append("gpu_shared_with_foreign_process")
        gpu_s = energy = net = None
        if not used:
            why = "no attributable GPU in use (NVML energy of a MIG slice is the whole parent GPU's)"
            reasons = {"gpu_s": why, "gpu_energy_j": why, "gpu_energy_net_j": why}
            return GpuWindow(None, None, None, tuple(flags), reasons)
        gpu_s = wall_s * len(used)
        missing = [a.errors.get(d.index) or b.errors.get(d.index) for d in used
                   if a.joules.get(d.index) is None or b.joules.get(d.index) is None]
        if missing:
            reasons["gpu_energy_j"] = reasons["gpu_energy_net_j"] = "; ".join(m or "no reading" for m in missing)
            return GpuWindow(gpu_s, None, None, tuple(flags), reasons)
        energy = sum(b.joules[d.index] - a.joules[d.index] for d in used)
        idle = [self.idle_watts.get(d.index) for d in used]
        if any(w is None for w in idle):
            reasons["gpu_energy_net_j"] = self.idle_reason or "no idle baseline"
        else:
            net = energy - sum(idle) * wall_s
        return GpuWindow(gpu_s, energy, net, tuple(flags), reasons)


class NvmlBackend(_ChannelBackend):
    """Real or fake pynvml: map devices, measure idle power, pick counter or power sampling."""

    def __init__(self, name: str, reason: str, nvml: Any, device_index: Optional[int], clock: Clock,
                 options: MeterOptions, uses_cuda: bool = False) -> None:
        super().__init__(name, reason, clock, options)
        self.nvml, self.uses_cuda = nvml, uses_cuda
        mapped = map_visible_devices(nvml, os.environ.get("CUDA_VISIBLE_DEVICES"), self.notes)
        if device_index is not None:
            if device_index >= len(mapped):
                raise MappingError(f"device cuda:{device_index} but {len(mapped)} GPU(s) are visible "
                                   f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
            mapped = [mapped[device_index]]
        if not mapped:
            raise MappingError("no GPU is visible to NVML")
        self._handles = {info.index: handle for info, handle, _ in mapped}
        idle_rows = self._measure_idle([(info, gpu) for info, _, gpu in mapped])
        self.origin = clock()
        self._rec = _Recorder(options.record_csv, self.origin) if options.record_csv else None
        devices = []
        for info, _, gpu in mapped:
            try:
                nvml.nvmlDeviceGetTotalEnergyConsumption(gpu)
                cls = _CounterChannel
            except _nvml_errors(nvml):
                try:
                    nvml.nvmlDeviceGetPowerUsage(gpu)
                    cls = _SampledChannel
                except _nvml_errors(nvml):
                    cls = None
            info = dataclasses.replace(info, mode=cls.mode if cls else UNAVAILABLE)
            devices.append(info)
            if cls:
                self.channels[info.index] = cls(nvml, gpu, info, clock, self._rec)
        self.devices = tuple(devices)
        if self._rec:
            by_index = {d.index: d for d in self.devices}
            for t, dev_index, mw in idle_rows:
                self._rec.row(t, by_index[dev_index], power_mw=mw, phase="idle")
        self._sampled = [c for c in self.channels.values() if c.mode == SAMPLED]
        self._sampler = BackgroundSampler(self._sample_once, options.sample_interval_s,
                                          "advrepro-power-sampler")
        if self._sampled:
            self._sampler.start()

    def _measure_idle(self, devs: List[Tuple[DeviceInfo, Any]]) -> List[Tuple[float, int, float]]:
        n, rows = self.options.idle_samples, []
        readings: Dict[int, List[float]] = {info.index: [] for info, _ in devs}
        for k in range(n):
            if k:
                time.sleep(self.options.idle_interval_s)
            for info, gpu in devs:
                try:
                    mw = self.nvml.nvmlDeviceGetPowerUsage(gpu)
                except _nvml_errors(self.nvml) as e:
                    self.idle_reason = f"idle baseline: power reading not supported ({e!r})"
                    continue
                readings[info.index].append(mw / 1000.0)
                rows.append((self.clock(), info.index, mw))
        if n == 0:
            self.idle_reason = "idle baseline disabled (MeterOptions.idle_samples=0)"
        self.idle_watts = {i: (sum(w) / len(w) if len(w) == n and n else None) for i, w in readings.items()}
        return rows

    def _sample_once(self) -> None:
        for ch in self._sampled:
            try:
                ch.read_j()
            except Exception:   # a missed sample widens one trapezoid; the next read recovers
                pass

    def _pids(self, dev: DeviceInfo) -> Sequence[int]:
        try:
            return [p.pid for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self._handles[dev.index])]
        except _nvml_errors(self.nvml):
            return ()

    def close(self) -> None:
        self._sampler.stop()
        if self._rec:
            self._rec.close()
            self._rec = None
        try:
            self.nvml.nvmlShutdown()
        except _nvml_errors(self.nvml):
            pass


class ReplayBackend(_ChannelBackend):
    def __init__(self, path: Path, device_index: Optional[int], clock: Clock, options: MeterOptions) -> None:
        super().__init__("replay", f"replaying {path}", clock, options)
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"t_s", "device_index"} - set(reader.fieldnames or ())
            if missing or not {"energy_mj", "power_mw"} & set(reader.fieldnames or ()):
                raise ValueError(f"{path}: replay CSV needs columns t_s, device_index and energy_mj "
                                 f"and/or power_mw; has {reader.fieldnames}")
            per: Dict[int, Dict[str, Any]] = {}
            for line, row in enumerate(reader, start=2):
                try:
                    t, i = float(row["t_s"]), int(row["device_index"])
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{path}:{line}: bad t_s/device_index ({err})") from None
                e, p = (row.get("energy_mj") or "").strip(), (row.get("power_mw") or "").strip()
                d = per.setdefault(i, {"energy": [], "power": [], "idle": [], "desc": {}})
                for k in ("uuid", "name", "architecture", "attributable"):
                    if (row.get(k) or "").strip() and k not in d["desc"]:
                        d["desc"][k] = row[k].strip()
                try:
                    if (row.get("phase") or "").strip() == "idle":
                        if p:
                            d["idle"].append(float(p) / 1000.0)
                    elif e:
                        d["energy"].append((t, float(e)))
                    elif p:
                        d["power"].append((t, float(p)))
                except ValueError as err:
                    raise ValueError(f"{path}:{line}: bad energy_mj/power_mw ({err})") from None
        indices = sorted(per) if device_index is None else [device_index]
        devices = []
        for i in indices:
            if i not in per:
                raise ValueError(f"{path}: no rows for device_index {i} (has {sorted(per)})")
            d, desc = per[i], per[i]["desc"]
            mode, pts = (COUNTER, d["energy"]) if d["energy"] else ((SAMPLED, d["power"]) if d["power"] else (UNAVAILABLE, []))
            info = DeviceInfo(index=i, visible_id=str(i), nvml_index=None, uuid=desc.get("uuid"),
                              name=desc.get("name"), architecture=desc.get("architecture"),
                              attributable=desc.get("attributable", "1") not in ("0", "false", "False"),
                              mig=desc.get("attributable", "1") in ("0", "false", "False"), mode=mode)
            devices.append(info)
            if pts:
                pts.sort()
                self.channels[i] = _ReplayChannel(mode, [p[0] for p in pts], [p[1] for p in pts], clock, self.origin)
            self.idle_watts[i] = sum(d["idle"]) / len(d["idle"]) if d["idle"] else None
        self.devices = tuple(devices)
        if any(w is None for w in self.idle_watts.values()):
            self.idle_reason = "replay CSV has no idle rows for some device"


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class BackendRequest:
    device: Any                      # torch.device or None
    replay_csv: Optional[Path]
    nvml: Any
    clock: Clock
    options: MeterOptions

    @property
    def cuda_index(self) -> Optional[int]:
        if self.device is None or self.device.type != "cuda":
            return None
        return self.device.index or 0   # 'cuda' means the current device, 0 unless set otherwise


BACKENDS: Registry[Callable[[BackendRequest], GpuBackend]] = Registry("measurement backend")


@BACKENDS.register("null")
def _null(req: BackendRequest) -> GpuBackend:
    return GpuBackend("chosen explicitly (no GPU measured)", req.clock)


@BACKENDS.register("nvml")
def _nvml(req: BackendRequest) -> GpuBackend:
    import pynvml
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        raise RuntimeError(f"backend='nvml': pynvml did not initialise ({e!r}); on a machine without "
                           "an NVIDIA driver use backend='auto' or 'null'") from e
    return NvmlBackend("nvml", "chosen explicitly", pynvml, req.cuda_index, req.clock, req.options,
                       uses_cuda=req.cuda_index is not None)


@BACKENDS.register("fake")
def _fake(req: BackendRequest) -> GpuBackend:
    if req.nvml is None:
        raise ValueError("backend='fake' needs nvml=<a scripted pynvml-like object>")
    req.nvml.nvmlInit()
    return NvmlBackend("fake", "scripted nvml", req.nvml, req.cuda_index, req.clock, req.options)


@BACKENDS.register("replay")
def _replay(req: BackendRequest) -> GpuBackend:
    if req.replay_csv is None:
        raise ValueError("backend='replay' needs replay_csv=<path of a recorded CSV>")
    return ReplayBackend(Path(req.replay_csv), req.cuda_index, req.clock, req.options)


@BACKENDS.register("auto")
def _auto(req: BackendRequest) -> GpuBackend:
    if req.cuda_index is None:
        return GpuBackend(f"auto: no CUDA device in use (device={req.device})", req.clock)
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception as e:
        return GpuBackend(f"auto: pynvml did not initialise ({e!r})", req.clock)
    try:
        return NvmlBackend("nvml", f"auto: pynvml initialised and cuda:{req.cuda_index} is in use",
                           pynvml, req.cuda_index, req.clock, req.options, uses_cuda=True)
    except Exception as e:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
        return GpuBackend(f"auto: NVML device mapping failed ({e!r})", req.clock)
