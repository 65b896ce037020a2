"""This machine's serving supervisor: the server (vLLM, or the built-in one) as a child in this job's
process group, watched together with its /health (a child that dies fails the deployment at once, with its
exit status and last log lines); Ready once /health answers and one tiny completion succeeds."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import Callable

import httpx2 as httpx
import psutil

from catalog.schema import Deployment, Model, ModelState
from engine import jobs
from engine.backends import serve_command
from engine.gpus import out_of_memory_here
from engine.jobs import STOP_DEADLINE_S, log_tail
from engine.jobs.harness import JobContext, JobFailure
from engine.jobs.serving import healthy, ready, set_phase, warm_up, watch_health
from engine.logs import tail_reason

READY_TIMEOUT_S = 900.0  # loading a large model can take minutes
WATCH_EVERY_S = 0.5  # a server that exits turns the deployment Failed within a second


def serve(ctx: JobContext, deployment: Deployment, model: Model, base: Model | None,
          adapters: list[tuple[str, Model]]) -> None:
    if model.state != ModelState.READY:  # deployed from Community while it downloads
        model = ctx.wait_for_model(model.id, "the model")
        set_phase(ctx, deployment.id, "starting")
    base_url = deployment.endpoint.removesuffix("/v1")
    log_path = jobs.get(ctx.db, ctx.job_id).log_path
    command = serve_command(deployment, model, base, adapters)
    ctx.log(f"starting: {command.shown}")
    # The server inherits this process's group, so stopping the group (or a reconciler killing it after
    # this supervisor died) ends the server too. Its output goes to this job's log.
    child = subprocess.Popen(command.argv, env=os.environ | command.env, stdin=subprocess.DEVNULL,
                             stdout=sys.stdout, stderr=subprocess.STDOUT, cwd=ctx.db.path.parent)
    def gone() -> str | None:
        return exited(child, log_path, lambda tail: out_of_memory_here(ctx.db, deployment.gpus,
                                                                        f"deployment {deployment.name}", tail))

    try:
        wait_until_ready(ctx, child, base_url, deployment, gone)
        ready(ctx, deployment.id)
        ctx.log(f"ready at {deployment.endpoint}")
        watch_health(base_url, gone, WATCH_EVERY_S)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second stop must not interrupt the cleanup
        end_server(child)


def exited(child: subprocess.Popen, log_path: str | None,
           out_of_memory: Callable[[str], str | None] = lambda tail: None) -> str | None:
    """Why the server is gone, with the last lines it wrote (CUDA out of memory: on which GPU, and who holds
    it now); None while it runs."""
    code = child.poll()
    if code is None:
        return None
    if code < 0:  # killed from outside: what it logged last is not why
        return f"the server was killed by signal {signal.Signals(-code).name}"
    sys.stdout.flush()
    tail = [line for line in log_tail(log_path, 12) if not line.startswith("INFO:")]  # uvicorn's routine lines
    reason = tail_reason(tail)
    # vLLM's engine says "out of memory" well above the API server's own traceback: look further back
    if memory := out_of_memory("\n".join(log_tail(log_path, 200))):
        reason = f"{memory}; it said: {reason}" if reason and reason not in memory else memory
    return f"the server exited with code {code}" + (f": {reason}" if reason else "")


def wait_until_ready(ctx: JobContext, child, base_url: str, deployment: Deployment,
                     gone: Callable[[], str | None]) -> None:
    set_phase(ctx, deployment.id, "loading weights")
    start = time.monotonic()
    with httpx.Client() as client:
        while not healthy(client, base_url):
            if reason := gone():
                raise JobFailure(reason)
            if time.monotonic() - start > READY_TIMEOUT_S:
                raise JobFailure(f"the server did not answer /health within {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.25)
        set_phase(ctx, deployment.id, "warming up")
        warm_up(client, base_url, deployment)


def end_server(child: subprocess.Popen | None) -> None:
    """Terminate the server and whatever it started (vLLM runs workers), wait a deadline, then kill."""
    if child is None:
        return
    try:
        family = [psutil.Process(child.pid), *psutil.Process(child.pid).children(recursive=True)]
    except psutil.Error:
        family = []
    for process in family:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(family, timeout=STOP_DEADLINE_S - 1.5)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=5)
