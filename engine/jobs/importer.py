"""Import job: convert a GGUF file into a safetensors model folder under MODELDECK_HOME/models."""

from __future__ import annotations

from pathlib import Path

from catalog.schema import Model
from engine import hub
from engine.jobs.harness import JobContext, main
from engine.localmodel import convert_gguf


def work(ctx: JobContext) -> None:
    gguf, target = Path(ctx.params["gguf"]), Path(ctx.params["output"])
    with ctx.phase("converting GGUF") as counted:
        converted = convert_gguf(gguf, target, ctx.log, counted)
    with ctx.db.read() as session:
        meta = session.get(Model, ctx.model_id).meta
    ctx.succeed(size_bytes=hub.snapshot_size(target), meta_json=Model.dumps(meta | {"converted_from": converted}))


if __name__ == "__main__":
    main(work)
