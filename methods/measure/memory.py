"""Peak host memory while a block runs, sampled on a background thread (used by the benchmarks).

Two readings, each an ``int`` of bytes or ``None`` where the platform does not provide it:

* ``heap``: bytes the C heap has handed out and not freed (glibc ``mallinfo2``: ``uordblks +
  hblkhd``); torch's CPU tensors live there, so this follows what the steps allocate;
* ``rss``: the process's resident set (``/proc/self/statm``).

:class:`MemorySampler` reads both when the block starts (``before``), every ``interval`` seconds
while it runs (:class:`~methods.measure.sampler.BackgroundSampler`) and when it ends, keeping the
maximum (``peak``).  Peaks shorter than one interval are missed, so ``peak`` and ``peak - before``
are lower bounds.  The per-window lifetime peak RSS of :mod:`.windows` is a different number
(``ru_maxrss``, never decreasing).
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Callable, Dict, Optional

from .sampler import BackgroundSampler

Reader = Callable[[], Optional[int]]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]


def heap_reader() -> Optional[Callable[[], int]]:
    """A reader of the C-heap bytes in use (glibc ``mallinfo2``), or ``None`` off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def read() -> int:
        info = libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)
    return read


def rss_bytes() -> Optional[int]:
    """The process's resident set in bytes now, or ``None`` without ``/proc``."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def default_readers() -> Dict[str, Reader]:
    heap = heap_reader()
    return {"heap": heap or (lambda: None), "rss": rss_bytes}


class MemorySampler:
    """``with MemorySampler(0.002) as m: ...`` then ``m.report()``.

    ``interval``: seconds between background readings (``None``/``0``: read only at the two
    edges).  ``readers``: name -> reader (default: ``heap`` and ``rss``, see the module
    docstring); a reader returning ``None`` reports ``None``.
    """

    def __init__(self, interval: Optional[float], readers: Optional[Dict[str, Reader]] = None) -> None:
        self.readers = default_readers() if readers is None else dict(readers)
        self.interval = interval
        self.before: Dict[str, Optional[int]] = {}
        self.peak: Dict[str, Optional[int]] = {}
        self._sampler = BackgroundSampler(self._read, interval, "advrepro-memory-sampler")

    def _read(self) -> None:
        for name, read in self.readers.items():
            v = read()
            if v is not None:
                self.peak[name] = max(self.peak.get(name) or 0, v)

    def __enter__(self) -> "MemorySampler":
        self.before = {name: read() for name, read in self.readers.items()}
        self.peak = dict(self.before)
        self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self._sampler.stop()
        self._read()

    def report(self) -> Dict[str, Optional[int]]:
        """``{name}_before_bytes``, ``peak_{name}_bytes`` and ``{name}_added_bytes`` (peak - before)
        for every reader."""
        out: Dict[str, Optional[int]] = {}
        for name in self.readers:
            b, p = self.before.get(name), self.peak.get(name)
            out[f"{name}_before_bytes"], out[f"peak_{name}_bytes"] = b, p
            out[f"{name}_added_bytes"] = None if b is None or p is None else p - b
        return out
