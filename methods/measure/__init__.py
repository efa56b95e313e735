"""Measurement: nested windows (time, memory, GPU and CPU energy) and sample-pass counting.

``make_meter`` / ``Meter`` / ``WindowRecord`` are the windows API (:mod:`.windows`); GPU energy
backends live in :mod:`.energy`, CPU RAPL energy in :mod:`.rapl`, pass counting in :mod:`.passes`.
"""
from .energy import BACKENDS, DeviceInfo, MeterOptions, map_visible_devices
from .rapl import RaplReader
from .windows import FLAGS, Meter, WindowRecord, make_meter

__all__ = ["BACKENDS", "DeviceInfo", "FLAGS", "Meter", "MeterOptions", "RaplReader", "WindowRecord",
           "make_meter", "map_visible_devices"]
