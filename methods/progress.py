"""Progress of a long job: one log line per finished unit (a training epoch, an attack) with the
elapsed time and an estimate of what remains, and a tqdm bar over a unit's inner steps when the
job runs in a terminal.

Snakemake sends each job's stdout and stderr to its log file, so the lines end up there (one
per unit: ``tail -f`` shows where a job is); the bar is drawn only when stderr is a terminal.
Units may differ in cost (AutoAttack against FGSM): each carries a weight, and the estimate is
elapsed / weight done x weight left.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator, Optional, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def format_seconds(seconds: float) -> str:
    """``5s``, ``2m05s``, ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Progress of one job over units of known total weight.

    ``job``: what runs (``train bb_gs_mnist seed 0``); ``total``: the units' summed weight
    (epochs, or the attacks' estimated passes); ``done_before``: weight already finished by an
    earlier session (a resumed training), counted in the "k/n" but not in the rate.
    """

    def __init__(self, job: str, total: float, *, done_before: float = 0.0,
                 stream: Optional[TextIO] = None, interactive: Optional[bool] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.job, self.total = job, float(total)
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = (bool(getattr(self.stream, "isatty", lambda: False)())
                            if interactive is None else interactive)
        self.clock = clock
        self.started = clock()
        self.done_before = float(done_before)
        self.done_now = 0.0

    def remaining_seconds(self) -> Optional[float]:
        """Elapsed / weight done this session x weight left; None before the first unit."""
        if self.done_now <= 0:
            return None
        left = max(0.0, self.total - self.done_before - self.done_now)
        return (self.clock() - self.started) / self.done_now * left

    def bar(self, items: Iterable[T], total: Optional[int] = None, desc: str = "") -> Iterator[T]:
        """``items`` unchanged; drawn as a tqdm bar (removed when done) in a terminal only."""
        return iter(tqdm(items, total=total, desc=desc, leave=False, file=self.stream,
                         disable=not self.interactive, dynamic_ncols=True))

    def unit_done(self, unit: str, weight: float = 1.0, detail: str = "") -> str:
        """Count a finished unit and log its line: job, unit, share done, elapsed, estimate."""
        self.done_now += float(weight)
        done = self.done_before + self.done_now
        eta = self.remaining_seconds()
        line = (f"[{self.job}] {unit} done ({done:g}/{self.total:g})  "
                f"elapsed {format_seconds(self.clock() - self.started)}  "
                f"remaining ~{format_seconds(eta) if eta is not None else '?'}")
        if detail:
            line += f"  {detail}"
        print(line, file=self.stream, flush=True)
        return line
