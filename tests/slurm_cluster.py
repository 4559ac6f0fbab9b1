"""A real one-node SLURM cluster of this machine, for tests: munged, slurmctld and slurmd started from a
generated munge key and slurm.conf in a temporary folder, and stopped by their pids at the end.

The node is this machine (its hostname, and its CPUs as `slurmd -C` counts them); its one partition is
the default. Processes are tracked by parentage (proctrack/linuxproc) and given no cgroups or affinity
(task/none), so nothing outside the folder is needed but root, which slurmd needs to start jobs. A
machine without the Debian packages `slurm-wlm` and `munge`, or not root, skips the tests that use
it, with the reason in one line.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")
PARTITION = "tests"


def missing() -> Optional[str]:
    """Why a one-node cluster cannot start here, or None."""
    absent = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name, path=_path()) is None]
    if absent:
        return f"SLURM is not installed here ({', '.join(absent)} not found; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the one-node SLURM cluster needs root (slurmd starts jobs as their user)"
    return None


def _path() -> str:
    return os.environ.get("PATH", "") + ":/usr/sbin:/sbin"  # the daemons live in sbin


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    folder: Path
    conf: Path
    node: str
    partition: str = PARTITION

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM client (scontrol, squeue, scancel, ...) against this cluster."""
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(args)}: exit status {done.returncode}: {done.stderr.strip()}")
        return done

    def logs(self) -> str:
        """The daemons' logs, for a failing test's message."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.folder.glob("*.log")))


def _conf(folder: Path, munge_socket: Path) -> tuple[str, str]:
    """(slurm.conf text, node name)."""
    hardware = subprocess.run([shutil.which("slurmd", path=_path()), "-C"], capture_output=True, text=True,
                              check=True).stdout.splitlines()[0]
    node = hardware.split()[0].split("=", 1)[1]
    lines = [
        "ClusterName=powergradtests",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/builtin",
        "SchedulerParameters=batch_sched_delay=0",  # (a batch job starts at once, not up to 3 s later)
        "SwitchType=switch/none",
        "MpiDefault=none",
        "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "ReturnToService=2",
        "JobRequeue=1",
        "MessageTimeout=5",
        "KillWait=30",  # (SLURM's default: a preempted run's time to write its checkpoint)
        "InactiveLimit=0",
        "MinJobAge=300",
        f"{hardware} NodeAddr=127.0.0.1 State=UNKNOWN",
        # Up to 4 jobs share a core: a test's jobs run at once, however few cores this machine has.
        f"PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
    ]
    return "\n".join(lines) + "\n", node


@contextlib.contextmanager
def one_node_cluster(folder: Path):
    """munged, slurmctld and slurmd of a cluster whose files all lie in `folder`; stopped on leaving."""
    for name in ("state", "spool", "munge"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    os.chmod(folder / "munge", 0o700)
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    munge_socket = folder / "munge" / "munge.socket"
    text, node = _conf(folder, munge_socket)
    conf = folder / "slurm.conf"
    conf.write_text(text)
    cluster = Cluster(folder, conf, node)
    sbin = {name: shutil.which(name, path=_path()) for name in DAEMONS}
    commands = [
        [sbin["munged"], "--foreground", "--force", f"--key-file={key}", f"--socket={munge_socket}",
         f"--pid-file={folder / 'munge' / 'munged.pid'}", f"--seed-file={folder / 'munge' / 'munged.seed'}",
         f"--log-file={folder / 'munged.log'}"],
        [sbin["slurmctld"], "-D", "-i", "-f", str(conf)],
        [sbin["slurmd"], "-D", "-f", str(conf)],
    ]
    started = []
    try:
        for command in commands:
            started.append(subprocess.Popen(command, env=cluster.env, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True))
            if command[0] == sbin["munged"]:
                _wait(lambda: munge_socket.exists(), started, cluster, "munged's socket")
        _wait(lambda: cluster.run("sinfo", "-h", "-n", node, "-o", "%T", check=False).stdout.strip() == "idle",
              started, cluster, f"node {node} idle")
        yield cluster
    finally:
        if len(started) == len(commands) and started[1].poll() is None:
            _cancel_every_job(cluster)
        for process in reversed(started):
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        _end_what_the_cluster_left(cluster)


def _cancel_every_job(cluster: Cluster, timeout: float = 60) -> None:
    """Jobs end while their daemons still run (a job step outlives a stopped slurmd)."""
    cluster.run("scancel", f"--user={pwd.getpwuid(os.geteuid()).pw_name}", check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if set(cluster.run("squeue", "-h", "-t", "all", "-o", "%T", check=False).stdout.split()) <= ENDED:
            return
        time.sleep(0.2)


ENDED = {"CANCELLED", "COMPLETED", "FAILED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
         "OUT_OF_MEMORY"}


def _end_what_the_cluster_left(cluster: Cluster) -> None:
    """Kill any process that still runs with this cluster's SLURM_CONF in its environment (a job step's
    slurmstepd and tasks, had a job not ended): they were all started by this cluster's daemons."""
    mark = f"SLURM_CONF={cluster.conf}".encode() + b"\0"
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if mark in f.read() + b"\0":
                    os.kill(int(entry), signal.SIGKILL)
        except OSError:  # gone meanwhile, or not ours to read
            continue


def _wait(ready, started: list, cluster: Cluster, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        ended = [p.args[0] for p in started if p.poll() is not None]
        if ended or time.monotonic() > deadline:
            raise RuntimeError(f"the one-node SLURM cluster did not start ({what}: "
                               f"{', '.join(ended) + ' ended' if ended else 'not ready'})\n{cluster.logs()}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node cluster; SLURM_CONF points the clients (sbatch, squeue, ...) at it."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    with one_node_cluster(tmp_path_factory.mktemp("slurm")) as cluster, pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(cluster.conf))
        yield cluster
