"""One modeldeck job's batch job, followed from the login node by its supervisor.

Everything needed to follow it is on the cluster and in its folder of the shared work directory, never
only in the supervisor: `attempt-N.json` holds the batch job's id once it is submitted (a new supervisor,
after the last was killed, finds it there), SLURM's own output file holds the run's log and its events,
and the queue says the rest (queue.py: one squeue call for every follower). A job the controller no longer
remembers is asked of accounting (sacct) where the cluster keeps it, else read from the job's own files.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from engine.jobs.harness import JobContext, JobFailure
from engine.targets.outage import Outage
from engine.targets.slurm import commands
from engine.targets.slurm.queue import Queue, QueueEntry
from engine.targets.slurm.resources import format_time, parse_time
from engine.targets.slurm.states import ENDED, RUNNING, WAITING, Ending, ending, pending_words

POLL_S = 1.0
# Not passed on to a batch job: this machine's own job tag and GPU choice (SLURM gives the job its GPUs).
NOT_EXPORTED = ("MODELDECK_JOB", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")


@dataclass
class Observed:
    """A batch job as its follower sees it now."""

    state: str  # pending | running | ended
    words: str = ""  # why it waits, in words
    node: str = ""
    ending: Ending | None = None
    time_left_s: int | None = None  # before its time limit; None: no limit, or not running
    raw_state: str = ""


class BatchJob:
    def __init__(self, ctx: JobContext, run_dir: Path, attempt: int, wants_gpus: bool):
        self.ctx, self.run_dir, self.attempt, self.wants_gpus = ctx, run_dir, attempt, wants_gpus
        self.queue = Queue(ctx.db.path.parent)
        self.attempt_file = run_dir / f"attempt-{attempt}.json"
        self.job_id: str | None = None
        self.submitted_at = 0.0
        self.ended = False  # seen ended: nothing left to cancel
        if self.attempt_file.exists():
            told = json.loads(self.attempt_file.read_text(encoding="utf-8"))
            self.job_id, self.submitted_at = told.get("job_id"), told.get("submitted_at", 0.0)
        self.read_to = ctx.metrics.get("log_read_to", 0) if ctx.reattached else 0
        self.outage = Outage()

    @property
    def log_file(self) -> Path:
        return self.run_dir / f"slurm-{self.job_id}.log"

    def submit(self, script_text: str, env: dict[str, str]) -> str:
        """sbatch the script (written beside its output, readable by its owner only); the batch job's id is
        kept in the run's folder before anything else happens."""
        script_file = self.run_dir / f"attempt-{self.attempt}.sh"
        script_file.write_text(script_text, encoding="utf-8")
        os.chmod(script_file, 0o700)
        # A supervisor killed between sbatch and the line below left a batch job nobody knows the id of: it is
        # the one of this run's name still queued or running (an earlier attempt's has ended).
        lost = next((e.job_id for e in self.queue.jobs().values()
                     if e.name == self.run_dir.name and e.state not in ENDED), None)
        environment = {k: v for k, v in os.environ.items() if k not in NOT_EXPORTED} | env
        self.job_id = lost or commands.submit(script_file, environment)
        self.submitted_at = time.time()
        tmp = self.attempt_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"job_id": self.job_id, "submitted_at": self.submitted_at}), encoding="utf-8")
        os.replace(tmp, self.attempt_file)
        self.ctx.log(f"submitted batch job {self.job_id} ({script_file})")
        self.ctx.report(metrics={"slurm_job": self.job_id})
        return self.job_id

    def observe(self) -> Observed:
        """Its state now; raises ControllerDown while the controller does not answer."""
        entry = self.queue.jobs(newer_than=self.submitted_at).get(self.job_id)
        if entry is None or entry.state in ENDED:
            self.ended = True
        if entry is None:
            return self._forgotten()
        if entry.state in WAITING:
            return Observed("pending", pending_words(entry.reason, self.wants_gpus), raw_state=entry.state)
        if entry.state in RUNNING:
            return Observed("running", node=entry.nodes, time_left_s=_seconds(entry.time_left), raw_state=entry.state)
        if entry.state in ENDED:
            limit = _seconds(entry.time_limit)
            return Observed("ended", node=entry.nodes, raw_state=entry.state,
                            ending=ending(entry.state, entry.exit_code, format_time(limit) if limit else None))
        return Observed("pending", entry.state.lower(), raw_state=entry.state)

    def watch(self) -> Observed | None:
        """Its state now, or None while the controller does not answer: the work goes on on the cluster
        meanwhile, so a passing outage is waited out (the follower keeps what it knew); one that lasts fails."""
        try:
            now = self.observe()
        except commands.ControllerDown as exc:
            if self.outage.lasted_too_long():
                raise JobFailure(str(exc)) from None
            self.ctx.log(f"{exc}; trying again")
            return None
        self.outage.over()
        return now

    def _forgotten(self) -> Observed:
        """Gone from the controller's memory (it ended more than MinJobAge ago, while no supervisor
        followed it): accounting says how it ended, where the cluster keeps it; else its own log does."""
        if (found := commands.accounted_end(self.job_id)) is not None:
            state, code = found
            return Observed("ended", ending=ending(state, code), raw_state=state)
        return Observed("ended", ending=Ending(False, "its batch job ended while no supervisor followed it, and the "
                                                      "cluster keeps no accounting: its log tells what it could"))

    def new_lines(self) -> list[str]:
        """The lines its output file gained since the last read (whole lines only)."""
        try:
            with self.log_file.open("rb") as f:
                f.seek(self.read_to)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1
        self.read_to += end
        self.ctx.metrics["log_read_to"] = self.read_to  # kept with the job's next report: a new supervisor goes on
        return chunk[:end].decode("utf-8", errors="replace").splitlines()

    def cancel(self) -> None:
        if self.job_id:
            try:
                commands.cancel(self.job_id)
            except commands.SlurmError as exc:
                self.ctx.log(f"scancel {self.job_id}: {exc}")

    def end(self, deadline_s: float) -> None:
        """Cancel the batch job and wait, up to `deadline_s`, until it has left its node."""
        if not self.job_id or self.ended:
            return
        self.cancel()
        stop = time.monotonic() + deadline_s
        while time.monotonic() < stop:
            try:
                entry: QueueEntry | None = self.queue.jobs().get(self.job_id)
            except commands.SlurmError:
                entry = None
            if entry is None or entry.state in ENDED:
                self.ctx.log(f"batch job {self.job_id} ended ({entry.state if entry else 'gone from the queue'})")
                return
            time.sleep(POLL_S)
        self.ctx.log(f"batch job {self.job_id} was still leaving its node after {deadline_s:.0f} s")


def _seconds(text: str) -> int | None:
    try:
        return parse_time(text)
    except ValueError:
        return None  # INVALID, NOT_SET
