"""Serving job: a small supervisor. It starts the server (vLLM, or the built-in one) in its own process
group, watches the child and its /health together (a child that dies fails the deployment at once, with
its exit status and last log lines), marks the deployment Ready once /health answers and one tiny
completion succeeds, and then keeps watching. SIGTERM (stop) ends the server cleanly: terminate,
deadline, kill."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import httpx2 as httpx
import psutil

from catalog.schema import (
    Deployment,
    DeploymentState,
    Model,
    ModelKind,
    ModelState,
    now,
)
from engine import jobs
from engine.backends import serve_command
from engine.events import record
from engine.jobs import STOP_DEADLINE_S, JobCancelled, log_tail, settle_deployment
from engine.jobs.harness import JobContext, JobFailure, main
from engine.logs import tail_reason

READY_TIMEOUT_S = 900.0  # loading a large model can take minutes
WATCH_EVERY_S = 0.5  # a server that exits turns the deployment Failed within a second
HEALTH_EVERY_S = 2.0  # a live server that stops answering: checked this often...
HEALTH_FAILURES = 5  # ...and declared dead after this many misses in a row


class Stop(JobCancelled):
    """SIGTERM: the deployment is being stopped."""


def work(ctx: JobContext) -> None:
    deployment_id = ctx.params["deployment_id"]
    with ctx.db.read() as session:
        deployment = session.get(Deployment, deployment_id)
        model = session.get(Model, deployment.model_id) if deployment else None
        base = session.get(Model, model.base_id) if model and model.kind == ModelKind.ADAPTER else None
    if deployment is None or model is None:
        raise JobFailure("the deployment or its model was deleted")
    stopping = {"asked": False}

    def stop_requested(signum, frame):
        stopping["asked"] = True
        raise Stop()

    base_url = deployment.endpoint.removesuffix("/v1")
    log_path = jobs.get(ctx.db, ctx.job_id).log_path
    child = on_cluster = None
    try:
        signal.signal(signal.SIGTERM, stop_requested)
        if deployment.backend == "kubernetes":  # the cluster downloads the model itself
            from engine.jobs.serve_cluster import OnCluster

            on_cluster = OnCluster(ctx, deployment, model, base)
            on_cluster.run()  # until stopped or failed
            return
        if model.state != ModelState.READY:  # deployed from Community while it downloads
            model = ctx.wait_for_model(model.id, "the model")
            set_phase(ctx, deployment_id, "starting")
        command = serve_command(deployment, model, base)
        ctx.log(f"starting: {command.shown}")
        # The server inherits this process's group, so stopping the group (or a reconciler killing it
        # after this supervisor died) ends the server too. Its output goes to this job's log.
        child = subprocess.Popen(command.argv, env=os.environ | command.env, stdin=subprocess.DEVNULL,
                                 stdout=sys.stdout, stderr=subprocess.STDOUT, cwd=ctx.db.path.parent)
        wait_until_ready(ctx, child, base_url, deployment, log_path)
        with ctx.db.write() as session:
            settle_deployment(session, deployment_id, DeploymentState.READY, phase=None)
        ctx.log(f"ready at {deployment.endpoint}")
        watch(child, base_url, log_path)
    except BaseException as exc:  # every way out ends the server and settles the deployment
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second stop must not interrupt the cleanup
        if stopping["asked"] or isinstance(exc, Stop):
            ctx.log("stopping the server")
        end_server(child)
        if on_cluster is not None:
            on_cluster.cleanup()
        asked = stopping["asked"] or isinstance(exc, Stop)
        reason = "stopped" if asked else (str(exc) if isinstance(exc, JobFailure) else f"{type(exc).__name__}: {exc}")
        with ctx.db.write() as session:
            settle_deployment(session, deployment_id, DeploymentState.STOPPED if asked else DeploymentState.FAILED,
                              reason)
        if asked:
            raise Stop() from None
        raise


def set_phase(ctx: JobContext, deployment_id: int, phase: str) -> None:
    with ctx.db.write() as session:
        deployment = session.get(Deployment, deployment_id)
        if deployment is not None and deployment.phase != phase:
            deployment.phase, deployment.updated_at = phase, now()
            session.add(deployment)
            record(session, f"deployment:{deployment_id}", "phase", phase)  # screens follow the events
    ctx.report(metrics={"phase": phase})


def exited(child: subprocess.Popen, log_path: str | None) -> str | None:
    """Why the server is gone, with the last lines it wrote; None while it runs."""
    code = child.poll()
    if code is None:
        return None
    if code < 0:  # killed from outside: what it logged last is not why
        return f"the server was killed by signal {signal.Signals(-code).name}"
    sys.stdout.flush()
    tail = [line for line in log_tail(log_path, 12) if not line.startswith("INFO:")]  # uvicorn's routine lines
    return f"the server exited with code {code}" + (": " + tail_reason(tail) if any(t.strip() for t in tail) else "")


def healthy(client: httpx.Client, base_url: str) -> bool:
    try:
        return client.get(base_url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False  # connection refused: still loading


def wait_until_ready(ctx: JobContext, child, base_url: str, deployment: Deployment, log_path: str | None) -> None:
    set_phase(ctx, deployment.id, "loading weights")
    start = time.monotonic()
    with httpx.Client() as client:
        while not healthy(client, base_url):
            if reason := exited(child, log_path):
                raise JobFailure(reason)
            if time.monotonic() - start > READY_TIMEOUT_S:
                raise JobFailure(f"the server did not answer /health within {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.25)
        set_phase(ctx, deployment.id, "warming up")
        warm_up(client, base_url, deployment)


def warm_up(client: httpx.Client, base_url: str, deployment: Deployment) -> None:
    """One tiny completion: answering /health is not yet answering requests."""
    try:
        reply = client.post(base_url + "/v1/completions", timeout=300,
                            headers={"Authorization": f"Bearer {deployment.api_key}"},
                            json={"model": deployment.served_name, "prompt": "Hello", "max_tokens": 1})
    except httpx.HTTPError as exc:
        raise JobFailure(f"the warm-up completion failed: {exc}") from None
    if reply.status_code != 200:
        raise JobFailure(f"the warm-up completion failed: HTTP {reply.status_code}: {reply.text[:300]}")


def watch(child, base_url: str, log_path: str | None) -> None:
    """Until stopped: a server that exits, or stops answering, fails the deployment."""
    misses, last_check = 0, time.monotonic()
    with httpx.Client() as client:
        while True:
            time.sleep(WATCH_EVERY_S)
            if reason := exited(child, log_path):
                raise JobFailure(reason)
            if time.monotonic() - last_check >= HEALTH_EVERY_S:
                last_check = time.monotonic()
                misses = 0 if healthy(client, base_url) else misses + 1
                if misses >= HEALTH_FAILURES:
                    raise JobFailure(f"the server stopped answering /health ({misses} checks in a row)")


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


if __name__ == "__main__":
    main(work)
