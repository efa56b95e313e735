"""Named, nested measurement windows: wall and CPU time, peak memory, GPU seconds and joules.

    meter = make_meter("auto", device=torch.device("cuda", 0))
    with meter.window("run"):
        with meter.window("train"):
            for epoch in range(n):
                with meter.window(f"epoch_{epoch:03d}"):
                    ...
        with meter.window("eval_pgd"):
            ...
    meter.records()   # one WindowRecord per closed window, innermost first, path 'run/train/epoch_000'
    meter.summary()   # backend, devices, idle watts, records as dicts (JSON-ready)
    meter.close()

At both edges of a window the device is synchronized first (``torch.cuda.synchronize`` when the
backend measures a CUDA device and CUDA is initialised; injectable as ``sync=``), then the clock,
process CPU time, GPU energy (:mod:`.energy`) and CPU package energy (:mod:`.rapl`) are read.

Memory: ``peak_mem_bytes`` is the process's peak RSS so far (``ru_maxrss``; a process-lifetime peak,
so it never decreases); ``peak_gpu_mem_bytes`` is ``torch.cuda.max_memory_allocated`` *within the
window*: the peak statistics are folded into every open window and reset at each edge, so nested
windows each get their own peak.
"""
from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from .energy import BACKENDS, BackendRequest, GpuBackend, MeterOptions, Snapshot
from .rapl import RaplReader

FLAGS = ("shorter_than_counter_period", "gpu_shared_with_foreign_process", "mig_not_attributable",
         "power_sampling_fallback", "aborted")


@dataclass(frozen=True)
class WindowRecord:
    """One closed window.  ``None`` means unavailable, and ``reasons`` says why."""
    name: str
    path: str                      # '/'-joined names of the open windows, e.g. 'run/train/epoch_003'
    wall_s: float
    cpu_s: float                   # process CPU time (all threads, user + system)
    peak_mem_bytes: Optional[int]  # peak RSS of the process up to the window's end
    gpu_s: Optional[float]         # wall_s x number of attributable GPUs in use
    gpu_energy_j: Optional[float]  # attributable GPUs, gross
    gpu_energy_net_j: Optional[float]   # gross - idle_watts * wall_s
    cpu_energy_j: Optional[float]  # RAPL package energy
    flags: Tuple[str, ...] = ()
    reasons: Dict[str, str] = field(default_factory=dict)
    start_s: float = 0.0           # window start, seconds since the meter's origin
    peak_gpu_mem_bytes: Optional[int] = None   # torch.cuda.max_memory_allocated within the window

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["flags"], d["reasons"] = list(self.flags), dict(self.reasons)
        return d


def _peak_rss_bytes() -> Optional[int]:
    try:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return None
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024   # Linux reports KiB


class _CudaMemory:
    """Per-window CUDA peak memory; never initialises CUDA itself."""

    def __init__(self, device: Any) -> None:
        import torch
        self.cuda, self.device = torch.cuda, device

    def take_peak(self) -> int:
        if not self.cuda.is_initialized():
            return 0
        peak = int(self.cuda.max_memory_allocated(self.device))
        self.cuda.reset_peak_memory_stats(self.device)
        return peak


@dataclass
class _Open:
    name: str
    path: str
    t0: float
    cpu0: float
    gpu: Snapshot
    cpu_j: Optional[float]
    gpu_peak: int = 0


class Meter:
    """Records nested windows.  Build it with :func:`make_meter`."""

    def __init__(self, backend: GpuBackend, *, rapl: Optional[RaplReader], clock: Callable[[], float],
                 sync: Callable[[], None], sync_name: str, cuda_memory: Optional[_CudaMemory],
                 options: MeterOptions) -> None:
        self.backend, self.rapl, self.clock, self.sync = backend, rapl, clock, sync
        self.options, self._sync_name, self._cuda_memory = options, sync_name, cuda_memory
        self._stack: List[_Open] = []
        self._records: List[WindowRecord] = []
        if rapl is not None:
            rapl.start(options.rapl_poll_s)

    def _fold_gpu_peak(self) -> None:
        if self._cuda_memory is not None:
            peak = self._cuda_memory.take_peak()
            for w in self._stack:
                w.gpu_peak = max(w.gpu_peak, peak)

    def _edge(self) -> Tuple[float, float, Snapshot, Optional[float]]:
        self.sync()
        t, cpu = self.clock(), time.process_time()
        gpu = self.backend.snapshot()
        cpu_j = self.rapl.read_j() if self.rapl is not None else None
        self._fold_gpu_peak()
        return t, cpu, gpu, cpu_j

    @contextlib.contextmanager
    def window(self, name: str) -> Iterator[None]:
        """Measure the ``with`` body as window ``name`` nested in the windows open now."""
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"window name must be a non-empty string without '/', got {name!r}")
        t, cpu, gpu, cpu_j = self._edge()
        path = "/".join([w.name for w in self._stack] + [name])
        frame = _Open(name, path, t, cpu, gpu, cpu_j)
        self._stack.append(frame)
        aborted = True
        try:
            yield
            aborted = False
        finally:
            self._close(frame, aborted)

    def _close(self, frame: _Open, aborted: bool) -> None:
        if not self._stack or self._stack[-1] is not frame:
            raise RuntimeError(f"window {frame.path!r} closed while an inner window is still open")
        t, cpu, gpu, cpu_j = self._edge()
        self._stack.pop()
        wall = t - frame.t0
        g = self.backend.window(frame.gpu, gpu, wall)
        reasons = dict(g.reasons)
        flags = list(g.flags) + (["aborted"] if aborted else [])
        cpu_energy = None
        if cpu_j is None or frame.cpu_j is None:
            reasons["cpu_energy_j"] = self._rapl_reason()
        else:
            cpu_energy = cpu_j - frame.cpu_j
        peak = _peak_rss_bytes()
        if peak is None:
            reasons["peak_mem_bytes"] = "getrusage unavailable"
        gpu_peak = frame.gpu_peak if self._cuda_memory is not None else None
        if gpu_peak is None:
            reasons["peak_gpu_mem_bytes"] = f"CUDA memory not read (backend={self.backend.name})"
        self._records.append(WindowRecord(
            name=frame.name, path=frame.path, wall_s=wall, cpu_s=cpu - frame.cpu0, peak_mem_bytes=peak,
            gpu_s=g.gpu_s, gpu_energy_j=g.energy_j, gpu_energy_net_j=g.net_j, cpu_energy_j=cpu_energy,
            flags=tuple(flags), reasons=reasons, start_s=frame.t0 - self.backend.origin,
            peak_gpu_mem_bytes=gpu_peak))

    def _rapl_reason(self) -> str:
        if self.rapl is None:
            return "RAPL disabled (MeterOptions.rapl_root=None)"
        return self.rapl.reason or "RAPL unavailable"

    def records(self) -> List[WindowRecord]:
        return list(self._records)

    def summary(self) -> Dict[str, Any]:
        b = self.backend
        idle = [b.idle_watts.get(d.index) for d in b.devices if d.attributable]
        return {
            "backend": b.name,
            "backend_reason": b.reason,
            "devices": [d.to_dict() for d in b.devices],
            "idle_watts": sum(idle) if idle and None not in idle else None,
            "idle_watts_by_device": {str(k): v for k, v in b.idle_watts.items()},
            "idle_reason": b.idle_reason,
            "sync": self._sync_name,
            "cpu_energy": self.rapl.describe() if self.rapl is not None else
            {"source": None, "reason": self._rapl_reason()},
            "notes": list(b.notes),
            "options": self.options.to_dict(),
            "records": [r.to_dict() for r in self._records],
        }

    def close(self) -> None:
        """Stop the sampler threads and release NVML; records stay readable."""
        self.backend.close()
        if self.rapl is not None:
            self.rapl.close()

    def __enter__(self) -> "Meter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _no_sync() -> None:
    pass


def make_meter(backend: str = "auto", *, device: Any = None, replay_csv: Optional[Path] = None,
               nvml: Any = None, sync: Optional[Callable[[], None]] = None,
               clock: Optional[Callable[[], float]] = None, options: Optional[MeterOptions] = None) -> Meter:
    """Build a :class:`Meter` on the GPU backend named ``backend`` (see :data:`BACKENDS`).

    ``device`` is the torch device the run uses (a string is accepted); ``nvml`` the scripted object
    for ``backend='fake'``; ``replay_csv`` the recording for ``backend='replay'``; ``sync`` and
    ``clock`` (default ``time.perf_counter``) replace the device synchronisation and the wall clock.
    """
    options = options or MeterOptions()
    clock = clock or time.perf_counter
    if isinstance(device, str):
        import torch
        device = torch.device(device)
    build = BACKENDS.get(backend)
    gpu = build(BackendRequest(device=device, replay_csv=replay_csv, nvml=nvml, clock=clock, options=options))
    cuda_memory = _CudaMemory(device) if gpu.uses_cuda else None
    if sync is not None:
        sync_name = "injected"
    elif gpu.uses_cuda:
        import torch
        sync_name = "torch.cuda.synchronize"

        def sync() -> None:
            if torch.cuda.is_initialized():
                torch.cuda.synchronize(device)
    else:
        sync, sync_name = _no_sync, "none"
    rapl = RaplReader(options.rapl_root) if options.rapl_root is not None else None
    return Meter(gpu, rapl=rapl, clock=clock, sync=sync, sync_name=sync_name, cuda_memory=cuda_memory,
                 options=options)
