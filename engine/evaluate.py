"""Evaluating a model on a dataset: the mean loss per answer token and the perplexity on the dataset's rows (the
tokens a fine-tune would learn: a chat's assistant turns, all of a text), and for an adapter its base's on the
same rows beside it, so "did it help?" has a number on any data, not only on the held-out rows of its own run.

It runs as a job of its own (engine/jobs/evaluate.py: torch lives in job processes), on this machine, with the
model's files here. The result joins the model's meta as "evaluations" (newest first), which its details and
`modeldeck show` print; the dataset is checked before anything starts (its first bad row by line number).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from catalog import Database
from catalog.schema import Job, JobKind, Model, ModelKind, ModelState
from engine import jobs, targets
from engine.datasets import Dataset, read_dataset
from engine.errors import EngineError
from engine.format import describe_scored as describe  # noqa: F401  (what screens and the shell print)
from engine.models import find_model

KEPT = 10  # evaluations kept in a model's meta, newest first
BATCH_SIZE = 4


@dataclass
class EvalPlan:
    model: Model
    base: Model | None  # an adapter's base: scored beside it
    dataset: Dataset
    gpus: str  # "cpu" or this machine's GPUs, as a fine-tune here would get them
    where: str

    @property
    def title(self) -> str:
        return f"evaluate {self.model.name} on {self.dataset.path.name}"


def plan(db: Database, model_name: str | int, dataset_path: str | Path) -> EvalPlan:
    """Everything checked before the job starts; raises EngineError saying what is wrong."""
    with db.read() as session:
        model = session.get(Model, model_name) if isinstance(model_name, int) else find_model(session, model_name)
        if model is None:
            raise EngineError("that model was deleted")
        if model.state != ModelState.READY:
            raise EngineError(f"{model.name!r} is {model.state.value}; evaluate it once it is Ready")
        home = targets.home_of(model)
        if not model.path or not home.files_here(model):
            raise home.refuse_here(model, "evaluate")
        base = None
        if model.kind == ModelKind.ADAPTER:
            base = session.get(Model, model.base_id) if model.base_id else None
            if base is None or base.state != ModelState.READY or not base.path:
                raise EngineError(f"the base model of the adapter {model.name!r} is missing or not Ready")
        placement = targets.here().plan_finetune(session, base or model, "auto", {})  # a job here, on its GPUs
    dataset = read_dataset(dataset_path)
    return EvalPlan(model, base, dataset, placement.gpus, placement.where)


def start(db: Database, checked: EvalPlan) -> Job:
    """The evaluation's job, started: the model stays Ready, its row says "evaluating" while it runs."""
    with db.write() as session:
        model = session.get(Model, checked.model.id)
        if model is None or model.state != ModelState.READY:
            raise EngineError(f"{checked.model.name!r} was deleted or changed meanwhile")
        job = jobs.create(session, JobKind.EVALUATE, checked.title, model.id,
                          dataset=str(checked.dataset.path.resolve()), gpus=checked.gpus,
                          model_path=model.path, base_path=checked.base.path if checked.base else None)
    jobs.spawn(db, job)
    return job


def kept(meta: dict, result: dict) -> list[dict]:
    """A model's evaluations with a new one first (at most KEPT)."""
    return [result, *(meta.get("evaluations") or [])][:KEPT]
