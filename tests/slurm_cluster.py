"""A one-node Slurm cluster started by hand for the tests: munged, slurmctld and slurmd.

No systemd and no cgroups (proctrack/linuxproc, task/none); munge's key, socket and every
daemon's state, PID and log files live under one temporary folder. The only file outside it is
/etc/slurm/slurm.conf: each job step strips SLURM_CONF, so srun inside a job finds the config
only there. A slurm.conf that was there before is put back when the cluster stops.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SLURM_CONF = Path("/etc/slurm/slurm.conf")
PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ("munged", "slurmctld", "slurmd")


def install_packages() -> None:
    """Debian's Slurm (22.05 on bookworm) and munge, when they are not on the machine."""
    if all(shutil.which(tool) for tool in (*DAEMONS, "sbatch", "squeue", "mungekey")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, capture_output=True)
        subprocess.run(cmd, env=env, check=True, capture_output=True)


def _node_resources() -> tuple[int, int]:
    """CPUs and the memory Slurm may hand out (MB): all of it but 2 GB for the system."""
    total_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal:"))
    return os.cpu_count() or 1, max(1000, total_kb // 1024 - 2000)


def slurm_conf(folder: Path, host: str, cpus: int, mem_mb: int) -> str:
    # MinJobAge keeps finished jobs in squeue far longer than the plugin's status-check interval,
    # so that `--slurm-status-command squeue` (no accounting here) sees how each job ended.
    # DefMemPerCPU: a job that gives no --mem would otherwise take the whole node.
    return "\n".join([
        "ClusterName=gemvlab-test",
        f"SlurmctldHost={host}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={folder}/munge.socket",
        f"StateSaveLocation={folder}/state",
        f"SlurmdSpoolDir={folder}/spool",
        f"SlurmctldPidFile={folder}/slurmctld.pid",
        f"SlurmdPidFile={folder}/slurmd.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log",
        f"SlurmdLogFile={folder}/slurmd.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "MinJobAge=600",
        "ReturnToService=2",
        "DefMemPerCPU=1000",
        "MpiDefault=none",
        f"NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
        # The names profiles/slurm/partitions.yaml gives; cpu is where a job without one goes.
        f"PartitionName=cpu Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        f"PartitionName=gpu Nodes={host} Default=NO MaxTime=INFINITE State=UP",
        "",
    ])


class SlurmCluster:
    """Start with start(), always stop(): every daemon it started is killed by its PID file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.host = socket.gethostname().split(".")[0]
        self._saved_conf: str | None = None
        self._pid_files: list[Path] = []

    def start(self) -> None:
        (self.folder / "state").mkdir(parents=True)
        (self.folder / "spool").mkdir()
        key = self.folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._daemon("munged", ["munged", "--force", f"--key-file={key}",
                                f"--socket={self.folder}/munge.socket",
                                f"--pid-file={self.folder}/munged.pid",
                                f"--log-file={self.folder}/munged.log",
                                f"--seed-file={self.folder}/munged.seed"])
        if SLURM_CONF.exists():
            self._saved_conf = SLURM_CONF.read_text()
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text(slurm_conf(self.folder, self.host, *_node_resources()))
        self._daemon("slurmctld", ["slurmctld", "-i"])
        self._daemon("slurmd", ["slurmd"])
        self._wait_until_idle()

    def _daemon(self, name: str, cmd: list[str]) -> None:
        """Start a forking daemon and wait for the PID file it writes."""
        pid_file = self.folder / f"{name}.pid"
        self._pid_files.append(pid_file)
        subprocess.run(cmd, check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 20
        while not (pid_file.exists() and pid_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} wrote no PID file; see {self.folder}/{name}.log")
            time.sleep(0.1)

    def _wait_until_idle(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True,
                                  text=True)
            state = proc.stdout.strip()
            if proc.returncode == 0 and state.startswith("idle"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the node never became idle (sinfo says {state!r}); see "
                           f"{self.folder}/slurmctld.log and slurmd.log")

    def stop(self) -> list[str]:
        """Kill the daemons in reverse order; return the names of any still alive afterwards."""
        alive = []
        for pid_file in reversed(self._pid_files):
            if not pid_file.exists():
                continue
            pid = int(pid_file.read_text().strip())
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 15
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
                alive.append(pid_file.stem)
        if self._saved_conf is not None:
            SLURM_CONF.write_text(self._saved_conf)
        else:
            SLURM_CONF.unlink(missing_ok=True)
        return alive


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed daemon we started stays a zombie until reaped; it no longer runs.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"
