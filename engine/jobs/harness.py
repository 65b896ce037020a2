"""What every job process shares: claim the job, heartbeat, report progress, finish with one state.

A job module defines `work(ctx)` and ends with `harness.main(work)`. `work` raises `JobFailure` with a
user-facing reason for expected failures; anything else is logged with its traceback and reported by
type and message.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from catalog import Database
from catalog.schema import Job, JobState, Model, ModelState, now
from engine.events import record
from engine.jobs import HERE, JobCancelled
from engine.lifecycle import fail_model, move_job, move_model

HEARTBEAT_S = 2.0


class JobFailure(Exception):
    """An expected failure; its message is shown to the user as the reason."""


class JobContext:
    def __init__(self, db: Database, job: Job):
        self.db = db
        self.job_id = job.id
        self.model_id = job.model_id
        self.params: dict[str, Any] = job.params
        # the job's metrics_json: a phase, or a fine-tune's step and losses (kept across a re-attach)
        self.metrics: dict[str, Any] = job.loads(job.metrics_json, {})
        self.reattached = False  # a new supervisor of work that went on without the last one
        self._stop = threading.Event()

    def log(self, message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)

    def report(self, metrics: dict[str, Any] | None = None, **fields: Any) -> None:
        """Write progress fields (bytes_done, bytes_total, rate, eta_s, progress), and `metrics` merged into
        the job's metrics."""
        if metrics is not None:
            self.metrics.update(metrics)
        with self.db.write() as session:
            job = session.get(Job, self.job_id)
            for name, value in fields.items():
                setattr(job, name, value)
            if metrics is not None:
                job.metrics_json = json.dumps(self.metrics)
            job.heartbeat_at = now()
            session.add(job)
            record(session, f"job:{self.job_id}", "progress", model_id=self.model_id, **fields)

    def wait_for_model(self, model_id: int, what: str, check: Callable[[], None] = lambda: None) -> Model:
        """The model once Ready: work started on a model that is still downloading waits for it. `check`
        runs between looks (a fine-tune's cancel check)."""
        with self.phase(f"waiting for {what}'s download"):
            while True:
                check()
                with self.db.read() as session:
                    model = session.get(Model, model_id)
                if model is None:
                    raise JobFailure(f"{what} was deleted")
                if model.state == ModelState.READY:
                    return model
                if model.state == ModelState.FAILED:
                    raise JobFailure(f"{what} {model.name} failed: {model.reason}")
                time.sleep(1.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[Callable[[int, int | None, str | None], None]]:
        """Work reported by its name and the time spent, every second. Work that can tell its steps calls
        what this yields with (done, total, step): a step's name is shown after the phase's ("converting
        GGUF: dequantizing the weights"), and a count gives that step a fraction and an ETA."""
        start, done = time.monotonic(), threading.Event()
        counted: dict[str, Any] = {}  # the step, its fraction, and when counting it began

        def count(steps_done: int, total: int | None, step: str | None = None) -> None:
            if step is not None and step != counted.get("step"):
                counted.clear()
                counted["step"] = step
            if total:
                counted.setdefault("since", time.monotonic())
                counted["fraction"] = min(steps_done / total, 1.0)

        def tick() -> None:
            finished = False
            while True:
                now = time.monotonic()
                fraction, eta = counted.get("fraction"), None
                if fraction:
                    eta = (now - counted["since"]) * (1 - fraction) / fraction
                shown = f"{name}: {counted['step']}" if counted.get("step") else name
                self.report(metrics={"phase": shown, "elapsed_s": round(now - start)}, progress=fraction, eta_s=eta)
                if finished:
                    return
                finished = done.wait(1.0)  # then once more: how the phase ended (100%)

        ticker = threading.Thread(target=tick, name="phase", daemon=True)
        ticker.start()
        try:
            yield count
        finally:
            done.set()
            ticker.join()
            self.metrics.pop("elapsed_s", None)

    def update_model(self, **fields: Any) -> None:
        with self.db.write() as session:
            model = session.get(Model, self.model_id)
            for name, value in fields.items():
                setattr(model, name, value)
            model.updated_at = now()
            session.add(model)
            record(session, f"model:{self.model_id}", "updated")

    def succeed(self, more_meta: dict[str, Any] | None = None, **model_fields: Any) -> None:
        """The model becomes Ready (with `model_fields`, and `more_meta` joining its meta) and the job
        Succeeded, in one transaction."""
        with self.db.write() as session:
            job = session.get(Job, self.job_id)
            if self.model_id is not None:
                model = session.get(Model, self.model_id)
                if more_meta:
                    model_fields["meta_json"] = Model.dumps(model.meta | more_meta)
                move_model(session, model, ModelState.READY, **model_fields)
            move_job(session, job, JobState.SUCCEEDED, progress=1.0)

    def fail(self, reason: str) -> None:
        with self.db.write() as session:
            job = session.get(Job, self.job_id)
            if move_job(session, job, JobState.FAILED, error=reason):
                fail_model(session, self.model_id, reason)

    def cancelled(self) -> None:
        with self.db.write() as session:
            job = session.get(Job, self.job_id)
            if move_job(session, job, JobState.CANCELLED):
                fail_model(session, self.model_id, f"{job.kind.value} cancelled")

    def start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                with self.db.write() as session:
                    job = session.get(Job, self.job_id)
                    job.heartbeat_at = now()
                    session.add(job)

        threading.Thread(target=beat, name="heartbeat", daemon=True).start()

    def stop_heartbeat(self) -> None:
        self._stop.set()


def main(work: Callable[[JobContext], None]) -> None:
    import signal

    # Started in the background by its keeper shell, which leaves SIGINT and SIGQUIT ignored: as usual again,
    # for this process and what it starts (a server).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    db_path, job_id = Path(sys.argv[1]), int(sys.argv[2])
    db = Database(db_path)
    refusal, reattached = None, False
    with db.write() as session:  # decide and record; exit only after the transaction has committed
        job = session.get(Job, job_id)
        me = psutil.Process()
        if job is None:
            refusal = f"no job {job_id} in {db_path}"
        elif job.cancel_requested:  # cancelled between spawn and now
            if move_job(session, job, JobState.CANCELLED):
                fail_model(session, job.model_id, f"{job.kind.value} cancelled")
            refusal = f"job {job_id} was cancelled before it started"
        elif job.state == JobState.RUNNING and job.loads(job.metrics_json, {}).get("reattached") and \
                job.pid in (None, me.pid, os.getppid()):  # the spawner records the shell that keeps this process
            # Re-attached (engine/jobs/__init__.py): this process takes over the job's work on its target.
            job.pid, job.pid_started_at, job.heartbeat_at, job.host = me.pid, me.create_time(), now(), HERE
            session.add(job)
            reattached = True
        elif not move_job(session, job, JobState.RUNNING, pid=me.pid, pid_started_at=me.create_time(),
                            heartbeat_at=now(), host=HERE):
            refusal = f"job {job_id} is {job.state.value}; not starting"
    if refusal:
        sys.exit(refusal)
    ctx = JobContext(db, job)
    ctx.reattached = reattached
    ctx.log(f"job {job_id} ({job.kind.value}) " + ("re-attached to its work" if reattached else "started")
            + f": {job.title}")
    ctx.start_heartbeat()
    code = 0
    try:
        work(ctx)
        ctx.log("job succeeded")
    except JobCancelled:
        ctx.log("job cancelled")
        ctx.cancelled()
        code = 1
    except JobFailure as exc:
        ctx.log(f"job failed: {exc}")
        ctx.fail(str(exc))
        code = 1
    except Exception as exc:  # noqa: BLE001 - anything unexpected still ends the job with its reason
        traceback.print_exc()
        ctx.fail(f"{type(exc).__name__}: {exc}")
        code = 1
    finally:
        ctx.stop_heartbeat()
        db.close()
    # The outcome is recorded. Leave now, without waiting for worker threads still busy with work
    # that no longer matters (say, other files of a download that has failed).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
