"""Device, threads, seeding and the GPU fast path (AMP, channels_last, torch.compile).

Nothing here touches CUDA at import time; ``pick_device`` only asks ``torch.cuda`` when a cell
starts.  It gives each GPU job one device of its own (:mod:`methods.device_slots`) unless a
scheduler has already assigned it one through ``CUDA_VISIBLE_DEVICES``.
"""
from __future__ import annotations

import contextlib
import enum
import os
import random
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import numpy as np
import torch

from . import device_slots


class Precision(str, enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


# Set by batch schedulers inside a job: with one of them, CUDA_VISIBLE_DEVICES is the job's own.
SCHEDULER_ENV = ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "PBS_JOBID",
                 "LSB_JOBID")


def _log(message: str) -> None:
    print(f"device: {message}", file=sys.stderr, flush=True)


def assigned_devices() -> Optional[str]:
    """``CUDA_VISIBLE_DEVICES`` when it is this job's own assignment, else None.

    It is when a scheduler set it (one of :data:`SCHEDULER_ENV` is present; SLURM's gres plugin
    sets it per job) or when it names at most one device (a job pinned by hand, or given no
    device at all).  A mask of several devices without a scheduler (``CUDA_VISIBLE_DEVICES=0,1``
    for a whole local workflow) restricts the slots instead.
    """
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return None
    entries = [e for e in cvd.split(",") if e.strip()]
    if len(entries) <= 1 or any(os.environ.get(k) for k in SCHEDULER_ENV):
        return cvd
    return None


def _visible_ids(count: int) -> List[str]:
    """The physical identity of each visible CUDA ordinal: its CUDA_VISIBLE_DEVICES entry when
    the variable is set (index or UUID), else the ordinal."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return [str(i) for i in range(count)]
    entries = [e.strip() for e in cvd.split(",") if e.strip()]
    return (entries + [str(i) for i in range(len(entries), count)])[:count]


def pick_device(requested: Optional[str], *, slots_dir: Union[str, Path, None] = None,
                when_busy: Optional[str] = None, wait_timeout: Optional[float] = None
                ) -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N', as one device for this
    process.

    - ``cpu``, or ``auto`` where torch sees no CUDA device: the CPU (a scheduler's
      CUDA_VISIBLE_DEVICES is logged; with fake or absent GPUs a job still runs).
    - A scheduler's assignment (:func:`assigned_devices`): that device, no slot (``cuda:N`` is the
      N-th device it was given).
    - Otherwise a slot (:mod:`methods.device_slots`) is taken and held until the process exits:
      any free device for ``auto``/``cuda``, device N for ``cuda:N``.  When all are busy the job
      waits (``when_busy='wait'``, the default; at most ``wait_timeout`` seconds if given) or runs
      on the CPU (``when_busy='cpu'``).  Defaults come from ``$ADVREPRO_DEVICE_WHEN_BUSY`` and
      ``$ADVREPRO_DEVICE_WAIT_TIMEOUT``; ``slots_dir`` from ``$ADVREPRO_DEVICE_SLOTS_DIR`` (the
      CLI's ``--device-slots``), else a per-machine temp directory.
    - Calling it again in the same process reuses the slot already held.
    """
    requested = requested or "auto"
    if requested == "cpu":
        return torch.device("cpu")
    wanted = torch.device("cuda" if requested == "auto" else requested)
    if wanted.type != "cuda":
        return wanted
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not torch.cuda.is_available():
        if requested == "auto":
            if cvd is not None:
                _log(f"cpu (CUDA_VISIBLE_DEVICES={cvd!r} but torch sees no CUDA device)")
            return torch.device("cpu")
        raise RuntimeError(f"runtime.device={requested!r} but CUDA is not available here"
                           + (f" (CUDA_VISIBLE_DEVICES={cvd!r})" if cvd is not None else ""))
    count = torch.cuda.device_count()
    if wanted.index is not None and not 0 <= wanted.index < count:
        raise RuntimeError(f"runtime.device={requested!r} but this process sees {count} CUDA "
                           f"device(s) (CUDA_VISIBLE_DEVICES={cvd!r})")
    if assigned_devices() is not None:
        index = wanted.index or 0
        _log(f"cuda:{index}, assigned (CUDA_VISIBLE_DEVICES={cvd!r}), no slot taken")
        return torch.device("cuda", index)
    for slot in device_slots.held_slots():
        if wanted.index is None or slot.index == wanted.index:
            return torch.device("cuda", slot.index)
    ids = _visible_ids(count)
    candidates = [(i, ids[i]) for i in range(count)] if wanted.index is None \
        else [(wanted.index, ids[wanted.index])]
    policy = device_slots.when_busy_setting(when_busy)
    slot = device_slots.acquire(candidates, Path(slots_dir) if slots_dir else None,
                                wait=policy == "wait",
                                timeout=device_slots.wait_timeout_setting(wait_timeout))
    if slot is None:
        _log(f"cpu: no free GPU slot among {[c[1] for c in candidates]} and when_busy='cpu'")
        return torch.device("cpu")
    _log(f"cuda:{slot.index} (slot {slot.path}, CUDA_VISIBLE_DEVICES={cvd!r})")
    return torch.device("cuda", slot.index)


def release_device() -> None:
    """Give back the slots this process holds (exit does it too; for long-lived processes)."""
    for slot in device_slots.held_slots():
        slot.release()


def _uuid_text(value: Any) -> Optional[str]:
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else str(value)
    if text and not text.startswith(("GPU-", "MIG-")):
        text = "GPU-" + text
    return text or None


def describe_device(device: Union[str, torch.device], nvml: Any = None) -> Dict[str, Any]:
    """Which device a result came from: ``{"type": "cpu"}`` (plus ``cuda_visible_devices`` when
    that is set), or for CUDA the ordinal, name, UUID, compute capability, memory, the
    CUDA_VISIBLE_DEVICES entry, the NVML index (through nvidia-ml-py, when it initialises; a
    pynvml-like ``nvml`` may be passed) and the slot lock held for it (None when a scheduler
    assigned the device or none was taken)."""
    device = torch.device(device)
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device.type != "cuda":
        out: Dict[str, Any] = {"type": device.type}
        if cvd is not None:
            out["cuda_visible_devices"] = cvd
        return out
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    ids = _visible_ids(torch.cuda.device_count())
    out = {"type": "cuda", "index": index, "name": getattr(props, "name", None),
           "uuid": None, "capability": None, "total_memory_bytes": None,
           "cuda_visible_devices": cvd, "visible_id": ids[index] if index < len(ids) else None,
           "nvml_index": None, "slot": None}
    try:
        out["uuid"] = _uuid_text(getattr(props, "uuid", None))
    except Exception:   # older drivers / builds without the field
        pass
    if getattr(props, "major", None) is not None:
        out["capability"] = f"{props.major}.{props.minor}"
    if getattr(props, "total_memory", None) is not None:
        out["total_memory_bytes"] = int(props.total_memory)
    try:
        if nvml is None:
            import pynvml as nvml
            nvml.nvmlInit()
        from .measure.energy import map_visible_devices
        for info, _, _ in map_visible_devices(nvml, cvd):
            if info.index == index:
                out["nvml_index"] = info.nvml_index
                out["uuid"] = out["uuid"] or info.uuid
                out["name"] = out["name"] or info.name
                if info.mig:
                    out["mig"] = True
    except Exception as e:   # no driver, no library: the torch fields stand
        out["nvml_error"] = repr(e)[:200]
    for slot in device_slots.held_slots():
        if slot.index == index:
            out["slot"] = slot.to_dict()
    return out


def set_threads(threads: Optional[int]) -> None:
    if threads:
        torch.set_num_threads(int(threads))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision) -> Iterator[None]:
    """Mixed precision for the forward passes of a step (bf16 works on CPU and GPU)."""
    if precision is Precision.FP32:
        yield
        return
    dtype = torch.bfloat16 if precision is Precision.BF16 else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def grad_scaler(device: torch.device, precision: Precision) -> Optional[torch.amp.GradScaler]:
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    if precision is Precision.FP16:
        return torch.amp.GradScaler(device.type)
    return None


def runtime_summary(device: torch.device, precision: Precision, channels_last: bool,
                    compiled: bool) -> Dict[str, Any]:
    return {"device": str(device), "precision": precision.value,
            "channels_last": channels_last, "compile": compiled,
            "threads": torch.get_num_threads()}
