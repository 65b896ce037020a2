"""Fine-tuning and merging, as the dashboard and the CLI start them: the hyperparameters with their
defaults and checks, the choice of base model, and the Pending adapter or merged model that a job fills.

Everything here is light (no torch): the work itself runs in engine/jobs/finetune.py and merge.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlmodel import select

from catalog import Database
from catalog.schema import Job, JobKind, Model, ModelKind, ModelState
from engine import hub, jobs
from engine.datasets import Dataset, read_dataset, validation_count
from engine.errors import EngineError
from engine.events import record
from engine.gpus import has_bitsandbytes, list_gpus, parse_choice
from engine.localmodel import output_folders
from engine.models import _check_name, _free_name, find_model, models_dir

ALL_LINEAR = "all-linear"
DEFAULT_MAX_LENGTH = 1024
# LoRA targets per architecture (config.json's model_type): attention and MLP projections, which is
# what LoRA papers and tools settle on. Anything else gets PEFT's "all-linear".
_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
TARGET_MODULES = {
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                     "gemma3", "gemma3_text", "olmo", "olmo2", "granite", "smollm3", "cohere", "starcoder2"],
                    _PROJECTIONS),
    "phi3": "qkv_proj,o_proj,gate_up_proj,down_proj",
    "phi": "q_proj,k_proj,v_proj,dense,fc1,fc2",
    "gpt2": "c_attn,c_proj,c_fc",
    **dict.fromkeys(["falcon", "gpt_neox"], "query_key_value,dense,dense_h_to_4h,dense_4h_to_h"),
}


def knob(label: str, help: str, flag: str | None = None) -> dict[str, str]:
    return {"label": label, "help": help, "flag": flag or ""}


@dataclass
class Hyperparameters:
    """What a fine-tune is run with. The defaults make a sound LoRA run for a model and a dataset alone."""

    method: str = field(default="lora", metadata=knob("Method", "lora, or qlora (4-bit base; needs a CUDA GPU and bitsandbytes)"))
    rank: int = field(default=16, metadata=knob("LoRA rank", "rank r of the low-rank update"))
    alpha: int = field(default=32, metadata=knob("LoRA alpha", "scale of the update (alpha / rank)"))
    dropout: float = field(default=0.05, metadata=knob("LoRA dropout", "dropout on the LoRA input, 0 to below 1"))
    target_modules: str = field(default="", metadata=knob(
        "Target modules", "comma-separated module names, or all-linear; empty: the architecture's default",
        "--targets"))
    epochs: float = field(default=3.0, metadata=knob("Epochs", "passes over the training rows"))
    max_steps: int = field(default=0, metadata=knob("Max steps", "optimizer steps; 0: run the epochs"))
    learning_rate: float = field(default=2e-4, metadata=knob("Learning rate", "peak learning rate (cosine, 3% warm-up)", "--lr"))
    batch_size: int = field(default=4, metadata=knob("Batch size", "rows per device and step"))
    grad_accum: int = field(default=4, metadata=knob("Grad accumulation", "batches per optimizer step"))
    max_length: int = field(default=0, metadata=knob(
        "Max length", f"tokens per row, longer rows are cut; 0: {DEFAULT_MAX_LENGTH:,} or the model's limit if lower"))
    val_split: float = field(default=0.05, metadata=knob("Validation split", "fraction held out (none under 20 rows)"))
    seed: int = field(default=42, metadata=knob("Seed", "for the split, the shuffle and the LoRA init"))
    save_steps: int = field(default=0, metadata=knob("Checkpoint every", "steps between checkpoints; 0: about ten per run"))

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> tuple[Hyperparameters, dict[str, str]]:
        """Parse typed text (the dialog's fields); empty means the default. Returns the values and, per
        field, what is wrong with it."""
        parsed, errors = {}, {}
        for f in cls.fields():
            text = str(values.get(f.name, "")).strip()
            if not text:
                continue
            try:
                parsed[f.name] = _cast(f, text)
            except ValueError:
                errors[f.name] = f"{f.metadata['label']}: {text!r} is not {'a whole number' if _kind(f) is int else 'a number'}"
        return cls(**parsed), errors

    def problems(self, model_max_length: int | None = None, gpus: str = "cpu") -> dict[str, str]:
        """Each field's problem, worded for the user; empty when the run can start."""
        errors = {}

        def positive(name: str, label: str) -> None:
            if getattr(self, name) <= 0:
                errors[name] = f"{label} must be above 0"

        if self.method not in ("lora", "qlora"):
            errors["method"] = f"method {self.method!r}: choose lora or qlora"
        elif self.method == "qlora" and (gpus == "cpu" or not has_bitsandbytes()):
            errors["method"] = "QLoRA needs a CUDA GPU and the bitsandbytes package; use lora"
        for name, label in (("rank", "LoRA rank"), ("alpha", "LoRA alpha"), ("learning_rate", "learning rate"),
                            ("batch_size", "batch size"), ("grad_accum", "gradient accumulation")):
            positive(name, label)
        if self.max_length < 0:
            errors["max_length"] = "max length must be 0 (automatic) or more"
        if not 0 <= self.dropout < 1:
            errors["dropout"] = "LoRA dropout must be from 0 to below 1"
        if self.max_steps < 0:
            errors["max_steps"] = "max steps must be 0 (run the epochs) or more"
        elif self.max_steps == 0 and self.epochs <= 0:
            errors["epochs"] = "epochs must be above 0 (or set max steps)"
        if not 0 <= self.val_split < 1:
            errors["val_split"] = "validation split must be from 0 to below 1"
        if self.save_steps < 0:
            errors["save_steps"] = "checkpoint interval must be 0 (automatic) or more"
        if self.learning_rate >= 1:
            errors["learning_rate"] = f"learning rate {self.learning_rate} is far too high (LoRA uses about 1e-4 to 1e-3)"
        if model_max_length and self.max_length > model_max_length:
            errors["max_length"] = f"max length {self.max_length:,} is over the model's limit of {model_max_length:,} tokens"
        if self.target_modules and not all(part.strip() for part in self.target_modules.split(",")):
            errors["target_modules"] = "target modules: names separated by commas, without empty ones"
        return errors

    def resolved(self, model_max_length: int | None) -> Hyperparameters:
        """With the automatic max length made concrete for this model."""
        if self.max_length:
            return self
        return dataclasses.replace(self, max_length=min(DEFAULT_MAX_LENGTH, model_max_length or DEFAULT_MAX_LENGTH))

    def steps(self, train_rows: int) -> int:
        """Optimizer steps of the whole run, counted as the trainer counts them."""
        if self.max_steps:
            return self.max_steps
        batches = math.ceil(train_rows / self.batch_size)
        per_epoch = max(batches // self.grad_accum + int(batches % self.grad_accum > 0), 1)
        return max(math.ceil(self.epochs * per_epoch), 1)

    def targets_for(self, model_type: str | None) -> str:
        return self.target_modules or TARGET_MODULES.get(model_type or "", ALL_LINEAR)


def _kind(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "str": str}[f.type]  # the annotations are strings (PEP 563)


def _cast(f: dataclasses.Field, text: str) -> Any:
    kind = _kind(f)
    if kind is int:
        value = float(text)
        if not value.is_integer():
            raise ValueError(text)
        return int(value)
    return kind(text)


@dataclass
class ModelLimits:
    model_type: str | None
    max_length: int | None  # the context the model was trained for
    hidden: int | None
    intermediate: int | None
    layers: int | None


def model_limits(path: str | Path | None) -> ModelLimits:
    """What config.json says about the model (nothing when it is not downloaded yet)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError):
        config = {}
    text = config.get("text_config") or config  # multimodal configs nest the language model's
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
    gpus: str
    train_rows: int
    validation_rows: int
    steps: int
    limits: ModelLimits

    def summary(self) -> str:
        where = "CPU" if self.gpus == "cpu" else f"GPU {self.gpus}"
        val = f"{self.validation_rows} held out for validation" if self.validation_rows else "no validation rows"
        return (f"{len(self.dataset.examples):,} rows, {self.dataset.format_name} format: {self.train_rows:,} to train on, "
                f"{val}; {self.steps:,} steps on {where}")


def plan(db: Database, base_name: str, dataset_path: str | Path, hp: Hyperparameters, gpus: str = "auto") -> Plan:
    """Check everything a fine-tune needs before anything starts; raises EngineError saying what is wrong."""
    with db.read() as session:
        base = find_model(session, base_name)
    check_base(base)
    dataset = read_dataset(dataset_path)
    try:
        gpus = parse_choice(gpus, list_gpus())
    except ValueError as exc:
        raise EngineError(str(exc)) from None
    limits = model_limits(base.path if base.state == ModelState.READY else None)
    hp = hp.resolved(limits.max_length) if base.state == ModelState.READY else hp
    if problems := hp.problems(limits.max_length, gpus):
        raise EngineError("; ".join(problems.values()))
    val = validation_count(len(dataset.examples), hp.val_split)
    train = len(dataset.examples) - val
    return Plan(base, dataset, hp, gpus, train, val, hp.steps(train), limits)


def start(db: Database, checked: Plan, name: str | None = None) -> tuple[Model, Job]:
    """Register the adapter as Pending and start its job. A base model still downloading is waited for
    by the job itself."""
    hp, base = checked.hyperparameters, checked.base
    _check_space(estimated_disk_bytes(hp, checked.limits), models_dir(db))
    with db.write() as session:
        row = session.get(Model, base.id)
        if row is None:
            raise EngineError(f"{base.name!r} was deleted meanwhile")
        check_base(row)
        if name:
            _check_name(session, name)
        else:
            name = default_name(session, row, checked.dataset.path)
        target = models_dir(db) / name
        if any(folder.exists() for folder in output_folders(target)):
            raise EngineError(f"{target} already exists; choose another name")
        dataset = str(checked.dataset.path.resolve())
        meta = {"dataset": dataset, "format": checked.dataset.format_name,
                "rows": {"train": checked.train_rows, "validation": checked.validation_rows},
                "hyperparameters": dataclasses.asdict(hp), "gpus": checked.gpus}
        model = Model(name=name, kind=ModelKind.ADAPTER, source=f"finetune:{row.name}", path=str(target),
                      owns_path=True, base_id=row.id, meta_json=Model.dumps(meta))
        session.add(model)
        session.flush()
        record(session, f"model:{model.id}", "created", f"fine-tune of {row.name} on {Path(dataset).name}")
        job = jobs.create(session, JobKind.FINETUNE, f"fine-tune {row.name} on {Path(dataset).name}", model.id,
                          base_id=row.id, dataset=dataset, hyperparameters=dataclasses.asdict(hp),
                          gpus=checked.gpus, target=str(target))
        model.job_id = job.id
    jobs.spawn(db, job)
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
    if base is None or base.state != ModelState.READY or not base.path:
        raise EngineError(f"the base model of {adapter.name!r} is missing or not Ready")
    _check_space(int((base.size_bytes or 0) * 1.1), models_dir(db))
    with db.write() as session:
        if name:
            _check_name(session, name)
        else:
            name = _free_name(session, [f"{adapter.name[:90]}-merged"])
        target = models_dir(db) / name
        if any(folder.exists() for folder in output_folders(target)):
            raise EngineError(f"{target} already exists; choose another name")
        meta = {"adapter": adapter.name, "base": base.name}
        model = Model(name=name, kind=ModelKind.MERGED, source=f"merge:{adapter.name}", path=str(target),
                      owns_path=True, base_id=adapter.id, meta_json=Model.dumps(meta))
        session.add(model)
        session.flush()
        record(session, f"model:{model.id}", "created", f"merge of {adapter.name} into {base.name}")
        job = jobs.create(session, JobKind.MERGE, f"merge {adapter.name} into {base.name}", model.id,
                          adapter_path=adapter.path, base_path=base.path, target=str(target))
        model.job_id = job.id
    jobs.spawn(db, job)
    return model, job


def rerun(db: Database, model: Model) -> tuple[Model, Job]:
    """Start a failed fine-tune or merge again with its settings; a fine-tune resumes from its last
    checkpoint."""
    with db.write() as session:
        row = session.get(Model, model.id)
        last = session.get(Job, row.job_id) if row and row.job_id else None
        if row is None or row.state != ModelState.FAILED or last is None:
            raise EngineError(f"{model.name!r} is already being retried")
        if last.kind == JobKind.FINETUNE:
            base = session.get(Model, last.params["base_id"])
            if base is None:
                raise EngineError(f"the base model of {model.name!r} was deleted; delete this adapter")
            check_base(base)
        row.state, row.reason = ModelState.PENDING, None
        job = jobs.create(session, last.kind, last.title, row.id, **last.params)
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
