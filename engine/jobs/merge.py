"""Merge job: fold a LoRA adapter into its base model's weights and save a plain transformers model
(safetensors, the tokenizer and chat template the adapter was trained with). Written to a `.partial`
folder first, so a crash never leaves half a model behind."""

from __future__ import annotations

import shutil
from pathlib import Path

from engine import hub
from engine.jobs.harness import JobContext, main
from engine.localmodel import output_folders, publish


def work(ctx: JobContext) -> None:
    p = ctx.params
    final, partial = output_folders(Path(p["output"]))
    with ctx.phase("loading the base model and the adapter"):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(p["base_path"], dtype="auto")
        model = PeftModel.from_pretrained(base, p["adapter_path"])
        tokenizer = AutoTokenizer.from_pretrained(p["adapter_path"])
    with ctx.phase("merging the adapter into the weights"):
        merged = model.merge_and_unload()
    with ctx.phase("writing safetensors"):
        shutil.rmtree(partial, ignore_errors=True)
        merged.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        publish(final)
    ctx.log(f"merged model written to {final}")
    ctx.succeed(size_bytes=hub.snapshot_size(final))


if __name__ == "__main__":
    main(work)
