"""One background sampler for every polling thread of the measurement code.

The NVML power sampler (:mod:`.energy`), the RAPL wrap-around poller (:mod:`.rapl`) and the
benchmark's memory sampler (:mod:`.memory`) all call a function every few milliseconds or seconds
on a daemon thread until they are stopped; they share this class, so starting, stopping and
joining are written (and tested) once::

    sampler = BackgroundSampler(read, interval_s=0.1, name="advrepro-power-sampler").start()
    ...
    sampler.stop()      # sets the stop event and joins the thread; idempotent

Contract: ``fn`` is called with no arguments every ``interval_s`` seconds (the first call one
interval after :meth:`start`), never after :meth:`stop` has returned (unless its ``timeout``
expired), and never concurrently with itself.  ``fn`` must not raise: an exception ends the
thread (callers catch what they expect).
An ``interval_s`` of ``None`` or ``0`` means "no thread": :meth:`start` and :meth:`stop` are
no-ops, and the callers read only at their own edges.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional


class BackgroundSampler:
    """Call ``fn`` every ``interval_s`` seconds on a daemon thread between start() and stop()."""

    def __init__(self, fn: Callable[[], object], interval_s: Optional[float], name: str) -> None:
        if interval_s is not None and not interval_s >= 0:
            raise ValueError(f"{name}: interval_s must be >= 0 or None, got {interval_s!r}")
        self.fn, self.interval_s, self.name = fn, interval_s, name
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> "BackgroundSampler":
        """Start the thread (once; a second call, or a zero/None interval, does nothing)."""
        if self.interval_s and self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.fn()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop and join the thread (``timeout`` seconds at most); safe to call repeatedly."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
