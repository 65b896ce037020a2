"""Serving job: a deployment's small supervisor. Its target serves the model (engine/targets/*/serve.py:
a server as this job's child here, a Deployment on Kubernetes, a batch job on SLURM), moves it through its
phases to Ready and watches it; whatever ends that — a stop (SIGTERM), a failure, a crash — settles the
deployment here, Stopped or Failed with the reason, once the target has cleaned up."""

from __future__ import annotations

import signal

from catalog.schema import Deployment, DeploymentState, Model, ModelKind
from engine.jobs import JobCancelled
from engine.jobs.harness import JobContext, JobFailure, main
from engine.lifecycle import settle_deployment


class Stop(JobCancelled):
    """SIGTERM: the deployment is being stopped."""


def work(ctx: JobContext) -> None:
    from engine import targets
    from engine.deployment_adapters import served_adapters

    deployment_id = ctx.params["deployment_id"]
    with ctx.db.read() as session:
        deployment = session.get(Deployment, deployment_id)
        model = session.get(Model, deployment.model_id) if deployment else None
        base = session.get(Model, model.base_id) if model and model.kind == ModelKind.ADAPTER else None
        served = served_adapters(session, deployment_id) if deployment else []
    if deployment is None or model is None:
        raise JobFailure("the deployment or its model was deleted")
    adapters = [(s.served_name, s.model) for s in served if s.model is not None]
    for gone in (s.served_name for s in served if s.model is None):
        ctx.log(f"the adapter served as {gone!r} was deleted: not served")
    stopping = {"asked": False}

    def stop_requested(signum, frame):
        stopping["asked"] = True
        raise Stop()

    try:
        signal.signal(signal.SIGTERM, stop_requested)
        targets.of_deployment(deployment).serve(ctx, deployment, model, base, adapters)  # until stopped or failed
        raise JobFailure("the server's supervision ended without a reason")
    except BaseException as exc:  # every way out settles the deployment (the target has cleaned up)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second stop must not interrupt the cleanup
        asked = stopping["asked"] or isinstance(exc, Stop)
        if asked:
            ctx.log("stopped the server")
        reason = "stopped" if asked else (str(exc) if isinstance(exc, JobFailure) else f"{type(exc).__name__}: {exc}")
        with ctx.db.write() as session:
            settle_deployment(session, deployment_id, DeploymentState.STOPPED if asked else DeploymentState.FAILED,
                              reason)
        if asked:
            raise Stop() from None
        raise


if __name__ == "__main__":
    main(work)
