"""Operations on models, shared by the CLI and the dashboard: list, pull, import, delete, retry.

Each function does one user-visible thing and raises EngineError with a one-line reason when it
cannot. Long work (downloads, GGUF conversion) is handed to a job process.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlmodel import Session, select

from catalog import Database
from catalog.schema import (
    CommunityModel,
    Deployment,
    DeploymentAdapter,
    DeploymentState,
    Job,
    JobKind,
    JobState,
    Model,
    ModelKind,
    ModelState,
)
from catalog.states import LIVE_DEPLOYMENT_STATES
from engine import hub, jobs, targets
from engine.errors import EngineError
from engine.events import record
from engine.lifecycle import move_model
from engine.localmodel import (
    check_gguf,
    check_model_folder,
    check_name,
    output_folders,
)

REPO_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ModelRow:
    """A custom model with what the tables show beside it: its running job and its base's name."""

    model: Model
    job: Job | None
    base_name: str | None
    cancelled: bool = False  # Failed because its last job was cancelled: asked for, not an error


@dataclass
class CommunityRow:
    entry: CommunityModel
    model: Model | None  # the custom model downloaded from it, if any


def community_entries(db: Database) -> list[CommunityModel]:
    with db.read() as session:
        return list(session.exec(select(CommunityModel).order_by(CommunityModel.position)))


def community_rows(db: Database) -> list[CommunityRow]:
    entries = community_entries(db)
    with db.read() as session:
        by_repo = {m.repo_id: m for m in session.exec(select(Model).where(Model.repo_id.is_not(None)))}
    return [CommunityRow(entry, by_repo.get(entry.repo_id)) for entry in entries]


def model_rows(db: Database, ids: set[int] | None = None) -> list[ModelRow]:
    """Custom models (all, or those with `ids`), each with its latest unfinished job."""
    with db.read() as session:
        query = select(Model).order_by(Model.created_at)
        if ids is not None:
            query = query.where(Model.id.in_(list(ids)))
        models = session.exec(query).all()
        wanted = [m.id for m in models]
        active = {
            job.model_id: job
            for job in session.exec(
                select(Job).where(Job.model_id.in_(wanted), Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
                .order_by(Job.id)
            )
        }
        base_ids = {m.base_id for m in models if m.base_id}
        names = dict(session.exec(select(Model.id, Model.name).where(Model.id.in_(list(base_ids)))).all())
        failed = [m.id for m in models if m.state == ModelState.FAILED]
        last_state = dict(session.exec(select(Job.model_id, Job.state).where(Job.model_id.in_(failed))
                                       .order_by(Job.id)).all())  # the latest job of each wins
    return [ModelRow(m, active.get(m.id), names.get(m.base_id), last_state.get(m.id) == JobState.CANCELLED)
            for m in models]


def find_model(session: Session, name: str) -> Model:
    model = session.exec(select(Model).where(Model.name == name)).first()
    if model is None and name.isdigit():
        model = session.get(Model, int(name))
    if model is None:
        raise EngineError(f"no custom model named {name!r} (see `modeldeck ls`)")
    return model


def model_for(session: Session, name: str, target) -> Model:
    """A custom model by name, or a model of the Hub by its repo id ("owner/name": a name has no "/"): the one
    already in Custom, else one that lives on `target`, which downloads it itself (a cluster). That one is
    not registered yet: `registered` does it when the work it is for starts."""
    if "/" not in name:
        return find_model(session, name)
    if not REPO_PATTERN.match(name):
        raise EngineError(f"invalid repo id {name!r}: expected 'owner/name', e.g. Qwen/Qwen2.5-0.5B-Instruct")
    existing = session.exec(select(Model).where(Model.repo_id == name)).first()
    if existing is not None:
        return existing
    if not target.DOWNLOADS:
        raise EngineError(f"{name} is not on this machine: download it first (modeldeck pull {name}), or choose a "
                          "target that downloads it itself (--target)")
    owner, repo_name = name.split("/")
    return Model(name=_free_name(session, [repo_name, f"{owner}-{repo_name}"]), kind=ModelKind.BASE,
                 state=ModelState.READY, source=f"hub:{name}", repo_id=name, meta_json=Model.dumps(target.lives_there()))


def registered(session: Session, model: Model) -> Model | None:
    """Under the write lock: the model a plan named, as it is now (None: deleted meanwhile); one of the Hub
    that lives on a target (`model_for`) is registered now, showing in Custom from then on."""
    if model.id is not None:
        return session.get(Model, model.id)
    already = session.exec(select(Model).where(Model.repo_id == model.repo_id)).first()
    if already is not None:
        return already
    model.name = _free_name(session, [model.name])
    session.add(model)
    session.flush()
    record(session, f"model:{model.id}", "created", f"{model.repo_id}, downloaded by {targets.home_of(model).label}",
           state=model.state.value)
    return model


def get_model(db: Database, name: str) -> ModelRow:
    with db.read() as session:
        model_id = find_model(session, name).id
    return model_rows(db, {model_id})[0]


def _name_taken(session: Session, name: str) -> bool:
    return session.exec(select(Model).where(Model.name == name)).first() is not None


def _check_name(session: Session, name: str) -> None:
    check_name(name)
    if _name_taken(session, name):
        raise EngineError(f"a custom model named {name!r} already exists; choose another name")


def _free_name(session: Session, candidates: list[str]) -> str:
    """The first candidate not taken, else the first with a number appended (for names nobody chose)."""
    for name in candidates:
        if not _name_taken(session, name):
            return name
    number = 2
    while _name_taken(session, f"{candidates[0]}-{number}"):
        number += 1
    return f"{candidates[0]}-{number}"


def pull(db: Database, repo_id: str, name: str | None = None) -> tuple[Model, Job]:
    """Start downloading `repo_id` into the Hugging Face cache as a Pending base model.

    A failed or cancelled earlier download of the same repo is retried in place (resuming its
    partial files); a Ready or still-downloading one is an error."""
    repo_id = repo_id.strip()
    if not REPO_PATTERN.match(repo_id):
        raise EngineError(f"invalid repo id {repo_id!r}: expected 'owner/name', e.g. Qwen/Qwen2.5-0.5B-Instruct")
    with db.write() as session:
        model = session.exec(select(Model).where(Model.repo_id == repo_id)).first()
        leftover = None
        elsewhere = model is not None and not targets.home_of(model).files_here(model)  # a cluster downloads it itself
        if model is not None and model.state == ModelState.READY and not elsewhere:
            raise EngineError(f"{repo_id} is already downloaded as {model.name!r}")
        if model is not None and model.state == ModelState.PENDING:
            raise EngineError(f"{repo_id} is already being downloaded as {model.name!r}")
        if model is None:
            if name:
                _check_name(session, name)
            else:  # Download in the dashboard gives no name: never refuse for a clash
                owner, repo_name = repo_id.split("/")
                name = _free_name(session, [repo_name, f"{owner}-{repo_name}"])
            model = Model(name=name, kind=ModelKind.BASE, source=f"hub:{repo_id}", repo_id=repo_id)
            session.add(model)
            session.flush()
            record(session, f"model:{model.id}", "created", f"download of {repo_id}")
        else:  # a failed download again, or one that lived only on a target, here now too
            leftover = model.path if model.owns_path else None  # a failed conversion from a mirror
            kept_there = targets.home_of(model).lives_there() if elsewhere else {}
            meta = {k: v for k, v in model.meta.items() if k not in kept_there}
            move_model(session, model, ModelState.PENDING, message="downloading here" if elsewhere else "retrying download",
                       path=None, owns_path=False, meta_json=Model.dumps(meta))
        job = jobs.create(session, JobKind.DOWNLOAD, f"download {repo_id}", model.id, repo_id=repo_id)
        model.job_id = job.id
    if leftover:  # removed after the commit: not while holding the lock every writer waits on
        for folder in output_folders(Path(leftover)):
            shutil.rmtree(folder, ignore_errors=True)
    jobs.spawn(db, job)
    return model, job


# What a retry starts again, by the model's source (see `retry`).
RETRIED = {"hub": "download", "mirror": "download", "import": "conversion", "finetune": "fine-tune (resumes)",
           "merge": "merge"}


def retry_label(model: Model) -> str | None:
    """What retrying a failed model would start again ("download", "conversion", ...), or None when it
    cannot be retried."""
    if model.state != ModelState.FAILED:
        return None
    origin = model.source.split(":")[0]
    if origin in ("hub", "mirror") and model.repo_id:
        return RETRIED[origin]
    if origin == "import" and model.meta.get("gguf"):
        return RETRIED[origin]
    if origin in ("finetune", "merge") and model.job_id:
        return RETRIED[origin]
    return None


def retry(db: Database, name: str) -> tuple[Model, Job]:
    """Start a failed download, GGUF conversion, fine-tune (from its last checkpoint) or merge again, in
    place (the row keeps its id and name)."""
    with db.read() as session:
        model = find_model(session, name)
    if model.state != ModelState.FAILED:
        raise EngineError(f"{model.name!r} is {model.state.value}; only a failed model can be retried")
    if model.repo_id and model.source.startswith(("hub:", "mirror:")):
        return pull(db, model.repo_id)
    gguf = model.meta.get("gguf")
    if model.source.startswith("import:") and gguf:
        check_gguf(Path(gguf))  # before anything changes: a moved file leaves the failed row as it was
        with db.write() as session:
            row = session.get(Model, model.id)
            if row is None or row.state != ModelState.FAILED:  # another retry won the race
                raise EngineError(f"{model.name!r} is already being retried")
            job = jobs.create(session, JobKind.IMPORT, f"import {Path(gguf).name}", row.id, gguf=gguf, output=row.path)
            move_model(session, row, ModelState.PENDING, message="retrying import", job_id=job.id)
        jobs.spawn(db, job)
        return row, job
    if model.job_id and model.source.startswith(("finetune:", "merge:")):
        from engine import finetune  # it builds on this module

        return finetune.rerun(db, model)
    raise EngineError(f"{model.name!r} cannot be retried; delete it and start again")


def import_path(db: Database, path: str | Path, name: str | None = None) -> tuple[Model, Job | None]:
    """Import a local model as a Custom base model.

    A folder in Hugging Face layout is registered where it is (never copied, never deleted by us) and is
    Ready at once; a GGUF file is converted to safetensors under MODELDECK_HOME/models by a job."""
    if isinstance(path, str) and not path.strip():  # Path("") would quietly mean the current folder
        raise EngineError("give the path of a model folder or a .gguf file")
    path = Path(path).expanduser().resolve()
    is_gguf = path.suffix.lower() == ".gguf"
    if is_gguf:
        check_gguf(path)
    else:
        config = check_model_folder(path)
    name = name or (path.stem if is_gguf else path.name)
    size = None if is_gguf else hub.snapshot_size(path)  # walks the folder: not under the write lock
    with db.write() as session:
        _check_name(session, name)
        if is_gguf:
            target = models_dir(db) / name
            if target.exists():
                raise EngineError(f"{target} already exists; choose another name with --name")
            model = Model(name=name, source=f"import:{path}", path=str(target), owns_path=True,
                          meta_json=Model.dumps({"gguf": str(path)}))
        else:
            model = Model(name=name, source=f"import:{path}", path=str(path), owns_path=False,
                          state=ModelState.READY, size_bytes=size,
                          meta_json=Model.dumps({"architectures": config.get("architectures"),
                                                 "model_type": config.get("model_type")}))
        session.add(model)
        session.flush()
        record(session, f"model:{model.id}", "created", f"import of {path}", state=model.state.value)
        job = None
        if is_gguf:
            job = jobs.create(session, JobKind.IMPORT, f"import {path.name}", model.id, gguf=str(path), output=str(target))
            model.job_id = job.id
    if job is not None:
        jobs.spawn(db, job)
    return model, job


def models_dir(db: Database) -> Path:
    path = db.path.parent / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def dependents(session: Session, model: Model) -> list[str]:
    """What stops `model` from being deleted, worded for the user."""
    reasons = [
        f"{child.kind.value} {child.name!r} is built on it"
        for child in session.exec(select(Model).where(Model.base_id == model.id))
    ]
    live = [dep.name for dep in session.exec(select(Deployment).where(
        Deployment.model_id == model.id, Deployment.state.in_(LIVE_DEPLOYMENT_STATES)))]
    serving = [dep.name for dep in session.exec(select(Deployment).join(
        DeploymentAdapter, DeploymentAdapter.deployment_id == Deployment.id).where(
        DeploymentAdapter.model_id == model.id, Deployment.model_id != model.id,
        Deployment.state.in_(LIVE_DEPLOYMENT_STATES)))]
    if serving:
        reasons.append(f"{', '.join(repr(name) for name in serving)} {'serve' if len(serving) > 1 else 'serves'} it "
                       f"beside {'their' if len(serving) > 1 else 'its'} base: unload it first "
                       f"(modeldeck unserve-adapter {model.name} {serving[0]})")
    if live:
        names = ", ".join(repr(name) for name in live[:5]) + (f" and {len(live) - 5} more" if len(live) > 5 else "")
        reasons.append(f"{'deployments' if len(live) > 1 else 'deployment'} {names} "
                       f"{'serve' if len(live) > 1 else 'serves'} it: stop {'them' if len(live) > 1 else 'it'} "
                       "first (x in Active deployments, or modeldeck stop)")
    return reasons


def ended_deployments(session: Session, model: Model) -> list[Deployment]:
    """Its stopped and failed deployments: history, deleted with the model."""
    return list(session.exec(select(Deployment).where(
        Deployment.model_id == model.id, Deployment.state.in_([DeploymentState.STOPPED, DeploymentState.FAILED]))))


def owns_files(model: Model) -> bool:
    """Whether deleting the model frees its files: a download's cache revision, or what modeldeck wrote
    under MODELDECK_HOME/models, or what its target keeps of it (a cluster fine-tune's volume). An imported
    folder stays where the user keeps it."""
    home = targets.home_of(model)
    if not home.is_here:
        return home.owns_files(model) or model.owns_path
    return model.owns_path or model.source.startswith("hub:")


@dataclass
class DeletePlan:
    model: Model
    blockers: list[str]  # why it cannot be deleted, if anything
    frees_bytes: int | None  # None when its files are not modeldeck's to delete
    running_jobs: list[int]
    ended_deployments: list[str]  # stopped or failed ones: their records go with the model


def delete_plan(db: Database, name: str) -> DeletePlan:
    """What deleting `name` would do: shown in the confirmation before anything happens."""
    with db.read() as session:
        model = find_model(session, name)
        running = session.exec(
            select(Job.id).where(Job.model_id == model.id, Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
        ).all()
        return DeletePlan(model, dependents(session, model), (model.size_bytes or 0) if owns_files(model) else None,
                          list(running), [d.name for d in ended_deployments(session, model)])


def delete_model(db: Database, name: str) -> int:
    """Delete a custom model and the disk it owns; returns the bytes freed.

    Refused while an adapter, merged model or deployment depends on it (checked again under the write
    lock, so nothing can start depending on it in between). An unfinished download or conversion is
    cancelled first. Files that are not modeldeck's (an imported folder) are left alone."""
    plan = delete_plan(db, name)
    model = plan.model
    if plan.blockers:
        raise EngineError(f"cannot delete {model.name!r}: " + "; ".join(plan.blockers))
    for job_id in plan.running_jobs:
        try:
            jobs.cancel(db, job_id)
        except EngineError:
            pass  # it finished meanwhile
    with db.write() as session:
        row = session.get(Model, model.id)
        if row is None:
            raise EngineError(f"{model.name!r} was deleted meanwhile")
        if blockers := dependents(session, row):
            raise EngineError(f"cannot delete {model.name!r}: " + "; ".join(blockers))
        model = row
        for deployment in ended_deployments(session, row):  # with their conversations (the database cascades)
            session.delete(deployment)
            record(session, f"deployment:{deployment.id}", "deleted", f"deleted {deployment.name} with its model")
        session.flush()
        session.delete(row)
        record(session, f"model:{model.id}", "deleted", f"deleted {model.name}")
    # The row is gone first: no record ever points at half-deleted files.
    home = targets.home_of(model)
    if not home.is_here:
        home.delete_files(model)  # what its target keeps of it (a cluster's volume, a batch job's folder)
    try:
        if model.owns_path and model.path:
            freed = 0
            for folder in output_folders(Path(model.path)):
                if folder.exists():
                    freed += hub.snapshot_size(folder)
                    shutil.rmtree(folder)
            return freed
        if model.source.startswith("hub:") and model.repo_id and home.is_here:
            return hub.delete_from_cache(model.repo_id, model.revision)
    except OSError as exc:
        raise EngineError(f"deleted {model.name!r}, but could not remove all of its files: {exc}") from exc
    return 0


def job_rows(db: Database, limit: int = 200) -> list[Job]:
    with db.read() as session:
        return list(session.exec(select(Job).order_by(Job.id.desc()).limit(limit)))
