"""A fine-tune's training, wherever it runs: LoRA (or QLoRA on a CUDA GPU) with PEFT over the transformers
Trainer.

`train` reports step, epoch, loss, validation loss, learning rate, tokens/s and ETA through its context
(at most once a second, plus every validation), validates and checkpoints into the adapter's `.partial`
folder about ten times a run but never for more than a tenth of its time (Pacing), resumes from the
newest complete checkpoint when run again, and stops cleanly at the end of the current batch on SIGTERM
(cancel, or a batch job's time limit). The adapter's folder appears only once it is complete.

Its context is the job's own on this machine (engine/targets/local/finetune.py, which records progress in
the database), or, where a run has no database (a Job on Kubernetes, a batch job on SLURM), a LogReporter
that tells progress as events in the run's log: `run_from_spec` is that entry point
(`python -m engine.jobs.finetune --spec FILE`), followed by its target's supervisor here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from engine import hub
from engine.datasets import (
    chat_template,
    encode,
    load_tokenizer,
    read_dataset,
    token_stats,
)
from engine.finetune import latest_checkpoint, model_limits
from engine.format import describe_evaluation, human_duration
from engine.hyperparameters import Hyperparameters
from engine.jobs import JobCancelled
from engine.jobs.harness import JobContext, JobFailure
from engine.jobs.reported import LogReporter, add_point
from engine.localmodel import output_folders, publish

REPORT_EVERY_S = 1.0
LOG_EVERY_S = 1.0  # a loss point (and a log line) at most this often, and on the first and last steps
TIMED_CHECKPOINT_S = 15 * 60  # long steps: never lose more than this much work to a crash


class Stopping:
    """SIGTERM (cancel) is a request, honoured at the next safe point: between training steps, or between
    phases. A phase that outlasts the canceller's deadline is killed, which also ends Cancelled. Once
    training has finished, the adapter is saved whatever comes: the work is done.

    SIGUSR1 asks for a checkpoint at the end of the current step, training on: a SLURM batch job gets it
    a while before its time limit (`--signal`), so the run resumes from there when requeued or retried."""

    def __init__(self) -> None:
        self.requested = False
        self.checkpoint = False
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGUSR1, self._checkpoint)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def _checkpoint(self, signum, frame) -> None:
        self.checkpoint = True

    def check(self) -> None:
        if self.requested:
            raise JobCancelled()


LINEAGE_IN_META = ("rows", "target_modules", "steps", "final_loss", "final_eval_loss", "evaluation",
                   "train_runtime_s", "tokens_per_s")


def compare_with_base(ctx, model, rows: list[dict], collator, batch_size: int, stopping) -> dict | None:
    """The adapter and its base (the same model with the adapter switched off) on the same rows; None, said in
    the log, where that cannot be done: the training is over, so its adapter is saved whatever happens here (a
    cancel now, out of memory)."""
    from engine.jobs.evaluation import evaluate

    counted = collator.tokens  # the collator counts trained tokens: evaluation is not training
    try:
        adapter = evaluate(model, rows, collator, batch_size, stopping)
        with model.disable_adapter():
            base = evaluate(model, rows, collator, batch_size, stopping)
    except JobCancelled:
        ctx.log("cancelled while evaluating on the held-out rows: the finished adapter is saved without it")
        return None
    except Exception as exc:  # noqa: BLE001 - the adapter is trained: it is kept, the evaluation is not
        ctx.log(f"the evaluation on the held-out rows failed ({type(exc).__name__}: {exc}); the adapter is saved "
                "without it")
        return None
    finally:
        collator.tokens = counted
    return {"rows": len(rows), "tokens": adapter.tokens, "adapter": adapter.as_dict(), "base": base.as_dict()}


def succeed_with(ctx: JobContext, lineage: dict, size_bytes: int | None) -> None:
    """The adapter is Ready: the headline figures of its run (its lineage) join its meta, for the screens; asked
    to, it then joins a deployment of its base."""
    ctx.succeed({k: lineage[k] for k in LINEAGE_IN_META if k in lineage}, size_bytes=size_bytes)
    if deployment := ctx.params.get("serve_on"):
        serve_when_done(ctx, deployment)


def serve_when_done(ctx: JobContext, deployment: str) -> None:
    """"When done, serve on DEPLOYMENT": the Ready adapter is loaded onto it. What stops that (the deployment was
    stopped meanwhile, say) is said in the log and in the adapter's details; the adapter stays Ready."""
    from catalog.schema import Model
    from engine.deployment_adapters import serve_adapter
    from engine.errors import EngineError

    try:
        served = serve_adapter(ctx.db, ctx.model_id, deployment)
        said = f"serving on {deployment} as {served.served_name!r}"
    except EngineError as exc:
        said = f"not served on {deployment}: {exc}"
    ctx.log(said)
    with ctx.db.read() as session:
        meta = session.get(Model, ctx.model_id).meta
    ctx.update_model(meta_json=Model.dumps(meta | {"when_done": said}))


@dataclass
class Run:
    """One fine-tune, wherever it runs: the base model's folder, the dataset (the run's own copy, kept in
    the output's .partial folder) and where the adapter goes."""

    base_path: str
    base_name: str
    base_repo: str | None
    dataset: Path
    dataset_label: str  # where the data came from, as the user gave it
    hyperparameters: dict
    gpus: str  # "cpu" or the comma list of indexes the run may use
    output: Path
    attempt: int = 1


def train(ctx, stopping: Stopping, run: Run) -> dict:
    """Train, save the adapter into run.output and return its lineage. `ctx` reports progress: the job's
    database context here, or log events on a cluster (engine/jobs/reported.py)."""
    hp = Hyperparameters(**run.hyperparameters)
    final, partial = output_folders(run.output)
    limits = model_limits(run.base_path)
    hp = hp.resolved(limits.max_length)
    if problems := hp.problems(limits.max_length, run.gpus):
        raise JobFailure("; ".join(problems.values()))
    copy = run.dataset
    dataset = read_dataset(copy)
    train_idx, val_idx = dataset.split(hp.val_split, hp.seed)
    # PEFT asks transformers a question that transformers 5 renamed: a FutureWarning in every run's log,
    # nothing the user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    with ctx.phase("loading the base model"):
        import torch
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import (
            AutoModelForCausalLM,
            PrinterCallback,
            Trainer,
            TrainerCallback,
            TrainingArguments,
        )

        on_gpu = run.gpus != "cpu" and torch.cuda.is_available()
        if run.gpus != "cpu" and not on_gpu:
            raise JobFailure(f"GPU {run.gpus} was chosen but CUDA is not available to PyTorch")
        bf16 = on_gpu and torch.cuda.is_bf16_supported()
        dtype = (torch.bfloat16 if bf16 else torch.float16) if on_gpu else torch.float32
        tokenizer = load_tokenizer(run.base_path)
        load_args = {"dtype": dtype}
        if on_gpu:
            load_args["device_map"] = "auto" if "," in run.gpus else {"": 0}
        if hp.method == "qlora":
            from transformers import BitsAndBytesConfig

            load_args["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True)
        model = AutoModelForCausalLM.from_pretrained(run.base_path, **load_args)
        if hp.method == "qlora":
            model = prepare_model_for_kbit_training(model)
        targets = hp.targets_for(limits.model_type)
        lora = LoraConfig(r=hp.rank, lora_alpha=hp.alpha, lora_dropout=hp.dropout, bias="none", task_type="CAUSAL_LM",
                          target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])
        torch.manual_seed(hp.seed)
        try:
            model = get_peft_model(model, lora)
        except ValueError as exc:  # e.g. target modules the model does not have
            raise JobFailure(f"LoRA cannot be applied: {exc}") from exc
        trainable, total = model.get_nb_trainable_parameters()
        ctx.log(f"LoRA r={hp.rank} alpha={hp.alpha} on {targets}: {trainable:,} trainable of {total:,} parameters "
                f"({'GPU ' + run.gpus if on_gpu else 'CPU'}, {str(dtype).removeprefix('torch.')})")

    stopping.check()
    with ctx.phase("tokenizing the dataset"):
        template, own = chat_template(tokenizer)
        if dataset.is_chat and not own:
            ctx.log("the base model has no chat template: using ChatML (saved with the adapter)")
            tokenizer.chat_template = template
        stats = token_stats(tokenizer, dataset, hp.max_length)
        ctx.log(f"dataset: {dataset.format_name}, {stats.describe(hp.max_length)}")
        encoded = [encode(tokenizer, template, dataset.examples[i], hp.max_length) for i in range(len(dataset.examples))]
        train = [encoded[i] for i in train_idx if encoded[i] is not None]
        validation = [encoded[i] for i in val_idx if encoded[i] is not None]
        if not train:
            raise JobFailure(f"no training row has anything to learn within the max length of {hp.max_length} tokens")

    total_steps = hp.steps(len(train))
    collator = Collator(tokenizer.pad_token_id)
    args = TrainingArguments(
        output_dir=str(partial / "checkpoints"),
        per_device_train_batch_size=hp.batch_size, per_device_eval_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.grad_accum, learning_rate=hp.learning_rate,
        num_train_epochs=hp.epochs, max_steps=hp.max_steps or -1,
        lr_scheduler_type="cosine", warmup_steps=0.03,
        logging_strategy="no",  # the reporter asks for a loss once a second: the trainer's own logging
                                # step costs about 8% of a small model's step time (measured)
        # Validation and automatic checkpoints are the reporter's to schedule (Pacing); a checkpoint interval
        # the user set is kept to.
        eval_strategy="no", save_strategy="steps" if hp.save_steps else "no", save_steps=hp.save_steps or 500,
        save_total_limit=2,
        seed=hp.seed, data_seed=hp.seed, bf16=bf16, fp16=on_gpu and not bf16, use_cpu=not on_gpu,
        report_to="none", disable_tqdm=True, remove_unused_columns=False, label_names=["labels"],
        dataloader_num_workers=0,
    )
    reporter = Reporter(ctx, stopping, collator, total_steps, sum(len(row["input_ids"]) for row in validation),
                        Pacing(total_steps, evaluate=bool(validation), save=not hp.save_steps))
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=validation or None,
                      data_collator=collator, callbacks=[reporter.callback(TrainerCallback)])
    trainer.remove_callback(PrinterCallback)  # the reporter logs each step in one readable line
    resume = latest_checkpoint(partial / "checkpoints")
    if resume is not None:
        ctx.log(f"resuming from {resume.name} (step {resume.name.split('-')[-1]} of {total_steps})")
    elif run.attempt > 1:
        ctx.log("no checkpoint was saved before the last run stopped: starting from step 0")
    ctx.log(f"training: {len(train)} rows, {len(validation)} validation, {total_steps} steps"
            + (f" ({len(dataset.examples) - len(train) - len(validation)} left out: nothing to learn "
               f"within {hp.max_length} tokens)" if len(train) + len(validation) < len(dataset.examples) else ""))
    stopping.check()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except torch.cuda.OutOfMemoryError as exc:
        raise JobFailure("out of GPU memory: lower the batch size or the max length (or use QLoRA)") from exc
    if stopping.requested and trainer.state.global_step < total_steps:
        raise JobCancelled()  # stopped between steps; a finished run is saved even if a cancel came late

    if validation and not (reporter.eval_curve and reporter.eval_curve[-1][0] == trainer.state.global_step):
        reporter.add_eval(trainer.state.global_step, trainer.evaluate()["eval_loss"])
    final_eval = reporter.last_eval
    reporter.report(force=True)
    evaluation = None
    if validation:
        with ctx.phase("evaluating the adapter and its base on the held-out rows"):
            evaluation = compare_with_base(ctx, model, validation, collator, hp.batch_size, stopping)
        if evaluation is not None:
            ctx.log(f"held-out rows: {describe_evaluation(evaluation)}")
    with ctx.phase("saving the adapter"):
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        lineage = {
            "base": run.base_name, "base_repo": run.base_repo, "dataset": run.dataset_label, "format": dataset.format_name,
            "rows": {"train": len(train), "validation": len(validation)}, "hyperparameters": run.hyperparameters,
            "target_modules": targets, "steps": trainer.state.global_step,
            "final_loss": reporter.last_loss, "final_eval_loss": final_eval, "evaluation": evaluation,
            "train_runtime_s": round(result.metrics["train_runtime"], 3),
            "train_tokens": reporter.trained_tokens,
            "tokens_per_s": round(reporter.tokens_per_s, 1),
        }
        (partial / "modeldeck.json").write_text(json.dumps(lineage, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(partial / "checkpoints", ignore_errors=True)
        copy.unlink(missing_ok=True)
        publish(final)
    ctx.log(f"adapter written to {final}")
    return lineage


class Collator:
    """Pads a batch to its longest row (labels with -100) and counts the real tokens it carries."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.tokens = 0

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
            self.tokens += n
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class Pacing:
    """When to validate and to save a checkpoint: about ten times a run each, and never so often that they
    take more than SHARE of the run's time. A CPU run of 15 slow steps validated and saved after every one
    (a third of its time); here each waits until the training since the last one is at least its own
    measured cost / SHARE. Before the first has been measured, the first is never before a tenth of the run."""

    SHARE = 0.1
    TIMES_A_RUN = 10

    def __init__(self, total_steps: int, evaluate: bool, save: bool):
        self.every = max(1, total_steps // self.TIMES_A_RUN)
        self.evaluate, self.save = evaluate, save
        self.trained_since = {"eval": time.monotonic(), "save": time.monotonic()}
        self.last_step = {"eval": 0, "save": 0}
        self.cost_s: dict[str, float | None] = {"eval": None, "save": None}
        self.started: dict[str, float | None] = {"eval": None, "save": None}

    def _due(self, what: str, step: int) -> bool:
        if step - self.last_step[what] < self.every:
            return False
        cost = self.cost_s[what]
        return cost is None or time.monotonic() - self.trained_since[what] >= cost / self.SHARE

    def evaluate_now(self, step: int) -> bool:
        return self.evaluate and self._due("eval", step)

    def save_now(self, step: int) -> bool:
        return self.save and self._due("save", step)

    def resumed(self, step: int) -> None:
        """A run resumed from a checkpoint at `step`: both were done there, not due again at once."""
        self.last_step = {"eval": step, "save": step}

    def evaluating(self) -> None:
        self.started["eval"] = time.monotonic()

    def saving(self) -> None:
        self.started["save"] = time.monotonic()

    def evaluated(self, step: int) -> None:
        self._done("eval", step)
        if self.started["save"] is not None:  # the trainer saves after validating: the save starts now
            self.started["save"] = time.monotonic()

    def saved(self, step: int) -> None:
        self._done("save", step)

    def _done(self, what: str, step: int) -> None:
        now = time.monotonic()
        if self.started[what] is not None:
            self.cost_s[what] = now - self.started[what]
        self.started[what], self.last_step[what], self.trained_since[what] = None, step, now


class Reporter:
    """Turns the trainer's steps and logs into the job's progress and metrics, written at most once a
    second (and on every validation), so reporting costs the training loop almost nothing."""

    def __init__(self, ctx: JobContext, stopping: Stopping, collator: Collator, total_steps: int,
                 validation_tokens: int, pacing: Pacing):
        self.ctx, self.stopping, self.collator, self.total_steps = ctx, stopping, collator, total_steps
        self.pacing = pacing
        self.validation_tokens = validation_tokens  # what one evaluation puts through the collator
        self.evaluated_tokens = 0
        self.train_curve: list[list[float]] = []
        self.eval_curve: list[list[float]] = []
        self.step = 0
        self.epoch = 0.0
        self.last_loss: float | None = None
        self.last_eval: float | None = None
        self.lr: float | None = None
        self.tokens_per_s = 0.0
        self.eta_s: float | None = None
        self.last_report = 0.0
        self.last_log = 0.0
        self.run_start = time.monotonic()
        self.run_first_step = 0
        self.tokens_at_start = 0

    def callback(self, base: type):
        reporter = self

        class ProgressCallback(base):
            def on_train_begin(self, args, state, control, **kwargs):
                reporter.begin(state)

            def on_step_end(self, args, state, control, **kwargs):
                reporter.stepped(state, control)

            def on_substep_end(self, args, state, control, **kwargs):  # within a step of gradient accumulation
                if reporter.stopping.requested:  # a long step on a CPU: stop now, not after it
                    reporter.stop(state, control)

            def on_log(self, args, state, control, logs=None, **kwargs):
                reporter.logged(state, logs or {})

            def on_evaluate(self, args, state, control, **kwargs):
                reporter.evaluated_tokens += reporter.validation_tokens
                reporter.pacing.evaluated(state.global_step)

            def on_save(self, args, state, control, **kwargs):
                reporter.pacing.saved(state.global_step)

        return ProgressCallback()

    def begin(self, state) -> None:
        """A resumed run starts with the curve the checkpoint remembers."""
        self.run_start, self.run_first_step = time.monotonic(), state.global_step
        self.pacing.resumed(state.global_step)
        self.tokens_at_start = self.collator.tokens
        self.step, self.total_steps = state.global_step, state.max_steps or self.total_steps
        for entry in state.log_history:
            if "loss" in entry:
                add_point(self.train_curve, entry["step"], entry["loss"])
                self.last_loss = entry["loss"]
            if "eval_loss" in entry:
                self.add_eval(entry["step"], entry["eval_loss"])
        self.report(force=True)

    def stepped(self, state, control) -> None:
        self.step, self.epoch = state.global_step, state.epoch or 0.0
        elapsed = time.monotonic() - self.run_start
        done = self.step - self.run_first_step
        if done > 0 and elapsed > 0:
            self.tokens_per_s = self.trained_tokens / elapsed
            self.eta_s = elapsed / done * (self.total_steps - self.step)
        if self.stopping.requested:
            self.stop(state, control)
            return
        now = time.monotonic()
        if now - self.last_log >= LOG_EVERY_S or self.step in (1, self.total_steps):
            control.should_log = True  # the loss, averaged over the steps since the last one
            self.last_log = now
        if now - self.pacing.trained_since["save"] > TIMED_CHECKPOINT_S or self.stopping.checkpoint:
            if self.stopping.checkpoint:
                self.ctx.log(f"a checkpoint was asked for (SIGUSR1): saving it at step {self.step}")
            self.stopping.checkpoint = False
            control.should_save = True
        if self.step < self.total_steps:  # the last step's validation comes after training, once
            control.should_evaluate = control.should_evaluate or self.pacing.evaluate_now(self.step)
            if control.should_save or self.pacing.save_now(self.step):
                control.should_save = True
                self.pacing.saving()
        if control.should_evaluate:
            self.pacing.evaluating()
        self.report()

    def stop(self, state, control) -> None:
        """A cancel: stop, keeping the steps done since the last checkpoint for a retry to resume from (not
        that checkpoint again, nor step 0)."""
        control.should_training_stop = True
        control.should_save = state.global_step > self.pacing.last_step["save"]

    @property
    def trained_tokens(self) -> int:
        """Real tokens of the training batches of this run (validation batches left out)."""
        return self.collator.tokens - self.tokens_at_start - self.evaluated_tokens

    def logged(self, state, logs: dict) -> None:
        if "loss" in logs:
            self.last_loss = logs["loss"]
            self.lr = logs.get("learning_rate", self.lr)
            add_point(self.train_curve, state.global_step, logs["loss"])
            eta = f"  ETA {human_duration(self.eta_s)}" if self.eta_s is not None else ""
            self.ctx.log(f"step {state.global_step}/{self.total_steps}  epoch {state.epoch or 0:.2f}  "
                         f"loss {logs['loss']:.4f}  lr {self.lr or 0:.2e}  {self.tokens_per_s:,.0f} tok/s{eta}")
        if "eval_loss" in logs:
            self.add_eval(state.global_step, logs["eval_loss"])
            self.ctx.log(f"step {state.global_step}: validation loss {logs['eval_loss']:.4f}")
        # Written now: the step's own report went out just before its loss was logged, and the next one
        # comes with the next step (40 s away on a CPU). Logs come at most every LOG_EVERY_S.
        self.report(force=True)

    def add_eval(self, step: int, loss: float) -> None:
        self.last_eval = loss
        add_point(self.eval_curve, step, loss)

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_report < REPORT_EVERY_S:
            return
        self.last_report = now
        metrics = {
            "phase": "training", "step": self.step, "total_steps": self.total_steps, "epoch": round(self.epoch, 3),
            "loss": self.last_loss, "eval_loss": self.last_eval, "lr": self.lr,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "curve": {"train": self.train_curve, "eval": self.eval_curve},
        }
        self.ctx.report(metrics, progress=self.step / self.total_steps if self.total_steps else None, eta_s=self.eta_s)


def run_from_spec(spec_file: Path) -> int:
    """A fine-tune with no database: the entry point of a Job on Kubernetes or a batch job on SLURM
    (`python -m engine.jobs.finetune --spec FILE`). The spec (its target writes it) names the base model
    (a folder the run can read, or a repo on the Hub to download), the dataset (a file, or a Job's gzip
    parts), the hyperparameters and the output folder; progress and the outcome are told as events in the
    log (engine/jobs/reported.py). Run again on the same output (a new pod after an eviction, a batch job
    requeued, a retry), it resumes from the newest checkpoint."""
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    ctx = LogReporter(spec)
    stopping = Stopping()
    try:
        final, partial = output_folders(Path(spec["output"]))
        if (final / "modeldeck.json").exists():  # done before (the pod ran again after finishing)
            lineage = json.loads((final / "modeldeck.json").read_text(encoding="utf-8"))
            ctx.emit({"done": lineage | {"size_bytes": hub.snapshot_size(final)}})
            return 0
        partial.mkdir(parents=True, exist_ok=True)
        if spec.get("dataset"):  # the run's own copy already (a SLURM run's, in its folder): read where it is
            copy = Path(spec["dataset"])
        else:  # a Job's Secrets, made whole once
            copy = partial / ("dataset" + Path(spec["dataset_name"]).suffix)
            if not copy.exists():
                join_parts(Path(spec["dataset_parts"]), copy)
        base_path = spec.get("base_path")
        if not base_path:
            with ctx.phase("downloading the base model"):
                base_path = download_base(spec["base_repo"], spec.get("revision"))
        stopping.check()
        lineage = train(ctx, stopping, Run(base_path, spec["base_name"], spec["base_repo"], copy, spec["dataset_name"],
                                           spec["hyperparameters"], spec["gpus"], final, spec.get("attempt", 1)))
        lineage["size_bytes"] = hub.snapshot_size(final)
        ctx.emit({"done": lineage})
        return 0
    except JobCancelled:
        ctx.log("stopped; the newest checkpoint is kept for a retry")
        ctx.emit({"cancelled": True})
        return 143
    except JobFailure as exc:
        ctx.emit({"failed": str(exc)})
        return 1
    except Exception as exc:  # noqa: BLE001 - the reason reaches the dashboard; the traceback stays in the log
        import traceback

        traceback.print_exc()
        ctx.emit({"failed": f"{type(exc).__name__}: {exc}"})
        return 1


def copy_dataset(source: Path, copy: Path) -> None:
    """The run's own copy of its data, so a resumed run sees exactly what the first one saw; copied whole
    or not at all: a killed copy must not be reused as the data."""
    try:
        shutil.copyfile(source, copy.with_name(copy.name + ".tmp"))
        os.replace(copy.with_name(copy.name + ".tmp"), copy)
    except OSError as exc:
        raise JobFailure(f"cannot read the dataset {source}: {exc.strerror}") from exc


def join_parts(parts: Path, out: Path) -> None:
    """The dataset, sent in gzip parts (a Secret holds at most 1 MiB), made whole again."""
    import gzip

    chunks = sorted(parts.glob("dataset.gz.*"))
    if not chunks:
        raise JobFailure(f"no dataset parts in {parts}")
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as whole:
        packed = b"".join(chunk.read_bytes() for chunk in chunks)
        try:
            whole.write(gzip.decompress(packed))
        except (OSError, EOFError) as exc:
            raise JobFailure(f"the dataset parts in {parts} do not make a whole gzip file: {exc}") from exc
    os.replace(tmp, out)


def download_base(repo_id: str, revision: str | None) -> str:
    """The base model's files from the Hub, into the cache volume (HF_HOME): kept for the next run."""
    from huggingface_hub import HfApi, snapshot_download

    info = HfApi().model_info(repo_id, revision=revision, files_metadata=False)
    wanted = hub.select_files([s.rfilename for s in info.siblings or []])
    return snapshot_download(repo_id, revision=info.sha, allow_patterns=wanted)
