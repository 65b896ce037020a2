"""SLURM through its own commands, as a user on the login node runs them: sinfo/scontrol for what the
cluster offers, sbatch to submit (and --test-only to check a request the way the controller will), squeue
for the queue, scancel, and sacct where the cluster keeps accounting. Every failure is one line: no SLURM
here, the controller unreachable (a passing outage, which followers wait out), or what SLURM refused."""

from __future__ import annotations

import getpass
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from catalog.settings import current as current_settings
from engine.errors import EngineError
from engine.targets.slurm.resources import gres_gpus, parse_time

TIMEOUT_S = 30.0  # a controller that does not answer within this is down, for now
CACHE_S = 30.0  # what the cluster offers (partitions, nodes) changes slowly: asked at most this often
# What the commands print when the controller cannot be reached (slurm_load_*, sbatch, squeue, scancel).
_UNREACHABLE = re.compile(r"unable to contact slurm controller|socket timed out|connection refused|"
                          r"communication connection failure|slurm_receive_msg|zero bytes were transmitted", re.I)


class SlurmError(EngineError):
    """A SLURM command failed; its message is the one line to show."""


class ControllerDown(SlurmError):
    """slurmctld does not answer: a passing outage, until it lasts."""


class NotConfigured(SlurmError):
    """SLURM's commands are here, but no cluster is configured for them (no slurm.conf, no configless DNS)."""


def available() -> bool:
    """SLURM is a target where its client commands are on PATH (a login node, or a node of the cluster),
    unless MODELDECK_SLURM=off."""
    if not current_settings().slurm_enabled:
        return False
    return shutil.which("sbatch") is not None


def run(argv: list[str], env: dict[str, str] | None = None, timeout: float = TIMEOUT_S) -> str:
    """A SLURM command's standard output; raises SlurmError (ControllerDown when the controller is away)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]} is not on PATH: SLURM's client commands are needed (on the cluster's login "
                         "node)") from None
    except subprocess.TimeoutExpired:
        raise ControllerDown(f"{argv[0]} did not answer within {timeout:.0f} s (is slurmctld up?)") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        said = next((line for line in reversed(lines) if ": fatal: " in line), lines[-1] if lines else "")
        said = re.sub(r"^[\w.-]+: (error|fatal): ", "", said)[:400] or f"exit code {done.returncode}"
        whole = " ".join(lines)
        if _UNREACHABLE.search(whole):
            raise ControllerDown(f"the SLURM controller cannot be reached ({said})")
        if "configuration source" in whole or "Unable to process configuration file" in whole:
            raise NotConfigured(f"SLURM's commands are here, but no cluster is configured for them ({said})")
        raise SlurmError(f"{os.path.basename(argv[0])}: {said}")
    return done.stdout


def fields(line: str) -> dict[str, str]:
    """`scontrol show … --oneliner`'s Key=Value pairs (a value may hold spaces: it runs to the next Key=)."""
    found: dict[str, str] = {}
    for match in re.finditer(r"(?:^|\s)([A-Za-z][\w/:.]*)=(.*?)(?=\s+[A-Za-z][\w/:.]*=|\s*$)", line.strip()):
        found[match.group(1)] = match.group(2)
    return found


@dataclass
class Node:
    name: str
    cpus: int
    memory_mb: int
    gpus: int
    state: str


@dataclass
class Partition:
    name: str
    up: bool
    default: bool
    max_time_s: int | None  # None: no limit
    nodes: list[Node] = field(default_factory=list)

    @property
    def max_gpus(self) -> int:
        """The most GPUs one job can get on one node of it."""
        return max((n.gpus for n in self.nodes), default=0)

    @property
    def max_cpus(self) -> int:
        return max((n.cpus for n in self.nodes), default=0)

    @property
    def max_memory_mb(self) -> int:
        return max((n.memory_mb for n in self.nodes), default=0)

    def describe(self) -> str:
        """"4 nodes · 16 GPUs · 2 h" (its time limit), short enough for a dialog's field."""
        gpus = sum(n.gpus for n in self.nodes)
        limit = "no limit" if self.max_time_s is None else _short_time(self.max_time_s)
        return (f"{len(self.nodes)} node{'s' if len(self.nodes) != 1 else ''} · {gpus} GPU{'s' if gpus != 1 else ''}"
                f" · {limit}" + (" · default" if self.default else "") + ("" if self.up else " · DOWN"))


def _short_time(seconds: int) -> str:
    if seconds % 86400 == 0:
        return f"{seconds // 86400} day{'s' if seconds != 86400 else ''}"
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    return f"{seconds // 60} min"


def partitions() -> dict[str, Partition]:
    """The cluster's partitions with their nodes: CPUs, memory, GPUs (two scontrol calls)."""
    found: dict[str, Partition] = {}
    for line in run(["scontrol", "show", "partition", "--oneliner"]).splitlines():
        f = fields(line)
        if "PartitionName" not in f:
            continue
        try:
            limit = parse_time(f.get("MaxTime", "UNLIMITED"))
        except ValueError:
            limit = None
        found[f["PartitionName"]] = Partition(f["PartitionName"], f.get("State", "UP") == "UP",
                                              f.get("Default", "NO") == "YES", limit)
    for line in run(["scontrol", "show", "node", "--oneliner"]).splitlines():
        f = fields(line)
        if "NodeName" not in f:
            continue
        node = Node(f["NodeName"], _int(f.get("CPUTot")), _int(f.get("RealMemory")), gres_gpus(f.get("Gres", "")),
                    f.get("State", "?"))
        for name in f.get("Partitions", "").split(","):
            if name in found:
                found[name].nodes.append(node)
    return found


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


_cache: dict[str, tuple[float, object]] = {}


def cached(key: str, ask):
    """What `ask()` answered less than CACHE_S ago (a dialog replans as the user types: the controller is
    asked once, not at every keystroke)."""
    stamp, value = _cache.get(key, (0.0, None))
    if time.monotonic() - stamp < CACHE_S:
        return value
    value = ask()
    _cache[key] = (time.monotonic(), value)
    return value


def cached_partitions() -> dict[str, Partition]:
    return cached("partitions", partitions)


def submit(script_file: Path, env: dict[str, str]) -> str:
    """sbatch a script file; its job id."""
    out = run(["sbatch", "--parsable", str(script_file)], env=env)
    return out.strip().split(";")[0]


def test_only(script_text: str, folder: Path) -> str:
    """What `sbatch --test-only` says of a script: the controller's own check of every option (partition,
    account, QoS, time limit, resources), submitting nothing. Raises SlurmError with SLURM's refusal."""
    def ask() -> str:
        with tempfile.NamedTemporaryFile("w", suffix=".sh", dir=folder, prefix=".md-check-", delete=False) as f:
            f.write(script_text)
        try:
            run(["sbatch", "--test-only", f.name])  # it answers on stderr, even when it accepts
        except SlurmError as exc:
            if isinstance(exc, ControllerDown):
                raise
            said = str(exc).removeprefix("sbatch: ").removeprefix("Batch job submission failed: ")
            raise SlurmError(f"SLURM refuses the batch job: {said}") from None
        finally:
            os.unlink(f.name)
        return "accepted"

    return cached("test-only:" + "".join(line for line in script_text.splitlines() if line.startswith("#SBATCH")), ask)


def cancel(job_id: str, signal: str | None = None) -> None:
    argv = ["scancel"] + ([f"--signal={signal}", "--batch"] if signal else []) + [job_id]
    run(argv)


def user() -> str:
    return getpass.getuser()


def accounted_end(job_id: str) -> tuple[str, str] | None:
    """A finished job's (state, exit code) from accounting, once the controller has forgotten it."""
    try:
        out = run(["sacct", "--noheader", "--parsable2", "--jobs", job_id, "--format=JobID,State,ExitCode"], timeout=10)
    except SlurmError:
        return None
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) >= 3 and parts[0] == job_id:
            return parts[1].split()[0], parts[2]
    return None
