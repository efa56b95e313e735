"""One device per GPU job: lock-file slots that a job holds for its whole life.

Core Snakemake caps concurrency with ``--resources gpu=N`` but assigns no device ids, so two
local jobs would both land on ``cuda:0``.  A job that will use CUDA takes a *slot* first: a lock
file per device, ``<slots_dir>/<host>/cuda<ID>.lock``, locked with ``fcntl.flock`` on an fd kept
open for the life of the process.  The kernel drops the lock when the process dies (even on
SIGKILL), so a crashed job never blocks a device; the file holds ``pid host start time`` for
people and for the stale check below.  The host is part of the path, so a results directory on a
shared filesystem keeps each machine's ``cuda0`` apart.

Stale locks.  A lock file whose flock is free is free, whatever it says.  A lock that is held but
whose recorded pid is dead on this host (the fd was inherited by a process that outlived the job,
e.g. a forked worker) is *reclaimed*: the file is unlinked and a new one created and locked.  All
acquisitions and reclaims happen under a short-held directory mutex (``.mutex``, never unlinked),
so two jobs never both reclaim the same slot or hold one each of an unlinked and a new file.

Device identity: the ``CUDA_VISIBLE_DEVICES`` entry of each visible device when it is set (an
index or a UUID, so jobs with different masks still agree on a physical GPU), else the CUDA
ordinal.  Whether to allocate at all (a scheduler may already have assigned the device), and the
torch side, is :func:`methods.runtime.pick_device`'s business; this module knows nothing of torch.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import os
import re
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

SLOTS_DIR_ENV = "ADVREPRO_DEVICE_SLOTS_DIR"   # where the lock files live (the CLI sets it)
WHEN_BUSY_ENV = "ADVREPRO_DEVICE_WHEN_BUSY"   # wait | cpu: what a job does when no slot is free
WAIT_TIMEOUT_ENV = "ADVREPRO_DEVICE_WAIT_TIMEOUT"   # seconds; unset = wait for ever
WHEN_BUSY = ("wait", "cpu")
POLL_S = 0.5


class NoFreeSlot(RuntimeError):
    """Raised by :func:`acquire` when no slot became free within the timeout."""


def default_slots_dir() -> Path:
    """``$ADVREPRO_DEVICE_SLOTS_DIR``, else one directory per user and machine in the temp dir (so
    the jobs of different workflows of one user still share the arbitration)."""
    env = os.environ.get(SLOTS_DIR_ENV)
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"advrepro-device-slots-{os.getuid()}"


def when_busy_setting(value: Optional[str] = None) -> str:
    """The argument, else ``$ADVREPRO_DEVICE_WHEN_BUSY``, else ``wait``; checked."""
    value = value or os.environ.get(WHEN_BUSY_ENV) or "wait"
    if value not in WHEN_BUSY:
        raise ValueError(f"device when-busy {value!r}: expected one of {list(WHEN_BUSY)}")
    return value


def wait_timeout_setting(value: Optional[float] = None) -> Optional[float]:
    if value is not None:
        return float(value)
    env = os.environ.get(WAIT_TIMEOUT_ENV)
    return float(env) if env else None


def lock_name(device_id: str) -> str:
    """``cuda<ID>.lock`` with anything but ``[A-Za-z0-9._-]`` replaced (UUIDs keep their dashes)."""
    return "cuda" + re.sub(r"[^A-Za-z0-9._-]", "_", str(device_id)) + ".lock"


def host_name() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), so a
    reused pid is not taken for the job that wrote the lock; None where /proc is unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def pid_alive(pid: int, start_time: Optional[str] = None) -> bool:
    """Is ``pid`` a live process on this host (and, when known, the same one that started at
    ``start_time``)?  A zombie counts as dead."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return False
    return start_time is None or fields[19] == start_time


@dataclass
class Holder:
    """What a lock file says about who holds it."""
    pid: Optional[int]
    host: Optional[str]
    start_time: Optional[str]

    @classmethod
    def parse(cls, text: str) -> "Holder":
        info: Dict[str, str] = {}
        for line in text.splitlines():
            key, _, value = line.partition("=")
            info[key.strip()] = value.strip()
        try:
            pid: Optional[int] = int(info.get("pid", ""))
        except ValueError:
            pid = None
        return cls(pid, info.get("host") or None, info.get("start_time") or None)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}" if self.pid else "an unknown process"


@dataclass(eq=False)
class Slot:
    """A device slot held by this process: the lock stays until :meth:`release` or exit."""
    device_id: str          # the physical identity (CUDA_VISIBLE_DEVICES entry or ordinal)
    index: int              # the CUDA ordinal inside this process
    path: Path
    fd: Optional[int] = field(default=None, repr=False)
    owner: int = field(default_factory=os.getpid, repr=False)

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        """Unlock and close.  In a forked child (a data-loader worker) only close the inherited
        fd: unlocking it would unlock the parent's lock too (same open file description)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        _HELD.discard(self)
        if os.getpid() != self.owner:
            os.close(fd)
            return
        try:
            os.ftruncate(fd, 0)   # still ours while locked: nobody else writes it
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def to_dict(self) -> Dict[str, object]:
        return {"device_id": self.device_id, "index": self.index, "lock": str(self.path)}


_HELD: "set[Slot]" = set()


def _release_all() -> None:
    for slot in list(_HELD):
        slot.release()


atexit.register(_release_all)


class _Mutex:
    """A short-held flock on ``<dir>/.mutex`` serialising acquisitions and reclaims."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / ".mutex"

    def __enter__(self) -> "_Mutex":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)


def _read_holder(fd: int) -> Holder:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return Holder.parse(os.read(fd, 4096).decode("utf-8", "replace"))
    except OSError:
        return Holder(None, None, None)


def _try_lock(path: Path, host: str) -> Tuple[Optional[int], Optional[Holder]]:
    """Under the mutex: lock ``path`` (reclaiming it if its holder is dead) -> (fd, None), or
    (None, holder) when a live process holds it."""
    for _ in range(2):   # a reclaim unlinks the file; the second round locks the new one
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _read_holder(fd)
            os.close(fd)
            if holder.pid and holder.host == host and not pid_alive(holder.pid, holder.start_time):
                # Held through an fd that outlived its job (an inherited copy): break it.
                print(f"device slots: reclaiming {path.name}, held for dead {holder.describe()}",
                      file=sys.stderr, flush=True)
                path.unlink(missing_ok=True)
                continue
            return None, holder
        pid = os.getpid()
        record = (f"pid={pid}\nhost={host}\nstart_time={_start_time(pid) or ''}\n"
                  f"since={time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        return fd, None
    return None, Holder(None, None, None)


def try_acquire(devices: Sequence[Tuple[int, str]], slots_dir: Optional[Path] = None
                ) -> Tuple[Optional[Slot], Dict[str, Holder]]:
    """One non-blocking pass over ``devices`` (``(cuda ordinal, device id)`` pairs, in order of
    preference): the first free slot, or ``(None, {device id: holder})``."""
    directory = Path(slots_dir or default_slots_dir()) / host_name()
    directory.mkdir(parents=True, exist_ok=True)
    host = host_name()
    busy: Dict[str, Holder] = {}
    with _Mutex(directory):
        for index, device_id in devices:
            path = directory / lock_name(device_id)
            fd, holder = _try_lock(path, host)
            if fd is not None:
                slot = Slot(str(device_id), int(index), path, fd)
                _HELD.add(slot)
                return slot, {}
            busy[str(device_id)] = holder
    return None, busy


def acquire(devices: Sequence[Tuple[int, str]], slots_dir: Optional[Path] = None, *,
            wait: bool = True, timeout: Optional[float] = None, poll_s: float = POLL_S,
            log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)
            ) -> Optional[Slot]:
    """A free slot among ``devices``; with ``wait``, poll until one frees (``timeout`` seconds at
    most, then :class:`NoFreeSlot`); without, ``None`` when all are busy."""
    if not devices:
        raise ValueError("device slots: no devices to choose from")
    started = time.monotonic()
    announced = False
    while True:
        slot, busy = try_acquire(devices, slots_dir)
        if slot is not None:
            if announced:
                log(f"device slots: got {slot.path.name} after {time.monotonic() - started:.1f} s")
            return slot
        held = ", ".join(f"cuda{d} by {h.describe()}" for d, h in busy.items())
        if not wait:
            return None
        if timeout is not None and time.monotonic() - started >= timeout:
            raise NoFreeSlot(f"device slots: no free device after {timeout:g} s ({held})")
        if not announced:
            log(f"device slots: every device is busy ({held}); waiting for one to free")
            announced = True
        time.sleep(poll_s)


def held_slots() -> List[Slot]:
    return [s for s in _HELD if s.held]
