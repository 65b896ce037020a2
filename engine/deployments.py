"""Deployments: start one (the checks, a Pending row, a supervising job), stop it, delete it, list them.

The supervising job (engine/jobs/serve.py) starts the server, moves the deployment through its phases to
Ready, and watches it. Whoever reconciles settles a deployment whose supervisor is gone.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass

from sqlmodel import Session, select

from catalog import Database
from catalog.schema import (
    Deployment,
    DeploymentState,
    Job,
    JobKind,
    Model,
    ModelKind,
    ModelState,
)
from engine import jobs
from engine.backends import (
    DeploySettings,
    choose_backend,
    free_port,
    port_free,
    vllm_available,
)
from engine.errors import EngineError
from engine.events import record
from engine.gpus import list_gpus, parse_choice
from engine.jobs import settle_deployment
from engine.models import find_model

LIVE = (DeploymentState.PENDING, DeploymentState.READY)


def deployment_rows(db: Database, ids: set[int] | None = None) -> list[Deployment]:
    with db.read() as session:
        query = select(Deployment).order_by(Deployment.created_at)
        if ids is not None:
            query = query.where(Deployment.id.in_(list(ids)))
        return list(session.exec(query))


def find_deployment(session: Session, name: str | int) -> Deployment:
    """By id (an int, as the dashboard knows it), else by name: the latest of that name (a name is reused
    once its deployment has stopped)."""
    if isinstance(name, int):
        deployment = session.get(Deployment, name)
    else:
        deployment = session.exec(select(Deployment).where(Deployment.name == name)
                                  .order_by(Deployment.id.desc())).first()
        if deployment is None and name.isdigit():
            deployment = session.get(Deployment, int(name))
    if deployment is None:
        raise EngineError(f"no deployment named {name!r} (see `modeldeck ps`)")
    return deployment


def deploy(db: Database, model_name: str, settings: DeploySettings, name: str | None = None) -> tuple[Deployment, Job]:
    """Check everything, then register a Pending deployment and start its supervising job."""
    if problems := settings.problems():
        raise EngineError("; ".join(problems.values()))
    with db.read() as session:
        model = find_model(session, model_name)
        base = session.get(Model, model.base_id) if model.kind == ModelKind.ADAPTER and model.base_id else None
    if model.state != ModelState.READY or not model.path:
        raise EngineError(f"{model.name!r} is {model.state.value}; deploy it once it is Ready")
    if model.kind == ModelKind.ADAPTER and (base is None or base.state != ModelState.READY):
        raise EngineError(f"the base model of the adapter {model.name!r} is missing or not Ready")
    try:
        gpus = parse_choice(settings.gpus, list_gpus())
    except ValueError as exc:
        raise EngineError(str(exc)) from None
    backend = choose_backend(settings.backend, gpus != "cpu", vllm_available())
    if backend == "vllm" and (gpus == "cpu" or not vllm_available()):
        raise EngineError("vLLM needs a CUDA GPU and the vllm package; choose the transformers backend")
    if settings.port == 0:
        settings = dataclasses.replace(settings, port=free_port(settings.host))
    elif not port_free(settings.host, settings.port):
        raise EngineError(f"port {settings.port} on {settings.host} is in use; choose another, or 0 for a free one")
    served = settings.served_name or model.name
    with db.write() as session:
        # A server binds its port only once its model is loaded: a live deployment's port is taken even
        # while nothing listens on it yet.
        for live in session.exec(select(Deployment).where(Deployment.state.in_(LIVE))):
            if live.loads(live.settings_json, {}).get("port") == settings.port:
                raise EngineError(f"port {settings.port} is kept for deployment {live.name!r}; choose another, "
                                  "or 0 for a free one")
        if session.exec(select(Deployment).where(Deployment.name == (name or served),
                                                 Deployment.state.in_(LIVE))).first():
            raise EngineError(f"a deployment named {name or served!r} is already running; stop it or choose another name")
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host  # where to reach it from here
        host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
        deployment = Deployment(
            model_id=model.id, name=name or served, backend=backend, phase="starting", served_name=served,
            api_key="sk-md-" + secrets.token_urlsafe(24), gpus=gpus,
            endpoint=f"http://{host}:{settings.port}/v1", settings_json=Deployment.dumps(dataclasses.asdict(settings)))
        session.add(deployment)
        session.flush()
        record(session, f"deployment:{deployment.id}", "created", f"deploy {model.name} with {backend}",
               state="pending")
        job = jobs.create(session, JobKind.SERVE, f"serve {model.name} ({backend})", None, deployment_id=deployment.id)
        deployment.job_id = job.id
    jobs.spawn(db, job)
    return deployment, job


def stop(db: Database, name: str | int) -> Deployment:
    """Stop the server cleanly (terminate, deadline, kill the group); the deployment ends Stopped."""
    with db.read() as session:
        deployment = find_deployment(session, name)
    if deployment.state not in LIVE:
        raise EngineError(f"deployment {deployment.name!r} is already {deployment.state.value}")
    try:
        jobs.cancel(db, deployment.job_id)
    except EngineError:
        pass  # its supervisor ended meanwhile; settle below
    with db.write() as session:
        settle_deployment(session, deployment.id, DeploymentState.STOPPED, "stopped")
    with db.read() as session:
        return session.get(Deployment, deployment.id)


def delete(db: Database, name: str | int) -> None:
    """Remove a stopped or failed deployment's record."""
    with db.write() as session:
        deployment = find_deployment(session, name)
        if deployment.state in LIVE:
            raise EngineError(f"deployment {deployment.name!r} is {deployment.state.value}; stop it first")
        session.delete(deployment)
        record(session, f"deployment:{deployment.id}", "deleted", f"deleted {deployment.name}")


# Counters in the Prometheus text of the built-in server and of vLLM.
REQUEST_COUNTERS = ("modeldeck_requests_total", "vllm:request_success_total")
TOKEN_COUNTERS = ("modeldeck_generation_tokens_total", "vllm:generation_tokens_total")


@dataclass
class ServerLoad:
    requests: int  # answered since the server started
    tokens: int  # generated since the server started


def parse_load(metrics_text: str) -> ServerLoad:
    """Sum the request and generated-token counters, whatever their labels (status, model, ...)."""
    requests = tokens = 0.0
    for line in metrics_text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0]
        try:
            number = float(value)
        except ValueError:
            continue
        if name in REQUEST_COUNTERS:
            requests += number
        elif name in TOKEN_COUNTERS:
            tokens += number
    return ServerLoad(int(requests), int(tokens))


def read_load(endpoint: str, timeout: float = 1.0) -> ServerLoad | None:
    """The server's counters from its /metrics, or None when it does not answer."""
    import httpx2 as httpx

    try:
        response = httpx.get(endpoint.removesuffix("/v1") + "/metrics", timeout=timeout)
    except httpx.HTTPError:
        return None
    return parse_load(response.text) if response.status_code == 200 else None
