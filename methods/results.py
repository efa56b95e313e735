"""Result files: atomic writes, provenance and schema validation.

Every train and evaluate run writes one JSON file, validated against a JSON Schema in
``workflow/schemas/`` before it is written, with numbers as numbers.  Writes go to a temporary
file in the destination directory and are renamed into place, so a killed job never leaves a
file that looks finished.
"""
from __future__ import annotations

import errno
import json
import math
import os
import platform
import socket
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import jsonschema
from referencing import Registry, Resource

from .config import REPO_ROOT, SCHEMA_DIR

TRACKED_PACKAGES = ("torch", "torchvision", "numpy", "pyautoattack", "nvidia-ml-py", "mlxtend",
                    "snakemake")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """The package's one atomic writer: call ``write(tmp)`` on a temporary path beside ``path``
    (mode 0644), flush it to disk (``fsync``), then rename it to ``path``.  Readers see either
    the old file or the complete new one.

    On any error the temporary file is removed and the previous ``path`` (if any) is left byte
    for byte.  An ``OSError`` (disk full, read-only or missing directory, a parent that is a
    file, quota...) is raised again as an ``OSError`` with the same ``errno`` (so the same
    subclass: ``PermissionError``, ``NotADirectoryError``...) whose message and ``filename``
    name ``path`` (also when the OSError surfaced as the cause or context of another exception, as
    torch.save's writer does); any other exception is re-raised unchanged with a note naming ``path``.
    """
    path = Path(path)
    tmp: Optional[Path] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(name)
        os.close(fd)
        os.chmod(tmp, 0o644)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except BaseException as err:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        cause = _os_error_in(err) if isinstance(err, Exception) else None    # not KeyboardInterrupt
        if cause is not None:
            raise write_error(path, cause) from err
        if isinstance(err, Exception):
            err.add_note(f"while writing {path} (the previous file, if any, is unchanged)")
        raise


def _os_error_in(err: BaseException) -> Optional[OSError]:
    """``err`` if it is an OSError, else the OSError it was raised from or while handling, if
    any (torch.save's zip writer turns a failed ``write`` into a ``RuntimeError`` on exit)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def write_error(path: Path, err: OSError) -> OSError:
    """``err`` restated for the destination ``path`` (same errno, so the same OSError subclass)."""
    reason = err.strerror or str(err) or type(err).__name__
    code = err.errno if err.errno is not None else errno.EIO
    return OSError(code, f"could not write {path}: {reason} (the previous file, if any, is unchanged; "
                         f"no partial file was left)", str(path))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: Path, content: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(content))


def jsonable(obj: Any) -> Any:
    """``obj`` with dict keys as strings, tuples as lists, numpy / torch scalars as numbers and
    non-finite floats as None (JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return jsonable(obj.item())
    return obj


def _schema_registry() -> Registry:
    common = json.loads((SCHEMA_DIR / "common.defs.json").read_text())
    return Registry().with_resource("common.defs.json", Resource.from_contents(common))


def validate(record: Dict[str, Any], schema_name: str) -> None:
    """Raise ValueError naming the first field of ``record`` that breaks the schema."""
    schema = json.loads((SCHEMA_DIR / schema_name).read_text())
    validator = jsonschema.Draft202012Validator(schema, registry=_schema_registry())
    error = jsonschema.exceptions.best_match(validator.iter_errors(record))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "<root>"
        raise ValueError(f"result does not match {schema_name} at {where}: {error.message}")


def write_result(path: Path, record: Dict[str, Any], schema_name: str) -> Dict[str, Any]:
    record = jsonable(record)
    validate(record, schema_name)
    atomic_write_text(Path(path), json.dumps(record, indent=2, sort_keys=False) + "\n")
    return record


def read_result(path: Path, schema_name: Optional[str] = None) -> Dict[str, Any]:
    record = json.loads(Path(path).read_text())
    if schema_name:
        validate(record, schema_name)
    return record


def git_commit() -> Dict[str, Any]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=REPO_ROOT, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
        return {"commit": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError) as e:
        return {"commit": None, "dirty": None, "reason": f"git unavailable: {e}"}


def package_versions() -> Dict[str, Optional[str]]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_info(device) -> Dict[str, Any]:
    """The device a job ran on: the CPU's name, or the GPU's index, name, UUID, the
    CUDA_VISIBLE_DEVICES entry and the slot held for it (:func:`methods.runtime.describe_device`)."""
    import torch

    from .runtime import describe_device

    info = {"type": device.type, "name": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    info.update(describe_device(device))
    return info


def provenance(cell: Dict[str, Any], device, wall_s: float,
               evaluation: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Where a result came from: the training identity's hash (and, for an evaluation, the
    evaluation identity's), the code, the packages, the machine and the seed."""
    ids = {"train_hash": cell["train_hash"]}
    if evaluation is not None:
        ids["eval_hash"] = evaluation["eval_hash"]
    return {
        **ids,
        "git": git_commit(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "device": device_info(device),
        "seed": cell["seed"],
        "wall_s": wall_s,
    }
