"""Deployments: start one (the checks, a Pending row, a supervising job), stop it, delete it, list them.

Where it runs is its target's (engine/targets): the plan's checks that depend on it, the server its
supervising job (engine/jobs/serve.py) starts there, what is left to delete. The supervisor moves the
deployment through its phases to Ready and watches it; whoever reconciles settles one whose supervisor is
gone.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from dataclasses import dataclass, field

from sqlmodel import Session, select, update

from catalog import Database
from catalog.schema import (
    Conversation,
    Deployment,
    DeploymentAdapter,
    DeploymentState,
    Job,
    JobKind,
    Model,
    ModelKind,
    ModelState,
)
from catalog.states import LIVE_DEPLOYMENT_STATES
from engine import jobs, targets
from engine.backends import FIELD_LABELS, DeploySettings, FitCheck
from engine.errors import EngineError
from engine.events import record
from engine.gpus import Gpu
from engine.lifecycle import settle_deployment
from engine.localmodel import check_name
from engine.models import model_for, registered


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
class DeployPlan:
    """What `deploy` would start, checked: the drawer shows it while the settings change."""

    model: Model
    base: Model | None  # an adapter's base
    settings: DeploySettings  # with the port chosen and the target's options resolved
    target: targets.Target
    serving: targets.Serving  # how its target will serve it
    served_name: str
    name: str  # the deployment's (default: the served name)
    replaces: list[Deployment] = field(default_factory=list)  # ended ones of that name, which it replaces
    restarts: Deployment | None = None  # the one of them it starts again: its API key and chats are kept
    notes: list[str] = field(default_factory=list)  # what changed from the settings asked for
    # each adapter it serves beside its base, under its name (a deployed adapter first, under the served name)
    adapters: list[tuple[str, Model]] = field(default_factory=list)

    @property
    def backend(self) -> str:
        return self.serving.backend

    @property
    def gpus(self) -> str:
        return self.serving.gpus

    @property
    def fit(self) -> FitCheck | None:  # None on a cluster: its scheduler judges
        return self.serving.fit

    @property
    def warnings(self) -> list[str]:
        """What to know before launch, beside the fit."""
        notes = []
        if self.settings.exposed and "host" in self.target.DEPLOY_FIELDS:  # an address chosen here
            notes.append(f"{self.settings.host} is reachable from other machines (with the API key)")
        for ended in self.replaces if self.restarts is None else ():  # a start again replaces only itself
            notes.append(f"replaces the {ended.state.value} deployment {ended.name!r} (its record and chats)")
        return notes + self.notes + self.serving.warnings


def _model(session: Session, model_name: str | int, target: targets.Target) -> Model:
    """By name or repo id (the shell; a cluster target downloads a Hub model itself), or by id (the dashboard
    knows it)."""
    model = model_for(session, model_name, target) if isinstance(model_name, str) else session.get(Model, model_name)
    if model is None:
        raise EngineError("that model was deleted")
    return model


def _base(session: Session, model: Model) -> Model | None:
    return session.get(Model, model.base_id) if model.kind == ModelKind.ADAPTER and model.base_id else None


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


def plan(db: Database, model_name: str | int, settings: DeploySettings, available_gpus: list[Gpu] | None = None,
         name: str | None = None, adapters: list[str | int | tuple[str | int, str]] = ()) -> DeployPlan:
    """Every check that can be made before launch, here and by its target; raises EngineError with what to
    change. `adapters`: custom models (by name or id, or (model, served name)) served beside the model on its
    base, each under its own name."""
    from engine.backends import lora_rank, vllm_lora_rank
    from engine.deployment_adapters import checked_for_deploy

    if problems := settings.problems():
        raise EngineError("; ".join(problems.values()))
    target = targets.resolve(settings.target).checked()  # a Kubernetes target takes its context's namespace
    _refuse_what_it_does_not_use(target, settings)
    settings = dataclasses.replace(settings, target=target.spec, options=target.options(settings.options, "deploy"))
    with db.read() as session:
        model = _model(session, model_name, target)
        base = _base(session, model)
        name, kept = _name_and_kept_ports(session, name, settings, model)
        served_name = settings.served_name or model.name
        asked = [(a, None) if not isinstance(a, tuple) else a for a in adapters]
        extra = checked_for_deploy(session, model, [(_model(session, a, targets.here()), as_) for a, as_ in asked],
                                   served_name)
        served = ([(served_name, model)] if model.kind == ModelKind.ADAPTER else []) + extra
        replaces = _ended_named(session, name)
        serving = target.plan_deploy(session, model, base, settings, kept, available_gpus, served)
    if serving.backend in ("vllm", "kubernetes") and served and not serving.settings.max_lora_rank:
        # vLLM reserves room for adapters of a rank it is told at start: the highest of these
        ranks = [lora_rank(a.path) or int((a.meta.get("hyperparameters") or {}).get("rank", 16)) for _, a in served]
        serving.settings = dataclasses.replace(serving.settings, max_lora_rank=vllm_lora_rank(max(ranks)))
    return DeployPlan(model, base, serving.settings, target, serving, served_name, name, replaces, adapters=served)


def _refuse_what_it_does_not_use(target: targets.Target, settings: DeploySettings) -> None:
    """A setting the target decides itself (the port a batch job's node picks, say), given anyway: refused
    rather than dropped."""
    for f in dataclasses.fields(DeploySettings):
        if f.name in ("target", "options") or f.name in target.DEPLOY_FIELDS:
            continue
        if getattr(settings, f.name) != f.default:
            raise EngineError(f"{FIELD_LABELS[f.name]} {getattr(settings, f.name)!r}: {target.label} decides it itself; "
                              "leave it out there")


def _check_auto_gpus(session: Session, checked: DeployPlan) -> None:
    """GPUs auto chose are still nobody's (another deployment may have been given them since the plan)."""
    from engine.gpus import given_here, is_auto

    if not is_auto(checked.settings.gpus):
        return  # typed: the user may share a GPU
    given = given_here(session)
    if clash := sorted(i for i in checked.target.gpus_here(checked.gpus) if i in given):
        who = "; ".join(f"GPU {i}: {', '.join(given[i])}" for i in clash)
        raise EngineError(f"auto chose GPU {','.join(map(str, clash))}, given meanwhile to other work ({who}); "
                          "deploy again and auto chooses among the GPUs left")


def _ended_named(session: Session, name: str) -> list[Deployment]:
    """Stopped or failed deployments of this name: a new one of the name takes their place."""
    return list(session.exec(select(Deployment).where(
        Deployment.name == name, Deployment.backend != "external",
        Deployment.state.in_([DeploymentState.STOPPED, DeploymentState.FAILED]))))


def deploy(db: Database, model_name: str | int, settings: DeploySettings, name: str | None = None,
           force: bool = False, replace: bool = False, adapters: list = ()) -> tuple[Deployment, Job]:
    """Check everything, then register a Pending deployment and start its supervising job."""
    return start(db, plan(db, model_name, settings, name=name, adapters=adapters), force, replace)


def asked_settings(stored: dict) -> DeploySettings:
    """A deployment's stored settings as they can be asked for again: not what its target filled in (a batch
    job's address, a cluster's backend), which the target decides again and refuses to be told."""
    target = targets.resolve(stored.get("target", ""))
    return DeploySettings(**{f.name: stored[f.name] for f in dataclasses.fields(DeploySettings) if f.name in stored
                             and (f.name in ("target", "options") or f.name in target.DEPLOY_FIELDS)})


def replan(db: Database, name: str | int) -> DeployPlan:
    """The plan to start a stopped or failed deployment again: its settings, its name and API key (clients keep
    theirs), its chats; its port if that is still free, else a free one."""
    from engine.backends import port_free

    with db.read() as session:
        old = find_deployment(session, name)
    if old.backend == "external":
        raise EngineError(f"{old.name!r} is an external endpoint: modeldeck does not run it, so there is nothing "
                          "to start")
    if old.state.is_live():
        raise EngineError(f"deployment {old.name!r} is {old.state.value} already")
    if old.model_id is None:
        raise EngineError(f"the model {old.name!r} served was deleted: deploy another under this name")
    from engine.deployment_adapters import served_adapters

    settings = asked_settings(old.loads(old.settings_json, {}))
    target = targets.resolve(settings.target)
    with db.read() as session:  # what it served when it stopped, under the same names
        served = served_adapters(session, old.id)
    adapters = [(s.model.id, s.served_name) for s in served if s.model is not None and s.model.id != old.model_id]
    notes = [f"the adapter served as {s.served_name!r} was deleted: not served" for s in served if s.model is None]
    if settings.port and target.is_here:
        with db.read() as session:
            kept = _check_name_and_port(session, old.name, 0)  # the ports live deployments keep
        if settings.port in kept or not port_free(settings.host, settings.port):
            notes.append(f"port {settings.port} is taken now: it listens on another")
            settings = dataclasses.replace(settings, port=0)  # a free one, which the plan chooses
    return dataclasses.replace(plan(db, old.model_id, settings, name=old.name, adapters=adapters), restarts=old,
                               notes=notes)


def restart(db: Database, name: str | int, force: bool = False) -> tuple[Deployment, Job]:
    return start(db, replan(db, name), force)


def start(db: Database, checked: DeployPlan, force: bool = False, replace: bool = False) -> tuple[Deployment, Job]:
    """Register a Pending deployment for a plan and start its supervising job. A model that does not fit
    is refused unless `force`d; a stopped or failed deployment of the same name is replaced only if
    `replace` (the user was asked), or if the plan starts it again."""
    if checked.fit is not None and checked.fit.verdict == "does not fit" and not force:
        raise EngineError(f"{checked.model.name} does not fit: it {checked.fit.needs}. Lower the max model "
                          "length or choose other GPUs, or override the check to deploy anyway")
    settings, served = checked.settings, checked.served_name
    with db.write() as session:
        model = registered(session, checked.model)
        if model is None:
            raise EngineError(f"{checked.model.name!r} was deleted meanwhile")
        checked.target.recheck_deploy(session, model)
        _check_name_and_port(session, checked.name, settings.port)  # again, under the write lock
        _check_auto_gpus(session, checked)
        ended = _ended_named(session, checked.name)
        key_of = checked.restarts.id if checked.restarts is not None else None
        if ended and not replace and key_of is None:
            raise EngineError(f"a {ended[-1].state.value} deployment named {checked.name!r} exists: "
                              f"`modeldeck start {checked.name}` starts it again with its settings, or replace it "
                              "with this one (--replace), or choose another name")
        kept = session.get(Deployment, key_of) if key_of is not None else None
        if key_of is not None and kept is None:
            raise EngineError(f"deployment {checked.name!r} was deleted meanwhile: deploy it anew")
        if key_of is not None:  # a start again replaces only itself: other ended rows of the name stay as they are
            ended = [kept]
        deployment = Deployment(
            model_id=model.id, name=checked.name, backend=checked.backend, phase=checked.serving.first_phase,
            served_name=served, api_key=kept.api_key if kept else "sk-md-" + secrets.token_urlsafe(24),
            gpus=checked.gpus, endpoint=checked.serving.endpoint,
            settings_json=Deployment.dumps(dataclasses.asdict(settings)))
        session.add(deployment)
        session.flush()
        for served_name, adapter in checked.adapters:
            if (now := session.get(Model, adapter.id)) is None or now.state != ModelState.READY:
                raise EngineError(f"the adapter {adapter.name!r} was deleted or changed meanwhile")
            session.add(DeploymentAdapter(deployment_id=deployment.id, model_id=adapter.id, served_name=served_name))
        for old in ended:  # one row per name: the new one takes the place of the ended ones
            if old.id == key_of:
                session.exec(update(Conversation).where(Conversation.deployment_id == old.id)
                             .values(deployment_id=deployment.id))
            session.delete(old)
            record(session, f"deployment:{old.id}", "deleted", f"{old.name} replaced by deployment {deployment.id}")
        record(session, f"deployment:{deployment.id}", "created",
               f"{'start again' if kept else 'deploy'} {model.name} with {checked.backend}", state="pending")
        job = jobs.create(session, JobKind.SERVE, f"serve {model.name} ({checked.backend})", None,
                          deployment_id=deployment.id, target=checked.target.spec)
        deployment.job_id = job.id
    left = []
    # What a replaced one left on its target, as a delete does, before the new one starts there; not when it
    # is started again: its objects and run folder are the new one's (same name and key).
    for old in ended if key_of is None else ():
        try:
            targets.of_deployment(old).delete_deployment(old)
        except EngineError as exc:  # the new deployment goes on; what is left is said in its log
            left.append(f"could not clean up what {old.name} (deployment {old.id}) left: {exc}")
    jobs.spawn(db, job)
    for problem in left:
        jobs.append_log(jobs.get(db, job.id).log_path, problem)
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
        target = targets.of_deployment(deployment)
        session.delete(deployment)
        record(session, f"deployment:{deployment.id}", "deleted", f"deleted {deployment.name}")
    if kept_in_keyring:
        forget_key(deployment.name)  # after the commit, and never in its way
    target.delete_deployment(deployment)  # what it left there (normally its supervisor removed it)
