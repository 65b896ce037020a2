"""Deployments: start one (the checks, a Pending row, a supervising job), stop it, delete it, list them.

The supervising job (engine/jobs/serve.py) starts the server, moves the deployment through its phases to
Ready, and watches it. Whoever reconciles settles a deployment whose supervisor is gone.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import shutil
import socket
from dataclasses import dataclass

import psutil
from sqlmodel import Session, select

from catalog import Database
from catalog.schema import (
    CommunityModel,
    Deployment,
    DeploymentState,
    Job,
    JobKind,
    Model,
    ModelKind,
    ModelState,
)
from catalog.states import LIVE_DEPLOYMENT_STATES
from engine import hub, jobs
from engine.backends import (
    DTYPE_BYTES,
    DeploySettings,
    MemoryEstimate,
    choose_backend,
    context_limit,
    estimate_memory,
    fit_verdict,
    free_port,
    port_free,
    vllm_available,
)
from engine.errors import EngineError
from engine.events import record
from engine.format import human_bytes
from engine.gpus import Gpu, list_gpus, parse_choice
from engine.jobs import settle_deployment
from engine.localmodel import check_name
from engine.models import find_model


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


@dataclass
class FitCheck:
    """Whether the model fits where it will run: estimated weights + KV cache against what is free."""

    needed: MemoryEstimate
    available: int  # bytes free on the chosen GPUs (within vLLM's fraction), or RAM on the CPU
    where: str  # "GPU 0", "GPUs 0,1", "RAM"
    rough: bool = False  # from the parameter count alone: the model is not downloaded yet

    @property
    def verdict(self) -> str:
        return fit_verdict(self.needed.total, self.available)

    @property
    def needs(self) -> str:
        if self.rough:
            kv = " (weights only, until it is downloaded)"
        elif not self.needed.kv_cache:
            kv = " (weights only; no config.json gives the KV cache)"
        else:
            kv = f" (weights {human_bytes(self.needed.weights)} + KV cache {human_bytes(self.needed.kv_cache)})"
        return f"needs about {human_bytes(self.needed.total)} of {human_bytes(self.available)} free {self.where}{kv}"

    def describe(self) -> str:
        return f"{self.needs}: {self.verdict}"


@dataclass
class DeployPlan:
    """What `deploy` would start, checked: the drawer shows it while the settings change."""

    model: Model
    base: Model | None  # an adapter's base
    settings: DeploySettings  # with the port chosen
    backend: str
    gpus: str  # "cpu" or a comma list of indexes
    fit: FitCheck | None  # None on a cluster: its scheduler judges
    served_name: str
    name: str  # the deployment's (default: the served name)

    @property
    def warnings(self) -> list[str]:
        """What to know before launch, beside the fit."""
        notes = []
        if self.settings.exposed:
            notes.append(f"{self.settings.host} is reachable from other machines (with the API key)")
        if self.backend == "kubernetes":
            context, _, namespace = self.settings.target.partition("/")
            notes.append(f"runs on the cluster {context!r}, namespace {namespace or 'default'!r}, with "
                         f"{self.gpus} GPU{'s' if self.gpus != '1' else ''}; reached here through a port-forward")
            if shutil.which("kubectl") is None:
                notes.append("kubectl is not on PATH: the server will run on the cluster, but Connect and chat "
                             "from here need kubectl port-forward")
            return notes
        if self.model.state == ModelState.PENDING:
            notes.append(f"{self.model.name} is still downloading; the server starts once it is Ready")
        return notes


def _model(session: Session, model_name: str | int) -> Model:
    """By name (the shell), or by id (the dashboard knows it)."""
    model = find_model(session, model_name) if isinstance(model_name, str) else session.get(Model, model_name)
    if model is None:
        raise EngineError("that model was deleted")
    return model


def _deployable(session: Session, model: Model) -> Model | None:
    """Refuse a model that cannot be served; returns an adapter's base. A model still downloading from
    the Hub can be deployed: its server starts once the download is done."""
    if on := model.meta.get("cluster"):
        raise EngineError(f"{model.name}'s files are on the cluster {on['target']}, where it was fine-tuned: deploy "
                          "it with that target")
    downloading = model.state == ModelState.PENDING and model.repo_id and model.kind == ModelKind.BASE
    if not downloading and (model.state != ModelState.READY or not model.path):
        raise EngineError(f"{model.name!r} is {model.state.value}; deploy it once it is Ready")
    if model.kind != ModelKind.ADAPTER:
        return None
    base = session.get(Model, model.base_id) if model.base_id else None
    if base is None or base.state != ModelState.READY:
        raise EngineError(f"the base model of the adapter {model.name!r} is missing or not Ready")
    return base


def _fit(session: Session, model: Model, base: Model | None, settings: DeploySettings, backend: str,
         gpus: str, available_gpus: list[Gpu]) -> FitCheck:
    if model.path and model.state == ModelState.READY:
        weights_from = base or model
        size = (weights_from.size_bytes or 0) + ((model.size_bytes or 0) if base else 0)
        needed, rough = estimate_memory(weights_from.path, size, settings.dtype, settings.max_model_len or None), False
    else:  # downloading: 2 bytes a parameter (bf16/fp16, as most checkpoints are stored), no KV cache yet
        entry = session.get(CommunityModel, model.repo_id) if model.repo_id else None
        bytes_per = DTYPE_BYTES.get(settings.dtype, 2)
        needed, rough = MemoryEstimate((entry.params if entry else 0) * bytes_per, 0), True
    if gpus == "cpu":
        return FitCheck(needed, psutil.virtual_memory().available, "RAM", rough)
    chosen = [g for g in available_gpus if str(g.index) in gpus.split(",")]
    if backend == "transformers":
        chosen = chosen[:1]  # the built-in server runs on the first chosen GPU
    share = settings.gpu_memory_fraction if backend == "vllm" else 1.0
    mib = 2**20
    free = sum(min(g.memory_free_mb, g.memory_total_mb * share) * mib for g in chosen)
    where = "GPU " + ",".join(str(g.index) for g in chosen) if len(chosen) == 1 else \
        "GPUs " + ",".join(str(g.index) for g in chosen)
    return FitCheck(needed, int(free), where, rough)


def _check_name_and_port(session: Session, name: str, port: int) -> set[int]:
    """A live deployment keeps its name and its port (a server binds its port only once its model is
    loaded: the port is taken even while nothing listens on it yet). Returns the ports kept."""
    kept = set()
    for live in session.exec(select(Deployment).where(Deployment.state.in_(LIVE_DEPLOYMENT_STATES))):
        live_port = live.loads(live.settings_json, {}).get("port")
        if live.name == name:
            raise EngineError(f"a deployment named {name!r} is already running; stop it, or give this one another "
                              "name")
        if port and live_port == port:
            raise EngineError(f"port {port} is kept for deployment {live.name!r}; choose another, or leave it "
                              "empty for a free one")
        kept.add(live_port)
    return kept


def _name_and_kept_ports(session: Session, name: str | None, settings: DeploySettings,
                         model: Model) -> tuple[str, set[int]]:
    """The deployment's name (given, else from the served name or the model's), checked free, and the
    ports live deployments keep."""
    name = name or re.sub(r"[^A-Za-z0-9._-]+", "-", settings.served_name).strip("-.") or model.name
    check_name(name, "deployment name")
    return name, _check_name_and_port(session, name, settings.port)


def _listen_check(settings: DeploySettings, kept_ports: set[int]) -> DeploySettings:
    """The port: a free one when not given, else one nothing listens on; the address must be this
    machine's."""
    try:
        if settings.port == 0:
            return dataclasses.replace(settings, port=free_port(settings.host, avoid=kept_ports))
        if not port_free(settings.host, settings.port):
            raise EngineError(f"port {settings.port} on {settings.host} is in use by another program; choose "
                              "another, or leave it empty for a free one")
    except socket.gaierror:
        raise EngineError(f"bind address {settings.host!r}: not a known host name or IP address") from None
    except OSError as exc:
        raise EngineError(f"bind address {settings.host!r}: cannot listen there ({exc.strerror}); use 127.0.0.1, "
                          "0.0.0.0 or an address of this machine") from None
    return settings


def plan(db: Database, model_name: str | int, settings: DeploySettings, available_gpus: list[Gpu] | None = None,
         name: str | None = None) -> DeployPlan:
    """Every check that can be made before launch; raises EngineError with what to change."""
    if problems := settings.problems():
        raise EngineError("; ".join(problems.values()))
    if settings.target:
        return _plan_on_cluster(db, model_name, settings, name)
    available_gpus = list_gpus() if available_gpus is None else available_gpus
    try:
        gpus = parse_choice(settings.gpus, available_gpus)
    except ValueError as exc:
        raise EngineError(str(exc)) from None
    backend = choose_backend(settings.backend, gpus != "cpu", vllm_available())
    if backend == "vllm" and (gpus == "cpu" or not vllm_available()):
        raise EngineError("vLLM needs a CUDA GPU and the vllm command; choose the built-in server (transformers)")
    if backend == "vllm" and settings.tensor_parallel > len(gpus.split(",")):
        raise EngineError(f"tensor-parallel size {settings.tensor_parallel} needs as many GPUs; "
                          f"{len(gpus.split(','))} chosen ({gpus})")
    if backend == "transformers" and settings.tensor_parallel > 1:
        raise EngineError("tensor parallel needs vLLM; the built-in server runs a model on one device")
    with db.read() as session:
        model = _model(session, model_name)
        base = _deployable(session, model)
        name, kept = _name_and_kept_ports(session, name, settings, model)
        limit = context_limit((base or model).path) if model.path else None
        if limit and settings.max_model_len > limit:
            raise EngineError(f"max model length {settings.max_model_len:,} is over the model's own limit of "
                              f"{limit:,} tokens; leave it empty for {limit:,}")
        settings = _listen_check(settings, kept)
        fit = _fit(session, model, base, settings, backend, gpus, available_gpus)
    return DeployPlan(model, base, settings, backend, gpus, fit, settings.served_name or model.name, name)


def _plan_on_cluster(db: Database, model_name: str | int, settings: DeploySettings, name: str | None) -> DeployPlan:
    """A Kubernetes target: vLLM on the cluster, which downloads the model from the Hub itself; reached
    from here through a port-forward on a free local port. The fit is the cluster scheduler's to judge."""
    from engine.kube.cluster import check_target
    from engine.kube.manifests import VLLM_IMAGE_ENV, vllm_image

    context, namespace = check_target(settings.target)
    # The context's namespace if none was given. The image is resolved here and stored with the deployment: its
    # supervisor and its details read it there, whatever their own environment.
    settings = dataclasses.replace(settings, target=f"{context}/{namespace}", image=vllm_image(settings.image))
    if problems := settings.problems():  # the image may come from $MODELDECK_VLLM_IMAGE
        raise EngineError("; ".join(problems.values()) + f" (${VLLM_IMAGE_ENV})")
    with db.read() as session:
        model = _model(session, model_name)
        base = session.get(Model, model.base_id) if model.kind == ModelKind.ADAPTER and model.base_id else None
        name, kept = _name_and_kept_ports(session, name, settings, model)
    served = settings.served_name or model.name
    cluster_deploy(name, settings.target, model, base, served, settings, "")  # refuses what the cluster cannot serve
    local = dataclasses.replace(settings, host="127.0.0.1", backend="vllm")  # the port-forward's end, here
    local = _listen_check(local, kept)
    return DeployPlan(model, base, local, "kubernetes", str(settings.tensor_parallel), None, served, name)


def cluster_deploy(name: str, target: str, model: Model, base: Model | None, served_name: str,
                   settings: DeploySettings, api_key: str):
    """The objects' description of a deployment on a cluster (engine/kube/manifests.py). The cluster
    downloads a base model from the Hub itself; an adapter must be one fine-tuned on that same cluster and
    namespace, whose files are on a volume there."""
    from engine.kube.cluster import parse_target
    from engine.kube.manifests import ClusterAdapter, ClusterDeploy, vllm_image

    _context, namespace = parse_target(target)
    adapter, weights = None, model
    if model.kind == ModelKind.ADAPTER:
        on = model.meta.get("cluster")
        if not on:
            raise EngineError(f"{model.name}'s files are on this machine: a cluster serves an adapter fine-tuned on "
                              "it (a fine-tune with that cluster as its target)")
        if parse_target(on["target"]) != parse_target(target):
            raise EngineError(f"{model.name} was fine-tuned on {on['target']}, where its files are: deploy it there")
        if model.state != ModelState.READY:
            raise EngineError(f"{model.name!r} is {model.state.value}; deploy it once it is Ready")
        if base is None or not base.repo_id:
            raise EngineError(f"the base model of {model.name!r} is missing")
        rank = int((model.meta.get("hyperparameters") or {}).get("rank", 16))
        adapter, weights = ClusterAdapter(on["volume"], on["folder"], rank), base
    elif not model.repo_id or model.kind != ModelKind.BASE:
        raise EngineError(f"{model.name} is not a model from the Hub: a cluster downloads what it serves, so only a "
                          "base model from the Hub (or an adapter fine-tuned on that cluster) can be deployed there")
    return ClusterDeploy(name, namespace, weights.repo_id, weights.revision, served_name, settings,
                         settings.tensor_parallel, api_key, hf_token=hub.token(), image=vllm_image(settings.image),
                         adapter=adapter)


def deploy(db: Database, model_name: str | int, settings: DeploySettings, name: str | None = None,
           force: bool = False) -> tuple[Deployment, Job]:
    """Check everything, then register a Pending deployment and start its supervising job."""
    return start(db, plan(db, model_name, settings, name=name), force)


def start(db: Database, checked: DeployPlan, force: bool = False) -> tuple[Deployment, Job]:
    """Register a Pending deployment for a plan and start its supervising job. A model that does not fit
    is refused unless `force`d."""
    if checked.fit is not None and checked.fit.verdict == "does not fit" and not force:
        raise EngineError(f"{checked.model.name} does not fit: it {checked.fit.needs}. Lower the max model "
                          "length or choose other GPUs, or override the check to deploy anyway")
    settings, served = checked.settings, checked.served_name
    with db.write() as session:
        model = session.get(Model, checked.model.id)
        if model is None:
            raise EngineError(f"{checked.model.name!r} was deleted meanwhile")
        if checked.backend != "kubernetes":
            _deployable(session, model)
        _check_name_and_port(session, checked.name, settings.port)  # again, under the write lock
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host  # where to reach it from here
        host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
        waiting = model.state == ModelState.PENDING and checked.backend != "kubernetes"
        deployment = Deployment(
            model_id=model.id, name=checked.name, backend=checked.backend,
            phase="waiting for the download" if waiting else "starting", served_name=served,
            api_key="sk-md-" + secrets.token_urlsafe(24), gpus=checked.gpus,
            endpoint=f"http://{host}:{settings.port}/v1", settings_json=Deployment.dumps(dataclasses.asdict(settings)))
        session.add(deployment)
        session.flush()
        record(session, f"deployment:{deployment.id}", "created", f"deploy {model.name} with {checked.backend}",
               state="pending")
        job = jobs.create(session, JobKind.SERVE, f"serve {model.name} ({checked.backend})", None,
                          deployment_id=deployment.id, on_cluster=checked.backend == "kubernetes")
        deployment.job_id = job.id
    jobs.spawn(db, job)
    return deployment, job


def stop(db: Database, name: str | int) -> Deployment:
    """Stop the server cleanly (terminate, deadline, kill the group); the deployment ends Stopped."""
    with db.read() as session:
        deployment = find_deployment(session, name)
    if deployment.backend == "external":
        raise EngineError(f"{deployment.name!r} is an external endpoint: modeldeck does not run it, so there is "
                          "nothing to stop; delete removes it from the list")
    if not deployment.state.is_live():
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
    """Remove a stopped or failed deployment's record (an external endpoint's at any time), with its
    conversations."""
    from engine.endpoints import forget_key

    with db.write() as session:
        deployment = find_deployment(session, name)
        if deployment.state.is_live() and deployment.backend != "external":
            raise EngineError(f"deployment {deployment.name!r} is {deployment.state.value}; stop it first")
        settings = deployment.loads(deployment.settings_json, {})
        kept_in_keyring = deployment.backend == "external" and settings.get("key_keyring")
        target = settings.get("target") if deployment.backend == "kubernetes" else None
        name, api_key = deployment.name, deployment.api_key
        session.delete(deployment)
        record(session, f"deployment:{deployment.id}", "deleted", f"deleted {name}")
    if kept_in_keyring:
        forget_key(name)  # after the commit, and never in its way
    if target:  # normally gone already (its supervisor deletes them); not if the supervisor was killed
        from engine.kube import cluster
        from engine.kube.manifests import Owner

        cluster.delete_owned(target, Owner.deployment(name, api_key), f"deployment {name!r}")


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
