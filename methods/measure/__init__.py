"""Measurement: nested windows (time, memory, GPU and CPU energy) and sample-pass counting.

``make_meter`` / ``Meter`` / ``WindowRecord`` are the windows API (:mod:`.windows`); GPU energy
backends live in :mod:`.energy`, CPU RAPL energy in :mod:`.rapl`, pass counting in :mod:`.passes`,
the benchmarks' sampled heap/RSS peaks in :mod:`.memory`, and the one background polling thread
all samplers share in :mod:`.sampler`.
"""
from .energy import BACKENDS, DeviceInfo, MeterOptions, map_visible_devices
from .memory import MemorySampler
from .rapl import RaplReader
from .sampler import BackgroundSampler
from .windows import FLAGS, Meter, WindowRecord, make_meter

__all__ = ["BACKENDS", "BackgroundSampler", "DeviceInfo", "FLAGS", "MemorySampler", "Meter",
           "MeterOptions", "RaplReader", "WindowRecord", "make_meter", "map_visible_devices"]
