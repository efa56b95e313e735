"""The workflow on a real SLURM: a single-node cluster (tests/slurm_cluster.py: munged, slurmctld,
slurmd from Debian's packages, fake GPUs) started by a fixture, the smoke workflow submitted with
the real ``workflow/profiles/slurm`` profile plus the ``slurm-test`` overlay, and its results
compared with a local run of the same config.  Skipped, saying what to install, where the
packages are absent (``.ci/run`` installs them).  Every Snakemake run has a timeout and is
stopped with SIGINT (on SIGTERM Snakemake waits for its running jobs)."""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from methods.config import REPO_ROOT, iter_cells, load_yaml
from slurm_cluster import SlurmCluster, missing

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(missing() is not None, reason=str(missing()))]

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
PROFILES = ["--profile", "workflow/profiles/slurm", "--profile", "workflow/profiles/slurm-test"]
SMOKE = ["--configfile", "workflow/config/smoke.yaml"]
SLURM_TEST_RECIPES = ("standard_mnist", "bb_gs_mnist")
CVD_LINE = re.compile(r"device: cpu \(CUDA_VISIBLE_DEVICES='([^']*)' but torch sees no CUDA")


class Hung(AssertionError):
    pass


def start(args, env, log: Path) -> subprocess.Popen:
    out = open(log, "w")
    try:
        return subprocess.Popen(SNAKEMAKE + list(args), cwd=REPO_ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    finally:
        out.close()


def interrupt(proc: subprocess.Popen) -> None:
    """Stop Snakemake as a user would (SIGINT: it cancels its SLURM jobs), SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    """Wait for Snakemake; past ``timeout`` stop it and fail."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        interrupt(proc)
        raise Hung(f"snakemake still running after {timeout:g} s:\n{log.read_text()[-4000:]}")
    return log.read_text()


def local_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "CUDA_VISIBLE_DEVICES"}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def gpu_cluster():
    if torch.cuda.is_available():
        pytest.skip("the fake-GPU cluster is for CPU-only machines: SLURM's CUDA_VISIBLE_DEVICES "
                    "would point at this machine's real GPUs")
    cluster = SlurmCluster(gpus=4, cpus=4)   # four jobs at once: fewer scheduling waves
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture
def cluster_without_gpus():
    cluster = SlurmCluster(gpus=0)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def table_rows(path: Path):
    """The table's rows without what depends on the clock."""
    with open(path, newline="") as f:
        return sorted((tuple((k, v) for k, v in row.items() if not k.endswith("_wall_s"))
                       for row in csv.DictReader(f)))


def outcome(cell: Path) -> dict:
    """What a cell computed (no timings, paths or provenance): training history and weights'
    epochs, and every evaluation's metrics and AutoAttack record (per class, subset indices,
    PGD on the same subset)."""
    train = json.loads((cell / "train.json").read_text())
    out = {"epochs": train["epochs_completed"],
           "history": [{k: v for k, v in h.items() if not k.endswith("_s")} for h in train["history"]]}
    for ckpt in ("last", "best"):
        ev = json.loads((cell / f"eval_{ckpt}.json").read_text())
        out[ckpt] = {"epoch": ev["checkpoint"]["epoch"], "metrics": ev["metrics"],
                     "autoattack": ev["autoattack"]}
    return out


def smoke_cells(tmp_path):
    """The smoke config, by default cut to two of its cells (a plain baseline and BB, each
    evaluated at both checkpoints: 7 SLURM jobs instead of 13, since on 2 cores every job's
    Python start-up counts); ADVREPRO_SLURM_TEST_ALL_CELLS=1 keeps all of them."""
    config = load_yaml(REPO_ROOT / "workflow" / "config" / "smoke.yaml")
    args = list(SMOKE)
    if os.environ.get("ADVREPRO_SLURM_TEST_ALL_CELLS") != "1":
        cells = [dict(config["cells"][0], recipes=list(SLURM_TEST_RECIPES))]
        assert set(SLURM_TEST_RECIPES) <= set(config["cells"][0]["recipes"])
        config["cells"] = cells
        (tmp_path / "cells.yaml").write_text(json.dumps({"cells": cells}))
        args += [str(tmp_path / "cells.yaml")]
    return args, list(iter_cells(config))


def test_smoke_workflow_on_slurm_matches_a_local_run(gpu_cluster, tmp_path):
    smoke, cells = smoke_cells(tmp_path)
    runs = {}
    for name in ("local", "slurm"):
        runs[name] = ["--config", f"results_dir={tmp_path / name / 'results'}",
                      f"data_dir={tmp_path / name / 'data'}", "device=auto"]
        (tmp_path / name).mkdir()
    # The local run fills the cluster run's status-polling pauses: both at once.
    local = start(["--cores", "2", "--resources", "gpu=1", *smoke, *runs["local"]], local_env(),
                  tmp_path / "local.log")
    env = gpu_cluster.env
    env["OMP_NUM_THREADS"] = "1"
    started = time.monotonic()
    slurm = start([*PROFILES, *smoke, *runs["slurm"], "--slurm-logdir", str(tmp_path / "slurm_logs"),
                   "--slurm-keep-successful-logs"], env, tmp_path / "slurm.log")
    try:
        slurm_out = finish(slurm, tmp_path / "slurm.log", timeout=900)
        slurm_s = time.monotonic() - started
        local_out = finish(local, tmp_path / "local.log", timeout=900)
    finally:
        for proc in (slurm, local):
            interrupt(proc)
    assert local.returncode == 0, local_out[-3000:]
    assert slurm.returncode == 0, slurm_out[-4000:] + "\n" + gpu_cluster.log_tail("slurmctld")
    assert "Using profiles workflow/profiles/slurm and workflow/profiles/slurm-test" in slurm_out
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", slurm_out)
    assert len(submitted) == 1 + 3 * len(cells), slurm_out[-3000:]   # prepare, train, 2 evals
    print(f"slurm run: {slurm_s:.0f} s, {len(submitted)} SLURM jobs")
    for jid in submitted:
        info = gpu_cluster.client("scontrol", "show", "job", jid, check=False).stdout
        times = re.findall(r"(StartTime|EndTime)=(\S+)", info)
        print(jid, times, re.findall(r"RunTime=(\S+)", info))

    # The same results: tables (bar the clock) and every cell's metrics, per class and subset.
    results = {name: tmp_path / name / "results" for name in runs}
    assert table_rows(results["slurm"] / "tables" / "smoke.csv") == \
        table_rows(results["local"] / "tables" / "smoke.csv")
    for dataset, arch, method, recipe, seed in cells:
        rel = Path(dataset, arch, method, recipe, f"seed{seed}")
        assert outcome(results["slurm"] / rel) == outcome(results["local"] / rel), rel

    # Each GPU job saw its own CUDA_VISIBLE_DEVICES from slurmd (fake GPUs 0-3; the train jobs
    # are submitted together and run at once, so each had another) and ran on the CPU
    # (device: auto).
    seen = {}
    for dataset, arch, method, recipe, seed in cells:
        logs = results["slurm"] / dataset / arch / method / recipe / f"seed{seed}" / "logs"
        for log in ("train.log", "evaluate_last.log", "evaluate_best.log"):
            found = CVD_LINE.findall((logs / log).read_text())
            assert len(found) == 1, (logs / log).read_text()[-2000:]
            seen[f"{recipe}/{log}"] = found[0]
            local_log = results["local"] / dataset / arch / method / recipe / f"seed{seed}" / "logs" / log
            assert "CUDA_VISIBLE_DEVICES" not in local_log.read_text()
    assert set(seen.values()) <= {"0", "1", "2", "3"}, seen
    assert len({v for k, v in seen.items() if k.endswith("/train.log")}) == len(cells), seen


def test_a_gpu_job_on_a_cluster_without_gpus_fails_fast_with_slurms_message(
        cluster_without_gpus, tmp_path):
    results = tmp_path / "results"
    # The dataset prepared beforehand, so the one job submitted is the GPU job.
    prep = subprocess.run([sys.executable, "-m", "methods", "prepare", "--dataset", "mnist5k",
                           "--spec", json.dumps({"source": "mnist5k"}), "--data-dir",
                           str(tmp_path / "data"), "--out-dir", str(results / "data" / "mnist5k")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-2000:]
    target = results / "mnist5k/smallcnn-w0.125/nfgsm/nfgsm_mnist/seed0/train.json"
    env = cluster_without_gpus.env
    started = time.monotonic()
    proc = start([str(target), *PROFILES, *SMOKE, "--config", f"results_dir={results}",
                  f"data_dir={tmp_path / 'data'}", "--slurm-logdir", str(tmp_path / "slurm_logs")],
                 env, tmp_path / "slurm.log")
    out = finish(proc, tmp_path / "slurm.log", timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0, out[-3000:]
    assert "rule prepare_data" not in out and "rule train" in out, out[-3000:]
    assert "Invalid generic resource (gres) specification" in out, out[-3000:]
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert not target.exists()
    assert cluster_without_gpus.client("squeue", "-h").stdout.strip() == ""
