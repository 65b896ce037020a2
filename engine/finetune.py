"""Fine-tuning and merging, as the dashboard and the CLI start them: the checks before a run (base model,
dataset, hyperparameters, GPUs, name, disk), and the Pending adapter or merged model that a job fills.

Everything here is light (no torch): the work itself runs in engine/jobs/finetune.py and merge.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import select

from catalog import Database
from catalog.schema import Job, JobKind, Model, ModelKind, ModelState
from engine import hub, jobs, targets
from engine.datasets import Dataset, read_dataset, validation_count
from engine.errors import EngineError
from engine.events import record
from engine.hyperparameters import Hyperparameters
from engine.lifecycle import move_model
from engine.localmodel import model_config, output_folders
from engine.models import _check_name, _free_name, find_model, model_for, models_dir, registered


@dataclass
class ModelLimits:
    model_type: str | None
    max_length: int | None  # the context the model was trained for
    hidden: int | None
    intermediate: int | None
    layers: int | None


def model_limits(path: str | Path | None) -> ModelLimits:
    """What config.json says about the model (nothing when it is not downloaded yet)."""
    config, text = model_config(path)
    return ModelLimits(config.get("model_type"), text.get("max_position_embeddings"), text.get("hidden_size"),
                       text.get("intermediate_size"), text.get("num_hidden_layers"))


def estimated_disk_bytes(hp: Hyperparameters, limits: ModelLimits) -> int:
    """About what a run writes: the adapter, and checkpoints holding it with two Adam moments (two kept)."""
    h, i, layers = limits.hidden or 4096, limits.intermediate or 11008, limits.layers or 32
    adapter = 4 * hp.rank * layers * (7 * h + 3 * i)  # fp32 A and B of the seven projections
    return 7 * adapter + 50_000_000


def eligible_bases(db: Database) -> list[Model]:
    """Models a fine-tune can start from: Ready base and merged models, and base models downloading now."""
    with db.read() as session:
        return list(session.exec(
            select(Model).where(Model.kind.in_([ModelKind.BASE, ModelKind.MERGED]),
                                Model.state.in_([ModelState.READY, ModelState.PENDING])).order_by(Model.name)
        ))


def check_base(base: Model) -> None:
    if base.kind == ModelKind.ADAPTER:
        raise EngineError(f"{base.name!r} is an adapter: fine-tune its base model, or merge it into one first")
    if base.state == ModelState.FAILED:
        raise EngineError(f"{base.name!r} failed ({base.reason}); retry or delete it first")
    if base.state == ModelState.PENDING and not base.repo_id:
        raise EngineError(f"{base.name!r} is still being prepared; fine-tune it once it is Ready")


def default_name(session, base: Model, dataset: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in dataset.stem)[:40].strip("-._") or "data"
    return _free_name(session, [f"{base.name[:50]}-{stem}-lora"])


@dataclass
class Plan:
    """A fine-tune checked and ready to start: what the dialog and the CLI show before it runs."""

    base: Model
    dataset: Dataset
    hyperparameters: Hyperparameters
    placement: targets.Placement  # where it runs, as its target checked it
    train_rows: int
    validation_rows: int
    steps: int
    limits: ModelLimits

    @property
    def gpus(self) -> str:
        """As the run will see them: "cpu" or a comma list of indexes."""
        return self.placement.gpus

    def summary(self) -> str:
        val = f"{self.validation_rows} held out for validation" if self.validation_rows else "no validation rows"
        return (f"{len(self.dataset.examples):,} rows, {self.dataset.format_name} format: {self.train_rows:,} to train on, "
                f"{val}; {self.steps:,} steps on {self.placement.where}"
                + (f" ({self.placement.chosen_because})" if self.placement.chosen_because else ""))


def plan(db: Database, base_name: str, dataset_path: str | Path, hp: Hyperparameters, gpus: str = "auto",
         target: str | None = None, options: dict[str, Any] | None = None, offline: bool = False) -> Plan:
    """Check everything a fine-tune needs before anything starts; raises EngineError saying what is wrong.
    `target` is where it runs (a target's spec; none: this machine), with that target's `options`;
    `offline` (a dry run that only prints what it would run) asks the target's system nothing."""
    where = targets.resolve(target)
    if not offline:
        where = where.checked()
    with db.read() as session:
        base = model_for(session, base_name, where)  # a repo id: a Hub model that a cluster downloads itself
        check_base(base)
        placement = where.plan_finetune(session, base, gpus, where.options(options or {}, "finetune"), offline)
    dataset = read_dataset(dataset_path)
    placement.check(dataset)
    limits = model_limits(base.path if base.state == ModelState.READY and base.path else None)
    hp = hp.resolved(limits.max_length) if base.state == ModelState.READY else hp
    if problems := hp.problems(limits.max_length, placement.gpus, bitsandbytes=placement.bitsandbytes):
        raise EngineError("; ".join(problems.values()))
    val = validation_count(len(dataset.examples), hp.val_split)
    train = len(dataset.examples) - val
    return Plan(base, dataset, hp, placement, train, val, hp.steps(train), limits)


def start(db: Database, checked: Plan, name: str | None = None, serve_on: str | None = None) -> tuple[Model, Job]:
    """Register the adapter as Pending and start its job. A base model still downloading is waited for
    by the job itself. Where its target keeps the files elsewhere (a cluster's volume), they stay there.
    `serve_on`: a deployment of the base that the adapter joins once it is Ready."""
    if serve_on:
        _check_serve_on(db, checked.base, serve_on)
    chosen = bool(name)  # a name the user gave is checked; a default one is made free
    hp, base, placement = checked.hyperparameters, checked.base, checked.placement
    if placement.files_here:
        _check_space(estimated_disk_bytes(hp, checked.limits), placement.output_folder or models_dir(db))
    with db.write() as session:
        row = registered(session, base)
        if row is None:
            raise EngineError(f"{base.name!r} was deleted meanwhile")
        check_base(row)
        dataset = str(checked.dataset.path.resolve())
        meta = {"dataset": dataset, "format": checked.dataset.format_name,
                "rows": {"train": checked.train_rows, "validation": checked.validation_rows},
                "hyperparameters": dataclasses.asdict(hp)}
        name = name or default_name(session, row, checked.dataset.path)
        meta |= placement.target.finetune_meta(placement, name)  # where its run is (its GPUs, a cluster's volume)
        where = "" if placement.target.is_here else f" on {placement.target.spec}"
        model, job = _output_model(
            session, db, name, chosen,
            Model(kind=ModelKind.ADAPTER, source=f"finetune:{row.name}", base_id=row.id, meta_json=Model.dumps(meta)),
            JobKind.FINETUNE, f"fine-tune {row.name} on {Path(dataset).name}{where}", placement.files_here,
            placement.output_folder,
            base_id=row.id, dataset=dataset, hyperparameters=dataclasses.asdict(hp), gpus=checked.gpus,
            target=placement.target.spec, **({"serve_on": serve_on} if serve_on else {}))
    jobs.spawn(db, job)
    return model, job


def _check_serve_on(db: Database, base: Model, deployment_name: str) -> None:
    """A deployment the adapter may join when done: a live one of this base, on a server that takes adapters."""
    from engine.backends import DeploySettings, max_adapter_rank
    from engine.deployment_adapters import base_of
    from engine.deployments import find_deployment

    with db.read() as session:
        deployment = find_deployment(session, deployment_name)
        deployed = session.get(Model, deployment.model_id) if deployment.model_id else None
        serves = base_of(session, deployed) if deployed else None
    if deployment.backend == "external":
        raise EngineError(f"{deployment.name!r} is an external endpoint: the adapter can join a deployment modeldeck "
                          "runs")
    if not deployment.state.is_live():
        raise EngineError(f"deployment {deployment.name!r} is {deployment.state.value}: the adapter can join a running "
                          "deployment of its base")
    if serves is None or serves.id != base.id:
        serving = serves.name if serves else "a deleted model"
        raise EngineError(f"deployment {deployment.name!r} serves {serving!r}, not {base.name!r}: the adapter can join "
                          "only a deployment of its base")
    if max_adapter_rank(deployment.backend, DeploySettings.of(deployment)) is None:
        raise EngineError(f"{deployment.name!r} runs vLLM started without adapters, which takes none while it serves")


def _output_model(session, db: Database, name: str, chosen: bool, model: Model, kind: JobKind, title: str,
                  files_here: bool, folder: Path | None, **params) -> tuple[Model, Job]:
    """Register a Pending model that a job writes under `folder`/NAME (MODELDECK_HOME/models unless its
    target says: a SLURM work directory), and its job. A name the user chose is checked; a folder already
    there (ours or not) is never overwritten. A model whose files its target keeps elsewhere (a cluster's
    volume) has no folder here."""
    if chosen:
        _check_name(session, name)
    output = (folder or models_dir(db)) / name
    if not files_here:
        model.name, model.path, model.owns_path = name, None, False
    elif any(folder.exists() for folder in output_folders(output)):
        raise EngineError(f"{output} already exists; choose another name")
    else:
        model.name, model.path, model.owns_path = name, str(output), True
    session.add(model)
    session.flush()
    record(session, f"model:{model.id}", "created", title)
    job = jobs.create(session, kind, title, model.id, output=str(output), **params)
    model.job_id = job.id
    return model, job


def _check_space(needed: int, folder: Path) -> None:
    try:
        hub.check_free_space(needed, folder)
    except OSError as exc:
        raise EngineError(f"{exc.strerror} in {folder}") from None


def merge(db: Database, adapter_name: str, name: str | None = None) -> tuple[Model, Job]:
    """Start merging a Ready adapter into (a copy of) its base: a Merged model, deployable and
    fine-tunable. It depends on the adapter, so the adapter cannot be deleted while it exists."""
    with db.read() as session:
        adapter = find_model(session, adapter_name)
        base = session.get(Model, adapter.base_id) if adapter.base_id else None
    if adapter.kind != ModelKind.ADAPTER:
        raise EngineError(f"{adapter.name!r} is a {adapter.kind.value} model; only an adapter can be merged")
    if adapter.state != ModelState.READY:
        raise EngineError(f"{adapter.name!r} is {adapter.state.value}; merge it once it is Ready")
    home = targets.home_of(adapter)
    if not home.files_here(adapter):
        raise home.refuse_here(adapter, "merge")
    if base is None or base.state != ModelState.READY or not base.path:
        raise EngineError(f"the base model of {adapter.name!r} is missing or not Ready")
    _check_space(int((base.size_bytes or 0) * 1.1), models_dir(db))
    with db.write() as session:
        adapter = session.get(Model, adapter.id)  # again under the lock: it may have gone meanwhile
        if adapter is None:
            raise EngineError(f"{adapter_name!r} was deleted meanwhile")
        merging = session.exec(select(Model).where(Model.base_id == adapter.id, Model.kind == ModelKind.MERGED,
                                                   Model.state == ModelState.PENDING)).first()
        if merging is not None:
            raise EngineError(f"{adapter.name!r} is already being merged as {merging.name!r}")
        meta = {"adapter": adapter.name, "base_model": base.name}
        model, job = _output_model(
            session, db, name or _free_name(session, [f"{adapter.name[:90]}-merged"]), bool(name),
            Model(kind=ModelKind.MERGED, source=f"merge:{adapter.name}", base_id=adapter.id,
                  meta_json=Model.dumps(meta)),
            JobKind.MERGE, f"merge {adapter.name} into {base.name}", True, None, adapter_path=adapter.path,
            base_path=base.path)
    jobs.spawn(db, job)
    return model, job


def rerun(db: Database, model: Model) -> tuple[Model, Job]:
    """Start a failed fine-tune or merge again with its settings; a fine-tune resumes from its last
    checkpoint."""
    with db.write() as session:
        row = session.get(Model, model.id)
        last = session.get(Job, row.job_id) if row and row.job_id else None
        if row is None:
            raise EngineError(f"{model.name!r} was deleted meanwhile")
        if row.state != ModelState.FAILED or last is None:
            raise EngineError(f"{model.name!r} is already being retried")
        if last.kind == JobKind.FINETUNE:
            base = session.get(Model, last.params["base_id"])
            if base is None:
                raise EngineError(f"the base model of {model.name!r} was deleted; delete this adapter")
            check_base(base)
        job = jobs.create(session, last.kind, last.title, row.id,
                          **(last.params | {"attempt": last.params.get("attempt", 1) + 1}))
        move_model(session, row, ModelState.PENDING, message=f"retrying {last.kind.value}", job_id=job.id)
    jobs.spawn(db, job)
    return row, job


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint (the trainer writes trainer_state.json last), if any."""
    done = [p for p in checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").exists()
            and p.name.split("-")[-1].isdigit()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)
