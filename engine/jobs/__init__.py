"""Job lifecycle: create, spawn as a detached process, guarded state transitions, reconcile, cancel.

A job is a separate OS process (`python -m engine.jobs.<kind> DB JOB_ID`) in its own session, writing
to its own log file, so it survives the dashboard closing or an SSH connection dropping. Whoever reads
the database reconciles: a job that is not finished and whose process is gone becomes failed (or
cancelled, if that was asked), with the last lines of its log. No daemon is needed.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from sqlmodel import Session, select

from catalog import Database
from catalog.schema import (
    Deployment,
    DeploymentState,
    Job,
    JobKind,
    JobState,
    now,
)
from catalog.states import LIVE_DEPLOYMENT_STATES
from engine.errors import EngineError
from engine.events import record
from engine.lifecycle import fail_model, move_job, settle_deployment
from engine.logs import tail_reason

STOP_DEADLINE_S = 5.0
KILL_WAIT_S = 5.0  # a killed process is gone in well under this
NEVER_STARTED_S = 30.0  # a queued job whose process never reported after this long has failed
SILENT_HOST_S = 60.0  # a job's process on another host is gone once its heartbeat is this old
HERE = socket.gethostname()
REATTACH_LIMIT = 5  # a job's work on a target is re-attached at most this often (a supervisor that keeps dying)
LOG_TAIL_LINES = 8
_ENTRY_POINTS = {JobKind.DOWNLOAD: "engine.jobs.download", JobKind.IMPORT: "engine.jobs.importer",
                 JobKind.FINETUNE: "engine.jobs.finetune", JobKind.MERGE: "engine.jobs.merge",
                 JobKind.SERVE: "engine.jobs.serve", JobKind.EVALUATE: "engine.jobs.evaluate"}

# Processes this process spawned: polling them reaps zombies and gives us their exit codes.
_children: dict[int, subprocess.Popen] = {}

# Each job process runs under a shell that outlives it and writes how it ended as the log's last line: a
# job killed outright (SIGKILL, the out-of-memory killer) cannot say so itself, and a dashboard or CLI that
# did not start it has no exit status to read. The shell survives the cancel's SIGTERM (a trap, which
# its child does not inherit) to report the end. Its status (when not 0): the job's code, or 128 + the
# signal's number.
_KEEPER = ('trap : TERM HUP USR1 USR2; "$@" & child=$!; '
           'while :; do wait "$child"; code=$?; kill -0 "$child" 2>/dev/null || break; done; '
           '[ "$code" = 0 ] || echo "$(date +%H:%M:%S) the job process ended with status $code"; exit "$code"')
_ENDED = re.compile(r"the job process ended with status (\d+)$")


class JobCancelled(Exception):
    """Raised in a job process that stops because it was asked to; the job ends Cancelled."""


def logs_dir(db: Database) -> Path:
    """Where jobs write their logs: the user's alone (a server's log can quote what its clients sent)."""
    path = db.path.parent / "logs"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def create(session: Session, kind: JobKind, title: str, model_id: int | None, **params: Any) -> Job:
    job = Job(kind=kind, title=title, model_id=model_id, params_json=Job.dumps(params))
    session.add(job)
    session.flush()
    record(session, f"job:{job.id}", "created", title, model_id=model_id)
    return job


def child_env() -> dict[str, str]:
    """The environment of a `python -m engine...` child: it imports this very tree, unbuffered."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


JOB_TAG = "MODELDECK_JOB"  # in the environment of a job and its children: which database, which job


def job_tag(db: Database, job_id: int) -> str:
    return f"{db.path}#{job_id}"


def kill_leftovers(tag: str) -> None:
    """SIGKILL what a dead job left running (a server it supervised): the processes that carry its tag,
    which names the database and the job, so no other process can have it (a pid or a process group's
    number can be reused once empty)."""
    for process in psutil.process_iter():
        try:
            if process.environ().get(JOB_TAG) == tag:
                process.kill()
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue  # gone meanwhile, or not ours to read


def spawn(db: Database, job: Job) -> None:
    """Start the job's process, detached in a new session, its output going to the job's log."""
    log_path = logs_dir(db) / f"job-{job.id}-{job.kind.value}.log"
    from engine import targets

    env = child_env() | {JOB_TAG: job_tag(db, job.id)}  # inherited by everything the job starts
    env |= targets.of_job(job).job_env(job)  # the GPUs chosen for it, say
    with open(log_path, "ab", opener=lambda path, flags: os.open(path, flags, 0o600)) as log:
        process = subprocess.Popen(
            ["/bin/sh", "-c", _KEEPER, "modeldeck-job", sys.executable, "-m", _ENTRY_POINTS[job.kind], str(db.path),
             str(job.id)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env=env, cwd=db.path.parent,
        )
    _children[job.id] = process
    with db.write() as session:
        row = session.get(Job, job.id)
        row.pid, row.pid_started_at, row.host = process.pid, _create_time(process.pid), HERE
        row.log_path = str(log_path)
        session.add(row)


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def supervised(job: Job) -> bool:
    """Whether the job's process is there: on this host, by its pid; on another (a login node sharing this
    MODELDECK_HOME), by its heartbeat, the only sign of it this host can see."""
    if job.host and job.host != HERE:
        return job.heartbeat_at is not None and now() - job.heartbeat_at < SILENT_HOST_S
    return process_alive(job.pid, job.pid_started_at)


def same_start(started: float, expected: float | None) -> bool:
    """Whether a process that started at `started` is the one recorded as starting at `expected` (None: not
    recorded); a reused pid has another start time."""
    return expected is None or abs(started - expected) <= 1.0


def process_alive(pid: int | None, started_at: float | None) -> bool:
    """True if `pid` is still the process we started (same create time) and not a zombie."""
    if pid is None:
        return False
    try:
        process = psutil.Process(pid)
        if not same_start(process.create_time(), started_at):
            return False  # the pid was reused by another process
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def get(db: Database, job_id: int) -> Job:
    with db.read() as session:
        job = session.get(Job, job_id)
    if job is None:
        raise EngineError(f"no job {job_id} (see `modeldeck jobs`)")
    return job


def latest_for_model(db: Database, model_id: int, kind: JobKind | None = None) -> Job | None:
    """The model's most recent job (of a kind: its fine-tune, not an evaluation since), if any ever ran for it."""
    with db.read() as session:
        query = select(Job).where(Job.model_id == model_id)
        if kind is not None:
            query = query.where(Job.kind == kind)
        return session.exec(query.order_by(Job.id.desc())).first()


def log_tail(path: str | None, lines: int = LOG_TAIL_LINES) -> list[str]:
    if not path:
        return []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n") for line in deque(f, maxlen=lines)]
    except OSError:
        return []


def _keeper_status(tail: list[str]) -> int | None:
    """The status the keeper wrote, if it is the log's last line (an older one, before a re-attach, is not)."""
    lines = [line.strip() for line in tail if line.strip()]
    match = _ENDED.search(lines[-1]) if lines else None
    return int(match.group(1)) if match else None


def _exit_description(job: Job, tail: list[str]) -> str:
    child = _children.pop(job.id, None)
    code = None
    if child is not None:
        try:  # a zombie leader can wait a moment for its other threads to finish dying
            code = child.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
    if code is None:  # not this process's child: the keeper's line, the log's last (it may take a moment)
        code = _keeper_status(tail)
        if code is None and job.log_path:
            time.sleep(0.2)
            code = _keeper_status(log_tail(job.log_path))
    if code is None:
        return "the job process ended without reporting"
    if code < 0 or 128 < code <= 128 + 64:  # killed: by its signal (a Popen's negative code, the shell's 128 + n)
        number = -code if code < 0 else code - 128
        try:
            name = signal.Signals(number).name
        except ValueError:  # real-time signals have no name
            name = str(number)
        hint = " (out of memory, or killed by hand)" if number == signal.SIGKILL else ""
        return f"the job process was killed by signal {name}{hint}"
    return f"the job process exited with code {code}"


def reconcile(db: Database) -> list[int]:
    """Settle every unfinished job whose process is gone, or start a new supervisor for one whose work
    runs on a target that keeps its state (a SLURM batch job). Returns the ids it settled."""
    from engine import targets

    for child in list(_children.values()):
        child.poll()  # reap, keeping the exit code for _exit_description
    with db.read() as session:
        open_jobs = session.exec(select(Job).where(Job.state.in_([JobState.QUEUED, JobState.RUNNING]))).all()
    settled = []
    for job in open_jobs:
        if supervised(job):
            continue
        if job.pid is None and not job.cancel_requested and now() - max(job.created_at, job.heartbeat_at or 0) \
                < NEVER_STARTED_S:
            continue  # being spawned right now (a new one, or a re-attached one)
        target = targets.of_job(job)
        if not job.cancel_requested and target.reattaches(job) and _reattach(db, job):
            continue
        # The slow parts (waiting on the exit code, reading the log) happen before taking the write
        # lock, which every job's progress writes wait on.
        tail = log_tail(job.log_path)
        if job.host and job.host != HERE:
            failure = f"its process on {job.host} stopped reporting {now() - (job.heartbeat_at or job.created_at):.0f} s ago"
        else:
            failure = _exit_description(job, tail)
        reason = tail_reason(tail)
        failure += f": {reason}" if reason else ""
        with db.write() as session:
            job = session.get(Job, job.id)  # re-read under the lock: it may have finished or been cancelled
            if job.cancel_requested:
                moved, reason = move_job(session, job, JobState.CANCELLED), "cancelled"
            else:
                moved, reason = move_job(session, job, JobState.FAILED, error=failure), failure
            if not moved:
                continue
            left = target.orphaned(job)  # what stays on the target without its supervisor
            fail_model(session, job.model_id, f"{job.kind.value} {reason}{left}")
            if job.kind == JobKind.SERVE:  # the supervisor is gone: its server must not outlive it
                settle_deployment(session, job.params.get("deployment_id"),
                                  DeploymentState.STOPPED if job.cancel_requested else DeploymentState.FAILED,
                                  ("stopped" if job.cancel_requested else
                                   f"the server's supervisor stopped: {failure}") + left)
        if job.kind == JobKind.SERVE and job.pid:
            kill_leftovers(job_tag(db, job.id))  # the server must not outlive its supervisor
        target.abandon(job)
        settled.append(job.id)
    _settle_unsupervised_deployments(db)
    return settled


def _reattach(db: Database, job: Job) -> bool:
    """A new supervisor for a job whose work goes on without its last one (its state is on the target):
    it finds the work again and follows it. False once a job has been re-attached REATTACH_LIMIT times."""
    with db.write() as session:
        row = session.get(Job, job.id)
        spawning = row.pid is None and now() - (row.heartbeat_at or 0) < NEVER_STARTED_S
        if row.state.is_terminal() or row.cancel_requested or supervised(row) or spawning:
            return True  # settled meanwhile, or another reader re-attached it first (its pid not written yet)
        metrics = row.loads(row.metrics_json, {})
        count = metrics.get("reattached", 0)
        if count >= REATTACH_LIMIT:
            return False
        row.metrics_json = row.dumps(metrics | {"reattached": count + 1})
        # No pid, a fresh heartbeat: the next readers leave it to the process spawned below (see reconcile).
        row.pid, row.pid_started_at, row.heartbeat_at = None, None, now()
        session.add(row)
        record(session, f"job:{row.id}", "reattached", "its supervisor was gone: a new one follows its work",
               model_id=row.model_id)
    spawn(db, row)
    return True


def _settle_unsupervised_deployments(db: Database) -> None:
    """A deployment still Pending or Ready whose supervising job has ended (however it ended) is not
    served by anyone: it is Failed, or Stopped if a stop was asked."""
    with db.read() as session:
        orphans = session.exec(select(Deployment.id).join(Job, Job.id == Deployment.job_id).where(
            Deployment.state.in_(LIVE_DEPLOYMENT_STATES), Job.state.in_([JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED]))).all()
    if not orphans:
        return
    with db.write() as session:
        for deployment_id in orphans:
            job = session.get(Job, session.get(Deployment, deployment_id).job_id)
            stopped = job.cancel_requested
            settle_deployment(session, deployment_id, DeploymentState.STOPPED if stopped else DeploymentState.FAILED,
                              "stopped" if stopped else f"its supervisor ended: {job.error or job.state.value}")


def cancel(db: Database, job_id: int) -> Job:
    """Stop a job: ask, terminate its process group, wait a deadline, kill. Ends Cancelled.

    A job whose process has not claimed it yet is cancelled at once; its process then refuses to start."""
    with db.write() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise EngineError(f"no job {job_id}")
        if job.state.is_terminal():
            raise EngineError(f"job {job_id} has already {job.state.value}")
        job.cancel_requested = True
        session.add(job)
        session.flush()  # move_job() refreshes the row: the request must be in it
        record(session, f"job:{job.id}", "cancel", "cancel requested", model_id=job.model_id)
        if job.state == JobState.QUEUED and job.pid is None:
            move_job(session, job, JobState.CANCELLED)
            fail_model(session, job.model_id, f"{job.kind.value} cancelled")
    if job.host and job.host != HERE and supervised(job):
        raise EngineError(f"job {job_id} runs on {job.host}: cancel it there (modeldeck cancel {job_id} on {job.host})")
    if process_alive(job.pid, job.pid_started_at):
        from engine import targets

        deadline = targets.of_job(job).STOP_DEADLINE_S
        append_log(job.log_path, f"cancel requested (pid {os.getpid()}): stopping at the next safe point, "
                                 f"within {deadline:.0f} s")
        if not stop_process_group(job.pid, deadline):
            append_log(job.log_path, f"the job did not stop within {deadline:.0f} s: killed")
    reconcile(db)
    with db.read() as session:
        return session.get(Job, job_id)


def append_log(path: str | None, message: str) -> None:
    """A line in a job's log from outside its process (a canceller), as the job writes its own."""
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{time.strftime('%H:%M:%S')} {message}\n")
    except OSError:
        pass  # the log is for reading later; the cancel goes on


def stop_process_group(pid: int, deadline_s: float = STOP_DEADLINE_S) -> bool:
    """SIGTERM the process group led by `pid`, wait up to `deadline_s`, then SIGKILL it. Returns once the
    process is gone (its state can be settled): True if it stopped of itself, False if it was killed."""
    try:
        pgid = os.getpgid(pid)
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    child = next((c for c in _children.values() if c.pid == pid), None)

    def gone() -> bool:
        # The leader is the keeper shell: a SIGKILL ends it at once, while the job process beside it (a
        # large one) is still dying; the job is over once nothing of its group is left.
        leader_gone = child.poll() is not None if child is not None else not process_alive(pid, None)
        return leader_gone and not group_alive(pgid)

    if _wait_until(gone, deadline_s):
        return True
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    # Killed is not gone yet: the kernel takes a moment to end a large process, and the caller settles
    # the job's state as soon as it is.
    _wait_until(gone, KILL_WAIT_S)
    return False


def group_alive(pgid: int) -> bool:
    """True while a process of the group `pgid` runs (zombies, which nothing may reap here, do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # some member is not ours to signal: look
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                return True
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return False


def _wait_until(done: Callable[[], bool], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if done():
            return True
        time.sleep(0.05)
    return done()


