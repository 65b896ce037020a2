"""A fine-tune on this machine: the training runs in this job's own process, on its own copy of the data
in the adapter's `.partial` folder, and records its progress in the database."""

from __future__ import annotations

from pathlib import Path

from engine import hub
from engine.jobs.harness import JobContext
from engine.jobs.training import Run, Stopping, copy_dataset, succeed_with, train
from engine.localmodel import output_folders


def run(ctx: JobContext) -> None:
    stopping = Stopping()
    p = ctx.params
    final, partial = output_folders(Path(p["output"]))
    base = ctx.wait_for_model(p["base_id"], "the base model", stopping.check)
    partial.mkdir(parents=True, exist_ok=True)
    copy = partial / ("dataset" + Path(p["dataset"]).suffix)
    if not copy.exists():
        copy_dataset(Path(p["dataset"]), copy)
    lineage = train(ctx, stopping, Run(base.path, base.name, base.repo_id, copy, p["dataset"], p["hyperparameters"],
                                       p["gpus"], final, p.get("attempt", 1)))
    succeed_with(ctx, lineage, hub.snapshot_size(final))
