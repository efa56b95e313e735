"""Partial progress of one evaluation, so a killed evaluation resumes where it stopped.

An evaluation (:func:`methods.evaluation.evaluate_cell`) is a list of *units*: ``clean``, each
attack (by label), ``AutoAttack``, ``PGD on the AutoAttack subset`` and ``defences`` (the whole
defences block, redone from its start if it was interrupted).  Its progress
lives in a directory beside the result, ``eval_<checkpoint>.partial/`` next to
``eval_<checkpoint>.json``.  That directory is not a Snakemake output, so Snakemake leaves it in
place when it deletes a failed job's outputs, and the rerun of the job picks it up:

* ``key.json``: what the progress belongs to, :func:`resume_key`: the evaluation identity
  (``eval_hash``), the training identity (``train_hash``) and the checkpoint by name, size and
  SHA-256 of its bytes.  A directory written under another key is removed before anything is
  read from it, so stale progress is never reused; every unit file repeats the key's digest and
  is ignored if it does not match.
* ``<k>-<unit>.pt``, one per unit: while the unit runs, its batch progress (``progress``: the
  robust flags of the finished batches, the largest distance, the attack generator's state: see
  :func:`methods.eval_core.run_attack`); once it is done, its JSON record, its per-example flags
  and its measurement windows (``done``).  The AutoAttack unit's package-level progress
  (sub-attack by sub-attack, batch by batch, with the adversarial examples found so far) is the
  adapter's own state file, ``autoattack.state.pt`` (:func:`methods.autoattack_adapter.run_autoattack`).

Every file is written atomically (:func:`methods.results.atomic_write`: a temporary file, fsync,
rename), so a kill leaves either the previous or the new version, never half of one.  The
directory is removed once the result is written; a leftover one (a kill between the two) is
harmless: its units are all done and the rerun only rewrites the result from them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .results import jsonable, atomic_write, atomic_write_text

log = logging.getLogger(__name__)

KEY_FILE = "key.json"
AUTOATTACK_STATE = "autoattack.state.pt"


def partial_dir(result_path: Path) -> Path:
    """``.../eval_last.json`` -> ``.../eval_last.partial``."""
    result_path = Path(result_path)
    return result_path.with_name(result_path.stem + ".partial")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def resume_key(eval_hash: str, train_hash: str, checkpoint: str, checkpoint_file: Path) -> Dict[str, Any]:
    """What partial progress belongs to: both identities and the checkpoint's bytes."""
    path = Path(checkpoint_file)
    return {"eval_hash": eval_hash, "train_hash": train_hash, "checkpoint": checkpoint,
            "checkpoint_bytes": path.stat().st_size, "checkpoint_sha256": file_sha256(path)}


def _digest(key: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name)[:80]


class UnitProgress:
    """Batch progress of one running unit: ``load()`` what an earlier session saved (or None),
    ``save(progress)`` atomically after each batch.  ``restored``: what ``load`` found."""

    def __init__(self, owner: "PartialEvaluation", name: str, path: Path) -> None:
        self.owner, self.name, self.path = owner, name, path
        self.restored: Optional[Dict[str, Any]] = None

    def load(self) -> Optional[Dict[str, Any]]:
        saved = self.owner._read(self.path, self.name)
        self.restored = saved.get("progress") if saved and not saved.get("done") else None
        return self.restored

    def save(self, progress: Dict[str, Any]) -> None:
        self.owner._write(self.path, {"unit": self.name, "done": False, "progress": progress})

    def restored_fraction(self, total: int) -> float:
        """Share of ``total`` examples an earlier session had finished (``progress['next']``)."""
        if not self.restored or not total:
            return 0.0
        return min(1.0, float(self.restored.get("next", 0)) / total)


class PartialEvaluation:
    """The ``.partial`` directory of one evaluation, for the units named in ``units`` (in order)."""

    def __init__(self, result_path: Path, key: Dict[str, Any], units: List[str]) -> None:
        self.dir = partial_dir(result_path)
        self.key, self.digest = key, _digest(key)
        self.paths = {name: self.dir / f"{i:02d}-{_slug(name)}.pt" for i, name in enumerate(units)}
        self.autoattack_state = self.dir / AUTOATTACK_STATE
        self.resumed = self._open()

    def _open(self) -> bool:
        """Keep a directory written under this key; remove one written under any other."""
        key_file = self.dir / KEY_FILE
        if self.dir.exists():
            try:
                found = json.loads(key_file.read_text())
            except (OSError, ValueError):
                found = None
            if found == {"digest": self.digest, "key": self.key}:
                return True
            log.warning("evaluation: %s holds progress of another evaluation or checkpoint; "
                        "removing it", self.dir)
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(key_file, json.dumps({"digest": self.digest, "key": self.key},
                                               sort_keys=True, indent=1) + "\n")
        return False

    def _read(self, path: Path, name: str) -> Optional[Dict[str, Any]]:
        if not path.exists():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:   # unreadable: redo the unit rather than trust it
            log.warning("evaluation: ignoring unreadable progress file %s (%s)", path, err)
            return None
        if not isinstance(saved, dict) or saved.get("digest") != self.digest \
                or saved.get("unit") != name:
            return None
        return saved

    def _write(self, path: Path, payload: Dict[str, Any]) -> None:
        payload = {**payload, "digest": self.digest}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))

    def unit(self, name: str) -> UnitProgress:
        return UnitProgress(self, name, self.paths[name])

    def finished(self, name: str) -> Optional[Dict[str, Any]]:
        """``{"record", "flags", "windows"}`` of a unit an earlier session finished, or None."""
        saved = self._read(self.paths[name], name)
        return saved if saved and saved.get("done") else None

    def finish(self, name: str, record: Any, flags: Optional[torch.Tensor],
               windows: List[Dict[str, Any]]) -> None:
        # The record goes through JSON so what is restored is exactly what the result holds.
        self._write(self.paths[name], {
            "unit": name, "done": True, "record": json.loads(json.dumps(jsonable(record))),
            "flags": flags.detach().cpu() if flags is not None else None,
            "windows": json.loads(json.dumps(jsonable(windows)))})

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
