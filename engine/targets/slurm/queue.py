"""What squeue says of this user's modeldeck jobs, asked once per POLL_S for all of them: by every
supervisor, dashboard and CLI of one modeldeck home together. A snapshot file and a lock beside the
database make the call: whoever finds the snapshot stale takes the lock, calls squeue once, and writes it;
the others wait on the lock and read it. Administrators ban users whose tools poll the controller per job.

`squeue --states=all` also lists jobs that ended a short while ago (the controller keeps them for
MinJobAge, 300 s by default), with their exit code: the one call covers finished jobs too."""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.targets.slurm import commands

POLL_S = 1.0
JOB_PREFIX = "md-"  # every batch job modeldeck submits is named so
# squeue --Format fields, each ended by a "|" (the field's suffix), in QueueEntry's order.
FORMAT = ("JobID", "Name", "State", "Reason", "NodeList", "TimeLeft", "TimeLimit", "StartTime", "exit_code",
          "tres-per-node", "RestartCnt")


@dataclass
class QueueEntry:
    job_id: str
    name: str
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, TIMEOUT, …
    reason: str  # why it waits (or why it ended)
    nodes: str
    time_left: str  # "1:58:02", "UNLIMITED", "INVALID"
    time_limit: str
    start_time: str
    exit_code: str  # the raw wait status
    gres: str
    restarts: str  # how often SLURM requeued it


def parse(out: str) -> dict[str, QueueEntry]:
    entries = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) < len(FORMAT):
            continue
        entry = QueueEntry(*(p.strip() for p in parts[:len(FORMAT)]))
        if entry.name.startswith(JOB_PREFIX):
            entries[entry.job_id] = entry
    return entries


def ask_squeue() -> dict[str, QueueEntry]:
    fmt = ",".join(f"{name}:|" for name in FORMAT)
    return parse(commands.run(["squeue", "--noheader", "--states=all", f"--user={commands.user()}",
                               f"--Format={fmt}"]))


class Queue:
    """The shared snapshot of one modeldeck home (`folder`: where the database is)."""

    def __init__(self, folder: Path, poll_s: float = POLL_S):
        self.file = folder / "slurm-queue.json"
        self.lock = folder / "slurm-queue.lock"
        self.poll_s = poll_s

    def _read(self) -> dict:
        try:
            return json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def jobs(self, newer_than: float = 0.0) -> dict[str, QueueEntry]:
        """Every modeldeck job squeue knows, at most POLL_S old, and asked after `newer_than` (a job
        submitted then is in it). Raises ControllerDown while the controller does not answer (the last
        snapshot is no truth then: followers keep what they knew)."""
        def fresh(snapshot: dict) -> bool:
            return time.time() - snapshot.get("at", 0) < self.poll_s and snapshot.get("at", 0) > newer_than

        def failing(snapshot: dict) -> str | None:  # the last call failed just now: so would this one
            return snapshot.get("error") if time.time() - snapshot.get("failed_at", 0) < self.poll_s else None

        snapshot = self._read()
        if fresh(snapshot):
            return {k: QueueEntry(**v) for k, v in snapshot["jobs"].items()}
        with open(self.lock, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                snapshot = self._read()  # another process may have asked while this one waited
                if fresh(snapshot):
                    return {k: QueueEntry(**v) for k, v in snapshot["jobs"].items()}
                if error := failing(snapshot):  # an outage: those waiting on the lock do not each ask again
                    raise commands.ControllerDown(error)
                asked_at, calls = time.time(), snapshot.get("calls", 0) + 1
                try:
                    found = ask_squeue()
                except commands.ControllerDown as exc:
                    self._write(snapshot | {"calls": calls, "failed_at": time.time(), "error": str(exc)})
                    raise
                self._write({"at": asked_at, "calls": calls, "since": snapshot.get("since", asked_at),
                             "jobs": {k: asdict(v) for k, v in found.items()}})
                return found
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, snapshot: dict) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(snapshot), encoding="utf-8")
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.file)

    def calls(self) -> tuple[int, float]:
        """How many times squeue was called, and since when (for the benchmark's calls per minute)."""
        snapshot = self._read()
        return snapshot.get("calls", 0), snapshot.get("since", time.time())
