"""Fine-tuning and merging, as the dashboard and the CLI start them: the checks before a run (base model,
dataset, hyperparameters, GPUs, name, disk), and the Pending adapter or merged model that a job fills.

Everything here is light (no torch): the work itself runs in engine/jobs/finetune.py and merge.py.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlmodel import select

from catalog import Database
from catalog.schema import Job, JobKind, Model, ModelKind, ModelState
from engine import hub, jobs
from engine.datasets import Dataset, read_dataset, validation_count
from engine.errors import EngineError
from engine.events import record
from engine.format import human_bytes
from engine.gpus import list_gpus, parse_choice
from engine.hyperparameters import Hyperparameters
from engine.localmodel import model_config, output_folders
from engine.models import _check_name, _free_name, find_model, models_dir


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
class ClusterTarget:
    """Where a fine-tune runs when it runs on Kubernetes."""

    target: str  # CONTEXT/NAMESPACE
    image: str  # has modeldeck installed with its [training] extra (README: Kubernetes, Fine-tuning)
    gpus: int  # 0: the pod's CPUs


@dataclass
class Plan:
    """A fine-tune checked and ready to start: what the dialog and the CLI show before it runs."""

    base: Model
    dataset: Dataset
    hyperparameters: Hyperparameters
    gpus: str
    train_rows: int
    validation_rows: int
    steps: int
    limits: ModelLimits
    cluster: ClusterTarget | None = None

    def summary(self) -> str:
        where = "CPU" if self.gpus == "cpu" else f"GPU {self.gpus}"
        if self.cluster is not None:
            count = self.cluster.gpus
            where = (f"{count} GPU{'s' if count > 1 else ''}" if count else "CPU") + \
                f" on the cluster {self.cluster.target}, in {self.cluster.image}" + \
                ("; your Hugging Face token goes with it, as a Secret" if hub.token() else "")
        val = f"{self.validation_rows} held out for validation" if self.validation_rows else "no validation rows"
        return (f"{len(self.dataset.examples):,} rows, {self.dataset.format_name} format: {self.train_rows:,} to train on, "
                f"{val}; {self.steps:,} steps on {where}")


def plan(db: Database, base_name: str, dataset_path: str | Path, hp: Hyperparameters, gpus: str = "auto",
         target: str | None = None, image: str | None = None, offline: bool = False) -> Plan:
    """Check everything a fine-tune needs before anything starts; raises EngineError saying what is wrong.
    With a `target` (CONTEXT/NAMESPACE), it runs as a Job on that Kubernetes cluster, in `image`;
    `offline` (a dry run that only prints its manifests) does not look the context up."""
    with db.read() as session:
        base = find_model(session, base_name)
    check_base(base)
    cluster = None
    if target:
        cluster = _cluster_target(base, target, image, gpus, offline)
        from engine.kube.manifests import gpu_list

        gpus = gpu_list(cluster.gpus)  # as the pod will see them
    else:
        try:
            gpus = parse_choice(gpus, list_gpus())
        except ValueError as exc:
            raise EngineError(str(exc)) from None
    dataset = read_dataset(dataset_path)
    if cluster is not None:
        _check_dataset_fits_secrets(dataset.path)
    limits = model_limits(base.path if base.state == ModelState.READY else None)
    hp = hp.resolved(limits.max_length) if base.state == ModelState.READY else hp
    # On a cluster, bitsandbytes is the image's to have: the run checks it there.
    if problems := hp.problems(limits.max_length, gpus, bitsandbytes=True if cluster else None):
        raise EngineError("; ".join(problems.values()))
    val = validation_count(len(dataset.examples), hp.val_split)
    train = len(dataset.examples) - val
    return Plan(base, dataset, hp, gpus, train, val, hp.steps(train), limits, cluster)


def _cluster_target(base: Model, target: str, image: str | None, gpus: str, offline: bool) -> ClusterTarget:
    from engine.kube.cluster import check_target, parse_target

    context, namespace = parse_target(target) if offline else check_target(target)
    if base.kind != ModelKind.BASE or not base.repo_id:
        raise EngineError(f"{base.name} is not a model from the Hub: a fine-tune on a cluster downloads its base "
                          "model there, so only a base model from the Hub can be fine-tuned on one")
    if not (image or "").strip():
        raise EngineError("a fine-tune on a cluster runs in an image you name (Image; --image): one with modeldeck and its "
                          "[training] extra installed (README: Kubernetes; deploy/finetune.Dockerfile builds one)")
    choice = gpus.strip().lower()
    count = 1 if choice == "auto" else 0 if choice == "cpu" else int(choice) if choice.isdigit() else -1
    if not 0 <= count <= 16:
        raise EngineError(f"GPUs {gpus!r}: on a cluster, give how many GPUs the pod gets, from 0 (or cpu: its CPUs) "
                          "to 16")
    return ClusterTarget(f"{context}/{namespace}", image.strip(), count)


def _check_dataset_fits_secrets(path: Path) -> None:
    """A cluster's pod gets the dataset through Secrets (gzip, in parts): it has a limit."""
    from engine.kube.manifests import DATASET_MAX_PARTS, DATASET_PART_BYTES

    limit = DATASET_MAX_PARTS * DATASET_PART_BYTES
    size = path.stat().st_size
    if size > limit and len(gzip.compress(path.read_bytes(), compresslevel=6)) > limit:
        raise EngineError(f"{path.name} is {human_bytes(size)}, over {human_bytes(limit)} even compressed: a fine-tune "
                          "on a cluster sends its dataset in Secrets; use a smaller dataset there")


def cluster_job(name: str, on: dict, base: Model, dataset: Path, hyperparameters: dict, attempt: int = 1):
    """The Job of a cluster fine-tune and the objects around it (engine/kube/manifests.py). `on` is the
    adapter's meta["cluster"]: target, image, gpus and uid."""
    from engine.kube.cluster import parse_target
    from engine.kube.manifests import ClusterFinetune

    _context, namespace = parse_target(on["target"])
    # The adapter's volume holds two checkpoints, the dataset's copy and the adapter, with room to spare.
    limits = model_limits(base.path if base.state == ModelState.READY else None)
    needed = estimated_disk_bytes(Hyperparameters(**hyperparameters), limits) + 2 * dataset.stat().st_size
    return ClusterFinetune(name, on["uid"], namespace, on["image"], base.name, base.repo_id, base.revision,
                           gzip.compress(dataset.read_bytes(), compresslevel=6, mtime=0), dataset.name,
                           hyperparameters, on["gpus"], attempt, hub.token(),
                           adapter_size_gib=max(2, math.ceil(needed * 1.5 / 2**30)))


def start(db: Database, checked: Plan, name: str | None = None) -> tuple[Model, Job]:
    """Register the adapter as Pending and start its job. A base model still downloading is waited for
    by the job itself. On a cluster, the adapter's files stay there, on a volume of their own."""
    chosen = bool(name)  # a name the user gave is checked; a default one is made free
    hp, base = checked.hyperparameters, checked.base
    if checked.cluster is None:
        _check_space(estimated_disk_bytes(hp, checked.limits), models_dir(db))
    with db.write() as session:
        row = session.get(Model, base.id)
        if row is None:
            raise EngineError(f"{base.name!r} was deleted meanwhile")
        check_base(row)
        dataset = str(checked.dataset.path.resolve())
        meta = {"dataset": dataset, "format": checked.dataset.format_name,
                "rows": {"train": checked.train_rows, "validation": checked.validation_rows},
                "hyperparameters": dataclasses.asdict(hp)}
        if checked.cluster is None:  # on a cluster, its GPU count is in meta["cluster"]
            meta["gpus"] = checked.gpus
        on = dataclasses.asdict(checked.cluster) | {"uid": secrets.token_hex(6)} if checked.cluster else None
        name = name or default_name(session, row, checked.dataset.path)
        if on is not None:
            from engine.kube.manifests import adapter_folder, adapter_volume

            meta["cluster"] = on | {"volume": adapter_volume(name), "folder": adapter_folder(name)}
        where = f" on {on['target']}" if on else ""
        model, job = _output_model(
            session, db, name, chosen,
            Model(kind=ModelKind.ADAPTER, source=f"finetune:{row.name}", base_id=row.id, meta_json=Model.dumps(meta)),
            JobKind.FINETUNE, f"fine-tune {row.name} on {Path(dataset).name}{where}",
            base_id=row.id, dataset=dataset, hyperparameters=dataclasses.asdict(hp), gpus=checked.gpus, cluster=on)
    jobs.spawn(db, job)
    return model, job


def _output_model(session, db: Database, name: str, chosen: bool, model: Model, kind: JobKind, title: str,
                  **params) -> tuple[Model, Job]:
    """Register a Pending model that a job writes under MODELDECK_HOME/models/NAME, and its job. A name
    the user chose is checked; a folder already there (ours or not) is never overwritten. A fine-tune on a
    cluster writes there instead, and has no folder here."""
    if chosen:
        _check_name(session, name)
    target = models_dir(db) / name
    if params.get("cluster"):
        model.name, model.path, model.owns_path = name, None, False
    elif any(folder.exists() for folder in output_folders(target)):
        raise EngineError(f"{target} already exists; choose another name")
    else:
        model.name, model.path, model.owns_path = name, str(target), True
    session.add(model)
    session.flush()
    record(session, f"model:{model.id}", "created", title)
    job = jobs.create(session, kind, title, model.id, target=str(target), **params)
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
    if on := adapter.meta.get("cluster"):
        raise EngineError(f"{adapter.name}'s files are on the cluster {on['target']}; merging works on files here. "
                          "Deploy it on that cluster instead")
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
            JobKind.MERGE, f"merge {adapter.name} into {base.name}", adapter_path=adapter.path, base_path=base.path)
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
        row.state, row.reason = ModelState.PENDING, None
        job = jobs.create(session, last.kind, last.title, row.id,
                          **(last.params | {"attempt": last.params.get("attempt", 1) + 1}))
        row.job_id = job.id
        session.add(row)
        record(session, f"model:{row.id}", "state", f"retrying {last.kind.value}", state="pending")
    jobs.spawn(db, job)
    return row, job


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint (the trainer writes trainer_state.json last), if any."""
    done = [p for p in checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").exists()
            and p.name.split("-")[-1].isdigit()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)
