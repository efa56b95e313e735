"""One device per GPU job (methods/device_slots.py, runtime.pick_device) on the CPU, with fake
slots: concurrent jobs are real subprocesses holding real flocks; CUDA is faked by monkeypatching
``torch.cuda.is_available`` / ``device_count`` in this process."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from methods import device_slots, runtime
from methods.config import REPO_ROOT

TWO = [(0, "0"), (1, "1")]

# A "job": takes a slot among the given devices, prints its ordinal, holds it until stdin closes.
JOB = textwrap.dedent("""
    import json, sys
    from methods import device_slots
    devices = [tuple(d) for d in json.loads(sys.argv[2])]
    slot = device_slots.acquire(devices, sys.argv[1], poll_s=0.05)
    print(slot.index, flush=True)
    sys.stdin.read()
""")

# A job that dies (no atexit) after handing its locked fd to a process that outlives it.
ORPHANING_JOB = textwrap.dedent("""
    import os, subprocess, sys
    from methods import device_slots
    slot = device_slots.acquire([(0, "0")], sys.argv[1])
    keeper = subprocess.Popen(["sleep", "60"], pass_fds=(slot.fd,), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(keeper.pid, flush=True)
    os._exit(0)
""")


def start_job(slots_dir, devices=TWO, script=JOB):
    import json
    return subprocess.Popen([sys.executable, "-c", script, str(slots_dir), json.dumps(devices)],
                            cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def first_line(proc, timeout=20.0):
    """The job's first stdout line (its device), or None if it prints nothing in ``timeout``."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            return None
        return proc.stdout.readline().strip()
    finally:
        sel.close()


def stop(proc):
    if proc.poll() is None:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(autouse=True)
def _no_slot_leaks(monkeypatch):
    for var in ("CUDA_VISIBLE_DEVICES", device_slots.SLOTS_DIR_ENV, device_slots.WHEN_BUSY_ENV,
                device_slots.WAIT_TIMEOUT_ENV, *runtime.SCHEDULER_ENV):
        monkeypatch.delenv(var, raising=False)
    yield
    runtime.release_device()


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two CUDA devices as far as pick_device can tell (nothing is ever run on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_two_jobs_get_different_devices_and_a_third_waits_for_one_to_exit(tmp_path):
    jobs = [start_job(tmp_path), start_job(tmp_path)]
    third = None
    try:
        assert {first_line(j) for j in jobs} == {"0", "1"}
        locks = tmp_path / device_slots.host_name()
        assert sorted(p.name for p in locks.glob("*.lock")) == ["cuda0.lock", "cuda1.lock"]
        holders = {device_slots.Holder.parse(p.read_text()).pid: p.name for p in locks.glob("*.lock")}
        assert set(holders) == {j.pid for j in jobs}

        third = start_job(tmp_path)
        assert first_line(third, timeout=1.5) is None, "the third job must wait"
        stop(jobs[0])   # the first job exits: the third gets its device
        assert first_line(third, timeout=15) == holders[jobs[0].pid][len("cuda"):-len(".lock")]
        stop(third)
        assert "every device is busy" in third.stderr.read()
    finally:
        for j in jobs + ([third] if third else []):
            stop(j)


def test_a_killed_job_frees_its_slot(tmp_path):
    job = start_job(tmp_path, devices=[(0, "0")])
    try:
        assert first_line(job) == "0"
        slot, busy = device_slots.try_acquire([(0, "0")], tmp_path)
        assert slot is None and busy["0"].pid == job.pid
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=10)
        slot, _ = device_slots.try_acquire([(0, "0")], tmp_path)
        assert slot is not None and slot.index == 0
        text = slot.path.read_text()
        assert f"pid={os.getpid()}" in text and f"host={device_slots.host_name()}" in text
        slot.release()
        assert slot.path.read_text() == ""   # emptied on release
    finally:
        stop(job)


def test_a_stale_lock_file_of_a_dead_pid_is_reclaimed(tmp_path, capsys):
    # A lock file left behind with a dead pid and no flock: simply free.
    directory = tmp_path / device_slots.host_name()
    directory.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (directory / "cuda0.lock").write_text(f"pid={dead.pid}\nhost={device_slots.host_name()}\n")
    slot = device_slots.acquire([(0, "0")], tmp_path, wait=False)
    assert slot is not None
    slot.release()

    # A flock still held through an fd inherited by a process that outlived the job, whose own
    # pid is dead: reclaimed (the file is replaced), while a live holder's lock is respected.
    job = subprocess.run([sys.executable, "-c", ORPHANING_JOB, str(tmp_path)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=30)
    keeper = int(job.stdout.strip())
    try:
        assert device_slots.pid_alive(keeper)
        slot = device_slots.acquire([(0, "0")], tmp_path, wait=False)
        assert slot is not None, "the dead job's slot should have been reclaimed"
        assert "reclaiming cuda0.lock, held for dead pid" in capsys.readouterr().err
        assert f"pid={os.getpid()}" in slot.path.read_text()
    finally:
        os.kill(keeper, signal.SIGKILL)
    slot.release()


def test_a_live_holder_is_never_reclaimed(tmp_path):
    job = start_job(tmp_path, devices=[(0, "0")])
    try:
        assert first_line(job) == "0"
        assert device_slots.acquire([(0, "0")], tmp_path, wait=False) is None
        with pytest.raises(device_slots.NoFreeSlot, match="no free device after"):
            device_slots.acquire([(0, "0")], tmp_path, timeout=0.3, poll_s=0.05,
                                 log=lambda m: None)
    finally:
        stop(job)


def test_pick_device_takes_a_free_slot_and_holds_it(tmp_path, fake_cuda, capsys):
    job = start_job(tmp_path, devices=[(0, "0")])   # another job holds cuda0
    try:
        assert first_line(job) == "0"
        dev = runtime.pick_device("auto", slots_dir=tmp_path)
        assert dev == torch.device("cuda", 1)
        assert runtime.pick_device("cuda", slots_dir=tmp_path) == dev   # same process: same slot
        [slot] = device_slots.held_slots()
        assert slot.path == tmp_path / device_slots.host_name() / "cuda1.lock"
        assert "cuda:1 (slot" in capsys.readouterr().err
        runtime.release_device()
        assert device_slots.held_slots() == []

        # cuda:0 explicitly: busy -> CPU when configured, else wait (bounded here).
        assert runtime.pick_device("cuda:0", slots_dir=tmp_path, when_busy="cpu").type == "cpu"
        with pytest.raises(device_slots.NoFreeSlot):
            runtime.pick_device("cuda:0", slots_dir=tmp_path, wait_timeout=0.3)
    finally:
        stop(job)


def test_pick_device_when_every_slot_is_busy(tmp_path, fake_cuda, monkeypatch):
    jobs = [start_job(tmp_path), start_job(tmp_path)]
    try:
        assert {first_line(j) for j in jobs} == {"0", "1"}
        monkeypatch.setenv(device_slots.SLOTS_DIR_ENV, str(tmp_path))   # as the CLI sets it
        monkeypatch.setenv(device_slots.WHEN_BUSY_ENV, "cpu")
        assert runtime.pick_device("cuda") == torch.device("cpu")
        monkeypatch.setenv(device_slots.WHEN_BUSY_ENV, "wait")
        monkeypatch.setenv(device_slots.WAIT_TIMEOUT_ENV, "0.3")
        with pytest.raises(device_slots.NoFreeSlot):
            runtime.pick_device("cuda")
        stop(jobs[1])
        monkeypatch.delenv(device_slots.WAIT_TIMEOUT_ENV)
        assert runtime.pick_device("cuda").type == "cuda"
    finally:
        for j in jobs:
            stop(j)


def test_a_scheduler_assignment_takes_no_slot(tmp_path, fake_cuda, monkeypatch, capsys):
    monkeypatch.setenv(device_slots.SLOTS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert runtime.pick_device("cuda") == torch.device("cuda", 0)
    assert runtime.pick_device("auto") == torch.device("cuda", 0)
    assert "assigned (CUDA_VISIBLE_DEVICES='3')" in capsys.readouterr().err
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    assert runtime.pick_device("cuda:1") == torch.device("cuda", 1)
    assert device_slots.held_slots() == [] and not tmp_path.joinpath(device_slots.host_name()).exists()

    # A mask of several devices and no scheduler: slots among them, named by their entries.
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-ab12")
    assert runtime.pick_device("cuda") == torch.device("cuda", 0)
    [slot] = device_slots.held_slots()
    assert slot.path.name == "cuda2.lock" and slot.device_id == "2"


def test_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.pick_device(None) == torch.device("cpu")
    assert runtime.pick_device("auto") == torch.device("cpu")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")   # fake GPUs from a scheduler
    assert runtime.pick_device("auto") == torch.device("cpu")
    assert "CUDA_VISIBLE_DEVICES='1' but torch sees no CUDA" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        runtime.pick_device("cuda")
    assert device_slots.held_slots() == []
    with pytest.raises(ValueError, match="when-busy"):
        device_slots.when_busy_setting("sometimes")


def test_describe_device(monkeypatch, tmp_path, fake_cuda):
    assert runtime.describe_device("cpu") == {"type": "cpu"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert runtime.describe_device(torch.device("cpu")) == {"type": "cpu",
                                                            "cuda_visible_devices": "1"}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")

    from types import SimpleNamespace

    from fake_pynvml import FakeNvml, volta

    props = SimpleNamespace(name="Fake A100", uuid="1234abcd-0000", major=8, minor=0,
                            total_memory=40 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    dev = runtime.pick_device("cuda", slots_dir=tmp_path)
    nvml = FakeNvml([volta("GPU-1234abcd-0000"), volta("GPU-99")])
    d = runtime.describe_device(dev, nvml=nvml)
    assert d["type"] == "cuda" and d["index"] == 0 and d["name"] == "Fake A100"
    assert d["uuid"] == "GPU-1234abcd-0000" and d["capability"] == "8.0"
    assert d["nvml_index"] == 0 and d["visible_id"] == "0"
    assert d["slot"]["lock"].endswith("cuda0.lock")
    # nvidia-ml-py absent or without a driver: the torch fields stand.
    monkeypatch.setitem(sys.modules, "pynvml", None)
    d = runtime.describe_device(dev)
    assert d["uuid"] == "GPU-1234abcd-0000" and d["nvml_index"] is None and "nvml_error" in d


def test_the_cli_hands_the_slot_settings_to_pick_device(tmp_path, monkeypatch):
    import argparse

    from methods import cli

    monkeypatch.setenv(device_slots.SLOTS_DIR_ENV, "")   # so the test's changes are undone
    monkeypatch.setenv(device_slots.WHEN_BUSY_ENV, "")
    cli._export_where(argparse.Namespace(device_slots=str(tmp_path / "slots"),
                                         device_when_busy="cpu"))
    assert os.environ[device_slots.SLOTS_DIR_ENV] == str(tmp_path / "slots")
    assert device_slots.default_slots_dir() == tmp_path / "slots"
    assert device_slots.when_busy_setting() == "cpu"


def test_a_forked_child_exiting_does_not_release_the_parents_slot(tmp_path):
    slot = device_slots.acquire([(0, "0")], tmp_path, wait=False)
    pid = os.fork()
    if pid == 0:   # the child (a data-loader worker, say) tidies up as atexit would
        try:
            device_slots.held_slots()[0].release()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert slot.held
    other, busy = device_slots.try_acquire([(0, "0")], tmp_path)
    assert other is None and busy["0"].pid == os.getpid()
    slot.release()
    assert device_slots.try_acquire([(0, "0")], tmp_path)[0] is not None
    runtime.release_device()
