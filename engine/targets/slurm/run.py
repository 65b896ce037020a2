"""One modeldeck job's batch job, followed from the login node by its supervisor.

Everything needed to follow it is on the cluster and in its folder of the shared work directory, never
only in the supervisor: `attempt-N.json` holds the batch job's id once it is submitted (a new supervisor,
after the last was killed, finds it there), SLURM's own output file holds the run's log and its events,
and the queue says the rest (queue.py: one squeue call for every follower). A job the controller no longer
remembers is asked of accounting (sacct) where the cluster keeps it, else read from the job's own files.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from contextlib import contextmanager
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
READ_AT_MOST = 1 << 20  # of a run's output file at each read (a long one is read over several polls)
REQUEUE_GRACE_S = 30.0  # a preempted job, or one whose node failed, may be requeued: not ended before this


def attempts(run_dir: Path) -> list[str]:
    """The ids of every batch job a run's folder says it submitted."""
    found = []
    for attempt in sorted(run_dir.glob("attempt-*.json")):
        try:
            found.append(str(json.loads(attempt.read_text(encoding="utf-8"))["job_id"]))
        except (OSError, ValueError, KeyError):
            continue
    return found


def cancel_all(run_dir: Path) -> list[str]:
    """scancel every batch job of a run (those ended already say so, harmlessly); the ids asked."""
    asked = attempts(run_dir)
    for job_id in asked:
        try:
            commands.cancel(job_id)
        except commands.SlurmError:
            pass  # ended already, or the controller is away: its time limit ends it
    return asked


@dataclass
class Observed:
    """A batch job as its follower sees it now; `phase` is how a deployment or a run reads meanwhile."""

    state: str  # pending | running | ended
    words: str = ""  # why it waits, in words
    node: str = ""
    ending: Ending | None = None
    time_left_s: int | None = None  # before its time limit; None: no limit, or not running
    raw_state: str = ""
    restarts: int = 0  # how often SLURM requeued it (SLURM_RESTART_COUNT in the job)
    job_id: str = ""

    @property
    def queued(self) -> str:
        """Why it waits, and which batch job it is (squeue's numbers are not modeldeck's)."""
        return f"{self.words} (batch job {self.job_id})"

    @property
    def starting(self) -> str:
        return f"starting on {self.node} (batch job {self.job_id})"


class BatchJob:
    def __init__(self, ctx: JobContext, run_dir: Path, attempt: int, wants_gpus: bool):
        self.ctx, self.run_dir, self.attempt, self.wants_gpus = ctx, run_dir, attempt, wants_gpus
        self.queue = Queue(ctx.db.path.parent)
        self.attempt_file = run_dir / f"attempt-{attempt}.json"
        self.job_id: str | None = None
        self.submitted_at = 0.0
        self.ended = False  # seen ended: nothing left to cancel
        self.ending_since: float | None = None  # when it was first seen preempted or its node failed
        if self.attempt_file.exists():
            told = json.loads(self.attempt_file.read_text(encoding="utf-8"))
            self.job_id, self.submitted_at = told.get("job_id"), told.get("submitted_at", 0.0)
        ctx.report(metrics={"slurm_run": str(run_dir)})  # where a reconciler finds its batch jobs, whatever comes
        self.read_to = 0  # how far its output file was read by this supervisor...
        self.told_to = ctx.metrics.get("log_told_to", 0) if ctx.reattached else 0  # ...and copied to the job's log
        self.outage = Outage()

    @property
    def log_file(self) -> Path:
        return self.run_dir / f"slurm-{self.job_id}.log"

    def submit(self, script_text: str, env: dict[str, str]) -> str:
        """sbatch the script (written beside its output, readable by its owner only); the batch job's id is
        kept in the run's folder before anything else happens. One supervisor at a time submits for a run (a
        lock in its folder), and a stop (SIGTERM) waits until the id is kept: no batch job is ever left that
        nobody knows of."""
        script_file = self.run_dir / f"attempt-{self.attempt}.sh"
        script_file.write_text(script_text, encoding="utf-8")
        os.chmod(script_file, 0o700)
        with self.submitting():
            if self.attempt_file.exists():  # another supervisor of this run submitted while this one waited
                self.job_id = json.loads(self.attempt_file.read_text(encoding="utf-8"))["job_id"]
            else:
                self.job_id = self.lost() or commands.submit(script_file, self.environment(env))
                self.submitted_at = time.time()
                tmp = self.attempt_file.with_suffix(".tmp")
                tmp.write_text(json.dumps({"job_id": self.job_id, "submitted_at": self.submitted_at}),
                               encoding="utf-8")
                os.replace(tmp, self.attempt_file)
        self.ctx.log(f"submitted batch job {self.job_id} ({script_file})")
        self.ctx.report(metrics={"slurm_job": self.job_id})
        return self.job_id

    @contextmanager
    def submitting(self):
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # a stop comes after, not during
        try:
            with open(self.run_dir / "submit.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def lost(self) -> str | None:
        """A batch job of this run's name still queued or running, which nobody knows the id of (its
        supervisor was killed between sbatch and keeping the id; an earlier attempt's has ended)."""
        return next((e.job_id for e in self.queue.jobs(newer_than=time.time()).values()
                     if e.name == self.run_dir.name and e.state not in ENDED), None)

    @staticmethod
    def environment(env: dict[str, str]) -> dict[str, str]:
        """What sbatch runs with: this one's, less what is this machine's own (its job tag, its GPUs) and the
        user's SBATCH_* settings, which would override the script's own options (its output, its export of
        this very environment, which carries the API key)."""
        return {k: v for k, v in os.environ.items() if k not in NOT_EXPORTED and not k.startswith("SBATCH_")} | env

    def observe(self) -> Observed:
        """Its state now; raises ControllerDown while the controller does not answer."""
        entry = self.queue.jobs(newer_than=self.submitted_at).get(self.job_id)
        if entry is None or entry.state in ENDED:
            self.ended = True
        if entry is None:
            return self._forgotten()
        if entry.state in WAITING:
            return Observed("pending", pending_words(entry.reason, self.wants_gpus), raw_state=entry.state,
                            restarts=_count(entry.restarts), job_id=self.job_id)
        if entry.state in RUNNING:
            return Observed("running", node=entry.nodes, time_left_s=_seconds(entry.time_left), raw_state=entry.state,
                            restarts=_count(entry.restarts), job_id=self.job_id)
        if entry.state in ("PREEMPTED", "NODE_FAIL"):  # requeued, if it asked to be: not over yet, for a while
            self.ending_since = self.ending_since or time.monotonic()
            if time.monotonic() - self.ending_since < REQUEUE_GRACE_S:
                self.ended = False
                return Observed("pending", f"{entry.state.lower().replace('_', ' ')}: waiting to be requeued",
                                raw_state=entry.state, job_id=self.job_id)
        self.ending_since = None
        if entry.state in ENDED:
            limit = _seconds(entry.time_limit)
            return Observed("ended", node=entry.nodes, raw_state=entry.state,
                            ending=ending(entry.state, entry.exit_code, format_time(limit) if limit else None))
        return Observed("pending", entry.state.lower(), raw_state=entry.state, job_id=self.job_id)

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

    def new_lines(self) -> list[tuple[str, bool]]:
        """The lines its output file gained since the last read (whole lines only), each with whether it is
        new to the job's log. A new supervisor reads the file from its start again, so that no event is lost
        with the last one (it may have read the run's last word, and died before acting on it); what the last
        one copied to the job's log is not copied again."""
        try:
            with self.log_file.open("rb") as f:
                f.seek(self.read_to)
                chunk = f.read(READ_AT_MOST)
        except FileNotFoundError:
            return []
        lines, offset = [], self.read_to
        for raw in chunk.split(b"\n")[:-1]:  # what follows the last newline is written half yet
            offset += len(raw) + 1
            text = raw.decode("utf-8", errors="replace").rsplit("\r", 1)[-1]  # a progress bar redrawn: its last state
            lines.append((text, offset > self.told_to))
        self.read_to = offset
        self.told_to = max(self.told_to, offset)
        self.ctx.metrics["log_told_to"] = self.told_to  # kept with the job's next report
        return lines

    def end(self, deadline_s: float) -> None:
        """Cancel the batch job and wait, up to `deadline_s`, until it has left its node; scancel is asked
        again while the controller does not take it (an outage)."""
        if self.job_id is None:
            try:  # a stop while sbatch ran: the job, if there is one, goes by this run's name
                self.job_id = self.lost()
            except commands.SlurmError:
                pass
        if self.job_id is None or self.ended:
            return
        stop, cancelled = time.monotonic() + deadline_s, False
        while time.monotonic() < stop:
            try:
                if not cancelled:
                    commands.cancel(self.job_id)
                    cancelled = True
                entry: QueueEntry | None = self.queue.jobs().get(self.job_id)
            except commands.SlurmError as exc:
                self.ctx.log(f"cancelling batch job {self.job_id}: {exc}; trying again")
                time.sleep(POLL_S)
                continue
            if entry is None or entry.state in ENDED:
                self.ctx.log(f"batch job {self.job_id} ended ({entry.state if entry else 'gone from the queue'})")
                self.ended = True
                return
            time.sleep(POLL_S)
        self.ctx.log(f"batch job {self.job_id} was still {'leaving its node' if cancelled else 'not cancelled'} "
                     f"after {deadline_s:.0f} s")


def _count(text: str) -> int:
    return int(text) if text.isdigit() else 0


def _seconds(text: str) -> int | None:
    try:
        return parse_time(text)
    except ValueError:
        return None  # INVALID, NOT_SET
