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
from catalog.schema import CommunityModel, Deployment, DeploymentState, Job, JobKind, JobState, Model, ModelKind, ModelState, now
from engine import hub, jobs
from engine.errors import EngineError
from engine.events import record
from engine.localmodel import check_gguf, check_model_folder

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
REPO_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ModelRow:
    """A custom model with what the tables show beside it: its running job and its base's name."""

    model: Model
    job: Job | None
    base_name: str | None


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
    return [ModelRow(m, active.get(m.id), names.get(m.base_id)) for m in models]


def find_model(session: Session, name: str) -> Model:
    model = session.exec(select(Model).where(Model.name == name)).first()
    if model is None and name.isdigit():
        model = session.get(Model, int(name))
    if model is None:
        raise EngineError(f"no custom model named {name!r} (see `modeldeck ls`)")
    return model


def get_model(db: Database, name: str) -> ModelRow:
    with db.read() as session:
        model_id = find_model(session, name).id
    return model_rows(db, {model_id})[0]


def _check_name(session: Session, name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise EngineError(f"invalid name {name!r}: use letters, digits, '.', '_' or '-' (up to 100)")
    if session.exec(select(Model).where(Model.name == name)).first() is not None:
        raise EngineError(f"a custom model named {name!r} already exists; choose another name with --name")


def pull(db: Database, repo_id: str, name: str | None = None) -> tuple[Model, Job]:
    """Start downloading `repo_id` into the Hugging Face cache as a Pending base model.

    A failed or cancelled earlier download of the same repo is retried in place (resuming its
    partial files); a Ready or still-downloading one is an error."""
    repo_id = repo_id.strip()
    if not REPO_PATTERN.match(repo_id):
        raise EngineError(f"invalid repo id {repo_id!r}: expected 'owner/name', e.g. Qwen/Qwen2.5-0.5B-Instruct")
    with db.write() as session:
        model = session.exec(select(Model).where(Model.repo_id == repo_id)).first()
        if model is not None and model.state == ModelState.READY:
            raise EngineError(f"{repo_id} is already downloaded as {model.name!r}")
        if model is not None and model.state == ModelState.PENDING:
            raise EngineError(f"{repo_id} is already being downloaded as {model.name!r}")
        if model is None:
            name = name or repo_id.split("/")[1]
            _check_name(session, name)
            model = Model(name=name, kind=ModelKind.BASE, source=f"hub:{repo_id}", repo_id=repo_id)
            session.add(model)
            session.flush()
            record(session, f"model:{model.id}", "created", f"download of {repo_id}")
        else:
            model.state, model.reason, model.updated_at = ModelState.PENDING, None, now()
            session.add(model)
            record(session, f"model:{model.id}", "state", "retrying download", state="pending")
        job = jobs.create(session, JobKind.DOWNLOAD, f"download {repo_id}", model.id, repo_id=repo_id)
        model.job_id = job.id
    jobs.spawn(db, job)
    return model, job


def retry(db: Database, name: str) -> tuple[Model, Job]:
    with db.read() as session:
        model = find_model(session, name)
    if model.state != ModelState.FAILED:
        raise EngineError(f"{model.name!r} is {model.state.value}; only a failed model can be retried")
    if model.repo_id and model.source.startswith(("hub:", "mirror:")):
        return pull(db, model.repo_id)
    if model.source.startswith("import:"):
        with db.write() as session:
            session.delete(session.get(Model, model.id))
        return import_path(db, Path(model.source.removeprefix("import:")), model.name)
    raise EngineError(f"{model.name!r} cannot be retried; delete it and start again")


def import_path(db: Database, path: Path, name: str | None = None) -> tuple[Model, Job | None]:
    """Import a local model as a Custom base model.

    A folder in Hugging Face layout is registered where it is (never copied, never deleted by us) and is
    Ready at once; a GGUF file is converted to safetensors under MODELDECK_HOME/models by a job."""
    path = path.expanduser().resolve()
    is_gguf = path.suffix.lower() == ".gguf"
    if is_gguf:
        check_gguf(path)
    else:
        config = check_model_folder(path)
    name = name or (path.stem if is_gguf else path.name)
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
                          state=ModelState.READY, size_bytes=hub.snapshot_size(path),
                          meta_json=Model.dumps({"architectures": config.get("architectures"),
                                                 "model_type": config.get("model_type")}))
        session.add(model)
        session.flush()
        record(session, f"model:{model.id}", "created", f"import of {path}", state=model.state.value)
        job = None
        if is_gguf:
            job = jobs.create(session, JobKind.IMPORT, f"import {path.name}", model.id, gguf=str(path), target=str(target))
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
    reasons += [
        f"deployment {dep.name!r} ({dep.state.value}) serves it"
        + (" — stop and delete it in Active deployments first" if dep.state != DeploymentState.STOPPED else
           " — delete it in Active deployments first")
        for dep in session.exec(select(Deployment).where(Deployment.model_id == model.id))
    ]
    return reasons


def delete_model(db: Database, name: str) -> int:
    """Delete a custom model and the disk it owns; returns the bytes freed.

    Refused while an adapter, merged model or deployment depends on it. An unfinished download or
    conversion is cancelled first. Files that are not modeldeck's (an imported folder) are left alone."""
    with db.read() as session:
        model = find_model(session, name)
        blockers = dependents(session, model)
        running = session.exec(
            select(Job).where(Job.model_id == model.id, Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
        ).all()
    if blockers:
        raise EngineError(f"cannot delete {model.name!r}: " + "; ".join(blockers))
    for job in running:
        jobs.cancel(db, job.id)
    freed = 0
    if model.owns_path and model.path:
        for folder in (Path(model.path), Path(model.path + ".partial")):
            if folder.exists():
                freed += hub.snapshot_size(folder)
                shutil.rmtree(folder)
    elif model.source.startswith("hub:") and model.repo_id:
        freed = hub.delete_from_cache(model.repo_id, model.revision)
    with db.write() as session:
        row = session.get(Model, model.id)
        if row is not None:
            session.delete(row)
            record(session, f"model:{model.id}", "deleted", f"deleted {model.name}", freed=freed)
    return freed


def job_rows(db: Database, limit: int = 200) -> list[Job]:
    with db.read() as session:
        return list(session.exec(select(Job).order_by(Job.id.desc()).limit(limit)))
