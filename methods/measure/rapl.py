"""CPU package energy from Linux RAPL (powercap sysfs), or ``None`` with the reason.

Reads the top-level package zones ``<root>/intel-rapl:N`` whose ``name`` is ``package-*`` (AMD
Zen exposes its package counters there too).  Sub-zones (``intel-rapl:N:M``: core, uncore, dram)
and ``psys`` are left out so nothing is counted twice; DRAM energy is therefore not included.

``energy_uj`` is a microjoule counter that wraps at ``max_energy_range_uj`` (about 262 kJ, some
40 minutes at 100 W), so :meth:`RaplReader.read_j` accumulates deltas, adding the range when a
reading is below the previous one, and :meth:`RaplReader.start` polls on a background thread
(:class:`~methods.measure.sampler.BackgroundSampler`) often enough that no counter wraps twice
between two reads.  Since Linux 5.10 ``energy_uj`` is readable
by root only on most distributions; an unreadable counter gives ``None`` and the reason.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from .sampler import BackgroundSampler

DEFAULT_ROOT = Path("/sys/class/powercap")


@dataclass
class _Zone:
    path: Path
    name: str
    max_range_uj: int
    last_uj: int


class RaplReader:
    """Accumulated CPU package joules since construction (``None`` + :attr:`reason` if unreadable)."""

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = Path(root)
        self.zones: List[_Zone] = []
        self.reason: Optional[str] = None
        self._total_uj = 0
        self._lock = threading.Lock()
        self._poller: Optional[BackgroundSampler] = None
        try:
            self._discover()
        except OSError as e:
            self.zones, self.reason = [], f"RAPL not readable: {e}"

    def _discover(self) -> None:
        if not self.root.is_dir():
            self.reason = f"no RAPL powercap interface at {self.root}"
            return
        tops = sorted(p for p in self.root.glob("intel-rapl:*") if p.name.count(":") == 1)
        for p in tops:
            name = (p / "name").read_text().strip()
            if name.startswith("package-"):
                self.zones.append(_Zone(p, name, int((p / "max_energy_range_uj").read_text()),
                                        int((p / "energy_uj").read_text())))
        if not self.zones:
            self.reason = f"no RAPL package zone under {self.root} (found {[p.name for p in tops]})"

    @property
    def available(self) -> bool:
        return self.reason is None

    def read_j(self) -> Optional[float]:
        """Joules used by all packages since construction; ``None`` once a read has failed."""
        with self._lock:
            if self.reason is not None:
                return None
            try:
                for z in self.zones:
                    now = int((z.path / "energy_uj").read_text())
                    delta = now - z.last_uj
                    if delta < 0:
                        delta += z.max_range_uj
                    self._total_uj += delta
                    z.last_uj = now
            except (OSError, ValueError) as e:
                self.reason = f"RAPL read failed: {e}"
                return None
            return self._total_uj / 1e6

    def start(self, poll_s: float) -> None:
        """Poll every ``poll_s`` seconds (well below the wrap time) until :meth:`close`."""
        if self.available and poll_s > 0 and self._poller is None:
            self._poller = BackgroundSampler(self.read_j, poll_s, "advrepro-rapl").start()

    def close(self) -> None:
        if self._poller is not None:
            self._poller.stop()

    def describe(self) -> Dict[str, object]:
        return {"source": "rapl", "root": str(self.root), "zones": [z.name for z in self.zones],
                "reason": self.reason}
