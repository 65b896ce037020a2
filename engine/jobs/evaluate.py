"""Evaluation job: `python -m engine.jobs.evaluate DB JOB_ID` scores a model on a dataset's rows (an adapter: and
its base, the same weights with the adapter off) and adds the result to the model's meta (engine/evaluate.py).

The rows are encoded as a fine-tune of this model would encode them (its chat template, learned tokens only), cut
to the model's max length; the model stays Ready whatever happens here.
"""

from __future__ import annotations

import time
from pathlib import Path

from catalog.schema import Job, JobState, Model
from engine.events import record
from engine.jobs.harness import JobContext, JobFailure, main
from engine.lifecycle import move_job


def work(ctx: JobContext) -> None:
    import torch

    from engine.datasets import chat_template, encode, load_tokenizer, read_dataset
    from engine.evaluate import BATCH_SIZE, describe, kept
    from engine.finetune import model_limits
    from engine.hyperparameters import Hyperparameters
    from engine.jobs.evaluation import evaluate
    from engine.jobs.training import Collator, Stopping

    params = ctx.params
    adapter_path, base_path = (params["model_path"], params["base_path"]) if params.get("base_path") else \
        (None, params["model_path"])
    stopping = Stopping()
    dataset = read_dataset(params["dataset"])
    on_gpu = params.get("gpus", "cpu") != "cpu" and torch.cuda.is_available()
    with ctx.phase("loading the model"):
        from transformers import AutoModelForCausalLM

        # an adapter's folder holds the tokenizer (and chat template) it was trained with
        tokenizer = load_tokenizer(adapter_path if adapter_path and (Path(adapter_path) / "tokenizer_config.json")
                                   .is_file() else base_path)
        dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if on_gpu else torch.float32
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
        if on_gpu:
            model = model.to("cuda")
        if adapter_path:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_path)
    stopping.check()
    max_length = Hyperparameters().resolved(model_limits(base_path).max_length).max_length
    with ctx.phase("tokenizing the dataset"):
        template, _own = chat_template(tokenizer)
        encoded = [encode(tokenizer, template, example, max_length) for example in dataset.examples]
        rows = [row for row in encoded if row is not None]
    if not rows:
        raise JobFailure(f"no row of {dataset.path.name} has anything to score within {max_length} tokens")
    collator = Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    ctx.log(f"{len(rows)} rows of {dataset.path.name} ({dataset.format_name}), up to {max_length} tokens each, on "
            f"{'the GPU' if on_gpu else 'the CPU'}")
    with ctx.phase("scoring the adapter" if adapter_path else "scoring the model") as count:
        scored = evaluate(model, rows, collator, BATCH_SIZE, stopping, lambda done, total: count(done, total))
    result = {"dataset": str(dataset.path), "format": dataset.format_name, "rows": len(rows),
              "tokens": scored.tokens, "max_length": max_length, "left_out": len(encoded) - len(rows),
              "at": time.time(), "model": scored.as_dict()}
    if adapter_path:
        with ctx.phase("scoring its base on the same rows") as count, model.disable_adapter():
            result["base"] = evaluate(model, rows, collator, BATCH_SIZE, stopping,
                                      lambda done, total: count(done, total)).as_dict()
    ctx.log(f"evaluated: {describe(result)}")
    with ctx.db.write() as session:  # the model stays Ready: only its meta grows, with the job's end
        model_row = session.get(Model, ctx.model_id)
        if model_row is not None:
            model_row.meta_json = Model.dumps(model_row.meta | {"evaluations": kept(model_row.meta, result)})
            session.add(model_row)
            record(session, f"model:{model_row.id}", "updated", f"evaluated on {dataset.path.name}")
        move_job(session, session.get(Job, ctx.job_id), JobState.SUCCEEDED, progress=1.0,
                 metrics_json=Job.dumps({"evaluation": result}))


if __name__ == "__main__":
    main(work)
