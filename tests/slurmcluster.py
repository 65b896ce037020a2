"""A real single-node SLURM cluster for the tests: munged, slurmctld and slurmd from Debian's slurm-wlm and
munge, started as root in a folder of their own and stopped afterwards. The node is this machine, with two
CPUs and two "GPUs" (character devices standing in for them: SLURM schedules them, waits while they are
taken and sets CUDA_VISIBLE_DEVICES, as it does for real ones). No accounting: a cluster without sacct,
as many are. Two partitions on the one node: `debug` (the default) with a 10-minute limit, and `gpu` with
a 2-hour one.

`start(folder)` returns a Cluster, or raises Unavailable with the reason (not root, no SLURM here, a
daemon that does not come up); the tests skip with that reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


class Unavailable(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    folder: Path
    conf: Path
    env: dict[str, str]  # what the SLURM commands need (SLURM_CONF)
    node: str
    bin: str  # where sbatch, squeue and scancel are

    def command(self, *argv: str, check: bool = True) -> str:
        """A SLURM command, found where it was at start (a test may hide SLURM from PATH)."""
        program = shutil.which(argv[0], path=self.bin) or argv[0]
        done = subprocess.run([program, *argv[1:]], capture_output=True, text=True, env=os.environ | self.env,
                              timeout=30)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: {done.stderr.strip()}")
        return done.stdout

    def queue(self) -> list[str]:
        """Job ids in the queue now (pending or running; not those ended)."""
        return self.command("squeue", "--noheader", "--format=%i").split()

    def stop_controller(self) -> None:
        """slurmctld goes away (its jobs run on, on slurmd), as in an outage or a failover."""
        pid = int((self.folder / "run" / "slurmctld.pid").read_text().strip())
        os.kill(pid, 15)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        raise AssertionError("slurmctld did not stop")

    def start_controller(self) -> None:
        """slurmctld again, from its saved state."""
        subprocess.run([shutil.which("slurmctld") or "/usr/sbin/slurmctld"], check=True, env=os.environ | self.env,
                       timeout=30)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            if subprocess.run(["sinfo", "--noheader"], capture_output=True, env=os.environ | self.env).returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError("slurmctld did not come back")

    def stop(self) -> None:
        """Every job cancelled first: with proctrack/linuxproc, a job's processes outlive a stopped slurmd."""
        try:
            if self.command("squeue", "--noheader", "--format=%i", check=False).split():
                self.command("scancel", "--full", f"--user={os.geteuid()}", check=False)
                end = time.monotonic() + 15
                while time.monotonic() < end and self.command("squeue", "--noheader", "--format=%i",
                                                              check=False).split():
                    time.sleep(0.2)
        except subprocess.TimeoutExpired:
            pass  # the controller is gone already: its jobs went with slurmd's stop below, or never ran
        for name in ("slurmd", "slurmctld"):
            pid_file = self.folder / "run" / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), 15)
                except (ValueError, ProcessLookupError):
                    pass
        time.sleep(0.5)
        munge_pid = self.folder / "munge" / "munged.pid"
        if munge_pid.exists():
            try:
                os.kill(int(munge_pid.read_text().strip()), 15)
            except (ValueError, ProcessLookupError):
                pass


def start(folder: Path, memory_mb: int = 8000) -> Cluster:
    if os.geteuid() != 0:
        raise Unavailable("a SLURM cluster for the tests starts as root (slurmd runs jobs as their users)")
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing or shutil.which("sbatch") is None:
        raise Unavailable(f"no SLURM here ({', '.join(missing) or 'sbatch'} missing): apt-get install slurm-wlm munge")
    for sub in ("state", "spool", "log", "munge", "run"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(folder / "munge", 0o700)
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    for i in range(2):
        device = folder / f"fakegpu{i}"
        if not device.exists():
            os.mknod(device, 0o666 | 0o020000, os.makedev(1, 3))  # a character device, as /dev/null
    node = socket.gethostname().split(".")[0]
    socket_path = folder / "munge" / "munge.socket"
    conf = folder / "slurm.conf"
    conf.write_text(f"""ClusterName=modeldeck-tests
SlurmctldHost={node}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={socket_path}
CryptoType=crypto/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
StateSaveLocation={folder / 'state'}
SlurmdSpoolDir={folder / 'spool'}
SlurmctldPidFile={folder / 'run' / 'slurmctld.pid'}
SlurmdPidFile={folder / 'run' / 'slurmd.pid'}
SlurmctldLogFile={folder / 'log' / 'slurmctld.log'}
SlurmdLogFile={folder / 'log' / 'slurmd.log'}
SlurmUser=root
SlurmdUser=root
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
KillWait=5
MessageTimeout=3
MinJobAge=300
DefMemPerCPU=1000
NodeName={node} CPUs=2 RealMemory={memory_mb} Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=10:00 State=UP
PartitionName=gpu Nodes={node} MaxTime=2:00:00 State=UP
""")
    (folder / "gres.conf").write_text(f"AutoDetect=off\nNodeName={node} Name=gpu File={folder}/fakegpu[0-1]\n")
    env = {"SLURM_CONF": str(conf)}
    cluster = Cluster(folder, conf, env, node, os.path.dirname(shutil.which("sbatch")))
    run_env = os.environ | env

    def launch(argv: list[str], what: str) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, env=run_env, timeout=30)
        if done.returncode != 0:
            cluster.stop()
            raise Unavailable(f"{what} did not start: {(done.stderr or done.stdout).strip()[:300]}")

    munged = shutil.which("munged") or "/usr/sbin/munged"
    launch([munged, f"--key-file={key}", f"--socket={socket_path}", f"--pid-file={folder / 'munge' / 'munged.pid'}",
            f"--log-file={folder / 'munge' / 'munged.log'}", f"--seed-file={folder / 'munge' / 'seed'}", "-f"], "munged")
    launch([shutil.which("slurmctld") or "/usr/sbin/slurmctld", "-i"], "slurmctld")
    launch([shutil.which("slurmd") or "/usr/sbin/slurmd"], "slurmd")
    end = time.monotonic() + 20
    while time.monotonic() < end:
        done = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, env=run_env)
        if done.returncode == 0 and "idle" in done.stdout:
            return cluster
        time.sleep(0.2)
    logs = (folder / "log" / "slurmctld.log").read_text(errors="replace")[-500:] if (folder / "log" / "slurmctld.log").exists() else ""
    cluster.stop()
    raise Unavailable(f"the SLURM node did not turn idle within 20 s: {logs}")
