"""Device, threads, seeding and the GPU fast path (AMP, channels_last, torch.compile).

Nothing here touches CUDA at import time; ``pick_device`` only asks ``torch.cuda.is_available``
when a cell starts.
"""
from __future__ import annotations

import contextlib
import enum
import random
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch


class Precision(str, enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


def pick_device(requested: Optional[str]) -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    requested = requested or "auto"
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device={requested!r} but CUDA is not available here")
    return device


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
