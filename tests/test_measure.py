"""Measurement windows, GPU energy backends and RAPL, against a fake pynvml and a fake sysfs tree.

No test touches CUDA or a real GPU: NVML is the scripted object in ``fake_pynvml``, time is a
:class:`FakeClock` where exact joules are asserted, and RAPL reads files under ``tmp_path``.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

try:
    from fake_pynvml import FakeClock, FakeGpu, FakeMig, FakeNvml, pascal, volta
except ImportError:  # tests/ is a package
    from tests.fake_pynvml import FakeClock, FakeGpu, FakeMig, FakeNvml, pascal, volta

from methods.measure import (BACKENDS, BackgroundSampler, MemorySampler, MeterOptions, RaplReader,
                             WindowRecord, make_meter, map_visible_devices)
from methods.measure.memory import heap_reader, rss_bytes

UUIDS = ["GPU-00000000-aaaa-0000-0000-000000000000", "GPU-11111111-bbbb-0000-0000-000000000000",
         "GPU-22222222-cccc-0000-0000-000000000000"]
OPTS = MeterOptions(idle_samples=3, idle_interval_s=0.0, sample_interval_s=0.0, rapl_root=None)


def fake_meter(gpus, clock, *, device=None, options=OPTS, sync=None):
    nvml = FakeNvml(gpus, clock)
    return make_meter("fake", nvml=nvml, clock=clock, device=device, sync=sync, options=options), nvml


def run_window(meter, clock, seconds, name="w"):
    with meter.window(name):
        clock.advance(seconds)
    return meter.records()[-1]


@pytest.fixture(autouse=True)
def no_visible_devices_env(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")


# ----------------------------------------------------------------------------- energy counter
def test_energy_counter_gives_exact_joules():
    clock = FakeClock(10.0)
    meter, _ = fake_meter([volta(UUIDS[0], energy_mj=lambda t: 5e6 + 250_000 * t, power_mw=lambda t: 40_000)], clock)
    rec = run_window(meter, clock, 4.0)
    assert rec.gpu_energy_j == pytest.approx(1000.0, abs=1e-9)   # 250 W x 4 s
    assert rec.gpu_s == 4.0 and rec.wall_s == 4.0
    assert "power_sampling_fallback" not in rec.flags
    assert meter.summary()["devices"][0]["mode"] == "energy_counter"
    assert meter.summary()["devices"][0]["architecture"] == "volta"
    meter.close()


def test_scripted_counter_sequence_steps():
    clock = FakeClock()
    readings = {0.0: 1_000, 2.0: 1_500, 5.0: 9_000}
    meter, _ = fake_meter([volta(UUIDS[0], energy_mj=lambda t: readings[t], power_mw=lambda t: 0)], clock)
    with meter.window("outer"):
        clock.advance(2.0)
        with meter.window("inner"):
            clock.advance(3.0)
    inner, outer = meter.records()
    assert inner.gpu_energy_j == pytest.approx(7.5) and outer.gpu_energy_j == pytest.approx(8.0)


# ----------------------------------------------------------------------------- power fallback
@pytest.mark.parametrize("power_w, t0, seconds, expected_j", [
    (lambda t: 100.0, 0.0, 3.0, 300.0),                 # constant
    (lambda t: 50.0 + 10.0 * t, 2.0, 4.0, 360.0),       # linear: 50*4 + 5*(36 - 4)
])
def test_pascal_falls_back_to_power_sampling(power_w, t0, seconds, expected_j):
    clock = FakeClock(t0)
    meter, nvml = fake_meter([pascal(UUIDS[0], power_mw=lambda t: 1000.0 * power_w(t))], clock)
    with meter.window("w"):
        for _ in range(4):                       # intermediate samples stay on the line
            clock.advance(seconds / 4)
            meter.backend.channels[0].read_j()
    rec = meter.records()[-1]
    assert "power_sampling_fallback" in rec.flags
    assert rec.gpu_energy_j == pytest.approx(expected_j, rel=1e-9)
    assert meter.summary()["devices"][0]["mode"] == "power_sampling"
    assert meter.summary()["devices"][0]["architecture"] == "pascal"
    meter.close()


def test_power_sampler_thread_samples_and_stops():
    clock = FakeClock()
    options = MeterOptions(idle_samples=0, sample_interval_s=0.005, rapl_root=None)
    meter, nvml = fake_meter([pascal(UUIDS[0], power_mw=lambda t: 70_000)], clock, options=options)
    before, deadline = nvml.events.count("power"), time.monotonic() + 5.0
    while nvml.events.count("power") <= before + 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert nvml.events.count("power") > before + 3
    meter.close()
    stopped = nvml.events.count("power")
    time.sleep(0.03)
    assert nvml.events.count("power") == stopped
    assert nvml.initialised == 0                       # close() shut NVML down


def test_device_without_counter_or_power_reports_reason():
    clock = FakeClock()
    meter, _ = fake_meter([FakeGpu(UUIDS[0])], clock)
    rec = run_window(meter, clock, 1.0)
    assert rec.gpu_energy_j is None and "neither" in rec.reasons["gpu_energy_j"]
    assert rec.gpu_s == 1.0


# ----------------------------------------------------------------------------- device mapping
def three_gpus(**kw):
    return [volta(UUIDS[i], energy_mj=lambda t, i=i: (i + 1) * 100_000 * t, power_mw=lambda t: 0, **kw)
            for i in range(3)]


@pytest.mark.parametrize("visible, expected", [
    (None, [0, 1, 2]),
    ("1,0", [1, 0]),
    (" 2 , 0 ", [2, 0]),
    (UUIDS[2], [2]),
    ("GPU-11111111", [1]),                      # unique prefix, as CUDA accepts
    (f"0,{UUIDS[2]}", [0, 2]),
    ("0,7,1", [0]),                            # CUDA stops at the first invalid entry
    ("-1", []),
    ("", []),
])
def test_visible_devices_map_to_nvml_indices(visible, expected):
    nvml = FakeNvml(three_gpus())
    notes = []
    mapped = map_visible_devices(nvml, visible, notes)
    assert [info.nvml_index for info, _, _ in mapped] == expected
    assert [info.index for info, _, _ in mapped] == list(range(len(expected)))
    assert all(h is nvml.gpus[i] for (_, h, _), i in zip(mapped, expected))
    assert bool(notes) == (visible in ("0,7,1", "-1"))


def test_cuda_ordinal_selects_the_remapped_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    clock = FakeClock()
    meter, _ = fake_meter(three_gpus(), clock, device=torch.device("cuda", 0))
    rec = run_window(meter, clock, 2.0)
    assert [d["nvml_index"] for d in meter.summary()["devices"]] == [1]
    assert rec.gpu_energy_j == pytest.approx(400.0)          # GPU 1 draws 200 W
    meter.close()
    meter, _ = fake_meter(three_gpus(), clock, device=None)  # no device: every visible GPU
    rec = run_window(meter, clock, 1.0)
    assert rec.gpu_energy_j == pytest.approx(300.0) and rec.gpu_s == 2.0


def test_mig_uuid_maps_to_parent_and_is_not_attributable(monkeypatch):
    mig = FakeMig("MIG-33333333-dddd-0000-0000-000000000000", pids=(os.getpid(),))
    gpus = three_gpus()
    gpus[2].migs.append(mig)
    mig.parent = gpus[2]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mig.uuid)
    clock = FakeClock()
    meter, _ = fake_meter(gpus, clock, device=torch.device("cuda"))
    (dev,) = meter.summary()["devices"]
    assert dev["nvml_index"] == 2 and dev["mig"] and not dev["attributable"] and dev["uuid"] == mig.uuid
    rec = run_window(meter, clock, 1.0)
    assert "mig_not_attributable" in rec.flags
    assert rec.gpu_energy_j is None and rec.gpu_s is None and "MIG" in rec.reasons["gpu_energy_j"]


def test_gpu_in_mig_mode_is_not_attributable():
    gpus = three_gpus()
    gpus[0].mig_mode = True
    notes = []
    (info, _, _), = map_visible_devices(FakeNvml(gpus), "0", notes)
    assert not info.attributable and info.mig and "MIG mode" in notes[0]


def test_unknown_cuda_ordinal_is_an_error(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(ValueError, match="cuda:1"):
        fake_meter(three_gpus(), FakeClock(), device=torch.device("cuda", 1))


# ----------------------------------------------------------------------------- flags
def test_short_window_is_flagged():
    clock = FakeClock()
    meter, _ = fake_meter(three_gpus()[:1], clock)
    assert "shorter_than_counter_period" in run_window(meter, clock, 0.05).flags
    assert "shorter_than_counter_period" not in run_window(meter, clock, 1.0).flags


@pytest.mark.parametrize("pids, shared", [((), False), ((os.getpid(),), False), ((os.getpid(), 424242), True)])
def test_foreign_process_flags_gpu_as_shared(pids, shared):
    clock = FakeClock()
    meter, _ = fake_meter(three_gpus(pids=pids)[:1], clock)
    assert ("gpu_shared_with_foreign_process" in run_window(meter, clock, 1.0).flags) == shared


# ----------------------------------------------------------------------------- idle baseline
def test_idle_baseline_gives_net_joules():
    clock = FakeClock()
    meter, _ = fake_meter([volta(UUIDS[0], energy_mj=lambda t: 200_000 * t, power_mw=lambda t: 30_000)], clock)
    rec = run_window(meter, clock, 5.0)
    assert meter.summary()["idle_watts"] == pytest.approx(30.0)
    assert rec.gpu_energy_j == pytest.approx(1000.0)
    assert rec.gpu_energy_net_j == pytest.approx(1000.0 - 30.0 * 5.0)


def test_no_idle_baseline_leaves_net_none_with_reason():
    clock = FakeClock()
    options = MeterOptions(idle_samples=0, rapl_root=None)
    meter, _ = fake_meter(three_gpus()[:1], clock, options=options)
    rec = run_window(meter, clock, 1.0)
    assert rec.gpu_energy_j is not None and rec.gpu_energy_net_j is None
    assert "idle" in rec.reasons["gpu_energy_net_j"]


# ----------------------------------------------------------------------------- windows
def test_sync_is_called_before_reading_at_both_edges():
    clock = FakeClock()
    nvml = FakeNvml([volta(UUIDS[0], energy_mj=lambda t: 1000 * t, power_mw=lambda t: 0)], clock)
    meter = make_meter("fake", nvml=nvml, clock=clock, sync=lambda: nvml.events.append("sync"), options=OPTS)
    nvml.events.clear()
    with meter.window("w"):
        assert nvml.events == ["sync", "energy"]
        clock.advance(1.0)
    assert nvml.events == ["sync", "energy", "sync", "energy"]
    assert meter.summary()["sync"] == "injected"


def test_nested_windows_paths_and_parent_covers_children():
    meter = make_meter("null", options=OPTS)
    with meter.window("run"):
        with meter.window("train"):
            for epoch in range(3):
                with meter.window(f"epoch_{epoch:03d}"):
                    sum(i * i for i in range(20_000))
        with meter.window("eval_pgd"):
            pass
    recs = {r.path: r for r in meter.records()}
    assert list(recs) == ["run/train/epoch_000", "run/train/epoch_001", "run/train/epoch_002",
                          "run/train", "run/eval_pgd", "run"]
    assert recs["run/train"].name == "train"
    epochs = [recs[f"run/train/epoch_{e:03d}"] for e in range(3)]
    assert recs["run/train"].wall_s >= sum(r.wall_s for r in epochs)
    assert recs["run"].wall_s >= recs["run/train"].wall_s + recs["run/eval_pgd"].wall_s
    assert recs["run"].cpu_s >= recs["run/train"].cpu_s > 0
    assert recs["run"].peak_mem_bytes > 0
    assert all(recs["run"].start_s <= r.start_s for r in recs.values())


def test_gpu_peak_memory_is_per_window_when_nested():
    class ScriptedPeaks:               # what max_memory_allocated returns at each edge, then reset
        def __init__(self, peaks):
            self.peaks = list(peaks)

        def take_peak(self):
            return self.peaks.pop(0)

    meter = make_meter("null", options=OPTS)
    meter._cuda_memory = ScriptedPeaks([10, 50, 30, 5])   # open outer, open inner, close inner, close outer
    with meter.window("outer"):
        with meter.window("inner"):
            pass
    inner, outer = meter.records()
    assert (inner.peak_gpu_mem_bytes, outer.peak_gpu_mem_bytes) == (30, 50)


def test_window_records_exception_as_aborted_and_rejects_bad_names():
    meter = make_meter("null", options=OPTS)
    with pytest.raises(KeyError):
        with meter.window("epoch_000"):
            raise KeyError("boom")
    assert meter.records()[-1].flags == ("aborted",)
    with pytest.raises(ValueError, match="window name"):
        with meter.window("a/b"):
            pass


def test_null_backend_gives_none_with_reasons_and_json():
    meter = make_meter("null", options=OPTS)
    with meter.window("run"):
        pass
    rec = meter.records()[0]
    for key in ("gpu_s", "gpu_energy_j", "gpu_energy_net_j", "cpu_energy_j"):
        assert getattr(rec, key) is None and rec.reasons[key].strip()
    assert rec.reasons["gpu_energy_j"].startswith("backend=null")
    json.loads(json.dumps(meter.summary()))
    assert isinstance(rec.to_dict()["flags"], list)


def test_auto_without_cuda_or_nvml_is_null_with_reason(monkeypatch):
    meter = make_meter("auto", device=torch.device("cpu"), options=OPTS)
    assert meter.summary()["backend"] == "null" and "no CUDA device" in meter.summary()["backend_reason"]
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([], fail_init=True))
    meter = make_meter("auto", device="cuda:0", options=OPTS)
    assert meter.summary()["backend"] == "null" and "did not initialise" in meter.summary()["backend_reason"]


def test_auto_uses_nvml_when_it_initialises(monkeypatch):
    clock = FakeClock()
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(three_gpus(), clock))
    meter = make_meter("auto", device=torch.device("cuda", 2), clock=clock, sync=lambda: None, options=OPTS)
    assert meter.summary()["backend"] == "nvml"
    assert run_window(meter, clock, 1.0).gpu_energy_j == pytest.approx(300.0)


def test_backend_registry_and_argument_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([], fail_init=True))
    assert set(BACKENDS.names()) == {"auto", "nvml", "null", "fake", "replay"}
    with pytest.raises(KeyError, match="registered"):
        make_meter("nvidia-smi")
    with pytest.raises(ValueError, match="nvml="):
        make_meter("fake")
    with pytest.raises(ValueError, match="replay_csv="):
        make_meter("replay")
    with pytest.raises(RuntimeError, match="did not initialise"):
        make_meter("nvml", device="cuda:0")
    with pytest.raises(ValueError, match="idle_samples"):
        MeterOptions(idle_samples=-1)


# ----------------------------------------------------------------------------- replay
def test_replay_reproduces_a_recording(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{UUIDS[1]},0")
    gpus = [volta(UUIDS[0], energy_mj=lambda t: 1e6 + 150_000 * t + 2_000 * t * t, power_mw=lambda t: 25_000),
            pascal(UUIDS[1], power_mw=lambda t: 60_000 + 5_000 * t, pids=(os.getpid(),))]
    script = [("run", 0.0), ("epoch_000", 1.5), ("epoch_001", 2.25), ("eval", 0.5)]

    def drive(meter, clock):
        with meter.window("run"):
            for name, seconds in script[1:]:
                with meter.window(name):
                    for _ in range(3):
                        clock.advance(seconds / 3)
                        for ch in meter.backend.channels.values():
                            if ch.mode == "power_sampling":
                                ch.read_j()
        return [r.to_dict() for r in meter.records()]

    clock = FakeClock(100.0)
    recorder = make_meter("fake", nvml=FakeNvml(gpus, clock), clock=clock,
                          options=MeterOptions(idle_samples=2, idle_interval_s=0, sample_interval_s=0,
                                               rapl_root=None, record_csv=tmp_path / "gpu.csv"))
    recorded = drive(recorder, clock)
    recorder.close()
    assert all(r["gpu_energy_net_j"] is not None for r in recorded)
    clock = FakeClock(0.0)
    replayed_meter = make_meter("replay", replay_csv=tmp_path / "gpu.csv", clock=clock, options=OPTS)
    replayed = drive(replayed_meter, clock)
    assert [r["path"] for r in recorded] == [r["path"] for r in replayed]
    for a, b in zip(recorded, replayed):
        for k in ("wall_s", "gpu_s", "gpu_energy_j", "gpu_energy_net_j"):
            assert a[k] == pytest.approx(b[k], rel=1e-9), (a["path"], k)
    devices = replayed_meter.summary()["devices"]
    assert [(d["uuid"], d["mode"]) for d in devices] == [(UUIDS[1], "power_sampling"), (UUIDS[0], "energy_counter")]
    assert replayed_meter.summary()["idle_watts"] == pytest.approx(560.0 + 25.0)   # power at t=100


def test_replay_of_handwritten_csv(tmp_path):
    path = tmp_path / "gpu.csv"
    path.write_text("t_s,device_index,energy_mj,power_mw,phase\n"
                    "-1,0,,20000,idle\n"
                    "0,0,1000000,,run\n"
                    "10,0,3000000,,run\n"
                    "0,1,,100000,\n"
                    "10,1,,300000,\n")
    clock = FakeClock(50.0)
    meter = make_meter("replay", replay_csv=path, clock=clock, options=OPTS)
    clock.advance(2.0)
    rec = run_window(meter, clock, 4.0)           # t = 2 .. 6 after the origin
    # device 0: counter, 200 W; device 1: 100 W + 20 W/s ramp -> integral 2..6 = 400 + 10*(36-4) = 720
    assert rec.gpu_energy_j == pytest.approx(800.0 + 720.0)
    assert rec.gpu_energy_net_j is None and "idle" in rec.reasons["gpu_energy_net_j"]
    only0 = make_meter("replay", replay_csv=path, clock=FakeClock(0.0), device="cuda:0", options=OPTS)
    assert only0.summary()["idle_watts"] == pytest.approx(20.0)


def test_replay_rejects_malformed_csv(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("t_s,device_index,energy_mj\nzero,0,1\n")
    with pytest.raises(ValueError, match="bad.csv:2"):
        make_meter("replay", replay_csv=path)


# ----------------------------------------------------------------------------- RAPL
def make_rapl_tree(root: Path, energy_uj: int, max_uj: int = 1_000_000_000) -> Path:
    zones = {"intel-rapl:0": "package-0", "intel-rapl:0:0": "core", "intel-rapl:1": "psys"}
    for zone, name in zones.items():
        (root / zone).mkdir(parents=True)
        (root / zone / "name").write_text(name + "\n")
        (root / zone / "energy_uj").write_text(f"{energy_uj}\n")
        (root / zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return root / "intel-rapl:0" / "energy_uj"


def test_rapl_reads_packages_and_handles_wraparound(tmp_path):
    counter = make_rapl_tree(tmp_path, 999_000_000)
    reader = RaplReader(tmp_path)
    assert reader.available and [z.name for z in reader.zones] == ["package-0"]
    counter.write_text("999_500_000".replace("_", ""))
    assert reader.read_j() == pytest.approx(0.5)
    counter.write_text("250000")                  # wrapped: 0.5 J to the top, then 0.25 J
    assert reader.read_j() == pytest.approx(0.5 + 0.5 + 0.25)


def test_rapl_unreadable_gives_none_and_reason(tmp_path):
    missing = RaplReader(tmp_path / "nope")
    assert missing.read_j() is None and "no RAPL" in missing.reason
    counter = make_rapl_tree(tmp_path / "sys", 0)
    counter.unlink()
    counter.mkdir()                               # reading it fails, as an unreadable file does
    broken = RaplReader(tmp_path / "sys")
    assert broken.read_j() is None and "energy_uj" in broken.reason


def test_meter_reports_rapl_cpu_energy(tmp_path):
    counter = make_rapl_tree(tmp_path, 5_000_000)
    meter = make_meter("null", options=MeterOptions(rapl_root=tmp_path, rapl_poll_s=0))
    with meter.window("w"):
        counter.write_text("7000000")
    rec = meter.records()[0]
    assert rec.cpu_energy_j == pytest.approx(2.0) and "cpu_energy_j" not in rec.reasons
    assert meter.summary()["cpu_energy"]["zones"] == ["package-0"]
    meter.close()


def test_window_record_is_frozen():
    rec = WindowRecord("w", "w", 1.0, 1.0, None, None, None, None, None)
    with pytest.raises(Exception):
        rec.wall_s = 2.0  # type: ignore[misc]
    assert rec.to_dict()["flags"] == []


# ----------------------------------------------------------------------------- background samplers
def wait_for(predicate, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)
    return predicate()


def test_background_sampler_calls_until_stopped_and_stops_once():
    calls = []
    sampler = BackgroundSampler(lambda: calls.append(1), 0.002, "test-sampler").start()
    assert sampler.running and wait_for(lambda: len(calls) >= 3)
    sampler.stop()
    stopped = len(calls)
    time.sleep(0.02)
    assert len(calls) == stopped and not sampler.running
    sampler.stop()                  # idempotent
    sampler.start()                 # a stopped sampler does not restart
    assert not sampler.running


@pytest.mark.parametrize("interval", [None, 0])
def test_background_sampler_without_interval_starts_no_thread(interval):
    sampler = BackgroundSampler(lambda: pytest.fail("called"), interval, "none").start()
    assert not sampler.running
    sampler.stop()


def test_background_sampler_rejects_negative_interval():
    with pytest.raises(ValueError, match="interval_s"):
        BackgroundSampler(lambda: None, -1.0, "neg")


def test_rapl_poller_thread_starts_and_is_joined_on_close(tmp_path):
    make_rapl_tree(tmp_path, 1_000_000)
    reader = RaplReader(tmp_path)
    polling = lambda: any(t.name == "advrepro-rapl" for t in threading.enumerate())
    reader.start(0.002)
    assert polling()
    reader.close()
    assert not polling()


def test_memory_sampler_reports_before_peak_and_added_bytes():
    heap = iter([100, 250])              # at entry, at exit (no thread without an interval)
    with MemorySampler(None, readers={"heap": lambda: next(heap), "none": lambda: None}) as sampler:
        pass
    report = sampler.report()
    assert report["heap_before_bytes"] == 100 and report["peak_heap_bytes"] == 250
    assert report["heap_added_bytes"] == 150
    assert report["peak_none_bytes"] is None and report["none_added_bytes"] is None


def test_memory_sampler_polls_in_the_background():
    values = iter(range(1, 10_000))
    sampler = MemorySampler(0.001, readers={"n": lambda: next(values)})
    with sampler:
        assert wait_for(lambda: (sampler.peak.get("n") or 0) > 3)
    assert sampler.report()["n_added_bytes"] > 2


def test_default_memory_readers_read_this_process():
    rss = rss_bytes()
    assert rss is None or rss > 0
    read = heap_reader()
    assert read is None or read() > 0
