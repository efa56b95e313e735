"""Safe loading and atomic saving of the package's torch files (checkpoints, prepared data).

Every ``.pt`` the package reads back -- the trainer's ``state.pt`` / ``last.pt`` / ``best.pt``,
the prepared ``splits.pt`` / ``images.pt`` -- goes through :func:`load_torch_file`, which calls
``torch.load(..., map_location="cpu", weights_only=True)``: PyTorch's restricted unpickler that
builds only tensors, numbers, strings and plain containers and refuses any other global (a
pickle ``__reduce__`` payload such as ``exec`` / ``os.system`` is refused before anything runs).
A refusal becomes :class:`UnsafeCheckpointError`, an unreadable (truncated, not a torch file)
file :class:`CorruptCheckpointError`, both naming the file and what to do; there is no
``weights_only=False`` fallback anywhere in the package.

Every ``.pt`` the package writes goes through :func:`save_torch_file`: ``torch.save`` into a
temporary file beside the destination through a Python file object (so a full disk surfaces as
``OSError`` ENOSPC rather than a C++ ``RuntimeError``), ``fsync``, then ``os.replace``
(:func:`methods.results.atomic_write`): on failure the previous file is left byte for byte, the
temporary file is removed and the ``OSError`` names the destination.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any, Optional

import torch

from .results import atomic_write

__all__ = ["CheckpointError", "UnsafeCheckpointError", "CorruptCheckpointError",
           "load_torch_file", "save_torch_file"]


class CheckpointError(RuntimeError):
    """A torch file could not be loaded; the message names the file and the fix."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = Path(path)


class UnsafeCheckpointError(CheckpointError):
    """The file holds objects other than tensors and plain containers (weights_only refused it)."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, empty or not a torch file at all."""


def _refusal_reason(err: BaseException) -> str:
    """The one informative line of torch's weights_only message (which goes on to suggest
    ``weights_only=False``: not an option here)."""
    text = str(err)
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n|$)", text)
    reason = m.group(1) if m else text.strip().splitlines()[-1] if text.strip() else type(err).__name__
    reason = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    return reason.split(" Please use `torch.serialization.add_safe_globals")[0].strip()


def load_torch_file(path: Path, *, what: str = "checkpoint", fix: str = "",
                    data: Optional[bytes] = None) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that name ``path``.

    ``data``: the file's bytes when the caller already read them (e.g. to check a digest first);
    ``path`` then only names the file.  ``what`` / ``fix`` word the error ("checkpoint",
    "delete it and train again").
    """
    path = Path(path)
    source: Any = io.BytesIO(data) if data is not None else path
    fix = fix or "delete it and run the step that writes it again"
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CorruptCheckpointError(
                f"{what} {path} is not a readable torch file ({type(err).__name__}: {err}); {fix}", path) from None
        raise UnsafeCheckpointError(
            f"refused to load {what} {path}: it holds objects other than tensors and plain containers "
            f"({_refusal_reason(err)}), so it was not written by this package or was tampered with; nothing in it "
            f"was run (torch.load weights_only=True). Do not load it with weights_only=False; {fix}", path) from None
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError, IndexError) as err:
        # RuntimeError: a truncated / non-zip file ("PytorchStreamReader failed ..."); EOFError: empty.
        raise CorruptCheckpointError(
            f"{what} {path} is truncated or not a torch file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'empty file'}); {fix}", path) from None


def save_torch_file(path: Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see the module docstring)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    atomic_write(Path(path), write)
