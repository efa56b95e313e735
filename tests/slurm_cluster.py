"""A real single-node SLURM for tests: munged, slurmctld and slurmd from Debian's packages
(``slurmctld slurmd slurm-client munge``), run as plain foreground children of the test process
with every file (key, sockets, state, spool, logs, config) under one temporary directory, no
systemd and nothing written under /etc.  GPUs are fake: gres.conf ``File=`` entries that are
symlinks to /dev/null, so slurmd hands each job its own CUDA_VISIBLE_DEVICES while torch sees no
CUDA (jobs run on the CPU).  See the README (Clusters) and the project design notes for the pitfalls handled
here:

- the slurm-jobstep plugin drops ``SLURM_CONF`` before its nested ``srun``; instead of a
  symlink at /etc/slurm/slurm.conf, :attr:`SlurmCluster.env` puts an ``srun`` wrapper first on
  PATH that re-exports it (sbatch's ``--export=ALL`` carries PATH into the job);
- no slurmdbd, so status comes from ``squeue`` (``MinJobAge`` 300 s keeps finished jobs there);
- ``DefMemPerCPU`` so jobs do not each take the node's memory; ``slurmctld -c`` (clean state);
- stop: running jobs cancelled, then slurmd, slurmctld, munged, each by the pid of the child
  this module started (SIGTERM, then SIGKILL after a timeout).

``python tests/slurm_cluster.py`` starts one, submits a GPU job, prints what it saw and stops.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

DAEMONS = {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd"}
CLIENTS = {"sbatch": "slurm-client", "squeue": "slurm-client", "srun": "slurm-client",
           "scontrol": "slurm-client", "scancel": "slurm-client", "sinfo": "slurm-client"}
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def _which(name: str) -> Optional[str]:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def missing() -> Optional[str]:
    """Why a cluster cannot be started here (None when it can): what is absent and the command
    that installs it."""
    absent = [n for n in {**DAEMONS, **CLIENTS} if _which(n) is None]
    if absent:
        packages = sorted({{**DAEMONS, **CLIENTS}[n] for n in absent})
        return (f"SLURM test cluster: {', '.join(absent)} not found; install with "
                f"`apt-get install {' '.join(packages)}` (Debian 12; .ci/run does this)")
    if os.geteuid() != 0:
        return "SLURM test cluster: slurmd must run as root (jobs run as the submitting user)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_total_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 4096


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """One node ``advnode`` with ``cpus`` CPUs (default: the machine's; more oversubscribes it),
    ``gpus`` fake GPUs (0 = a cluster without GPUs: no GresTypes at all), one default partition
    ``debug``."""

    NODE = "advnode"
    PARTITION = "debug"

    def __init__(self, root: Optional[Path] = None, *, gpus: int = 2, cpus: Optional[int] = None,
                 mem_mb: Optional[int] = None, def_mem_per_cpu: int = 1000) -> None:
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="advrepro-slurm-"))
        self.gpus = int(gpus)
        self.cpus = int(cpus or os.cpu_count() or 1)
        self.mem_mb = int(mem_mb or max(1024, min(_mem_total_mb() // 2, 8192)))
        self.def_mem_per_cpu = def_mem_per_cpu
        self.procs: Dict[str, subprocess.Popen] = {}
        self.conf = self.root / "etc" / "slurm.conf"
        self.bin = self.root / "bin"
        self.logs = self.root / "log"

    # ------------------------------------------------------------------ configuration
    @property
    def env(self) -> Dict[str, str]:
        """The environment for clients, Snakemake and (through --export=ALL) the jobs."""
        env = dict(os.environ)
        for var in list(env):
            if var.startswith(("SLURM_", "SBATCH_", "SRUN_", "SQUEUE_")):
                del env[var]
        env.pop("CUDA_VISIBLE_DEVICES", None)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([str(self.bin), env.get("PATH", ""), *SBIN])
        return env

    def _write_config(self) -> None:
        r = self.root
        for d in ("etc", "bin", "log", "state", "spool", "run", "munge", "dev"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r, 0o755)
        os.chmod(r / "munge", 0o755)   # munged refuses a socket directory with other modes
        key = r / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)
        self.ports = (_free_port(), _free_port())
        gres_types, node_gres = "", ""
        if self.gpus:
            gres_lines = []
            for i in range(self.gpus):
                dev = r / "dev" / f"nvidia{i}"
                if not dev.exists():
                    dev.symlink_to("/dev/null")
                gres_lines.append(f"NodeName={self.NODE} Name=gpu File={dev}")
            (r / "etc" / "gres.conf").write_text("\n".join(gres_lines) + "\n")
            gres_types, node_gres = "GresTypes=gpu\n", f" Gres=gpu:{self.gpus}"
        else:
            (r / "etc" / "gres.conf").write_text("")
        # More CPUs than the machine has (jobs here mostly wait on Python start-up): slurmd takes
        # the configured count instead of draining the node for "Low socket*core*thread count".
        overrides = ("SlurmdParameters=config_overrides\n"
                     if self.cpus > (os.cpu_count() or 1) else "")
        self.conf.write_text(f"""\
ClusterName=advrepro-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={self.ports[0]}
SlurmdPort={self.ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket.2
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=300
DefMemPerCPU={self.def_mem_per_cpu}
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
{overrides}{gres_types}NodeName={self.NODE} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} \
CPUs={self.cpus} RealMemory={self.mem_mb}{node_gres} State=UNKNOWN
PartitionName={self.PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        # The jobstep plugin drops SLURM_CONF before its nested srun: put it back.
        srun = self.bin / "srun"
        srun.write_text(f"#!/bin/sh\nexport SLURM_CONF={self.conf}\nexec {_which('srun')} \"$@\"\n")
        srun.chmod(0o755)

    # ------------------------------------------------------------------ lifecycle
    def _spawn(self, name: str, argv: List[str]) -> None:
        log = open(self.logs / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env,
                                            start_new_session=True)
        log.close()

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise SlurmError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, n: int = 3000) -> str:
        text = ""
        for path in (self.logs / f"{name}.out", self.logs / f"{name}.log"):
            if path.exists():
                text += path.read_text(errors="replace")[-n:]
        return text

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        reason = missing()
        if reason:
            raise SlurmError(reason)
        self._write_config()
        r = self.root
        self._spawn("munged", [_which("munged"), "-F", "--force",
                               f"--key-file={r}/munge/munge.key",
                               f"--socket={r}/munge/munge.socket.2",
                               f"--pid-file={r}/munge/munged.pid",
                               f"--log-file={r}/log/munged.log",
                               f"--seed-file={r}/munge/munged.seed"])
        self._wait(lambda: (r / "munge" / "munge.socket.2").exists(), timeout, "munged's socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        self._wait(lambda: self.client("scontrol", "ping", check=False).returncode == 0,
                   timeout, "slurmctld to answer")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.NODE, "-f", str(self.conf)])
        self._wait(self._node_ready, timeout, f"node {self.NODE} to be idle")
        return self

    def _node_ready(self) -> bool:
        out = self.client("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
        return out in ("idle", "mixed", "allocated")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if ready():
                return
            time.sleep(0.2)
        raise SlurmError(f"SLURM test cluster: timed out after {timeout:g} s waiting for {what}\n"
                         + "\n".join(f"--- {n}\n{self.log_tail(n)}" for n in self.procs))

    def client(self, *argv: str, check: bool = True, timeout: float = 30.0
               ) -> subprocess.CompletedProcess:
        done = subprocess.run(list(argv), env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr}")
        return done

    def stop(self, timeout: float = 40.0) -> None:
        """Cancel whatever still runs, then stop slurmd, slurmctld and munged (in that order:
        slurmd is slow to stop once the controller is gone), each by its own pid."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                self.client("scancel", "--full", "-u", str(os.getuid()), check=False, timeout=10)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self.client(
                        "squeue", "-h", "-t", "PD,R,CG", check=False, timeout=10).stdout.strip():
                    time.sleep(0.3)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers for tests
    def sbatch_wait(self, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """``sbatch --wait`` (the job's exit code is sbatch's)."""
        return self.client("sbatch", "--wait", *argv, check=False, timeout=timeout)


if __name__ == "__main__":   # a manual check: python tests/slurm_cluster.py
    reason = missing()
    if reason:
        raise SystemExit(reason)
    with SlurmCluster() as cluster:
        out = cluster.root / "job.out"
        done = cluster.sbatch_wait("--gpus=1", "-o", str(out), "--wrap",
                                   "echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES; srun -n1 "
                                   "--gpus=1 sh -c 'echo step CUDA_VISIBLE_DEVICES="
                                   "$CUDA_VISIBLE_DEVICES'")
        print(done.returncode, done.stdout, done.stderr)
        print(out.read_text() if out.exists() else "(no output)")
        print(cluster.client("sinfo", "-N", "-l").stdout)
    shutil.rmtree(cluster.root, ignore_errors=True)
