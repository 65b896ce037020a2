"""Import job: convert a GGUF file into a safetensors model folder under MODELDECK_HOME/models."""

from __future__ import annotations

from pathlib import Path

from engine import hub
from engine.jobs.harness import JobContext, main
from engine.localmodel import convert_gguf


def work(ctx: JobContext) -> None:
    gguf, target = Path(ctx.params["gguf"]), Path(ctx.params["output"])
    with ctx.phase("converting GGUF") as counted:
        converted = convert_gguf(gguf, target, ctx.log, counted)
    ctx.succeed({"converted_from": converted}, size_bytes=hub.snapshot_size(target))


if __name__ == "__main__":
    main(work)
