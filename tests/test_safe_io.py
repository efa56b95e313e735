"""Safe loading and failed writes.

* Every checkpoint and state load uses ``torch.load(weights_only=True, map_location=...)``: a
  ``.pt`` whose pickle carries a ``__reduce__`` payload (``exec`` creating a marker file) is
  refused by each loader -- the training state, ``load_weights`` (last.pt / best.pt), the
  prepared ``splits.pt`` and ``images.pt`` -- with an error naming the file, and the marker never
  appears (while a plain ``torch.load(weights_only=False)`` of the same file does create it).
* A write that fails (disk full mid-write or at fsync, a read-only directory, a parent that is a
  file, a failed rename) leaves the previous file byte for byte, leaves no temporary file, and
  raises an OSError naming the path: JSON results, state.pt / last.pt / best.pt, and the prepared
  ``splits.pt`` / ``manifest.json``; a training job whose checkpoint write fails stops naming it
  and resumes from the intact previous state.
"""
from __future__ import annotations

import ast
import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import methods.checkpoints as checkpoints
import methods.data as D
from methods import results, training
from methods.builders import load_weights
from methods.checkpoints import CorruptCheckpointError, UnsafeCheckpointError, load_torch_file
from methods.config import REPO_ROOT
from methods.results import write_result
from tests import helpers

try:
    from .fixtures_data import CodePayload, write_waterbirds
except ImportError:  # tests/ is not a package
    from fixtures_data import CodePayload, write_waterbirds


def evil_pt(path: Path, marker: Path, **fields) -> Path:
    """A torch checkpoint (zip format, as torch.save writes) whose 'model' unpickles to a call
    creating ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": CodePayload(marker), "epoch": 0, **fields}, path)
    return path


def assert_refused(err: BaseException, path: Path, marker: Path) -> None:
    msg = str(err)
    assert isinstance(err, UnsafeCheckpointError) and err.path == Path(path)
    assert str(path) in msg and "refused to load" in msg and "exec" in msg
    assert "nothing in it was run" in msg and "Do not load it with weights_only=False" in msg
    assert not marker.exists(), "the payload ran"


# ------------------------------------------------------------------------------------- safe loading
def test_the_payload_is_live_under_a_plain_unpickler(tmp_path):
    """The control: without weights_only the same file runs its code (so the tests below can fail)."""
    marker = tmp_path / "ran"
    evil_pt(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", map_location="cpu", weights_only=False)
    assert marker.exists()


def test_training_state_with_a_payload_is_refused(tmp_path):
    marker, state = tmp_path / "pwned", tmp_path / "checkpoints" / "state.pt"
    evil_pt(state, marker, train_hash="abc")
    before = state.read_bytes()
    with pytest.raises(UnsafeCheckpointError) as info:
        training._load_state(state, "abc")
    assert_refused(info.value, state, marker)
    assert "to train this cell from the start" in str(info.value)
    assert state.read_bytes() == before                 # neither renamed nor deleted: the job stops


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_weights_with_a_payload_are_refused(tmp_path, name):
    marker, path = tmp_path / "pwned", tmp_path / "checkpoints" / name
    evil_pt(path, marker)
    model = torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsafeCheckpointError) as info:
        load_weights(path, model)
    assert_refused(info.value, path, marker)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_legacy_pickle_with_a_payload_is_refused(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "last.pt"
    with open(path, "wb") as f:                     # not torch's zip format: a bare pickle
        pickle.dump({"model": CodePayload(marker), "epoch": 0}, f, protocol=2)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_weights(path, torch.nn.Linear(2, 2))
    assert str(path) in str(info.value) and not marker.exists()


def _copy_prepared(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _replace_and_rehash(prepared: Path, key: str, new: Path) -> Path:
    """Swap a prepared file for ``new`` and make the manifest's sha256 agree (a tampered directory)."""
    manifest = json.loads((prepared / "manifest.json").read_text())
    target = prepared / manifest["files"][key]["path"]
    shutil.copyfile(new, target)
    import hashlib
    manifest["files"][key]["sha256"] = hashlib.sha256(target.read_bytes()).hexdigest()
    (prepared / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    return target


def test_prepared_splits_with_a_payload_are_refused(mnist5k_prepared, tmp_path):
    prepared = _copy_prepared(mnist5k_prepared / "prepared", tmp_path / "prepared")
    marker = tmp_path / "pwned"
    splits = _replace_and_rehash(prepared, "splits", evil_pt(tmp_path / "evil.pt", marker))
    for load in (lambda: D.read_prepared(prepared),
                 lambda: D.load_dataset("mnist5k", {"source": "mnist5k"}, tmp_path, prepared)):
        with pytest.raises(UnsafeCheckpointError) as info:
            load()
        assert_refused(info.value, splits, marker)
        assert f"delete {prepared} and prepare the dataset again" in str(info.value)


def test_prepared_images_with_a_payload_are_refused(tmp_path):
    write_waterbirds(tmp_path / "data")
    spec = {"source": "waterbirds", "image_size": 8}
    D.prepare_dataset("wb", spec, tmp_path / "data", tmp_path / "prepared")
    marker = tmp_path / "pwned"
    images = _replace_and_rehash(tmp_path / "prepared", "images", evil_pt(tmp_path / "evil.pt", marker))
    with pytest.raises(UnsafeCheckpointError) as info:
        D.load_dataset("wb", spec, tmp_path / "data", tmp_path / "prepared")
    assert_refused(info.value, images, marker)


def test_truncated_and_foreign_checkpoints_name_the_file(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.zeros(100)}, "epoch": 3}, path)
    assert load_weights(path, _Holder()) == 3
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CorruptCheckpointError) as info:
        load_weights(path, _Holder())
    assert str(path) in str(info.value) and "truncated or not a torch file" in str(info.value)
    assert "train the cell again" in str(info.value)
    path.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="truncated or not a torch file"):
        load_weights(path, _Holder())
    torch.save({"weights": {}}, path)
    with pytest.raises(CorruptCheckpointError, match="not a checkpoint written by the trainer"):
        load_weights(path, _Holder())
    state = tmp_path / "state.pt"
    torch.save([1, 2, 3], state)
    with pytest.raises(CorruptCheckpointError, match=r"holds a list, not the trainer's state dict.*delete"):
        training._load_state(state, "abc")


class _Holder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(100))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) \
                else getattr(f, "id", None)
            yield name, node


def test_every_load_in_the_package_is_weights_only():
    """Read the source: every torch.load passes weights_only=True and a map_location; nothing
    calls pickle.load(s), np.load(allow_pickle=True) or passes weights_only=False."""
    offenders = []
    loads = 0
    for path in sorted((REPO_ROOT / "methods").rglob("*.py")):
        where = path.relative_to(REPO_ROOT)
        for name, call in _calls(ast.parse(path.read_text(), filename=str(path))):
            kw = {k.arg: k.value for k in call.keywords}
            if name == "torch.load":
                loads += 1
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True) or "map_location" not in kw:
                    offenders.append(f"{where}:{call.lineno} torch.load without weights_only=True + map_location")
            if name in ("pickle.load", "pickle.loads", "cPickle.load", "dill.load", "joblib.load"):
                offenders.append(f"{where}:{call.lineno} {name}")
            if name in ("np.load", "numpy.load"):
                ap = kw.get("allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    offenders.append(f"{where}:{call.lineno} np.load(allow_pickle=...)")
            wo = kw.get("weights_only")
            if wo is not None and isinstance(wo, ast.Constant) and wo.value is False:
                offenders.append(f"{where}:{call.lineno} weights_only=False")
    assert loads >= 1 and not offenders, offenders


# -------------------------------------------------------------------------------------- failed writes
def no_temp_files(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def assert_failed_cleanly(err: OSError, path: Path, before: bytes, code: int) -> None:
    assert isinstance(err, OSError) and err.errno == code
    assert str(path) in str(err) and err.filename == str(path)
    assert "the previous file, if any, is unchanged" in str(err)
    assert path.read_bytes() == before, "the previous file was changed"
    assert no_temp_files(path.parent) == [], "a temporary file was left behind"


class FullDisk:
    """A file object with ``room`` bytes left: it writes what fits, then fails with ENOSPC."""

    def __init__(self, f, room: int) -> None:
        self._f, self._room = f, room

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self._room:
            self._f.write(bytes(memoryview(data).cast("B"))[: self._room])
            self._room = 0
            self._f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fill_disk_for(monkeypatch, suffix: str, room: int = 4096, on_call: int = 1, seen=None):
    """Make the ``on_call``-th checkpoint write whose destination ends with ``suffix`` hit a full
    disk after ``room`` bytes (through the real torch.save, into the real temporary file).
    ``seen`` (a dict) receives the destination's bytes just before the failing write."""
    real_open = open
    calls = {"n": 0}

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        name = Path(file).name            # atomic_write's temporary file: .<destination name>.<random>.tmp
        if "w" in mode and name.startswith(f".{suffix}.") and name.endswith(".tmp"):
            calls["n"] += 1
            if calls["n"] == on_call:
                if seen is not None:
                    dest = Path(file).parent / suffix
                    seen["before"] = dest.read_bytes() if dest.exists() else None
                return FullDisk(f, room)
        return f

    monkeypatch.setattr(checkpoints, "open", fake_open, raising=False)
    return calls


def tiny_cell(epochs: int) -> dict:
    """The shared tiny cell (tests.helpers), standard training, 2 steps per epoch."""
    cell = helpers.tiny_cell("standard", epochs=epochs)
    cell["train"].update(max_steps_per_epoch=2, monitor={"n": 20, "steps": 1})
    return helpers.rehash(cell)


def train(cell, root: Path, out: Path):
    return training.train_cell(cell, root / "data", root / "prepared", out, out / "train.json",
                               device="cpu", threads=1, meter_backend="null")


@pytest.fixture(scope="module")
def trained(mnist5k_prepared, tmp_path_factory):
    """One finished tiny run: train.json, checkpoints/{state,last,best}.pt."""
    out = tmp_path_factory.mktemp("trained")
    train(tiny_cell(1), mnist5k_prepared, out)
    return out


def test_json_result_disk_full_mid_write(trained, tmp_path, monkeypatch):
    path = tmp_path / "train.json"
    shutil.copyfile(trained / "train.json", path)
    before = path.read_bytes()
    record = json.loads(before)
    record["wall_s"] = 1.0
    real = Path.write_text

    def half_then_full(self, data, *args, **kwargs):
        if self.name.endswith(".tmp"):
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(OSError) as info:
        write_result(path, record, "train_result.schema.json")
    assert_failed_cleanly(info.value, path, before, errno.ENOSPC)
    assert "No space left on device" in str(info.value)
    monkeypatch.undo()
    write_result(path, record, "train_result.schema.json")        # the same write succeeds afterwards
    assert json.loads(path.read_text())["wall_s"] == 1.0


@pytest.mark.parametrize("where", ["fsync", "mkstemp", "replace"])
def test_json_result_failure_at_each_step(trained, tmp_path, monkeypatch, where):
    path = tmp_path / "eval_last.json"
    shutil.copyfile(trained / "train.json", path)
    before = path.read_bytes()
    record = json.loads(before)
    code = {"fsync": errno.ENOSPC, "mkstemp": errno.EROFS, "replace": errno.EACCES}[where]

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(args[0]) if args else None)

    monkeypatch.setattr({"fsync": results.os, "mkstemp": results.tempfile, "replace": results.os}[where],
                        where, fail)
    with pytest.raises(OSError) as info:
        write_result(path, record, "train_result.schema.json")
    assert_failed_cleanly(info.value, path, before, code)
    if where == "replace":
        assert isinstance(info.value, PermissionError)        # same errno, same OSError subclass


def test_write_under_a_file_that_is_not_a_directory(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("a file where a directory should be\n")
    path = blocker / "mnist5k" / "train.json"
    with pytest.raises(OSError) as info:
        results.atomic_write_text(path, "{}\n")
    assert info.value.errno in (errno.ENOTDIR, errno.EEXIST)
    assert str(path) in str(info.value) and info.value.filename == str(path)
    assert blocker.read_text() == "a file where a directory should be\n"
    assert no_temp_files(tmp_path) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_results_directory(tmp_path):
    path = tmp_path / "ro" / "train.json"
    path.parent.mkdir()
    path.write_text('{"old": true}\n')
    os.chmod(path.parent, 0o555)
    try:
        with pytest.raises(PermissionError) as info:
            results.atomic_write_text(path, '{"new": true}\n')
        assert_failed_cleanly(info.value, path, b'{"old": true}\n', errno.EACCES)
    finally:
        os.chmod(path.parent, 0o755)


@pytest.mark.parametrize("name", ["state.pt", "last.pt", "best.pt"])
def test_checkpoint_save_on_a_full_disk_keeps_the_previous_file(trained, tmp_path, monkeypatch, name):
    path = tmp_path / "checkpoints" / name
    path.parent.mkdir()
    shutil.copyfile(trained / "checkpoints" / name, path)
    before = path.read_bytes()
    obj = torch.load(path, map_location="cpu", weights_only=True)
    obj["epoch"] = 7
    calls = fill_disk_for(monkeypatch, name)
    with pytest.raises(OSError) as info:
        training._save(path, obj)
    assert calls["n"] == 1
    assert_failed_cleanly(info.value, path, before, errno.ENOSPC)
    monkeypatch.undo()
    training._save(path, obj)
    assert torch.load(path, map_location="cpu", weights_only=True)["epoch"] == 7


def test_training_job_fails_naming_the_checkpoint_and_resumes_from_the_intact_state(
        mnist5k_prepared, tmp_path, monkeypatch):
    cell = tiny_cell(2)
    out = tmp_path / "run"
    seen: dict = {}
    calls = fill_disk_for(monkeypatch, "state.pt", on_call=2, seen=seen)      # the state after epoch 1
    state = out / "checkpoints" / "state.pt"
    with pytest.raises(OSError) as info:
        train(cell, mnist5k_prepared, out)
    assert calls["n"] == 2 and seen["before"] is not None
    assert_failed_cleanly(info.value, state, seen["before"], errno.ENOSPC)
    assert torch.load(state, map_location="cpu", weights_only=True)["epoch"] == 0
    assert not (out / "train.json").exists()
    monkeypatch.undo()
    record = train(cell, mnist5k_prepared, out)
    assert record["resumed_from_epoch"] == 1 and record["epochs_completed"] == 2


def _fail_prepared_write(monkeypatch, name: str) -> None:
    real = Path.write_bytes

    def full(self, data):
        if self.name.startswith(f".{name}.") and self.name.endswith(".tmp"):
            real(self, data[: len(data) // 3])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)


def test_prepared_data_write_failures_keep_the_previous_files(mnist5k_prepared, tmp_path, monkeypatch):
    prepared = _copy_prepared(mnist5k_prepared / "prepared", tmp_path / "prepared")
    files = {n: (prepared / n).read_bytes() for n in ("splits.pt", "manifest.json")}
    reseeded = {"source": "mnist5k", "split_seed": 1}
    _fail_prepared_write(monkeypatch, "splits.pt")
    with pytest.raises(OSError) as info:
        D.prepare_dataset("mnist5k", reseeded, tmp_path, prepared)
    assert_failed_cleanly(info.value, prepared / "splits.pt", files["splits.pt"], errno.ENOSPC)
    assert (prepared / "manifest.json").read_bytes() == files["manifest.json"]
    D.load_dataset("mnist5k", {"source": "mnist5k"}, tmp_path, prepared)      # still the old, whole preparation

    monkeypatch.undo()
    _fail_prepared_write(monkeypatch, "manifest.json")
    with pytest.raises(OSError) as info:
        D.prepare_dataset("mnist5k", reseeded, tmp_path, prepared)
    assert_failed_cleanly(info.value, prepared / "manifest.json", files["manifest.json"], errno.ENOSPC)
    # splits.pt is the new one now, the manifest the old one: the mismatch is caught, never used
    with pytest.raises(D.DatasetChecksumError, match="splits.pt is missing or does not match the sha256"):
        D.read_prepared(prepared)
    monkeypatch.undo()
    manifest = D.prepare_dataset("mnist5k", reseeded, tmp_path, prepared)
    assert D.read_prepared(prepared)[0] == manifest and manifest["spec"]["split_seed"] == 1


def test_load_torch_file_round_trip_and_a_missing_file(tmp_path):
    checkpoints.save_torch_file(tmp_path / "x.pt", {"t": torch.arange(3), "n": 1})
    got = load_torch_file(tmp_path / "x.pt")
    assert torch.equal(got["t"], torch.arange(3)) and got["n"] == 1
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_torch_file(tmp_path / "absent.pt")
