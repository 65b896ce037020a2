"""What every target's serving supervisor shares: the deployment's phases, asking a server's /health, the
one tiny completion that proves it answers (the warm-up), and the watch that fails a server which stops
answering. Each target's own supervisor (engine/targets/*/serve.py) starts its server its own way."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx2 as httpx

from catalog.schema import Deployment, DeploymentState
from engine.jobs.harness import JobContext, JobFailure
from engine.lifecycle import move_deployment

HEALTH_EVERY_S = 2.0  # a live server that stops answering: checked this often...
HEALTH_FAILURES = 5  # ...and declared dead after this many misses in a row


def set_phase(ctx: JobContext, deployment_id: int, phase: str) -> None:
    """A Pending deployment's phase (screens follow it through the event it records). Followers say it at
    every poll: only a change is written (a job can wait in a cluster's queue for days)."""
    with ctx.db.read() as session:
        deployment = session.get(Deployment, deployment_id)
        if deployment is None or (deployment.state == DeploymentState.PENDING and deployment.phase == phase):
            return
    with ctx.db.write() as session:
        deployment = session.get(Deployment, deployment_id)
        moved = deployment is not None and move_deployment(session, deployment, DeploymentState.PENDING, phase=phase)
    if moved:
        ctx.report(metrics={"phase": phase})


def healthy(client: httpx.Client, base_url: str) -> bool:
    try:
        return client.get(base_url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False  # connection refused: still loading


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


def ready(ctx: JobContext, deployment_id: int, **fields) -> None:
    from engine.deployment_adapters import reload_missing

    with ctx.db.write() as session:
        deployment = session.get(Deployment, deployment_id)
        if deployment is not None:
            move_deployment(session, deployment, DeploymentState.READY, **fields)
    reload_missing(ctx.db, deployment_id, ctx.log)  # a server that came back knows only its command line's


def watch_health(base_url: str, gone: Callable[[], str | None], every_s: float = 0.5) -> None:
    """Until stopped: `gone()` says why the server is gone (None while it runs), checked every `every_s`;
    a server that stops answering /health HEALTH_FAILURES times in a row fails the deployment too."""
    misses, last_check = 0, time.monotonic()
    with httpx.Client() as client:
        while True:
            time.sleep(every_s)
            if reason := gone():
                raise JobFailure(reason)
            if time.monotonic() - last_check >= HEALTH_EVERY_S:
                last_check = time.monotonic()
                misses = 0 if healthy(client, base_url) else misses + 1
                if misses >= HEALTH_FAILURES:
                    raise JobFailure(f"the server stopped answering /health ({misses} checks in a row)")
