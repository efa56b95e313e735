"""A scripted stand-in for the ``pynvml`` module (nvidia-ml-py), for tests without a GPU.

Counters and power are functions of a :class:`FakeClock`, so a test advances time and knows the
exact joules a window must report::

    clock = FakeClock()
    nvml = FakeNvml([volta("GPU-aaaa", energy_mj=lambda t: 250_000 * t)], clock)
    meter = make_meter("fake", nvml=nvml, clock=clock, ...)

Only the calls advrepro uses are implemented; they raise the same error classes as pynvml
(``NVMLError_NotSupported`` for an energy counter on Pascal, ``NVMLError_NotFound`` for an unknown
UUID).  Every energy/power call is appended to :attr:`FakeNvml.events`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence


class NVMLError(Exception):
    value = 999

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value})"


class NVMLError_NotSupported(NVMLError):
    value = 3


class NVMLError_NotFound(NVMLError):
    value = 6


class NVMLError_InvalidArgument(NVMLError):
    value = 2


class NVMLError_LibraryNotFound(NVMLError):
    value = 12


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = float(t)

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@dataclass
class Process:
    pid: int
    usedGpuMemory: int = 0


@dataclass(eq=False)
class FakeMig:
    uuid: str
    pids: Sequence[int] = ()
    parent: Optional["FakeGpu"] = None


@dataclass(eq=False)
class FakeGpu:
    uuid: str
    name: str = "Tesla V100-SXM2-16GB"
    arch: int = 5                                          # NVML_DEVICE_ARCH_VOLTA
    energy_mj: Optional[Callable[[float], float]] = None   # None: counter not supported
    power_mw: Optional[Callable[[float], float]] = None    # None: power not supported
    pids: Sequence[int] = ()
    mig_mode: bool = False
    migs: List[FakeMig] = field(default_factory=list)

    def __post_init__(self) -> None:
        for m in self.migs:
            m.parent = self


def volta(uuid: str, **kw) -> FakeGpu:
    return FakeGpu(uuid, name="Tesla V100-SXM2-16GB", arch=FakeNvml.NVML_DEVICE_ARCH_VOLTA, **kw)


def pascal(uuid: str, **kw) -> FakeGpu:
    """A Pascal card: the total-energy counter raises NVMLError_NotSupported."""
    kw.pop("energy_mj", None)
    return FakeGpu(uuid, name="Tesla P100-PCIE-16GB", arch=FakeNvml.NVML_DEVICE_ARCH_PASCAL, **kw)


class FakeNvml:
    """Module-like object with the pynvml functions the meter calls."""
    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NotFound = NVMLError_NotFound
    NVMLError_InvalidArgument = NVMLError_InvalidArgument
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVML_DEVICE_ARCH_KEPLER, NVML_DEVICE_ARCH_MAXWELL, NVML_DEVICE_ARCH_PASCAL = 2, 3, 4
    NVML_DEVICE_ARCH_VOLTA, NVML_DEVICE_ARCH_TURING, NVML_DEVICE_ARCH_AMPERE = 5, 6, 7
    NVML_DEVICE_ARCH_ADA, NVML_DEVICE_ARCH_HOPPER = 8, 9

    def __init__(self, gpus: Sequence[FakeGpu], clock: Optional[FakeClock] = None, fail_init: bool = False) -> None:
        self.gpus, self.clock, self.fail_init = list(gpus), clock or FakeClock(), fail_init
        self.events: List[str] = []
        self.initialised = 0

    # -- library
    def nvmlInit(self) -> None:
        if self.fail_init:
            raise NVMLError_LibraryNotFound()
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    # -- handles
    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        if not 0 <= i < len(self.gpus):
            raise NVMLError_InvalidArgument()
        return self.gpus[i]

    def nvmlDeviceGetHandleByUUID(self, uuid) -> object:
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        for g in self.gpus:
            if g.uuid == uuid:
                return g
            for m in g.migs:
                if m.uuid == uuid:
                    return m
        raise NVMLError_NotFound()

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, h) -> FakeGpu:
        if not isinstance(h, FakeMig):
            raise NVMLError_InvalidArgument()
        return h.parent

    def nvmlDeviceIsMigDeviceHandle(self, h) -> int:
        return int(isinstance(h, FakeMig))

    def nvmlDeviceGetMigMode(self, h) -> List[int]:
        return [int(h.mig_mode), int(h.mig_mode)]

    # -- description
    def nvmlDeviceGetUUID(self, h) -> str:
        return h.uuid

    def nvmlDeviceGetName(self, h) -> str:
        return h.name if isinstance(h, FakeGpu) else f"MIG slice of {h.parent.name}"

    def nvmlDeviceGetArchitecture(self, h) -> int:
        return h.arch

    def nvmlDeviceGetIndex(self, h) -> int:
        return self.gpus.index(h)

    # -- readings
    def nvmlDeviceGetTotalEnergyConsumption(self, h) -> int:
        self.events.append("energy")
        if not isinstance(h, FakeGpu) or h.energy_mj is None:
            raise NVMLError_NotSupported()
        return int(round(h.energy_mj(self.clock())))

    def nvmlDeviceGetPowerUsage(self, h) -> int:
        self.events.append("power")
        if not isinstance(h, FakeGpu) or h.power_mw is None:
            raise NVMLError_NotSupported()
        return int(round(h.power_mw(self.clock())))

    def nvmlDeviceGetComputeRunningProcesses(self, h) -> List[Process]:
        return [Process(pid) for pid in h.pids]
