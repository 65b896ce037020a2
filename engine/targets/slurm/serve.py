"""A deployment on SLURM: vLLM or the built-in server in a batch job, supervised from here.

The batch job runs the launcher (launch.py), which picks a free port on its node, writes where it listens
into the run's folder (endpoint.json) and becomes the server; the API key reaches it through sbatch's
environment, never a file. The supervisor follows the job through the queue (Pending with SLURM's reason),
reaches the server at its node's address (the deployment's endpoint), Ready once /health answers and one
tiny completion succeeds; it keeps the time left before the job's limit on the deployment, and a requeued
job (preempted, a node lost) goes Pending again and back to Ready where it lands. Whatever ends the
deployment cancels its batch job and waits for it to leave its node.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx2 as httpx

from catalog.schema import Deployment, DeploymentState, Model, now
from engine.backends import DeploySettings
from engine.jobs.harness import JobContext, JobFailure
from engine.jobs.serving import HEALTH_EVERY_S, HEALTH_FAILURES, healthy, ready, set_phase, warm_up
from engine.lifecycle import move_deployment
from engine.targets.slurm import SlurmTarget, commands, deployment_run
from engine.targets.slurm.run import POLL_S, BatchJob

READY_TIMEOUT_S = 1800.0  # loading a large model on a cold node (its files over the shared filesystem) takes long
ENDS_AT_SLACK_S = 30.0  # the time left is written again only when it moved by more than this


def serve(ctx: JobContext, target: SlurmTarget, deployment: Deployment, model: Model, base: Model | None,
          adapters: list[tuple[str, Model]]) -> None:
    settings = DeploySettings.of(deployment)
    os.umask(0o077)  # what this supervisor writes in the work directory (the run's script): the user's alone
    run_dir = deployment_run(deployment)
    batch = BatchJob(ctx, run_dir, 1, int(deployment.gpus or 0) > 0)
    try:
        if batch.job_id is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(run_dir, 0o700)
            text, secret = target.server_script(deployment.name, deployment.api_key, run_dir, settings,
                                                deployment.served_name, model, base, adapters)
            set_phase(ctx, deployment.id, "submitting its batch job")
            try:
                batch.submit(text, secret)
            except commands.SlurmError as exc:
                raise JobFailure(str(exc)) from None
        else:
            ctx.log(f"following batch job {batch.job_id} again ({run_dir})")
        Follower(ctx, deployment, batch, run_dir).follow()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second stop must not interrupt the cleanup
        batch.end(target.STOP_DEADLINE_S - 15)


class Follower:
    def __init__(self, ctx: JobContext, deployment: Deployment, batch: BatchJob, run_dir: Path):
        self.ctx, self.deployment, self.batch, self.run_dir = ctx, deployment, batch, run_dir
        self.endpoint_file = run_dir / "endpoint.json"
        self.served: tuple[str, int] | None = None  # where the Ready server is
        self.ends_at: float | None = None

    def phase(self, name: str) -> None:
        set_phase(self.ctx, self.deployment.id, name)

    def told(self, restarts: int) -> dict | None:
        """Where the launcher says the server listens, if it said so for this batch job's current run (a
        requeued job keeps its id: its file is the last run's until the launcher writes it again)."""
        try:
            told = json.loads(self.endpoint_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        current = str(told.get("job_id")) == str(self.batch.job_id) and told.get("restart", 0) == restarts
        return told if current else None

    def follow(self) -> None:
        """Until the batch job ends (a failure: the deployment was not stopped), or a stop raises."""
        loading_since, misses, last_check = None, 0, 0.0
        with httpx.Client() as client:
            while True:
                if (now := self.batch.watch()) is None:  # the controller is away; the server goes on meanwhile
                    time.sleep(POLL_S)
                    continue
                self.relay_log()
                if now.state == "ended":
                    self.relay_log()  # what it wrote last
                    raise JobFailure(now.ending.reason if not now.ending.succeeded else
                                     "its batch job ended: the server exited on its own")
                if now.state == "pending":
                    if self.served is not None or self.deployment.endpoint:
                        self.ctx.log("the batch job is queued again (requeued): following it to its new node")
                        self.moved(None, now.queued)
                    self.served, loading_since = None, None
                    self.phase(now.queued)
                elif self.served is None:
                    told = self.told(now.restarts)
                    loading_since = loading_since or time.monotonic()
                    if told is None:
                        self.phase(now.starting)
                    elif self.came_up(client, told, now.node, now.time_left_s):
                        misses, last_check = 0, time.monotonic()
                    if time.monotonic() - loading_since > READY_TIMEOUT_S:
                        raise JobFailure(f"the server did not answer /health within {READY_TIMEOUT_S / 60:.0f} min")
                elif time.monotonic() - last_check >= HEALTH_EVERY_S:
                    last_check = time.monotonic()
                    misses = 0 if healthy(client, self.base_url) else misses + 1
                    if misses >= HEALTH_FAILURES:
                        raise JobFailure(f"the server on {now.node} stopped answering /health ({misses} checks in a row)")
                    self.keep_time_left(now.time_left_s)
                time.sleep(POLL_S)

    def relay_log(self) -> None:
        """The server's output, into this job's log (the details and `l` show it); how far is kept with the
        job, so a new supervisor does not copy it again."""
        copied = False
        for line, new in self.batch.new_lines():
            if new:
                print(line, flush=True)
                copied = True
        if copied:
            self.ctx.report(metrics={"log_told_to": self.batch.told_to})

    def moved(self, endpoint: str | None, phase: str) -> None:
        """The server is elsewhere now (where the launcher said; None: nowhere yet, requeued)."""
        with self.ctx.db.write() as session:
            row = session.get(Deployment, self.deployment.id)
            move_deployment(session, row, DeploymentState.PENDING, phase=phase, endpoint=endpoint)
        self.deployment.endpoint = endpoint

    @property
    def base_url(self) -> str:
        host, port = self.served
        return f"http://{host}:{port}"

    def came_up(self, client: httpx.Client, told: dict, node: str, time_left_s: int | None) -> bool:
        """The server the launcher started: its endpoint on the deployment, then Ready once it answers."""
        host, port = told["host"], int(told["port"])
        endpoint = f"http://{host}:{port}/v1"
        if self.deployment.endpoint != endpoint:
            self.moved(endpoint, f"loading weights on {node}")
            self.ctx.log(f"the server listens on {host}:{port}")
        if not healthy(client, f"http://{host}:{port}"):
            self.phase(f"loading weights on {node}")
            return False
        with self.ctx.db.read() as session:
            serving = session.get(Deployment, self.deployment.id).state == DeploymentState.READY
        if not serving:  # Ready already: a new supervisor of a server that went on without the last one
            self.phase("warming up")
            warm_up(client, f"http://{host}:{port}", self.deployment)
        self.served = (host, port)
        ready(self.ctx, self.deployment.id, ends_at=self.ends_at_from(time_left_s))
        self.ctx.log(f"ready at {endpoint}")
        return True

    def ends_at_from(self, time_left_s: int | None) -> float | None:
        self.ends_at = now() + time_left_s if time_left_s is not None else None
        return self.ends_at

    def keep_time_left(self, time_left_s: int | None) -> None:
        """The deployment's end (its batch job's time limit), written again when it moved (a limit changed)."""
        ends_at = now() + time_left_s if time_left_s is not None else None
        if (ends_at is None) == (self.ends_at is None) and (ends_at is None or abs(ends_at - self.ends_at) < ENDS_AT_SLACK_S):
            return
        self.ends_at = ends_at
        with self.ctx.db.write() as session:
            row = session.get(Deployment, self.deployment.id)
            move_deployment(session, row, DeploymentState.READY, ends_at=ends_at)
