"""Fine-tuning and merging with real job processes on a tiny Llama the tests build (CPU, no network)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from sqlmodel import select

from catalog.schema import Job, JobState, Model, ModelKind, ModelState
from engine import finetune, jobs, models
from engine.errors import EngineError
from engine.format import state_text
from engine.hyperparameters import Hyperparameters
from tests.conftest import FAST, settled, wait_until
from tests.tinydata import write_dataset, write_jsonl


def start(db, dataset, name=None, base="tiny", **hp):
    plan = finetune.plan(db, base, dataset, Hyperparameters(**(FAST | hp)), "auto")
    return finetune.start(db, plan, name)


def job_row(db, job_id) -> Job:
    return jobs.get(db, job_id)


def logits(model_dir: Path, adapter: Path | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model(torch.tensor([[5, 6, 7, 8, 9]])).logits


@pytest.mark.parametrize("fmt", ["openai", "sharegpt", "alpaca", "text"])
def test_a_fine_tune_on_each_format_makes_an_adapter_that_changes_the_model(db, tiny, tmp_path, fmt):
    import torch

    model, job = start(db, write_dataset(tmp_path, fmt), max_steps=4)
    assert (model.kind, model.state, model.source) == (ModelKind.ADAPTER, ModelState.PENDING, "finetune:tiny")
    done = settled(db, model.id, timeout=120)
    finished = job_row(db, job.id)
    assert done.state == ModelState.READY, (done.reason, jobs.log_tail(finished.log_path, 20))
    metrics = json.loads(finished.metrics_json)
    assert metrics["step"] == 4 and metrics["total_steps"] == 4 and metrics["tokens_per_s"] > 0
    steps = [point[0] for point in metrics["curve"]["train"]]  # a loss a second, the first and last steps
    assert steps[0] == 1 and steps[-1] == 4 and steps == sorted(set(steps))
    assert metrics["curve"]["eval"][-1][0] == 4  # 30 rows: 2 held out for validation
    adapter = Path(done.path)
    assert (adapter / "adapter_model.safetensors").exists() and not (adapter / "checkpoints").exists()
    assert not adapter.with_name(adapter.name + ".partial").exists()
    lineage = json.loads((adapter / "modeldeck.json").read_text())
    assert lineage["base"] == "tiny" and lineage["steps"] == 4 and lineage["final_loss"] > 0
    assert done.meta["final_eval_loss"] == lineage["final_eval_loss"] and done.meta["rows"] == {"train": 28, "validation": 2}
    assert done.base_id is not None and done.size_bytes > 0
    assert not torch.allclose(logits(tiny), logits(tiny, adapter))
    log = Path(finished.log_path).read_text()
    assert "step 4/4" in log and "loss" in log and "{'loss'" not in log


def direct_loss(model, rows: list[dict]) -> float:
    """The mean loss per answer token, row by row through the model's own loss (not the code under test)."""
    import torch

    total = tokens = 0
    with torch.no_grad():
        for row in rows:
            counted = sum(1 for label in row["labels"][1:] if label != -100)
            loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
            total, tokens = total + float(loss) * counted, tokens + counted
    return total / tokens


def test_a_finished_fine_tune_says_how_its_adapter_and_its_base_do_on_the_held_out_rows(db, tiny, tmp_path):
    """Loss and perplexity of both on the same held-out rows, each as a direct computation gives them; in the
    model's details, `show` and its lineage."""
    import math

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.datasets import chat_template, encode, read_dataset
    from engine.format import meta_value

    path = write_dataset(tmp_path, "openai")
    model, job = start(db, path, max_steps=8)
    done = settled(db, model.id, timeout=120)
    assert done.state == ModelState.READY, done.reason
    lineage = json.loads((Path(done.path) / "modeldeck.json").read_text())
    hp = Hyperparameters(**lineage["hyperparameters"])  # as the run resolved them (its max length, say)
    dataset = read_dataset(path)
    tokenizer = AutoTokenizer.from_pretrained(done.path)
    template = chat_template(tokenizer)[0]
    held_out = [encode(tokenizer, template, dataset.examples[i], hp.max_length)
                for i in dataset.split(hp.val_split, hp.seed)[1]]
    base = AutoModelForCausalLM.from_pretrained(tiny).eval()
    expected_base = direct_loss(base, held_out)
    expected_adapter = direct_loss(PeftModel.from_pretrained(base, done.path).eval(), held_out)

    evaluation = done.meta["evaluation"]
    assert evaluation["rows"] == 2 and evaluation["tokens"] == sum(
        sum(1 for label in row["labels"][1:] if label != -100) for row in held_out)
    assert evaluation["adapter"]["loss"] == pytest.approx(expected_adapter, rel=1e-4)
    assert evaluation["base"]["loss"] == pytest.approx(expected_base, rel=1e-4)
    assert evaluation["adapter"]["perplexity"] == pytest.approx(math.exp(expected_adapter), rel=1e-3)
    assert expected_adapter < expected_base  # the tiny data is learnable: the adapter predicts it better
    line = meta_value("evaluation", evaluation)
    assert line.startswith(f"adapter loss {evaluation['adapter']['loss']:.4g} (perplexity ")
    assert "2 held-out rows" in line and "× the base's perplexity" in line
    assert lineage["evaluation"] == evaluation


def test_the_held_out_loss_weighs_every_answer_token_alike_whatever_the_batching(tiny, tmp_path):
    """Rows of different lengths (padding in a batch), prompt tokens masked: batches of 4, of 3 and one by one
    all give the token-weighted loss the model's own loss gives row by row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.datasets import chat_template, encode, read_dataset
    from engine.jobs.evaluation import evaluate
    from engine.jobs.training import Collator

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    dataset = read_dataset(write_dataset(tmp_path, "openai"))
    rows = [encode(tokenizer, chat_template(tokenizer)[0], example, 256) for example in dataset.examples[:9]]
    assert len({len(row["input_ids"]) for row in rows}) > 1 and any(-100 in row["labels"] for row in rows)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    expected = direct_loss(model.eval(), rows)
    model.train()
    for batch_size in (4, 3, 1):
        result = evaluate(model, rows, Collator(tokenizer.pad_token_id), batch_size)
        assert result.loss == pytest.approx(expected, rel=1e-5), batch_size
    assert model.training  # left as it was found


def test_a_cancel_or_a_failure_while_evaluating_keeps_the_finished_adapter(tiny, tmp_path):
    """Training is over when the held-out rows are scored: a cancel or an error there costs the evaluation
    (said in the log), never the adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.datasets import chat_template, encode, read_dataset
    from engine.jobs import JobCancelled
    from engine.jobs.training import Collator, compare_with_base

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    dataset = read_dataset(write_dataset(tmp_path, "openai"))
    rows = [encode(tokenizer, chat_template(tokenizer)[0], example, 256) for example in dataset.examples[:3]]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), LoraConfig(r=2, task_type="CAUSAL_LM"))

    class Log:
        lines: list[str] = []

        def log(self, line: str) -> None:
            self.lines.append(line)

    class Cancelled:
        def check(self) -> None:
            raise JobCancelled()

    class Fine:
        def check(self) -> None:
            pass

    collator = Collator(tokenizer.pad_token_id)
    assert compare_with_base(Log(), model, rows, collator, 2, Cancelled()) is None
    assert "cancelled while evaluating" in Log.lines[-1]
    assert compare_with_base(Log(), model, [{"input_ids": [1, 2], "labels": [-100, -100]}], collator, 2, Fine()) is None
    assert "failed (ValueError: the rows have no answer tokens" in Log.lines[-1]
    done = compare_with_base(Log(), model, rows, collator, 2, Fine())
    assert done["rows"] == 3 and done["adapter"]["loss"] > 0 and collator.tokens == 0  # not counted as trained


def test_resume_after_sigkill_continues_from_the_last_checkpoint(db, tiny, tmp_path):
    model, job = start(db, write_dataset(tmp_path), max_steps=120, save_steps=10, val_split=0)
    checkpoints = Path(model.path + ".partial") / "checkpoints"
    wait_until(lambda: (checkpoints / "checkpoint-20" / "trainer_state.json").exists(), 120, what="checkpoint 20")
    os.kill(job_row(db, job.id).pid, signal.SIGKILL)
    failed = settled(db, model.id)
    assert failed.state == ModelState.FAILED and "killed by signal SIGKILL" in failed.reason
    newest = int(finetune.latest_checkpoint(checkpoints).name.split("-")[1])
    assert 20 <= newest < 120

    _, again = models.retry(db, model.name)
    done = settled(db, model.id, timeout=120)
    assert done.state == ModelState.READY, done.reason
    log = Path(job_row(db, again.id).log_path).read_text()
    resumed_from = int(log.split("resuming from checkpoint-")[1].split()[0])
    assert resumed_from == newest
    assert f"step {resumed_from + 1}/120" in log and "step 1/120" not in log
    metrics = json.loads(job_row(db, again.id).metrics_json)
    assert metrics["step"] == 120 and metrics["curve"]["train"][0][0] == 1  # the curve from before survives


def test_cancel_stops_cleanly_between_steps_and_ends_cancelled(db, tiny, tmp_path):
    model, job = start(db, write_dataset(tmp_path), max_steps=100_000, val_split=0)
    wait_until(lambda: json.loads(job_row(db, job.id).metrics_json).get("step", 0) >= 2, 120, what="training")
    cancelled = jobs.cancel(db, job.id)
    assert cancelled.state == JobState.CANCELLED
    assert settled(db, model.id).reason == "finetune cancelled"
    log = Path(cancelled.log_path).read_text()
    assert "cancel requested" in log and "job cancelled" in log and "killed" not in log  # stopped by itself
    row = next(r for r in models.model_rows(db) if r.model.id == model.id)
    assert state_text(row.model.state, row.model.reason, row.job, cancelled=row.cancelled) == "Cancelled"  # asked for: not "Failed"
    # The work up to the cancel is kept: a retry resumes from it (no periodic checkpoint was due yet).
    assert finetune.latest_checkpoint(Path(model.path + ".partial") / "checkpoints") is not None


def test_a_job_that_ignores_the_cancel_is_killed_and_reads_cancelled_at_once(db, tmp_path):
    """As a CPU step longer than the deadline: the job is killed, its state is settled before cancel returns
    (its process is another's child, as one the dashboard started: a zombie until reaped), and its log says."""
    import subprocess
    import sys
    import time

    import psutil

    from catalog.schema import JobKind

    keeper = subprocess.Popen([sys.executable, "-c", (
        "import signal, subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, "
        "signal.SIG_IGN); print(1, flush=True); time.sleep(120)'], start_new_session=True, stdout=subprocess.PIPE)\n"
        "c.stdout.readline(); print(c.pid, flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(keeper.stdout.readline())
        log = tmp_path / "job.log"
        log.write_text("10:00:00 step 3/400\n")
        with db.write() as session:
            job = Job(kind=JobKind.FINETUNE, state=JobState.RUNNING, title="a slow step", log_path=str(log), pid=pid,
                      pid_started_at=psutil.Process(pid).create_time())
            session.add(job)
            session.flush()
            job_id = job.id
        began = time.monotonic()
        cancelled = jobs.cancel(db, job_id)
        assert cancelled.state == JobState.CANCELLED and time.monotonic() - began < jobs.STOP_DEADLINE_S + 3
        assert "cancel requested" in log.read_text() and "did not stop within 5 s: killed" in log.read_text()
    finally:
        keeper.kill()
        keeper.wait()


def test_validation_is_paced_by_what_it_costs_not_run_after_every_step(db, tiny, tmp_path):
    """15 steps of one row against 200 validation rows: validating after every step (a tenth of the run's
    steps) would spend most of the run validating; it validates once early, then once at the end."""
    data = write_dataset(tmp_path, "sharegpt", rows=400)
    model, job = start(db, data, max_steps=15, val_split=0.5, batch_size=1, grad_accum=1)
    assert settled(db, model.id, timeout=300).state == ModelState.READY
    log = Path(job_row(db, job.id).log_path).read_text()
    validations = log.count("validation loss")
    assert 1 <= validations <= 3, log
    curve = json.loads(job_row(db, job.id).metrics_json)["curve"]["eval"]
    assert curve[-1][0] == 15  # the last step is always validated


def test_pacing_waits_for_ten_times_what_a_validation_or_a_checkpoint_cost(monkeypatch):
    from engine.jobs import training

    clock = [1000.0]
    monkeypatch.setattr(training.time, "monotonic", lambda: clock[0])
    pacing = training.Pacing(total_steps=100, evaluate=True, save=True)
    assert pacing.every == 10
    assert not pacing.evaluate_now(9) and pacing.evaluate_now(10)  # nothing measured yet: a tenth of the run
    pacing.evaluating()
    clock[0] += 30  # a validation that took 30 s
    pacing.evaluated(10)
    clock[0] += 200  # 200 s of training since: under ten times its cost
    assert not pacing.evaluate_now(30)
    clock[0] += 100
    assert pacing.evaluate_now(30)
    assert pacing.save_now(30)  # a checkpoint has its own cost: none measured yet
    pacing.saving()
    clock[0] += 1
    pacing.saved(30)
    clock[0] += 9
    assert not pacing.save_now(40) and not pacing.save_now(35)  # ten times 1 s, and ten steps
    clock[0] += 1
    assert pacing.save_now(40)
    assert not training.Pacing(100, evaluate=False, save=False).evaluate_now(50)


def test_a_steps_loss_is_written_when_it_is_logged_not_with_the_next_step(db):
    """A step's report goes out at its end, just before its loss is logged: on a CPU the next step is
    40 s away, and the dashboard showed the loss of the step before meanwhile."""
    from types import SimpleNamespace

    from catalog.schema import JobKind
    from engine.jobs.harness import JobContext
    from engine.jobs.training import Collator, Pacing, Reporter, Stopping

    with db.write() as session:
        job = jobs.create(session, JobKind.FINETUNE, "fine-tune", None)
    reporter = Reporter(JobContext(db, jobs.get(db, job.id)), Stopping(), Collator(0), 4, 0, Pacing(4, False, False))
    control = SimpleNamespace(should_log=False, should_save=False, should_evaluate=False, should_training_stop=False)
    for step, loss in ((1, 4.07), (2, 3.91)):
        state = SimpleNamespace(global_step=step, epoch=step / 2, log_history=[])
        reporter.stepped(state, control)
        reporter.logged(state, {"loss": loss, "learning_rate": 1e-4})
        written = json.loads(jobs.get(db, job.id).metrics_json)
        assert (written["step"], written["loss"]) == (step, loss)


def test_a_first_step_under_way_says_so_then_the_eta_takes_its_place():
    from catalog.schema import JobKind
    from engine.format import job_progress

    first = Job(kind=JobKind.FINETUNE, title="fine-tune", metrics_json=Job.dumps({"step": 0, "total_steps": 4}))
    assert job_progress(first, "short").endswith("0% first step…") and "first step…" in job_progress(first, "long")
    later = Job(kind=JobKind.FINETUNE, title="fine-tune", eta_s=46, metrics_json=Job.dumps(
        {"step": 1, "total_steps": 4, "loss": 4.07}))
    assert job_progress(later, "short").endswith("25% loss 4.070 ETA 46s")


def test_a_malformed_dataset_is_refused_before_any_job_starts(db, tiny, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 3
    bad = write_jsonl(tmp_path / "bad.jsonl", rows + [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(EngineError, match="bad.jsonl, line 4: no assistant turn"):
        start(db, bad)
    with db.read() as session:
        assert session.exec(select(Job)).all() == [] and len(session.exec(select(Model)).all()) == 1


@pytest.mark.parametrize("hp, message", [
    ({"rank": 0}, "LoRA rank must be above 0"), ({"learning_rate": -1}, "learning rate must be above 0"),
    ({"batch_size": 0}, "batch size must be above 0"), ({"max_length": 4096}, "over the model's limit of 128"),
    ({"dropout": 1.0}, "dropout must be from 0 to below 1"), ({"method": "qlora"}, "QLoRA needs a CUDA GPU"),
])
def test_bad_hyperparameters_are_refused_with_the_reason(db, tiny, tmp_path, hp, message):
    with pytest.raises(EngineError, match=message):
        start(db, write_dataset(tmp_path), **hp)


def test_bad_bases_and_names_are_refused_and_nothing_is_overwritten(db, tiny, tmp_path):
    data = write_dataset(tmp_path)
    with pytest.raises(EngineError, match="no custom model named 'nope'"):
        start(db, data, base="nope")
    with pytest.raises(EngineError, match="invalid name"):
        start(db, data, name="../escape")
    with pytest.raises(EngineError, match="already exists"):
        start(db, data, name="tiny")
    squatter = models.models_dir(db) / "taken"
    squatter.mkdir()
    (squatter / "keep.txt").write_text("mine")
    with pytest.raises(EngineError, match="already exists; choose another name"):
        start(db, data, name="taken")
    assert (squatter / "keep.txt").read_text() == "mine"
    with pytest.raises(EngineError, match="no such file"):
        start(db, tmp_path / "missing.jsonl")


def test_merge_makes_a_model_that_loads_with_plain_transformers(db, tiny, tmp_path):
    import torch
    from transformers import AutoTokenizer

    adapter, _ = start(db, write_dataset(tmp_path), max_steps=3)
    adapter = settled(db, adapter.id, timeout=120)
    assert adapter.state == ModelState.READY, adapter.reason
    merged, job = finetune.merge(db, adapter.name)
    merged = settled(db, merged.id, timeout=120)
    assert merged.state == ModelState.READY, (merged.reason, jobs.log_tail(job_row(db, job.id).log_path, 20))
    assert merged.kind == ModelKind.MERGED and merged.name == f"{adapter.name}-merged"
    assert (Path(merged.path) / "model.safetensors").exists()
    assert torch.allclose(logits(Path(merged.path)), logits(tiny, Path(adapter.path)), atol=1e-5)
    assert AutoTokenizer.from_pretrained(merged.path).chat_template  # deployable as a chat model
    # The merged model depends on the adapter, which depends on its base.
    with pytest.raises(EngineError, match=f"merged '{merged.name}' is built on it"):
        models.delete_model(db, adapter.name)
    with pytest.raises(EngineError, match=f"adapter '{adapter.name}' is built on it"):
        models.delete_model(db, "tiny")
    # A merged model can itself be fine-tuned; an adapter cannot.
    with pytest.raises(EngineError, match="is an adapter"):
        start(db, tmp_path / "openai.jsonl", base=adapter.name)
    plan = finetune.plan(db, merged.name, tmp_path / "openai.jsonl", Hyperparameters(), "auto")
    assert plan.base.name == merged.name and plan.hyperparameters.max_length == 128


def test_merge_refuses_what_is_not_a_ready_adapter(db, tiny):
    with pytest.raises(EngineError, match="only an adapter can be merged"):
        finetune.merge(db, "tiny")


def test_a_fine_tune_of_a_base_still_downloading_waits_for_it(db, hub, tmp_path):
    from tests.conftest import TINY_FILES  # noqa: F401  (the loopback Hub's repos)

    base, _ = models.pull(db, "org/big")
    plan = finetune.plan(db, base.name, write_dataset(tmp_path), Hyperparameters(**FAST, max_steps=1), "auto")
    adapter, job = finetune.start(db, plan)
    wait_until(lambda: "waiting for the base" in (job_row(db, job.id).metrics_json or ""), 30, what="the wait")
    # The loopback Hub's "big" repo is not a real model: when it turns Ready, loading it fails, and
    # the reason is the job's; had the download failed, the reason would say so.
    done = settled(db, adapter.id, timeout=120)
    assert done.state == ModelState.FAILED and done.reason


def test_a_disk_too_full_for_the_run_is_refused_before_it_starts(db, tiny, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from engine import hub

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(EngineError, match=r"not enough free disk: about .* needed, 1.0 KB free in .*models"):
        start(db, write_dataset(tmp_path))
    monkeypatch.setattr(hub.shutil, "disk_usage", shutil.disk_usage)
    with db.read() as session:
        assert session.exec(select(Job)).all() == []


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_fine_tune_on_the_gpu(db, tiny, tmp_path, method):
    from engine.gpus import has_bitsandbytes

    if method == "qlora" and not has_bitsandbytes():
        pytest.skip("QLoRA needs the bitsandbytes package")
    model, job = start(db, write_dataset(tmp_path), max_steps=4, method=method)
    done = settled(db, model.id, timeout=300)
    log = Path(job_row(db, job.id).log_path).read_text()
    assert done.state == ModelState.READY, (done.reason, log[-2000:])
    assert "GPU 0" in log and ("bfloat16" in log or "float16" in log)


def test_a_job_on_another_login_node_is_judged_by_its_heartbeat(db):
    """MODELDECK_HOME shared by two hosts (login nodes): a job whose process runs on the other one is alive
    while its heartbeat is fresh (its pid means nothing here), and settled, saying where, once it is silent."""
    from catalog.schema import now
    from engine import jobs

    with db.write() as session:
        job = Job(kind="download", state=JobState.RUNNING, title="t", pid=1, host="login2.example.org",
                  heartbeat_at=now())
        session.add(job)
    assert jobs.reconcile(db) == [] and jobs.get(db, job.id).state == JobState.RUNNING
    with pytest.raises(EngineError, match="runs on login2.example.org: cancel it there"):
        jobs.cancel(db, job.id)
    with db.write() as session:
        row = session.get(Job, job.id)
        row.heartbeat_at, row.cancel_requested = now() - 300, False
        session.add(row)
    assert jobs.reconcile(db) == [job.id]
    assert jobs.get(db, job.id).error.startswith("its process on login2.example.org stopped reporting 300 s ago")
