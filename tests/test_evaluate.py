"""Evaluating a model or an adapter on a dataset, as a real job process: the loss and perplexity it records are
those a direct computation gives on the same rows (an adapter's, and its base's beside it), a bad dataset is
refused by line number before anything starts, and the model stays Ready throughout."""

from __future__ import annotations

import json
import math

import pytest

from catalog.schema import JobKind, JobState, ModelState
from engine import evaluate, jobs
from engine.errors import EngineError
from tests.conftest import wait_until
from tests.test_deployment_adapters import register_adapter


def direct_loss(model_dir, adapter_dir, dataset_path, adapter_on: bool = True) -> tuple[float, int]:
    """Token-weighted mean loss of the answer tokens, computed here row by row without the job's code."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.datasets import chat_template, encode, load_tokenizer, read_dataset

    tokenizer = load_tokenizer(adapter_dir or model_dir)
    template, _ = chat_template(tokenizer)
    rows = [r for r in (encode(tokenizer, template, e, 128) for e in read_dataset(dataset_path).examples) if r]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir:
        model = PeftModel.from_pretrained(model, adapter_dir)
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            if adapter_dir and not adapter_on:
                with model.disable_adapter():
                    logits = model(input_ids=ids).logits
            else:
                logits = model(input_ids=ids).logits
            labels = torch.tensor(row["labels"][1:])
            total += float(F.cross_entropy(logits[0, :-1].float(), labels, ignore_index=-100, reduction="sum"))
            tokens += int((labels != -100).sum())
    return total / tokens, tokens


def finished(db, job_id: int):
    def done():
        jobs.reconcile(db)
        job = jobs.get(db, job_id)
        return job if job.state.is_terminal() else None

    return wait_until(done, 180, 0.1, "the evaluation to end")


def test_an_adapter_and_its_base_are_scored_as_a_direct_computation_scores_them(db, tiny, tmp_path):
    from engine.models import find_model
    from tests.tinydata import write_dataset
    from tests.tinymodel import make_tiny_adapter

    adapter_dir = make_tiny_adapter(tiny, tmp_path / "tuned", seed=7)
    register_adapter(db, "tuned", "tiny", adapter_dir)
    data = write_dataset(tmp_path, "alpaca")
    checked = evaluate.plan(db, "tuned", data)
    assert checked.base is not None and checked.base.name == "tiny" and checked.gpus == "cpu"
    job = evaluate.start(db, checked)
    assert job.kind == JobKind.EVALUATE
    with db.read() as session:
        assert find_model(session, "tuned").state == ModelState.READY  # never Pending: it is only scored
    done = finished(db, job.id)
    assert done.state == JobState.SUCCEEDED, jobs.log_tail(done.log_path, 20)
    with db.read() as session:
        tuned = find_model(session, "tuned")
    assert tuned.state == ModelState.READY
    [result] = tuned.meta["evaluations"]
    adapter_loss, tokens = direct_loss(tiny, adapter_dir, data)
    base_loss, _ = direct_loss(tiny, adapter_dir, data, adapter_on=False)
    assert result["tokens"] == tokens and result["rows"] > 0
    assert result["model"]["loss"] == pytest.approx(adapter_loss, rel=1e-4)
    assert result["base"]["loss"] == pytest.approx(base_loss, rel=1e-4)
    assert result["model"]["perplexity"] == pytest.approx(math.exp(adapter_loss), rel=1e-3)
    assert adapter_loss != pytest.approx(base_loss, rel=1e-3)  # the adapter changes the model
    said = evaluate.describe(result)
    assert said.startswith(f"{data.name}: loss ") and "the base's perplexity" in said

    # a base model alone, on the same rows: its own loss, and the newest evaluation first
    job = evaluate.start(db, evaluate.plan(db, "tiny", data))
    assert finished(db, job.id).state == JobState.SUCCEEDED
    with db.read() as session:
        [result] = find_model(session, "tiny").meta["evaluations"]
    assert result["model"]["loss"] == pytest.approx(base_loss, rel=1e-4) and "base" not in result


def test_a_bad_dataset_or_model_is_refused_before_anything_starts(db, tiny, tmp_path):
    from tests.tinydata import write_jsonl

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"text": "fine"}, "not an object"])
    with pytest.raises(EngineError, match="bad.jsonl, line 3: not a JSON object"):
        evaluate.plan(db, "tiny", bad)
    with pytest.raises(EngineError, match="no such file"):
        evaluate.plan(db, "tiny", tmp_path / "absent.jsonl")
    with pytest.raises(EngineError, match="no custom model named 'ghost'"):
        evaluate.plan(db, "ghost", bad)
    from engine.models import job_rows

    assert all(j.kind != JobKind.EVALUATE for j in job_rows(db))


def test_eval_from_the_shell_prints_the_result_and_json(tiny_model_dir, tmp_path):
    from tests.test_cli import run
    from tests.tinydata import write_dataset

    run("import", str(tiny_model_dir), "--name", "tiny")
    data = write_dataset(tmp_path, "alpaca")
    said = run("eval", "tiny", str(data))
    assert said.stdout.startswith(f"tiny: {data.name}: loss ") and "perplexity" in said.stdout
    result = json.loads(run("eval", "tiny", str(data), "--json").stdout)
    assert result["model"]["loss"] > 0 and result["rows"] > 0
    shown = json.loads(run("show", "tiny", "--json").stdout)
    assert len(shown["meta"]["evaluations"]) == 2
    assert "evaluations:" in run("show", "tiny").stdout
    refused = run("eval", "tiny", str(tmp_path / "absent.jsonl"), check=False)
    assert refused.returncode == 1 and "no such file" in refused.stderr


async def test_custom_evaluates_a_model_from_its_dialog_and_shows_the_result(db, tiny, tmp_path):
    from tests.test_tui import loaded, plain, table
    from tests.tinydata import write_dataset, write_jsonl
    from tests.tui_helpers import wait_for
    from tui.app import ModelDeckApp
    from tui.screens.details import DetailsDialog
    from tui.screens.evaluate_dialog import EvaluateDialog

    data = write_dataset(tmp_path, "alpaca")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, "not an object"])
    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        await pilot.press("2", "e")
        dialog = await wait_for(pilot, lambda: isinstance(app.screen, EvaluateDialog) and app.screen, what="dialog")
        dialog.query_one("#dataset").value = str(bad)
        await pilot.press("enter")
        error = lambda: str(dialog.query_one("#error").render())  # noqa: E731
        await wait_for(pilot, lambda: "bad.jsonl, line 2: not a JSON object" in error(), what="the bad line")
        assert app.screen is dialog and dialog.query_one("#dataset").value == str(bad)  # kept, nothing started
        dialog.query_one("#dataset").value = str(data)
        await pilot.press("enter")
        await wait_for(pilot, lambda: not isinstance(app.screen, EvaluateDialog), what="the dialog to close")
        model_id = next(iter(app.store.models))
        await wait_for(pilot, lambda: app.store.models[model_id].model.meta.get("evaluations"), 120,
                       what="the evaluation")
        assert plain(table(app).cells(model_id)[2]) == "Ready"
        await pilot.press("d")
        details = await wait_for(pilot, lambda: isinstance(app.screen, DetailsDialog) and app.screen, what="details")
        said = dict(details.fields)["Evaluations"]
        assert said.startswith(f"{data.name}: loss ") and "perplexity" in said
